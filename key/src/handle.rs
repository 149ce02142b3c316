//! Key handles: what they name, and how they are sealed so callers cannot forge or alter them.
//!
//! A handle is `sr=<base64 JSON payload>&sig=<base64 HMAC-SHA256(payload)>`, keyed by the
//! handle validation key that never leaves keyd (the reference's shape, so handles issued by the
//! reference stay valid). The MAC is checked in constant time before the payload is parsed.

use std::sync::Arc;

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
}

const STANDARD: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

impl HandleSealer {
    /// A sealer over the handle validation key.
    pub fn new(key: Arc<dyn SymmetricKey>) -> Self {
        HandleSealer { key }
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
            key_id: target,
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
}
