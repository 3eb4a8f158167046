//! Who is asking: the client IP (with the trusted-proxy walk of `Forwarded` /
//! `X-Forwarded-For`) and the identity each limit counts under, hashed to a fixed 16 bytes so
//! that no API key or header value is ever stored in clear.

use std::net::IpAddr;

use http::request::Parts;
use http::{HeaderMap, header};
use ipnet::IpNet;

use crate::policy::{KeySource, KeySpec};

/// A hashed identity: the part of a store key that names who is counted.
pub type Tag = [u8; 16];

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// Whether `ip` is one of the trusted proxies.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|net| net.contains(&ip))
}

/// The client address. The TCP peer, unless the peer is a trusted proxy: then the right-most
/// address in `Forwarded` (preferred when it names any `for=`) or `X-Forwarded-For` that is not
/// itself trusted. An entry that is not an address (garbage, `unknown`, an obfuscated name) ends
/// the walk: the last trusted hop before it is the client, because nothing left of it can be
/// believed. Headers from an untrusted peer are never read, so spoofing them changes nothing.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    if trusted.is_empty() || !is_trusted(peer, trusted) {
        return peer;
    }
    let forwarded = forwarded_for(headers);
    let chain: Vec<&str> = if !forwarded.is_empty() {
        forwarded
    } else {
        headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    };
    let mut client = peer;
    for entry in chain.iter().rev() {
        let Some(ip) = parse_node(entry) else {
            return client;
        };
        client = ip.to_canonical();
        if !is_trusted(client, trusted) {
            return client;
        }
    }
    client
}

/// The `for=` values of every `Forwarded` header line, in order (RFC 7239).
fn forwarded_for(headers: &HeaderMap) -> Vec<&str> {
    let mut out = Vec::new();
    for value in headers.get_all(header::FORWARDED) {
        let Ok(value) = value.to_str() else { continue };
        for element in value.split(',') {
            for pair in element.split(';') {
                if let Some((name, v)) = pair.trim().split_once('=')
                    && name.trim().eq_ignore_ascii_case("for")
                {
                    out.push(v.trim().trim_matches('"'));
                }
            }
        }
    }
    out
}

/// An address from a forwarding header: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:443`.
fn parse_node(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, _) = rest.split_once(']')?;
        return inside.parse().ok();
    }
    let (host, port) = text.rsplit_once(':')?;
    if port.bytes().all(|b| b.is_ascii_digit()) {
        host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
    } else {
        None
    }
}

/// The client IP as counted: IPv4 as is, IPv6 truncated to `ipv6_prefix` bits (one /64 is one
/// subscriber; counting single addresses would let a client rotate through 2^64 of them).
pub fn counted_ip(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let mask = if ipv6_prefix >= 128 {
                u128::MAX
            } else {
                !(u128::MAX >> ipv6_prefix)
            };
            IpAddr::V6((bits & mask).into())
        }
    }
}

/// What a request offers for key derivation, prepared once per request.
pub struct Subject<'a> {
    pub parts: &'a Parts,
    /// The client IP after the trusted-proxy walk and IPv6 truncation.
    pub ip: IpAddr,
    /// The consumer's name, when the request named a known one.
    pub consumer: Option<&'a str>,
    /// The claims of the request's verified JWT, if it has one.
    pub claims: Option<&'a crate::jwt::Claims>,
}

fn update_ip(h: &mut blake3::Hasher, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            h.update(b"4");
            h.update(&v4.octets());
        }
        IpAddr::V6(v6) => {
            h.update(b"6");
            h.update(&v6.octets());
        }
    }
}

fn update_field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u32).to_le_bytes());
    h.update(bytes);
}

/// The first non-empty value of query parameter `name`, decoded.
pub(crate) fn query_value<'a>(parts: &'a Parts, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let query = parts.uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
}

