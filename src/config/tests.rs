//! Config validation: every error kind, with its exact line and column.

use std::path::Path;

use super::*;
use crate::limiter::algorithm::{Algorithm, Kind};
use crate::policy::{HeaderStyle, KeySource, Mode, OnStoreError, StoreSettings};

fn parse_str(text: &str) -> Result<Policy, ConfigErrors> {
    parse(text, "proxy.toml", Path::new("/etc/tollgate"))
}

const HEAD: &str = "[server]\nlisten = \"127.0.0.1:8080\"\n[upstreams.api]\ntargets = [\"http://127.0.0.1:3000\"]\n";

/// The single error of `text`, as `line:col: message`.
fn error_of(text: &str) -> String {
    let errors = parse_str(text).expect_err("config should be refused").0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = &errors[0];
    assert_eq!(e.file, "proxy.toml");
    format!("{}:{}: {}", e.line, e.column, e.message)
}

fn limit_error(limit: &str) -> String {
    error_of(&format!(
        "{HEAD}[[routes]]\nname = \"r\"\nupstream = \"api\"\nlimits = [\n  {limit},\n]\n"
    ))
}

#[test]
fn the_shipped_example_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml")).unwrap();
    let p = parse(&text, "proxy.toml", Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    assert!(!p.routes.is_empty());
    assert!(matches!(p.store, StoreSettings::Memory { .. }));
}

