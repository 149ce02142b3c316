//! PEM for certd: the shared block parser and encoder ([`cert_api::pem`]), and the check of an
//! imported chain (every `CERTIFICATE` block must parse as an X.509 certificate, with OpenSSL,
//! which certd links for signature checks anyway).

pub use cert_api::pem::{append, blocks, decode_base64_lines, encode};

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
