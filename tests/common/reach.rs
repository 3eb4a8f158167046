//! Origins tollgate reaches over TLS and HTTP/2 (tests/upstream.rs): hyper servers on
//! 127.0.0.1:0 speaking HTTP/1.1 or h2c by prior knowledge in clear, or TLS (tokio-rustls) with
//! the ALPN list a test gives and HTTP/2 or HTTP/1.1 by what was negotiated, optionally
//! demanding a client certificate of a CA. Each records, per connection, what its handshake
//! said (SNI, ALPN, the client certificate's CN, full or resumed) and, per request, the HTTP
//! version and headers; a TLS origin also counts connections that opened with something other
//! than a TLS record (a plaintext fallback would show there).
//!
//! Every path answers `200` with the request's HTTP version as the body, except
//! `/hold/N` (answers once N such requests are in flight at once, or after 5 s; `x-held-all`
//! says which) and `/echo.Echo/*`, a gRPC echo service framed by hand: `Unary`, `ServerStream`
//! (N copies, N the first byte of the message), `ClientStream` (all messages concatenated),
//! `Bidi` (each message echoed as it arrives) and `Slow` (3 s before the response head), every
//! reply closed with the trailers `grpc-status: 0` and `x-echo-trailer: yes`.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{HandshakeKind, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;

use super::pki::{Leaf, Pki, Usage};

/// The first byte of every TLS connection a client opens (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Bound on any wait of an origin: the first bytes of a connection, a handshake, a body frame.
const IO_LIMIT: Duration = Duration::from_secs(10);
/// How long `/hold/N` waits for the other N - 1 requests.
const HOLD_LIMIT: Duration = Duration::from_secs(5);
/// How long `/echo.Echo/Slow` waits before its response head.
pub const SLOW: Duration = Duration::from_secs(3);

type Body = BoxBody<Bytes, Infallible>;

/// One accepted connection, as the origin saw it after its handshake.
#[derive(Debug, Clone, Default)]
pub struct Conn {
    pub tls: bool,
    /// The server name the client sent (SNI); none for a client that dialled an IP address.
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// The common name of the client certificate, when one was presented.
    pub client_cn: Option<String>,
    pub handshake: Option<HandshakeKind>,
}

/// One request, as the origin received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Index into [`Origin::conns`].
    pub conn: usize,
    pub version: Version,
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
}

/// What an origin recorded, shared with its connection tasks.
pub struct Record {
    /// TCP connections accepted.
    pub accepted: AtomicUsize,
    /// On a TLS origin: connections whose first byte was not a TLS handshake record.
    pub plaintext: AtomicUsize,
    /// On a TLS origin: handshakes that failed or timed out.
    pub failed_handshakes: AtomicUsize,
    pub conns: Mutex<Vec<Conn>>,
    pub requests: Mutex<Vec<Seen>>,
    /// `/hold/N` requests in flight.
    held: watch::Sender<usize>,
}

impl Record {
    fn new() -> Record {
        Record {
            accepted: AtomicUsize::new(0),
            plaintext: AtomicUsize::new(0),
            failed_handshakes: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            requests: Mutex::new(Vec::new()),
            held: watch::Sender::new(0),
        }
    }

    fn push_conn(&self, conn: Conn) -> usize {
        let mut conns = self.conns.lock().unwrap();
        conns.push(conn);
        conns.len() - 1
    }
}

/// A running origin, stopped (its accept loop) on drop.
pub struct Origin {
    pub addr: SocketAddr,
    pub record: Arc<Record>,
    task: tokio::task::JoinHandle<()>,
}

/// How an origin serves; made by [`Origin::http1`], [`Origin::h2c`] or [`Origin::tls`].
pub struct OriginBuilder {
    tls: Option<TlsSetup>,
    h2c: bool,
    close: bool,
}

struct TlsSetup {
    chain: PathBuf,
    key: PathBuf,
    alpn: Vec<Vec<u8>>,
    client_ca: Option<PathBuf>,
}

