//! The small value languages of proxy.toml: durations (`"50ms"`, `"2s"`, `"15min"`), rates
//! (`"5/min"`, `"100/10s"`) and sizes (`"10MiB"`). Each parser returns a typed value or a message
//! that says what is allowed; the caller adds the file position.

use std::time::Duration;

/// A parsed `rate = "N/period"`: `count` events per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub period: Duration,
}

/// The largest count a rate may name. Keeps every product the algorithms form far below 2^53,
/// where Lua's numbers (doubles) stop being exact integers.
pub const MAX_COUNT: u64 = 1_000_000_000;

/// The longest window or period: one year.
pub const MAX_PERIOD: Duration = Duration::from_secs(366 * 86_400);

const UNITS_HELP: &str = "ms, s, sec, second, m, min, minute, h, hour, d, day";

/// Seconds in one unit, or None for an unknown unit. Milliseconds are handled by the caller.
fn unit_millis(unit: &str) -> Option<u64> {
    Some(match unit {
        "ms" | "msec" | "millisecond" | "milliseconds" => 1,
        "s" | "sec" | "secs" | "second" | "seconds" => 1_000,
        "m" | "min" | "mins" | "minute" | "minutes" => 60_000,
        "h" | "hr" | "hour" | "hours" => 3_600_000,
        "d" | "day" | "days" => 86_400_000,
        _ => return None,
    })
}

/// Splits `"15min"` into (Some(15), "min") and `"min"` into (None, "min").
fn split_number(text: &str) -> (Option<&str>, &str) {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if end == 0 {
        (None, text)
    } else {
        (Some(&text[..end]), &text[end..])
    }
}

/// Parses a duration such as `"50ms"`, `"2s"`, `"15min"`, `"1h"`, `"1d"`. A number without a
/// unit is refused: `"30"` could mean seconds or milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let (number, unit) = split_number(trimmed);
    let Some(number) = number else {
        return Err(format!(
            "invalid duration \"{text}\"; expected a whole number and a unit ({UNITS_HELP}), e.g. \"50ms\" or \"2s\""
        ));
    };
    let Some(per_unit) = unit_millis(unit.trim()) else {
        return Err(format!(
            "invalid duration \"{text}\"; expected a whole number and a unit ({UNITS_HELP}), e.g. \"50ms\" or \"2s\""
        ));
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration \"{text}\": number too large"))?;
    let millis = n
        .checked_mul(per_unit)
        .ok_or_else(|| format!("invalid duration \"{text}\": too long"))?;
    Ok(Duration::from_millis(millis))
}

/// Parses `"N/unit"` or `"N/<duration>"`: `"5/min"`, `"10/s"`, `"100/10s"`, `"5/15min"`.
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let help = "expected \"N/unit\" with N a positive whole number and unit one of s, sec, second, m, min, minute, h, hour, d, day, or a duration such as \"100/10s\"";
    let Some((count, period)) = text.split_once('/') else {
        return Err(format!("invalid rate \"{text}\"; {help}"));
    };
    let count = count.trim();
    if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid rate \"{text}\"; {help}"));
    }
    let count: u64 = count
        .parse()
        .map_err(|_| format!("invalid rate \"{text}\": count too large (at most {MAX_COUNT})"))?;
    if count == 0 {
        return Err(format!(
            "invalid rate \"{text}\": the count must be at least 1 (to block a path entirely, do not route it)"
        ));
    }
    if count > MAX_COUNT {
        return Err(format!(
            "invalid rate \"{text}\": count too large (at most {MAX_COUNT})"
        ));
    }
    let period_text = period.trim();
    let period = match split_number(period_text) {
        (None, unit) => match unit_millis(unit) {
            Some(ms) => Duration::from_millis(ms),
            None => {
                return Err(format!(
                    "invalid rate \"{text}\": unknown unit \"{unit}\"; {help}"
                ));
            }
        },
        (Some(_), _) => parse_duration(period_text).map_err(|_| {
            format!("invalid rate \"{text}\": bad period \"{period_text}\"; {help}")
        })?,
    };
    if period.is_zero() {
        return Err(format!(
            "invalid rate \"{text}\": the period must be longer than zero"
        ));
    }
    if period > MAX_PERIOD {
        return Err(format!(
            "invalid rate \"{text}\": the period may be at most 366 days"
        ));
    }
    Ok(Rate { count, period })
}

/// Parses a size: a whole number of bytes, or with `KB`, `MB`, `GB` (powers of 1000) or `KiB`,
/// `MiB`, `GiB` (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (number, unit) = split_number(trimmed);
    let help = "expected a whole number of bytes, optionally with KB, MB, GB, KiB, MiB or GiB, e.g. \"10MiB\"";
    let Some(number) = number else {
        return Err(format!("invalid size \"{text}\"; {help}"));
    };
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(format!("invalid size \"{text}\"; {help}")),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid size \"{text}\": too large"))?;
    n.checked_mul(factor)
        .ok_or_else(|| format!("invalid size \"{text}\": too large"))
}

/// Renders a duration the way a person writes it in proxy.toml (`"90s"`, `"15min"`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    for (unit, size) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("min", 60_000),
        ("s", 1_000),
    ] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_in_every_unit() {
        let cases = [
            ("5/s", 5, 1),
            ("5/sec", 5, 1),
            ("5/second", 5, 1),
            ("5/m", 5, 60),
            ("5/min", 5, 60),
            ("5/minute", 5, 60),
            ("5/h", 5, 3600),
            ("5/hour", 5, 3600),
            ("5/d", 5, 86400),
            ("10000/day", 10000, 86400),
            ("100/10s", 100, 10),
            ("5/15min", 5, 900),
        ];
        for (text, count, secs) in cases {
            let rate = parse_rate(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(rate.count, count, "{text}");
            assert_eq!(rate.period, Duration::from_secs(secs), "{text}");
        }
        assert_eq!(
            parse_rate("3/500ms").unwrap().period,
            Duration::from_millis(500)
        );
    }

    #[test]
    fn rates_refused() {
        for text in [
            "0/min",
            "5/fortnight",
            "five/min",
            "5",
            "-1/s",
            "5/0s",
            "",
            "/s",
            "5/",
            "1.5/s",
            "5/-1s",
            "99999999999999999999/s",
            "2000000000/s",
            "5/400d",
        ] {
            assert!(parse_rate(text).is_err(), "{text:?} should be refused");
        }
        let message = parse_rate("5/fortnight").unwrap_err();
        assert!(message.contains("fortnight"), "{message}");
        assert!(message.contains("min"), "{message}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("15min").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        for bad in ["30", "s", "2 fortnights", "-1s", "1.5s", ""] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("10KB").unwrap(), 10_000);
        assert_eq!(parse_size("10MiB").unwrap(), 10 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        for bad in ["ten", "10XB", "-5", "1.5MiB", "99999999999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn format_round_trips() {
        for text in ["50ms", "2s", "15min", "1h", "1d", "90s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
