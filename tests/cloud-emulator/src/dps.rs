//! DPS registration API (spec 9.2): `PUT /{idScope}/registrations/{id}/register` and
//! `GET /{idScope}/registrations/{id}/operations/{operationId}`.
//!
//! Error codes are the emulator's own choice within the classes the spec names:
//! 400001 bad `api-version`, 400004 invalid body, 400005 `registrationId` mismatch,
//! 401002 bad or missing credential, 404001 unknown ID scope or route, 404002 unknown
//! operation, 405000 wrong method; injected faults use `<status>000` plus 1 for 429.
//!
//! TPM attestation (spec 9.7): a `register` body with `tpm` and no `Authorization` is the
//! first step: 401 `{"authenticationKey": ...}` when the EK matches the enrollment, else 401
//! with 401002 (no TPM enrollment for the ID) or 401003 (the EK is not the enrolled one);
//! 400004 when a TPM key cannot be parsed or used. The device then registers with a SAS token
//! signed by the issued HMAC key, as a symmetric-key device does.

use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::{
    reply::{dps_error, Reply},
    state::{Credential, Outcome, Plan, RegistrationRec, State, TpmReject, TpmSeen},
    tpm::TpmError,
    util::{self, ApiVersion},
};

/// `api-version` values accepted on DPS routes.
pub const DPS_API_VERSIONS: &[&str] = &[
    "2018-11-01",
    "2019-03-31",
    "2021-06-01",
    // Certificate issuance (spec 9.6): `clientCertificateCsr`, then `csr`.
    "2021-11-01-preview",
    "2025-07-01-preview",
];

/// What the server extracted from the HTTP request.
#[derive(Debug)]
pub(crate) struct RequestInfo<'a> {
    pub method: &'a Method,
    pub query: Option<&'a str>,
    pub host: Option<&'a str>,
    pub if_match: Option<&'a str>,
    pub body: &'a [u8],
    pub cred: &'a Credential,
}

fn check_api_version(query: Option<&str>) -> Result<(), Reply> {
    match util::api_version(query) {
        ApiVersion::Missing => Err(dps_error(
            StatusCode::BAD_REQUEST,
            400_001,
            "api-version not specified",
        )),
        ApiVersion::Repeated => Err(dps_error(
            StatusCode::BAD_REQUEST,
            400_001,
            "api-version specified more than once",
        )),
        ApiVersion::Value(v) if DPS_API_VERSIONS.contains(&v.as_str()) => Ok(()),
        ApiVersion::Value(v) => Err(dps_error(
            StatusCode::BAD_REQUEST,
            400_001,
            &format!("invalid api-version {v:?}"),
        )),
    }
}

/// Handles a DPS request. `segs` are the decoded path segments (`segs[1] == "registrations"`).
pub(crate) fn handle(state: &mut State, req: &RequestInfo<'_>, segs: &[String]) -> Reply {
    if !segs[0].eq_ignore_ascii_case(&state.id_scope) {
        return dps_error(StatusCode::NOT_FOUND, 404_001, "unknown ID scope");
    }
    let (reg_id, route) = match segs {
        [_, _, reg, r] if r == "register" => (reg, None),
        [_, _, reg, o, op] if o == "operations" => (reg, Some(op)),
        _ => return dps_error(StatusCode::NOT_FOUND, 404_001, "not found"),
    };
    let allowed = if route.is_none() {
        Method::PUT
    } else {
        Method::GET
    };
    if *req.method != allowed {
        return dps_error(
            StatusCode::METHOD_NOT_ALLOWED,
            405_000,
            "method not allowed",
        )
        .with_allow(if route.is_none() { "PUT" } else { "GET" });
    }
    if reg_id.is_empty() {
        return dps_error(StatusCode::BAD_REQUEST, 400_004, "empty registration ID");
    }
    if let Err(r) = check_api_version(req.query) {
        return r;
    }
    let tpm_seen = match route {
        None => match tpm_in_body(req.body) {
            Ok(seen) => seen,
            Err(r) => return r,
        },
        Some(_) => None,
    };
    if let Some(seen) = &tpm_seen {
        if !matches!(req.cred, Credential::Sas(_)) {
            return tpm_challenge(state, req, reg_id, seen).with_tpm(tpm_seen.clone());
        }
    }
    let attested = match state.authenticate_registration(reg_id, req.cred, util::now_secs()) {
        Ok(a) => a,
        Err(why) => {
            log::info!("DPS: registration {reg_id:?} rejected: {why}");
            return dps_error(StatusCode::UNAUTHORIZED, 401_002, "Unauthorized")
                .with_auth(Some(false))
                .with_tpm(tpm_seen);
        }
    };
    let reply = match route {
        None => register(state, req, reg_id, attested, tpm_seen.as_ref()),
        Some(op) => poll(state, reg_id, op),
    };
    reply.with_auth(Some(true)).with_tpm(tpm_seen)
}

