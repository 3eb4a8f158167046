//! `[consumers]` and its `consumers.toml`: validated into [`Consumers`], with errors at the
//! line and column of the file they are in. A key is never echoed in an error: a clear-text
//! key or a malformed hash is named by its position only.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use http::HeaderValue;
use http::header::HeaderName;

use super::raw::{RawConsumers, RawConsumersFile, S};
use super::validate::{Validator, valid_name};
use crate::consumers::{Consumer, Consumers, KeyFrom, PlanId, Unknown, parse_hash};

/// The `[consumers]` table and the file it names; also the file's path and content hash for
/// the reload watcher.
pub(super) fn consumers(
    v: &mut Validator,
    raw: &S<RawConsumers>,
    mut claims: Option<&mut Vec<String>>,
) -> Option<(Consumers, Option<(PathBuf, String)>)> {
    let c = raw.get_ref();
    let mut jwt_claim = |v: &mut Validator, span, claim: &str, what: &str| match claims
        .as_deref_mut()
    {
        Some(list) => Some(super::validate::claim_slot(list, claim)),
        None => {
            v.error(
                span,
                format!("{what} = \"jwt:{claim}\" needs a [jwt] table (how tokens are verified)"),
            );
            None
        }
    };
    let key = match c.key.get_ref().split_once(':') {
        Some(("header", name)) => match HeaderName::from_str(name.trim()) {
            Ok(h) => Some(KeyFrom::Header(h)),
            Err(_) => {
                v.error(
                    c.key.span(),
                    format!("invalid header name \"{name}\" in `key`"),
                );
                None
            }
        },
        Some(("query", name)) if !name.trim().is_empty() => {
            Some(KeyFrom::Query(name.trim().to_string()))
        }
        Some(("jwt", claim)) if !claim.trim().is_empty() => {
            jwt_claim(v, c.key.span(), claim.trim(), "key")
                .map(|slot| KeyFrom::Jwt(slot, claim.trim().to_string()))
        }
        _ => {
            v.error(
                c.key.span(),
                format!(
                    "invalid consumer key \"{}\"; expected \"header:NAME\", \"query:NAME\" or \"jwt:CLAIM\"",
                    c.key.get_ref()
                ),
            );
            None
        }
    };
    let jwt_key = matches!(key, Some(KeyFrom::Jwt(..)));
    let plan_from = match &c.plan_from {
        None => None,
        Some(p) => match p.get_ref().split_once(':') {
            Some(("jwt", claim)) if jwt_key && !claim.trim().is_empty() => {
                jwt_claim(v, p.span(), claim.trim(), "plan_from")
            }
            _ => {
                v.error(
                    p.span(),
                    "`plan_from` reads a JWT claim (plan_from = \"jwt:CLAIM\"); it needs key = \"jwt:…\"",
                );
                None
            }
        },
    };
    let mut plans: Vec<Arc<str>> = Vec::new();
    for p in &c.plans {
        let name = p.get_ref();
        if !valid_name(name) {
            v.error(
                p.span(),
                format!("invalid plan name \"{name}\"; expected letters, digits, '-', '_' or '.'"),
            );
        } else if plans.iter().any(|q| &**q == name) {
            v.error(p.span(), format!("plan \"{name}\" is listed twice"));
        } else {
            plans.push(name.as_str().into());
        }
    }
    let plan_id = |name: &str| plans.iter().position(|p| &**p == name).map(|i| i as PlanId);
    let unknown_plan = |name: &str| {
        if plans.is_empty() {
            format!("unknown plan \"{name}\"; [consumers] plans lists none")
        } else {
            format!(
                "unknown plan \"{name}\"; [consumers] plans lists: {}",
                plans.join(", ")
            )
        }
    };
    let default_plan = match &c.default_plan {
        None => None,
        Some(d) => match plan_id(d.get_ref()) {
            Some(id) => Some(id),
            None => {
                v.error(d.span(), unknown_plan(d.get_ref()));
                None
            }
        },
    };
    let unknown = v.one_of(
        &c.unknown,
        "unknown",
        &[
            ("anonymous", Unknown::Anonymous),
            ("reject", Unknown::Reject),
        ],
        Unknown::Anonymous,
    );
    let mut table = Consumers {
        key: key.clone().unwrap_or(KeyFrom::Query(String::new())),
        plan_headers: plans
            .iter()
            .map(|p| HeaderValue::from_str(p).expect("plan names are header-safe"))
            .collect(),
        plans: plans.clone(),
        default_plan,
        unknown,
        list: Vec::new(),
        by_key: HashMap::default(),
        by_name: HashMap::new(),
        keys: 0,
        plan_from,
    };
    let Some(file) = &c.file else {
        if jwt_key {
            // The consumer is the claim's value; no file maps names to plans.
            return key.map(|_| (table, None));
        }
        v.error(
            raw.span(),
            "[consumers] needs file = \"consumers.toml\" (the consumers and their key hashes)",
        );
        return None;
    };
    let path = v.base_dir.join(file.get_ref());
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            v.error(
                file.span(),
                format!("cannot read the consumers file {}: {e}", path.display()),
            );
            return None;
        }
    };
    let hash = super::source_hash(&bytes);
    let name = path.display().to_string();
    let Ok(text) = std::str::from_utf8(&bytes) else {
        v.errors
            .extend(super::ConfigErrors::single(&name, 1, 1, "the consumers file is not UTF-8").0);
        return None;
    };
    let parsed: RawConsumersFile = match super::parse_toml(text, &name) {
        Ok(p) => p,
        Err(e) => {
            v.errors.extend(e.0);
            return None;
        }
    };
    let mut f = Validator::new(&name, text, v.base_dir);
    table.list.reserve(parsed.consumer.len());
    table.by_key.reserve(parsed.consumer.len());
    table.by_name.reserve(parsed.consumer.len());
    for entry in &parsed.consumer {
        let entry = entry.get_ref();
        let cname = entry.name.get_ref();
        if !valid_name(cname) {
            f.error(
                entry.name.span(),
                format!(
                    "invalid consumer name \"{cname}\"; expected letters, digits, '-', '_' or '.'"
                ),
            );
            continue;
        }
        if table.by_name.contains_key(cname.as_str()) {
            f.error(
                entry.name.span(),
                format!("duplicate consumer \"{cname}\"; consumer names must be unique"),
            );
            continue;
        }
        let plan = match &entry.plan {
            None => default_plan,
            Some(p) => match plan_id(p.get_ref()) {
                Some(id) => Some(id),
                None => {
                    f.error(p.span(), unknown_plan(p.get_ref()));
                    None
                }
            },
        };
        let index = table.list.len() as u32;
        for k in &entry.keys {
            let text = k.get_ref();
            let Some(hash) = parse_hash(text) else {
                let message = if text.starts_with("b3:") {
                    "malformed key hash; expected b3: and 64 lowercase hex digits, as `tollgate hash-key` prints"
                } else {
                    "a key in clear text is refused; list its hash instead (`tollgate hash-key` prints it)"
                };
                f.error(k.span(), message);
                continue;
            };
            if let Some(&other) = table.by_key.get(&hash) {
                let owner = table
                    .list
                    .get(other as usize)
                    .map_or(cname.as_str(), |c| &c.name);
                f.error(
                    k.span(),
                    format!("duplicate key hash: already a key of \"{owner}\""),
                );
                continue;
            }
            table.by_key.insert(hash, index);
            table.keys += 1;
        }
        let shared: Arc<str> = cname.as_str().into();
        table.by_name.insert(shared.clone(), index);
        table.list.push(Consumer {
            name: shared,
            plan,
            header: HeaderValue::from_str(cname).expect("consumer names are header-safe"),
        });
    }
    v.errors.append(&mut f.errors);
    key.map(|_| (table, Some((path, hash))))
}
