//! Key handles: what they name, and how they are sealed so callers cannot forge or alter them.
//!
//! A handle is `sr=<base64 JSON payload>&sig=<base64 HMAC-SHA256(payload)>`, keyed by the
//! handle validation key that never leaves keyd (the reference's shape, so handles issued by the
//! reference stay valid). The MAC is checked in constant time before the payload is parsed.
//!
//! Callers use the same handle again and again (identityd signs every SAS token with one), so the
//! sealer remembers the handles it has verified or issued, by their SHA-256. With the validation
//! key in a token, checking a MAC is a token round trip as costly as the operation the handle is
//! for; with it in memory, base64, the MAC and the payload's JSON cost about as much as the HMAC
//! the caller asked for (docs/keyd.md has the figures). A forged or altered handle has a
//! different digest, misses, and is checked with the key as before; the lookup compares digests,
//! not handle bytes, so its timing says nothing about a valid handle.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::store::{StoreError, SymmetricKey};

/// The longest handle accepted or produced.
pub const MAX_HANDLE_LENGTH: usize = 4096;

/// What a handle names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandleTarget {
    /// Symmetric key by ID.
    Key(String),
    /// Key pair by ID.
    KeyPair(String),
    /// `HMAC-SHA256(base, data)` where the base is itself a (sealed) key handle.
    Derived(String, Vec<u8>),
}

#[derive(Serialize, Deserialize)]
struct Payload {
    key_id: HandleTarget,
    nonce: String,
}

/// Why a handle was refused. Deliberately without detail.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Bad format, bad MAC or bad payload.
    #[error("invalid handle")]
    Invalid,
    /// The validation key failed.
    #[error("handle validation failed")]
    Store(#[from] StoreError),
}

/// Seals and opens handles with the handle validation key.
#[derive(Clone, Debug)]
pub struct HandleSealer {
    key: Arc<dyn SymmetricKey>,
    /// Handles already verified or issued, by SHA-256.
    verified: Arc<RwLock<HashMap<[u8; 32], HandleTarget>>>,
}

/// How many verified handles are remembered; the set is emptied when it is full, which bounds
/// its memory (a handle is at most [`MAX_HANDLE_LENGTH`] bytes) without an eviction order.
const VERIFIED_HANDLES: usize = 1024;

fn digest(handle: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(handle.as_bytes()).into()
}

const STANDARD: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

impl HandleSealer {
    /// A sealer over the handle validation key.
    pub fn new(key: Arc<dyn SymmetricKey>) -> Self {
        HandleSealer {
            key,
            verified: Arc::default(),
        }
    }

    /// What `handle` names, when it has been verified or issued before.
    pub fn verified(&self, handle: &str) -> Option<HandleTarget> {
        if handle.len() > MAX_HANDLE_LENGTH {
            return None;
        }
        self.verified
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(&digest(handle))
            .cloned()
    }

    fn remember(&self, handle: &str, target: &HandleTarget) {
        let mut verified = self
            .verified
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        if verified.len() >= VERIFIED_HANDLES {
            verified.clear();
        }
        verified.insert(digest(handle), target.clone());
    }

    /// Whether sealing may run on an async thread.
    pub fn runs_inline(&self) -> bool {
        self.key.runs_inline()
    }

    /// Issues a handle for `target`, with 256 bits of fresh randomness.
    pub fn seal(&self, target: HandleTarget) -> Result<String, HandleError> {
        let mut nonce = [0_u8; 32];
        crate::crypto::random_bytes(&mut nonce)?;
        let payload = Payload {
            key_id: target.clone(),
            nonce: STANDARD.encode(nonce),
        };
        let json = serde_json::to_vec(&payload).map_err(|_| HandleError::Invalid)?;
        let signature = self.key.hmac_sha256(&json)?;
        let handle = format!(
            "sr={}&sig={}",
            STANDARD.encode(&json),
            STANDARD.encode(signature)
        );
        if handle.len() > MAX_HANDLE_LENGTH {
            return Err(HandleError::Invalid);
        }
        self.remember(&handle, &target);
        Ok(handle)
    }