/// The `tpm` object of a `register` body (`None` when the body has none or is not JSON; the
/// body is validated later). A `tpm` without both keys as strings is a 400.
fn tpm_in_body(body: &[u8]) -> Result<Option<TpmSeen>, Reply> {
    let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(body) else {
        return Ok(None);
    };
    let tpm = match o.get("tpm") {
        None | Some(Value::Null) => return Ok(None),
        Some(t) => t,
    };
    let key = |name: &str| match tpm.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(dps_error(
            StatusCode::BAD_REQUEST,
            400_004,
            &format!("tpm.{name} must be a base64 string"),
        )),
    };
    Ok(Some(TpmSeen {
        endorsement_key: key("endorsementKey")?,
        storage_root_key: key("storageRootKey")?,
    }))
}

/// First TPM step: 401 with the `authenticationKey` blob, or 401/400 naming why not.
fn tpm_challenge(state: &mut State, req: &RequestInfo<'_>, reg_id: &str, seen: &TpmSeen) -> Reply {
    if let Err(r) = parse_body(req, reg_id) {
        return r;
    }
    match state.tpm_challenge(reg_id, seen) {
        Ok(blob) => {
            log::info!("DPS: {reg_id:?}: TPM endorsement key matches; authentication key issued");
            Reply::json(
                StatusCode::UNAUTHORIZED,
                json!({ "authenticationKey": util::b64(&blob) }),
            )
        }
        Err(why) => tpm_reject(reg_id, why),
    }
}

/// The DPS error for a refused TPM registration (the reason is logged and in the message).
fn tpm_reject(reg_id: &str, why: TpmReject) -> Reply {
    let (status, code) = match &why {
        TpmReject::BadKey(TpmError::Crypto(_)) => {
            log::error!("DPS: {reg_id:?}: could not build the TPM authentication key: {why}");
            return dps_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                500_000,
                "could not build the TPM authentication key",
            );
        }
        TpmReject::BadKey(_) => (StatusCode::BAD_REQUEST, 400_004),
        TpmReject::EkMismatch(_) => (StatusCode::UNAUTHORIZED, 401_003),
        TpmReject::NoEnrollment(_) | TpmReject::NotTpm(_) => (StatusCode::UNAUTHORIZED, 401_002),
    };
    log::info!("DPS: TPM registration {reg_id:?} rejected: {why}");
    dps_error(status, code, &why.to_string()).with_auth(Some(false))
}

/// Parses a `register` body: a JSON object whose `registrationId` equals the path's.
fn parse_body(req: &RequestInfo<'_>, reg_id: &str) -> Result<Value, Reply> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Err(dps_error(
            StatusCode::BAD_REQUEST,
            400_004,
            "request body is required",
        ));
    }
    let body: Value = match serde_json::from_slice(req.body) {
        Ok(Value::Object(o)) => Value::Object(o),
        Ok(_) => {
            return Err(dps_error(
                StatusCode::BAD_REQUEST,
                400_004,
                "request body must be a JSON object",
            ))
        }
        Err(e) => {
            return Err(dps_error(
                StatusCode::BAD_REQUEST,
                400_004,
                &format!("invalid request body: {e}"),
            ))
        }
    };
    match body.get("registrationId") {
        Some(Value::String(s)) if s == reg_id => Ok(body),
        Some(Value::String(_)) => Err(dps_error(
            StatusCode::BAD_REQUEST,
            400_005,
            "registrationId in the body does not match the path",
        )),
        _ => Err(dps_error(
            StatusCode::BAD_REQUEST,
            400_004,
            "registrationId missing from the body",
        )),
    }
}

