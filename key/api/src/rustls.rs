//! A rustls client or server key whose private half stays in keyd (feature `rustls`).
//!
//! rustls asks a [`rustls::sign::Signer`] for one signature per handshake, synchronously.
//! [`KeydSigningKey`] answers through keyd: ECDSA P-256 is `/sign` over the SHA-256 of the
//! message; RSA PKCS#1 v1.5 is `/encrypt` `RSA-PKCS1` over the `DigestInfo`; RSA-PSS is
//! encoded locally (salt length = hash length, as TLS 1.3 requires) and sent to `/encrypt`
//! `RSA-NO-PADDING` (see [`crate::signing`]). Each signature runs on a helper thread with its
//! own current-thread runtime, so a caller's tokio runtime is neither blocked (a multi-thread
//! worker leaves with `block_in_place`) nor re-entered. The key pair's kind comes from the
//! certificate's public key, which must be the key pair's.

use std::sync::Arc;

use der::Decode as _;
use rustls::pki_types::CertificateDer;
use rustls::{SignatureAlgorithm, SignatureScheme};

use crate::signing::{Hash, Operation};
use crate::{Client, KeyHandle};

/// Why a keyd-backed rustls key could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KeydKeyError {
    /// The chain holds no certificate.
    #[error("the certificate chain is empty")]
    EmptyChain,
    /// The leaf certificate does not parse.
    #[error("the leaf certificate does not parse: {0}")]
    Certificate(String),
    /// The leaf's key is neither EC P-256 nor RSA.
    #[error("the certificate's key must be EC P-256 or RSA ({0})")]
    UnsupportedKey(String),
}

/// What kind of key pair keyd holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on P-256.
    EcP256,
    /// RSA with a modulus of this many bits.
    Rsa {
        /// The modulus size.
        modulus_bits: usize,
    },
}

const OID_EC_PUBLIC_KEY: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_PRIME256V1: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_RSA_ENCRYPTION: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

impl KeyKind {
    /// The kind of the public key of a DER certificate.
    pub fn of_certificate(certificate_der: &[u8]) -> Result<KeyKind, KeydKeyError> {
        let certificate = x509_cert::Certificate::from_der(certificate_der)
            .map_err(|error| KeydKeyError::Certificate(error.to_string()))?;
        let public_key = &certificate.tbs_certificate.subject_public_key_info;
        let algorithm = public_key.algorithm.oid;
        if algorithm == OID_EC_PUBLIC_KEY {
            let curve = public_key
                .algorithm
                .parameters
                .as_ref()
                .and_then(|parameters| parameters.decode_as::<der::asn1::ObjectIdentifier>().ok());
            return match curve {
                Some(curve) if curve == OID_PRIME256V1 => Ok(KeyKind::EcP256),
                Some(curve) => Err(KeydKeyError::UnsupportedKey(format!("EC curve {curve}"))),
                None => Err(KeydKeyError::UnsupportedKey(
                    "EC without a named curve".into(),
                )),
            };
        }
        if algorithm == OID_RSA_ENCRYPTION {
            let bits = public_key.subject_public_key.raw_bytes();
            let modulus = der::SliceReader::new(bits)
                .and_then(|mut reader| {
                    der::Reader::sequence(&mut reader, |sequence| {
                        let modulus = der::asn1::UintRef::decode(sequence)?;
                        let _exponent = der::asn1::UintRef::decode(sequence)?;
                        Ok(modulus.as_bytes().to_vec())
                    })
                })
                .map_err(|error| KeydKeyError::Certificate(error.to_string()))?;
            let leading_zeros = modulus
                .first()
                .map_or(8, |byte| byte.leading_zeros() as usize);
            return Ok(KeyKind::Rsa {
                modulus_bits: modulus.len() * 8 - leading_zeros,
            });
        }
        Err(KeydKeyError::UnsupportedKey(format!(
            "algorithm {algorithm}"
        )))
    }
}

struct KeydKey {
    keyd_uri: String,
    handle: KeyHandle,
    kind: KeyKind,
}

impl std::fmt::Debug for KeydKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KeydKey")
            .field("keyd_uri", &self.keyd_uri)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// A rustls [`SigningKey`](rustls::sign::SigningKey) whose signatures keyd makes with the key
/// pair behind a handle. Its `Debug` output leaves the handle out.
#[derive(Clone, Debug)]
pub struct KeydSigningKey {
    inner: Arc<KeydKey>,
}

impl KeydSigningKey {
    /// A key that signs through keyd at `keyd_uri` (`unix:///run/aziot/keyd.sock`) with the
    /// key pair behind `handle`, of `kind`.
    pub fn new(keyd_uri: &str, handle: KeyHandle, kind: KeyKind) -> KeydSigningKey {
        KeydSigningKey {
            inner: Arc::new(KeydKey {
                keyd_uri: keyd_uri.to_owned(),
                handle,
                kind,
            }),
        }
    }

    /// The key pair's kind.
    pub fn kind(&self) -> KeyKind {
        self.inner.kind
    }
}

/// A rustls [`CertifiedKey`](rustls::sign::CertifiedKey): `chain` (leaf first) and a signer
/// through keyd at `keyd_uri` with the key pair behind `handle`, whose kind is read from the
/// leaf certificate.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    keyd_uri: &str,
    handle: KeyHandle,
) -> Result<Arc<rustls::sign::CertifiedKey>, KeydKeyError> {
    let leaf = chain.first().ok_or(KeydKeyError::EmptyChain)?;
    let kind = KeyKind::of_certificate(leaf)?;
    let key = KeydSigningKey::new(keyd_uri, handle, kind);
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        chain,
        Arc::new(key),
    )))
}

