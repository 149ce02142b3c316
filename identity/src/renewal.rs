//! Device identity certificate renewal (spec 6.6), the pure parts: the renewal policy
//! (`N%`, `Nmin`, `Nday`, config-common's), and a PKCS#10 CSR whose signature is made elsewhere (by keyd), since
//! the private key never leaves keyd.

use std::time::Duration;

use base64::Engine as _;
use der::{Decode as _, Encode as _};
use x509_cert::name::Name;
use x509_cert::request::{CertReq, CertReqInfo, Version};
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

/// The renewal policy strings, shared with certd and edged.
pub use config_common::renewal::Policy;

/// The shortest pause between failed renewal attempts.
pub const RETRY_FLOOR: Duration = Duration::from_secs(10);

/// Which signature the CSR carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CsrSignature {
    /// `ecdsa-with-SHA256` (keyd `/sign` ECDSA over SHA-256 of the info).
    EcdsaSha256,
    /// `sha256WithRSAEncryption` (keyd `/encrypt` RSA-PKCS1 over the DigestInfo).
    RsaSha256,
}

/// A CSR waiting for its signature.
#[derive(Debug)]
pub struct UnsignedCsr {
    info: CertReqInfo,
    /// The DER of the CertificationRequestInfo: what gets signed.
    pub to_be_signed: Vec<u8>,
}

/// The CertificationRequestInfo for `subject` (DER Name) and `public_key` (DER SPKI).
pub fn unsigned_csr(subject_der: &[u8], public_key_der: &[u8]) -> Result<UnsignedCsr, String> {
    let info = CertReqInfo {
        version: Version::V1,
        subject: Name::from_der(subject_der).map_err(|error| format!("subject: {error}"))?,
        public_key: SubjectPublicKeyInfoOwned::from_der(public_key_der)
            .map_err(|error| format!("public key: {error}"))?,
        attributes: Default::default(),
    };
    let to_be_signed = info.to_der().map_err(|error| error.to_string())?;
    Ok(UnsignedCsr { info, to_be_signed })
}

/// The signed CSR as base64 of its DER (certd accepts that form as well as PEM).
pub fn signed_csr(
    unsigned: UnsignedCsr,
    kind: CsrSignature,
    signature: &[u8],
) -> Result<String, String> {
    let algorithm = match kind {
        CsrSignature::EcdsaSha256 => AlgorithmIdentifierOwned {
            oid: der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2"),
            parameters: None,
        },
        CsrSignature::RsaSha256 => AlgorithmIdentifierOwned {
            oid: der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11"),
            parameters: Some(der::asn1::Any::null()),
        },
    };
    let request = CertReq {
        info: unsigned.info,
        algorithm,
        signature: der::asn1::BitString::from_bytes(signature)
            .map_err(|error| error.to_string())?,
    };
    let der = request.to_der().map_err(|error| error.to_string())?;
    Ok(base64::engine::general_purpose::STANDARD.encode(der))
}

/// DER of P-256's curve OID as keyd reports it (`ec-curve-oid`).
const P256_OID_DER: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// A DER SubjectPublicKeyInfo for an EC P-256 public point (keyd `ec-curve-oid`, `ec-point`).
pub fn ec_public_key_der(curve_oid_der: &[u8], point: &[u8]) -> Result<Vec<u8>, String> {
    if curve_oid_der != P256_OID_DER {
        return Err("only P-256 EC keys can be renewed".to_owned());
    }
    let failed = |error: openssl::error::ErrorStack| error.to_string();
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)
        .map_err(failed)?;
    let mut context = openssl::bn::BigNumContext::new().map_err(failed)?;
    let point = openssl::ec::EcPoint::from_bytes(&group, point, &mut context).map_err(failed)?;
    let key = openssl::ec::EcKey::from_public_key(&group, &point).map_err(failed)?;
    openssl::pkey::PKey::from_ec_key(key)
        .and_then(|key| key.public_key_to_der())
        .map_err(failed)
}

/// A DER SubjectPublicKeyInfo for an RSA public key (keyd `rsa-modulus`, `rsa-exponent`).
pub fn rsa_public_key_der(modulus: &[u8], exponent: &[u8]) -> Result<Vec<u8>, String> {
    let failed = |error: openssl::error::ErrorStack| error.to_string();
    let rsa = openssl::rsa::Rsa::from_public_components(
        openssl::bn::BigNum::from_slice(modulus).map_err(failed)?,
        openssl::bn::BigNum::from_slice(exponent).map_err(failed)?,
    )
    .map_err(failed)?;
    openssl::pkey::PKey::from_rsa(rsa)
        .and_then(|key| key.public_key_to_der())
        .map_err(failed)
}

fn leaf(pem: &str) -> Result<openssl::x509::X509, String> {
    openssl::x509::X509::from_pem(pem.as_bytes())
        .map_err(|_| "the identity certificate is not PEM".to_owned())
}

/// notBefore and notAfter of the first certificate of a PEM chain (Unix seconds).
pub fn validity(pem: &str) -> Result<(i64, i64), String> {
    let certificate = leaf(pem)?;
    let epoch = openssl::asn1::Asn1Time::from_unix(0).map_err(|error| error.to_string())?;
    let seconds = |time: &openssl::asn1::Asn1TimeRef| -> Result<i64, String> {
        let difference = epoch.diff(time).map_err(|error| error.to_string())?;
        Ok(i64::from(difference.days) * 86_400 + i64::from(difference.secs))
    };
    Ok((
        seconds(certificate.not_before())?,
        seconds(certificate.not_after())?,
    ))
}

/// The DER subject name of (attribute, value) pairs in order, e.g. `[("CN", "dev1"), ("O", "Contoso")]`.
pub fn subject_from_pairs(pairs: &[(String, String)]) -> Result<Vec<u8>, String> {
    let mut name = openssl::x509::X509NameBuilder::new().map_err(|error| error.to_string())?;
    for (attribute, value) in pairs {
        name.append_entry_by_text(attribute, value)
            .map_err(|_| format!("subject attribute {attribute:?} is not a known DN attribute"))?;
    }
    name.build().to_der().map_err(|error| error.to_string())
}

/// The DER subject of the first certificate of a PEM chain.
pub fn subject_der(pem: &str) -> Result<Vec<u8>, String> {
    leaf(pem)?
        .subject_name()
        .to_der()
        .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CSR assembled here with a signature made by OpenSSL verifies with OpenSSL.
    #[test]
    fn csr_verifies_with_openssl() {
        let group =
            openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        let key = openssl::pkey::PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap())
            .unwrap();
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "renewed-device").unwrap();
        let name = name.build();
        let unsigned =
            unsigned_csr(&name.to_der().unwrap(), &key.public_key_to_der().unwrap()).unwrap();
        let mut signer =
            openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key).unwrap();
        signer.update(&unsigned.to_be_signed).unwrap();
        let signature = signer.sign_to_vec().unwrap();
        let csr = signed_csr(unsigned, CsrSignature::EcdsaSha256, &signature).unwrap();
        let der = base64::engine::general_purpose::STANDARD
            .decode(csr)
            .unwrap();
        let request = openssl::x509::X509Req::from_der(&der).unwrap();
        assert!(request.verify(&key).unwrap());
        let cn = request
            .subject_name()
            .entries_by_nid(openssl::nid::Nid::COMMONNAME)
            .next()
            .unwrap()
            .data()
            .to_string()
            .unwrap();
        assert_eq!(cn, "renewed-device");
    }
}
