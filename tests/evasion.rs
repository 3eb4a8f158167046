//! No way around a limit: every spelling of a limited resource that a real backend serves as
//! that resource is counted by that resource's limit. Tested against real origins (nginx, a
//! Python ASGI app under hypercorn) that route by host and path the way they do in production,
//! and on raw sockets for request targets hyper's clients would never send.

mod common;

use common::origins::{Hypercorn, Nginx};
use common::raw::{RawReply, exchange};
use common::{Upstream, start_tollgate};

/// A Python origin: answers JSON saying which resource it served ("login" for any path that
/// reads as /login after decoding, merging slashes and resolving dot segments, as permissive
/// frameworks and static handlers do), the HTTP version it spoke and the Upgrade it saw.
const PYTHON_ORIGIN: &str = r#"
import json, posixpath, re

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    while True:
        message = await receive()
        if not message.get("more_body"):
            break
    path = scope["path"]
    normal = posixpath.normpath(re.sub(r"[/\\]+", "/", path))
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    body = json.dumps({
        "served": "login" if normal == "/login" else "other",
        "http_version": scope["http_version"],
        "upgrade": headers.get("upgrade"),
        "path": path,
    }).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
"#;

fn config(target: &str, server_extra: &str, routes: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n\n[store]\nbackend = \"memory\"\n\n\
         [upstreams.origin]\ntargets = [\"{target}\"]\ntimeout = \"5s\"\n\n{routes}"
    )
}

/// A recording upstream behind a tollgate with one open route and `server_extra`.
async fn open_proxy(server_extra: &str) -> (Upstream, tollgate::Running) {
    let upstream = Upstream::start().await;
    let tg = start_tollgate(&config(
        &upstream.target(),
        server_extra,
        "[[routes]]\nname = \"all\"\nupstream = \"origin\"\n",
    ))
    .await;
    (upstream, tg)
}

fn body(reply: &RawReply) -> String {
    String::from_utf8_lossy(&reply.body).into_owned()
}