fn register(
    state: &mut State,
    req: &RequestInfo<'_>,
    reg_id: &str,
    mut attested: crate::state::Attested,
    tpm_seen: Option<&TpmSeen>,
) -> Reply {
    let body = match parse_body(req, reg_id) {
        Ok(b) => b,
        Err(r) => return r,
    };
    let tpm_authentication_key = match attested.tpm.as_mut() {
        None => None,
        Some(issued) => match issued.assigned_key(reg_id, tpm_seen) {
            Ok(blob) => Some(util::b64(&blob)),
            Err(why) => return tpm_reject(reg_id, why),
        },
    };
    let request_payload = body.get("payload").filter(|p| !p.is_null()).cloned();
    let csr = match crate::issuance::csr_in_body(&body, reg_id) {
        Ok(csr) => csr,
        Err(why) => {
            log::info!("DPS: {reg_id:?}: CSR refused: {why}");
            return dps_error(StatusCode::BAD_REQUEST, 400_004, &why);
        }
    };
    let enrollment_id = attested
        .source
        .split_once(':')
        .map_or(attested.source.as_str(), |(_, id)| id)
        .to_owned();
    let mut issuance_refused = None;
    let issued = match (
        &csr,
        state.issuance.get(&enrollment_id),
        &state.dps_issuing_ca,
    ) {
        (None, _, _) => None,
        (Some(_), None, _) => {
            issuance_refused = Some(crate::config::FailSpec {
                error_code: 400_000,
                message: format!(
                    "a CSR was sent but enrollment {enrollment_id:?} has no certificate issuance policy"
                ),
            });
            None
        }
        (Some(csr), Some(validity), Some(ca)) => {
            match crate::issuance::issue(ca, csr, reg_id, *validity) {
                Ok(issued) => Some(issued),
                Err(error) => {
                    log::error!("DPS: {reg_id:?}: issuing the certificate failed: {error}");
                    return dps_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        500_000,
                        "could not issue the certificate",
                    );
                }
            }
        }
        (Some(_), Some(_), None) => None,
    };
    // An issued certificate is what the device authenticates to the hub with; the previous one
    // stays accepted until the device uses the new one (secondary thumbprint).
    let device_auth = match &issued {
        Some(issued) => {
            let previous = state
                .hubs
                .get(
                    &attested
                        .assigned_hub
                        .clone()
                        .unwrap_or_else(|| state.settings.assigned_hub.clone())
                        .to_ascii_lowercase(),
                )
                .and_then(|hub| hub.devices.get(&attested.device_id))
                .and_then(|device| match &device.auth {
                    crate::state::HubAuth::SelfSigned { primary, .. } => primary.clone(),
                    _ => None,
                });
            log::info!(
                "DPS: {reg_id:?}: issued a client certificate (serial {})",
                issued
                    .leaf
                    .serial_number()
                    .to_bn()
                    .and_then(|bn| bn.to_hex_str().map(|hex| hex.to_string()))
                    .unwrap_or_default()
            );
            crate::state::HubAuth::SelfSigned {
                primary: Some(crate::pki::thumbprints(&issued.leaf).1),
                secondary: previous,
            }
        }
        None => attested.device_auth,
    };

    let outcome = match (&state.settings.fail_registrations, issuance_refused) {
        (Some(f), _) => Outcome::Fail(f.clone()),
        (None, Some(refused)) => Outcome::Fail(refused),
        (None, None) => Outcome::Assign(Box::new(Plan {
            device_id: attested.device_id,
            hub: attested
                .assigned_hub
                .unwrap_or_else(|| state.settings.assigned_hub.clone()),
            device_auth,
            iot_edge: attested.iot_edge,
            payload: attested.payload,
            attestation_field: attested.attestation_field,
            group_id: attested.group_id,
            source: attested.source,
            request_payload,
            tpm_seen: attested.tpm.map(|t| t.seen),
            tpm_authentication_key,
            issued,
        })),
    };
    let operation_id = format!(
        "4.{}.{}",
        util::hex_lower(&util::random_bytes(8)),
        util::random_guid()
    );
    state.operations.insert(
        operation_id.clone(),
        crate::state::Operation {
            registration_id: reg_id.to_string(),
            polls_left: state.settings.assigning_polls,
            outcome,
            result: None,
        },
    );
    Reply::json(
        StatusCode::ACCEPTED,
        json!({ "operationId": operation_id, "status": "assigning" }),
    )
    .with_retry_after(Some(state.settings.retry_after_secs))
}

