//! Approximate mode (`batch = N`): replicas take budget from Redis N units at a time. The
//! admitted count stays within N x replicas of the limit (fixed windows never above it), and
//! Redis sees about one call per N requests.

mod common;

use common::*;

const LIMIT: u64 = 200;
const BATCH: u64 = 10;
const REPLICAS: u64 = 2;
const CLIENTS: usize = 32;
const PER_CLIENT: usize = 20;

fn evalsha_calls(redis: &Redis) -> u64 {
    common::parse::evalsha_calls(&mut redis.conn())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_lease_budget_in_batches_within_the_documented_bound() {
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    let routes = algorithm_routes("header:x-api-key", LIMIT, "", &format!(", batch = {BATCH}"));
    let text = config(&upstream, &redis_store(&redis), &routes);
    let replicas = [start_tollgate(&text).await, start_tollgate(&text).await];
    for alg in ALGORITHMS {
        let calls_before = evalsha_calls(&redis);
        let urls: Vec<String> = replicas
            .iter()
            .map(|r| format!("http://{}/{alg}", r.addr))
            .collect();
        let (admitted, _) = hammer(&urls, &[("x-api-key", "k")], CLIENTS, PER_CLIENT).await;
        let calls = evalsha_calls(&redis) - calls_before;
        let sent = (CLIENTS * PER_CLIENT) as u64;
        eprintln!("{alg}: {admitted} admitted of {sent}, {calls} Redis calls");
        let slack = BATCH * REPLICAS;
        assert!(admitted >= LIMIT - slack, "{alg}: {admitted} admitted");
        if alg == "fixed_window" {
            assert!(
                admitted <= LIMIT,
                "{alg}: leases never outlive their window"
            );
        } else {
            assert!(admitted <= LIMIT + slack, "{alg}: {admitted} admitted");
        }
        // About one call per half batch, plus the final shortfall and rejections (then cached).
        assert!(
            calls <= 2 * LIMIT / BATCH + 4 * REPLICAS * 2 + 10,
            "{alg}: {calls} Redis calls for {sent} requests"
        );
    }
    let metrics = replicas[0].app.metrics.render();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tollgate_leased_admissions_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    for r in replicas {
        r.stop().await;
    }
}

#[tokio::test]
async fn batch_must_be_on_every_limit_of_a_route() {
    let text = "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.api]\ntargets = [\"http://127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\nupstream = \"api\"\nlimits = [\n  { algorithm = \"gcra\", rate = \"5/s\", batch = 2 },\n  { algorithm = \"fixed_window\", rate = \"5/s\" },\n]\n";
    let e = tollgate::config::parse(text, "p.toml", std::path::Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("p.toml:10:3: `batch` must be set on every limit"),
        "{e}"
    );
    let e = tollgate::config::parse(
        &text.replace(
            "batch = 2 },\n  { algorithm = \"fixed_window\", rate = \"5/s\" }",
            "batch = 9 }",
        ),
        "p.toml",
        std::path::Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("invalid batch 9; expected from the cost (1) up to the quota (5)"),
        "{e}"
    );
}
