//! PEM text in and out: splitting a text into its `-----BEGIN ...-----` blocks, validating an
//! imported chain, and encoding DER as PEM.
//!
//! Parsing is deliberately small and strict about block structure (matching BEGIN/END labels,
//! valid base64) but tolerant of text around blocks (OpenSSL's "Bag Attributes" headers,
//! comments), as PEM files found on devices often carry it.

use base64::Engine as _;

/// One PEM block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The label, e.g. `CERTIFICATE`.
    pub label: String,
    /// The decoded contents.
    pub der: Vec<u8>,
}

/// Why a PEM text could not be split into blocks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// A BEGIN line has no matching END line.
    #[error("PEM block {0:?} is not terminated")]
    Unterminated(String),
    /// A block's body is not valid base64.
    #[error("PEM block {0:?} is not valid base64")]
    Base64(String),
}

const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn label_of<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.trim()
        .strip_prefix(marker)?
        .strip_suffix("-----")
        .filter(|label| !label.contains("-----"))
}

/// Splits `text` into its PEM blocks, in order. Text outside blocks is ignored.
pub fn blocks(text: &str) -> Result<Vec<Block>, PemError> {
    let mut result = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(label) = label_of(line, "-----BEGIN ") else {
            continue;
        };
        let mut body = String::new();
        let mut terminated = false;
        for line in lines.by_ref() {
            if let Some(end) = label_of(line, "-----END ") {
                if end != label {
                    return Err(PemError::Unterminated(label.to_owned()));
                }
                terminated = true;
                break;
            }
            let line = line.trim();
            // RFC 1421 headers (Proc-Type, DEK-Info) mark encrypted legacy keys; never certs.
            if line.contains(':') {
                return Err(PemError::Base64(label.to_owned()));
            }
            body.push_str(line);
        }
        if !terminated {
            return Err(PemError::Unterminated(label.to_owned()));
        }
        let der = BASE64
            .decode(body.as_bytes())
            .map_err(|_| PemError::Base64(label.to_owned()))?;
        result.push(Block {
            label: label.to_owned(),
            der,
        });
    }
    Ok(result)
}

/// The DER of each `CERTIFICATE` block of `text`, each checked to parse as an X.509
/// certificate. Fails unless there is at least one, or when the text carries a private key.
pub fn certificates(text: &str) -> Result<Vec<Vec<u8>>, String> {
    let blocks = blocks(text).map_err(|error| error.to_string())?;
    let mut certificates = Vec::new();
    for (index, block) in blocks.into_iter().enumerate() {
        if block.label.contains("PRIVATE KEY") {
            return Err(format!(
                "PEM block {index} is a private key; certd stores certificates only"
            ));
        }
        if block.label != "CERTIFICATE" {
            continue;
        }
        openssl::x509::X509::from_der(&block.der)
            .map_err(|_| format!("PEM block {index} is not a valid X.509 certificate"))?;
        certificates.push(block.der);
    }
    if certificates.is_empty() {
        return Err("contains no PEM CERTIFICATE block".to_owned());
    }
    Ok(certificates)
}

/// Encodes `der` as a PEM block with `label`, 64 characters a line, ending in a newline.
pub fn encode(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut text = String::with_capacity(body.len() + body.len() / 64 + 2 * label.len() + 40);
    text.push_str("-----BEGIN ");
    text.push_str(label);
    text.push_str("-----\n");
    let mut rest = body.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        text.push_str(line);
        text.push('\n');
        rest = tail;
    }
    text.push_str("-----END ");
    text.push_str(label);
    text.push_str("-----\n");
    text
}

/// Appends `next` to `chain`, making sure a newline separates them.
pub fn append(chain: &mut String, next: &str) {
    if !chain.is_empty() && !chain.ends_with('\n') {
        chain.push('\n');
    }
    chain.push_str(next);
}

/// Decodes base64 that may be wrapped in lines (a CSR sent as base64 of DER).
pub fn decode_base64_lines(text: &str) -> Option<Vec<u8>> {
    let compact: String = text.split_ascii_whitespace().collect();
    if compact.is_empty() {
        return None;
    }
    BASE64.decode(compact.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed_der() -> Vec<u8> {
        let key = openssl::pkey::PKey::from_ec_key(
            openssl::ec::EcKey::generate(
                &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)
                    .unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        let mut builder = openssl::x509::X509::builder().unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        builder
            .sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        builder.build().to_der().unwrap()
    }

    #[test]
    fn encode_and_split_round_trip() {
        let der = self_signed_der();
        let one = encode("CERTIFICATE", &der);
        assert!(one.lines().all(|line| line.len() <= 64));
        let mut chain = format!("Bag Attributes: junk\n{one}");
        append(&mut chain, &one);
        let parsed = blocks(&chain).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].der, der);
        assert_eq!(certificates(&chain).unwrap().len(), 2);
        // OpenSSL agrees with the encoder.
        assert_eq!(
            openssl::x509::X509::from_pem(one.as_bytes())
                .unwrap()
                .to_der()
                .unwrap(),
            der
        );
    }

    #[test]
    fn invalid_texts() {
        assert!(certificates("").is_err());
        assert!(certificates("garbage").is_err());
        assert!(certificates("-----BEGIN CERTIFICATE-----\nAAAA\n").is_err());
        assert!(
            certificates("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n").is_err()
        );
        assert!(
            certificates("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err()
        );
        assert!(certificates("-----BEGIN CERTIFICATE-----\nAAAA\n-----END X-----\n").is_err());
        let der = self_signed_der();
        let with_key = format!(
            "{}{}",
            encode("CERTIFICATE", &der),
            encode("PRIVATE KEY", b"x")
        );
        assert!(certificates(&with_key).unwrap_err().contains("private key"));
    }
}
