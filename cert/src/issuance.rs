//! X.509 issuance without the private key: parse and check a CSR, build the TBSCertificate, hash
//! it for keyd, and assemble the signed certificate from keyd's signature.
//!
//! Everything here is pure computation (no keyd, no storage, no HTTP). The key never leaves
//! keyd, so OpenSSL's certificate builder (which signs with a local key) cannot be used; the
//! TBSCertificate is built with the RustCrypto `x509-cert` types instead, which also keep CSR
//! extensions byte-for-byte. OpenSSL checks signatures (the CSR's, and the final certificate's
//! against the expected issuer key).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::asn1::{
    Any, BitString, GeneralizedTime, ObjectIdentifier, OctetString, SetOfVec, UtcTime,
};
use der::{Decode, Encode, Reader, Tag, Tagged};
use openssl::pkey::{PKey, Public};
use x509_cert::certificate::{Certificate, TbsCertificate, Version};
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, SubjectKeyIdentifier};
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::request::CertReq;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};

use crate::config::SubjectSpec;
use crate::error::CertError;
use crate::pem;

const OID_EXTENSION_REQUEST: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.14");
const OID_SUBJECT_KEY_IDENTIFIER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");
const OID_AUTHORITY_KEY_IDENTIFIER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.35");
use cert_api::subject::{MAX_COMMON_NAME_CHARS, OID_COMMON_NAME};
const OID_SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const OID_ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");

/// The DER prefix of a PKCS#1 v1.5 `DigestInfo` for SHA-256; the 32-byte digest follows.
const SHA256_DIGEST_INFO_PREFIX: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// Clock-skew allowance subtracted from notBefore.
const NOT_BEFORE_SKEW: Duration = Duration::from_secs(60);

/// First second that needs GeneralizedTime (2050-01-01T00:00:00Z).
const GENERALIZED_TIME_FROM: u64 = 2_524_608_000;

fn encoding(error: der::Error) -> CertError {
    CertError::Encoding(error.to_string())
}

/// A public key in the form keyd's `/parameters` gives it, so keys from keyd, CSRs and
/// certificates can be compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKey {
    /// An EC key.
    Ec {
        /// DER of the curve OID (tag included).
        curve_oid: Vec<u8>,
        /// The point in compressed SEC1 form.
        point: Vec<u8>,
    },
    /// An RSA key.
    Rsa {
        /// Big-endian modulus without leading zeros.
        modulus: Vec<u8>,
        /// Big-endian public exponent without leading zeros.
        exponent: Vec<u8>,
    },
}

/// The curves certd can rebuild from a curve OID: P-256, P-384, P-521.
const CURVES: &[(&[u8], openssl::nid::Nid)] = &[
    (
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
        openssl::nid::Nid::X9_62_PRIME256V1,
    ),
    (
        &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22],
        openssl::nid::Nid::SECP384R1,
    ),
    (
        &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23],
        openssl::nid::Nid::SECP521R1,
    ),
];

impl PublicKey {
    /// The comparable form of an OpenSSL public key; `None` for key types certd cannot use.
    pub fn from_pkey(key: &PKey<Public>) -> Result<Option<Self>, CertError> {
        match key.id() {
            openssl::pkey::Id::EC => {
                let ec = key.ec_key()?;
                let Some(nid) = ec.group().curve_name() else {
                    return Ok(None);
                };
                let Some((curve_oid, _)) = CURVES.iter().find(|(_, known)| *known == nid) else {
                    return Ok(None);
                };
                let mut context = openssl::bn::BigNumContext::new()?;
                let point = ec.public_key().to_bytes(
                    ec.group(),
                    openssl::ec::PointConversionForm::COMPRESSED,
                    &mut context,
                )?;
                Ok(Some(PublicKey::Ec {
                    curve_oid: curve_oid.to_vec(),
                    point,
                }))
            }
            openssl::pkey::Id::RSA => {
                let rsa = key.rsa()?;
                Ok(Some(PublicKey::Rsa {
                    modulus: rsa.n().to_vec(),
                    exponent: rsa.e().to_vec(),
                }))
            }
            _ => Ok(None),
        }
    }

    /// The OpenSSL key; `None` when the curve is not one certd knows.
    pub fn to_pkey(&self) -> Result<Option<PKey<Public>>, CertError> {
        match self {
            PublicKey::Ec { curve_oid, point } => {
                let Some((_, nid)) = CURVES.iter().find(|(oid, _)| oid == curve_oid) else {
                    return Ok(None);
                };
                let group = openssl::ec::EcGroup::from_curve_name(*nid)?;
                let mut context = openssl::bn::BigNumContext::new()?;
                let point = openssl::ec::EcPoint::from_bytes(&group, point, &mut context)?;
                let ec = openssl::ec::EcKey::from_public_key(&group, &point)?;
                Ok(Some(PKey::from_ec_key(ec)?))
            }
            PublicKey::Rsa { modulus, exponent } => {
                let rsa = openssl::rsa::Rsa::from_public_components(
                    openssl::bn::BigNum::from_slice(modulus)?,
                    openssl::bn::BigNum::from_slice(exponent)?,
                )?;
                Ok(Some(PKey::from_rsa(rsa)?))
            }
        }
    }

