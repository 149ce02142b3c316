//! keyd's error type and its one mapping to HTTP statuses.

use http::StatusCode;

use crate::handle::HandleError;
use crate::store::StoreError;
use crate::tpm::TpmError;

/// Everything a keyd request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The HTTP layer refused the request (route, api-version, body).
    #[error(transparent)]
    Http(#[from] http_common::HttpError),
    /// A request field has an invalid value.
    #[error("parameter {name:?} is invalid: {reason}")]
    InvalidParameter {
        /// The field.
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// A request is not acceptable as a whole (message is the full text).
    #[error("{0}")]
    BadRequest(String),
    /// The request body's enum value is not one keyd knows (kept as 422, as the reference does).
    #[error("{0}")]
    Unprocessable(String),
    /// The caller may not use this key ID.
    #[error("user {uid} is not authorized to access the key {id}")]
    Forbidden {
        /// The caller's uid.
        uid: u32,
        /// The key ID.
        id: String,
    },
    /// The reserved handle validation key was named.
    #[error("the key ID \"handle-validation-key\" is reserved")]
    Reserved,
    /// No such key.
    #[error("key {0:?} not found")]
    NotFound(String),
    /// The handle failed verification.
    #[error("invalid handle")]
    InvalidHandle,
    /// The handle names the wrong kind of key for the route.
    #[error("handle is not for {0}")]
    WrongHandleKind(&'static str),
    /// The mechanism does not fit the key type.
    #[error("mechanism cannot be used with this key type")]
    WrongMechanism,
    /// A derived key was used as the base of another derivation.
    #[error("nested derived keys are not supported, import the outer derived key first")]
    NestedDerivation,
    /// A key of the other kind has this ID.
    #[error("a {existing} with ID {id:?} already exists")]
    KindConflict {
        /// `key` or `key pair`.
        existing: &'static str,
        /// The key ID.
        id: String,
    },
    /// The key is preloaded from configuration.
    #[error("key {0:?} is preloaded and read-only")]
    Preloaded(String),
    /// AEAD ciphertext too short.
    #[error("malformed ciphertext")]
    MalformedCiphertext,
    /// AEAD ciphertext with an unknown version byte.
    #[error("unknown ciphertext version {0}")]
    UnknownCiphertextVersion(u8),
    /// AEAD authentication failed.
    #[error("decryption failed")]
    DecryptionFailed,
    /// The key is stored but cannot be read.
    #[error("key {0:?} is stored but unreadable")]
    Unreadable(String, #[source] StoreError),
    /// Storage or crypto failed.
    #[error("key storage failed")]
    Store(#[source] StoreError),
    /// A blocking task panicked or was cancelled.
    #[error("a background task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A tpmd API request failed in the TPM.
    #[error(transparent)]
    Tpm(#[from] crate::tpm::TpmError),
    /// The TPM thread could not be started.
    #[error("the TPM thread could not be started")]
    TpmThread(#[source] std::io::Error),
    /// The caller may not use the tpmd API.
    #[error("user {uid} is not authorized to use the TPM service")]
    TpmForbidden {
        /// The caller's uid.
        uid: u32,
    },
}

impl From<HandleError> for KeyError {
    fn from(error: HandleError) -> Self {
        match error {
            HandleError::Invalid => KeyError::InvalidHandle,
            HandleError::Store(error) => KeyError::Store(error),
        }
    }
}

impl From<StoreError> for KeyError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::InvalidInput(reason) => KeyError::BadRequest(reason),
            StoreError::Unreadable { id } => {
                let source = StoreError::Unreadable { id: id.clone() };
                KeyError::Unreadable(id, source)
            }
            other => KeyError::Store(other),
        }
    }
}

impl http_common::ApiError for KeyError {
    fn status(&self) -> StatusCode {
        match self {
            KeyError::Http(error) => error.status,
            KeyError::InvalidParameter { .. }
            | KeyError::BadRequest(_)
            | KeyError::InvalidHandle
            | KeyError::WrongHandleKind(_)
            | KeyError::WrongMechanism
            | KeyError::NestedDerivation
            | KeyError::MalformedCiphertext
            | KeyError::UnknownCiphertextVersion(_)
            | KeyError::DecryptionFailed => StatusCode::BAD_REQUEST,
            KeyError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            KeyError::Forbidden { .. } | KeyError::Reserved => StatusCode::FORBIDDEN,
            KeyError::NotFound(_) => StatusCode::NOT_FOUND,
            KeyError::KindConflict { .. } | KeyError::Preloaded(_) => StatusCode::CONFLICT,
            KeyError::Unreadable(..)
            | KeyError::Store(_)
            | KeyError::Task(_)
            | KeyError::TpmThread(_) => StatusCode::INTERNAL_SERVER_ERROR,
            KeyError::TpmForbidden { .. } => StatusCode::FORBIDDEN,
            KeyError::Tpm(error) => match error {
                TpmError::BadKey(_) | TpmError::Activation(_) | TpmError::DataTooLong { .. } => {
                    StatusCode::BAD_REQUEST
                }
                TpmError::NoAuthKey { .. } => StatusCode::NOT_FOUND,
                TpmError::Open(_) => StatusCode::SERVICE_UNAVAILABLE,
                TpmError::Tss { .. } | TpmError::Stopped => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    fn server_message(&self) -> String {
        match self {
            // Names the key, never the path (the path is in the logged chain).
            KeyError::Unreadable(id, _) => format!("key {id:?} is stored but unreadable"),
            KeyError::Http(error) => error.message.clone(),
            // TPM accounts name the step and the TPM's response code, never a secret.
            KeyError::Tpm(error) => error.to_string(),
            _ => "internal error".to_owned(),
        }
    }

    fn allow(&self) -> Option<&'static str> {
        match self {
            KeyError::Http(error) => error.allow,
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u32> {
        match self {
            KeyError::Http(error) => error.retry_after,
            KeyError::Tpm(TpmError::Open(_)) => Some(5),
            _ => None,
        }
    }
}