fn poll(state: &mut State, reg_id: &str, op_id: &str) -> Reply {
    let retry_after = state.settings.retry_after_secs;
    let Some(op) = state
        .operations
        .get_mut(op_id)
        .filter(|op| op.registration_id == reg_id)
    else {
        return dps_error(StatusCode::NOT_FOUND, 404_002, "operation not found");
    };
    if op.result.is_none() && op.polls_left > 0 {
        op.polls_left -= 1;
        return Reply::json(
            StatusCode::ACCEPTED,
            json!({ "operationId": op_id, "status": "assigning" }),
        )
        .with_retry_after(Some(retry_after));
    }
    let (status, reg_state) = match op.result.clone() {
        Some(done) => done,
        None => {
            let outcome = op.outcome.clone();
            let done = finish(state, reg_id, outcome);
            if let Some(op) = state.operations.get_mut(op_id) {
                op.result = Some(done.clone());
            }
            done
        }
    };
    Reply::json(
        StatusCode::OK,
        json!({ "operationId": op_id, "status": status, "registrationState": reg_state }),
    )
}

/// Completes an operation: applies the assignment to the hub (or records the failure) and
/// returns (`status`, `registrationState`).
fn finish(state: &mut State, reg_id: &str, outcome: Outcome) -> (&'static str, Value) {
    let now = util::now_ms();
    let etag = state.next_etag();
    match outcome {
        Outcome::Fail(f) => {
            let created = state
                .registrations
                .get(reg_id)
                .map_or(now, |r| r.created_ms);
            (
                "failed",
                json!({
                    "registrationId": reg_id,
                    "createdDateTimeUtc": util::rfc3339_ms(created),
                    "status": "failed",
                    "errorCode": f.error_code,
                    "errorMessage": f.message,
                    "lastUpdatedDateTimeUtc": util::rfc3339_ms(now),
                    "etag": etag,
                }),
            )
        }
        Outcome::Assign(plan) => {
            let device = state.upsert_device(
                &plan.hub,
                &plan.device_id,
                plan.device_auth.clone(),
                plan.iot_edge,
            );
            let rec = state
                .registrations
                .entry(reg_id.to_string())
                .or_insert_with(|| RegistrationRec {
                    registration_id: reg_id.to_string(),
                    device_id: plan.device_id.clone(),
                    assigned_hub: plan.hub.clone(),
                    enrollment: plan.source.clone(),
                    created_ms: now,
                    updated_ms: now,
                    etag: String::new(),
                    assignments: 0,
                    last_request_payload: None,
                    device_generation_id: String::new(),
                    tpm: None,
                });
            rec.assignments += 1;
            rec.device_id.clone_from(&plan.device_id);
            rec.assigned_hub.clone_from(&plan.hub);
            rec.enrollment.clone_from(&plan.source);
            rec.updated_ms = now;
            rec.etag.clone_from(&etag);
            rec.last_request_payload.clone_from(&plan.request_payload);
            rec.tpm.clone_from(&plan.tpm_seen);
            rec.device_generation_id = device["generationId"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let substatus = if rec.assignments == 1 {
                "initialAssignment"
            } else {
                "reprovisionedToInitialAssignment"
            };
            let attestation = match (&plan.group_id, &plan.tpm_authentication_key) {
                (Some(g), _) => json!({ "enrollmentGroupId": g }),
                (None, Some(key)) => json!({ "authenticationKey": key }),
                (None, None) => json!({}),
            };
            let mut reg_state = json!({
                "registrationId": reg_id,
                "createdDateTimeUtc": util::rfc3339_ms(rec.created_ms),
                "assignedHub": plan.hub,
                "deviceId": plan.device_id,
                "status": "assigned",
                "substatus": substatus,
                "lastUpdatedDateTimeUtc": util::rfc3339_ms(now),
                "etag": etag,
            });
            if let Some(map) = reg_state.as_object_mut() {
                map.insert(plan.attestation_field.to_string(), attestation);
                if let Some(p) = plan.payload {
                    map.insert("payload".to_string(), p);
                }
                if let Some(issued) = &plan.issued {
                    for (field, value) in issued.fields() {
                        map.insert(field.to_string(), value);
                    }
                }
            }
            log::info!(
                "DPS: {reg_id:?} assigned to hub {:?} as device {:?} ({substatus})",
                plan.hub,
                plan.device_id
            );
            ("assigned", reg_state)
        }
    }
}
