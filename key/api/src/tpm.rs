//! The TPM service's API (the reference's aziot-tpmd API, which keyd serves on the tpmd
//! socket): wire types and the async [`TpmClient`]. Byte fields travel as standard base64.

use http::{Method, StatusCode};
use http_common::{ClientError, UdsClient};
use serde::{Deserialize, Serialize};

use crate::{b64, unb64};

/// The one api-version of the tpmd API.
pub const API_VERSION: &str = "2020-09-01";

/// Every api-version the tpmd API knows.
pub const API_VERSIONS: &[&str] = &[API_VERSION];

/// The default tpmd socket.
pub const DEFAULT_URI: &str = "unix:///run/aziot/tpmd.sock";

/// `GET /get_tpm_keys`: each a marshalled TPM2B_PUBLIC.
#[derive(Debug, Serialize, Deserialize)]
pub struct TpmKeysResponse {
    /// The endorsement key.
    pub endorsement_key: String,
    /// The storage root key.
    pub storage_root_key: String,
}

/// `POST /import_auth_key`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ImportAuthKeyRequest {
    /// DPS's `authenticationKey` blob.
    pub key: String,
}

/// `POST /sign_with_auth_key`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignWithAuthKeyRequest {
    /// The data to HMAC.
    pub data: String,
}

/// The answer to `POST /sign_with_auth_key`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignWithAuthKeyResponse {
    /// HMAC-SHA256 of the data with the authentication key.
    pub digest: String,
}

/// The TPM's two public keys, each a marshalled TPM2B_PUBLIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmKeys {
    /// The endorsement key.
    pub endorsement_key: Vec<u8>,
    /// The storage root key.
    pub storage_root_key: Vec<u8>,
}

/// The async client for the tpmd API.
#[derive(Clone, Debug)]
pub struct TpmClient {
    http: UdsClient,
}

fn path(route: &str) -> String {
    format!("{route}?api-version={API_VERSION}")
}

impl TpmClient {
    /// A client for the tpmd socket at `unix:///path`.
    pub fn from_uri(uri: &str) -> Result<Self, ClientError> {
        Ok(TpmClient {
            http: UdsClient::from_uri(uri)?,
        })
    }

    /// The EK and SRK.
    pub async fn get_tpm_keys(&self) -> Result<TpmKeys, ClientError> {
        let response: TpmKeysResponse = self
            .http
            .json(
                Method::GET,
                &path("/get_tpm_keys"),
                None::<&()>,
                StatusCode::OK,
            )
            .await?;
        Ok(TpmKeys {
            endorsement_key: unb64(&response.endorsement_key)?,
            storage_root_key: unb64(&response.storage_root_key)?,
        })
    }

    /// Imports DPS's `authenticationKey` (the raw blob, not base64).
    pub async fn import_auth_key(&self, key: &[u8]) -> Result<(), ClientError> {
        let body = ImportAuthKeyRequest { key: b64(key) };
        let _: serde::de::IgnoredAny = self
            .http
            .json(
                Method::POST,
                &path("/import_auth_key"),
                Some(&body),
                StatusCode::OK,
            )
            .await?;
        Ok(())
    }

    /// HMAC-SHA256 of `data` with the authentication key, computed in the TPM.
    pub async fn sign_with_auth_key(&self, data: &[u8]) -> Result<Vec<u8>, ClientError> {
        let body = SignWithAuthKeyRequest { data: b64(data) };
        let response: SignWithAuthKeyResponse = self
            .http
            .json(
                Method::POST,
                &path("/sign_with_auth_key"),
                Some(&body),
                StatusCode::OK,
            )
            .await?;
        unb64(&response.digest)
    }
}
