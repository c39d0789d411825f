//! Wall-clock times as the trace and the control API print them (RFC 3339,
//! UTC, microseconds), without a calendar crate: the arithmetic is a few
//! lines and fully tested here.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

/// A time as RFC 3339 in UTC with microseconds:
/// `2026-11-25T12:00:00.123456Z`. Times before 1970 show as the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub SystemTime);

impl fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
            rem / 3600,
            rem / 60 % 60,
            rem % 60,
            since.subsec_micros()
        )
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01.
/// Counts in 400-year eras of 146097 days starting on a March 1st, so the
/// leap day is the last day of its year.
fn civil_from_days(days: u64) -> (u64, u32, u32) {
    // Days since 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // [0, 146096]
    // Year of the era, leap days of every 4th, 100th and 400th year removed.
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1st
    let mp = (5 * doy + 2) / 153; // month from March: [0, 11]
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = era * 400 + yoe + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        let at = |secs: u64, micros: u32| {
            Rfc3339(UNIX_EPOCH + Duration::new(secs, micros * 1000 + 999)).to_string()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(1_795_608_000, 123_456), "2026-11-25T12:00:00.123456Z");
        assert_eq!(at(951_868_799, 999_999), "2000-02-29T23:59:59.999999Z");
        assert_eq!(at(946_684_799, 1), "1999-12-31T23:59:59.000001Z");
        assert_eq!(at(1_709_210_096, 500_000), "2024-02-29T12:34:56.500000Z");
        assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z");
        assert_eq!(
            Rfc3339(UNIX_EPOCH - Duration::from_secs(1)).to_string(),
            "1970-01-01T00:00:00.000000Z"
        );
        // Day by day across eight centuries, each date the one after the
        // day before.
        let mut prev = (1969, 12, 31);
        for d in 0..146_097 * 2 {
            let (y, m, day) = civil_from_days(d);
            let next = match prev {
                (y, 12, 31) => (y + 1, 1, 1),
                (y, m, d) if d == month_len(y, m) => (y, m + 1, 1),
                (y, m, d) => (y, m, d + 1),
            };
            assert_eq!((y, m, day), next, "day {d}");
            prev = next;
        }
    }

    fn month_len(y: u64, m: u32) -> u32 {
        match m {
            2 if y.is_multiple_of(4) && (!y.is_multiple_of(100) || y.is_multiple_of(400)) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }
}
