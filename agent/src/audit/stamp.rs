//! Record timestamps: the UTC time as RFC 3339 text, formatted on the stack for every write round.
use std::time::{SystemTime, UNIX_EPOCH};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`, the longest text `Stamp` formats itself.
const MAX: usize = 30;

/// A time as `time`'s RFC 3339 formatting writes it (fraction without trailing zeros, `Z`).
pub struct Stamp(Repr);

enum Repr {
    Inline([u8; MAX], u8),
    /// Before 1970 or after 9999: left to the `time` crate.
    Other(String),
}

impl Stamp {
    pub fn now() -> Stamp {
        Stamp::of(SystemTime::now())
    }

    pub fn of(t: SystemTime) -> Stamp {
        let fast = t.duration_since(UNIX_EPOCH).ok().and_then(|d| inline(d.as_secs(), d.subsec_nanos()));
        Stamp(match fast {
            Some((buf, len)) => Repr::Inline(buf, len),
            None => Repr::Other(OffsetDateTime::from(t).format(&Rfc3339).unwrap_or_default()),
        })
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline(buf, len) => std::str::from_utf8(&buf[..usize::from(*len)]).expect("digits and ASCII marks"),
            Repr::Other(s) => s,
        }
    }
}

/// The text of `secs` and `nanos` after the epoch, if its year has four digits.
fn inline(secs: u64, nanos: u32) -> Option<([u8; MAX], u8)> {
    let days = secs / 86_400;
    let of_day = secs % 86_400;
    let (year, month, day) = civil(i64::try_from(days).ok()?);
    if !(1970..=9999).contains(&year) {
        return None;
    }
    let mut b = [0u8; MAX];
    let mut put = |at: usize, v: u64, digits: usize| {
        let mut v = v;
        for i in (at..at + digits).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, year as u64, 4);
    put(5, month, 2);
    put(8, day, 2);
    put(11, of_day / 3600, 2);
    put(14, of_day / 60 % 60, 2);
    put(17, of_day % 60, 2);
    let mut len = 19;
    if nanos != 0 {
        put(20, u64::from(nanos), 9);
        b[19] = b'.';
        len = 29;
        while b[len - 1] == b'0' {
            len -= 1;
        }
    }
    for (at, mark) in [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')] {
        b[at] = mark;
    }
    b[len] = b'Z';
    Some((b, len as u8 + 1))
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn by_time_crate(t: SystemTime) -> String {
        OffsetDateTime::from(t).format(&Rfc3339).unwrap()
    }

    #[test]
    fn stamps_are_what_the_time_crate_writes() {
        let mut secs: u64 = 0;
        // Days spread over 1970 to 9999 (every month and day of the week), and odd fractions.
        while secs < 253_402_300_799 {
            for nanos in [0, 1, 10, 100_000, 123_456_789, 500_000_000, 999_999_999] {
                for t in [secs, secs + 86_399] {
                    let at = UNIX_EPOCH + Duration::new(t, nanos);
                    assert_eq!(Stamp::of(at).as_str(), by_time_crate(at), "{t} s {nanos} ns");
                }
            }
            secs += 86_400 * 61 + 3_607;
        }
        // Leap days and the days around them, in leap years by each rule and in years not leap.
        for date in ["1972-02-29", "2000-02-29", "2000-03-01", "2100-02-28", "2100-03-01", "2400-02-29", "9999-12-31"] {
            let at = OffsetDateTime::parse(&format!("{date}T23:59:59.25Z"), &Rfc3339).unwrap();
            let at = SystemTime::from(at);
            assert_eq!(Stamp::of(at).as_str(), by_time_crate(at), "{date}");
        }
        let now = SystemTime::now();
        assert_eq!(Stamp::of(now).as_str(), by_time_crate(now));
    }

    #[test]
    fn times_outside_four_digit_years_still_format() {
        let before = UNIX_EPOCH - Duration::from_secs(86_400 * 400);
        assert_eq!(Stamp::of(before).as_str(), by_time_crate(before));
        assert!(Stamp::of(before).as_str().starts_with("1968-"));
    }
}