const EC_SCHEMES: &[SignatureScheme] = &[SignatureScheme::ECDSA_NISTP256_SHA256];
const RSA_SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PKCS1_SHA256,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA512,
];

impl rustls::sign::SigningKey for KeydSigningKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        let ours = match self.inner.kind {
            KeyKind::EcP256 => EC_SCHEMES,
            KeyKind::Rsa { .. } => RSA_SCHEMES,
        };
        ours.iter()
            .find(|scheme| offered.contains(scheme))
            .map(|scheme| {
                Box::new(KeydSigner {
                    key: Arc::clone(&self.inner),
                    scheme: *scheme,
                }) as Box<dyn rustls::sign::Signer>
            })
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        match self.inner.kind {
            KeyKind::EcP256 => SignatureAlgorithm::ECDSA,
            KeyKind::Rsa { .. } => SignatureAlgorithm::RSA,
        }
    }
}

#[derive(Debug)]
struct KeydSigner {
    key: Arc<KeydKey>,
    scheme: SignatureScheme,
}

impl KeydSigner {
    fn operation(&self, message: &[u8]) -> Result<Operation, String> {
        let hash = match self.scheme {
            SignatureScheme::ECDSA_NISTP256_SHA256
            | SignatureScheme::RSA_PSS_SHA256
            | SignatureScheme::RSA_PKCS1_SHA256 => Hash::Sha256,
            SignatureScheme::RSA_PSS_SHA384 | SignatureScheme::RSA_PKCS1_SHA384 => Hash::Sha384,
            SignatureScheme::RSA_PSS_SHA512 | SignatureScheme::RSA_PKCS1_SHA512 => Hash::Sha512,
            _ => return Err("unsupported signature scheme".to_owned()),
        };
        let digest = hash.digest(message);
        let operation = match (self.scheme, self.key.kind) {
            (SignatureScheme::ECDSA_NISTP256_SHA256, KeyKind::EcP256) => {
                Ok(Operation::ecdsa(&digest))
            }
            (
                SignatureScheme::RSA_PKCS1_SHA256
                | SignatureScheme::RSA_PKCS1_SHA384
                | SignatureScheme::RSA_PKCS1_SHA512,
                KeyKind::Rsa { .. },
            ) => Operation::rsa_pkcs1(hash, &digest),
            (_, KeyKind::Rsa { modulus_bits }) => {
                Operation::rsa_pss(hash, &digest, modulus_bits, hash.output_length())
            }
            _ => return Err("signature scheme does not fit the key".to_owned()),
        };
        operation.map_err(|error| error.to_string())
    }
}

impl rustls::sign::Signer for KeydSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let operation = self.operation(message).map_err(rustls::Error::General)?;
        run_in_keyd(&self.key.keyd_uri, &self.key.handle, &operation).map_err(|error| {
            log::warn!("keyd could not sign the TLS handshake: {error}");
            rustls::Error::General(format!("keyd could not sign: {error}"))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// Runs one keyd operation synchronously without blocking or re-entering the caller's
/// runtime: a helper thread with its own current-thread runtime and keyd client.
fn run_in_keyd(
    keyd_uri: &str,
    handle: &KeyHandle,
    operation: &Operation,
) -> Result<Vec<u8>, String> {
    let work = || {
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<Vec<u8>, String> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|error| format!("cannot start a runtime: {error}"))?;
                    let client = Client::from_uri(keyd_uri).map_err(|error| error.to_string())?;
                    runtime
                        .block_on(client.sign_operation(handle, operation))
                        .map_err(|error| http_common::error::error_chain(&error))
                })
                .join()
                .unwrap_or_else(|_| Err("the signing thread panicked".to_owned()))
        })
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(key: &openssl::pkey::PKey<openssl::pkey::Private>) -> Vec<u8> {
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "kind").unwrap();
        let name = name.build();
        let mut builder = openssl::x509::X509::builder().unwrap();
        builder.set_version(2).unwrap();
        builder.set_subject_name(&name).unwrap();
        builder.set_issuer_name(&name).unwrap();
        builder.set_pubkey(key).unwrap();
        builder
            .set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        builder
            .sign(key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        builder.build().to_der().unwrap()
    }

    #[test]
    fn key_kinds_come_from_the_certificate() {
        let group =
            openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        let ec = openssl::pkey::PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap())
            .unwrap();
        assert_eq!(
            KeyKind::of_certificate(&self_signed(&ec)).unwrap(),
            KeyKind::EcP256
        );
        for bits in [2048, 3072] {
            let rsa =
                openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(bits).unwrap()).unwrap();
            assert_eq!(
                KeyKind::of_certificate(&self_signed(&rsa)).unwrap(),
                KeyKind::Rsa {
                    modulus_bits: bits as usize
                }
            );
        }
        let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::SECP384R1).unwrap();
        let p384 = openssl::pkey::PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap())
            .unwrap();
        assert!(matches!(
            KeyKind::of_certificate(&self_signed(&p384)),
            Err(KeydKeyError::UnsupportedKey(_))
        ));
        assert!(matches!(
            KeyKind::of_certificate(b"not der"),
            Err(KeydKeyError::Certificate(_))
        ));
    }
}
