//! Durations as operators write them: `5s`, `250ms`, `1m`, `1h30m`, or a bare number of milliseconds
//! (HAProxy's convention, so `timeout connect 5000` carries over unchanged).
//!
//! Parsing is total: any input yields a `Duration` or a message saying what was expected. Units are
//! `us`, `ms`, `s`, `m`, `h`, `d`; several terms may be concatenated (`1m30s`).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A duration read from YAML: an integer (milliseconds) or a string with units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

const EXPECTED: &str = "a duration such as 5s, 250ms, 1m or a number of milliseconds";

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ConfigDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ConfigDuration(Duration::from_millis(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(|ms| ConfigDuration(Duration::from_millis(ms)))
                    .map_err(|_| E::custom(format!("a duration cannot be negative ({v})")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Err(E::custom(format!("{v} is not a whole number of milliseconds; write e.g. 250ms or 1500")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                parse(v).map(ConfigDuration).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// Parses `5s`, `250ms`, `1m30s`, `100us`, or a bare number of milliseconds.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err(format!("empty duration; expected {EXPECTED}"));
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().map(Duration::from_millis).map_err(|_| format!("duration \"{text}\" is too large"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("\"{text}\" is not {EXPECTED}"));
        }
        let n: u64 = rest[..digits].parse().map_err(|_| format!("duration \"{text}\" is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let term = match unit {
            "us" => Duration::from_micros(n),
            "ms" | "" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => n.checked_mul(60).map(Duration::from_secs).unwrap_or(Duration::MAX),
            "h" => n.checked_mul(3600).map(Duration::from_secs).unwrap_or(Duration::MAX),
            "d" => n.checked_mul(86400).map(Duration::from_secs).unwrap_or(Duration::MAX),
            other => {
                return Err(format!("unknown unit \"{other}\" in duration \"{text}\"; use us, ms, s, m, h or d"));
            }
        };
        total = total
            .checked_add(term)
            .filter(|d| *d != Duration::MAX)
            .ok_or_else(|| format!("duration \"{text}\" is too large"))?;
    }
    Ok(total)
}

/// Formats a duration the way the configuration accepts it back (`5s`, `250ms`, `1m30s`).
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return format!("{}us", d.as_micros());
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut s = (ms / 1000) as u64;
    let mut out = String::new();
    for (unit, len) in [("d", 86400), ("h", 3600), ("m", 60)] {
        if s >= len {
            out.push_str(&format!("{}{unit}", s / len));
            s %= len;
        }
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_bare_milliseconds() {
        assert_eq!(parse("5000"), Ok(Duration::from_millis(5000)));
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse("1d"), Ok(Duration::from_secs(86400)));
    }

    #[test]
    fn bad_durations_say_what_is_expected() {
        assert!(parse("").unwrap_err().contains("empty"));
        assert!(parse("5x").unwrap_err().contains("unknown unit \"x\""));
        assert!(parse("s5").unwrap_err().contains("is not a duration"));
        assert!(parse("99999999999999999999").unwrap_err().contains("too large"));
        assert!(parse("999999999999999d").unwrap_err().contains("too large"));
    }

    #[test]
    fn format_round_trips() {
        for text in ["5s", "250ms", "1m30s", "2h", "1d1h1m1s", "100us"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
    }
}