    /// Verifies a handle and returns what it names.
    pub fn open(&self, handle: &str) -> Result<HandleTarget, HandleError> {
        if handle.len() > MAX_HANDLE_LENGTH {
            return Err(HandleError::Invalid);
        }
        let (payload, signature) = handle
            .strip_prefix("sr=")
            .and_then(|rest| rest.split_once("&sig="))
            .ok_or(HandleError::Invalid)?;
        let payload = STANDARD.decode(payload).map_err(|_| HandleError::Invalid)?;
        let signature = STANDARD
            .decode(signature)
            .map_err(|_| HandleError::Invalid)?;
        let expected = self.key.hmac_sha256(&payload)?;
        if !crate::crypto::constant_time_eq(&expected, &signature) {
            return Err(HandleError::Invalid);
        }
        let payload: Payload =
            serde_json::from_slice(&payload).map_err(|_| HandleError::Invalid)?;
        self.remember(handle, &payload.key_id);
        Ok(payload.key_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::MemoryKey;

    fn sealer(byte: u8) -> HandleSealer {
        HandleSealer::new(Arc::new(MemoryKey::new(vec![byte; 32]).unwrap()))
    }

    #[test]
    fn round_trip_is_fresh_and_tamper_evident() {
        let sealer = sealer(1);
        let target = HandleTarget::Derived("sr=x&sig=y".to_owned(), vec![1, 2, 3]);
        let first = sealer.seal(target.clone()).unwrap();
        let second = sealer.seal(target.clone()).unwrap();
        assert_ne!(first, second);
        assert!(first.bytes().all(|byte| byte.is_ascii_graphic()));
        assert_eq!(sealer.open(&first).unwrap(), target);

        // A different validation key refuses it.
        assert!(matches!(
            self::sealer(2).open(&first),
            Err(HandleError::Invalid)
        ));

        // Any altered payload byte is refused.
        let forged_payload = STANDARD.encode(br#"{"key_id":{"Key":"other"},"nonce":"AA=="}"#);
        let signature = first.split_once("&sig=").unwrap().1;
        let forged = format!("sr={forged_payload}&sig={signature}");
        assert!(matches!(sealer.open(&forged), Err(HandleError::Invalid)));

        for garbage in ["", "sr=", "sr=&sig=", "nonsense", "sr=!!&sig=!!"] {
            assert!(
                matches!(sealer.open(garbage), Err(HandleError::Invalid)),
                "{garbage}"
            );
        }
    }

    /// A key that behaves like a token's, and counts its MAC computations.
    #[derive(Debug)]
    struct CountingKey {
        inner: MemoryKey,
        macs: std::sync::atomic::AtomicUsize,
    }

    impl SymmetricKey for CountingKey {
        fn hmac_sha256(&self, message: &[u8]) -> Result<Vec<u8>, StoreError> {
            self.macs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.hmac_sha256(message)
        }
        fn aes_gcm_encrypt(
            &self,
            iv: &[u8],
            aad: &[u8],
            plaintext: &[u8],
        ) -> Result<(Vec<u8>, [u8; 16]), StoreError> {
            self.inner.aes_gcm_encrypt(iv, aad, plaintext)
        }
        fn aes_gcm_decrypt(
            &self,
            iv: &[u8],
            aad: &[u8],
            ciphertext: &[u8],
            tag: &[u8; 16],
        ) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.aes_gcm_decrypt(iv, aad, ciphertext, tag)
        }
        fn accepts_legacy_ciphertext(&self) -> bool {
            false
        }
        fn runs_inline(&self) -> bool {
            false
        }
    }

    #[test]
    fn each_handle_is_checked_once_and_forgeries_stay_refused() {
        let key = Arc::new(CountingKey {
            inner: MemoryKey::new(vec![3; 32]).unwrap(),
            macs: Default::default(),
        });
        let macs = || key.macs.load(std::sync::atomic::Ordering::SeqCst);
        let sealer = HandleSealer::new(Arc::clone(&key) as Arc<dyn SymmetricKey>);
        let issued = sealer.seal(HandleTarget::Key("issued".to_owned())).unwrap();
        assert_eq!(macs(), 1);
        // An issued handle is known without a token call.
        assert_eq!(
            sealer.verified(&issued),
            Some(HandleTarget::Key("issued".to_owned()))
        );

        // A handle sealed elsewhere with the same key (the reference, an earlier run) is
        // verified by the token once, then remembered.
        let other = self::sealer(3)
            .seal(HandleTarget::KeyPair("pair".to_owned()))
            .unwrap();
        assert_eq!(sealer.verified(&other), None);
        assert_eq!(
            sealer.open(&other).unwrap(),
            HandleTarget::KeyPair("pair".to_owned())
        );
        assert_eq!(macs(), 2);
        assert_eq!(
            sealer.verified(&other),
            Some(HandleTarget::KeyPair("pair".to_owned()))
        );

        // A forgery is not remembered and stays refused, however often it is tried.
        let forged = format!("{issued}A");
        for _ in 0..2 {
            assert_eq!(sealer.verified(&forged), None);
            assert!(matches!(sealer.open(&forged), Err(HandleError::Invalid)));
        }
        let wrong_key = self::sealer(4)
            .seal(HandleTarget::Key("issued".to_owned()))
            .unwrap();
        assert!(matches!(sealer.open(&wrong_key), Err(HandleError::Invalid)));
        assert_eq!(sealer.verified(&wrong_key), None);

        // The memory is bounded.
        for index in 0..VERIFIED_HANDLES + 10 {
            sealer.seal(HandleTarget::Key(format!("k{index}"))).unwrap();
        }
        assert!(sealer.verified.read().unwrap().len() <= VERIFIED_HANDLES);
    }
}
