//! WebSocket through tollgate to an `https://` target: a plain `ws://` client (tokio-tungstenite)
//! reaches an origin that terminates TLS (a certificate of the test CA, trusted through
//! `tls.ca`) and accepts the upgrade with tokio-tungstenite; three text messages are echoed.
//! With `protocol = "http1"` the origin offers only http/1.1 in ALPN; with `protocol = "auto"`
//! it offers h2 and http/1.1, plain requests go over h2, and the upgrade must still go over a
//! connection that negotiated http/1.1 (RFC 8441 extended CONNECT is not what tollgate
//! speaks upstream).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::pki::Pki;
use common::start_tollgate;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message;

/// Bound on any single exchange.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One TLS connection as the origin saw it: the ALPN protocol negotiated and what ran on it.
#[derive(Debug, Clone, PartialEq)]
enum Session {
    /// HTTP/2 plain requests (ALPN h2).
    H2,
    /// A WebSocket handshake accepted over this ALPN protocol (None: no ALPN).
    WebSocket(Option<String>),
    /// A WebSocket handshake that failed, with the ALPN protocol and the error.
    Refused(Option<String>, String),
}

struct WsOrigin {
    addr: SocketAddr,
    sessions: Arc<Mutex<Vec<Session>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl WsOrigin {
    /// TLS offering `alpn`; a connection that negotiated h2 is served plain HTTP/2 requests
    /// (200, body "h2"), any other is handed to tokio-tungstenite's `accept_async`, which
    /// echoes text and binary messages.
    async fn start(pki: &Pki, alpn: &[&str]) -> WsOrigin {
        let leaf = pki.server("ws-origin", 20);
        let chain = CertificateDer::pem_file_iter(&leaf.chain)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&leaf.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sessions: Arc<Mutex<Vec<Session>>> = Arc::default();
        let log = sessions.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, log) = (acceptor.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let alpn = tls
                        .get_ref()
                        .1
                        .alpn_protocol()
                        .map(|p| String::from_utf8_lossy(p).into_owned());
                    if alpn.as_deref() == Some("h2") {
                        log.lock().unwrap().push(Session::H2);
                        let svc = service_fn(|_request: Request<hyper::body::Incoming>| async {
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"h2"),
                            )))
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), svc)
                            .await;
                        return;
                    }
                    let mut ws = match tokio::time::timeout(
                        IO_TIMEOUT,
                        tokio_tungstenite::accept_async(tls),
                    )
                    .await
                    {
                        Ok(Ok(ws)) => ws,
                        Ok(Err(e)) => {
                            log.lock()
                                .unwrap()
                                .push(Session::Refused(alpn, e.to_string()));
                            return;
                        }
                        Err(_) => {
                            log.lock()
                                .unwrap()
                                .push(Session::Refused(alpn, "timed out".into()));
                            return;
                        }
                    };
                    log.lock().unwrap().push(Session::WebSocket(alpn));
                    while let Ok(Some(Ok(message))) =
                        tokio::time::timeout(IO_TIMEOUT, ws.next()).await
                    {
                        let echo = matches!(message, Message::Text(_) | Message::Binary(_));
                        if message.is_close() || (echo && ws.send(message).await.is_err()) {
                            return;
                        }
                    }
                });
            }
        });
        WsOrigin {
            addr,
            sessions,
            task,
        }
    }

    fn sessions(&self) -> Vec<Session> {
        self.sessions.lock().unwrap().clone()
    }
}

fn config(origin: &WsOrigin, pki: &Pki, protocol: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nbackend = \"memory\"\n\n\
         [upstreams.api]\ntargets = [\"https://{}\"]\nprotocol = \"{protocol}\"\n\
         tls = {{ ca = \"{}\" }}\ntimeout = \"5s\"\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"api\"\n",
        origin.addr,
        pki.ca().display()
    )
}

/// A `ws://` session through tollgate: three text messages, each echoed, then a close.
async fn three_echoes(tollgate: SocketAddr) {
    let (mut ws, response) = tokio::time::timeout(
        IO_TIMEOUT,
        tokio_tungstenite::connect_async(format!("ws://{tollgate}/ws")),
    )
    .await
    .expect("WebSocket handshake within the timeout")
    .expect("WebSocket handshake through tollgate");
    assert_eq!(response.status(), 101, "{response:?}");
    for i in 0..3 {
        let text = format!("message {i} over wss upstream");
        ws.send(Message::text(text.clone())).await.unwrap();
        let back = tokio::time::timeout(IO_TIMEOUT, ws.next())
            .await
            .unwrap_or_else(|_| panic!("echo {i} within the timeout"))
            .unwrap_or_else(|| panic!("echo {i}: the session ended"))
            .unwrap_or_else(|e| panic!("echo {i}: {e}"));
        assert_eq!(back, Message::text(text), "echo {i}");
    }
    let _ = tokio::time::timeout(IO_TIMEOUT, ws.close(None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_reaches_an_https_target_offering_http11() {
    let pki = Pki::new();
    let origin = WsOrigin::start(&pki, &["http/1.1"]).await;
    let tg = start_tollgate(&config(&origin, &pki, "http1")).await;
    three_echoes(tg.addr).await;
    assert_eq!(
        origin.sessions(),
        [Session::WebSocket(Some("http/1.1".into()))],
        "one upgrade, over TLS with ALPN http/1.1"
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_with_protocol_auto_goes_over_http11_although_the_target_offers_h2() {
    let pki = Pki::new();
    let origin = WsOrigin::start(&pki, &["h2", "http/1.1"]).await;
    let tg = start_tollgate(&config(&origin, &pki, "auto")).await;

    // A plain request first: auto takes h2, and that connection is pooled.
    let tcp = TcpStream::connect(tg.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/plain")
        .header("host", "tollgate.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(IO_TIMEOUT, sender.send_request(request))
        .await
        .expect("a response within the timeout")
        .expect("a response");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), Version::HTTP_11);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"h2", "the plain request went over h2");

    // The upgrade needs HTTP/1.1: a connection of its own, ALPN http/1.1.
    three_echoes(tg.addr).await;
    // And again, after the first upgraded connection ended.
    three_echoes(tg.addr).await;
    let sessions = origin.sessions();
    assert_eq!(
        sessions
            .iter()
            .filter(|s| **s == Session::WebSocket(Some("http/1.1".into())))
            .count(),
        2,
        "{sessions:?}"
    );
    assert!(
        sessions
            .iter()
            .all(|s| matches!(s, Session::H2 | Session::WebSocket(_))),
        "no failed handshake: {sessions:?}"
    );
    assert_eq!(
        sessions.iter().filter(|s| **s == Session::H2).count(),
        1,
        "{sessions:?}"
    );
    tg.stop().await;
}
