//! Small time helpers: RFC 3339 parsing and formatting in UTC, and the log query's time values
//! (`since` / `until`: RFC 3339, Unix seconds, or a duration meaning "now minus").
//!
//! Pure functions only; no clock reads except in [`now_unix`].

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the epoch now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|duration| i64::try_from(duration.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The civil date of a day number since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = u32::try_from(day_of_year - (153 * month_index + 2) / 5 + 1).unwrap_or(1);
    let month = u32::try_from(if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    })
    .unwrap_or(1);
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// UTC (year, month, day, hour, minute, second) of Unix seconds.
pub fn utc_parts(seconds: i64) -> (i64, u32, u32, u32, u32, u32) {
    let (year, month, day) = civil_from_days(seconds.div_euclid(86_400));
    let rest = u32::try_from(seconds.rem_euclid(86_400)).unwrap_or(0);
    (year, month, day, rest / 3600, (rest % 3600) / 60, rest % 60)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SS` followed by `suffix` (`Z` or `+00:00`).
pub fn format_unix(seconds: i64, suffix: &str) -> String {
    let days = seconds.div_euclid(86_400);
    let rest = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}{suffix}",
        rest / 3600,
        (rest % 3600) / 60,
        rest % 60
    )
}

/// Parses an RFC 3339 date-time (`2024-01-31T12:00:00Z`, fractional seconds and `±HH:MM`
/// offsets allowed) into Unix seconds.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let bytes = text.as_bytes();
    if bytes.len() < 20 {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(range)?;
        if !part.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    if bytes[4] != b'-' || bytes[7] != b'-' || !matches!(bytes[10], b'T' | b't' | b' ') {
        return None;
    }
    if bytes[13] != b':' || bytes[16] != b':' {
        return None;
    }
    let year = number(0..4)?;
    let month = u32::try_from(number(5..7)?).ok()?;
    let day = u32::try_from(number(8..10)?).ok()?;
    let hour = number(11..13)?;
    let minute = number(14..16)?;
    let second = number(17..19)?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(fraction.len());
        if digits == 0 {
            return None;
        }
        rest = &fraction[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (hours, minutes) = rest.get(1..)?.split_once(':')?;
            if hours.len() != 2 || minutes.len() != 2 {
                return None;
            }
            let hours: i64 = hours.parse().ok()?;
            let minutes: i64 = minutes.parse().ok()?;
            sign * (hours * 3600 + minutes * 60)
        }
    };
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Parses a duration such as `90m`, `1 day`, `2h30m`, `45s`, `1 week` into seconds.
pub fn parse_duration(text: &str) -> Option<i64> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total: i64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let value: i64 = rest[..digits].parse().ok()?;
        rest = rest[digits..].trim_start();
        let unit_length = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_length];
        rest = rest[unit_length..].trim_start();
        let seconds = match unit.to_ascii_lowercase().as_str() {
            "s" | "sec" | "secs" | "second" | "seconds" => 1,
            "m" | "min" | "mins" | "minute" | "minutes" => 60,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600,
            "d" | "day" | "days" => 86_400,
            "w" | "week" | "weeks" => 604_800,
            _ => return None,
        };
        total = total.checked_add(value.checked_mul(seconds)?)?;
    }
    Some(total)
}

/// A log query time: RFC 3339, integer Unix seconds, or a duration meaning "now minus".
pub fn parse_log_time(text: &str, now: i64) -> Option<i64> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<i64>() {
        return Some(seconds);
    }
    if let Some(seconds) = parse_rfc3339(text) {
        return Some(seconds);
    }
    parse_duration(text).map(|duration| now - duration)
}

/// Docker's RFC 3339 time as edged sends it: `None` for Docker's zero time or unparsable text,
/// else the same instant in UTC with a `Z` suffix (fraction kept when Docker sent UTC).
pub fn docker_time(text: &str) -> Option<String> {
    if text.is_empty() || text.starts_with("0001-01-01") {
        return None;
    }
    let seconds = parse_rfc3339(text)?;
    if text.ends_with('Z') || text.ends_with('z') {
        Some(text.to_owned())
    } else {
        Some(format_unix(seconds, "Z"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        let cases = [
            ("1970-01-01T00:00:00Z", Some(0)),
            ("2024-02-29T12:34:56Z", Some(1_709_210_096)),
            ("2024-02-29T12:34:56.123456789Z", Some(1_709_210_096)),
            ("2024-02-29T14:34:56+02:00", Some(1_709_210_096)),
            ("2024-02-29T12:34:56", None),
            ("yesterday", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_rfc3339(text), expected, "{text}");
        }
        assert_eq!(format_unix(1_709_210_096, "Z"), "2024-02-29T12:34:56Z");
        assert_eq!(format_unix(0, "+00:00"), "1970-01-01T00:00:00+00:00");
        for seconds in [0, 951_782_400, 4_102_444_800, 1_234_567_890] {
            assert_eq!(parse_rfc3339(&format_unix(seconds, "Z")), Some(seconds));
        }
    }

    #[test]
    fn durations_and_log_times() {
        assert_eq!(parse_duration("90m"), Some(5400));
        assert_eq!(parse_duration("1 day"), Some(86_400));
        assert_eq!(parse_duration("2h30m"), Some(9000));
        assert_eq!(parse_duration("2h 30m"), Some(9000));
        assert_eq!(parse_duration("5 parsecs"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_log_time("1700000000", 0), Some(1_700_000_000));
        assert_eq!(parse_log_time("10m", 1000), Some(400));
        assert_eq!(parse_log_time("1970-01-01T00:01:00Z", 0), Some(60));
        assert_eq!(parse_log_time("soon", 0), None);
    }

    #[test]
    fn docker_times() {
        assert_eq!(docker_time("0001-01-01T00:00:00Z"), None);
        assert_eq!(docker_time(""), None);
        assert_eq!(
            docker_time("2024-01-01T10:00:00.5Z").as_deref(),
            Some("2024-01-01T10:00:00.5Z")
        );
        assert_eq!(
            docker_time("2024-01-01T12:00:00+02:00").as_deref(),
            Some("2024-01-01T10:00:00Z")
        );
    }
}
