//! Shared access signature tokens (spec 9.1): parsing, verification, key derivation, and a
//! token builder for tests.

use openssl::{hash::MessageDigest, pkey::PKey, sign::Signer};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::util;

/// Characters a client leaves unencoded (RFC 3986 unreserved).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A parsed `SharedAccessSignature` header. `sr` is kept exactly as received because the
/// signature covers that literal text.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as sent (still percent-encoded).
    pub sr_raw: String,
    /// `sr` percent-decoded.
    pub resource: String,
    /// Decoded signature bytes.
    pub sig: Vec<u8>,
    /// Expiry (Unix seconds).
    pub expiry: u64,
    /// Key name (`skn`), if any.
    pub skn: Option<String>,
}

impl std::fmt::Debug for SasToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The signature is a bearer credential: never print it.
        f.debug_struct("SasToken")
            .field("resource", &self.resource)
            .field("expiry", &self.expiry)
            .field("skn", &self.skn)
            .finish_non_exhaustive()
    }
}

/// Why a SAS token was rejected (no secret material in the text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// Header does not start with `SharedAccessSignature `.
    #[error("authorization header is not a SharedAccessSignature")]
    NotSas,
    /// A required field is missing or malformed.
    #[error("malformed SAS token: {0}")]
    Malformed(&'static str),
    /// `se` is not in the future.
    #[error("SAS token expired")]
    Expired,
    /// `sr` does not name the resource being accessed.
    #[error("SAS token audience does not match the resource")]
    WrongAudience,
    /// `skn` has the wrong value for this service.
    #[error("SAS token key name is not accepted here")]
    WrongKeyName,
    /// HMAC did not match any of the candidate keys.
    #[error("SAS token signature does not match")]
    BadSignature,
}

/// HMAC-SHA256 of `data` under `key`.
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let result = PKey::hmac(key).and_then(|pkey| {
        let mut signer = Signer::new(MessageDigest::sha256(), &pkey)?;
        signer.update(data)?;
        signer.sign_to_vec()
    });
    // HMAC with SHA-256 cannot fail for any key length; an empty result never verifies.
    result.unwrap_or_default()
}

/// Derives a group-enrollment device key (spec 9.1):
/// `base64(HMAC-SHA256(base64decode(group_key), registration_id))`.
/// Returns `None` when `group_key_b64` is not base64.
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Option<String> {
    let key = util::b64_decode(group_key_b64)?;
    Some(util::b64(&hmac_sha256(&key, registration_id.as_bytes())))
}

/// Percent-encodes with everything outside RFC 3986 unreserved escaped.
pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, UNRESERVED).to_string()
}

/// Builds an `Authorization` header value the way a conforming client does:
/// `sr = percent-encode(lowercase(resource))`, signature over `sr + "\n" + expiry`.
/// Returns `None` if `key_b64` is not base64. For tests and tools.
pub fn build_token(
    resource: &str,
    key_b64: &str,
    expiry: u64,
    skn: Option<&str>,
) -> Option<String> {
    let key = util::b64_decode(key_b64)?;
    let sr = encode_component(&resource.to_lowercase());
    let sig = util::b64(&hmac_sha256(&key, format!("{sr}\n{expiry}").as_bytes()));
    let mut token = format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
        encode_component(&sig)
    );
    if let Some(skn) = skn {
        token.push_str("&skn=");
        token.push_str(&encode_component(skn));
    }
    Some(token)
}

impl SasToken {
    /// Parses an `Authorization` header value.
    pub fn parse(header: &str) -> Result<Self, SasError> {
        let rest = header
            .trim()
            .strip_prefix("SharedAccessSignature ")
            .ok_or(SasError::NotSas)?;
        let mut sr = None;
        let mut sig = None;
        let mut se = None;
        let mut skn = None;
        for part in rest.trim().split('&') {
            let Some((k, v)) = part.split_once('=') else {
                return Err(SasError::Malformed("field without '='"));
            };
            let slot = match k {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => continue,
            };
            if slot.is_some() {
                return Err(SasError::Malformed("repeated field"));
            }
            *slot = Some(v.to_string());
        }
        let sr_raw = sr.ok_or(SasError::Malformed("missing sr"))?;
        let resource = util::percent_decode(&sr_raw).ok_or(SasError::Malformed("bad sr"))?;
        let sig = sig
            .as_deref()
            .and_then(util::percent_decode)
            .ok_or(SasError::Malformed("missing sig"))?;
        let sig = util::b64_decode(&sig).ok_or(SasError::Malformed("sig is not base64"))?;
        let expiry = se
            .as_deref()
            .and_then(util::percent_decode)
            .ok_or(SasError::Malformed("missing se"))?
            .parse::<u64>()
            .map_err(|_| SasError::Malformed("se is not a number"))?;
        let skn = match skn {
            Some(s) => Some(util::percent_decode(&s).ok_or(SasError::Malformed("bad skn"))?),
            None => None,
        };
        Ok(SasToken {
            sr_raw,
            resource,
            sig,
            expiry,
            skn,
        })
    }

    /// True if the signature verifies with `key_b64` (base64 key), compared in constant time.
    pub fn signed_with(&self, key_b64: &str) -> bool {
        let Some(key) = util::b64_decode(key_b64) else {
            return false;
        };
        let expected = hmac_sha256(&key, format!("{}\n{}", self.sr_raw, self.expiry).as_bytes());
        expected.len() == self.sig.len()
            && !expected.is_empty()
            && openssl::memcmp::eq(&expected, &self.sig)
    }

