//! Device identity certificate renewal (spec 6.6), the pure parts: the renewal policy
//! (`N%`, `Nmin`, `Nday`, config-common's), and a PKCS#10 CSR whose signature is made elsewhere (by keyd), since
//! the private key never leaves keyd.

use std::time::Duration;

use base64::Engine as _;
use der::{Decode as _, Encode as _};
use x509_cert::certificate::Certificate;
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

/// id-ecPublicKey.
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
/// prime256v1.
const OID_P256: &str = "1.2.840.10045.3.1.7";
/// rsaEncryption.
const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";

fn spki_der(algorithm: AlgorithmIdentifierOwned, key_bits: &[u8]) -> Result<Vec<u8>, String> {
    SubjectPublicKeyInfoOwned {
        algorithm,
        subject_public_key: der::asn1::BitString::from_bytes(key_bits)
            .map_err(|error| error.to_string())?,
    }
    .to_der()
    .map_err(|error| error.to_string())
}

/// A DER SubjectPublicKeyInfo for an EC P-256 public point (keyd `ec-curve-oid`, `ec-point`).
/// keyd reports the point compressed (SEC 1, 33 bytes); the SubjectPublicKeyInfo carries it
/// uncompressed, as CAs expect (RFC 5480 makes only that form mandatory). OpenSSL recovers Y:
/// no other library here does point arithmetic, and this runs only when a CSR is made.
pub fn ec_public_key_der(curve_oid_der: &[u8], point: &[u8]) -> Result<Vec<u8>, String> {
    if curve_oid_der != P256_OID_DER {
        return Err("only P-256 EC keys can be renewed".to_owned());
    }
    let failed = |error: openssl::error::ErrorStack| error.to_string();
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)
        .map_err(failed)?;
    let mut context = openssl::bn::BigNumContext::new().map_err(failed)?;
    let point = openssl::ec::EcPoint::from_bytes(&group, point, &mut context)
        .map_err(|_| "keyd reported an EC point that is not on P-256".to_owned())?;
    let uncompressed = point
        .to_bytes(
            &group,
            openssl::ec::PointConversionForm::UNCOMPRESSED,
            &mut context,
        )
        .map_err(failed)?;
    let algorithm = AlgorithmIdentifierOwned {
        oid: der::asn1::ObjectIdentifier::new_unwrap(OID_EC_PUBLIC_KEY),
        parameters: Some(der::asn1::ObjectIdentifier::new_unwrap(OID_P256).into()),
    };
    spki_der(algorithm, &uncompressed)
}

/// A DER SubjectPublicKeyInfo for an RSA public key (keyd `rsa-modulus`, `rsa-exponent`, both
/// big-endian unsigned).
pub fn rsa_public_key_der(modulus: &[u8], exponent: &[u8]) -> Result<Vec<u8>, String> {
    let failed = |error: der::Error| error.to_string();
    let modulus = der::asn1::UintRef::new(modulus).map_err(failed)?;
    let exponent = der::asn1::UintRef::new(exponent).map_err(failed)?;
    if modulus.as_bytes().is_empty() || exponent.as_bytes().is_empty() {
        return Err("keyd reported an empty RSA modulus or exponent".to_owned());
    }
    // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER } (RFC 8017 A.1.1).
    let length = (modulus.encoded_len().map_err(failed)?
        + exponent.encoded_len().map_err(failed)?)
    .map_err(failed)?;
    let mut rsa_public_key = Vec::new();
    der::Header::new(der::Tag::Sequence, length)
        .map_err(failed)?
        .encode_to_vec(&mut rsa_public_key)
        .map_err(failed)?;
    modulus.encode_to_vec(&mut rsa_public_key).map_err(failed)?;
    exponent
        .encode_to_vec(&mut rsa_public_key)
        .map_err(failed)?;
    let algorithm = AlgorithmIdentifierOwned {
        oid: der::asn1::ObjectIdentifier::new_unwrap(OID_RSA_ENCRYPTION),
        parameters: Some(der::asn1::Any::null()),
    };
    spki_der(algorithm, &rsa_public_key)
}

/// The first certificate of a PEM chain.
pub fn leaf(pem: &str) -> Result<Certificate, String> {
    let not_pem = || "the identity certificate is not PEM".to_owned();
    let der = cert_api::pem::certificate_ders(pem)
        .map_err(|_| not_pem())?
        .into_iter()
        .next()
        .ok_or_else(not_pem)?;
    Certificate::from_der(&der)
        .map_err(|error| format!("the identity certificate cannot be parsed: {error}"))
}

/// notBefore and notAfter of the first certificate of a PEM chain (Unix seconds).
pub fn validity(pem: &str) -> Result<(i64, i64), String> {
    let validity = leaf(pem)?.tbs_certificate.validity;
    let seconds = |time: x509_cert::time::Time| {
        i64::try_from(time.to_unix_duration().as_secs()).unwrap_or(i64::MAX)
    };
    Ok((seconds(validity.not_before), seconds(validity.not_after)))
}

