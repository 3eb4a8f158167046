//! Accuracy under concurrency: several tollgate instances share one Redis; many concurrent
//! clients hammer one key; the number admitted equals the limit exactly, for every algorithm.

mod common;

use std::time::Duration;

use common::*;

const LIMIT: u64 = 50;
const CLIENTS: usize = 32;
const PER_CLIENT: usize = 10;

const ALGORITHMS: [(&str, &str); 5] = [
    ("fixed_window", ""),
    ("sliding_window", ""),
    ("sliding_log", ""),
    ("token_bucket", ", burst = 50"),
    ("gcra", ", burst = 50"),
];

/// Window algorithms restart at aligned hour edges; keep the run clear of one.
async fn clear_of_an_hour_edge() {
    let now = tollgate::limiter::wall_clock() / 1_000_000;
    let into_hour = now % 3600;
    if into_hour > 3590 {
        tokio::time::sleep(Duration::from_secs(3600 - into_hour + 1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_exactly_the_limit_for_every_algorithm() {
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    let routes: String = ALGORITHMS
        .iter()
        .map(|(alg, extra)| {
            format!(
                "[[routes]]\nname = \"{alg}\"\nupstream = \"api\"\nmatch = {{ path = \"/{alg}\" }}\nlimits = [{{ by = \"header:x-api-key\", algorithm = \"{alg}\", rate = \"{LIMIT}/hour\"{extra} }}]\n"
            )
        })
        .collect();
    let text = config(&upstream, &redis_store(&redis), &routes);
    let replicas = [start_tollgate(&text).await, start_tollgate(&text).await];
    let addrs: Vec<_> = replicas.iter().map(|r| r.addr).collect();
    clear_of_an_hour_edge().await;
    for (alg, _) in ALGORITHMS {
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let addrs = addrs.clone();
            tasks.push(tokio::spawn(async move {
                let http = Http::new();
                let mut admitted = 0u64;
                let mut rejected = 0u64;
                for i in 0..PER_CLIENT {
                    let addr = addrs[(client + i) % addrs.len()];
                    let reply = http
                        .get(
                            &format!("http://{addr}/{alg}"),
                            &[("x-api-key", "shared-key")],
                        )
                        .await;
                    match reply.status {
                        200 => admitted += 1,
                        429 => rejected += 1,
                        other => panic!("{alg}: unexpected status {other}"),
                    }
                }
                (admitted, rejected)
            }));
        }
        let mut admitted = 0;
        let mut rejected = 0;
        for t in tasks {
            let (a, r) = t.await.unwrap();
            admitted += a;
            rejected += r;
        }
        assert_eq!(admitted, LIMIT, "{alg}: admitted");
        assert_eq!(admitted + rejected, (CLIENTS * PER_CLIENT) as u64);
    }
    for r in replicas {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_on_the_memory_store_is_exact_too() {
    let upstream = Upstream::start().await;
    let routes: String = ALGORITHMS
        .iter()
        .map(|(alg, extra)| {
            format!(
                "[[routes]]\nname = \"{alg}\"\nupstream = \"api\"\nmatch = {{ path = \"/{alg}\" }}\nlimits = [{{ by = \"global\", algorithm = \"{alg}\", rate = \"{LIMIT}/hour\"{extra} }}]\n"
            )
        })
        .collect();
    let tg = start_tollgate(&config(&upstream, &memory_store(), &routes)).await;
    clear_of_an_hour_edge().await;
    for (alg, _) in ALGORITHMS {
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let url = format!("http://{}/{alg}", tg.addr);
            tasks.push(tokio::spawn(async move {
                let http = Http::new();
                let mut admitted = 0u64;
                for _ in 0..PER_CLIENT {
                    if http.get(&url, &[]).await.status == 200 {
                        admitted += 1;
                    }
                }
                admitted
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += t.await.unwrap();
        }
        assert_eq!(admitted, LIMIT, "{alg}");
    }
    tg.stop().await;
}
