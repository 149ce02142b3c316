//! The provider's errors and their reason codes on OpenSSL's error queue.

use std::ffi::{c_uint, CStr};

use http_common::ClientError;

/// What failed in the provider. The message goes to OpenSSL's error queue; it never holds a
/// key handle or key bytes.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// keyd answered with a 4xx status (authorization, unknown key, bad request).
    #[error("keyd refused to {operation}: {detail}")]
    KeydRefused {
        /// What was asked (`load key pair "x"`).
        operation: String,
        /// keyd's status and message.
        detail: String,
    },
    /// keyd could not be reached, timed out or failed (5xx).
    #[error("keyd could not {operation}: {detail}")]
    KeydFailed {
        /// What was asked.
        operation: String,
        /// The cause chain.
        detail: String,
    },
    /// The keyd endpoint is not a `unix:///path` URI.
    #[error("invalid keyd endpoint: {0}")]
    Endpoint(String),
    /// A `keyd:` URI that names no key.
    #[error("invalid keyd URI {uri:?}: {reason}")]
    Uri {
        /// The URI.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An algorithm, parameter or key kind this provider does not offer.
    #[error("{0}")]
    Unsupported(String),
    /// The caller's buffer is too small.
    #[error("the signature needs {needed} bytes, the buffer has {available}")]
    BufferTooSmall {
        /// The signature's length.
        needed: usize,
        /// The buffer's size.
        available: usize,
    },
    /// A bug or a resource failure inside the provider (also a caught panic).
    #[error("internal error in the keyd provider: {0}")]
    Internal(String),
}

/// The reason codes and their texts (`OSSL_FUNC_provider_get_reason_strings`).
pub const REASONS: &[(c_uint, &CStr)] = &[
    (1, c"keyd refused the request"),
    (2, c"keyd request failed"),
    (3, c"invalid keyd endpoint"),
    (4, c"invalid keyd URI"),
    (5, c"unsupported by the keyd provider"),
    (6, c"buffer too small"),
    (7, c"internal error"),
];

impl ProviderError {
    /// The reason code in [`REASONS`].
    pub fn reason(&self) -> c_uint {
        match self {
            ProviderError::KeydRefused { .. } => 1,
            ProviderError::KeydFailed { .. } => 2,
            ProviderError::Endpoint(_) => 3,
            ProviderError::Uri { .. } => 4,
            ProviderError::Unsupported(_) => 5,
            ProviderError::BufferTooSmall { .. } => 6,
            ProviderError::Internal(_) => 7,
        }
    }

    /// The error for a failed keyd call made to `operation`.
    pub fn keyd(operation: impl Into<String>, error: &ClientError) -> ProviderError {
        let operation = operation.into();
        match error {
            ClientError::Status { status, .. } if status.is_client_error() => {
                ProviderError::KeydRefused {
                    operation,
                    detail: error.to_string(),
                }
            }
            _ => ProviderError::KeydFailed {
                operation,
                detail: http_common::error::error_chain(error),
            },
        }
    }
}
