//! UTC calendar time for Envoy's `%START_TIME%` formatting and RFC 3339 timestamps, without
//! a date library: civil dates from days since the epoch (Howard Hinnant's algorithm).

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// `2026-11-25T06:34:00.123Z`: RFC 3339 in UTC with milliseconds (Envoy's `%START_TIME%`).
pub fn rfc3339_millis(t: SystemTime) -> String {
    let mut out = String::with_capacity(24);
    format_utc(t, "%Y-%m-%dT%H:%M:%E3SZ", &mut out);
    out
}

/// Appends `t` in UTC formatted by `format`, the `strftime` subset Envoy's `START_TIME(…)`
/// users write: `%Y %y %m %d %e %j %H %M %S %s %z %Z %%`, `%E<n>S` (seconds with `n`
/// fractional digits, `%E*S` all nine), `%<n>f` / `%f` (fractional digits: `n`, or nine).
/// Other specifiers are copied as written.
pub fn format_utc(t: SystemTime, format: &str, out: &mut String) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day, yday) = civil(days);
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    let frac = |out: &mut String, digits: usize| {
        let digits = digits.clamp(1, 9);
        let v = nanos / 10u32.pow(9 - digits as u32);
        let _ = write!(out, "{v:0digits$}");
    };
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let _ = match spec {
            'Y' => write!(out, "{year:04}"),
            'y' => write!(out, "{:02}", year.rem_euclid(100)),
            'm' => write!(out, "{month:02}"),
            'd' => write!(out, "{day:02}"),
            'e' => write!(out, "{day:2}"),
            'j' => write!(out, "{yday:03}"),
            'H' => write!(out, "{h:02}"),
            'M' => write!(out, "{m:02}"),
            'S' => write!(out, "{s:02}"),
            's' => write!(out, "{secs}"),
            'z' => write!(out, "+0000"),
            'Z' => write!(out, "UTC"),
            '%' => write!(out, "%"),
            'f' => {
                frac(out, 9);
                Ok(())
            }
            'E' => {
                // %E<n>S / %E*S.
                let n = match chars.peek() {
                    Some('*') => Some(9),
                    Some(c) => c.to_digit(10).map(|n| n as usize),
                    None => None,
                };
                let mut look = chars.clone();
                look.next();
                match (n, look.peek()) {
                    (Some(n), Some('S')) => {
                        chars.next();
                        chars.next();
                        let _ = write!(out, "{s:02}");
                        if n > 0 {
                            out.push('.');
                            frac(out, n);
                        }
                        Ok(())
                    }
                    _ => write!(out, "%E"),
                }
            }
            c if c.is_ascii_digit() && chars.peek() == Some(&'f') => {
                chars.next();
                frac(out, c.to_digit(10).unwrap_or(9) as usize);
                Ok(())
            }
            other => write!(out, "%{other}"),
        };
    }
}

/// (year, month 1–12, day 1–31, day of the year 1–366) of a day count since 1970-01-01.
fn civil(days: u64) -> (i64, i64, i64, i64) {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    const BEFORE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = BEFORE[(month - 1) as usize] + day + i64::from(leap && month > 2);
    (year, month, day, yday)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_like_envoy() {
        // 2024-02-29T13:05:09.123456789Z (a leap day).
        let t = UNIX_EPOCH + Duration::new(1_709_211_909, 123_456_789);
        assert_eq!(rfc3339_millis(t), "2024-02-29T13:05:09.123Z");
        let mut out = String::new();
        format_utc(
            t,
            "%s|%Y/%m/%d %H:%M:%S|%E6S|%3f|%f|%j|%y %z %Z|%%|%q",
            &mut out,
        );
        assert_eq!(
            out,
            "1709211909|2024/02/29 13:05:09|09.123456|123|123456789|060|24 +0000 UTC|%|%q"
        );
        let mut out = String::new();
        format_utc(UNIX_EPOCH, "%Y-%m-%dT%H:%M:%E3SZ", &mut out);
        assert_eq!(out, "1970-01-01T00:00:00.000Z");
    }
}
