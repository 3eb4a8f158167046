//! Micro-benchmarks of the functions every request runs: route matching, client IP and key
//! derivation, a memory-store decision, and the rate-limit headers. `cargo bench --bench hot`.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use tollgate::identity::{self, Subject};
use tollgate::limiter::memory::MemoryStore;
use tollgate::limiter::{self, Decision};
use tollgate::route::RequestView;

const POLICY: &str = r#"
[server]
listen = "127.0.0.1:0"
trusted_proxies = ["10.0.0.0/8"]
[upstreams.api]
targets = ["http://127.0.0.1:3000"]
[[routes]]
name = "login"
upstream = "api"
match = { path = "/login", methods = ["POST"] }
limits = [{ by = "ip", algorithm = "sliding_log", rate = "5/min" }]
[[routes]]
name = "admin"
upstream = "api"
match = { host = "admin.example.com", path_prefix = "/admin" }
[[routes]]
name = "api"
upstream = "api"
match = { path_prefix = "/v1/" }
limits = [
  { by = "header:x-api-key", algorithm = "token_bucket", rate = "10/s", burst = 100 },
  { by = "header:x-api-key", algorithm = "fixed_window", rate = "10000/day" },
]
[[routes]]
name = "rest"
upstream = "api"
limits = [{ by = "ip", algorithm = "gcra", rate = "50/s", burst = 20 }]
"#;

fn request() -> http::request::Parts {
    http::Request::builder()
        .method("GET")
        .uri("/v1/users/42?page=2")
        .header("host", "api.example.com")
        .header("x-api-key", "sk_live_0123456789abcdef")
        .header("x-forwarded-for", "203.0.113.7, 10.1.1.1")
        .header("user-agent", "bench")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn hot(c: &mut Criterion) {
    let policy = tollgate::config::parse(POLICY, "bench.toml", Path::new(".")).unwrap();
    let parts = request();
    let peer: std::net::IpAddr = "10.0.0.9".parse().unwrap();

    c.bench_function("route match (third of four routes)", |b| {
        b.iter(|| {
            let view = RequestView::new(black_box(&parts));
            black_box(policy.route_for(&view).map(|(i, _)| i))
        })
    });

    c.bench_function("client ip (trusted proxy walk)", |b| {
        b.iter(|| {
            identity::client_ip(
                black_box(peer),
                black_box(&parts.headers),
                &policy.server.trusted_proxies,
            )
        })
    });

    let route = &policy.routes[2];
    let subject = Subject {
        parts: &parts,
        ip: "203.0.113.7".parse().unwrap(),
        consumer: None,
        claims: None,
    };
    c.bench_function("key derivation (2 limits, 1 key spec)", |b| {
        b.iter(|| {
            black_box(limiter::items_for(
                &route.limits,
                &route.keys,
                black_box(&subject),
            ))
        })
    });

    let store = MemoryStore::new(1_000_000);
    let items = limiter::items_for(&route.limits, &route.keys, &subject);
    let mut now = limiter::wall_clock();
    c.bench_function("memory store decision (2 limits)", |b| {
        b.iter(|| {
            now += 1;
            black_box(store.decide(black_box(&items), Some(now)).unwrap())
        })
    });

    let decision = Decision {
        admitted: true,
        receipts: Vec::new(),
        outcomes: vec![
            limiter::algorithm::Outcome {
                allowed: true,
                remaining: 97,
                reset: 300_000,
                retry_after: 0,
            },
            limiter::algorithm::Outcome {
                allowed: true,
                remaining: 9_990,
                reset: 5_000_000_000,
                retry_after: 0,
            },
        ],
    };
    c.bench_function("rate-limit headers (ietf)", |b| {
        b.iter(|| {
            let mut headers = HeaderMap::new();
            tollgate::response::add_rate_limit_headers(
                &mut headers,
                policy.server.rate_limit_headers,
                route.limits_for(None),
                black_box(&items),
                black_box(&decision),
            );
            black_box(headers)
        })
    });
}

criterion_group!(benches, hot);
criterion_main!(benches);
