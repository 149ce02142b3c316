//! The tpmd API's route table (the reference's three routes, api-version 2020-09-01), with the
//! caller check, on keyd's tpmd listener. Handlers are a line each: decode, call [`Tpm`], encode.

use std::sync::Arc;

use base64::Engine as _;
use http::{Method, StatusCode};
use http_common::{
    check_api_version, error_response, json_response, HttpError, Request, Response, VersionRule,
};
use key_api::tpm::{
    ImportAuthKeyRequest, SignWithAuthKeyRequest, SignWithAuthKeyResponse, TpmKeysResponse,
    API_VERSIONS,
};

use super::Tpm;
use crate::error::KeyError;

/// Every route the tpmd listener serves, for documentation checks: (methods, path).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/get_tpm_keys"),
    ("POST", "/import_auth_key"),
    ("POST", "/sign_with_auth_key"),
];

/// The tpmd listener's request handler.
#[derive(Debug)]
pub struct TpmRouter {
    tpm: Arc<Tpm>,
    allowed_uids: Vec<u32>,
}

fn decode(field: &'static str, text: &str) -> Result<Vec<u8>, KeyError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|error| KeyError::InvalidParameter {
            name: field,
            reason: format!("not valid base64: {error}"),
        })
}

fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl TpmRouter {
    /// A router over the TPM thread; `allowed_uids` may call it.
    pub fn new(tpm: Arc<Tpm>, allowed_uids: Vec<u32>) -> Self {
        TpmRouter { tpm, allowed_uids }
    }

    async fn dispatch(&self, request: &Request) -> Result<Response, KeyError> {
        let (allow, method) = match request.path.as_str() {
            "/get_tpm_keys" => ("GET", Method::GET),
            "/import_auth_key" | "/sign_with_auth_key" => ("POST", Method::POST),
            _ => return Err(HttpError::not_found().into()),
        };
        if request.method != method {
            return Err(HttpError::method_not_allowed(allow).into());
        }
        check_api_version(
            request.query.as_deref(),
            API_VERSIONS,
            VersionRule::Required { since: 0 },
        )?;
        let uid = request.caller.uid;
        if !self.allowed_uids.contains(&uid) {
            return Err(KeyError::TpmForbidden { uid });
        }
        match request.path.as_str() {
            "/get_tpm_keys" => {
                let (endorsement_key, storage_root_key) = self.tpm.keys().await?;
                Ok(json_response(
                    StatusCode::OK,
                    &TpmKeysResponse {
                        endorsement_key: encode(&endorsement_key),
                        storage_root_key: encode(&storage_root_key),
                    },
                ))
            }
            "/import_auth_key" => {
                let body: ImportAuthKeyRequest = request.json()?;
                let key = decode("key", &body.key)?;
                self.tpm.import_auth_key(key).await?;
                Ok(json_response(StatusCode::OK, &serde_json::json!({})))
            }
            _ => {
                let body: SignWithAuthKeyRequest = request.json()?;
                let data = decode("data", &body.data)?;
                let digest = self.tpm.sign_with_auth_key(data).await?;
                Ok(json_response(
                    StatusCode::OK,
                    &SignWithAuthKeyResponse {
                        digest: encode(&digest),
                    },
                ))
            }
        }
    }
}

impl http_common::Handler for TpmRouter {
    async fn handle(&self, request: Request) -> Response {
        match self.dispatch(&request).await {
            Ok(response) => response,
            Err(error) => error_response(&error),
        }
    }
}
