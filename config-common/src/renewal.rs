//! The one certificate renewal policy language (certd's EST identity, identityd's identity and
//! operational certificates, edged's Edge CA): `threshold` and `retry` strings `N%` (1 ≤ N ≤ 99,
//! a share of the certificate's lifetime), `Nmin` or `Nday` (N > 0, a duration), and the times
//! they give for a certificate valid from `not_before` to `not_after` (Unix seconds).

use std::time::Duration;

/// One policy value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// A share of the certificate's lifetime, in percent.
    Percent(u64),
    /// A duration.
    Duration(Duration),
}

impl Policy {
    /// Parses `N%` (1–99), `Nmin` or `Nday` (N > 0).
    pub fn parse(text: &str) -> Option<Policy> {
        let number = |text: &str| {
            // Digits only: no sign, no spaces.
            (!text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()))
                .then(|| text.parse::<u64>().ok())
                .flatten()
                .filter(|n| *n > 0)
        };
        if let Some(percent) = text.strip_suffix('%') {
            number(percent).filter(|n| *n < 100).map(Policy::Percent)
        } else if let Some(minutes) = text.strip_suffix("min") {
            number(minutes)
                .and_then(|n| n.checked_mul(60))
                .map(|s| Policy::Duration(Duration::from_secs(s)))
        } else if let Some(days) = text.strip_suffix("day") {
            number(days)
                .and_then(|n| n.checked_mul(86_400))
                .map(|s| Policy::Duration(Duration::from_secs(s)))
        } else {
            None
        }
    }

    /// The message for a value [`Policy::parse`] refuses.
    pub const EXPECTED: &'static str = "expected N% (1-99), Nmin or Nday with N > 0";

    fn of_lifetime(self, lifetime: u64) -> u64 {
        match self {
            Policy::Percent(percent) => lifetime.saturating_mul(percent) / 100,
            Policy::Duration(duration) => duration.as_secs(),
        }
    }

    /// As a threshold: when to renew: `N%` of the lifetime has passed, or `N` minutes / days
    /// are left (never before `not_before`).
    pub fn renew_at(self, not_before: i64, not_after: i64) -> i64 {
        let lifetime = u64::try_from(not_after - not_before).unwrap_or(0);
        let offset = |seconds: u64| i64::try_from(seconds.min(lifetime)).unwrap_or(0);
        match self {
            Policy::Percent(_) => not_before + offset(self.of_lifetime(lifetime)),
            Policy::Duration(duration) => not_after - offset(duration.as_secs()),
        }
    }

    /// As a retry period: the pause after a failed renewal, at least `floor`.
    pub fn retry_delay(self, not_before: i64, not_after: i64, floor: Duration) -> Duration {
        let lifetime = u64::try_from(not_after - not_before).unwrap_or(0);
        Duration::from_secs(self.of_lifetime(lifetime)).max(floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_and_refuses_the_rest() {
        assert_eq!(Policy::parse("80%"), Some(Policy::Percent(80)));
        assert_eq!(
            Policy::parse("10min"),
            Some(Policy::Duration(Duration::from_secs(600)))
        );
        assert_eq!(
            Policy::parse("2day"),
            Some(Policy::Duration(Duration::from_secs(172_800)))
        );
        for bad in [
            "0%",
            "100%",
            "0day",
            "-1min",
            "5",
            "5h",
            "",
            "%",
            "99999999999999999999day",
        ] {
            assert_eq!(Policy::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn times() {
        assert_eq!(Policy::Percent(80).renew_at(1000, 2000), 1800);
        assert_eq!(
            Policy::Duration(Duration::from_secs(100)).renew_at(1000, 2000),
            1900
        );
        // A duration longer than the lifetime renews at once, not before the cert existed.
        assert_eq!(
            Policy::Duration(Duration::from_secs(10_000)).renew_at(1000, 2000),
            1000
        );
        let floor = Duration::from_secs(10);
        assert_eq!(
            Policy::Percent(4).retry_delay(0, 10_000, floor),
            Duration::from_secs(400)
        );
        assert_eq!(
            Policy::Percent(4).retry_delay(0, 100, floor),
            Duration::from_secs(10)
        );
    }
}
