//! identityd's error type and its one mapping to HTTP statuses.

use std::sync::Arc;

use http::StatusCode;
use http_common::ClientError;

use crate::cloud::CloudError;

/// Everything an identityd request (or background provisioning) can fail with.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The HTTP layer refused the request (route, api-version, body).
    #[error(transparent)]
    Http(#[from] http_common::HttpError),
    /// The caller may not do this.
    #[error("user {uid} is not authorized")]
    Forbidden {
        /// The caller's uid.
        uid: u32,
    },
    /// A request parameter is missing or invalid (the message is the full text).
    #[error("{0}")]
    BadRequest(String),
    /// No such module identity.
    #[error("module {0:?} not found")]
    ModuleNotFound(String),
    /// A module principal's identity is not (yet) in Hub because the module reconciliation of
    /// the current provisioning round is still running after the wait, or failed.
    #[error("module {module:?} is not reconciled yet: {reason}")]
    ModuleNotReconciled {
        /// The module ID.
        module: String,
        /// Why: still running, or the reconciliation's error.
        reason: String,
    },
    /// The module identity exists already.
    #[error("module {0:?} already exists")]
    ModuleExists(String),
    /// The provisioning source is `none`.
    #[error("the device is not provisioned (provisioning source is \"none\")")]
    NotProvisioned,
    /// Provisioning is still running after the wait.
    #[error("device provisioning is still in progress")]
    ProvisioningInProgress,
    /// The last provisioning attempt failed (shared by everyone waiting for it).
    #[error("device provisioning failed")]
    Provisioning(#[source] Arc<IdentityError>),
    /// DPS or IoT Hub failed.
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// keyd failed.
    #[error("key service failed while {step}")]
    Keyd {
        /// What identityd was doing.
        step: String,
        /// keyd's answer or the transport error.
        #[source]
        source: ClientError,
    },
    /// certd failed.
    #[error("certificate service failed while {step}")]
    Certd {
        /// What identityd was doing.
        step: String,
        /// certd's answer or the transport error.
        #[source]
        source: ClientError,
    },
    /// The TPM service failed.
    #[error("TPM service failed while {step}")]
    Tpm {
        /// What identityd was doing.
        step: String,
        /// The TPM service's answer or the transport error.
        #[source]
        source: ClientError,
    },
    /// The configured device credentials cannot be used.
    #[error("device credentials are unusable: {0}")]
    Credentials(String),
    /// A state file could not be read or written.
    #[error("state file {path} could not be {action}")]
    State {
        /// The file.
        path: String,
        /// `read` or `written`.
        action: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Building a local identity failed.
    #[error("could not issue the local identity: {0}")]
    Local(String),
}

impl IdentityError {
    /// keyd failed while `step`.
    pub fn keyd(step: impl Into<String>) -> impl FnOnce(ClientError) -> IdentityError {
        let step = step.into();
        move |source| IdentityError::Keyd { step, source }
    }

    /// certd failed while `step`.
    pub fn certd(step: impl Into<String>) -> impl FnOnce(ClientError) -> IdentityError {
        let step = step.into();
        move |source| IdentityError::Certd { step, source }
    }

    /// The TPM service failed while `step`.
    pub fn tpm(step: impl Into<String>) -> impl FnOnce(ClientError) -> IdentityError {
        let step = step.into();
        move |source| IdentityError::Tpm { step, source }
    }

    /// The cloud error behind this error, if any.
    pub fn cloud(&self) -> Option<&CloudError> {
        match self {
            IdentityError::Cloud(error) => Some(error),
            IdentityError::Provisioning(inner) => inner.cloud(),
            _ => None,
        }
    }

    /// Whether this is a network-class cloud failure (unreachable, timeout, throttled, 5xx),
    /// which allows falling back to the backup or the cache.
    pub fn is_cloud_network(&self) -> bool {
        self.cloud().is_some_and(CloudError::is_network)
    }
}

fn peer_message(component: &str, step: &str, source: &ClientError) -> String {
    match source {
        ClientError::Status { status, message } if status.is_client_error() => {
            format!("{component} refused a request while {step}: {message}")
        }
        ClientError::Status { .. } | ClientError::Decode(_) => {
            format!("{component} failed while {step}")
        }
        _ => format!("{component} unavailable"),
    }
}

impl http_common::ApiError for IdentityError {
    fn status(&self) -> StatusCode {
        match self {
            IdentityError::Http(error) => error.status,
            IdentityError::Forbidden { .. } => StatusCode::FORBIDDEN,
            IdentityError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IdentityError::ModuleNotFound(_) | IdentityError::NotProvisioned => {
                StatusCode::NOT_FOUND
            }
            IdentityError::ModuleExists(_) => StatusCode::CONFLICT,
            IdentityError::ProvisioningInProgress | IdentityError::ModuleNotReconciled { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            IdentityError::Provisioning(inner) => inner.status(),
            IdentityError::Cloud(error) => error.status(),
            IdentityError::Keyd { .. }
            | IdentityError::Certd { .. }
            | IdentityError::Tpm { .. }
            | IdentityError::Credentials(_)
            | IdentityError::State { .. }
            | IdentityError::Local(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn server_message(&self) -> String {
        match self {
            IdentityError::Http(error) => error.message.clone(),
            IdentityError::ProvisioningInProgress | IdentityError::ModuleNotReconciled { .. } => {
                self.to_string()
            }
            IdentityError::Provisioning(inner) => {
                format!("device provisioning failed: {}", inner.server_message())
            }
            IdentityError::Cloud(error) => error.to_string(),
            IdentityError::Keyd { step, source } => peer_message("key service", step, source),
            IdentityError::Certd { step, source } => {
                peer_message("certificate service", step, source)
            }
            IdentityError::Tpm { step, source } => peer_message("TPM service", step, source),
            IdentityError::Credentials(reason) => {
                format!("device credentials are unusable: {reason}")
            }
            IdentityError::State { .. } => "could not access identityd's state".to_owned(),
            IdentityError::Local(_) => "could not issue the local identity".to_owned(),
            _ => "internal error".to_owned(),
        }
    }

    fn retry_after(&self) -> Option<u32> {
        match self {
            IdentityError::Http(error) => error.retry_after,
            IdentityError::ProvisioningInProgress | IdentityError::ModuleNotReconciled { .. } => {
                Some(5)
            }
            IdentityError::Provisioning(inner) => inner.retry_after(),
            IdentityError::Cloud(error) => error.retry_after(),
            _ => None,
        }
    }

    fn allow(&self) -> Option<&'static str> {
        match self {
            IdentityError::Http(error) => error.allow,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_common::ApiError as _;

    #[test]
    fn statuses() {
        let cloud = IdentityError::Cloud(CloudError::Status {
            service: "DPS",
            status: 401,
            message: "bad token".into(),
        });
        assert_eq!(cloud.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(cloud.server_message(), "cloud error: 401 bad token (DPS)");
        let shared = IdentityError::Provisioning(Arc::new(cloud));
        assert_eq!(shared.status(), StatusCode::BAD_GATEWAY);
        assert!(shared
            .server_message()
            .contains("cloud error: 401 bad token"));
        assert_eq!(IdentityError::ProvisioningInProgress.retry_after(), Some(5));
        let pending = IdentityError::ModuleNotReconciled {
            module: "m".into(),
            reason: "module reconciliation is still running".into(),
        };
        assert_eq!(pending.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(pending.retry_after(), Some(5));
        assert_eq!(
            pending.server_message(),
            "module \"m\" is not reconciled yet: module reconciliation is still running"
        );
        let keyd = IdentityError::Keyd {
            step: "loading key".into(),
            source: ClientError::Status {
                status: StatusCode::NOT_FOUND,
                message: "key \"x\" not found".into(),
            },
        };
        assert_eq!(keyd.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(keyd.server_message().contains("key \"x\" not found"));
    }
}