    /// The signature algorithm certd uses with this key.
    pub fn signature_algorithm(&self) -> SignatureAlgorithm {
        match self {
            PublicKey::Ec { .. } => SignatureAlgorithm::EcdsaSha256,
            PublicKey::Rsa { .. } => SignatureAlgorithm::RsaSha256,
        }
    }
}

/// How a certificate is signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureAlgorithm {
    /// `ecdsa-with-SHA256`: keyd `/sign` `ECDSA` over SHA-256(TBS).
    EcdsaSha256,
    /// `sha256WithRSAEncryption`: keyd `/encrypt` `RSA-PKCS1` over the DigestInfo.
    RsaSha256,
}

impl SignatureAlgorithm {
    /// The AlgorithmIdentifier of signatures made this way.
    pub fn identifier(self) -> AlgorithmIdentifierOwned {
        match self {
            SignatureAlgorithm::EcdsaSha256 => AlgorithmIdentifierOwned {
                oid: OID_ECDSA_WITH_SHA256,
                parameters: None,
            },
            SignatureAlgorithm::RsaSha256 => AlgorithmIdentifierOwned {
                oid: OID_SHA256_WITH_RSA,
                parameters: Some(Any::null()),
            },
        }
    }

    /// What keyd is asked to sign (ECDSA) or encrypt (RSA) for this TBSCertificate.
    pub fn keyd_input(self, tbs_der: &[u8]) -> Vec<u8> {
        let digest = openssl::sha::sha256(tbs_der);
        match self {
            SignatureAlgorithm::EcdsaSha256 => digest.to_vec(),
            SignatureAlgorithm::RsaSha256 => {
                let mut input = SHA256_DIGEST_INFO_PREFIX.to_vec();
                input.extend_from_slice(&digest);
                input
            }
        }
    }
}

/// A checked CSR.
#[derive(Debug)]
pub struct Csr {
    /// The requested subject.
    pub subject: Name,
    /// The subject public key.
    pub spki: SubjectPublicKeyInfoOwned,
    /// The requested extensions (PKCS#9 `extensionRequest`), in order.
    pub extensions: Vec<Extension>,
    /// The public key, for comparisons.
    pub public_key: PKey<Public>,
    /// The request's DER, as received (EST forwards it unchanged).
    pub der: Vec<u8>,
}

/// Parses a CSR given as PEM (`CERTIFICATE REQUEST` or `NEW CERTIFICATE REQUEST`) or as base64 of
/// the DER, and checks its signature against its own public key.
pub fn parse_csr(text: &str) -> Result<Csr, CertError> {
    let der = if text.contains("-----BEGIN") {
        let blocks =
            pem::blocks(text).map_err(|error| CertError::invalid("csr", error.to_string()))?;
        blocks
            .into_iter()
            .find(|block| {
                block.label == "CERTIFICATE REQUEST" || block.label == "NEW CERTIFICATE REQUEST"
            })
            .map(|block| block.der)
            .ok_or_else(|| CertError::invalid("csr", "contains no CERTIFICATE REQUEST PEM block"))?
    } else {
        pem::decode_base64_lines(text).ok_or_else(|| {
            CertError::invalid(
                "csr",
                "is neither PEM nor base64 of a DER certification request",
            )
        })?
    };
    let not_a_request =
        || CertError::invalid("csr", "is not a valid PKCS#10 certification request");
    let request = openssl::x509::X509Req::from_der(&der).map_err(|_| not_a_request())?;
    let public_key = request
        .public_key()
        .map_err(|_| CertError::invalid("csr", "has an unsupported or invalid public key"))?;
    if !request.verify(&public_key).unwrap_or(false) {
        return Err(CertError::BadRequest("csr signature is invalid".to_owned()));
    }
    let parsed = CertReq::from_der(&der).map_err(|_| not_a_request())?;
    let mut extensions: Vec<Extension> = Vec::new();
    for attribute in parsed.info.attributes.iter() {
        if attribute.oid != OID_EXTENSION_REQUEST {
            continue;
        }
        for value in attribute.values.iter() {
            let requested: Vec<Extension> = value
                .decode_as()
                .map_err(|_| CertError::invalid("csr", "has a malformed extensionRequest"))?;
            extensions.extend(requested);
        }
    }
    for (index, extension) in extensions.iter().enumerate() {
        if extensions[..index]
            .iter()
            .any(|earlier| earlier.extn_id == extension.extn_id)
        {
            return Err(CertError::invalid(
                "csr",
                format!("requests extension {} more than once", extension.extn_id),
            ));
        }
    }
    Ok(Csr {
        subject: parsed.info.subject,
        spki: parsed.info.public_key,
        extensions,
        public_key,
        der,
    })
}