impl Origin {
    /// HTTP/1.1 in clear.
    pub fn http1() -> OriginBuilder {
        OriginBuilder {
            tls: None,
            h2c: false,
            close: false,
        }
    }

    /// HTTP/2 in clear by prior knowledge only (an HTTP/1.1 request fails the connection).
    pub fn h2c() -> OriginBuilder {
        OriginBuilder {
            tls: None,
            h2c: true,
            close: false,
        }
    }

    /// TLS with `leaf`'s chain and key, offering `alpn` (e.g. `["h2", "http/1.1"]`); HTTP/2 when
    /// "h2" was negotiated, HTTP/1.1 otherwise.
    pub fn tls(leaf: &Leaf, alpn: &[&str]) -> OriginBuilder {
        OriginBuilder {
            tls: Some(TlsSetup {
                chain: leaf.chain.clone(),
                key: leaf.key.clone(),
                alpn: alpn.iter().map(|p| p.as_bytes().to_vec()).collect(),
                client_ca: None,
            }),
            h2c: false,
            close: false,
        }
    }

    pub fn https(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn accepted(&self) -> usize {
        self.record.accepted.load(Ordering::SeqCst)
    }

    pub fn plaintext(&self) -> usize {
        self.record.plaintext.load(Ordering::SeqCst)
    }

    pub fn failed_handshakes(&self) -> usize {
        self.record.failed_handshakes.load(Ordering::SeqCst)
    }

    pub fn conns(&self) -> Vec<Conn> {
        self.record.conns.lock().unwrap().clone()
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.record.requests.lock().unwrap().clone()
    }

    /// The last request received, with its connection.
    pub fn last(&self) -> (Seen, Conn) {
        let seen = self
            .requests()
            .last()
            .cloned()
            .expect("a request reached the origin");
        let conn = self.conns()[seen.conn].clone();
        (seen, conn)
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OriginBuilder {
    /// Demands a client certificate signed by the CA in `ca` (PEM).
    pub fn client_ca(mut self, ca: &Path) -> OriginBuilder {
        self.tls
            .as_mut()
            .expect("client certificates need a TLS origin")
            .client_ca = Some(ca.to_path_buf());
        self
    }

    /// Answers every HTTP/1.1 request with `connection: close`, so each connection carries one
    /// request.
    pub fn close_each(mut self) -> OriginBuilder {
        self.close = true;
        self
    }

    pub async fn start(self) -> Origin {
        let acceptor = self.tls.as_ref().map(server_config).map(TlsAcceptor::from);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record = Arc::new(Record::new());
        let shared = record.clone();
        let (h2c, close) = (self.h2c, self.close);
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let record = shared.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        None => {
                            let conn = record.push_conn(Conn::default());
                            serve(TokioIo::new(tcp), h2c, record, conn, close).await;
                        }
                        Some(acceptor) => serve_tls(tcp, acceptor, record, close).await,
                    }
                });
            }
        });
        Origin { addr, record, task }
    }
}

fn server_config(setup: &TlsSetup) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = pem_certs(&setup.chain);
    let key = PrivateKeyDer::from_pem_file(&setup.key).expect("test key");
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match &setup.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in pem_certs(ca) {
                roots.add(cert).unwrap();
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    // The default server config keeps sessions in memory (TLS 1.3 stateful tickets), so a
    // client that kept its session can resume.
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = setup.alpn.clone();
    Arc::new(config)
}

