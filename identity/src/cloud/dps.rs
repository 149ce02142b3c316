//! DPS registration (spec 9.2): register, then poll the operation, waiting `Retry-After`
//! between polls (default 3 s, clamped to 1–60 s), for at most [`POLL_DEADLINE`].

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde::Deserialize;

use super::{encode_segment, CloudClient, CloudError, CloudRequest, RequestAuth, Service};
use crate::error::IdentityError;

/// The api-version sent to DPS.
pub const API_VERSION: &str = "2021-06-01";
/// The api-version of registrations that carry a CSR (spec 9.6, `csr` →
/// `issuedCertificateChain`).
pub const CSR_API_VERSION: &str = "2025-07-01-preview";
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
    /// The certificate chain DPS issued for the registration's CSR, as PEM (leaf first).
    pub issued_chain: Option<String>,
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
    tpm: Option<TpmState>,
    assigned_hub: Option<String>,
    device_id: Option<String>,
    status: Option<String>,
    error_code: Option<serde_json::Value>,
    error_message: Option<String>,
    payload: Option<serde_json::Value>,
    /// `csr` answer: base64 DER (or PEM) certificates, leaf first.
    issued_certificate_chain: Option<Vec<String>>,
    /// `clientCertificateCsr` answer (earlier preview): the PEM leaf.
    issued_client_certificate: Option<String>,
}

/// The issued chain of an assigned registration state as PEM, from either field generation
/// (elements may be PEM or base64 DER).
fn issued_chain(state: &RegistrationState) -> Result<Option<String>, IdentityError> {
    use base64::Engine as _;
    let elements: Vec<&str> = match (
        &state.issued_certificate_chain,
        &state.issued_client_certificate,
    ) {
        (Some(chain), _) => chain.iter().map(String::as_str).collect(),
        (None, Some(leaf)) => vec![leaf.as_str()],
        (None, None) => return Ok(None),
    };
    let mut pem = String::new();
    for element in elements {
        let element = element.trim();
        let certs: Vec<Vec<u8>> = if element.starts_with("-----BEGIN") {
            cert_api::pem::certificate_ders(element)
                .map_err(|_| protocol("an issued certificate is not valid PEM"))?
        } else {
            vec![base64::engine::general_purpose::STANDARD
                .decode(element)
                .map_err(|_| protocol("an issued certificate is neither PEM nor base64"))?]
        };
        for der in certs {
            // certd checks the chain again when it is imported; this names the culprit early.
            <x509_cert::Certificate as der::Decode>::from_der(&der)
                .map_err(|_| protocol("an issued certificate is not a DER certificate"))?;
            cert_api::pem::append(&mut pem, &cert_api::pem::encode("CERTIFICATE", &der));
        }
    }
    if pem.is_empty() {
        return Err(protocol("the issued certificate chain is empty"));
    }
    Ok(Some(pem))
}

/// `tpm` of an assigned registration state, and the body of DPS's 401 to a TPM device's first
/// registration: the authentication key, wrapped for the device's TPM.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TpmState {
    authentication_key: Option<String>,
}

/// A TPM device's registration: its EK and SRK, and the TPM service that imports the key DPS
/// sends (spec 9.7).
#[derive(Debug)]
pub struct TpmAttestation {
    /// The EK and SRK (marshalled TPM2B_PUBLIC).
    pub keys: key_api::tpm::TpmKeys,
    /// The TPM service.
    pub client: key_api::tpm::TpmClient,
}

impl TpmAttestation {
    /// Imports an `authenticationKey` (base64) into the TPM.
    async fn import(&self, key: &str, when: &str) -> Result<(), IdentityError> {
        use base64::Engine as _;
        let blob = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|error| {
                protocol(format!("{when}: authenticationKey is not base64: {error}"))
            })?;
        self.client
            .import_auth_key(&blob)
            .await
            .map_err(IdentityError::tpm(format!(
                "importing DPS's authentication key ({when})"
            )))
    }
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
    /// SAS (symmetric key or TPM) or the TLS client identity (X.509).
    pub auth: RequestAuth,
    /// TPM attestation: the keys to send and the TPM to import DPS's key into.
    pub tpm: Option<&'a TpmAttestation>,
    /// A CSR (base64 DER) asking DPS for an operational certificate (spec 9.6).
    pub csr: Option<&'a str>,
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
    let api_version = match registration.csr {
        Some(csr) => {
            body["csr"] = serde_json::Value::String(csr.to_owned());
            CSR_API_VERSION
        }
        None => API_VERSION,
    };
    if let Some(tpm) = registration.tpm {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        body["tpm"] = serde_json::json!({
            "endorsementKey": b64.encode(&tpm.keys.endorsement_key),
            "storageRootKey": b64.encode(&tpm.keys.storage_root_key),
        });
    }
    let body = serde_json::to_vec(&body).unwrap_or_default();
    if let Some(tpm) = registration.tpm {
        challenge(cloud, &registration, &base, &body, api_version, tpm).await?;
    }
    let request = CloudRequest {
        service: Service::Dps,
        method: Method::PUT,
        authority: registration.authority.to_owned(),
        path_and_query: format!("{base}/register?api-version={api_version}"),
        auth: registration.auth.clone(),
        headers: Vec::new(),
        body: Some(body),
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
                let issued_chain = issued_chain(&state)?;
                let assigned_hub = state
                    .assigned_hub
                    .filter(|hub| crate::util::split_authority(hub).is_some())
                    .ok_or_else(|| protocol("assigned without a valid assignedHub"))?;
                let device_id = state
                    .device_id
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| protocol("assigned without deviceId"))?;
                if let (Some(tpm), Some(key)) = (
                    registration.tpm,
                    state
                        .tpm
                        .as_ref()
                        .and_then(|tpm| tpm.authentication_key.as_deref()),
                ) {
                    tpm.import(key, "assigned").await?;
                }
                log::info!("DPS assigned device {device_id:?} to hub {assigned_hub}");
                return Ok(Assignment {
                    assigned_hub,
                    device_id,
                    payload: state.payload,
                    issued_chain,
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
                "{base}/operations/{}?api-version={api_version}",
                encode_segment(&operation_id, false)
            ),
            auth: registration.auth.clone(),
            headers: Vec::new(),
            body: None,
        };
        response = cloud.send(&poll).await?;
    }
}

