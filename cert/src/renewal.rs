//! The renewal policy strings of `[cert_issuance.est.identity_auto_renew]` (`threshold`,
//! `retry`): `N%` (1 ≤ N ≤ 99, a share of the certificate's lifetime), `Nmin` or `Nday` (N > 0).
//!
//! identityd has the same small parser (identity/src/renewal.rs); certd keeps its own copy so
//! it does not depend on identityd.

use std::time::Duration;

/// Shortest pause between two renewal attempts.
pub const MIN_RETRY: Duration = Duration::from_secs(5);

/// One policy value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenewPolicy {
    /// A share of the certificate's lifetime, in percent.
    Percent(u64),
    /// A duration (for `threshold`: before notAfter).
    Duration(Duration),
}

impl RenewPolicy {
    /// Parses `N%` (1–99), `Nmin` or `Nday` (N > 0).
    pub fn parse(text: &str) -> Option<RenewPolicy> {
        let number = |digits: &str| {
            if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
                return None;
            }
            digits.parse::<u64>().ok().filter(|n| *n > 0)
        };
        if let Some(percent) = text.strip_suffix('%') {
            number(percent)
                .filter(|n| *n < 100)
                .map(RenewPolicy::Percent)
        } else if let Some(minutes) = text.strip_suffix("min") {
            number(minutes)
                .and_then(|n| n.checked_mul(60))
                .map(|seconds| RenewPolicy::Duration(Duration::from_secs(seconds)))
        } else if let Some(days) = text.strip_suffix("day") {
            number(days)
                .and_then(|n| n.checked_mul(86_400))
                .map(|seconds| RenewPolicy::Duration(Duration::from_secs(seconds)))
        } else {
            None
        }
    }

    fn share(self, lifetime: u64) -> u64 {
        match self {
            RenewPolicy::Percent(percent) => lifetime.saturating_mul(percent) / 100,
            RenewPolicy::Duration(duration) => duration.as_secs(),
        }
    }

    /// When (Unix seconds) a certificate valid from `not_before` to `not_after` is due: `N%`
    /// of its lifetime has passed, or `N` minutes / days are left.
    pub fn renew_at(self, not_before: i64, not_after: i64) -> i64 {
        let lifetime = u64::try_from(not_after.saturating_sub(not_before)).unwrap_or(0);
        let share = i64::try_from(self.share(lifetime)).unwrap_or(i64::MAX);
        match self {
            RenewPolicy::Percent(_) => not_before.saturating_add(share),
            RenewPolicy::Duration(_) => not_after.saturating_sub(share),
        }
    }

    /// The pause after a failed renewal of a certificate with this lifetime (at least
    /// [`MIN_RETRY`]).
    pub fn retry_delay(self, not_before: i64, not_after: i64) -> Duration {
        let lifetime = u64::try_from(not_after.saturating_sub(not_before)).unwrap_or(0);
        Duration::from_secs(self.share(lifetime)).max(MIN_RETRY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_schedules() {
        assert_eq!(RenewPolicy::parse("80%"), Some(RenewPolicy::Percent(80)));
        assert_eq!(
            RenewPolicy::parse("10min"),
            Some(RenewPolicy::Duration(Duration::from_secs(600)))
        );
        assert_eq!(
            RenewPolicy::parse("2day"),
            Some(RenewPolicy::Duration(Duration::from_secs(172_800)))
        );
        for bad in [
            "0%", "100%", "0min", "0day", "", "%", "x%", "-5%", "+5%", "5", "5 min",
        ] {
            assert_eq!(RenewPolicy::parse(bad), None, "{bad:?}");
        }
        assert_eq!(RenewPolicy::Percent(80).renew_at(1000, 2000), 1800);
        assert_eq!(
            RenewPolicy::Duration(Duration::from_secs(100)).renew_at(1000, 2000),
            1900
        );
        assert_eq!(
            RenewPolicy::Percent(4).retry_delay(0, 10_000),
            Duration::from_secs(400)
        );
        assert_eq!(RenewPolicy::Percent(4).retry_delay(0, 100), MIN_RETRY);
    }
}
