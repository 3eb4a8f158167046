//! Route matching: the first route, in file order, whose `match` holds for the request.
//!
//! Hosts and paths are compared as backends read them, so that no spelling of a limited
//! resource selects another route while the backend serves the limited one:
//! - the host without its port (only when it is a valid port) and with one trailing dot
//!   removed (`limited.example.:80` is `limited.example`);
//! - the path percent-decoded for unreserved characters and for `%2F` / `%5C` (both read as
//!   `/`, as is a bare `\`), repeated slashes merged, `.` and `..` segments resolved after
//!   decoding (`/x/..%2flogin` is `/login`).
//!
//! The request is forwarded with its path exactly as received.

use std::borrow::Cow;

use http::request::Parts;
use http::{HeaderMap, Method, Uri, header};

use crate::policy::{Matcher, Policy, Route};

/// What matching looks at, taken from the request once.
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Host without port, as received (Host header, or the URI authority for HTTP/2).
    pub host: Option<&'a str>,
    /// Normalised path.
    pub path: Cow<'a, str>,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    pub fn new(parts: &'a Parts) -> Self {
        RequestView {
            method: &parts.method,
            host: request_host(&parts.uri, &parts.headers).and_then(normalize_host),
            path: normalize_path(parts.uri.path()),
            headers: &parts.headers,
        }
    }
}

/// The host a request is for: the Host header, else the URI authority (HTTP/2 `:authority`,
/// or an absolute-form HTTP/1 target).
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    if let Some(authority) = uri.authority() {
        return Some(authority.as_str());
    }
    headers.get(header::HOST).and_then(|h| h.to_str().ok())
}

/// A `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2) as backends read it for virtual
/// hosting: the name without its port and without one trailing dot (`example.com.:80` →
/// `example.com`, `[::1]:8080` → `::1`). None when it is not a valid host: a reg-name with a
/// character outside unreserved / pct-encoded / sub-delims, a bad IPv6 literal, a port that is
/// not 0–65535 (`example.com:abc`), or userinfo.
pub fn normalize_host(host: &str) -> Option<&str> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (literal, after) = rest.split_once(']')?;
        literal.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        return valid_port(port).then_some(literal);
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if !valid_port(port) || !name.bytes().all(is_reg_name_byte) {
        return None;
    }
    Some(name.strip_suffix('.').unwrap_or(name))
}

/// `port = *DIGIT`, and a number a TCP port can be.
fn valid_port(port: Option<&str>) -> bool {
    match port {
        None | Some("") => true,
        Some(p) => {
            p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
        }
    }
}

/// unreserved / pct-encoded (its `%` and hex digits) / sub-delims.
fn is_reg_name_byte(b: u8) -> bool {
    is_unreserved(b) || b == b'%' || b"!$&'()*+,;=".contains(&b)
}

/// Whether a path carries `%2F` or `%5C` (any case).
pub fn has_escaped_slash(path: &str) -> bool {
    path.as_bytes().windows(3).any(|w| {
        w[0] == b'%'
            && (w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f')
                || w[1] == b'5' && w[2].eq_ignore_ascii_case(&b'c'))
    })
}

impl Policy {
    /// The route for a request, if any, with its index in `routes`.
    pub fn route_for(&self, request: &RequestView<'_>) -> Option<(usize, &Route)> {
        self.routes
            .iter()
            .enumerate()
            .find(|(_, r)| r.matcher.matches(request))
    }
}

impl Matcher {
    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        if let Some(host) = &self.host {
            match request.host {
                Some(h) if h.eq_ignore_ascii_case(host) => {}
                _ => return false,
            }
        }
        if let Some(path) = &self.path
            && request.path != path.as_str()
        {
            return false;
        }
        if let Some(prefix) = &self.path_prefix
            && !prefix_matches(prefix, &request.path)
        {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.contains(request.method) {
            return false;
        }
        self.headers.iter().all(|(name, value)| {
            request
                .headers
                .get_all(name)
                .iter()
                .any(|v| v.as_bytes() == value.as_bytes())
        })
    }
}