const OID_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const OID_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const OID_NAME_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.30");
const OID_POLICY_MAPPINGS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.33");
const OID_POLICY_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.36");
const OID_INHIBIT_ANY_POLICY: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.54");
/// Netscape certificate type: OpenSSL still treats a certificate without basicConstraints whose
/// nsCertType has a CA bit as a CA.
const OID_NETSCAPE_CERT_TYPE: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("2.16.840.1.113730.1.1");

/// keyUsage bits (RFC 5280 §4.2.1.3) only a CA may have.
const KEY_USAGE_CA_BITS: [(usize, &str); 2] = [(5, "keyCertSign"), (6, "cRLSign")];
/// nsCertType bits that mark a CA (SSL CA, S/MIME CA, object-signing CA).
const NETSCAPE_CA_BITS: [(usize, &str); 3] =
    [(5, "SSL CA"), (6, "S/MIME CA"), (7, "object-signing CA")];

/// Whether bit `index` (0 = most significant bit of the first octet) of a BIT STRING is set.
/// Unused trailing bits do not count (OpenSSL clears them when it decodes).
fn bit_set(bits: &BitString, index: usize) -> bool {
    bits.bits().nth(index).unwrap_or(false)
}

/// `basicConstraints`, decoded leniently (an explicit `cA FALSE` is accepted): whether cA is
/// asserted and whether a pathLenConstraint is present.
fn basic_constraints(value: &[u8]) -> der::Result<(bool, bool)> {
    let mut reader = der::SliceReader::new(value)?;
    let parsed = reader.sequence(|sequence| {
        let ca = sequence.decode::<Option<bool>>()?.unwrap_or(false);
        let path_len = sequence.decode::<Option<der::asn1::Int>>()?.is_some();
        Ok((ca, path_len))
    })?;
    reader.finish(parsed)
}

/// The extensions of a local CA certd makes itself: basicConstraints CA:TRUE and keyUsage
/// digitalSignature, keyCertSign, cRLSign, both critical.
pub fn local_ca_extensions() -> Result<Vec<Extension>, CertError> {
    use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages};
    let critical = |mut extension: Extension| {
        extension.critical = true;
        extension
    };
    let basic = BasicConstraints {
        ca: true,
        path_len_constraint: None,
    };
    let usage = KeyUsage(KeyUsages::DigitalSignature | KeyUsages::KeyCertSign | KeyUsages::CRLSign);
    Ok(vec![
        critical(extension(OID_BASIC_CONSTRAINTS, &basic)?),
        critical(extension(OID_KEY_USAGE, &usage)?),
    ])
}

/// The first thing in `extensions` that only a CA certificate may carry, described for an error
/// message (`basicConstraints CA:TRUE`, `keyUsage keyCertSign`, `nameConstraints`, ...), or
/// `None` for a leaf request. An extension certd must inspect but cannot decode is a 400: it is
/// never passed on unexamined.
///
/// CA-only: basicConstraints with cA or a pathLenConstraint; keyUsage keyCertSign or cRLSign
/// (OpenSSL accepts a certificate with keyCertSign and no basicConstraints as a CA); nsCertType
/// with a CA bit (likewise); nameConstraints, policyMappings, policyConstraints and
/// inhibitAnyPolicy (RFC 5280 defines them for CA certificates only).
pub fn ca_only_request(extensions: &[Extension]) -> Result<Option<String>, CertError> {
    let malformed =
        |name: &str| CertError::invalid("csr", format!("has a malformed {name} extension"));
    for extension in extensions {
        let value = extension.extn_value.as_bytes();
        let id = extension.extn_id;
        if id == OID_BASIC_CONSTRAINTS {
            let (ca, path_len) =
                basic_constraints(value).map_err(|_| malformed("basicConstraints"))?;
            if ca {
                return Ok(Some("basicConstraints CA:TRUE".to_owned()));
            }
            if path_len {
                return Ok(Some("basicConstraints pathLenConstraint".to_owned()));
            }
        } else if id == OID_KEY_USAGE || id == OID_NETSCAPE_CERT_TYPE {
            let (name, ca_bits): (&str, &[(usize, &str)]) = if id == OID_KEY_USAGE {
                ("keyUsage", &KEY_USAGE_CA_BITS)
            } else {
                ("nsCertType", &NETSCAPE_CA_BITS)
            };
            let bits = BitString::from_der(value).map_err(|_| malformed(name))?;
            if let Some((_, bit_name)) = ca_bits.iter().find(|(index, _)| bit_set(&bits, *index)) {
                return Ok(Some(format!("{name} {bit_name}")));
            }
        } else {
            let ca_only = [
                (OID_NAME_CONSTRAINTS, "nameConstraints"),
                (OID_POLICY_MAPPINGS, "policyMappings"),
                (OID_POLICY_CONSTRAINTS, "policyConstraints"),
                (OID_INHIBIT_ANY_POLICY, "inhibitAnyPolicy"),
            ];
            if let Some((_, name)) = ca_only.iter().find(|(oid, _)| *oid == id) {
                return Ok(Some((*name).to_owned()));
            }
        }
    }
    Ok(None)
}

