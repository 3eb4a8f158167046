//! Redis Cluster: limits decided on a 3-primary cluster started by the harness on loopback.
//!
//! - exactness across slots: many API keys, spread over every primary, each admitted exactly
//!   its limit, for every algorithm;
//! - two tollgate instances sharing the cluster admit exactly the limit under concurrency;
//! - limits keyed by different identities live in different slots and stay all-or-nothing
//!   (a rejection in one slot refunds what the other slot committed);
//! - a script cache flushed on every primary is recovered without a store error;
//! - a replica promoted during traffic (`CLUSTER FAILOVER`, or its primary killed): every
//!   answer is decided or follows `on_store_error`, within the store timeout, and decisions
//!   recover within a bounded time (measured and printed).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// One route per algorithm (`/ALG`), keyed by `by`, `n` per hour, failing closed so that a store
/// error can never pass for an admission.
fn deny_routes(by: &str, n: u64) -> String {
    algorithm_routes(by, n, "on_store_error = \"deny\"\n", "")
}

/// Starts tollgate (with an admin listener) on the cluster and waits until `/readyz` says the
/// store answers.
async fn start_on(
    cluster: &Cluster,
    upstream: &Upstream,
    timeout: &str,
    routes: &str,
) -> tollgate::Running {
    let text = config(upstream, &cluster.store(timeout), routes)
        .replace("[server]\n", "[server]\nadmin = \"127.0.0.1:0\"\n");
    let tg = start_tollgate(&text).await;
    let ready = format!("http://{}/readyz", tg.admin_addr.expect("admin listener"));
    let http = Http::new();
    eventually(Duration::from_secs(10), || {
        let (http, ready) = (http.clone(), ready.clone());
        async move { http.get(&ready, &[]).await.status == 200 }
    })
    .await;
    tg
}

/// The Redis key names tollgate uses for `route`'s limits, for a request from 127.0.0.1 with
/// the given `x-api-key` (none: the IP counts).
fn store_keys(tg: &tollgate::Running, route: &str, api_key: Option<&str>) -> Vec<String> {
    let rt = tg.app.runtime();
    let route = rt
        .policy
        .routes
        .iter()
        .find(|r| &*r.name == route)
        .unwrap_or_else(|| panic!("no route {route}"));
    let tollgate::policy::StoreSettings::Redis(settings) = &rt.policy.store else {
        panic!("not a redis store");
    };
    let mut request = http::Request::builder().uri("/");
    if let Some(key) = api_key {
        request = request.header("x-api-key", key);
    }
    let (parts, ()) = request.body(()).unwrap().into_parts();
    let subject = tollgate::identity::Subject {
        parts: &parts,
        ip: "127.0.0.1".parse().unwrap(),
        consumer: None,
        claims: None,
    };
    tollgate::limiter::items_for(&route.limits, &route.keys, &subject)
        .iter()
        .map(|item| tollgate::limiter::redis::key_name(&settings.prefix, item.id, &item.tag))
        .collect()
}

/// A connection to `node` if it answers.
fn try_conn(node: &Redis) -> Option<redis::Connection> {
    redis::Client::open(node.url())
        .ok()?
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()
}

/// A connection to any node that answers (some may have been killed).
fn live_conn(cluster: &Cluster) -> redis::Connection {
    cluster
        .nodes
        .iter()
        .find_map(try_conn)
        .expect("some cluster node answers")
}

fn keyslot(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query(conn)
        .unwrap()
}

/// Every slot range with the port of the primary serving it, as `conn`'s node sees it.
fn slot_map(conn: &mut redis::Connection) -> Vec<(i64, i64, u16)> {
    let value: redis::Value = redis::cmd("CLUSTER").arg("SLOTS").query(conn).unwrap();
    let redis::Value::Array(ranges) = value else {
        panic!("CLUSTER SLOTS: {value:?}")
    };
    ranges
        .into_iter()
        .filter_map(|range| {
            let redis::Value::Array(parts) = range else {
                return None;
            };
            let (redis::Value::Int(lo), redis::Value::Int(hi), redis::Value::Array(primary)) =
                (&parts[0], &parts[1], &parts[2])
            else {
                return None;
            };
            let redis::Value::Int(port) = primary[1] else {
                return None;
            };
            Some((*lo, *hi, port as u16))
        })
        .collect()
}

