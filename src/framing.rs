//! Request framing and head checks beyond what hyper enforces, applied before anything else:
//! exactly one Host on HTTP/1.1, and a `Transfer-Encoding` that is exactly `chunked` (never
//! together with `Content-Length`, never on HTTP/1.0). Anything a front end and a back end could
//! read differently is refused, so no second request can be smuggled past tollgate. The request
//! target is held to RFC 9112 §3.2 ([`check_target`]): a Host that is a valid `uri-host[:port]`
//! and agrees with an absolute-form target, no userinfo, `*` only for OPTIONS, the authority
//! form only for CONNECT (which tollgate does not tunnel: 405).

use http::request::Parts;
use http::{HeaderMap, Method, StatusCode, Version, header};

use crate::policy::EscapedSlashes;
use crate::route;

/// Why a request head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("more than one Host header")]
    SeveralHosts,
    #[error("HTTP/1.1 request without Host")]
    NoHost,
    #[error("Transfer-Encoding must be exactly \"chunked\"")]
    BadTransferEncoding,
    #[error("transfer coding other than chunked is not supported")]
    UnsupportedCoding,
    #[error("both Transfer-Encoding and Content-Length: ambiguous framing")]
    Ambiguous,
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingOnHttp10,
    #[error("the Host header is not a valid host[:port]")]
    BadHost,
    #[error("the Host header names another host than the request target")]
    HostMismatch,
    #[error("user information in the request target")]
    Userinfo,
    #[error("the request target \"*\" is only for OPTIONS")]
    Asterisk,
    #[error("the authority form of a request target is only for CONNECT")]
    AuthorityForm,
    #[error("CONNECT is not supported: tollgate does not open tunnels")]
    Connect,
    #[error("an escaped slash (%2F or %5C) in the path is refused by this server")]
    EscapedSlash,
    #[error("the request body is malformed")]
    MalformedBody,
}

impl FramingError {
    pub fn status(self) -> StatusCode {
        match self {
            FramingError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            FramingError::Connect => StatusCode::METHOD_NOT_ALLOWED,
            FramingError::SeveralHosts
            | FramingError::NoHost
            | FramingError::BadTransferEncoding
            | FramingError::Ambiguous
            | FramingError::TransferEncodingOnHttp10
            | FramingError::BadHost
            | FramingError::HostMismatch
            | FramingError::Userinfo
            | FramingError::Asterisk
            | FramingError::AuthorityForm
            | FramingError::EscapedSlash
            | FramingError::MalformedBody => StatusCode::BAD_REQUEST,
        }
    }
}

/// Checks a request head.
pub fn check(version: Version, headers: &HeaderMap) -> Result<(), FramingError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(FramingError::SeveralHosts),
        (None, None) if version == Version::HTTP_11 => return Err(FramingError::NoHost),
        _ => {}
    }
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    if codings.peek().is_none() {
        return Ok(());
    }
    if version == Version::HTTP_10 {
        return Err(FramingError::TransferEncodingOnHttp10);
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(FramingError::Ambiguous);
    }
    let mut chunked = 0;
    let mut other = false;
    for value in codings {
        let Ok(value) = value.to_str() else {
            return Err(FramingError::BadTransferEncoding);
        };
        for token in value.split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("chunked") {
                chunked += 1;
            } else if token.is_empty() {
                return Err(FramingError::BadTransferEncoding);
            } else {
                other = true;
            }
        }
    }
    match (chunked, other) {
        (1, false) => Ok(()),
        (1, true) => Err(FramingError::UnsupportedCoding),
        _ => Err(FramingError::BadTransferEncoding),
    }
}