/// An issuer certificate, read from its stored PEM chain.
#[derive(Debug)]
pub struct IssuerCert {
    /// The issuer's cert ID.
    pub id: String,
    /// Its subject (the new certificate's issuer name).
    pub subject: Name,
    /// Its key identifier: its SKID, or SHA-1 of its public key when it has none.
    pub key_identifier: Vec<u8>,
    /// Its notAfter.
    pub not_after: SystemTime,
    /// Its public key.
    pub public_key: PKey<Public>,
    /// Its public key in comparable form (`None`: a key type certd cannot sign with).
    pub comparable_key: Option<PublicKey>,
    /// The stored PEM chain, appended to issued certificates.
    pub chain: String,
}

/// Reads the first certificate of `chain` (cert `id`) as an issuer.
pub fn issuer_from_pem(id: &str, chain: String) -> Result<IssuerCert, CertError> {
    let unusable = |reason: &str| CertError::UnusableIssuer {
        id: id.to_owned(),
        reason: reason.to_owned(),
    };
    let blocks = pem::blocks(&chain).map_err(|error| unusable(&error.to_string()))?;
    let der = blocks
        .into_iter()
        .find(|block| block.label == "CERTIFICATE")
        .map(|block| block.der)
        .ok_or_else(|| unusable("no PEM CERTIFICATE block"))?;
    let certificate =
        Certificate::from_der(&der).map_err(|_| unusable("not a valid X.509 certificate"))?;
    let public_key = openssl::x509::X509::from_der(&der)
        .and_then(|x509| x509.public_key())
        .map_err(|_| unusable("its public key cannot be read"))?;
    let tbs = certificate.tbs_certificate;
    let key_identifier = match tbs.get::<SubjectKeyIdentifier>() {
        Ok(Some((_, skid))) => skid.0.as_bytes().to_vec(),
        Ok(None) => key_identifier(&tbs.subject_public_key_info),
        Err(_) => return Err(unusable("its subjectKeyIdentifier is malformed")),
    };
    let comparable_key = PublicKey::from_pkey(&public_key)?;
    Ok(IssuerCert {
        id: id.to_owned(),
        subject: tbs.subject,
        key_identifier,
        not_after: tbs.validity.not_after.to_system_time(),
        public_key,
        comparable_key,
        chain,
    })
}

/// RFC 5280 §4.2.1.2 method 1: SHA-1 of the subjectPublicKey BIT STRING value.
pub fn key_identifier(spki: &SubjectPublicKeyInfoOwned) -> Vec<u8> {
    openssl::sha::sha1(spki.subject_public_key.raw_bytes()).to_vec()
}

/// A SubjectPublicKeyInfo from an OpenSSL key.
pub fn spki_of(key: &PKey<Public>) -> Result<SubjectPublicKeyInfoOwned, CertError> {
    SubjectPublicKeyInfoOwned::from_der(&key.public_key_to_der()?).map_err(encoding)
}

/// What the new certificate certifies.
#[derive(Debug)]
pub struct Template {
    /// The subject.
    pub subject: Name,
    /// The subject public key.
    pub spki: SubjectPublicKeyInfoOwned,
    /// Extensions to copy verbatim (from the CSR).
    pub extensions: Vec<Extension>,
}

/// Who signs.
#[derive(Clone, Copy, Debug)]
pub enum IssuedBy<'a> {
    /// The subject's own key (self-signed).
    Itself,
    /// The holder of this certificate.
    Cert(&'a IssuerCert),
}

fn encode_time(time: SystemTime) -> Result<Time, CertError> {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CertError::Encoding("time before 1970".to_owned()))?
        .as_secs();
    let whole = Duration::from_secs(seconds);
    if seconds < GENERALIZED_TIME_FROM {
        Ok(Time::from(
            UtcTime::from_unix_duration(whole).map_err(encoding)?,
        ))
    } else {
        Ok(Time::from(
            GeneralizedTime::from_unix_duration(whole).map_err(encoding)?,
        ))
    }
}

/// 16 random bytes, most significant bit cleared, first byte never zero: a positive 16-octet
/// DER INTEGER that is never zero.
fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0_u8; 16];
    openssl::rand::rand_bytes(&mut bytes)?;
    bytes[0] &= 0x7f;
    if bytes[0] == 0 {
        bytes[0] = 0x01;
    }
    SerialNumber::new(&bytes).map_err(encoding)
}

fn extension(oid: ObjectIdentifier, value: &impl Encode) -> Result<Extension, CertError> {
    Ok(Extension {
        extn_id: oid,
        critical: false,
        extn_value: OctetString::new(value.to_der().map_err(encoding)?).map_err(encoding)?,
    })
}