fn pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn serve_tls(tcp: TcpStream, acceptor: TlsAcceptor, record: Arc<Record>, close: bool) {
    // Looked at before the handshake: a client that fell back to plaintext sends a request
    // line where a TLS client sends a handshake record.
    let mut first = [0u8; 1];
    match tokio::time::timeout(IO_LIMIT, tcp.peek(&mut first)).await {
        Ok(Ok(1..)) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(Ok(1..)) => {
            record.plaintext.fetch_add(1, Ordering::SeqCst);
            return;
        }
        _ => return,
    }
    let tls = match tokio::time::timeout(IO_LIMIT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        _ => {
            record.failed_handshakes.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    let (_, server) = tls.get_ref();
    let conn = Conn {
        tls: true,
        sni: server.server_name().map(str::to_string),
        alpn: server
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        client_cn: server
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| common_name(cert)),
        handshake: server.handshake_kind(),
    };
    let h2 = conn.alpn.as_deref() == Some("h2");
    let index = record.push_conn(conn);
    serve(TokioIo::new(tls), h2, record, index, close).await;
}

async fn serve<I>(io: I, h2: bool, record: Arc<Record>, conn: usize, close: bool)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |request| handle(request, record.clone(), conn, close));
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await;
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

async fn handle(
    request: Request<Incoming>,
    record: Arc<Record>,
    conn: usize,
    close: bool,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_string();
    let version = request.version();
    record.requests.lock().unwrap().push(Seen {
        conn,
        version,
        method: request.method().to_string(),
        path: path.clone(),
        headers: request.headers().clone(),
    });
    if let Some(method) = path.strip_prefix("/echo.Echo/") {
        return Ok(grpc(method.to_string(), request).await);
    }
    let held_all = match path.strip_prefix("/hold/") {
        Some(n) => Some(hold(&record, n.parse().unwrap_or(1)).await),
        None => None,
    };
    let _ = tokio::time::timeout(IO_LIMIT, request.into_body().collect()).await;
    let mut response = Response::new(full(format!("{version:?}")));
    if let Some(all) = held_all {
        let all = if all { "yes" } else { "no" };
        response
            .headers_mut()
            .insert("x-held-all", HeaderValue::from_static(all));
    }
    // HTTP/2 has no connection header (RFC 9113 §8.2.2).
    if close && version < Version::HTTP_2 {
        response
            .headers_mut()
            .insert("connection", HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// Waits until `n` `/hold/` requests are in flight at once: whether they were, within
/// [`HOLD_LIMIT`].
async fn hold(record: &Record, n: usize) -> bool {
    record.held.send_modify(|held| *held += 1);
    let mut rx = record.held.subscribe();
    tokio::time::timeout(HOLD_LIMIT, rx.wait_for(|held| *held >= n))
        .await
        .is_ok()
}

// ---------------------------------------------------------------------------------------------
// gRPC echo
// ---------------------------------------------------------------------------------------------

/// A response body fed frame by frame from a channel (data, then trailers).
struct FrameBody(mpsc::Receiver<Frame<Bytes>>);

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// A gRPC message with its 5-byte prefix: uncompressed, big-endian length.
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// The next whole message in `buf`, taken off it.
fn next_message(buf: &mut BytesMut) -> Option<Bytes> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(buf.split_to(len).freeze())
}

async fn grpc(method: String, request: Request<Incoming>) -> Response<Body> {
    if method == "Slow" {
        tokio::time::sleep(SLOW).await;
    }
    let known = matches!(
        method.as_str(),
        "Unary" | "ServerStream" | "ClientStream" | "Bidi" | "Slow"
    );
    let (tx, rx) = mpsc::channel(16);
    let mut body = request.into_body();
    tokio::spawn(async move {
        let mut buf = BytesMut::new();
        let mut gathered = BytesMut::new();
        // Messages are answered as they arrive, so a bidirectional call interleaves.
        while let Ok(Some(Ok(frame))) = tokio::time::timeout(IO_LIMIT, body.frame()).await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(message) = next_message(&mut buf) {
                let copies = match method.as_str() {
                    "ServerStream" => message.first().copied().unwrap_or(0) as usize,
                    "ClientStream" => {
                        gathered.extend_from_slice(&message);
                        0
                    }
                    _ if known => 1,
                    _ => 0,
                };
                for _ in 0..copies {
                    if tx.send(Frame::data(grpc_frame(&message))).await.is_err() {
                        return;
                    }
                }
            }
        }
        if method == "ClientStream" && tx.send(Frame::data(grpc_frame(&gathered))).await.is_err() {
            return;
        }
        let mut trailers = HeaderMap::new();
        let status = if known { "0" } else { "12" };
        trailers.insert("grpc-status", HeaderValue::from_static(status));
        trailers.insert("x-echo-trailer", HeaderValue::from_static("yes"));
        let _ = tx.send(Frame::trailers(trailers)).await;
    });
    Response::builder()
        .header("content-type", "application/grpc")
        .body(FrameBody(rx).boxed())
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// The subject common name of a DER certificate: the value after the last id-at-commonName
/// (2.5.4.3), since the subject follows the issuer in a TBSCertificate and the extensions
/// rcgen writes hold no such attribute. Enough for the certificates these tests make.
pub fn common_name(der: &[u8]) -> Option<String> {
    const CN_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x04, 0x03];
    let at = der.windows(CN_OID.len()).rposition(|w| w == CN_OID)? + CN_OID.len();
    let (_tag, len) = (*der.get(at)?, *der.get(at + 1)? as usize);
    if len >= 0x80 {
        return None;
    }
    let value = der.get(at + 2..at + 2 + len)?;
    Some(String::from_utf8_lossy(value).into_owned())
}

/// A server certificate for 127.0.0.1 and localhost signed by `pki`'s CA that expired at the
/// start of 2021 (valid through 2020), as `NAME.pem`, `NAME-chain.pem`, `NAME.key` in the
/// PKI's directory. The CA's issuer is rebuilt from `ca.key` and the subject
/// tests/common/pki.rs gives it, so the chain is the CA's own.
pub fn expired_server(pki: &Pki, name: &str, serial: u64) -> Leaf {
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.path("ca.key")).unwrap())
        .expect("the test CA's key");
    let issuer = rcgen::Issuer::new(ca_params("tollgate test CA"), key);
    let ca_pem = std::fs::read_to_string(pki.ca()).unwrap();
    server_leaf(pki, name, serial, &issuer, &ca_pem, true)
}