/// The DER subject name of (attribute, value) pairs in order, e.g. `[("CN", "dev1"), ("O", "Contoso")]`.
pub fn subject_from_pairs(pairs: &[(String, String)]) -> Result<Vec<u8>, String> {
    let mut attributes = Vec::with_capacity(pairs.len());
    for (attribute, value) in pairs {
        let oid = cert_api::subject::attribute_oid(attribute).ok_or_else(|| {
            format!("subject attribute {attribute:?} is not a known DN attribute")
        })?;
        let limit = cert_api::subject::MAX_COMMON_NAME_CHARS;
        if oid == cert_api::subject::OID_COMMON_NAME && value.chars().count() > limit {
            return Err(format!(
                "subject attribute {attribute:?} is longer than {limit} characters"
            ));
        }
        if value.is_empty() {
            return Err(format!("subject attribute {attribute:?} is empty"));
        }
        attributes.push((oid, value.as_str()));
    }
    cert_api::subject::name(&attributes)
        .and_then(|name| name.to_der())
        .map_err(|error| error.to_string())
}

/// The DER subject of the first certificate of a PEM chain.
pub fn subject_der(pem: &str) -> Result<Vec<u8>, String> {
    leaf(pem)?
        .tbs_certificate
        .subject
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

    /// The SubjectPublicKeyInfos built here from keyd's parameters are byte for byte what
    /// OpenSSL writes for the same keys.
    #[test]
    fn public_keys_match_openssl() {
        let group =
            openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        let ec = openssl::ec::EcKey::generate(&group).unwrap();
        let mut context = openssl::bn::BigNumContext::new().unwrap();
        let point = ec
            .public_key()
            .to_bytes(
                &group,
                openssl::ec::PointConversionForm::COMPRESSED,
                &mut context,
            )
            .unwrap();
        let expected = openssl::pkey::PKey::from_ec_key(ec)
            .unwrap()
            .public_key_to_der()
            .unwrap();
        assert_eq!(ec_public_key_der(P256_OID_DER, &point).unwrap(), expected);
        assert_eq!(point.len(), 33, "keyd's form");
        assert!(ec_public_key_der(P256_OID_DER, &point[1..]).is_err());
        assert!(ec_public_key_der(&[0x06, 0x01, 0x00], &point).is_err());

        let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
        let (modulus, exponent) = (rsa.n().to_vec(), rsa.e().to_vec());
        let expected = openssl::pkey::PKey::from_rsa(rsa)
            .unwrap()
            .public_key_to_der()
            .unwrap();
        assert_eq!(rsa_public_key_der(&modulus, &exponent).unwrap(), expected);
        // A leading zero byte (as some encoders send it) changes nothing.
        let padded: Vec<u8> = std::iter::once(0).chain(modulus.iter().copied()).collect();
        assert_eq!(rsa_public_key_der(&padded, &exponent).unwrap(), expected);
        assert!(rsa_public_key_der(&[], &exponent).is_err());
    }

    /// Subjects, validity and the common name read here agree with OpenSSL.
    #[test]
    fn certificates_read_as_openssl_reads_them() {
        let pairs: Vec<(String, String)> = [("C", "DE"), ("O", "Contoso"), ("CN", "dev-1")]
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        for (attribute, value) in &pairs {
            name.append_entry_by_text(attribute, value).unwrap();
        }
        let name = name.build();
        assert_eq!(subject_from_pairs(&pairs).unwrap(), name.to_der().unwrap());
        assert!(subject_from_pairs(&[("XYZ".to_owned(), "v".to_owned())]).is_err());
        assert!(subject_from_pairs(&[("CN".to_owned(), "x".repeat(65))]).is_err());
        assert!(subject_from_pairs(&[("O".to_owned(), String::new())]).is_err());
        // identityd's config upper-cases attribute names; mixed-case ones still resolve.
        assert!(subject_from_pairs(&[("POSTALCODE".to_owned(), "12345".to_owned())]).is_ok());

        let group =
            openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        let key = openssl::pkey::PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap())
            .unwrap();
        let mut builder = openssl::x509::X509::builder().unwrap();
        builder.set_version(2).unwrap();
        builder.set_subject_name(&name).unwrap();
        builder.set_issuer_name(&name).unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_not_before(&openssl::asn1::Asn1Time::from_unix(1_700_000_000).unwrap())
            .unwrap();
        builder
            .set_not_after(&openssl::asn1::Asn1Time::from_unix(4_102_444_800).unwrap())
            .unwrap();
        builder
            .sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        let pem = String::from_utf8(builder.build().to_pem().unwrap()).unwrap();
        // 2100-01-01 is written as GeneralizedTime, 2023 as UTCTime: both are read.
        assert_eq!(validity(&pem).unwrap(), (1_700_000_000, 4_102_444_800));
        assert_eq!(subject_der(&pem).unwrap(), name.to_der().unwrap());
        assert_eq!(
            crate::cloud::tls::leaf_common_name(&pem).as_deref(),
            Some("dev-1")
        );
        assert!(validity("not a certificate").is_err());
    }
}