/// The hashed identity of `spec` for this request. A source that is absent (no such header,
/// an empty value, no such query parameter, no known consumer) is replaced by the client IP,
/// so leaving a header out never escapes a limit.
pub fn tag(spec: &KeySpec, subject: &Subject<'_>) -> Tag {
    let mut h = blake3::Hasher::new();
    h.update(b"tollgate/identity/1");
    for source in &spec.0 {
        match source {
            KeySource::Ip => update_ip(&mut h, subject.ip),
            KeySource::Global => {
                h.update(b"g");
            }
            KeySource::Header(name) => {
                let mut values = subject
                    .parts
                    .headers
                    .get_all(name)
                    .iter()
                    .filter(|v| !v.is_empty())
                    .peekable();
                if values.peek().is_none() {
                    update_ip(&mut h, subject.ip);
                    continue;
                }
                h.update(b"h");
                update_field(&mut h, name.as_str().as_bytes());
                for v in values {
                    update_field(&mut h, v.as_bytes());
                }
            }
            KeySource::Consumer => match subject.consumer {
                None => update_ip(&mut h, subject.ip),
                Some(name) => {
                    h.update(b"c");
                    update_field(&mut h, name.as_bytes());
                }
            },
            KeySource::Jwt(slot, _) => match subject.claims.and_then(|c| c.get(*slot)) {
                None => update_ip(&mut h, subject.ip),
                Some(value) => {
                    h.update(b"j");
                    update_field(&mut h, &(*slot as u32).to_le_bytes());
                    update_field(&mut h, value.as_bytes());
                }
            },
            KeySource::Query(name) => match query_value(subject.parts, name) {
                None => update_ip(&mut h, subject.ip),
                Some(value) => {
                    h.update(b"q");
                    update_field(&mut h, name.as_bytes());
                    update_field(&mut h, value.as_bytes());
                }
            },
        }
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "1.1.1.1"), ("forwarded", "for=2.2.2.2")]);
        assert_eq!(
            client_ip(ip("203.0.113.9"), &h, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(client_ip(ip("203.0.113.9"), &h, &[]), ip("203.0.113.9"));
    }

    #[test]
    fn trusted_peer_right_most_untrusted_wins() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 198.51.100.7, 10.1.1.1")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.7"));
    }

    #[test]
    fn repeated_xff_lines_are_one_list() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[
            ("x-forwarded-for", "6.6.6.6, 198.51.100.7"),
            ("x-forwarded-for", "10.2.2.2"),
        ]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.7"));
    }

    #[test]
    fn forwarded_wins_over_xff() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.7"),
            (
                "forwarded",
                "for=192.0.2.60;proto=http, for=\"[2001:db8:cafe::17]:4711\";by=10.0.0.1",
            ),
        ]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &h, &trusted),
            ip("2001:db8:cafe::17")
        );
        let h = headers(&[("forwarded", "for=\"192.0.2.60:8080\"")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("192.0.2.60"));
    }

    #[test]
    fn garbage_stops_the_walk_at_the_last_trusted_hop() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "1.2.3.4, not-an-ip, 10.9.9.9")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("10.9.9.9"));
        let h = headers(&[("forwarded", "for=unknown")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("10.0.0.2"));
    }

    #[test]
    fn all_trusted_gives_the_left_most() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "10.3.3.3, 10.4.4.4")]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("10.3.3.3"));
        assert_eq!(
            client_ip(ip("10.0.0.2"), &HeaderMap::new(), &trusted),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn mapped_ipv4_is_ipv4() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(
                ip("::ffff:10.0.0.2"),
                &headers(&[("x-forwarded-for", "5.5.5.5")]),
                &trusted
            ),
            ip("5.5.5.5")
        );
        assert_eq!(
            client_ip(ip("::ffff:1.2.3.4"), &HeaderMap::new(), &[]),
            ip("1.2.3.4")
        );
    }

    #[test]
    fn ipv6_counts_by_prefix() {
        assert_eq!(
            counted_ip(ip("2001:db8:1:2:aaaa::1"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            counted_ip(ip("2001:db8:1:2:aaaa::1"), 48),
            ip("2001:db8:1::")
        );
        assert_eq!(counted_ip(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(counted_ip(ip("192.0.2.1"), 64), ip("192.0.2.1"));
    }

    fn parts(uri: &str, hs: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in hs {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn spec(sources: Vec<KeySource>) -> KeySpec {
        KeySpec(sources)
    }

    #[test]
    fn absent_sources_fall_back_to_the_ip() {
        let key = KeySource::Header("x-api-key".parse().unwrap());
        let p = parts("/", &[]);
        let s = Subject {
            parts: &p,
            ip: ip("1.2.3.4"),
            consumer: None,
            claims: None,
        };
        assert_eq!(
            tag(&spec(vec![key.clone()]), &s),
            tag(&spec(vec![KeySource::Ip]), &s)
        );
        let empty = parts("/", &[("x-api-key", "")]);
        let s2 = Subject {
            parts: &empty,
            ip: ip("1.2.3.4"),
            consumer: None,
            claims: None,
        };
        assert_eq!(
            tag(&spec(vec![key.clone()]), &s2),
            tag(&spec(vec![KeySource::Ip]), &s)
        );
        let q = spec(vec![KeySource::Query("key".into())]);
        assert_eq!(tag(&q, &s), tag(&spec(vec![KeySource::Ip]), &s));
        let composite = spec(vec![KeySource::Ip, key]);
        assert_eq!(
            tag(&composite, &s),
            tag(&spec(vec![KeySource::Ip, KeySource::Ip]), &s)
        );
    }

    #[test]
    fn distinct_values_distinct_tags_same_value_same_tag() {
        let key = spec(vec![KeySource::Header("x-api-key".parse().unwrap())]);
        let a = parts("/", &[("x-api-key", "alpha")]);
        let b = parts("/", &[("x-api-key", "beta")]);
        let sa = Subject {
            parts: &a,
            ip: ip("1.1.1.1"),
            consumer: None,
            claims: None,
        };
        let sa2 = Subject {
            parts: &a,
            ip: ip("2.2.2.2"),
            consumer: None,
            claims: None,
        };
        let sb = Subject {
            parts: &b,
            ip: ip("1.1.1.1"),
            consumer: None,
            claims: None,
        };
        assert_eq!(
            tag(&key, &sa),
            tag(&key, &sa2),
            "the key, not the IP, is counted"
        );
        assert_ne!(tag(&key, &sa), tag(&key, &sb));
        // A header value that happens to equal an IP's bytes cannot collide with that IP.
        let q = spec(vec![KeySource::Query("k".into())]);
        let pq = parts("/x?k=alpha&k=other", &[]);
        let pq2 = parts("/x?k=alph%61", &[]);
        let s1 = Subject {
            parts: &pq,
            ip: ip("1.1.1.1"),
            consumer: None,
            claims: None,
        };
        let s2 = Subject {
            parts: &pq2,
            ip: ip("9.9.9.9"),
            consumer: None,
            claims: None,
        };
        assert_eq!(tag(&q, &s1), tag(&q, &s2), "percent-decoded, first value");
        assert_ne!(
            tag(&key, &sa),
            tag(&q, &s1),
            "header and query namespaces differ"
        );
        let global = spec(vec![KeySource::Global]);
        assert_eq!(tag(&global, &sa), tag(&global, &sb));
    }

    #[test]
    fn a_spoofed_xff_never_changes_the_key() {
        let trusted = nets(&["10.0.0.0/8"]);
        let ip_spec = spec(vec![KeySource::Ip]);
        let peer = ip("203.0.113.50");
        let mut tags = std::collections::HashSet::new();
        for spoof in ["1.1.1.1", "2.2.2.2, 3.3.3.3", "10.0.0.1", "garbage"] {
            let p = parts(
                "/",
                &[("x-forwarded-for", spoof), ("forwarded", "for=4.4.4.4")],
            );
            let client = client_ip(peer, &p.headers, &trusted);
            tags.insert(tag(
                &ip_spec,
                &Subject {
                    parts: &p,
                    ip: counted_ip(client, 64),
                    consumer: None,
                    claims: None,
                },
            ));
        }
        assert_eq!(tags.len(), 1);
    }
}