    /// Checks expiry against `now` (Unix seconds).
    pub fn check_expiry(&self, now: u64) -> Result<(), SasError> {
        if self.expiry > now {
            Ok(())
        } else {
            Err(SasError::Expired)
        }
    }

    /// DPS audience rule: `sr` equals `resource` ignoring ASCII case.
    pub fn check_exact_audience(&self, resource: &str) -> Result<(), SasError> {
        if self.resource.eq_ignore_ascii_case(resource) {
            Ok(())
        } else {
            Err(SasError::WrongAudience)
        }
    }

    /// Hub audience rule: `sr` equals `resource` or is a `/`-bounded prefix of it, and is at
    /// least as specific as `minimum` (the device resource) so a device key cannot sign a
    /// hub-wide token.
    pub fn check_prefix_audience(&self, resource: &str, minimum: &str) -> Result<(), SasError> {
        let sr = self.resource.to_ascii_lowercase();
        let sr = sr.trim_end_matches('/');
        let res = resource.to_ascii_lowercase();
        let min = minimum.to_ascii_lowercase();
        let covers = |outer: &str, inner: &str| {
            inner == outer
                || (inner.len() > outer.len()
                    && inner.starts_with(outer)
                    && inner.as_bytes()[outer.len()] == b'/')
        };
        if covers(sr, &res) && covers(&min, sr) {
            Ok(())
        } else {
            Err(SasError::WrongAudience)
        }
    }

    /// Checks every rule for one candidate key set: expiry, audience (by `audience`), `skn`
    /// (`expected_skn`: `Some(name)` requires it, `None` forbids it), then signature against any
    /// of `keys`.
    pub fn verify<'k>(
        &self,
        now: u64,
        audience: impl FnOnce(&Self) -> Result<(), SasError>,
        expected_skn: Option<&str>,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Result<(), SasError> {
        self.check_expiry(now)?;
        audience(self)?;
        match (expected_skn, self.skn.as_deref()) {
            (Some(want), Some(got)) if want == got => {}
            (None, None) => {}
            _ => return Err(SasError::WrongKeyName),
        }
        if keys.into_iter().any(|k| self.signed_with(k)) {
            Ok(())
        } else {
            Err(SasError::BadSignature)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn roundtrip_token_verifies() {
        let hdr = build_token(
            "0ne00000000/registrations/Dev1",
            KEY,
            4_000_000_000,
            Some("registration"),
        )
        .unwrap();
        assert!(hdr.contains("sr=0ne00000000%2Fregistrations%2Fdev1&"));
        let tok = SasToken::parse(&hdr).unwrap();
        assert!(tok
            .verify(
                1,
                |t| t.check_exact_audience("0ne00000000/registrations/dev1"),
                Some("registration"),
                [KEY]
            )
            .is_ok());
        assert_eq!(
            tok.verify(4_000_000_000, |_| Ok(()), Some("registration"), [KEY]),
            Err(SasError::Expired)
        );
        assert_eq!(
            tok.verify(1, |_| Ok(()), None, [KEY]),
            Err(SasError::WrongKeyName)
        );
        let other = util::b64(&[7u8; 32]);
        assert_eq!(
            tok.verify(1, |_| Ok(()), Some("registration"), [other.as_str()]),
            Err(SasError::BadSignature)
        );
    }

    #[test]
    fn literal_sr_with_unencoded_slash_verifies() {
        // The reference identity service leaves '/' unencoded; the HMAC covers the literal text.
        let key = util::b64_decode(KEY).unwrap();
        let sr = "myhub.example/devices/d1";
        let sig = util::b64(&hmac_sha256(&key, format!("{sr}\n99999999999").as_bytes()));
        let hdr = format!(
            "SharedAccessSignature sr={sr}&sig={}&se=99999999999",
            encode_component(&sig)
        );
        let tok = SasToken::parse(&hdr).unwrap();
        assert!(tok.signed_with(KEY));
        assert!(tok
            .check_prefix_audience(
                "myhub.example/devices/d1/modules/m1",
                "myhub.example/devices/d1"
            )
            .is_ok());
        assert!(tok
            .check_prefix_audience("myhub.example/devices/d10", "myhub.example/devices/d10")
            .is_err());
    }

    #[test]
    fn hub_wide_token_is_not_a_device_token() {
        let hdr = build_token("myhub.example", KEY, 99_999_999_999, None).unwrap();
        let tok = SasToken::parse(&hdr).unwrap();
        assert_eq!(
            tok.check_prefix_audience("myhub.example/devices/d1", "myhub.example/devices/d1"),
            Err(SasError::WrongAudience)
        );
    }

    #[test]
    fn derived_key_matches_known_construction() {
        let derived = derive_device_key(KEY, "reg-1").unwrap();
        let expect = util::b64(&hmac_sha256(&util::b64_decode(KEY).unwrap(), b"reg-1"));
        assert_eq!(derived, expect);
        assert_eq!(util::b64_decode(&derived).unwrap().len(), 32);
    }

    #[test]
    fn malformed_tokens_rejected() {
        assert_eq!(SasToken::parse("Bearer x"), Err(SasError::NotSas));
        assert!(SasToken::parse("SharedAccessSignature sr=a&se=1").is_err());
        assert!(SasToken::parse("SharedAccessSignature sr=a&sig=AAAA&se=x").is_err());
    }
}