/// Segment-aware prefix: `/seg` (or `/seg/`) matches `/seg` and `/seg/x`, not `/segment`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalises a path for matching (RFC 3986 §6.2.2 plus what backends do): decodes `%XX` of
/// unreserved characters, reads `%2F`, `%5C` and `\` as `/`, merges repeated slashes, removes
/// `.` and `..` segments (never above the root) after decoding. Other escapes stay, in upper
/// case. Borrows when already normal.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let needs_work = bytes.is_empty()
        || bytes[0] != b'/'
        || bytes.windows(2).any(|w| w == b"//" || w == b"/.")
        || bytes.contains(&b'%')
        || bytes.contains(&b'\\');
    if !needs_work {
        return Cow::Borrowed(path);
    }
    // Decode unreserved escapes first, so that `%2e%2e` is a `..` segment.
    let mut decoded = Vec::with_capacity(bytes.len() + 1);
    if bytes.first() != Some(&b'/') {
        decoded.push(b'/');
    }
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            let c = h * 16 + l;
            if is_unreserved(c) {
                decoded.push(c);
            } else if c == b'/' || c == b'\\' {
                decoded.push(b'/');
            } else {
                decoded.push(b'%');
                decoded.push(bytes[i + 1].to_ascii_uppercase());
                decoded.push(bytes[i + 2].to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        decoded.push(if bytes[i] == b'\\' { b'/' } else { bytes[i] });
        i += 1;
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    let trailing_slash =
        decoded.ends_with(b"/") || decoded.ends_with(b"/.") || decoded.ends_with(b"/..");
    for segment in decoded.split(|&b| b == b'/') {
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        // Only ASCII was decoded; the rest of the bytes came from a valid &str.
        out.push_str(std::str::from_utf8(s).unwrap_or(""));
    }
    if out.is_empty() || (trailing_slash && !segments.is_empty()) {
        out.push('/');
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
    use std::path::Path;

    fn policy(routes: &str) -> Policy {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.api]\ntargets = [\"http://127.0.0.1:1\"]\n{routes}"
        );
        config::parse(&text, "test.toml", Path::new(".")).expect("valid config")
    }

    fn route_name(p: &Policy, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<String> {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let (parts, _) = builder.body(()).unwrap().into_parts();
        let view = RequestView::new(&parts);
        p.route_for(&view).map(|(_, r)| r.name.to_string())
    }

    #[test]
    fn first_matching_route_wins() {
        let p = policy(
            r#"
[[routes]]
name = "login"
upstream = "api"
match = { path = "/login", methods = ["POST"] }
[[routes]]
name = "v1"
upstream = "api"
match = { path_prefix = "/v1/" }
[[routes]]
name = "admin"
upstream = "api"
match = { host = "Admin.Example.com", headers = { x-team = "ops" } }
[[routes]]
name = "rest"
upstream = "api"
"#,
        );
        let r = |m, u, h: &[(&str, &str)]| route_name(&p, m, u, h);
        assert_eq!(r("POST", "/login", &[]).as_deref(), Some("login"));
        assert_eq!(r("GET", "/login", &[]).as_deref(), Some("rest"));
        assert_eq!(r("POST", "/login/x", &[]).as_deref(), Some("rest"));
        assert_eq!(r("GET", "/v1/users", &[]).as_deref(), Some("v1"));
        assert_eq!(r("GET", "/v1", &[]).as_deref(), Some("v1"));
        assert_eq!(r("GET", "/v10/users", &[]).as_deref(), Some("rest"));
        let admin = [("host", "admin.example.COM:8443"), ("x-team", "ops")];
        assert_eq!(r("GET", "/", &admin).as_deref(), Some("admin"));
        let wrong_team = [("host", "admin.example.com"), ("x-team", "dev")];
        assert_eq!(r("GET", "/", &wrong_team).as_deref(), Some("rest"));
        // HTTP/2 requests carry the host in the URI authority.
        assert_eq!(
            r("GET", "https://admin.example.com/x", &[("x-team", "ops")]).as_deref(),
            Some("admin")
        );
    }

    #[test]
    fn path_prefix_is_segment_aware() {
        assert!(prefix_matches("/seg", "/seg"));
        assert!(prefix_matches("/seg", "/seg/x"));
        assert!(prefix_matches("/seg/", "/seg/x"));
        assert!(!prefix_matches("/seg", "/segment"));
        assert!(!prefix_matches("/seg/", "/segment"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn no_route_when_nothing_matches() {
        let p = policy("[[routes]]\nname = \"a\"\nupstream = \"api\"\nmatch = { path = \"/a\" }\n");
        assert_eq!(route_name(&p, "GET", "/b", &[]), None);
    }

    #[test]
    fn normalisation_defeats_evasion() {
        for (raw, normal) in [
            ("/login", "/login"),
            ("//login", "/login"),
            ("/v1/../login", "/login"),
            ("/./login", "/login"),
            ("/%6cogin", "/login"),
            ("/%2e%2e/login", "/login"),
            ("/a/b/../../login", "/login"),
            ("/../../login", "/login"),
            ("/v1/", "/v1/"),
            ("/v1/x/.", "/v1/x/"),
            ("/", "/"),
            ("/a%2Fb", "/a/b"),
            ("/a%2fb", "/a/b"),
            ("/%2flogin", "/login"),
            ("/x/..%2flogin", "/login"),
            ("/x/..%5clogin", "/login"),
            ("/x\\..\\login", "/login"),
            ("/%2e%2e%2flogin", "/login"),
            ("/a%3Fb", "/a%3Fb"),
            ("/100%", "/100%"),
            ("/%zz", "/%zz"),
        ] {
            assert_eq!(normalize_path(raw), normal, "{raw}");
        }
        assert!(matches!(normalize_path("/plain/path"), Cow::Borrowed(_)));
    }

    #[test]
    fn hosts_as_backends_read_them() {
        for (raw, normal) in [
            ("limited.example", Some("limited.example")),
            ("limited.example.", Some("limited.example")),
            ("limited.example.:80", Some("limited.example")),
            ("limited.example:", Some("limited.example")),
            ("limited.example..", Some("limited.example.")),
            ("limited.example:abc", None),
            ("limited.example:99999", None),
            ("user:pw@free.example", None),
            ("a b", None),
            ("a/b", None),
            ("[::1]:8080", Some("::1")),
            ("[::1]", Some("::1")),
            ("[zz]", None),
            ("[::1]x", None),
            ("127.0.0.1:8080", Some("127.0.0.1")),
            ("", Some("")),
        ] {
            assert_eq!(normalize_host(raw), normal, "{raw:?}");
        }
        assert!(has_escaped_slash("/a%2fb"));
        assert!(has_escaped_slash("/a%5Cb"));
        assert!(!has_escaped_slash("/a%25b/"));
    }
}