/// Builds the TBSCertificate: random serial, notBefore now − 60 s, notAfter now + `expiry_days`
/// capped at the issuer's notAfter, the template's extensions verbatim plus SKID and AKID when
/// they are missing. An expired issuer is refused.
pub fn build_tbs(
    template: &Template,
    issued_by: IssuedBy<'_>,
    algorithm: SignatureAlgorithm,
    expiry_days: u32,
    now: SystemTime,
) -> Result<TbsCertificate, CertError> {
    let mut not_after = now + Duration::from_secs(u64::from(expiry_days) * 86_400);
    if let IssuedBy::Cert(issuer) = issued_by {
        if issuer.not_after <= now {
            return Err(CertError::IssuerExpired(issuer.id.clone()));
        }
        not_after = not_after.min(issuer.not_after);
    }
    let not_before = now.checked_sub(NOT_BEFORE_SKEW).unwrap_or(UNIX_EPOCH);

    let mut extensions = template.extensions.clone();
    let requested_skid = extensions
        .iter()
        .find(|extension| extension.extn_id == OID_SUBJECT_KEY_IDENTIFIER)
        .and_then(|extension| SubjectKeyIdentifier::from_der(extension.extn_value.as_bytes()).ok())
        .map(|skid| skid.0.as_bytes().to_vec());
    let own_key_identifier = match requested_skid {
        Some(skid) => skid,
        None => {
            let computed = key_identifier(&template.spki);
            if !extensions
                .iter()
                .any(|extension| extension.extn_id == OID_SUBJECT_KEY_IDENTIFIER)
            {
                extensions.push(extension(
                    OID_SUBJECT_KEY_IDENTIFIER,
                    &SubjectKeyIdentifier(OctetString::new(computed.clone()).map_err(encoding)?),
                )?);
            }
            computed
        }
    };
    if !extensions
        .iter()
        .any(|extension| extension.extn_id == OID_AUTHORITY_KEY_IDENTIFIER)
    {
        let authority = match issued_by {
            IssuedBy::Itself => own_key_identifier,
            IssuedBy::Cert(issuer) => issuer.key_identifier.clone(),
        };
        extensions.push(extension(
            OID_AUTHORITY_KEY_IDENTIFIER,
            &AuthorityKeyIdentifier {
                key_identifier: Some(OctetString::new(authority).map_err(encoding)?),
                authority_cert_issuer: None,
                authority_cert_serial_number: None,
            },
        )?);
    }

    Ok(TbsCertificate {
        version: Version::V3,
        serial_number: random_serial()?,
        signature: algorithm.identifier(),
        issuer: match issued_by {
            IssuedBy::Itself => template.subject.clone(),
            IssuedBy::Cert(issuer) => issuer.subject.clone(),
        },
        validity: Validity {
            not_before: encode_time(not_before)?,
            not_after: encode_time(not_after)?,
        },
        subject: template.subject.clone(),
        subject_public_key_info: template.spki.clone(),
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(extensions),
    })
}

/// The DER of a TBSCertificate (what is hashed and signed).
pub fn tbs_der(tbs: &TbsCertificate) -> Result<Vec<u8>, CertError> {
    tbs.to_der().map_err(encoding)
}

/// The signed certificate's DER, from the TBSCertificate and keyd's signature.
pub fn assemble(
    tbs: TbsCertificate,
    algorithm: SignatureAlgorithm,
    signature: &[u8],
) -> Result<Vec<u8>, CertError> {
    Certificate {
        tbs_certificate: tbs,
        signature_algorithm: algorithm.identifier(),
        signature: BitString::from_bytes(signature).map_err(encoding)?,
    }
    .to_der()
    .map_err(encoding)
}

/// Whether `signature` over `tbs_der` verifies with `key` (the check that keyd signed with the
/// expected key). Works on the bytes directly: parsing the finished certificate with OpenSSL
/// would decode its public key through OpenSSL 3's slow decoder machinery for nothing.
pub fn signature_verifies(
    algorithm: SignatureAlgorithm,
    tbs_der: &[u8],
    signature: &[u8],
    key: &PKey<Public>,
) -> bool {
    let expected_type = match algorithm {
        SignatureAlgorithm::EcdsaSha256 => openssl::pkey::Id::EC,
        SignatureAlgorithm::RsaSha256 => openssl::pkey::Id::RSA,
    };
    if key.id() != expected_type {
        return false;
    }
    openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), key)
        .and_then(|mut verifier| verifier.verify_oneshot(signature, tbs_der))
        .unwrap_or(false)
}

fn truncate_chars(text: &str, limit: usize) -> &str {
    match text.char_indices().nth(limit) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}

/// A name of one-attribute RDNs, in the given order, every common name cut to 64 characters.
fn name_of(attributes: &[(ObjectIdentifier, &str)]) -> Result<Name, CertError> {
    let cut: Vec<(ObjectIdentifier, &str)> = attributes
        .iter()
        .map(|(oid, value)| {
            if *oid == OID_COMMON_NAME {
                (*oid, truncate_chars(value, MAX_COMMON_NAME_CHARS))
            } else {
                (*oid, *value)
            }
        })
        .collect();
    cert_api::subject::name(&cut).map_err(encoding)
}

/// `CN=<common name>` (cut to 64 characters).
pub fn common_name_subject(common_name: &str) -> Result<Name, CertError> {
    name_of(&[(OID_COMMON_NAME, common_name)])
}

