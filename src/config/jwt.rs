//! `[jwt]`: where the token is, its keys (a JWKS file, with errors at their line and column,
//! or an HMAC secret read from the environment, never printed), issuer, audience and leeway.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use http::header::HeaderName;

use super::raw::{RawJwt, S};
use super::validate::Validator;
use crate::jwt::{Jwt, KeyError, Settings};

/// The `[jwt]` table; also the JWKS file's path and content hash for the reload watcher.
pub(super) fn jwt(
    v: &mut Validator,
    raw: &S<RawJwt>,
    claims: Vec<String>,
) -> Option<(Jwt, Option<(PathBuf, String)>)> {
    let j = raw.get_ref();
    let header = match &j.header {
        None => http::header::AUTHORIZATION,
        Some(h) => match HeaderName::from_str(h.get_ref().trim()) {
            Ok(name) => name,
            Err(_) => {
                v.error(h.span(), format!("invalid header name \"{}\"", h.get_ref()));
                return None;
            }
        },
    };
    let leeway = v.duration(&j.leeway, Duration::from_secs(30)).as_secs();
    let secret = match &j.hs256_secret_env {
        None => None,
        Some(name) => match std::env::var(name.get_ref()) {
            Ok(secret) if !secret.is_empty() => Some(secret.into_bytes()),
            _ => {
                v.error(
                    name.span(),
                    format!(
                        "the environment variable {} (the HMAC secret) is not set or empty",
                        name.get_ref()
                    ),
                );
                return None;
            }
        },
    };
    let mut watched = None;
    let jwks = match &j.jwks_file {
        None => None,
        Some(file) => {
            let path = v.base_dir.join(file.get_ref());
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    v.error(
                        file.span(),
                        format!("cannot read the JWKS file {}: {e}", path.display()),
                    );
                    return None;
                }
            };
            let name = path.display().to_string();
            let set: jsonwebtoken::jwk::JwkSet = match serde_json::from_str(&text) {
                Ok(set) => set,
                Err(e) => {
                    v.errors.extend(
                        super::ConfigErrors::single(
                            &name,
                            e.line().max(1),
                            e.column().max(1),
                            format!("invalid JWKS: {e}"),
                        )
                        .0,
                    );
                    return None;
                }
            };
            watched = Some((path, super::source_hash(text.as_bytes())));
            Some((set, name, text))
        }
    };
    if jwks.is_none() && secret.is_none() {
        v.error(
            raw.span(),
            "[jwt] needs jwks_file = \"jwks.json\" (public keys) or hs256_secret_env = \"NAME\" (an HMAC secret)",
        );
        return None;
    }
    let (set, file, text) = match jwks {
        Some((set, name, text)) => (Some(set), name, text),
        None => (None, String::new(), String::new()),
    };
    let settings = Settings {
        header,
        jwks: set,
        secret,
        issuer: j.issuer.as_ref().map(|i| i.get_ref().clone()),
        audience: j.audience.as_ref().map(|a| a.get_ref().clone()),
        leeway,
        claims,
    };
    match Jwt::new(settings) {
        Ok(jwt) => Some((jwt, watched)),
        Err(e) => {
            // The position of the offending key: the start of its object in the file.
            let offset = match &e {
                KeyError::Key { index, .. } => nth_key_offset(&text, *index),
                KeyError::Empty => text.find("\"keys\"").unwrap_or(0),
            };
            let (line, column) = super::line_column(&text, offset);
            v.errors
                .extend(super::ConfigErrors::single(&file, line, column, e.to_string()).0);
            None
        }
    }
}

/// Where the `index`-th object of the `"keys"` array starts (0 when it cannot be found).
fn nth_key_offset(text: &str, index: usize) -> usize {
    let Some(keys) = text.find("\"keys\"") else {
        return 0;
    };
    let Some(open) = text[keys..].find('[').map(|i| keys + i) else {
        return 0;
    };
    let mut depth = 0usize;
    let mut seen = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text[open + 1..].char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => {
                if depth == 0 {
                    if seen == index {
                        return open + 1 + i;
                    }
                    seen += 1;
                }
                depth += 1;
            }
            '}' => depth = depth.saturating_sub(1),
            ']' if depth == 0 => break,
            _ => {}
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::nth_key_offset;

    #[test]
    fn finds_the_nth_key_object() {
        let text = "{\"keys\": [\n  {\"kty\": \"RSA\", \"n\": \"{\"},\n  {\"kty\": \"EC\"}\n]}";
        assert_eq!(&text[nth_key_offset(text, 0)..][..8], "{\"kty\": ");
        assert!(text[nth_key_offset(text, 1)..].starts_with("{\"kty\": \"EC\"}"));
        assert_eq!(nth_key_offset(text, 5), 0);
    }
}
