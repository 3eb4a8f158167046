//! Parsers the tests share for what tollgate and Redis print: the `r=` of a `RateLimit` header,
//! one sample of a metrics text, and `INFO` fields.
#![allow(dead_code)]

/// The `r=` (remaining) of a `RateLimit` header value.
pub fn remaining(ratelimit: &str) -> u64 {
    ratelimit
        .split(';')
        .find_map(|p| p.strip_prefix("r="))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no r= in {ratelimit:?}"))
}

/// The value of one sample line (`series` exactly, labels included) of a metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// One section of Redis's `INFO`.
pub fn info(conn: &mut redis::Connection, section: &str) -> String {
    redis::cmd("INFO")
        .arg(section)
        .query(conn)
        .expect("INFO answers")
}

/// A numeric field of an `INFO` text.
pub fn info_u64(text: &str, field: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO:\n{text}"))
}

/// `calls` of `cmdstat_evalsha` (0 before the first call).
pub fn evalsha_calls(conn: &mut redis::Connection) -> u64 {
    info(conn, "commandstats")
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .map(|rest| {
            rest.split(',')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("calls=N")
        })
        .unwrap_or(0)
}
