//! Small helpers: time formatting, random identifiers, hex, percent-decoding.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Seconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_secs() -> u64 {
    now_ms() / 1000
}

/// Converts days since 1970-01-01 to a (year, month, day) civil date (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (y, m as u32, d as u32)
}

/// Formats Unix milliseconds as RFC 3339 UTC with seven fractional digits, the way DPS
/// writes timestamps (`2024-01-01T00:00:00.0000000Z`).
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX / 2);
    let frac = ms % 1000;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}0000Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        frac
    )
}

/// The current time as RFC 3339 (see [`rfc3339_ms`]).
pub fn now_rfc3339() -> String {
    rfc3339_ms(now_ms())
}

/// `n` random bytes from OpenSSL's CSPRNG.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    if openssl::rand::rand_bytes(&mut buf).is_err() {
        // OpenSSL's RNG failing is practically impossible; fall back to a time-based fill so
        // identifiers still differ (these are test identifiers, not secrets that leave the box).
        let seed = now_ms().to_le_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = seed[i % seed.len()] ^ (i as u8);
        }
    }
    buf
}

/// A random GUID-shaped string (`8-4-4-4-12` lowercase hex), used for tracking IDs.
pub fn random_guid() -> String {
    let h = hex_lower(&random_bytes(16));
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// 18 random decimal digits (the shape of an IoT Hub generation ID), first digit non-zero.
pub fn random_generation_id() -> String {
    let bytes = random_bytes(18);
    bytes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if i == 0 {
                char::from(b'1' + b % 9)
            } else {
                char::from(b'0' + b % 10)
            }
        })
        .collect()
}

/// A random symmetric key: 32 random bytes, standard base64.
pub fn random_key_b64() -> String {
    b64(&random_bytes(32))
}

/// Standard base64 with padding.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes standard base64, accepting missing padding.
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .ok()
        .or_else(|| {
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(s.trim_end_matches('='))
                .ok()
        })
}

/// Lowercase hex.
pub fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Uppercase hex.
pub fn hex_upper(bytes: &[u8]) -> String {
    hex_lower(bytes).to_ascii_uppercase()
}

/// Normalizes a thumbprint for comparison: strips `:`/spaces, lowercases.
pub fn normalize_thumbprint(s: &str) -> String {
    s.chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Percent-decodes `s` once into a UTF-8 string; `None` if the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// Splits a request path into percent-decoded segments (the leading `/` is dropped).
/// `None` if a segment does not decode to UTF-8.
pub fn path_segments(path: &str) -> Option<Vec<String>> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    trimmed.split('/').map(percent_decode).collect()
}

/// Parses a query string (`application/x-www-form-urlencoded`) into pairs.
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    let Some(q) = query else {
        return Vec::new();
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| percent_decode(&s.replace('+', " ")).unwrap_or_default();
            (dec(k), dec(v))
        })
        .collect()
}

/// Outcome of looking up the `api-version` query parameter.
#[derive(Debug, PartialEq, Eq)]
pub enum ApiVersion {
    /// Not present.
    Missing,
    /// Present more than once.
    Repeated,
    /// Present once with this value.
    Value(String),
}

/// Finds the `api-version` query parameter.
pub fn api_version(query: Option<&str>) -> ApiVersion {
    let mut found: Vec<String> = query_pairs(query)
        .into_iter()
        .filter(|(k, _)| k == "api-version")
        .map(|(_, v)| v)
        .collect();
    match found.len() {
        0 => ApiVersion::Missing,
        1 => ApiVersion::Value(found.remove(0)),
        _ => ApiVersion::Repeated,
    }
}

/// Strips an optional port from an authority (`host:port` → `host`; IPv6 `[::1]:8443` → `::1`).
pub fn host_part(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_dates() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.0000000Z");
        assert_eq!(
            rfc3339_ms(1_704_067_201_250),
            "2024-01-01T00:00:01.2500000Z"
        );
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.0000000Z");
    }

    #[test]
    fn generation_id_is_18_digits() {
        let g = random_generation_id();
        assert_eq!(g.len(), 18);
        assert!(g.chars().all(|c| c.is_ascii_digit()));
        assert_ne!(g, random_generation_id());
    }

    #[test]
    fn host_part_strips_port() {
        assert_eq!(host_part("localhost:8443"), "localhost");
        assert_eq!(host_part("hub.example"), "hub.example");
        assert_eq!(host_part("[::1]:8443"), "::1");
    }

    #[test]
    fn api_version_cases() {
        assert_eq!(api_version(None), ApiVersion::Missing);
        assert_eq!(
            api_version(Some("api-version=2021-06-01")),
            ApiVersion::Value("2021-06-01".into())
        );
        assert_eq!(
            api_version(Some("api-version=a&api-version=b")),
            ApiVersion::Repeated
        );
    }

    #[test]
    fn segments_decode_once() {
        assert_eq!(
            path_segments("/devices/d%2F1/modules/%24edgeAgent"),
            Some(vec![
                "devices".to_string(),
                "d/1".to_string(),
                "modules".to_string(),
                "$edgeAgent".to_string()
            ])
        );
    }
}
