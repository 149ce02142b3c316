//! PEM text in and out: splitting a text into its `-----BEGIN ...-----` blocks and encoding DER
//! as PEM. certd's API carries certificates as PEM chains; certd and its clients (identityd,
//! edged) read and write them with these functions.
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

/// The DER of every `CERTIFICATE` block of `text`, in order; other blocks (keys, parameters)
/// are skipped. The certificates are not parsed: callers do that with whatever they hold them in.
pub fn certificate_ders(text: &str) -> Result<Vec<Vec<u8>>, PemError> {
    Ok(blocks(text)?
        .into_iter()
        .filter(|block| block.label == "CERTIFICATE")
        .map(|block| block.der)
        .collect())
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

    #[test]
    fn certificate_ders_keeps_certificate_blocks_in_order() {
        let mut text = encode("CERTIFICATE", b"leaf");
        append(&mut text, &encode("EC PRIVATE KEY", b"key"));
        append(&mut text, &encode("CERTIFICATE", b"issuer"));
        assert_eq!(
            certificate_ders(&text).unwrap(),
            [b"leaf".to_vec(), b"issuer".to_vec()]
        );
        assert!(certificate_ders(&encode("EC PRIVATE KEY", b"key"))
            .unwrap()
            .is_empty());
        assert_eq!(
            certificate_ders("-----BEGIN CERTIFICATE-----\nAAAA\n"),
            Err(PemError::Unterminated("CERTIFICATE".to_owned()))
        );
    }
}
