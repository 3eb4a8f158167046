//! Human-readable renderings of a policy: the summary `tollgate check` prints.

use std::fmt::Write as _;

use crate::config::{shadowed_routes, units::format_duration};
use crate::policy::{HeaderStyle, Matcher, Mode, OnStoreError, Policy, StoreSettings};

fn describe_match(m: &Matcher) -> String {
    let mut parts = Vec::new();
    if let Some(h) = &m.host {
        parts.push(format!("host {h}"));
    }
    if let Some(p) = &m.path {
        parts.push(format!("path {p}"));
    }
    if let Some(p) = &m.path_prefix {
        parts.push(format!("path prefix {p}"));
    }
    if !m.methods.is_empty() {
        let methods: Vec<&str> = m.methods.iter().map(|m| m.as_str()).collect();
        parts.push(format!("methods {}", methods.join("|")));
    }
    for (name, value) in &m.headers {
        parts.push(format!("header {name} = {}", value.to_str().unwrap_or("?")));
    }
    if parts.is_empty() {
        "every request".to_string()
    } else {
        parts.join(", ")
    }
}

/// The summary of a valid policy.
pub fn summary(policy: &Policy, file: &str) -> String {
    let mut out = String::new();
    let s = &policy.server;
    let _ = writeln!(out, "{file}: OK (config hash {})", policy.source_hash);
    let _ = writeln!(
        out,
        "listen {}{}{}",
        s.listen,
        if s.tls.is_some() { " (TLS)" } else { "" },
        s.admin.map(|a| format!(", admin {a}")).unwrap_or_default()
    );
    let headers = match s.rate_limit_headers {
        HeaderStyle::Ietf => "ietf",
        HeaderStyle::Legacy => "legacy",
        HeaderStyle::Both => "both",
        HeaderStyle::None => "none",
    };
    let _ = writeln!(
        out,
        "headers {headers}, IPv6 counted per /{}, {} trusted prox{}",
        s.ipv6_prefix,
        s.trusted_proxies.len(),
        if s.trusted_proxies.len() == 1 {
            "y"
        } else {
            "ies"
        }
    );
    match &policy.store {
        StoreSettings::Memory { max_keys, timeout } => {
            let _ = writeln!(
                out,
                "store memory (max {max_keys} keys, timeout {})",
                format_duration(*timeout)
            );
        }
        StoreSettings::Redis {
            url,
            pool_size,
            timeout,
            prefix,
        } => {
            let shown = redact(url);
            let _ = writeln!(
                out,
                "store redis {shown} (pool {pool_size}, timeout {}, prefix {prefix})",
                format_duration(*timeout)
            );
        }
    }
    for u in &policy.upstreams {
        let targets: Vec<String> = u
            .targets
            .iter()
            .map(|t| format!("{}://{}", t.scheme, t.authority))
            .collect();
        let _ = writeln!(
            out,
            "upstream {}: {} (connect timeout {}, timeout {})",
            u.name,
            targets.join(", "),
            format_duration(u.connect_timeout),
            format_duration(u.timeout)
        );
    }
    let _ = writeln!(out, "{} route(s), first match wins:", policy.routes.len());
    for r in &policy.routes {
        let on_error = match r.on_store_error {
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        };
        let _ = writeln!(
            out,
            "  {} -> {}: {}; on store error: {on_error}",
            r.name,
            r.upstream.name,
            describe_match(&r.matcher)
        );
        if r.limits.is_empty() {
            let _ = writeln!(out, "    no limits: everything is forwarded");
        }
        for l in &r.limits {
            let burst = match l.algorithm_name {
                "token_bucket" | "gcra" => format!(", burst {}", l.quota),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "    {}: {} {}{burst} by {}{}{} (quota {} per {} s)",
                l.name,
                l.algorithm_name,
                l.rate_text,
                r.keys[l.key],
                if l.cost != 1 {
                    format!(", cost {}", l.cost)
                } else {
                    String::new()
                },
                if l.mode == Mode::Shadow {
                    ", shadow"
                } else {
                    ""
                },
                l.quota,
                l.window_secs
            );
        }
    }
    for (route, earlier) in shadowed_routes(policy) {
        let _ = writeln!(
            out,
            "warning: route {route} can never match: route {earlier} before it matches every request"
        );
    }
    out
}

/// A Redis URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://u:secret@h:6379/0"),
            "redis://u:***@h:6379/0"
        );
        assert_eq!(redact("rediss://:secret@h"), "rediss://:***@h");
        assert_eq!(redact("redis://h:6379"), "redis://h:6379");
    }
}