/// `GET {target}` with `host`, on its own connection.
async fn get(addr: std::net::SocketAddr, target: &str, host: &str) -> RawReply {
    exchange(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

#[tokio::test]
async fn an_h2c_upgrade_opens_no_tunnel_past_the_limiter() {
    let origin = Hypercorn::start(PYTHON_ORIGIN);
    let routes = "[[routes]]\nname = \"upgrade\"\nupstream = \"origin\"\n\
                  limits = [{ by = \"ip\", algorithm = \"fixed_window\", rate = \"2/min\" }]\n";
    let tg = start_tollgate(&config(&origin.target(), "", routes)).await;
    let upgrade = b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                    Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
    for n in 0..2 {
        let reply = exchange(tg.addr, upgrade).await;
        assert_eq!(
            reply.status, 200,
            "request {n} served as plain HTTP/1.1: {reply:?}"
        );
        let seen: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(seen["http_version"], "1.1", "{seen}");
        assert_eq!(
            seen["upgrade"],
            serde_json::Value::Null,
            "Upgrade stripped: {seen}"
        );
    }
    let third = exchange(tg.addr, upgrade).await;
    assert_eq!(third.status, 429, "each request counted: {third:?}");
    tg.stop().await;

    // The allowlist is what decides: naming h2c lets the same request switch protocols.
    let routes = "[[routes]]\nname = \"open\"\nupstream = \"origin\"\n";
    let tg = start_tollgate(&config(
        &origin.target(),
        "upgrades = [\"websocket\", \"H2C\"]",
        routes,
    ))
    .await;
    let reply = exchange(tg.addr, upgrade).await;
    assert_eq!(reply.status, 101, "an allowed upgrade passes: {reply:?}");
    tg.stop().await;
}

const NGINX_VHOSTS: &str = "
server { listen 127.0.0.1:{port}; server_name limited.example; location / { return 200 \"limited\\n\"; } }
server { listen 127.0.0.1:{port} default_server; server_name _; location / { return 200 \"free\\n\"; } }
";

#[tokio::test]
async fn host_spellings_cannot_select_an_unlimited_route() {
    let origin = Nginx::start(NGINX_VHOSTS);
    let routes = "[[routes]]\nname = \"limited\"\nupstream = \"origin\"\n\
                  match = { host = \"limited.example\" }\n\
                  limits = [{ by = \"global\", algorithm = \"fixed_window\", rate = \"3/hour\" }]\n\n\
                  [[routes]]\nname = \"rest\"\nupstream = \"origin\"\n";
    let tg = start_tollgate(&config(&origin.target(), "", routes)).await;
    // Free hosts are untouched.
    for _ in 0..5 {
        let reply = get(tg.addr, "/x", "free.example").await;
        assert_eq!((reply.status, body(&reply).as_str()), (200, "free\n"));
    }
    let tricks: [(&str, &str, Option<u16>); 8] = [
        ("/x", "limited.example.", None),
        ("/x", "limited.example.:80", None),
        ("/x", "LIMITED.example", None),
        ("/x", "limited.example:abc", Some(400)),
        ("/x", "limited.example:99999", Some(400)),
        ("http://limited.example./x", "limited.example.", None),
        ("http://limited.example./x", "free.example", Some(400)),
        ("http://free.example/x", "limited.example", Some(400)),
    ];
    let mut limited_served = 0;
    let mut rejected = 0;
    for round in 0..2 {
        for (target, host, expected) in tricks {
            let reply = get(tg.addr, target, host).await;
            if let Some(status) = expected {
                assert_eq!(reply.status, status, "{target} Host: {host} ({reply:?})");
            }
            match (reply.status, body(&reply).as_str()) {
                (200, "limited\n") => limited_served += 1,
                (200, other) => panic!("{target} Host: {host} served {other:?} (round {round})"),
                (429, _) => rejected += 1,
                (400, _) => {}
                other => panic!("{target} Host: {host}: {other:?}"),
            }
        }
    }
    assert_eq!(
        limited_served, 3,
        "exactly the limit reached the limited host"
    );
    assert_eq!(
        rejected,
        2 * 4 - 3,
        "every other spelling of it was rejected"
    );
    tg.stop().await;
}

/// Path spellings backends read as `/login` (or, for `%5C`, some do).
const PATH_TRICKS: [&str; 12] = [
    "/login",
    "//login",
    "/./login",
    "/%6cogin",
    "/x/../login",
    "/%2flogin",
    "/%2Flogin",
    "/x/..%2flogin",
    "/x%2f..%2flogin",
    "/%2e%2e/login",
    "/x/..%5clogin",
    "/login?x=1",
];

const LOGIN_ROUTES: &str = "[[routes]]\nname = \"login\"\nupstream = \"origin\"\n\
    match = { path = \"/login\" }\n\
    limits = [{ by = \"global\", algorithm = \"fixed_window\", rate = \"3/hour\" }]\n\n\
    [[routes]]\nname = \"rest\"\nupstream = \"origin\"\n";

/// Sends every trick twice; returns how many reached the origin's login and how many were
/// rejected, asserting each reply is one of those or the origin's other resource.
async fn run_path_tricks(
    addr: std::net::SocketAddr,
    served_login: impl Fn(&RawReply) -> bool,
) -> (usize, usize) {
    let (mut login, mut rejected) = (0, 0);
    for _ in 0..2 {
        for target in PATH_TRICKS {
            let reply = get(addr, target, "t").await;
            match reply.status {
                200 if served_login(&reply) => login += 1,
                200 => {}
                429 => rejected += 1,
                other => panic!("{target}: {other} {reply:?}"),
            }
        }
    }
    (login, rejected)
}

#[tokio::test]
async fn path_spellings_are_counted_by_the_route_nginx_serves() {
    let origin = Nginx::start(
        "server { listen 127.0.0.1:{port}; location = /login { return 200 \"login\\n\"; } \
         location / { return 200 \"other\\n\"; } }",
    );
    let tg = start_tollgate(&config(&origin.target(), "", LOGIN_ROUTES)).await;
    let plain = get(tg.addr, "/elsewhere", "t").await;
    assert_eq!(body(&plain), "other\n");
    let (login, rejected) = run_path_tricks(tg.addr, |r| r.body == b"login\n").await;
    assert_eq!(
        login, 3,
        "nginx served its /login exactly the limit's 3 times"
    );
    assert!(rejected >= 2 * 9 - 3, "{rejected} rejections");
    tg.stop().await;
}

#[tokio::test]
async fn path_spellings_are_counted_by_the_route_a_python_app_serves() {
    let origin = Hypercorn::start(PYTHON_ORIGIN);
    let tg = start_tollgate(&config(&origin.target(), "", LOGIN_ROUTES)).await;
    let (login, rejected) = run_path_tricks(tg.addr, |r| {
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["served"] == "login"
    })
    .await;
    assert_eq!(
        login, 3,
        "the app served its /login exactly the limit's 3 times"
    );
    assert_eq!(rejected, 2 * PATH_TRICKS.len() - 3);
    tg.stop().await;
}

#[tokio::test]
async fn escaped_slashes_can_be_refused() {
    let (upstream, tg) = open_proxy("escaped_slashes = \"reject\"").await;
    for target in ["/%2flogin", "/a%2Fb", "/a%5cb"] {
        let reply = get(tg.addr, target, "t").await;
        assert_eq!(reply.status, 400, "{target}: {reply:?}");
        assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
    }
    assert_eq!(get(tg.addr, "/a%20b", "t").await.status, 200);
    assert_eq!(upstream.count(), 1);
    tg.stop().await;
}

#[tokio::test]
async fn odd_request_targets_are_refused_before_anything_is_forwarded() {
    let (upstream, tg) = open_proxy("").await;
    let connect = exchange(
        tg.addr,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    .await;
    assert_eq!(connect.status, 405, "{connect:?}");
    assert!(connect.header("allow").is_some_and(|a| a.contains("GET")));
    let problem: serde_json::Value = serde_json::from_slice(&connect.body).unwrap();
    assert_eq!(problem["status"], 405);
    for (request, why) in [
        (&b"GET * HTTP/1.1\r\nHost: t\r\n\r\n"[..], "* with GET"),
        (
            b"GET example.com:80 HTTP/1.1\r\nHost: example.com\r\n\r\n",
            "authority form",
        ),
        (
            b"GET http://user:pw@free.example/ HTTP/1.1\r\nHost: free.example\r\n\r\n",
            "userinfo in the target",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: user@free.example\r\n\r\n",
            "userinfo in Host",
        ),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "a space in Host"),
        (
            b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
            "an open IPv6 literal",
        ),
    ] {
        let reply = exchange(tg.addr, request).await;
        assert_eq!(reply.status, 400, "{why}: {reply:?}");
        let problem: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(problem["status"], 400, "{why}");
    }
    assert_eq!(upstream.count(), 0, "nothing was forwarded");
    // OPTIONS * is the one use of the asterisk form, and goes through as it came.
    let options = exchange(tg.addr, b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(options.status, 200, "{options:?}");
    assert_eq!(upstream.last().uri, "*");
    tg.stop().await;
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_400_and_names_nothing_internal() {
    let (upstream, tg) = open_proxy("").await;
    let port = upstream.target().rsplit(':').next().unwrap().to_string();
    let probes: [&[u8]; 16] = [
        b"+3\r\nabc\r\n0\r\n\r\n",
        b"0x3\r\nabc\r\n0\r\n\r\n",
        b"-3\r\nabc\r\n0\r\n\r\n",
        b"fffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        b"10000000000000000\r\nabc\r\n0\r\n\r\n",
        b"3\nabc\r\n0\r\n\r\n",
        b"3\rabc\r\n0\r\n\r\n",
        b"3;a\nb\r\nabc\r\n0\r\n\r\n",
        b"3;a\rb\r\nabc\r\n0\r\n\r\n",
        b"3\r\nabcXY0\r\n\r\n",
        b"3\r\nabc0\r\n\r\n",
        b"3\r\nabc\n0\r\n\r\n",
        b"3\r\nabc\r0\r\n\r\n",
        b"z\r\nabc\r\n0\r\n\r\n",
        b"3 3\r\nabc\r\n0\r\n\r\n",
        b"\r\nabc\r\n0\r\n\r\n",
    ];
    for probe in probes {
        let mut request =
            b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        request.extend_from_slice(probe);
        let reply = exchange(tg.addr, &request).await;
        let shown = String::from_utf8_lossy(probe);
        assert_eq!(reply.status, 400, "{shown:?}: {reply:?}");
        let text = body(&reply);
        let problem: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(problem["status"], 400);
        for secret in ["127.0.0.1", port.as_str(), "chunk", "parse", "hyper"] {
            assert!(
                !text.contains(secret),
                "{shown:?}: the body names {secret:?}: {text}"
            );
        }
    }
    tg.stop().await;
}

#[tokio::test]
async fn via_names_the_protocol_received() {
    let (upstream, tg) = open_proxy("").await;
    let reply = exchange(tg.addr, b"GET /ten HTTP/1.0\r\n\r\n").await;
    assert_eq!(reply.status, 200);
    assert_eq!(upstream.last().headers["via"], "1.0 tollgate");
    let reply = get(tg.addr, "/eleven", "t").await;
    assert_eq!(reply.status, 200);
    assert_eq!(upstream.last().headers["via"], "1.1 tollgate");
    // h2c with prior knowledge.
    let stream = tokio::net::TcpStream::connect(tg.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(format!("http://{}/two", tg.addr))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.last().headers["via"], "2 tollgate");
    tg.stop().await;
}
