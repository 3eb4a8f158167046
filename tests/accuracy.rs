//! Accuracy under concurrency: several tollgate instances share one Redis; many concurrent
//! clients hammer one key; the number admitted equals the limit exactly, for every algorithm.

mod common;

use common::*;

const LIMIT: u64 = 50;
const CLIENTS: usize = 32;
const PER_CLIENT: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_admit_exactly_the_limit_for_every_algorithm() {
    let upstream = Upstream::start().await;
    let redis = Redis::start();
    let routes = algorithm_routes("header:x-api-key", LIMIT, "", "");
    let text = config(&upstream, &redis_store(&redis), &routes);
    let replicas = [start_tollgate(&text).await, start_tollgate(&text).await];
    clear_of_an_hour_edge().await;
    for alg in ALGORITHMS {
        let urls: Vec<String> = replicas
            .iter()
            .map(|r| format!("http://{}/{alg}", r.addr))
            .collect();
        let (admitted, rejected) =
            hammer(&urls, &[("x-api-key", "shared-key")], CLIENTS, PER_CLIENT).await;
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
    let routes = algorithm_routes("global", LIMIT, "", "");
    let tg = start_tollgate(&config(&upstream, &memory_store(), &routes)).await;
    clear_of_an_hour_edge().await;
    for alg in ALGORITHMS {
        let urls = [format!("http://{}/{alg}", tg.addr)];
        let (admitted, _) = hammer(&urls, &[], CLIENTS, PER_CLIENT).await;
        assert_eq!(admitted, LIMIT, "{alg}");
    }
    tg.stop().await;
}