#[test]
fn the_contract_example_is_valid() {
    let text = r#"
[server]
listen = "0.0.0.0:8080"
admin = "127.0.0.1:9901"
trusted_proxies = ["10.0.0.0/8"]
rate_limit_headers = "both"
ipv6_prefix = 56
max_body = "10MiB"
shutdown_grace = "30s"
workers = 2

[store]
backend = "redis"
url = "redis://127.0.0.1:6379/0"
pool_size = 16
timeout = "50ms"
prefix = "tollgate"

[upstreams.api]
targets = ["http://127.0.0.1:3000", "http://127.0.0.1:3001"]
connect_timeout = "2s"
timeout = "30s"

[[routes]]
name = "login"
upstream = "api"
match = { path = "/login", methods = ["POST"] }
limits = [
  { by = "ip", algorithm = "sliding_log", rate = "5/min" },
]

[[routes]]
name = "api"
upstream = "api"
match = { path_prefix = "/v1/" }
on_store_error = "deny"
limits = [
  { by = "header:x-api-key", algorithm = "token_bucket", rate = "10/s", burst = 100 },
  { by = "header:x-api-key", algorithm = "fixed_window", rate = "10000/day" },
]

[[routes]]
name = "everything-else"
upstream = "api"
limits = [ { by = ["ip", "header:x-tenant"], algorithm = "gcra", rate = "50/s", burst = 20, cost = 2, mode = "shadow" } ]
"#;
    let p = parse_str(text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.server.rate_limit_headers, HeaderStyle::Both);
    assert_eq!(p.server.ipv6_prefix, 56);
    assert_eq!(p.server.max_body, Some(10 << 20));
    assert_eq!(p.server.workers, Some(2));
    assert_eq!(p.upstreams[0].targets.len(), 2);
    assert_eq!(p.routes.len(), 3);
    assert_eq!(p.routes[1].on_store_error, OnStoreError::Deny);
    assert_eq!(p.routes[0].on_store_error, OnStoreError::Allow);
    let api = &p.routes[1];
    assert_eq!(api.keys.len(), 1, "both limits share one key spec");
    assert_eq!(
        api.limits[0].algorithm,
        Algorithm::TokenBucket {
            burst: 100,
            refill: 1,
            unit: 100_000
        }
    );
    assert_eq!(
        api.limits[1].algorithm,
        Algorithm::FixedWindow {
            quota: 10_000,
            window: 86_400_000_000
        }
    );
    let last = &p.routes[2].limits[0];
    assert_eq!(last.cost, 2);
    assert_eq!(last.mode, Mode::Shadow);
    assert_eq!(
        last.algorithm,
        Algorithm::Gcra {
            burst: 20,
            interval: 20_000
        }
    );
    assert_eq!(
        p.routes[2].keys[0].0,
        vec![
            KeySource::Ip,
            KeySource::Header("x-tenant".parse().unwrap())
        ]
    );
    match &p.store {
        StoreSettings::Redis(r) => {
            assert_eq!(r.pool_size, 16);
            assert_eq!(r.prefix, "tollgate");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_algorithm_lists_all_six() {
    assert_eq!(
        limit_error(r#"{ by = "ip", algorithm = "token-bucket", rate = "5/min" }"#),
        "9:28: unknown algorithm \"token-bucket\"; expected one of fixed_window, sliding_log, sliding_window, token_bucket, gcra, concurrency"
    );
}

#[test]
fn bad_rates_point_at_the_rate() {
    for rate in ["0/min", "5/fortnight", "five/min", "5", "-1/s", "5/0s"] {
        let e = limit_error(&format!(
            r#"{{ algorithm = "fixed_window", rate = "{rate}" }}"#
        ));
        assert!(e.starts_with("9:40: invalid rate"), "{rate}: {e}");
    }
}

#[test]
fn burst_is_refused_where_the_algorithm_has_none() {
    for alg in ["fixed_window", "sliding_log", "sliding_window"] {
        let e = limit_error(&format!(
            r#"{{ algorithm = "{alg}", rate = "5/s", burst = 3 }}"#
        ));
        let col = 43 + alg.len();
        assert!(
            e.starts_with(&format!("9:{col}: `burst` is not taken by {alg}")),
            "{e}"
        );
    }
}

#[test]
fn unknown_upstream_lists_defined_ones() {
    let e = error_of(&format!(
        "{HEAD}[upstreams.billing]\ntargets = [\"http://127.0.0.1:4000\"]\n[[routes]]\nname = \"r\"\nupstream = \"apii\"\n"
    ));
    assert_eq!(
        e,
        "9:12: unknown upstream \"apii\"; defined upstreams: api, billing"
    );
}

#[test]
fn unknown_keys_are_refused_with_their_position() {
    let e = error_of("[server]\nlisten = \"127.0.0.1:1\"\nlisten_port = 8080\n");
    assert!(e.starts_with("3:1: unknown field `listen_port`"), "{e}");
    let e = limit_error(r#"{ algorithm = "gcra", rate = "5/s", brust = 5 }"#);
    assert!(e.starts_with("9:39: unknown field `brust`"), "{e}");
}

#[test]
fn duplicate_route_names() {
    let e = error_of(&format!(
        "{HEAD}[[routes]]\nname = \"a\"\nupstream = \"api\"\n[[routes]]\nname = \"a\"\nupstream = \"api\"\n"
    ));
    assert_eq!(
        e,
        "9:8: duplicate route name \"a\"; route names must be unique"
    );
}

#[test]
fn bad_cidr_durations_and_addresses() {
    let e = error_of(
        "[server]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n",
    );
    assert!(
        e.starts_with("3:34: invalid trusted proxy \"10.0.0.0/33\""),
        "{e}"
    );
    let e = error_of("[server]\nlisten = \"localhost\"\n");
    assert!(e.starts_with("2:10: invalid listen address"), "{e}");
    let e = error_of(&format!("{HEAD}connect_timeout = \"2 fortnights\"\n"));
    assert!(e.starts_with("5:19: invalid duration"), "{e}");
    let e = error_of("[server]\nlisten = \"127.0.0.1:1\"\n[store]\ntimeout = \"0ms\"\n");
    assert!(e.starts_with("4:11: must be longer than zero"), "{e}");
    let e = error_of("[server]\nlisten = \"127.0.0.1:1\"\nmax_body = \"10 parsecs\"\n");
    assert!(e.starts_with("3:12: invalid size"), "{e}");
}

#[test]
fn bad_targets() {
    for (target, what) in [
        ("127.0.0.1:3000", "invalid target"),
        ("ftp://127.0.0.1:21", "expected an http:// or https:// URL"),
        ("http://127.0.0.1:3000/base", "scheme, host and port only"),
    ] {
        let e = error_of(&format!(
            "[server]\nlisten = \"127.0.0.1:1\"\n[upstreams.api]\ntargets = [\"{target}\"]\n"
        ));
        assert!(e.starts_with("4:12: ") && e.contains(what), "{target}: {e}");
    }
}

#[test]
fn upstream_protocol_and_tls_are_checked() {
    let cases = [
        (
            "targets = [\"https://a:1\"]\nprotocol = \"h3\"",
            "5:12: unknown protocol \"h3\"; expected one of http1, h2, auto",
        ),
        (
            "targets = [\"http://a:1\"]\ntls = { ca = \"ca.pem\" }",
            "5:7: `tls` of upstream \"api\" applies to https:// targets",
        ),
        (
            "targets = [\"https://a:1\"]\ntls = { cert = \"c.pem\" }",
            "5:16: `tls.cert` needs `tls.key`",
        ),
        (
            "targets = [\"https://a:1\"]\ntls = { server_name = \"a b\" }",
            "5:23: invalid tls.server_name \"a b\"",
        ),
    ];
    for (body, expected) in cases {
        let e = error_of(&format!(
            "[server]\nlisten = \"127.0.0.1:1\"\n[upstreams.api]\n{body}\n"
        ));
        assert!(e.starts_with(expected), "{body}: {e}");
    }
    let p = parse(
        "[server]\nlisten = \"127.0.0.1:1\"\n[upstreams.api]\ntargets = [\"https://a:1\"]\nprotocol = \"h2\"\ntls = { ca = \"ca.pem\", cert = \"c.pem\", key = \"k.pem\", server_name = \"api.internal\" }\n",
        "t.toml",
        Path::new("."),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let u = &p.upstreams[0];
    assert_eq!(u.protocol, crate::policy::Protocol::H2);
    assert!(u.tls.ca.as_ref().is_some_and(|c| c.ends_with("ca.pem")));
    assert!(u.tls.client.is_some());
    assert_eq!(u.tls.server_name.as_deref(), Some("api.internal"));
}

#[test]
fn store_settings_are_checked() {
    let e = error_of("[server]\nlisten = \"127.0.0.1:1\"\n[store]\nbackend = \"etcd\"\n");
    assert_eq!(
        e,
        "4:11: unknown store backend \"etcd\"; expected one of memory, redis"
    );
    let e = error_of(
        "[server]\nlisten = \"127.0.0.1:1\"\n[store]\nbackend = \"redis\"\nurl = \"http://x\"\n",
    );
    assert!(e.starts_with("5:7: invalid Redis url"), "{e}");
    let e = error_of("[server]\nlisten = \"127.0.0.1:1\"\n[store]\nurl = \"redis://x\"\n");
    assert!(
        e.starts_with("4:7: `url` applies only to backend = \"redis\""),
        "{e}"
    );
    let e = error_of("[server]\nlisten = \"127.0.0.1:1\"\n[store]\nbackend = \"redis\"\n");
    assert!(
        e.starts_with("3:1: backend = \"redis\" needs exactly one of `url`"),
        "{e}"
    );
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let text = format!(
        "{HEAD}[[routes]]\nname = \"r\"\nupstream = \"nope\"\nlimits = [\n  {{ algorithm = \"x\", rate = \"1/s\" }},\n  {{ algorithm = \"gcra\", rate = \"0/s\" }},\n]\n"
    );
    let errors = parse_str(&text).unwrap_err().0;
    let positions: Vec<(usize, usize)> = errors.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(positions, vec![(7, 12), (9, 17), (10, 32)], "{errors:?}");
    let rendered = ConfigErrors(errors).to_string();
    assert!(
        rendered.lines().all(|l| l.starts_with("proxy.toml:")),
        "{rendered}"
    );
}

#[test]
fn cost_beyond_the_quota_is_refused() {
    let e = limit_error(r#"{ algorithm = "token_bucket", rate = "5/s", burst = 3, cost = 4 }"#);
    assert!(
        e.starts_with("9:65: cost 4 is more than the limit ever grants"),
        "{e}"
    );
}

#[test]
fn by_values_are_checked() {
    let e = limit_error(r#"{ by = "cookie:x", algorithm = "gcra", rate = "5/s" }"#);
    assert!(e.starts_with("9:10: invalid `by` \"cookie:x\""), "{e}");
    let e = limit_error(r#"{ by = ["ip", "global"], algorithm = "gcra", rate = "5/s" }"#);
    assert!(e.contains("cannot be part of a composite key"), "{e}");
    let e = limit_error(r#"{ by = 5, algorithm = "gcra", rate = "5/s" }"#);
    assert!(e.starts_with("9:10: invalid `by`"), "{e}");
}

#[test]
fn syntax_errors_have_a_position() {
    let e = error_of("[server]\nlisten = \"127.0.0.1:1\n");
    assert!(e.starts_with("2:"), "{e}");
    let e = error_of("");
    assert!(e.contains("missing field `server`"), "{e}");
}

#[test]
fn limit_ids_survive_edits_that_keep_their_identity() {
    let make = |rate: &str, extra: &str| {
        let p = parse_str(&format!(
            "{HEAD}{extra}[[routes]]\nname = \"r\"\nupstream = \"api\"\nlimits = [{{ algorithm = \"fixed_window\", rate = \"{rate}\" }}, {{ algorithm = \"fixed_window\", rate = \"7/min\" }}]\n"
        ))
        .unwrap();
        p.routes
            .last()
            .unwrap()
            .limits
            .iter()
            .map(|l| l.id)
            .collect::<Vec<_>>()
    };
    let base = make("5/min", "");
    assert_eq!(
        base,
        make("50/min", ""),
        "changing the count keeps the counters"
    );
    assert_eq!(
        base,
        make(
            "5/min",
            "[[routes]]\nname = \"other\"\nupstream = \"api\"\n"
        ),
        "other routes do not matter"
    );
    assert_ne!(base[0], make("5/h", "")[0], "a new window starts afresh");
    assert_ne!(
        base[0], base[1],
        "two limits with the same shape still differ"
    );
}

#[test]
fn tls_paths_resolve_against_the_config_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.pem"), "x").unwrap();
    let key = dir.path().join("k.pem");
    std::fs::write(&key, "x").unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n[server.tls]\ncert = \"c.pem\"\nkey = \"{}\"\n",
        key.display()
    );
    let p = parse(&text, "proxy.toml", dir.path()).unwrap();
    let tls = p.server.tls.unwrap();
    assert_eq!(tls.cert, dir.path().join("c.pem"));
    assert_eq!(tls.key, key);
    let e = error_of(&format!(
        "[server]\nlisten = \"127.0.0.1:1\"\n[server.tls]\ncert = \"nope.pem\"\nkey = \"{}\"\n",
        key.display()
    ));
    assert!(
        e.starts_with("4:8: cannot read TLS certificate /etc/tollgate/nope.pem"),
        "{e}"
    );
}

#[test]
fn type_and_missing_field_errors_say_what_is_allowed() {
    let e = limit_error(r#"{ by = "ip", algorithm = 5, rate = "5/s" }"#);
    assert!(e.starts_with("9:28: invalid type"), "{e}");
    assert!(
        e.ends_with(&format!("expected algorithm = one of {}", Kind::names())),
        "{e}"
    );
    let e = limit_error(r#"{ by = "ip", algorithm = "gcra", rate = 5 }"#);
    assert!(e.contains("expected rate = \"N/unit\""), "{e}");
    let e = error_of("[server]\nadmin = \"127.0.0.1:1\"\n");
    assert!(
        e.contains("missing field `listen`") && e.contains("listen = \"IP:PORT\""),
        "{e}"
    );
    let e = limit_error(r#"{ by = "ip", rate = "5/s" }"#);
    assert!(
        e.contains("missing field `algorithm`") && e.contains("gcra"),
        "{e}"
    );
}

/// One proxy.toml per common TOML slip (tests/fixtures/syntax/), each with the exact position
/// and words it must give: the slip's own line and column, not where toml's parser gave up.
#[test]
fn syntax_slips_are_reported_where_they_are() {
    let cases = [
        // toml alone: 23:1 "invalid inline table element, expected `,`" (issue 9).
        (
            "unterminated_string",
            "22:50: unterminated string: this `\"` is not closed on its line",
        ),
        (
            "unterminated_literal_string",
            "19:18: unterminated string: this `'` is not closed on its line",
        ),
        // toml alone: 26:1 "missing comma between array elements".
        (
            "missing_closing_bracket",
            "20:10: unclosed array: this `[` has no matching `]` before the table header on line 25",
        ),
        (
            "missing_closing_bracket_inline",
            "19:38: unclosed array: this `[` has no matching `]` (a `}` at 19:46 came first)",
        ),
        (
            "missing_closing_brace",
            "21:3: unclosed inline table: this `{` has no matching `}` (a `]` at 23:1 came first)",
        ),
        ("missing_equals", "26:6: key with no value, expected `=`"),
        (
            "duplicate_key",
            "28:1: duplicate key `upstream`, first set at 27:1; a key may be set only once in a table",
        ),
        (
            "duplicate_key_inline",
            "21:44: duplicate key `by`, first set at 21:5; a key may be set only once in a table",
        ),
        (
            "table_defined_twice",
            "16:1: duplicate table [store], first defined at 9:1; a table may be defined only once",
        ),
        (
            "bare_word_value",
            "30:42: unquoted value gcra; string values must be quoted: algorithm = \"gcra\"",
        ),
    ];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/syntax");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut named: Vec<String> = cases.iter().map(|(n, _)| format!("{n}.toml")).collect();
    named.sort();
    assert_eq!(on_disk, named, "one case per fixture");
    for (name, expected) in cases {
        let text = std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
        assert_eq!(error_of(&text), expected, "{name}");
    }
}

/// The pre-scan that finds those slips reads strings, comments, multi-line strings and nested
/// brackets as TOML does: a slip after them is still reported where toml finds it, and a file
/// that is valid TOML keeps toml's (serde's) words.
#[test]
fn syntax_prescan_is_not_fooled_by_valid_toml() {
    let tricky = concat!(
        "# a \"quote\" and a 'quote' [in] {a} comment, café\n",
        "[server]\n",
        "listen = \"127.0.0.1:1\" # trailing \" quote\n",
        "[upstreams.api]\n",
        "targets = [\n  \"http://127.0.0.1:3000\", # [\n]\n",
        "[[routes]]\n",
        "name = \"a\\\"b#[{é\"\n",
        "upstream = 'api'\n",
        "match = { headers = { x = \"\"\"multi \"\" line\n[not a header]\n\"\"\" , y = '''it's {'''} }\n",
    );
    let e = error_of(&format!("{tricky}oops \"x\"\n"));
    assert_eq!(e, "14:6: key with no value, expected `=`");
    let e = error_of(&format!("{tricky}limits = [ {{ rate = \"5/s }} ]\n"));
    assert_eq!(
        e,
        "14:21: unterminated string: this `\"` is not closed on its line"
    );
    let e = error_of(&format!("{tricky}colour = \"blue\n"));
    assert!(e.starts_with("14:10: unterminated string"), "{e}");
    // Valid TOML with an unknown field: serde's message, untouched.
    let e = error_of(&format!("{tricky}colour = \"blue\"\n"));
    assert!(e.starts_with("14:1: unknown field `colour`"), "{e}");
}

/// The parsed limits of one route with `limits`.
fn limits_of(limits: &str) -> Vec<crate::policy::Limit> {
    let text =
        format!("{HEAD}[[routes]]\nname = \"r\"\nupstream = \"api\"\nlimits = [\n  {limits},\n]\n");
    parse(&text, "t.toml", Path::new("."))
        .unwrap_or_else(|e| panic!("{e}"))
        .routes[0]
        .limits
        .clone()
}

#[test]
fn response_aware_limits_parse_into_typed_values() {
    use crate::policy::{CostFrom, Settlement};
    use crate::usage::Field;
    let l = &limits_of(
        r#"{ by = "ip", algorithm = "sliding_log", rate = "5/15min", count = ["401", "5xx"] }"#,
    )[0];
    let Settlement::Count(set) = &l.settle else {
        panic!("{:?}", l.settle)
    };
    assert!(set.counts(401) && set.counts(503) && !set.counts(200) && !set.counts(403));
    let l = &limits_of(
        r#"{ by = "ip", algorithm = "token_bucket", rate = "1000/min", burst = 1000, reserve = 100, cost_from = "header:X-Usage" }"#,
    )[0];
    assert_eq!(l.cost, 100, "admission takes the reservation");
    assert_eq!(
        l.settle,
        Settlement::CostFrom(CostFrom::Header("x-usage".parse().unwrap()))
    );
    for (text, field) in [
        ("total_tokens", Field::Total),
        ("prompt_tokens", Field::Prompt),
        ("completion_tokens", Field::Completion),
    ] {
        let l = &limits_of(&format!(
            r#"{{ by = "ip", algorithm = "gcra", rate = "1000/min", burst = 1000, reserve = 50, cost_from = "openai:{text}" }}"#
        ))[0];
        assert_eq!(l.settle, Settlement::CostFrom(CostFrom::OpenAi(field)));
    }
    let l = &limits_of(r#"{ by = "ip", algorithm = "concurrency", max = 4 }"#)[0];
    // The test upstream's timeout is the default 30 s: slots live 40 s.
    assert_eq!(
        l.algorithm,
        Algorithm::Concurrency {
            max: 4,
            lease: 40_000_000
        }
    );
    assert_eq!(l.settle, Settlement::Release);
    let l = &limits_of(
        r#"{ by = "ip", algorithm = "gcra", rate = "10/s", burst = 5, delay = "2s", ban = "15min" }"#,
    )[0];
    assert_eq!((l.delay, l.ban), (2_000_000, 900_000_000));
}

#[test]
fn response_aware_limit_errors_point_at_the_key() {
    let cases = [
        (
            r#"{ by = "ip", algorithm = "fixed_window", rate = "5/min", count = ["40x"] }"#,
            "invalid status \"40x\" in `count`",
        ),
        (
            r#"{ by = "ip", algorithm = "fixed_window", rate = "5/min", count = [] }"#,
            "`count` lists no status",
        ),
        (
            r#"{ by = "ip", algorithm = "fixed_window", rate = "5/min", reserve = 3 }"#,
            "`reserve` goes with `cost_from`",
        ),
        (
            r#"{ by = "ip", algorithm = "sliding_log", rate = "5/min", cost_from = "header:x-cost" }"#,
            "`cost_from` is taken by fixed_window, sliding_window, token_bucket and gcra",
        ),
        (
            r#"{ by = "ip", algorithm = "fixed_window", rate = "5/min", cost_from = "body:tokens" }"#,
            "invalid cost_from \"body:tokens\"",
        ),
        (
            r#"{ by = "ip", algorithm = "fixed_window", rate = "5/min", cost_from = "openai:tokens" }"#,
            "expected openai:total_tokens, openai:prompt_tokens or openai:completion_tokens",
        ),
        (
            r#"{ by = "ip", algorithm = "fixed_window", rate = "5/min", count = ["401"], cost_from = "header:x" }"#,
            "`count` and `cost_from` cannot be combined",
        ),
        (
            r#"{ by = "ip", algorithm = "concurrency", max = 4, rate = "5/min" }"#,
            "`rate` is not taken by concurrency",
        ),
        (
            r#"{ by = "ip", algorithm = "concurrency" }"#,
            "a concurrency limit needs `max`",
        ),
        (
            r#"{ by = "ip", algorithm = "concurrency", max = 0 }"#,
            "invalid max 0",
        ),
        (
            r#"{ by = "ip", algorithm = "fixed_window" }"#,
            "a fixed_window limit needs `rate`",
        ),
        (
            r#"{ by = "ip", algorithm = "fixed_window", rate = "5/min", delay = "1s" }"#,
            "`delay` is taken by token_bucket and gcra only",
        ),
        (
            r#"{ by = "ip", algorithm = "gcra", rate = "5/s", delay = "0s" }"#,
            "invalid delay \"0s\"",
        ),
        (
            r#"{ by = "ip", algorithm = "fixed_window", rate = "5/min", ban = "1min", mode = "shadow" }"#,
            "`ban` on a shadow limit would never start",
        ),
        (
            r#"{ by = "ip", algorithm = "fixed_window", rate = "50/min", ban = "1min", batch = 5 }"#,
            "`batch` (approximate mode, decided locally) cannot be combined",
        ),
    ];
    for (limit, wanted) in cases {
        let error = limit_error(limit);
        assert!(error.starts_with("9:"), "{limit}: {error}");
        assert!(error.contains(wanted), "{limit}: {error}");
    }
}

#[test]
fn telemetry_defaults_and_paths() {
    let p = parse_str(&format!(
        "{HEAD}[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\n"
    ))
    .unwrap();
    let t = p.telemetry.expect("a [telemetry] table");
    assert_eq!(t.url(), "http://127.0.0.1:4318/v1/traces");
    assert_eq!(t.service_name, "tollgate");
    assert_eq!(t.sample_ratio, 1.0);
    // A path given is used as is; an integer ratio reads as a number.
    let p = parse_str(&format!(
        "{HEAD}[telemetry]\notlp_endpoint = \"https://otel.example:443/custom/traces\"\nsample_ratio = 0\ntls_ca = \"ca.pem\"\n"
    ))
    .unwrap();
    let t = p.telemetry.unwrap();
    assert_eq!(t.url(), "https://otel.example:443/custom/traces");
    assert_eq!(t.sample_ratio, 0.0);
    assert_eq!(t.ca.as_deref(), Some(Path::new("/etc/tollgate/ca.pem")));
    assert!(parse_str(HEAD).unwrap().telemetry.is_none());
}

#[test]
fn telemetry_errors_point_at_the_value() {
    let table = |body: &str| error_of(&format!("{HEAD}[telemetry]\n{body}\n"));
    assert_eq!(
        table("otlp_endpoint = \"127.0.0.1:4318\""),
        "6:17: invalid otlp_endpoint \"127.0.0.1:4318\": not a URL; expected an http:// or https:// URL, e.g. \"http://127.0.0.1:4318\""
    );
    assert_eq!(
        table("otlp_endpoint = \"grpc://127.0.0.1:4317\""),
        "6:17: invalid otlp_endpoint \"grpc://127.0.0.1:4317\": expected an http:// or https:// URL"
    );
    assert_eq!(
        table("otlp_endpoint = \"http://127.0.0.1:4318/v1/traces?x=1\""),
        "6:17: invalid otlp_endpoint \"http://127.0.0.1:4318/v1/traces?x=1\": a query string is not allowed; expected an http:// or https:// URL, e.g. \"http://127.0.0.1:4318\""
    );
    assert_eq!(
        table("otlp_endpoint = \"http://127.0.0.1:4318\"\nsample_ratio = 1.5"),
        "7:16: sample_ratio 1.5 is out of range; expected a number from 0 (no new traces) to 1 (every request)"
    );
    assert_eq!(
        table("otlp_endpoint = \"http://127.0.0.1:4318\"\nsample_ratio = nan"),
        "7:16: sample_ratio NaN is out of range; expected a number from 0 (no new traces) to 1 (every request)"
    );
    assert_eq!(
        table("otlp_endpoint = \"http://127.0.0.1:4318\"\nservice_name = \" \""),
        "7:16: service_name must not be empty"
    );
    assert_eq!(
        table("otlp_endpoint = \"http://127.0.0.1:4318\"\ntls_ca = \"ca.pem\""),
        "7:10: tls_ca needs an https:// otlp_endpoint"
    );
    assert!(
        table("otlp_endpoint = \"http://127.0.0.1:4318\"\nsample = 1")
            .starts_with("7:1: unknown field `sample`"),
    );
}
