//! TLS for DPS and IoT Hub: the trust store (system store plus configured CAs) and client
//! authentication whose private-key operations run in keyd.
//!
//! rustls asks a [`rustls::sign::Signer`] for one signature per handshake, synchronously. The
//! signer here runs the keyd request on a helper thread with its own current-thread runtime and
//! its own keyd client, and leaves the calling worker thread with `block_in_place`, so the
//! daemon's runtime is never blocked or re-entered: ECDSA P-256 is keyd `/sign` over SHA-256 of
//! the message; RSA PKCS#1 v1.5 is keyd `/encrypt` `RSA-PKCS1` over the DER `DigestInfo`;
//! RSA-PSS is encoded here (EMSA-PSS, salt length = hash length) and sent to keyd `/encrypt`
//! `RSA-NO-PADDING`. The private key never leaves keyd.

use std::path::PathBuf;
use std::sync::Arc;

use key_api::{EncryptMechanism, KeyHandle, SignMechanism};
use openssl::hash::MessageDigest;
use rustls::pki_types::CertificateDer;
use rustls::{SignatureAlgorithm, SignatureScheme};

/// The system CA bundles of common distributions (Debian/Ubuntu, Fedora/RHEL, SUSE, Alpine).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Loads the trust store: the operating system's roots **plus** the certificates of
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` when set (the issue asks for both; OpenSSL's own convention
/// would let the variable replace the system store), plus every PEM file in `extra`.
pub fn load_roots(extra: &[PathBuf]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    // With the variables set, this loads their certificates instead of the system store.
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        log::warn!("could not load some CA certificates: {error}");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    log::debug!("{added} CA certificates trusted from the system store or SSL_CERT_FILE");
    let overridden = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
    if overridden {
        if let Some(bundle) = SYSTEM_BUNDLES
            .iter()
            .find(|path| std::path::Path::new(path).exists())
        {
            let certificates = std::fs::read(bundle)
                .ok()
                .and_then(|pem| openssl::x509::X509::stack_from_pem(&pem).ok())
                .unwrap_or_default();
            let system: Vec<CertificateDer<'static>> = certificates
                .iter()
                .filter_map(|certificate| certificate.to_der().ok().map(CertificateDer::from))
                .collect();
            let (added, _ignored) = roots.add_parsable_certificates(system);
            log::debug!("{added} system CA certificates trusted from {bundle}");
        }
    }
    for path in extra {
        let pem = std::fs::read(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let certificates = openssl::x509::X509::stack_from_pem(&pem)
            .map_err(|_| format!("{} is not a PEM certificate bundle", path.display()))?;
        if certificates.is_empty() {
            return Err(format!("{} holds no certificate", path.display()));
        }
        for certificate in certificates {
            let der = certificate
                .to_der()
                .map_err(|_| format!("{}: unusable certificate", path.display()))?;
            roots
                .add(CertificateDer::from(der))
                .map_err(|error| format!("{}: {error}", path.display()))?;
        }
    }
    Ok(roots)
}

/// The crypto provider used for every cloud connection.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM chain (leaf first) into DER certificates.
pub fn chain_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates = openssl::x509::X509::stack_from_pem(pem.as_bytes())
        .map_err(|_| "the identity certificate is not PEM".to_owned())?;
    if certificates.is_empty() {
        return Err("the identity certificate chain is empty".to_owned());
    }
    certificates
        .iter()
        .map(|certificate| {
            certificate
                .to_der()
                .map(CertificateDer::from)
                .map_err(|_| "the identity certificate cannot be encoded".to_owned())
        })
        .collect()
}

/// The subject CN of the first certificate of a PEM chain.
pub fn leaf_common_name(pem: &str) -> Option<String> {
    let certificate = openssl::x509::X509::from_pem(pem.as_bytes()).ok()?;
    let entry = certificate
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()?;
    entry.data().to_string().ok()
}

/// What kind of key pair keyd holds, read from the leaf certificate's public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyKind {
    /// ECDSA on P-256.
    EcP256,
    /// RSA with a modulus of this many bits.
    Rsa { modulus_bits: usize },
}

fn key_kind(leaf_der: &[u8]) -> Result<KeyKind, String> {
    let certificate = openssl::x509::X509::from_der(leaf_der)
        .map_err(|_| "the identity certificate does not parse".to_owned())?;
    let public_key = certificate
        .public_key()
        .map_err(|_| "the identity certificate has no usable public key".to_owned())?;
    match public_key.id() {
        openssl::pkey::Id::EC => {
            let ec = public_key
                .ec_key()
                .map_err(|_| "unusable EC public key".to_owned())?;
            if ec.group().curve_name() == Some(openssl::nid::Nid::X9_62_PRIME256V1) {
                Ok(KeyKind::EcP256)
            } else {
                Err("only P-256 EC keys are supported for TLS client authentication".to_owned())
            }
        }
        openssl::pkey::Id::RSA => Ok(KeyKind::Rsa {
            modulus_bits: usize::try_from(public_key.bits()).unwrap_or(0),
        }),
        _ => Err("the identity key must be EC P-256 or RSA".to_owned()),
    }
}

/// Builds the TLS client identity: the chain from certd and a signer whose private-key
/// operations go to keyd at `keyd_uri` with `handle`.
pub fn client_identity(
    chain: Vec<CertificateDer<'static>>,
    keyd_uri: &str,
    handle: KeyHandle,
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let leaf = chain
        .first()
        .ok_or_else(|| "the identity certificate chain is empty".to_owned())?;
    let kind = key_kind(leaf)?;
    let key = KeydSigningKey {
        inner: Arc::new(KeydKey {
            keyd_uri: keyd_uri.to_owned(),
            handle,
            kind,
        }),
    };
    Ok(Arc::new(rustls::sign::CertifiedKey::new(
        chain,
        Arc::new(key),
    )))
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

/// A `rustls` signing key that lives in keyd.
#[derive(Clone, Debug)]
struct KeydSigningKey {
    inner: Arc<KeydKey>,
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

/// A private-key operation for keyd.
enum KeydOperation {
    EcdsaDigest(Vec<u8>),
    RsaPkcs1(Vec<u8>),
    RsaRaw(Vec<u8>),
}

fn digest_of(scheme: SignatureScheme) -> Option<(MessageDigest, &'static [u8])> {
    // DER DigestInfo prefixes (RFC 8017 section 9.2, note 1).
    const SHA256: &[u8] = &[
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
        0x05, 0x00, 0x04, 0x20,
    ];
    const SHA384: &[u8] = &[
        0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02,
        0x05, 0x00, 0x04, 0x30,
    ];
    const SHA512: &[u8] = &[
        0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03,
        0x05, 0x00, 0x04, 0x40,
    ];
    match scheme {
        SignatureScheme::ECDSA_NISTP256_SHA256
        | SignatureScheme::RSA_PSS_SHA256
        | SignatureScheme::RSA_PKCS1_SHA256 => Some((MessageDigest::sha256(), SHA256)),
        SignatureScheme::RSA_PSS_SHA384 | SignatureScheme::RSA_PKCS1_SHA384 => {
            Some((MessageDigest::sha384(), SHA384))
        }
        SignatureScheme::RSA_PSS_SHA512 | SignatureScheme::RSA_PKCS1_SHA512 => {
            Some((MessageDigest::sha512(), SHA512))
        }
        _ => None,
    }
}

/// MGF1 (RFC 8017 B.2.1) with `digest`.
fn mgf1(digest: MessageDigest, seed: &[u8], length: usize) -> Result<Vec<u8>, String> {
    let mut output = Vec::with_capacity(length + digest.size());
    let mut counter: u32 = 0;
    while output.len() < length {
        let mut input = seed.to_vec();
        input.extend_from_slice(&counter.to_be_bytes());
        let block = openssl::hash::hash(digest, &input).map_err(|error| error.to_string())?;
        output.extend_from_slice(&block);
        counter += 1;
    }
    output.truncate(length);
    Ok(output)
}

/// EMSA-PSS-ENCODE (RFC 8017 9.1.1) with salt length = hash length, returned left-padded to
/// the modulus length so keyd's raw RSA operation accepts it.
pub fn pss_encode(
    digest: MessageDigest,
    message_hash: &[u8],
    modulus_bits: usize,
    salt: &[u8],
) -> Result<Vec<u8>, String> {
    let hash_length = digest.size();
    let em_bits = modulus_bits.checked_sub(1).ok_or("modulus too small")?;
    let em_length = em_bits.div_ceil(8);
    if em_length < hash_length + salt.len() + 2 {
        return Err("the RSA key is too small for PSS with this hash".to_owned());
    }
    let mut m_prime = vec![0u8; 8];
    m_prime.extend_from_slice(message_hash);
    m_prime.extend_from_slice(salt);
    let h = openssl::hash::hash(digest, &m_prime).map_err(|error| error.to_string())?;
    let db_length = em_length - hash_length - 1;
    let mut db = vec![0u8; db_length - salt.len() - 1];
    db.push(0x01);
    db.extend_from_slice(salt);
    let mask = mgf1(digest, &h, db_length)?;
    for (byte, mask_byte) in db.iter_mut().zip(mask) {
        *byte ^= mask_byte;
    }
    let unused_bits = 8 * em_length - em_bits;
    if let Some(first) = db.first_mut() {
        *first &= 0xffu8 >> unused_bits;
    }
    let modulus_length = modulus_bits.div_ceil(8);
    let mut encoded = vec![0u8; modulus_length - em_length];
    encoded.extend_from_slice(&db);
    encoded.extend_from_slice(&h);
    encoded.push(0xbc);
    Ok(encoded)
}

impl KeydSigner {
    fn operation(&self, message: &[u8]) -> Result<KeydOperation, String> {
        let (digest, digest_info) =
            digest_of(self.scheme).ok_or_else(|| "unsupported signature scheme".to_owned())?;
        let message_hash =
            openssl::hash::hash(digest, message).map_err(|error| error.to_string())?;
        match (self.scheme, self.key.kind) {
            (SignatureScheme::ECDSA_NISTP256_SHA256, KeyKind::EcP256) => {
                Ok(KeydOperation::EcdsaDigest(message_hash.to_vec()))
            }
            (
                SignatureScheme::RSA_PKCS1_SHA256
                | SignatureScheme::RSA_PKCS1_SHA384
                | SignatureScheme::RSA_PKCS1_SHA512,
                KeyKind::Rsa { .. },
            ) => {
                let mut input = digest_info.to_vec();
                input.extend_from_slice(&message_hash);
                Ok(KeydOperation::RsaPkcs1(input))
            }
            (_, KeyKind::Rsa { modulus_bits }) => {
                let mut salt = vec![0u8; digest.size()];
                openssl::rand::rand_bytes(&mut salt).map_err(|error| error.to_string())?;
                Ok(KeydOperation::RsaRaw(pss_encode(
                    digest,
                    &message_hash,
                    modulus_bits,
                    &salt,
                )?))
            }
            _ => Err("signature scheme does not fit the key".to_owned()),
        }
    }
}

impl rustls::sign::Signer for KeydSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rustls::Error> {
        let operation = self.operation(message).map_err(rustls::Error::General)?;
        run_in_keyd(&self.key.keyd_uri, &self.key.handle, operation).map_err(|error| {
            log::warn!("keyd could not sign the TLS handshake: {error}");
            rustls::Error::General(format!("keyd could not sign: {error}"))
        })
    }

    fn scheme(&self) -> SignatureScheme {
        self.scheme
    }
}

/// Runs one keyd private-key operation synchronously without blocking or re-entering the
/// caller's runtime: a helper thread with its own current-thread runtime and keyd client.
fn run_in_keyd(
    keyd_uri: &str,
    handle: &KeyHandle,
    operation: KeydOperation,
) -> Result<Vec<u8>, String> {
    let work = || {
        std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<Vec<u8>, String> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|error| format!("cannot start a runtime: {error}"))?;
                    let client =
                        key_api::Client::from_uri(keyd_uri).map_err(|error| error.to_string())?;
                    runtime
                        .block_on(async {
                            match &operation {
                                KeydOperation::EcdsaDigest(digest) => {
                                    client.sign(handle, SignMechanism::Ecdsa { digest }).await
                                }
                                KeydOperation::RsaPkcs1(input) => {
                                    client
                                        .encrypt(handle, EncryptMechanism::RsaPkcs1, input)
                                        .await
                                }
                                KeydOperation::RsaRaw(input) => {
                                    client
                                        .encrypt(handle, EncryptMechanism::RsaNoPadding, input)
                                        .await
                                }
                            }
                        })
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

    /// PSS encoding checked against OpenSSL's verifier on a real key.
    #[test]
    fn pss_encoding_verifies_with_openssl() {
        let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
        let message = b"handshake transcript";
        for digest in [
            MessageDigest::sha256(),
            MessageDigest::sha384(),
            MessageDigest::sha512(),
        ] {
            let hash = openssl::hash::hash(digest, message).unwrap();
            let mut salt = vec![0u8; digest.size()];
            openssl::rand::rand_bytes(&mut salt).unwrap();
            let encoded = pss_encode(digest, &hash, 2048, &salt).unwrap();
            assert_eq!(encoded.len(), 256);
            let mut signature = vec![0u8; 256];
            rsa.private_encrypt(&encoded, &mut signature, openssl::rsa::Padding::NONE)
                .unwrap();
            let key = openssl::pkey::PKey::from_rsa(rsa.clone()).unwrap();
            let mut verifier = openssl::sign::Verifier::new(digest, &key).unwrap();
            verifier
                .set_rsa_padding(openssl::rsa::Padding::PKCS1_PSS)
                .unwrap();
            verifier
                .set_rsa_pss_saltlen(openssl::sign::RsaPssSaltlen::DIGEST_LENGTH)
                .unwrap();
            verifier.update(message).unwrap();
            assert!(verifier.verify(&signature).unwrap());
        }
    }

    #[test]
    fn odd_modulus_sizes_are_padded() {
        let digest = MessageDigest::sha256();
        let hash = openssl::hash::hash(digest, b"m").unwrap();
        let encoded = pss_encode(digest, &hash, 2049, &[7u8; 32]).unwrap();
        assert_eq!(encoded.len(), 257);
        assert_eq!(encoded[0], 0);
    }
}