/// A server certificate for 127.0.0.1 and localhost, valid now, signed by a CA of its own
/// ("stranger test CA") that no test trusts, files as [`expired_server`]'s. (A second
/// [`Pki`] would not do: its CA has the same name as the trusted one, so a verifier finds
/// that anchor and reports a bad signature, not an unknown issuer.)
pub fn foreign_server(pki: &Pki, name: &str, serial: u64) -> Leaf {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = ca_params("stranger test CA");
    let ca_pem = params.self_signed(&key).unwrap().pem();
    let issuer = rcgen::Issuer::new(params, key);
    server_leaf(pki, name, serial, &issuer, &ca_pem, false)
}

fn ca_params(common_name: &str) -> rcgen::CertificateParams {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, common_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca
}

fn server_leaf(
    pki: &Pki,
    name: &str,
    serial: u64,
    issuer: &rcgen::Issuer<'_, rcgen::KeyPair>,
    ca_pem: &str,
    expired: bool,
) -> Leaf {
    use rcgen::{CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, date_time_ymd};
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("tollgate {name}"));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![Usage::ServerAuth];
    params.serial_number = Some(serial.into());
    if expired {
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, issuer).unwrap();
    let leaf = Leaf {
        cert: pki.path(&format!("{name}.pem")),
        chain: pki.path(&format!("{name}-chain.pem")),
        key: pki.path(&format!("{name}.key")),
        der: cert.der().to_vec(),
    };
    std::fs::write(&leaf.cert, cert.pem()).unwrap();
    std::fs::write(&leaf.chain, format!("{}{ca_pem}", cert.pem())).unwrap();
    std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
    leaf
}
