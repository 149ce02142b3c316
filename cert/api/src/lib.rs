//! certd's API: the serializable wire types of every route and the one async [`Client`].
//!
//! These are the only certd types that cross a socket. PEM values are plain PEM text (not base64
//! of PEM). The issuer's private key handle is keyd's opaque [`KeyHandle`], whose `Debug` output
//! is redacted.

pub mod pem;
pub mod subject;

use http::{Method, StatusCode};
use http_common::{ClientError, UdsClient};
use serde::{Deserialize, Serialize};

pub use key_api::KeyHandle;

/// The api-version the client sends.
pub const API_VERSION: &str = "2020-09-01";

/// Every api-version certd knows, oldest first.
pub const API_VERSIONS: &[&str] = &["2020-09-01"];

/// `POST /certificates`: issue a certificate from a CSR.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateCertRequest {
    /// The ID to store the new certificate under.
    pub cert_id: String,
    /// The CSR: PEM (`CERTIFICATE REQUEST`), or base64 of the DER CSR.
    pub csr: String,
    /// The issuer; absent for `self_signed` / `local_ca` issuance configured in certd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<Issuer>,
}

/// `issuer` of [`CreateCertRequest`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Issuer {
    /// The cert ID of the issuer's certificate (its subject and chain are used).
    pub cert_id: String,
    /// keyd's handle to the issuer's private key.
    pub private_key_handle: KeyHandle,
}

/// `PUT /certificates/{certId}`: import a PEM chain.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportCertRequest {
    /// One or more PEM certificates, leaf first.
    pub pem: String,
}

/// The answer of create, import and get.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertResponse {
    /// The stored PEM chain.
    pub pem: String,
}

/// Draft `/certstore/cert` body (all routes): `certid`, plus `pem` for an import.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DraftCertRequest {
    /// The cert ID (may also be given as the `certid` query parameter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certid: Option<String>,
    /// PEM to import; absent for create and load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pem: Option<String>,
}

/// Draft `/certstore/cert` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct DraftCertResponse {
    /// The stored PEM chain.
    pub pem: String,
}

/// The async client for certd.
#[derive(Clone, Debug)]
pub struct Client {
    http: UdsClient,
}

/// Percent-encodes a cert ID for the path (the server also accepts unencoded `/`).
fn encode_id(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl Client {
    /// A client for certd at `unix:///path`.
    pub fn from_uri(uri: &str) -> Result<Self, ClientError> {
        Ok(Client {
            http: UdsClient::from_uri(uri)?,
        })
    }

    /// A client over an existing HTTP client.
    pub fn new(http: UdsClient) -> Self {
        Client { http }
    }

    fn path(route: &str) -> String {
        format!("{route}?api-version={API_VERSION}")
    }

    /// Issues a certificate for `csr_pem` and stores it as `id`. `issuer` is the issuer's cert ID
    /// and keyd handle; `None` uses the issuance method configured in certd for `id`. Returns the
    /// new certificate followed by the issuer's chain.
    pub async fn create_cert(
        &self,
        id: &str,
        csr_pem: &str,
        issuer: Option<(&str, &KeyHandle)>,
    ) -> Result<String, ClientError> {
        let body = CreateCertRequest {
            cert_id: id.to_owned(),
            csr: csr_pem.to_owned(),
            issuer: issuer.map(|(cert_id, handle)| Issuer {
                cert_id: cert_id.to_owned(),
                private_key_handle: handle.clone(),
            }),
        };
        let response: CertResponse = self
            .http
            .json(
                Method::POST,
                &Self::path("/certificates"),
                Some(&body),
                StatusCode::CREATED,
            )
            .await?;
        Ok(response.pem)
    }

    /// Stores `pem` as cert `id`, replacing a previous dynamic cert.
    pub async fn import_cert(&self, id: &str, pem: &str) -> Result<String, ClientError> {
        let body = ImportCertRequest {
            pem: pem.to_owned(),
        };
        let response: CertResponse = self
            .http
            .json(
                Method::PUT,
                &Self::path(&format!("/certificates/{}", encode_id(id))),
                Some(&body),
                StatusCode::CREATED,
            )
            .await?;
        Ok(response.pem)
    }

    /// The PEM chain stored as `id`.
    pub async fn get_cert(&self, id: &str) -> Result<String, ClientError> {
        let response: CertResponse = self
            .http
            .json(
                Method::GET,
                &Self::path(&format!("/certificates/{}", encode_id(id))),
                None::<&()>,
                StatusCode::OK,
            )
            .await?;
        Ok(response.pem)
    }

    /// Deletes dynamic cert `id` (succeeds when it does not exist).
    pub async fn delete_cert(&self, id: &str) -> Result<(), ClientError> {
        self.http
            .no_content(
                Method::DELETE,
                &Self::path(&format!("/certificates/{}", encode_id(id))),
                None::<&()>,
                StatusCode::NO_CONTENT,
            )
            .await
    }

    /// Draft create-if-not-exists (`POST /certstore/cert`): returns the PEM and whether it was
    /// created now (201) rather than already stored (200).
    pub async fn draft_create_cert(&self, id: &str) -> Result<(String, bool), ClientError> {
        let body = DraftCertRequest {
            certid: Some(id.to_owned()),
            pem: None,
        };
        let bytes = serde_json::to_vec(&body).map_err(ClientError::Decode)?;
        let response = self
            .http
            .send(
                Method::POST,
                "/certstore/cert",
                &[("content-type", "application/json")],
                bytes.into(),
            )
            .await?;
        let created = match response.status {
            StatusCode::CREATED => true,
            StatusCode::OK => false,
            status => {
                return Err(ClientError::Status {
                    status,
                    message: http_common::client::error_message(&response.body),
                })
            }
        };
        let parsed: DraftCertResponse =
            serde_json::from_slice(&response.body).map_err(ClientError::Decode)?;
        Ok((parsed.pem, created))
    }

    /// Draft load (`GET /certstore/cert` with a `certid` body).
    pub async fn draft_load_cert(&self, id: &str) -> Result<String, ClientError> {
        let body = DraftCertRequest {
            certid: Some(id.to_owned()),
            pem: None,
        };
        let response: DraftCertResponse = self
            .http
            .json(Method::GET, "/certstore/cert", Some(&body), StatusCode::OK)
            .await?;
        Ok(response.pem)
    }
}
