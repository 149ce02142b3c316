//! certd's error type and its one mapping to HTTP statuses.

use http::StatusCode;
use http_common::ClientError;

use crate::store::StoreError;

/// Everything a certd request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The HTTP layer refused the request (route, api-version, body).
    #[error(transparent)]
    Http(#[from] http_common::HttpError),
    /// A request field has an invalid value.
    #[error("{name}: {reason}")]
    InvalidParameter {
        /// The field (`certId`, `csr`, `pem`, `issuer.certId`, ...).
        name: &'static str,
        /// Why.
        reason: String,
    },
    /// The request is not acceptable as a whole (the message is the full text).
    #[error("{0}")]
    BadRequest(String),
    /// The caller may not write this cert ID.
    #[error("user {uid} is not authorized to modify the cert {id}")]
    Forbidden {
        /// The caller's uid.
        uid: u32,
        /// The cert ID.
        id: String,
    },
    /// An implicit issuer (self-signed, local CA) was asked for a CA certificate for a cert ID
    /// that may not be a CA.
    #[error(
        "cert {id:?} may not be issued as a CA certificate without an issuer: the CSR requests \
         {extension} (allow it with `ca = true` in [cert_issuance.\"{id}\"], or name an issuer)"
    )]
    CaNotAllowed {
        /// The cert ID.
        id: String,
        /// What the CSR asked for, e.g. `basicConstraints CA:TRUE`.
        extension: String,
    },
    /// No such cert.
    #[error("cert {0:?} not found")]
    NotFound(String),
    /// The cert is preloaded from configuration and cannot be written.
    #[error("cert {0:?} is preloaded from configuration")]
    Preloaded(String),
    /// The issuer's certificate is past its notAfter.
    #[error("issuer certificate {0:?} has expired")]
    IssuerExpired(String),
    /// keyd refused the caller-supplied issuer key handle.
    #[error("issuer.privateKeyHandle: {message}")]
    IssuerHandle {
        /// keyd's status (400 or 404).
        status: StatusCode,
        /// keyd's message.
        message: String,
    },
    /// A key pair certd needs does not exist in keyd.
    #[error("key pair {0:?} does not exist in keyd")]
    KeyPairNotFound(String),
    /// keyd cannot be reached, did not answer in time, or is over its budget.
    #[error("key service unavailable")]
    KeydUnavailable(#[source] ClientError),
    /// keyd does not let certd use one of its keys (keyd config lacks a certd principal).
    #[error("certd is not authorized in keyd for key {key_id:?}")]
    KeydForbidden {
        /// The key ID.
        key_id: String,
        /// keyd's answer.
        #[source]
        source: ClientError,
    },
    /// keyd answered something certd cannot use.
    #[error("key service failed during {step}")]
    Keyd {
        /// What certd was doing.
        step: &'static str,
        /// keyd's answer.
        #[source]
        source: ClientError,
    },
    /// A preloaded cert file exists but cannot be read.
    #[error("preloaded cert {id:?} is unreadable ({})", path.display())]
    PreloadedUnreadable {
        /// The cert ID.
        id: String,
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A stored certificate (issuer) cannot be used.
    #[error("cert {id:?} is stored but not usable as an issuer: {reason}")]
    UnusableIssuer {
        /// The cert ID.
        id: String,
        /// Why.
        reason: String,
    },
    /// Building or encoding a certificate failed (a bug or an unsupported input).
    #[error("could not build the certificate: {0}")]
    Encoding(String),
    /// OpenSSL failed unexpectedly.
    #[error("cryptographic operation failed")]
    Crypto(#[from] openssl::error::ErrorStack),
    /// Storage failed.
    #[error("cert storage failed")]
    Store(#[from] StoreError),
    /// A blocking task panicked or was cancelled.
    #[error("a background task failed")]
    Task(#[source] tokio::task::JoinError),
    /// The EST server could not be reached (connection, TLS handshake, timeout).
    #[error("EST server {url} is unreachable: {reason}")]
    EstUnreachable {
        /// The request URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The EST server answered with an error.
    #[error("EST server {url} refused the request ({status}): {message}")]
    EstRefused {
        /// The request URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The server's text (shortened).
        message: String,
    },
    /// The EST server's answer is not usable.
    #[error("EST server {url} answered something unusable: {reason}")]
    EstInvalidAnswer {
        /// The request URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// EST enrollment cannot run with this configuration or state (e.g. a missing identity).
    #[error("EST enrollment of {id:?} is not possible: {reason}")]
    EstNotReady {
        /// The cert ID being enrolled.
        id: String,
        /// Why.
        reason: String,
    },
}

impl CertError {
    /// A 400 for field `name`.
    pub fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        CertError::InvalidParameter {
            name,
            reason: reason.into(),
        }
    }
}

impl http_common::ApiError for CertError {
    fn status(&self) -> StatusCode {
        match self {
            CertError::Http(error) => error.status,
            CertError::InvalidParameter { .. }
            | CertError::BadRequest(_)
            | CertError::IssuerExpired(_)
            | CertError::KeyPairNotFound(_)
            | CertError::UnusableIssuer { .. } => StatusCode::BAD_REQUEST,
            CertError::IssuerHandle { status, .. } => *status,
            CertError::Forbidden { .. } | CertError::CaNotAllowed { .. } => StatusCode::FORBIDDEN,
            CertError::NotFound(_) => StatusCode::NOT_FOUND,
            CertError::Preloaded(_) => StatusCode::CONFLICT,
            CertError::KeydUnavailable(_) | CertError::EstUnreachable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            CertError::EstRefused { .. } | CertError::EstInvalidAnswer { .. } => {
                StatusCode::BAD_GATEWAY
            }
            CertError::EstNotReady { .. } => StatusCode::CONFLICT,
            CertError::KeydForbidden { .. }
            | CertError::Keyd { .. }
            | CertError::PreloadedUnreadable { .. }
            | CertError::Encoding(_)
            | CertError::Crypto(_)
            | CertError::Store(_)
            | CertError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn server_message(&self) -> String {
        match self {
            CertError::Http(error) => error.message.clone(),
            CertError::KeydUnavailable(_) => "key service unavailable".to_owned(),
            CertError::KeydForbidden { key_id, .. } => {
                format!("certd is not authorized in keyd for key {key_id:?}")
            }
            // Names the cert, never the path (the path is in the logged chain).
            CertError::PreloadedUnreadable { id, .. } => {
                format!("preloaded cert {id:?} is unreadable")
            }
            // Says what went wrong with the EST server (no secrets: URLs and server text only).
            CertError::EstUnreachable { .. }
            | CertError::EstRefused { .. }
            | CertError::EstInvalidAnswer { .. } => self.to_string(),
            _ => "internal error".to_owned(),
        }
    }

    fn allow(&self) -> Option<&'static str> {
        match self {
            CertError::Http(error) => error.allow,
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u32> {
        match self {
            CertError::Http(error) => error.retry_after,
            CertError::KeydUnavailable(_) => Some(1),
            CertError::EstUnreachable { .. } => Some(30),
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
        let cases: Vec<(CertError, u16, &str)> = vec![
            (
                CertError::Forbidden {
                    uid: 1000,
                    id: "x".into(),
                },
                403,
                "user 1000 is not authorized to modify the cert x",
            ),
            (
                CertError::CaNotAllowed {
                    id: "mod-a".into(),
                    extension: "basicConstraints CA:TRUE".into(),
                },
                403,
                "cert \"mod-a\" may not be issued as a CA certificate without an issuer: the CSR \
                 requests basicConstraints CA:TRUE (allow it with `ca = true` in \
                 [cert_issuance.\"mod-a\"], or name an issuer)",
            ),
            (CertError::NotFound("x".into()), 404, "cert \"x\" not found"),
            (
                CertError::Preloaded("x".into()),
                409,
                "cert \"x\" is preloaded from configuration",
            ),
            (
                CertError::IssuerExpired("ca".into()),
                400,
                "issuer certificate \"ca\" has expired",
            ),
            (
                CertError::KeydUnavailable(ClientError::InvalidEndpoint("x".into())),
                503,
                "key service unavailable",
            ),
            (
                CertError::KeydForbidden {
                    key_id: "local-ca".into(),
                    source: ClientError::InvalidEndpoint("x".into()),
                },
                500,
                "certd is not authorized in keyd for key \"local-ca\"",
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
