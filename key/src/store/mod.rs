//! Key storage behind one trait, so the file store and the PKCS#11 store are interchangeable.
//!
//! A store keeps keys by ID and hands out loaded keys as trait objects ([`SymmetricKey`],
//! [`KeyPair`]) that perform the raw cryptographic operations (a token store converts its raw
//! ECDSA `r‖s` to DER itself). Everything above the raw operation — handle checks,
//! authorization, the AEAD byte format, derivation — lives in the service. Store methods block
//! (file I/O, token calls): the service calls them on blocking threads.

pub mod file;
pub mod pkcs11;

use std::sync::Arc;

use openssl::pkey::{PKey, Public};

/// What a key is used for (`usage` of `POST /key`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Base of derived keys.
    pub derive: bool,
    /// AEAD encryption.
    pub encrypt: bool,
    /// HMAC signing.
    pub sign: bool,
}

impl Usage {
    /// `derive,sign`: the draft routes' symmetric keys.
    pub const DERIVE_SIGN: Usage = Usage {
        derive: true,
        encrypt: false,
        sign: true,
    };

    /// Parses `derive,encrypt,sign` (any non-empty subset, comma-separated, no spaces).
    pub fn parse(text: &str) -> Option<Usage> {
        let mut usage = Usage::default();
        for part in text.split(',') {
            match part {
                "derive" => usage.derive = true,
                "encrypt" => usage.encrypt = true,
                "sign" => usage.sign = true,
                _ => return None,
            }
        }
        Some(usage)
    }
}

/// Key pair algorithms keyd can generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// NIST P-256 (prime256v1).
    EcP256,
    /// RSA with a 2048-bit modulus.
    Rsa2048,
    /// RSA with a 4096-bit modulus.
    Rsa4096,
}

impl KeyAlgorithm {
    /// Parses `preferredAlgorithms`: `:`-separated, `*` = `ec-p256:rsa-2048`, duplicates dropped,
    /// unknown components ignored, absent = `ec-p256:rsa-2048`. `None` when nothing is recognized.
    pub fn parse_preference(text: Option<&str>) -> Option<Vec<KeyAlgorithm>> {
        let text = text.unwrap_or("*");
        let mut algorithms = Vec::new();
        let mut push = |algorithm| {
            if !algorithms.contains(&algorithm) {
                algorithms.push(algorithm);
            }
        };
        for component in text.split(':') {
            match component {
                "ec-p256" => push(KeyAlgorithm::EcP256),
                "rsa-2048" => push(KeyAlgorithm::Rsa2048),
                "rsa-4096" => push(KeyAlgorithm::Rsa4096),
                "*" => {
                    push(KeyAlgorithm::EcP256);
                    push(KeyAlgorithm::Rsa2048);
                }
                _ => {}
            }
        }
        (!algorithms.is_empty()).then_some(algorithms)
    }
}

/// Which of the two kinds a stored key is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A symmetric key.
    Symmetric,
    /// An asymmetric key pair.
    Pair,
}

/// RSA private-key operations (`/encrypt` with an RSA key pair).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsaPadding {
    /// PKCS#1 v1.5 type-1 padding (signing with a caller-supplied `DigestInfo`).
    Pkcs1,
    /// No padding; the input is exactly the modulus length.
    None,
}

/// A loaded symmetric key.
pub trait SymmetricKey: Send + Sync + std::fmt::Debug {
    /// HMAC-SHA256 of `message` (also how derived keys are computed).
    fn hmac_sha256(&self, message: &[u8]) -> Result<Vec<u8>, StoreError>;

    /// AES-GCM encryption; returns (ciphertext, 16-byte tag).
    fn aes_gcm_encrypt(
        &self,
        iv: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, [u8; 16]), StoreError>;