/// The subject that issuance options impose.
pub fn subject_from_spec(spec: &SubjectSpec) -> Result<Name, CertError> {
    match spec {
        SubjectSpec::CommonName(common_name) => common_name_subject(common_name),
        SubjectSpec::Fields(fields) => {
            let mut attributes = Vec::with_capacity(fields.len());
            for (short_name, value) in fields {
                let oid = cert_api::subject::attribute_oid(short_name).ok_or_else(|| {
                    CertError::Encoding(format!("unknown subject attribute {short_name:?}"))
                })?;
                attributes.push((oid, value.as_str()));
            }
            name_of(&attributes)
        }
    }
}

/// Cuts every common name longer than 64 characters in `name` (string types whose bytes are
/// characters: UTF8String, PrintableString, IA5String); other attributes are kept verbatim.
pub fn truncate_common_names(mut name: Name) -> Result<Name, CertError> {
    for rdn in &mut name.0 {
        let needs_cut = rdn.0.iter().any(|attribute| {
            attribute.oid == OID_COMMON_NAME
                && matches!(
                    attribute.value.tag(),
                    Tag::Utf8String | Tag::PrintableString | Tag::Ia5String
                )
                && std::str::from_utf8(attribute.value.value())
                    .is_ok_and(|text| text.chars().count() > MAX_COMMON_NAME_CHARS)
        });
        if !needs_cut {
            continue;
        }
        let mut rebuilt = SetOfVec::new();
        for attribute in rdn.0.iter() {
            let mut attribute = attribute.clone();
            if attribute.oid == OID_COMMON_NAME {
                if let Ok(text) = std::str::from_utf8(attribute.value.value()) {
                    let cut = truncate_chars(text, MAX_COMMON_NAME_CHARS)
                        .as_bytes()
                        .to_vec();
                    attribute.value = Any::new(attribute.value.tag(), cut).map_err(encoding)?;
                }
            }
            rebuilt.insert(attribute).map_err(encoding)?;
        }
        rdn.0 = rebuilt;
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::hash::MessageDigest;
    use openssl::pkey::Private;
    use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
    use x509_cert::attr::AttributeTypeAndValue;
    use x509_cert::name::{RdnSequence, RelativeDistinguishedName};

    fn ec_key() -> PKey<Private> {
        let group =
            openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap()).unwrap()
    }

    fn rsa_key() -> PKey<Private> {
        PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap()
    }

    fn public(key: &PKey<Private>) -> PKey<Public> {
        PKey::public_key_from_der(&key.public_key_to_der().unwrap()).unwrap()
    }

    fn csr(key: &PKey<Private>, common_name: &str, ca: bool) -> String {
        let mut builder = openssl::x509::X509ReqBuilder::new().unwrap();
        builder.set_pubkey(key).unwrap();
        // Built through DER: OpenSSL's name builder refuses common names over 64 characters.
        let mut set = SetOfVec::new();
        set.insert(AttributeTypeAndValue {
            oid: OID_COMMON_NAME,
            value: Any::new(Tag::Utf8String, common_name.as_bytes()).unwrap(),
        })
        .unwrap();
        let name = RdnSequence(vec![RelativeDistinguishedName(set)]);
        let name = openssl::x509::X509Name::from_der(&name.to_der().unwrap()).unwrap();
        builder.set_subject_name(&name).unwrap();
        let mut extensions = openssl::stack::Stack::new().unwrap();
        if ca {
            extensions
                .push(
                    BasicConstraints::new()
                        .critical()
                        .ca()
                        .pathlen(0)
                        .build()
                        .unwrap(),
                )
                .unwrap();
            extensions
                .push(KeyUsage::new().critical().key_cert_sign().build().unwrap())
                .unwrap();
        } else {
            let context = builder.x509v3_context(None);
            extensions
                .push(
                    SubjectAlternativeName::new()
                        .dns("module.local")
                        .build(&context)
                        .unwrap(),
                )
                .unwrap();
        }
        builder.add_extensions(&extensions).unwrap();
        builder.sign(key, MessageDigest::sha256()).unwrap();
        String::from_utf8(builder.build().to_pem().unwrap()).unwrap()
    }

    /// Signs locally what keyd would sign, to test the assembly end to end.
    fn sign_like_keyd(key: &PKey<Private>, algorithm: SignatureAlgorithm, tbs: &[u8]) -> Vec<u8> {
        let input = algorithm.keyd_input(tbs);
        match algorithm {
            SignatureAlgorithm::EcdsaSha256 => {
                let signature =
                    openssl::ecdsa::EcdsaSig::sign(&input, &key.ec_key().unwrap()).unwrap();
                signature.to_der().unwrap()
            }
            SignatureAlgorithm::RsaSha256 => {
                let rsa = key.rsa().unwrap();
                let mut output = vec![0; rsa.size() as usize];
                let length = rsa
                    .private_encrypt(&input, &mut output, openssl::rsa::Padding::PKCS1)
                    .unwrap();
                output.truncate(length);
                output
            }
        }
    }

    fn issue(
        template: &Template,
        issued_by: IssuedBy<'_>,
        key: &PKey<Private>,
        days: u32,
    ) -> openssl::x509::X509 {
        let algorithm = PublicKey::from_pkey(&public(key))
            .unwrap()
            .unwrap()
            .signature_algorithm();
        let tbs = build_tbs(template, issued_by, algorithm, days, SystemTime::now()).unwrap();
        let der = tbs_der(&tbs).unwrap();
        let signature = sign_like_keyd(key, algorithm, &der);
        assert!(signature_verifies(
            algorithm,
            &der,
            &signature,
            &public(key)
        ));
        assert!(!signature_verifies(
            algorithm,
            &der,
            &signature,
            &public(&ec_key())
        ));
        let certificate = assemble(tbs, algorithm, &signature).unwrap();
        let certificate = openssl::x509::X509::from_der(&certificate).unwrap();
        assert!(certificate.verify(&public(key)).unwrap());
        certificate
    }

    fn template_from(csr: &Csr) -> Template {
        Template {
            subject: csr.subject.clone(),
            spki: csr.spki.clone(),
            extensions: csr.extensions.clone(),
        }
    }

    #[test]
    fn self_signed_then_issued_chain_verifies_with_openssl() {
        for ca_key in [ec_key(), rsa_key()] {
            let ca_csr = parse_csr(&csr(&ca_key, "test ca", true)).unwrap();
            assert_eq!(ca_csr.extensions.len(), 2);
            let ca = issue(&template_from(&ca_csr), IssuedBy::Itself, &ca_key, 10);
            let ca_pem = String::from_utf8(ca.to_pem().unwrap()).unwrap();
            let issuer = issuer_from_pem("ca", ca_pem).unwrap();

            let leaf_key = ec_key();
            let leaf_csr = parse_csr(&csr(&leaf_key, "leaf", false)).unwrap();
            let leaf = issue(
                &template_from(&leaf_csr),
                IssuedBy::Cert(&issuer),
                &ca_key,
                365,
            );

            // Validity is capped at the issuer's notAfter.
            assert_eq!(
                leaf.not_after().compare(ca.not_after()).unwrap(),
                std::cmp::Ordering::Equal
            );
            assert_ne!(
                leaf.serial_number().to_bn().unwrap(),
                ca.serial_number().to_bn().unwrap()
            );
            assert_eq!(
                leaf.authority_key_id().unwrap().as_slice(),
                ca.subject_key_id().unwrap().as_slice()
            );
            assert_eq!(
                ca.authority_key_id().unwrap().as_slice(),
                ca.subject_key_id().unwrap().as_slice()
            );

            let mut store = openssl::x509::store::X509StoreBuilder::new().unwrap();
            store.add_cert(ca.clone()).unwrap();
            let store = store.build();
            let mut context = openssl::x509::X509StoreContext::new().unwrap();
            let chain = openssl::stack::Stack::new().unwrap();
            let verified = context
                .init(&store, &leaf, &chain, |context| {
                    let ok = context.verify_cert()?;
                    assert!(ok, "{}", context.error());
                    Ok(ok)
                })
                .unwrap();
            assert!(verified);
        }
    }

    #[test]
    fn expired_issuer_is_refused_and_serials_are_positive() {
        let key = ec_key();
        let parsed = parse_csr(&csr(&key, "x", false)).unwrap();
        let issuer = IssuerCert {
            id: "old-ca".into(),
            subject: parsed.subject.clone(),
            key_identifier: vec![1, 2, 3],
            not_after: SystemTime::now() - Duration::from_secs(1),
            public_key: public(&key),
            comparable_key: None,
            chain: String::new(),
        };
        let error = build_tbs(
            &template_from(&parsed),
            IssuedBy::Cert(&issuer),
            SignatureAlgorithm::EcdsaSha256,
            1,
            SystemTime::now(),
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "issuer certificate \"old-ca\" has expired"
        );

        for _ in 0..64 {
            let serial = random_serial().unwrap();
            let bytes = serial.as_bytes();
            assert_eq!(bytes.len(), 16);
            assert!(bytes[0] != 0 && bytes[0] < 0x80);
        }
    }

    #[test]
    fn csr_inputs() {
        let key = ec_key();
        let text = csr(&key, "x", true);
        // base64 of DER is accepted too.
        let der = pem::blocks(&text).unwrap().remove(0).der;
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode(&der);
        assert_eq!(parse_csr(&encoded).unwrap().extensions.len(), 2);
        let relabeled = text.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST");
        parse_csr(&relabeled).unwrap();

        // A flipped bit in the signature is caught.
        let mut tampered = der.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        let error = parse_csr(&pem::encode("CERTIFICATE REQUEST", &tampered)).unwrap_err();
        assert_eq!(error.to_string(), "csr signature is invalid");

        for garbage in [
            "",
            "garbage!",
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
        ] {
            let error = parse_csr(garbage).unwrap_err();
            assert!(error.to_string().starts_with("csr"), "{error}");
        }
    }

    #[test]
    fn ca_only_requests_are_recognized() {
        let ext = |oid: &str, der: &[u8]| Extension {
            extn_id: ObjectIdentifier::new_unwrap(oid),
            critical: true,
            extn_value: OctetString::new(der.to_vec()).unwrap(),
        };
        let basic = "2.5.29.19";
        let key_usage = "2.5.29.15";
        let netscape = "2.16.840.1.113730.1.1";
        let cases: [(&str, &[u8], Option<&str>); 13] = [
            (basic, &[0x30, 0x00], None),
            (basic, &[0x30, 0x03, 0x01, 0x01, 0x00], None),
            (
                basic,
                &[0x30, 0x03, 0x01, 0x01, 0xff],
                Some("basicConstraints CA:TRUE"),
            ),
            (
                basic,
                &[0x30, 0x06, 0x01, 0x01, 0xff, 0x02, 0x01, 0x00],
                Some("basicConstraints CA:TRUE"),
            ),
            (
                basic,
                &[0x30, 0x03, 0x02, 0x01, 0x00],
                Some("basicConstraints pathLenConstraint"),
            ),
            // digitalSignature, keyEncipherment.
            (key_usage, &[0x03, 0x02, 0x05, 0xa0], None),
            (
                key_usage,
                &[0x03, 0x02, 0x02, 0x04],
                Some("keyUsage keyCertSign"),
            ),
            (
                key_usage,
                &[0x03, 0x02, 0x01, 0x02],
                Some("keyUsage cRLSign"),
            ),
            (
                key_usage,
                &[0x03, 0x02, 0x01, 0x86],
                Some("keyUsage keyCertSign"),
            ),
            // SSL server only, then SSL CA.
            (netscape, &[0x03, 0x02, 0x06, 0x40], None),
            (
                netscape,
                &[0x03, 0x02, 0x02, 0x04],
                Some("nsCertType SSL CA"),
            ),
            ("2.5.29.30", &[0x30, 0x00], Some("nameConstraints")),
            // extendedKeyUsage anyExtendedKeyUsage: not a CA right.
            (
                "2.5.29.37",
                &[0x30, 0x06, 0x06, 0x04, 0x55, 0x1d, 0x25, 0x00],
                None,
            ),
        ];
        for (oid, der, expected) in cases {
            let found = ca_only_request(&[ext(oid, der)]).unwrap();
            assert_eq!(found.as_deref(), expected, "{oid} {der:02x?}");
        }
        // The first CA-only request is named, after leaf extensions.
        let found = ca_only_request(&[
            ext(key_usage, &[0x03, 0x02, 0x07, 0x80]),
            ext("2.5.29.36", &[0x30, 0x03, 0x80, 0x01, 0x00]),
        ])
        .unwrap();
        assert_eq!(found.as_deref(), Some("policyConstraints"));
        for (oid, der) in [
            (basic, &[0x30, 0x05][..]),
            (basic, &[0x30, 0x03, 0x01, 0x01, 0xff, 0x00][..]),
            (basic, &[0x04, 0x00][..]),
            (key_usage, &[0x30, 0x00][..]),
            (netscape, &[][..]),
        ] {
            let error = ca_only_request(&[ext(oid, der)]).unwrap_err();
            assert!(
                error.to_string().starts_with("csr: has a malformed"),
                "{oid} {der:02x?}: {error}"
            );
        }
    }

    #[test]
    fn subjects() {
        let long = "é".repeat(70);
        let name = common_name_subject(&long).unwrap();
        let text = name.to_string();
        assert_eq!(text.trim_start_matches("CN=").chars().count(), 64, "{text}");

        let key = ec_key();
        let parsed = parse_csr(&csr(&key, &"a".repeat(80), false)).unwrap();
        let cut = truncate_common_names(parsed.subject).unwrap();
        assert_eq!(cut.to_string(), format!("CN={}", "a".repeat(64)));

        let spec = SubjectSpec::Fields(vec![
            ("C".into(), "AQ".into()),
            ("ST".into(), "Antarctica".into()),
            ("CN".into(), "x".into()),
        ]);
        let der = subject_from_spec(&spec).unwrap().to_der().unwrap();
        let parsed = openssl::x509::X509Name::from_der(&der).unwrap();
        let entries: Vec<String> = parsed
            .entries()
            .map(|entry| entry.data().to_string().unwrap())
            .collect();
        assert_eq!(entries, vec!["AQ", "Antarctica", "x"]);
    }

    #[test]
    fn public_keys_round_trip() {
        for key in [ec_key(), rsa_key()] {
            let comparable = PublicKey::from_pkey(&public(&key)).unwrap().unwrap();
            let rebuilt = comparable.to_pkey().unwrap().unwrap();
            assert!(rebuilt.public_eq(&key));
            let spki = spki_of(&rebuilt).unwrap();
            assert_eq!(spki.to_der().unwrap(), key.public_key_to_der().unwrap());
        }
    }
}