/// A TPM device's first step (spec 9.7): register without a credential; DPS answers 401 with
/// the authentication key, wrapped for this TPM's EK and SRK, which is imported. Any other
/// answer is the registration's error (an unknown or mismatched EK gets a 401 without a key).
async fn challenge(
    cloud: &CloudClient,
    registration: &Registration<'_>,
    base: &str,
    body: &[u8],
    api_version: &str,
    tpm: &TpmAttestation,
) -> Result<(), IdentityError> {
    let request = CloudRequest {
        service: Service::Dps,
        method: Method::PUT,
        authority: registration.authority.to_owned(),
        path_and_query: format!("{base}/register?api-version={api_version}"),
        auth: RequestAuth::None,
        headers: Vec::new(),
        body: Some(body.to_vec()),
    };
    log::info!(
        "registering {:?} with DPS by TPM: sending the endorsement key",
        registration.registration_id
    );
    let response = cloud.send(&request).await?;
    let key = (response.status == StatusCode::UNAUTHORIZED)
        .then(|| serde_json::from_slice::<TpmState>(&response.body).ok())
        .flatten()
        .and_then(|state| state.authentication_key);
    match key {
        Some(key) => tpm.import(&key, "TPM challenge").await,
        None => Err(response.into_error(Service::Dps).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certificate(cn: &str) -> openssl::x509::X509 {
        let key = openssl::pkey::PKey::from_ec_key(
            openssl::ec::EcKey::generate(
                &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)
                    .unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", cn).unwrap();
        let name = name.build();
        let mut builder = openssl::x509::X509::builder().unwrap();
        builder.set_subject_name(&name).unwrap();
        builder.set_issuer_name(&name).unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        builder
            .sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        builder.build()
    }

    fn state(json: serde_json::Value) -> RegistrationState {
        serde_json::from_value(json).unwrap()
    }

    /// Both field generations, PEM or base64 DER elements, become one PEM chain in order.
    #[test]
    fn issued_chains_of_both_generations() {
        use base64::Engine as _;
        let (leaf, ca) = (certificate("dev"), certificate("ca"));
        let b64 = |cert: &openssl::x509::X509| {
            base64::engine::general_purpose::STANDARD.encode(cert.to_der().unwrap())
        };
        let pem = |cert: &openssl::x509::X509| String::from_utf8(cert.to_pem().unwrap()).unwrap();
        let expected = format!("{}{}", pem(&leaf), pem(&ca));
        let current =
            state(serde_json::json!({ "issuedCertificateChain": [b64(&leaf), b64(&ca)] }));
        assert_eq!(issued_chain(&current).unwrap().unwrap(), expected);
        let mixed = state(serde_json::json!({ "issuedCertificateChain": [pem(&leaf), b64(&ca)] }));
        assert_eq!(issued_chain(&mixed).unwrap().unwrap(), expected);
        let earlier = state(serde_json::json!({ "issuedClientCertificate": pem(&leaf) }));
        assert_eq!(issued_chain(&earlier).unwrap().unwrap(), pem(&leaf));
        assert_eq!(issued_chain(&state(serde_json::json!({}))).unwrap(), None);
        let broken = state(serde_json::json!({ "issuedCertificateChain": ["%%%"] }));
        assert!(issued_chain(&broken)
            .unwrap_err()
            .to_string()
            .contains("neither PEM nor base64"));
        let not_a_certificate = state(serde_json::json!({ "issuedCertificateChain": ["AAAA"] }));
        assert!(issued_chain(&not_a_certificate)
            .unwrap_err()
            .to_string()
            .contains("not a DER certificate"));
        let unterminated = state(serde_json::json!({
            "issuedClientCertificate": "-----BEGIN CERTIFICATE-----\nAAAA\n"
        }));
        assert!(issued_chain(&unterminated)
            .unwrap_err()
            .to_string()
            .contains("not valid PEM"));
        let empty = state(serde_json::json!({ "issuedCertificateChain": [] }));
        assert!(issued_chain(&empty).is_err());
    }
}
