//! W3C trace context: the `traceparent` header read and written, fresh trace and span ids, and
//! the parent-based ratio sampler. Pure functions, tested here.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// What an incoming `traceparent` says: the trace, the caller's span, and whether the caller
/// sampled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

/// Parses a `traceparent` value (W3C Trace Context level 1, §3.2): `00-<32 hex>-<16 hex>-<2
/// hex>`, lower-case hex, ids not all zero. A later version is read by its first four fields
/// when what follows them starts with `-`; version `ff` is invalid. `None` for anything else,
/// and the request then starts a trace of its own.
pub fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    if value.len() < 55 {
        return None;
    }
    let version = hex_byte(&value[0..2])?;
    if version == 0xff || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    match (version, value.len()) {
        (0, 55) => {}
        (0, _) => return None,
        (_, 55) => {}
        (_, _) if value[55] == b'-' => {}
        _ => return None,
    }
    let mut trace_id = [0u8; 16];
    for (i, byte) in trace_id.iter_mut().enumerate() {
        *byte = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
    }
    let mut span_id = [0u8; 8];
    for (i, byte) in span_id.iter_mut().enumerate() {
        *byte = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
    }
    let flags = hex_byte(&value[53..55])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// Two lower-case hex digits.
fn hex_byte(two: &[u8]) -> Option<u8> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

/// `00-<trace>-<span>-<flags>`, the value an upstream receives.
pub fn format_traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> [u8; 55] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 55];
    out[0] = b'0';
    out[1] = b'0';
    let mut put = |at: usize, bytes: &[u8]| {
        for (i, b) in bytes.iter().enumerate() {
            out[at + 2 * i] = HEX[usize::from(b >> 4)];
            out[at + 2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
    };
    put(3, trace_id);
    put(36, span_id);
    put(53, &[u8::from(sampled)]);
    out
}

/// Lower-case hex of an id, for logs and tests.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The ratio sampler behind the parent: a request with a `traceparent` follows its caller's
/// decision; one without is sampled when the lower 64 bits of its fresh trace id fall under
/// `ratio` of the range (so every service that samples by trace id agrees on the same trace).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// Sampled when the id's lower 64 bits are below this; `u64::MAX` with `always`.
    threshold: u64,
    always: bool,
}

impl Sampler {
    /// `ratio` in 0..=1 (validated by the config).
    pub fn new(ratio: f64) -> Sampler {
        let always = ratio >= 1.0;
        // `as` saturates: 0.0 → 0 (never), and just under 1.0 stays under u64::MAX.
        let threshold = (ratio.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
        Sampler { threshold, always }
    }

    pub fn sample(&self, parent: Option<&Parent>, trace_id: &TraceId) -> bool {
        match parent {
            Some(p) => p.sampled,
            None => {
                self.always
                    || u64::from_be_bytes(trace_id[8..].try_into().expect("8 bytes"))
                        < self.threshold
            }
        }
    }
}

thread_local! {
    /// A per-thread generator (wyrand), seeded from the process's random hasher keys.
    static RNG: Cell<u64> = Cell::new({
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64));
        h.finish() | 1
    });
}

/// 64 random bits: unique enough for trace and span ids (not for secrets).
fn next_u64() -> u64 {
    RNG.with(|state| {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    })
}

/// A fresh span id, never all zero.
pub fn span_id() -> SpanId {
    loop {
        let id = next_u64();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A fresh trace id, never all zero.
pub fn trace_id() -> TraceId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&next_u64().to_be_bytes());
    id[8..].copy_from_slice(&span_id());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_the_spec_example() {
        let p = parse_traceparent(GOOD.as_bytes()).expect("valid");
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled);
        let unsampled = GOOD.replace("-01", "-00");
        assert!(!parse_traceparent(unsampled.as_bytes()).unwrap().sampled);
        // Other flag bits do not make it sampled; bit 0 does.
        let other = GOOD.replace("-01", "-02");
        assert!(!parse_traceparent(other.as_bytes()).unwrap().sampled);
        let both = GOOD.replace("-01", "-03");
        assert!(parse_traceparent(both.as_bytes()).unwrap().sampled);
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        let bad = [
            // Upper-case hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".to_string(),
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01".to_string(),
            // Version ff, and version 00 with trailing data.
            GOOD.replacen("00", "ff", 1),
            format!("{GOOD}-extra"),
            // Short, wrong separators, a non-hex digit.
            GOOD[..54].to_string(),
            GOOD.replace('-', "_"),
            GOOD.replace("b7-", "bz-"),
            String::new(),
        ];
        for value in bad {
            assert_eq!(parse_traceparent(value.as_bytes()), None, "{value}");
        }
    }

    #[test]
    fn reads_a_later_version_by_its_first_fields() {
        let later = GOOD.replacen("00", "01", 1);
        assert!(parse_traceparent(later.as_bytes()).is_some());
        assert!(parse_traceparent(format!("{later}-what-comes").as_bytes()).is_some());
        assert_eq!(parse_traceparent(format!("{later}x").as_bytes()), None);
    }

    #[test]
    fn writes_what_it_reads() {
        let p = parse_traceparent(GOOD.as_bytes()).unwrap();
        let out = format_traceparent(&p.trace_id, &p.span_id, true);
        assert_eq!(std::str::from_utf8(&out).unwrap(), GOOD);
        let out = format_traceparent(&p.trace_id, &p.span_id, false);
        assert_eq!(&out[53..], b"00");
    }

    #[test]
    fn the_sampler_follows_the_parent_and_the_ratio() {
        let parent = parse_traceparent(GOOD.as_bytes()).unwrap();
        let never = Sampler::new(0.0);
        let always = Sampler::new(1.0);
        assert!(never.sample(Some(&parent), &parent.trace_id));
        let unsampled = Parent {
            sampled: false,
            ..parent
        };
        assert!(!always.sample(Some(&unsampled), &parent.trace_id));
        let mut id = [0u8; 16];
        assert!(!never.sample(None, &id));
        assert!(always.sample(None, &id));
        id[8..].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(always.sample(None, &id));
        // A quarter of fresh ids, within a few percent.
        let quarter = Sampler::new(0.25);
        let n = 40_000;
        let hits = (0..n).filter(|_| quarter.sample(None, &trace_id())).count();
        let share = hits as f64 / n as f64;
        assert!((0.23..0.27).contains(&share), "{share}");
    }

    #[test]
    fn fresh_ids_differ() {
        let ids: std::collections::HashSet<TraceId> = (0..10_000).map(|_| trace_id()).collect();
        assert_eq!(ids.len(), 10_000);
        assert!(ids.iter().all(|id| *id != [0; 16]));
    }
}