fn owner(map: &[(i64, i64, u16)], slot: i64) -> u16 {
    owner_of(map, slot).unwrap_or_else(|| panic!("no primary for slot {slot}: {map:?}"))
}

/// The port of the primary serving `slot`, if the map has one (mid-failover, a node's view
/// may briefly list no primary for the failed-over slots).
fn owner_of(map: &[(i64, i64, u16)], slot: i64) -> Option<u16> {
    map.iter()
        .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
        .map(|&(_, _, port)| port)
}

/// The ports of the nodes that are primaries (own slots).
fn primary_ports(map: &[(i64, i64, u16)]) -> BTreeSet<u16> {
    map.iter().map(|&(_, _, port)| port).collect()
}

fn node_index(cluster: &Cluster, port: u16) -> usize {
    cluster
        .nodes
        .iter()
        .position(|n| n.port == port)
        .unwrap_or_else(|| panic!("no node on port {port}"))
}

/// `tollgate_requests_total{route, decision}`.
fn decisions(tg: &tollgate::Running, route: &str, decision: &str) -> u64 {
    let metrics = tg.app.metrics.render();
    let series = format!("tollgate_requests_total{{route=\"{route}\",decision=\"{decision}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{metrics}"))
}

use common::parse::info;

// ---------------------------------------------------------------------------------------------
// Exactness
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_admits_exactly_its_limit_for_keys_on_every_primary() {
    const KEYS: usize = 48;
    const LIMIT: usize = 5;
    const ATTEMPTS: usize = 8;
    const WORKERS: usize = 16;
    let started = Instant::now();
    let cluster = Cluster::start(3, 0);
    let upstream = Upstream::start().await;
    let tg = start_on(
        &cluster,
        &upstream,
        "1s",
        &deny_routes("header:x-api-key", LIMIT as u64),
    )
    .await;

    // Where each key's counters live: the API key is the hash tag, so every algorithm's key
    // for one API key is in one slot; the API keys spread over all three primaries.
    let api_keys: Vec<String> = (0..KEYS).map(|i| format!("key-{i}")).collect();
    let mut conn = live_conn(&cluster);
    let map = slot_map(&mut conn);
    assert_eq!(primary_ports(&map).len(), 3, "{map:?}");
    let mut per_primary: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    let mut slots = BTreeSet::new();
    for key in &api_keys {
        let names: Vec<String> = ALGORITHMS
            .iter()
            .flat_map(|alg| store_keys(&tg, alg, Some(key)))
            .collect();
        let key_slots: BTreeSet<i64> = names.iter().map(|n| keyslot(&mut conn, n)).collect();
        assert_eq!(key_slots.len(), 1, "one slot per identity: {names:?}");
        let slot = *key_slots.first().unwrap();
        slots.insert(slot);
        let port = owner(&map, slot);
        assert_eq!(cluster.primary_for(&names[0]).port, port);
        per_primary.entry(port).or_default().extend(names);
    }
    let spread: Vec<(u16, usize)> = per_primary
        .iter()
        .map(|(port, names)| (*port, names.len() / ALGORITHMS.len()))
        .collect();
    eprintln!(
        "{KEYS} API keys in {} slots; API keys per primary: {spread:?}",
        slots.len()
    );
    assert_eq!(per_primary.len(), 3, "keys on every primary: {spread:?}");

    clear_of_an_hour_edge().await;
    for alg in ALGORITHMS {
        // The attempts of one key are consecutive in the work list, so the workers send them
        // at the same time.
        let work: Arc<Vec<usize>> = Arc::new(
            (0..KEYS)
                .flat_map(|k| std::iter::repeat_n(k, ATTEMPTS))
                .collect(),
        );
        let next = Arc::new(AtomicUsize::new(0));
        let admitted = Arc::new(Mutex::new(vec![0usize; KEYS]));
        let mut tasks = Vec::new();
        for _ in 0..WORKERS {
            let (work, next, admitted) = (work.clone(), next.clone(), admitted.clone());
            let url = format!("http://{}/{alg}", tg.addr);
            tasks.push(tokio::spawn(async move {
                let http = Http::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&k) = work.get(i) else { break };
                    let reply = http.get(&url, &[("x-api-key", &format!("key-{k}"))]).await;
                    match reply.status {
                        200 => admitted.lock().unwrap()[k] += 1,
                        429 => {}
                        other => panic!("{alg}: unexpected status {other}: {reply:?}"),
                    }
                    assert!(reply.header("ratelimit").is_some(), "{alg}: decided");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let admitted = admitted.lock().unwrap();
        let wrong: Vec<(usize, usize)> = admitted
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n != LIMIT)
            .map(|(k, &n)| (k, n))
            .collect();
        assert!(
            wrong.is_empty(),
            "{alg}: keys admitted other than {LIMIT} times (key, admitted): {wrong:?}"
        );
        assert_eq!(decisions(&tg, alg, "store_error"), 0, "{alg}");
        assert_eq!(decisions(&tg, alg, "allowed"), (KEYS * LIMIT) as u64);
    }

    // Every key is on the primary computed for it (a direct EXISTS there), and those are all
    // the keys there are.
    let mut total = 0;
    for (port, names) in &per_primary {
        let mut c = cluster.nodes[node_index(&cluster, *port)].conn();
        for name in names {
            let exists: i64 = redis::cmd("EXISTS").arg(name).query(&mut c).unwrap();
            assert_eq!(exists, 1, "{name} on primary {port}");
        }
        let size: usize = redis::cmd("DBSIZE").query(&mut c).unwrap();
        assert_eq!(size, names.len(), "keys on primary {port}");
        total += size;
    }
    assert_eq!(total, KEYS * ALGORITHMS.len());
    tg.stop().await;
    eprintln!("exactness across slots: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_the_cluster_admit_exactly_the_limit_for_every_algorithm() {
    const LIMIT: u64 = 50;
    const CLIENTS: usize = 32;
    const PER_CLIENT: usize = 10;
    let started = Instant::now();
    let cluster = Cluster::start(3, 0);
    let upstream = Upstream::start().await;
    let routes = deny_routes("header:x-api-key", LIMIT);
    let instances = [
        start_on(&cluster, &upstream, "1s", &routes).await,
        start_on(&cluster, &upstream, "1s", &routes).await,
    ];
    clear_of_an_hour_edge().await;
    for alg in ALGORITHMS {
        let urls: Vec<String> = instances
            .iter()
            .map(|r| format!("http://{}/{alg}", r.addr))
            .collect();
        let (admitted, rejected) =
            hammer(&urls, &[("x-api-key", "shared-key")], CLIENTS, PER_CLIENT).await;
        assert_eq!(admitted, LIMIT, "{alg}: admitted");
        assert_eq!(admitted + rejected, (CLIENTS * PER_CLIENT) as u64);
        for tg in &instances {
            assert_eq!(decisions(tg, alg, "store_error"), 0, "{alg}");
        }
    }
    for tg in instances {
        tg.stop().await;
    }
    eprintln!("two instances on the cluster: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Cross-slot all-or-nothing
// ---------------------------------------------------------------------------------------------

/// A route with two limits keyed by different identities: the API key and the client IP.
fn pair_route(per_key: u64, per_ip: u64) -> String {
    format!(
        "[[routes]]\nname = \"pair\"\nupstream = \"api\"\nmatch = {{ path = \"/pair\" }}\n\
         on_store_error = \"deny\"\nlimits = [\n\
         {{ by = \"header:x-api-key\", algorithm = \"fixed_window\", rate = \"{per_key}/hour\" }},\n\
         {{ by = \"ip\", algorithm = \"sliding_log\", rate = \"{per_ip}/hour\" }},\n]\n"
    )
}

/// A fixed_window key's count (its state is "<window>:<count>"), 0 when absent.
fn window_count(cluster: &Cluster, key: &str) -> i64 {
    let state: Option<String> = redis::cmd("GET")
        .arg(key)
        .query(&mut cluster.primary_for(key).conn())
        .unwrap();
    state.map_or(0, |s| s.rsplit(':').next().unwrap().parse().unwrap())
}

fn log_members(cluster: &Cluster, key: &str) -> i64 {
    redis::cmd("ZCARD")
        .arg(key)
        .query(&mut cluster.primary_for(key).conn())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_rejected_in_one_slot_consumes_nothing_in_another() {
    let started = Instant::now();
    let cluster = Cluster::start(3, 0);
    let upstream = Upstream::start().await;
    let tg = start_on(&cluster, &upstream, "1s", &pair_route(3, 4)).await;
    let http = Http::new();
    let url = format!("http://{}/pair", tg.addr);

    let mut conn = live_conn(&cluster);
    let mut keys = BTreeMap::new();
    for api_key in ["a", "b", "c"] {
        let names = store_keys(&tg, "pair", Some(api_key));
        assert_eq!(names.len(), 2);
        let (by_key, by_ip) = (keyslot(&mut conn, &names[0]), keyslot(&mut conn, &names[1]));
        assert_ne!(
            by_key, by_ip,
            "{api_key}: two identities, two slots: {names:?}"
        );
        eprintln!(
            "key {api_key}: slot {by_key} on :{}; ip: slot {by_ip} on :{}",
            cluster.primary_for(&names[0]).port,
            cluster.primary_for(&names[1]).port
        );
        keys.insert(api_key, names);
    }
    let ip_log = keys["a"][1].clone();
    assert!(keys.values().all(|n| n[1] == ip_log), "one IP, one log");

    clear_of_an_hour_edge().await;
    let send = |api_key: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move { http.get(&url, &[("x-api-key", api_key)]).await }
    };
    for i in 0..3 {
        assert_eq!(send("a").await.status, 200, "a #{}", i + 1);
    }
    // The key's own limit rejects; the IP's log had admitted it in its slot: given back.
    let reply = send("a").await;
    assert_eq!(reply.status, 429, "a #4");
    assert!(
        reply
            .header("ratelimit")
            .is_some_and(|v| v.contains("\"pair/0\";r=0")),
        "rejected by the key's limit: {:?}",
        reply.header("ratelimit")
    );
    // So the IP still has its 4th unit.
    let reply = send("b").await;
    assert_eq!(reply.status, 200, "b: the IP's 4th unit was refunded");
    // Now the IP's limit rejects; c's window had counted it in its slot: given back.
    let reply = send("c").await;
    assert_eq!(reply.status, 429, "c: the IP is out of units");
    assert!(
        reply
            .header("ratelimit")
            .is_some_and(|v| v.contains("\"pair/1\";r=0")),
        "rejected by the IP's limit: {:?}",
        reply.header("ratelimit")
    );

    assert_eq!(log_members(&cluster, &ip_log), 4, "the IP's log: 3 × a + b");
    assert_eq!(window_count(&cluster, &keys["a"][0]), 3, "a's window");
    assert_eq!(window_count(&cluster, &keys["b"][0]), 1, "b's window");
    assert_eq!(
        window_count(&cluster, &keys["c"][0]),
        0,
        "c's window: its unit was refunded"
    );
    assert_eq!(decisions(&tg, "pair", "allowed"), 4);
    assert_eq!(decisions(&tg, "pair", "rejected"), 2);
    assert_eq!(decisions(&tg, "pair", "store_error"), 0);
    tg.stop().await;
    eprintln!("cross-slot refunds: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Script cache
// ---------------------------------------------------------------------------------------------

/// Whether each of `nodes` has the script with this SHA1 cached.
fn scripts_cached(cluster: &Cluster, sha: &str) -> Vec<bool> {
    cluster
        .nodes
        .iter()
        .map(|n| {
            let exists: Vec<i64> = redis::cmd("SCRIPT")
                .arg("EXISTS")
                .arg(sha)
                .query(&mut n.conn())
                .unwrap();
            exists == [1]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_cache_flushed_on_every_primary_is_recovered_without_store_errors() {
    let started = Instant::now();
    let cluster = Cluster::start(3, 0);
    let upstream = Upstream::start().await;
    let routes = format!(
        "[[routes]]\nname = \"one\"\nupstream = \"api\"\nmatch = {{ path = \"/one\" }}\n\
         on_store_error = \"deny\"\n\
         limits = [{{ by = \"header:x-api-key\", algorithm = \"gcra\", rate = \"100/hour\", burst = 100 }}]\n\
         {}",
        pair_route(1, 100)
    );
    let tg = start_on(&cluster, &upstream, "1s", &routes).await;
    let http = Http::new();
    // Single-limit decisions (route "one", and each slot of route "pair") use the gcra,
    // fixed_window and sliding_log scripts of SINGLE_SCRIPTS; check the gcra one.
    let decide_sha = redis::Script::new(
        &tollgate::limiter::redis::SINGLE_SCRIPTS[usize::from(Kind::Gcra.code()) - 1],
    )
    .get_hash()
    .to_string();
    let refund_sha = redis::Script::new(&tollgate::limiter::redis::REFUND_SCRIPT)
        .get_hash()
        .to_string();

    // A few API keys on each primary.
    let mut conn = live_conn(&cluster);
    let map = slot_map(&mut conn);
    let mut chosen: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for i in 0..200 {
        if chosen.len() == 3 && chosen.values().all(|v| v.len() >= 2) {
            break;
        }
        let key = format!("s-{i}");
        let name = &store_keys(&tg, "one", Some(&key))[0];
        let list = chosen
            .entry(owner(&map, keyslot(&mut conn, name)))
            .or_default();
        if list.len() < 2 {
            list.push(key);
        }
    }
    assert!(
        chosen.len() == 3 && chosen.values().all(|v| v.len() >= 2),
        "{chosen:?}"
    );
    let api_keys: Vec<&String> = chosen.values().flatten().collect();
    let ip_log = store_keys(&tg, "pair", Some("p"))[1].clone();

    let one = format!("http://{}/one", tg.addr);
    let pair = format!("http://{}/pair", tg.addr);
    clear_of_an_hour_edge().await;
    let decided_everywhere = |round: &'static str| {
        let (http, one, keys) = (http.clone(), one.clone(), api_keys.clone());
        async move {
            for key in keys {
                let reply = http.get(&one, &[("x-api-key", key)]).await;
                assert_eq!(reply.status, 200, "{round}: {key}: {reply:?}");
                assert!(reply.header("ratelimit").is_some(), "{round}: {key}");
            }
        }
    };
    decided_everywhere("before the flush").await;
    // A cross-slot rejection: the refund script is used (and loaded) too.
    assert_eq!(http.get(&pair, &[("x-api-key", "p")]).await.status, 200);
    assert_eq!(http.get(&pair, &[("x-api-key", "p")]).await.status, 429);
    assert_eq!(scripts_cached(&cluster, &decide_sha), [true; 3]);
    assert_eq!(scripts_cached(&cluster, &refund_sha), [true; 3]);

    for node in &cluster.nodes {
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query(&mut node.conn())
            .unwrap();
    }
    assert_eq!(scripts_cached(&cluster, &decide_sha), [false; 3]);
    assert_eq!(scripts_cached(&cluster, &refund_sha), [false; 3]);

    decided_everywhere("after the flush").await;
    assert_eq!(http.get(&pair, &[("x-api-key", "q")]).await.status, 200);
    assert_eq!(http.get(&pair, &[("x-api-key", "q")]).await.status, 429);
    assert_eq!(
        log_members(&cluster, &ip_log),
        2,
        "p and q admitted once each; both rejections refunded, the second after the flush"
    );
    assert_eq!(
        scripts_cached(&cluster, &decide_sha),
        [true; 3],
        "reloaded on every primary"
    );
    assert_eq!(scripts_cached(&cluster, &refund_sha), [true; 3]);
    assert_eq!(decisions(&tg, "one", "store_error"), 0);
    assert_eq!(decisions(&tg, "pair", "store_error"), 0);
    assert_eq!(decisions(&tg, "one", "allowed"), 2 * api_keys.len() as u64);
    tg.stop().await;
    eprintln!("script flush: {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Failover during traffic
// ---------------------------------------------------------------------------------------------

const STORE_TIMEOUT: Duration = Duration::from_millis(300);
const MARGIN: Duration = Duration::from_millis(700);

/// One request of the traffic loop.
#[derive(Debug, Clone)]
struct Sample {
    sent: Instant,
    done: Instant,
    status: u16,
    /// Answered with rate-limit headers: the store decided it.
    decided: bool,
    retry_after: Option<String>,
    /// Its key is in a slot of the primary that fails over.
    victim: bool,
    key: usize,
}

enum Switch {
    /// `CLUSTER FAILOVER` sent to the replica.
    Failover,
    /// The primary killed; the cluster promotes its replica.
    Kill,
}

/// Answers per 250 ms after the switch: `+Ns victim decided/503, other decided/503`.
fn timeline(samples: &[Sample], switched: Instant) -> String {
    let mut buckets: BTreeMap<u128, [usize; 4]> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.sent >= switched) {
        let b = buckets
            .entry((s.sent - switched).as_millis() / 250)
            .or_default();
        b[usize::from(!s.victim) * 2 + usize::from(s.status == 503)] += 1;
    }
    buckets
        .iter()
        .map(|(b, [vd, ve, od, oe])| format!("+{:.2}s v{vd}/{ve} o{od}/{oe}", *b as f64 * 0.25))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs sync Redis calls without stalling the traffic on this runtime's worker.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

async fn replica_promoted_during_traffic(switch: Switch) {
    const KEYS: usize = 36;
    const CLIENTS: usize = 3;
    const PER_CLIENT: usize = 3000;
    let started = Instant::now();
    let mut cluster = Cluster::start(3, 1);
    let upstream = Upstream::start().await;
    let routes = "[[routes]]\nname = \"t\"\nupstream = \"api\"\nmatch = { path = \"/t\" }\n\
                  on_store_error = \"deny\"\n\
                  limits = [{ by = \"header:x-api-key\", algorithm = \"fixed_window\", rate = \"1000000/hour\" }]\n\
                  [[routes]]\nname = \"exact\"\nupstream = \"api\"\nmatch = { path = \"/exact\" }\n\
                  on_store_error = \"deny\"\n\
                  limits = [{ by = \"header:x-api-key\", algorithm = \"gcra\", rate = \"5/hour\", burst = 5 }]\n";
    let tg = start_on(&cluster, &upstream, "300ms", routes).await;
    let setup = started.elapsed();

    // The traffic's keys, over every primary; the victim is the primary owning k-0.
    let api_keys: Vec<String> = (0..KEYS).map(|i| format!("k-{i}")).collect();
    let mut conn = live_conn(&cluster);
    let map = slot_map(&mut conn);
    let owners: Vec<u16> = api_keys
        .iter()
        .map(|k| owner(&map, keyslot(&mut conn, &store_keys(&tg, "t", Some(k))[0])))
        .collect();
    let victim_port = owners[0];
    assert_eq!(
        owners.iter().collect::<BTreeSet<_>>().len(),
        3,
        "traffic on every primary: {owners:?}"
    );
    let victim = node_index(&cluster, victim_port);
    let victim_slots: Vec<(i64, i64)> = map
        .iter()
        .filter(|&&(_, _, port)| port == victim_port)
        .map(|&(lo, hi, _)| (lo, hi))
        .collect();
    let is_victim: Arc<Vec<bool>> = Arc::new(owners.iter().map(|&p| p == victim_port).collect());

    // Its replica, once its replication link is up (else it could not take over).
    let mut primary_conn = cluster.nodes[victim].conn();
    let id: String = redis::cmd("CLUSTER")
        .arg("MYID")
        .query(&mut primary_conn)
        .unwrap();
    // The replica shows in CLUSTER REPLICAS once the cluster bus has told the primary about
    // it, which can come a moment after the cluster reports ok.
    let deadline = Instant::now() + Duration::from_secs(10);
    let replicas: Vec<String> = loop {
        let replicas: Vec<String> = redis::cmd("CLUSTER")
            .arg("REPLICAS")
            .arg(&id)
            .query(&mut primary_conn)
            .unwrap();
        if !replicas.is_empty() || Instant::now() > deadline {
            break replicas;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    let replica_port: u16 = replicas[0]
        .split_whitespace()
        .nth(1)
        .and_then(|addr| addr.split('@').next()?.rsplit(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("replica address in {replicas:?}"));
    let replica = node_index(&cluster, replica_port);
    drop(primary_conn);
    let mut replica_conn = cluster.nodes[replica].conn();
    let waited = Instant::now();
    while !info(&mut replica_conn, "replication").contains("master_link_status:up") {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the replica's link never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "victim primary :{victim_port} (slots {victim_slots:?}), replica :{replica_port}; \
         {} of {KEYS} traffic keys on it; setup {setup:?}",
        is_victim.iter().filter(|&&v| v).count()
    );

    // The traffic: CLIENTS loops over all keys, bounded in count and time.
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let (samples, stop, is_victim) = (samples.clone(), stop.clone(), is_victim.clone());
        let url = format!("http://{}/t", tg.addr);
        tasks.push(tokio::spawn(async move {
            let http = Http::new();
            let deadline = Instant::now() + Duration::from_secs(25);
            for n in 0..PER_CLIENT {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let key = (client + n * CLIENTS) % KEYS;
                let sent = Instant::now();
                let reply = http.get(&url, &[("x-api-key", &format!("k-{key}"))]).await;
                samples.lock().unwrap().push(Sample {
                    sent,
                    done: Instant::now(),
                    status: reply.status,
                    decided: reply.header("ratelimit").is_some(),
                    retry_after: reply.header("retry-after").map(str::to_string),
                    victim: is_victim[key],
                    key,
                });
                // Paced, so that the cluster's own election has CPU on this small machine.
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        }));
    }
    let count =
        |pred: &dyn Fn(&Sample) -> bool| samples.lock().unwrap().iter().filter(|s| pred(s)).count();
    eventually(Duration::from_secs(10), || {
        let n = count(&|s| s.victim && s.decided);
        async move { n >= 30 }
    })
    .await;

    // The switch.
    let switched = Instant::now();
    let label = match switch {
        Switch::Failover => {
            blocking(|| {
                let _: () = redis::cmd("CLUSTER")
                    .arg("FAILOVER")
                    .query(&mut replica_conn)
                    .unwrap();
            });
            "CLUSTER FAILOVER"
        }
        Switch::Kill => {
            blocking(|| cluster.nodes[victim].kill());
            "primary killed"
        }
    };
    let promoted_in = eventually(Duration::from_secs(15), || {
        let role = blocking(|| info(&mut replica_conn, "replication"));
        async move { role.contains("role:master") }
    })
    .await;
    let promoted = Instant::now();
    // The rest of the cluster agrees that the old replica now serves the victim's slots.
    blocking(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut c = live_conn(&cluster);
            let map = slot_map(&mut c);
            if victim_slots
                .iter()
                .all(|&(lo, _)| owner_of(&map, lo) == Some(replica_port))
            {
                break;
            }
            assert!(Instant::now() < deadline, "slot map never moved: {map:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    });

    // Decisions recover for keys on the failed-over slots.
    let first_recovered = |samples: &[Sample]| {
        samples
            .iter()
            .filter(|s| s.victim && s.decided && s.sent >= promoted)
            .map(|s| s.done)
            .min()
    };
    eventually(Duration::from_secs(10), || {
        let found = first_recovered(&samples.lock().unwrap()).is_some();
        async move { found }
    })
    .await;
    let recovered = first_recovered(&samples.lock().unwrap()).unwrap();
    // Some steady traffic after the recovery.
    eventually(Duration::from_secs(10), || {
        let n = count(&|s| s.victim && s.sent >= recovered);
        async move { n >= 30 }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let samples = samples.lock().unwrap().clone();

    // Every answer: decided, or the route's on_store_error (503) during the switch (for each
    // key until its own slot answers again: the circuit breakers recover per group of slots);
    // and within the store timeout plus a margin.
    let slowest = samples.iter().map(|s| s.done - s.sent).max().unwrap();
    let mut key_recovered: std::collections::HashMap<usize, Instant> = Default::default();
    for s in samples.iter().filter(|s| s.decided && s.sent >= promoted) {
        let at = key_recovered.entry(s.key).or_insert(s.sent);
        if s.sent < *at {
            *at = s.sent;
        }
    }
    for key in samples.iter().filter(|s| s.victim).map(|s| s.key) {
        let at = key_recovered.get(&key).copied();
        assert!(
            at.is_some_and(|at| at.saturating_duration_since(promoted) < Duration::from_secs(5)),
            "key k-{key} not decided again within 5 s of the promotion"
        );
    }
    let mut wrong = Vec::new();
    for s in &samples {
        let latency = s.done - s.sent;
        let ok = match s.status {
            200 | 429 => s.decided,
            503 => {
                s.retry_after.as_deref() == Some("1")
                    && s.done > switched
                    && key_recovered.get(&s.key).is_none_or(|at| s.sent < *at)
            }
            _ => false,
        };
        if !ok || latency >= STORE_TIMEOUT + MARGIN {
            wrong.push(format!(
                "key k-{} (victim {}) sent {:?} after the switch: {} decided={} in {latency:?}",
                s.key,
                s.victim,
                s.sent.checked_duration_since(switched),
                s.status,
                s.decided
            ));
        }
    }
    let failed = samples.iter().filter(|s| s.status == 503).count();
    let failed_other = samples
        .iter()
        .filter(|s| s.status == 503 && !s.victim)
        .count();
    let outage = samples
        .iter()
        .filter(|s| s.status == 503)
        .map(|s| s.done)
        .max()
        .map(|last| last - switched);
    eprintln!(
        "{label}: promoted {promoted_in:?} after the switch; decisions on its slots recovered \
         {:?} after the promotion ({:?} after the switch); {} requests, {failed} answered 503 \
         ({failed_other} of them for keys on other primaries), last 503 {outage:?} after the \
         switch; slowest answer {slowest:?}",
        recovered.saturating_duration_since(promoted),
        recovered - switched,
        samples.len(),
    );
    eprintln!("{label}: {}", timeline(&samples, switched));
    let metrics = tg.app.metrics.render();
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("tollgate_store_errors"))
        .collect();
    eprintln!("{label}: store errors by kind: {errors:?}");
    assert!(
        wrong.is_empty(),
        "{} of {} answers wrong:\n{}",
        wrong.len(),
        samples.len(),
        wrong[..wrong.len().min(20)].join("\n")
    );
    assert!(
        recovered.saturating_duration_since(promoted) < Duration::from_secs(5),
        "decisions recovered too late"
    );

    // The limit holds afterwards: a fresh key on the failed-over slots admits exactly its limit.
    let mut conn = live_conn(&cluster);
    let fresh = (0..300)
        .map(|i| format!("fresh-{i}"))
        .find(|k| {
            let slot = keyslot(&mut conn, &store_keys(&tg, "exact", Some(k))[0]);
            victim_slots
                .iter()
                .any(|&(lo, hi)| (lo..=hi).contains(&slot))
        })
        .expect("a key on the failed-over slots");
    let http = Http::new();
    let url = format!("http://{}/exact", tg.addr);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        statuses.push(http.get(&url, &[("x-api-key", &fresh)]).await.status);
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 200, 429, 429, 429],
        "{fresh}"
    );
    let name = &store_keys(&tg, "exact", Some(&fresh))[0];
    let exists: i64 = redis::cmd("EXISTS")
        .arg(name)
        .query(&mut cluster.nodes[replica].conn())
        .unwrap();
    assert_eq!(exists, 1, "counted on the promoted replica");
    tg.stop().await;
    eprintln!("{label}: whole test {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_during_traffic_keeps_deciding() {
    replica_promoted_during_traffic(Switch::Failover).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_is_replaced_by_its_replica_during_traffic() {
    replica_promoted_during_traffic(Switch::Kill).await;
}
