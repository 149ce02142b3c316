//! Local identities (spec 4): a fresh RSA-2048 key made in memory for each request and a CSR for
//! `CN=<module>.<hostname>.<domain>` with the required extensions, issued by certd under the
//! module's name. OpenSSL makes the key (ring cannot generate RSA keys) and the CSR; with the
//! EC point of a CSR made for keyd's key (`renewal`), the only OpenSSL use in identityd, so its
//! code is paged in only when one of those is asked for. certd is called by the service.

use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage};
use openssl::x509::{X509NameBuilder, X509ReqBuilder};

/// A new key and the CSR for it (PEM).
pub struct LocalRequest {
    /// The private key, PKCS#8 PEM.
    pub private_key_pem: String,
    /// The CSR, PEM.
    pub csr_pem: String,
}

impl std::fmt::Debug for LocalRequest {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LocalRequest")
            .field("private_key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Makes the key and CSR for a local identity. `server` adds serverAuth to clientAuth.
pub fn request(common_name: &str, server: bool) -> Result<LocalRequest, String> {
    let failed = |error: openssl::error::ErrorStack| error.to_string();
    let key: PKey<Private> =
        PKey::from_rsa(openssl::rsa::Rsa::generate(2048).map_err(failed)?).map_err(failed)?;
    let mut name = X509NameBuilder::new().map_err(failed)?;
    name.append_entry_by_text("CN", common_name)
        .map_err(|_| format!("{common_name:?} is not a usable common name"))?;
    let name = name.build();
    let mut builder = X509ReqBuilder::new().map_err(failed)?;
    builder.set_version(0).map_err(failed)?;
    builder.set_subject_name(&name).map_err(failed)?;
    builder.set_pubkey(&key).map_err(failed)?;
    let mut extensions = openssl::stack::Stack::new().map_err(failed)?;
    extensions
        .push(BasicConstraints::new().critical().build().map_err(failed)?)
        .map_err(failed)?;
    extensions
        .push(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .non_repudiation()
                .key_encipherment()
                .build()
                .map_err(failed)?,
        )
        .map_err(failed)?;
    let mut usage = ExtendedKeyUsage::new();
    usage.client_auth();
    if server {
        usage.server_auth();
    }
    extensions
        .push(usage.build().map_err(failed)?)
        .map_err(failed)?;
    builder.add_extensions(&extensions).map_err(failed)?;
    builder
        .sign(&key, MessageDigest::sha256())
        .map_err(failed)?;
    let csr_pem = String::from_utf8(builder.build().to_pem().map_err(failed)?)
        .map_err(|error| error.to_string())?;
    let private_key_pem = String::from_utf8(key.private_key_to_pem_pkcs8().map_err(failed)?)
        .map_err(|error| error.to_string())?;
    Ok(LocalRequest {
        private_key_pem,
        csr_pem,
    })
}

/// The notAfter of the first certificate of a PEM chain, as RFC 3339 (UTC).
pub fn expiration(chain_pem: &str) -> Result<String, String> {
    let (_, not_after) = crate::renewal::validity(chain_pem)
        .map_err(|_| "certd returned an unparsable certificate".to_owned())?;
    Ok(rfc3339(not_after))
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        (of_day % 3600) / 60,
        of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn requests_carry_the_required_extensions() {
        let request = request("m.host.example", true).unwrap();
        let csr = openssl::x509::X509Req::from_pem(request.csr_pem.as_bytes()).unwrap();
        let key = PKey::private_key_from_pem(request.private_key_pem.as_bytes()).unwrap();
        assert!(csr.verify(&key).unwrap());
        assert_eq!(key.bits(), 2048);
        let text = String::from_utf8(
            std::process::Command::new("openssl")
                .args(["req", "-noout", "-text"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut child| {
                    use std::io::Write as _;
                    child
                        .stdin
                        .take()
                        .unwrap()
                        .write_all(request.csr_pem.as_bytes())?;
                    child.wait_with_output()
                })
                .unwrap()
                .stdout,
        )
        .unwrap();
        assert!(
            text.contains("CN=m.host.example") || text.contains("CN = m.host.example"),
            "{text}"
        );
        assert!(text.contains("CA:FALSE"), "{text}");
        assert!(
            text.contains("Digital Signature, Non Repudiation, Key Encipherment"),
            "{text}"
        );
        assert!(
            text.contains("TLS Web Client Authentication, TLS Web Server Authentication"),
            "{text}"
        );
    }
}