    /// AES-GCM decryption; `Ok(None)` when authentication fails.
    fn aes_gcm_decrypt(
        &self,
        iv: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; 16],
    ) -> Result<Option<Vec<u8>>, StoreError>;

    /// Whether the legacy `0x01` ciphertext format may be decrypted with this key
    /// (file and derived keys only).
    fn accepts_legacy_ciphertext(&self) -> bool;

    /// Whether operations are fast, in-memory work that may run on an async thread. Keys in a
    /// hardware token answer `false` and are used on blocking threads.
    fn runs_inline(&self) -> bool;
}

/// A loaded key pair.
pub trait KeyPair: Send + Sync + std::fmt::Debug {
    /// The public key (for `/parameters` and key matching).
    fn public_key(&self) -> &PKey<Public>;

    /// ECDSA over a caller-computed digest, as a DER `ECDSA-Sig-Value`.
    fn ecdsa_sign(&self, digest: &[u8]) -> Result<Vec<u8>, StoreError>;

    /// RSA private-key operation with the given padding; output is the modulus length.
    fn rsa_private_encrypt(&self, padding: RsaPadding, input: &[u8])
        -> Result<Vec<u8>, StoreError>;

    /// Whether operations may run on an async thread (in-memory EC keys); RSA and token keys
    /// answer `false`.
    fn runs_inline(&self) -> bool;
}

/// A loaded key of either kind.
#[derive(Clone, Debug)]
pub enum StoredKey {
    /// A symmetric key.
    Symmetric(Arc<dyn SymmetricKey>),
    /// A key pair.
    Pair(Arc<dyn KeyPair>),
}

impl StoredKey {
    /// Its kind.
    pub fn kind(&self) -> KeyKind {
        match self {
            StoredKey::Symmetric(_) => KeyKind::Symmetric,
            StoredKey::Pair(_) => KeyKind::Pair,
        }
    }
}

/// Why a store operation failed. Messages name key IDs, never key bytes, PINs or paths in
/// answers (paths appear only in the logged cause chain).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot do this (token without the mechanism): the caller may fall back.
    #[error("not supported by this key store: {0}")]
    NotSupported(String),
    /// The stored key exists but cannot be parsed.
    #[error("key {id:?} is stored but unreadable")]
    Unreadable {
        /// The key ID.
        id: String,
    },
    /// The input is not acceptable for this key (wrong length, mechanism).
    #[error("{0}")]
    InvalidInput(String),
    /// A filesystem operation failed.
    #[error("key storage I/O failed on {path}")]
    Io {
        /// The path (logged only).
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// OpenSSL failed.
    #[error("cryptographic operation failed")]
    Crypto(#[from] openssl::error::ErrorStack),
    /// The PKCS#11 token failed.
    #[error("PKCS#11 token operation failed: {0}")]
    Token(String),
}

/// A place keys live: the file store or a PKCS#11 token.
///
/// Methods block; the service runs them on blocking threads and serializes writes per key ID.
pub trait KeyStore: Send + Sync + std::fmt::Debug {
    /// A short name for log lines (`file`, `pkcs11`).
    fn name(&self) -> &'static str;

    /// Loads key `id` of whichever kind is stored; `Ok(None)` when absent.
    fn load(&self, id: &str) -> Result<Option<StoredKey>, StoreError>;

    /// Generates a new symmetric key `id` (32 random bytes where the store chooses). Called only
    /// when `load` found nothing usable.
    fn generate_key(&self, id: &str, usage: Usage) -> Result<StoredKey, StoreError>;

    /// Stores `bytes` as symmetric key `id`, replacing an existing symmetric key.
    fn import_key(&self, id: &str, usage: Usage, bytes: &[u8]) -> Result<StoredKey, StoreError>;

    /// Generates key pair `id`; [`StoreError::NotSupported`] lets the caller try the next
    /// algorithm.
    fn generate_key_pair(&self, id: &str, algorithm: KeyAlgorithm)
        -> Result<StoredKey, StoreError>;

    /// Deletes key `id` of `kind`; deleting an absent key succeeds.
    fn delete(&self, id: &str, kind: KeyKind) -> Result<(), StoreError>;

    /// Renames key pair `from` to `to`, replacing `to`.
    fn move_key_pair(&self, from: &str, to: &str) -> Result<(), StoreError>;
}