/// Checks the request target and Host (RFC 9112 §3.2): the rules that keep the host and path
/// a route is matched on the same as those the upstream serves.
pub fn check_target(parts: &Parts, escaped_slashes: EscapedSlashes) -> Result<(), FramingError> {
    if parts.method == Method::CONNECT {
        return Err(FramingError::Connect);
    }
    let uri = &parts.uri;
    if let Some(authority) = uri.authority() {
        if authority.as_str().contains('@') {
            return Err(FramingError::Userinfo);
        }
        // Authority form (`GET host:80`): a target without a scheme is for CONNECT only.
        if uri.scheme().is_none() {
            return Err(FramingError::AuthorityForm);
        }
    }
    if uri.path() == "*" && parts.method != Method::OPTIONS {
        return Err(FramingError::Asterisk);
    }
    let host = match parts.headers.get(header::HOST) {
        Some(h) => {
            let text = h.to_str().map_err(|_| FramingError::BadHost)?;
            Some(route::normalize_host(text).ok_or(FramingError::BadHost)?)
        }
        None => None,
    };
    if let Some(authority) = uri.authority() {
        let target = route::normalize_host(authority.as_str()).ok_or(FramingError::BadHost)?;
        if host.is_some_and(|h| !h.eq_ignore_ascii_case(target)) {
            return Err(FramingError::HostMismatch);
        }
    }
    if escaped_slashes == EscapedSlashes::Reject && route::has_escaped_slash(uri.path()) {
        return Err(FramingError::EscapedSlash);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn head(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hosts() {
        let v11 = Version::HTTP_11;
        assert_eq!(check(v11, &head(&[])), Err(FramingError::NoHost));
        assert_eq!(check(Version::HTTP_10, &head(&[])), Ok(()));
        assert_eq!(check(Version::HTTP_2, &head(&[])), Ok(()));
        assert_eq!(
            check(v11, &head(&[("host", "a"), ("host", "b")])),
            Err(FramingError::SeveralHosts)
        );
        assert_eq!(check(v11, &head(&[("host", "a")])), Ok(()));
    }

    #[test]
    fn transfer_encoding_must_be_exactly_chunked() {
        let h = |te: &[&str]| {
            let mut pairs = vec![("host", "a")];
            pairs.extend(te.iter().map(|t| ("transfer-encoding", *t)));
            check(Version::HTTP_11, &head(&pairs))
        };
        assert_eq!(h(&["chunked"]), Ok(()));
        assert_eq!(h(&["Chunked"]), Ok(()));
        assert_eq!(
            h(&["chunked, chunked"]),
            Err(FramingError::BadTransferEncoding)
        );
        assert_eq!(
            h(&["chunked", "chunked"]),
            Err(FramingError::BadTransferEncoding)
        );
        assert_eq!(h(&[",chunked"]), Err(FramingError::BadTransferEncoding));
        assert_eq!(h(&["gzip"]), Err(FramingError::BadTransferEncoding));
        assert_eq!(h(&["gzip, chunked"]), Err(FramingError::UnsupportedCoding));
        assert_eq!(
            FramingError::UnsupportedCoding.status(),
            StatusCode::NOT_IMPLEMENTED
        );
        let both = head(&[
            ("host", "a"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
        ]);
        assert_eq!(check(Version::HTTP_11, &both), Err(FramingError::Ambiguous));
        let old = head(&[("transfer-encoding", "chunked")]);
        assert_eq!(
            check(Version::HTTP_10, &old),
            Err(FramingError::TransferEncodingOnHttp10)
        );
    }
}

/// The framing rules for an upstream response: a `Transfer-Encoding` must be exactly
/// `chunked` and never come with a `Content-Length` (hyper would decode the chunks and leave a
/// stale length behind).
pub fn check_response(headers: &HeaderMap) -> Result<(), FramingError> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return Ok(());
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(FramingError::Ambiguous);
    }
    let mut h = headers.clone();
    h.insert(header::HOST, http::HeaderValue::from_static("upstream"));
    check(Version::HTTP_11, &h)
}

/// Request heads on one connection that carried both `Content-Length` and `Transfer-Encoding`.
/// hyper resolves such a head by dropping `Content-Length` before tollgate sees it, so the
/// [`HeadScanner`] under the connection notes them and the pipeline refuses them (400).
#[derive(Debug, Default)]
pub struct AmbiguousHeads {
    /// The connection switched protocols (a 101 went out): the scanner stops.
    switched: std::sync::atomic::AtomicBool,
    any: std::sync::atomic::AtomicBool,
    heads: std::sync::Mutex<Vec<u64>>,
    next_request: std::sync::atomic::AtomicU64,
}

impl AmbiguousHeads {
    /// The connection is not HTTP/1 any more (an upgrade was accepted).
    pub fn switched(&self) {
        self.switched
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn has_switched(&self) -> bool {
        self.switched.load(std::sync::atomic::Ordering::Acquire)
    }

    fn note(&self, head: u64) {
        self.heads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(head);
        self.any.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Called once per request, in order: whether this request's head was ambiguous.
    pub fn next_is_ambiguous(&self) -> bool {
        use std::sync::atomic::Ordering;
        let index = self.next_request.fetch_add(1, Ordering::AcqRel);
        self.any.load(Ordering::Acquire)
            && self
                .heads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&index)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanState {
    /// Reading a head; `first` while no request line has been seen yet.
    Head {
        first: bool,
    },
    /// Skipping a `Content-Length` body.
    Body(u64),
    /// Chunked body: a chunk-size line.
    ChunkSize,
    /// Chunked body: chunk data, then its CRLF.
    ChunkData(u64),
    ChunkEnd,
    /// Chunked body: trailer lines up to an empty one.
    Trailers,
    /// Not HTTP/1 any more (an upgrade, an error): stop looking.
    Done,
}

/// Follows the HTTP/1 message boundaries of a client's byte stream just enough to see each
/// request head's framing headers, at the cost of a scan for line ends (bodies are skipped by
/// length). Anything it cannot follow stops it; hyper rejects such input anyway.
pub struct HeadScanner {
    state: ScanState,
    head: u64,
    line: [u8; 40],
    line_len: usize,
    content_length: Option<u64>,
    chunked: bool,
}

impl Default for HeadScanner {
    fn default() -> Self {
        HeadScanner {
            state: ScanState::Head { first: true },
            head: 0,
            line: [0; 40],
            line_len: 0,
            content_length: None,
            chunked: false,
        }
    }
}

fn starts_with_ignore_case(line: &[u8], name: &[u8]) -> bool {
    line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name)
}

impl HeadScanner {
    /// Feeds bytes as they are read from the client.
    pub fn feed(&mut self, mut bytes: &[u8], log: &AmbiguousHeads) {
        if log.has_switched() {
            self.state = ScanState::Done;
        }
        while !bytes.is_empty() {
            match self.state {
                ScanState::Done => return,
                ScanState::Body(left) => {
                    let take = (left.min(bytes.len() as u64)) as usize;
                    bytes = &bytes[take..];
                    self.state = if left - take as u64 == 0 {
                        ScanState::Head { first: true }
                    } else {
                        ScanState::Body(left - take as u64)
                    };
                }
                ScanState::ChunkData(left) => {
                    let take = (left.min(bytes.len() as u64)) as usize;
                    bytes = &bytes[take..];
                    self.state = if left - take as u64 == 0 {
                        ScanState::ChunkEnd
                    } else {
                        ScanState::ChunkData(left - take as u64)
                    };
                }
                _ => {
                    // Line-oriented states: collect up to the next '\n'.
                    let end = bytes.iter().position(|&b| b == b'\n');
                    let chunk = &bytes[..end.unwrap_or(bytes.len())];
                    let room = self.line.len() - self.line_len;
                    let keep = chunk.len().min(room);
                    self.line[self.line_len..self.line_len + keep].copy_from_slice(&chunk[..keep]);
                    self.line_len += keep;
                    match end {
                        None => return,
                        Some(i) => {
                            bytes = &bytes[i + 1..];
                            let mut len = self.line_len;
                            if len > 0 && self.line[len - 1] == b'\r' {
                                len -= 1;
                            }
                            let line = self.line;
                            self.line_len = 0;
                            self.line_done(&line[..len], log);
                        }
                    }
                }
            }
        }
    }

    fn line_done(&mut self, line: &[u8], log: &AmbiguousHeads) {
        match self.state {
            ScanState::Head { first: true } => {
                if !line.is_empty() {
                    self.state = ScanState::Head { first: false };
                }
            }
            ScanState::Head { first: false } if line.is_empty() => self.head_done(log),
            ScanState::Head { first: false } => {
                if starts_with_ignore_case(line, b"content-length:") {
                    let value = line[b"content-length:".len()..].trim_ascii();
                    let parsed = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
                    self.content_length = Some(parsed.unwrap_or(u64::MAX));
                } else if starts_with_ignore_case(line, b"transfer-encoding:") {
                    self.chunked = true;
                }
            }
            ScanState::ChunkSize => {
                let digits: &[u8] = line
                    .split(|&b| b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                match std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| u64::from_str_radix(d, 16).ok())
                {
                    Some(0) => self.state = ScanState::Trailers,
                    Some(n) => self.state = ScanState::ChunkData(n),
                    None => self.state = ScanState::Done,
                }
            }
            ScanState::ChunkEnd => {
                self.state = if line.is_empty() {
                    ScanState::ChunkSize
                } else {
                    ScanState::Done
                };
            }
            ScanState::Trailers if line.is_empty() => self.state = ScanState::Head { first: true },
            ScanState::Trailers => {}
            ScanState::Body(_) | ScanState::ChunkData(_) | ScanState::Done => {}
        }
    }

    fn head_done(&mut self, log: &AmbiguousHeads) {
        let head = self.head;
        self.head += 1;
        let (length, chunked) = (self.content_length.take(), self.chunked);
        self.chunked = false;
        self.state = match (length, chunked) {
            // Refused, and hyper closes such a connection after answering: nothing follows.
            (Some(_), true) => {
                log.note(head);
                ScanState::Done
            }
            // An upgrade request that is refused (its protocol is not allowed, or the upstream
            // said no) leaves the connection HTTP/1, so it is followed like any other; one that
            // is accepted stops the scanner through `AmbiguousHeads::switched`.
            (_, true) => ScanState::ChunkSize,
            (Some(u64::MAX), false) => ScanState::Done,
            (Some(0) | None, false) => ScanState::Head { first: true },
            (Some(n), false) => ScanState::Body(n),
        };
    }
}

#[cfg(test)]
mod scanner_tests {
    use super::*;

    fn ambiguous_heads(stream: &[u8], split: usize) -> Vec<bool> {
        let log = AmbiguousHeads::default();
        let mut s = HeadScanner::default();
        for piece in stream.chunks(split.max(1)) {
            s.feed(piece, &log);
        }
        (0..4).map(|_| log.next_is_ambiguous()).collect()
    }

    #[test]
    fn finds_both_framing_headers_in_either_order() {
        for split in [1, 3, 7, 1000] {
            let cl_te = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
            assert_eq!(
                ambiguous_heads(cl_te, split),
                [true, false, false, false],
                "{split}"
            );
            let te_cl =
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-length: 5\r\n\r\n";
            assert_eq!(
                ambiguous_heads(te_cl, split),
                [true, false, false, false],
                "{split}"
            );
        }
    }

    #[test]
    fn follows_bodies_to_the_next_head() {
        // Bodies that look like heads must be skipped, not read as heads.
        let fake = "Transfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n";
        let chunk = format!("Content-Length: 9\r\n{fake}");
        let stream = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n{fake}\
POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n{:X}\r\n{chunk}\r\n0\r\nX-Trailer: 1\r\n\r\n\
GET /c HTTP/1.1\r\nHost: a\r\n\r\n\
POST /d HTTP/1.1\r\nContent-Length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            fake.len(),
            chunk.len()
        );
        for split in [1, 2, 5, 13, 4096] {
            assert_eq!(
                ambiguous_heads(stream.as_bytes(), split),
                [false, false, false, true],
                "{split}"
            );
        }
    }

    #[test]
    fn stops_at_upgrades_and_garbage() {
        let upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(ambiguous_heads(upgrade, 3), [false, false, false, false]);
        // An upgrade that was refused leaves the connection HTTP/1: a smuggling head behind it
        // is still seen. Once a 101 went out, nothing more is read as HTTP/1.
        let refused = b"GET /ws HTTP/1.1\r\nUpgrade: h2c\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(ambiguous_heads(refused, 5), [false, true, false, false]);
        let log = AmbiguousHeads::default();
        let mut s = HeadScanner::default();
        s.feed(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", &log);
        log.switched();
        s.feed(
            &refused[b"GET /ws HTTP/1.1\r\nUpgrade: h2c\r\n\r\n".len()..],
            &log,
        );
        assert!(!(0..4).any(|_| log.next_is_ambiguous()));
        let bad = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(ambiguous_heads(bad, 3), [false, false, false, false]);
    }
}
