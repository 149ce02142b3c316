//! DPS registration (spec 9.2): register, then poll the operation, waiting `Retry-After`
//! between polls (default 3 s, clamped to 1–60 s), for at most [`POLL_DEADLINE`].

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde::Deserialize;

use super::{encode_segment, CloudClient, CloudError, CloudRequest, RequestAuth, Service};
use crate::error::IdentityError;

/// The api-version sent to DPS.
pub const API_VERSION: &str = "2021-06-01";
/// How long a registration may take overall.
pub const POLL_DEADLINE: Duration = Duration::from_secs(300);

/// What DPS assigned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The hub (authority, may carry `:port`).
    pub assigned_hub: String,
    /// The device ID.
    pub device_id: String,
    /// The custom allocation answer.
    pub payload: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationStatus {
    operation_id: Option<String>,
    status: Option<String>,
    registration_state: Option<RegistrationState>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegistrationState {
    assigned_hub: Option<String>,
    device_id: Option<String>,
    status: Option<String>,
    error_code: Option<serde_json::Value>,
    error_message: Option<String>,
    payload: Option<serde_json::Value>,
}

/// One registration to run.
#[derive(Debug)]
pub struct Registration<'a> {
    /// `host[:port]` of DPS.
    pub authority: &'a str,
    /// The ID scope.
    pub scope_id: &'a str,
    /// The registration ID.
    pub registration_id: &'a str,
    /// The custom payload.
    pub payload: Option<&'a serde_json::Value>,
    /// SAS (symmetric key) or the TLS client identity (X.509).
    pub auth: RequestAuth,
}

fn protocol(reason: impl Into<String>) -> IdentityError {
    CloudError::Protocol {
        service: "DPS",
        reason: reason.into(),
    }
    .into()
}

/// Registers and waits for the assignment.
pub async fn register(
    cloud: &CloudClient,
    registration: Registration<'_>,
) -> Result<Assignment, IdentityError> {
    let started = Instant::now();
    let base = format!(
        "/{}/registrations/{}",
        encode_segment(registration.scope_id, false),
        encode_segment(registration.registration_id, false)
    );
    let mut body = serde_json::json!({ "registrationId": registration.registration_id });
    if let Some(payload) = registration.payload {
        body["payload"] = payload.clone();
    }
    let request = CloudRequest {
        service: Service::Dps,
        method: Method::PUT,
        authority: registration.authority.to_owned(),
        path_and_query: format!("{base}/register?api-version={API_VERSION}"),
        auth: registration.auth.clone(),
        headers: Vec::new(),
        body: Some(serde_json::to_vec(&body).unwrap_or_default()),
    };
    log::info!(
        "registering {:?} with DPS at {} (scope {})",
        registration.registration_id,
        registration.authority,
        registration.scope_id
    );
    let mut response = cloud.send(&request).await?;
    loop {
        let status = response.status;
        if status != StatusCode::OK && status != StatusCode::ACCEPTED {
            return Err(response.into_error(Service::Dps).into());
        }
        let retry_after = response.retry_after();
        let operation: OperationStatus = serde_json::from_slice(&response.body)
            .map_err(|error| protocol(format!("operation status: {error}")))?;
        match operation.status.as_deref() {
            Some("assigned") => {
                let state = operation
                    .registration_state
                    .ok_or_else(|| protocol("assigned without registrationState"))?;
                let assigned_hub = state
                    .assigned_hub
                    .filter(|hub| crate::util::split_authority(hub).is_some())
                    .ok_or_else(|| protocol("assigned without a valid assignedHub"))?;
                let device_id = state
                    .device_id
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| protocol("assigned without deviceId"))?;
                log::info!("DPS assigned device {device_id:?} to hub {assigned_hub}");
                return Ok(Assignment {
                    assigned_hub,
                    device_id,
                    payload: state.payload,
                });
            }
            Some("assigning") | Some("unassigned") if status == StatusCode::ACCEPTED => {}
            Some("assigning") => {}
            Some(other) => {
                let state = operation.registration_state;
                let error_code = state
                    .as_ref()
                    .and_then(|state| state.error_code.as_ref())
                    .map(|code| match code {
                        serde_json::Value::String(text) => text.clone(),
                        other => other.to_string(),
                    })
                    .unwrap_or_default();
                let message = state
                    .as_ref()
                    .and_then(|state| state.error_message.clone())
                    .unwrap_or_else(|| "(no message)".to_owned());
                let status = state
                    .and_then(|state| state.status)
                    .unwrap_or_else(|| other.to_owned());
                return Err(CloudError::RegistrationFailed {
                    status,
                    error_code,
                    message,
                }
                .into());
            }
            None => return Err(protocol("no status in the operation answer")),
        }
        let operation_id = operation
            .operation_id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| protocol("no operationId"))?;
        let wait = Duration::from_secs(u64::from(retry_after.unwrap_or(3).clamp(1, 60)));
        if started.elapsed() + wait > POLL_DEADLINE {
            return Err(CloudError::RegistrationTimeout {
                seconds: POLL_DEADLINE.as_secs(),
            }
            .into());
        }
        tokio::time::sleep(wait).await;
        let poll = CloudRequest {
            service: Service::Dps,
            method: Method::GET,
            authority: registration.authority.to_owned(),
            path_and_query: format!(
                "{base}/operations/{}?api-version={API_VERSION}",
                encode_segment(&operation_id, false)
            ),
            auth: registration.auth.clone(),
            headers: Vec::new(),
            body: None,
        };
        response = cloud.send(&poll).await?;
    }
}
