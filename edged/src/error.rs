//! edged's error type and its one mapping to HTTP statuses.
//!
//! 4xx answers carry the error chain; 5xx answers carry a short text naming the failing step
//! (`failed to get module identity for <name>`), never key material, handles or tokens. Docker's
//! own messages are kept (they name containers and images, nothing secret).

use http::StatusCode;
use http_common::ClientError;

use crate::docker::DockerError;

/// Everything an edged request (or startup step) can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EdgedError {
    /// The HTTP layer refused the request (route, api-version, body).
    #[error(transparent)]
    Http(#[from] http_common::HttpError),
    /// A request parameter has an invalid value.
    #[error("invalid parameter: {name}")]
    InvalidParameter {
        /// The parameter (`tail`, `data`, `initializationVector`, ...).
        name: String,
        /// Why (logged in the chain).
        #[source]
        reason: Reason,
    },
    /// The request as a whole is invalid (the message is the full text).
    #[error("{0}")]
    BadRequest(String),
    /// The caller is not a process of the container the route requires.
    #[error("forbidden")]
    Forbidden,
    /// No such module.
    #[error("module {0:?} not found")]
    ModuleNotFound(String),
    /// No such image (process runtime: the image file is missing).
    #[error("image {0:?} not found")]
    ImageNotFound(String),
    /// The request conflicts with what exists (a module name in use, no free module uid).
    #[error("{0}")]
    Conflict(String),
    /// Docker refused or failed; its status is kept for 4xx.
    #[error(transparent)]
    Docker(#[from] DockerError),
    /// identityd answered with an error or could not be reached.
    #[error("{step}")]
    Identity {
        /// What edged was doing (`failed to get module identity for m`).
        step: String,
        /// identityd's answer.
        #[source]
        source: ClientError,
    },
    /// identityd returned a local identity where a cloud one was needed.
    #[error("identity {0:?} is a local identity, not an IoT Hub module identity")]
    LocalIdentity(String),
    /// keyd failed.
    #[error("{step}")]
    Keyd {
        /// What edged was doing.
        step: String,
        /// keyd's answer.
        #[source]
        source: ClientError,
    },
    /// certd failed.
    #[error("{step}")]
    Certd {
        /// What edged was doing.
        step: String,
        /// certd's answer.
        #[source]
        source: ClientError,
    },
    /// A requested certificate does not exist in certd.
    #[error("certificate {0:?} not found")]
    CertificateNotFound(String),
    /// Local cryptography (key generation, CSR) failed.
    #[error("{step}")]
    Crypto {
        /// What edged was doing.
        step: String,
        /// OpenSSL's error.
        #[source]
        source: openssl::error::ErrorStack,
    },
    /// A local file operation failed.
    #[error("{step}")]
    Io {
        /// What edged was doing.
        step: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Something unexpected (a bug, a failed task).
    #[error("{0}")]
    Internal(String),
}

/// Why a parameter was refused (shown after "caused by").
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Reason(pub String);

impl EdgedError {
    /// A 400 `invalid parameter: <name>` with a reason.
    pub fn invalid(name: impl Into<String>, reason: impl Into<String>) -> Self {
        EdgedError::InvalidParameter {
            name: name.into(),
            reason: Reason(reason.into()),
        }
    }

    /// An identityd failure at `step`.
    pub fn identity(step: impl Into<String>, source: ClientError) -> Self {
        EdgedError::Identity {
            step: step.into(),
            source,
        }
    }

    /// A keyd failure at `step`.
    pub fn keyd(step: impl Into<String>, source: ClientError) -> Self {
        EdgedError::Keyd {
            step: step.into(),
            source,
        }
    }

    /// A certd failure at `step`.
    pub fn certd(step: impl Into<String>, source: ClientError) -> Self {
        EdgedError::Certd {
            step: step.into(),
            source,
        }
    }

    /// An OpenSSL failure at `step`.
    pub fn crypto(step: impl Into<String>, source: openssl::error::ErrorStack) -> Self {
        EdgedError::Crypto {
            step: step.into(),
            source,
        }
    }

    /// A file failure at `step`.
    pub fn io(step: impl Into<String>, source: std::io::Error) -> Self {
        EdgedError::Io {
            step: step.into(),
            source,
        }
    }
}

impl http_common::ApiError for EdgedError {
    fn status(&self) -> StatusCode {
        match self {
            EdgedError::Http(error) => error.status,
            EdgedError::InvalidParameter { .. }
            | EdgedError::BadRequest(_)
            | EdgedError::LocalIdentity(_) => StatusCode::BAD_REQUEST,
            EdgedError::Forbidden => StatusCode::FORBIDDEN,
            EdgedError::ModuleNotFound(_)
            | EdgedError::ImageNotFound(_)
            | EdgedError::CertificateNotFound(_) => StatusCode::NOT_FOUND,
            EdgedError::Conflict(_) => StatusCode::CONFLICT,
            EdgedError::Docker(error) => match error.status() {
                Some(status) if status.is_client_error() => status,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            EdgedError::Identity { source, .. } => match source.status() {
                Some(status) if status.is_client_error() => status,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            EdgedError::Keyd { .. }
            | EdgedError::Certd { .. }
            | EdgedError::Crypto { .. }
            | EdgedError::Io { .. }
            | EdgedError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn server_message(&self) -> String {
        match self {
            EdgedError::Http(error) => error.message.clone(),
            // Docker's own message: it names containers and images, nothing secret.
            EdgedError::Docker(error) => error.to_string(),
            EdgedError::Identity { step, .. }
            | EdgedError::Keyd { step, .. }
            | EdgedError::Certd { step, .. }
            | EdgedError::Crypto { step, .. }
            | EdgedError::Io { step, .. } => step.clone(),
            _ => "internal error".to_owned(),
        }
    }

    fn allow(&self) -> Option<&'static str> {
        match self {
            EdgedError::Http(error) => error.allow,
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u32> {
        match self {
            EdgedError::Http(error) => error.retry_after,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_common::ApiError as _;

    #[test]
    fn statuses_and_public_messages() {
        let docker = |status: StatusCode, message: &str| {
            EdgedError::Docker(DockerError::Status {
                status,
                message: message.to_owned(),
            })
        };
        let cases: Vec<(EdgedError, u16, &str)> = vec![
            (EdgedError::Forbidden, 403, "forbidden"),
            (
                EdgedError::ImageNotFound("/opt/m".to_owned()),
                404,
                "image \"/opt/m\" not found",
            ),
            (
                EdgedError::Conflict("the module name \"m\" is already in use".to_owned()),
                409,
                "the module name \"m\" is already in use",
            ),
            (
                EdgedError::invalid("tail", "not a number"),
                400,
                "invalid parameter: tail",
            ),
            (
                docker(StatusCode::NOT_FOUND, "No such container: x"),
                404,
                "No such container: x",
            ),
            (
                docker(StatusCode::CONFLICT, "name in use"),
                409,
                "name in use",
            ),
            (
                docker(StatusCode::INTERNAL_SERVER_ERROR, "boom"),
                500,
                "boom",
            ),
            (
                EdgedError::identity(
                    "failed to get module identity for m",
                    ClientError::Status {
                        status: StatusCode::NOT_FOUND,
                        message: "no such module".into(),
                    },
                ),
                404,
                "failed to get module identity for m",
            ),
            (
                EdgedError::identity(
                    "failed to get module identity for m",
                    ClientError::InvalidEndpoint("x".into()),
                ),
                500,
                "failed to get module identity for m",
            ),
            (
                EdgedError::keyd(
                    "failed to sign",
                    ClientError::InvalidEndpoint("secret".into()),
                ),
                500,
                "failed to sign",
            ),
        ];
        for (error, status, message) in cases {
            assert_eq!(error.status().as_u16(), status, "{error}");
            let public = if error.status().is_server_error() {
                error.server_message()
            } else {
                error.to_string()
            };
            assert_eq!(public, message);
        }
    }
}
