//! identityd's API: the serializable wire types of every route and the one async [`Client`].
//!
//! These are the only identityd types that cross a socket. Key handles are keyd's opaque
//! [`KeyHandle`] (a bearer credential whose `Debug` output is redacted); identityd never hands
//! out key bytes.

use http::{Method, StatusCode};
use http_common::{ClientError, UdsClient};
use serde::{Deserialize, Serialize};

pub use key_api::KeyHandle;

/// The api-version the client sends on compatible routes.
pub const API_VERSION: &str = "2022-08-01";

/// Every api-version identityd knows, oldest first.
pub const API_VERSIONS: &[&str] = &["2020-09-01", "2021-12-01", "2022-08-01"];

/// An identity as the compatible routes serialize it: `{"type": "aziot" | "local", "spec": {...}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "spec", rename_all = "lowercase")]
pub enum Identity {
    /// A cloud identity (device or module in IoT Hub).
    Aziot(AziotSpec),
    /// A local identity (key and certificate for a host process).
    Local(LocalSpec),
}

/// `spec` of an `aziot` identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AziotSpec {
    /// IoT Hub host name (may carry `:port`).
    pub hub_name: String,
    /// The host to connect to: the parent gateway in nested edge, else the hub.
    pub gateway_host: String,
    /// The device ID.
    pub device_id: String,
    /// The module ID (module identities only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    /// The Hub generation ID of the module (module identities only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen_id: Option<String>,
    /// How to authenticate (omitted in list answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthInfo>,
}

/// `auth` of an `aziot` identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum AuthInfo {
    /// Shared access signature: sign tokens with keyd using `keyHandle` (HMAC-SHA256).
    Sas {
        /// keyd handle of the device key or the module's derived primary key.
        #[serde(rename = "keyHandle")]
        key_handle: KeyHandle,
    },
    /// X.509: the certificate `certId` in certd, its private key behind `keyHandle` in keyd.
    X509 {
        /// keyd handle of the key pair.
        #[serde(rename = "keyHandle")]
        key_handle: KeyHandle,
        /// certd cert ID of the identity certificate.
        #[serde(rename = "certId")]
        cert_id: String,
    },
    /// TPM (no fields).
    Tpm,
}

/// `spec` of a `local` identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalSpec {
    /// The module (principal) name.
    pub module_id: String,
    /// The freshly issued credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<LocalAuth>,
}

/// `auth` of a `local` identity.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalAuth {
    /// PKCS#8 PEM private key.
    pub private_key: String,
    /// PEM certificate chain.
    pub certificate: String,
    /// Expiry of the certificate (RFC 3339).
    pub expiration: String,
}

impl std::fmt::Debug for LocalAuth {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LocalAuth")
            .field("private_key", &"<redacted>")
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

/// `GET /identities/modules` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListIdentitiesResponse {
    /// The identities (without `auth`).
    pub identities: Vec<Identity>,
}

/// `POST /identities/device` body (the reference client always sends `{"type": "aziot"}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetDeviceRequest {
    /// `aziot` (not checked).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub id_type: Option<String>,
}

/// `POST /identities/modules` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateModuleRequest {
    /// `aziot` or `local`.
    #[serde(rename = "type")]
    pub id_type: String,
    /// The module name.
    pub module_id: String,
    /// Options of a local identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_id_opts: Option<LocalIdOpts>,
}

/// `localIdOpts` of [`CreateModuleRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalIdOpts {
    /// `x509`.
    #[serde(rename = "type")]
    pub id_type: String,
    /// `client` (default) or `server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<String>,
}

/// `PUT /identities/modules/{m}` body as reference clients send it (any JSON is accepted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpdateModuleRequest {
    /// `aziot`.
    #[serde(rename = "type")]
    pub id_type: String,
    /// The module name.
    pub module_id: String,
}

/// `GET /identities/provisioning` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProvisioningInfo {
    /// `dps`, `manual` or `none`.
    pub source: String,
    /// `symmetric_key`, `x509`, `tpm` (dps) or `sas`, `x509` (manual).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<String>,
    /// The DPS global endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The DPS ID scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope_id: Option<String>,
    /// The DPS registration ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_id: Option<String>,
    /// The configured DPS payload (`null` when none is configured; absent for other sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// Ours: where provisioning stands, `provisioning`, `provisioned` or `failed` (absent for
    /// `none`). Reference clients ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Ours: why the last provisioning attempt failed (with `status = "failed"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /trust-bundle` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustBundle {
    /// PEM certificates (empty when no bundle is stored).
    pub certificate: String,
}

/// Draft `GET /identities/aziot/device` answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DraftDeviceIdentity {
    /// `aziot://<hub>/device/<deviceId>`.
    pub id: String,
    /// `aziot://<hub>/`.
    pub managed_by: String,
    /// How to authenticate.
    pub auth: DraftAuth,
}

/// `auth` of [`DraftDeviceIdentity`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DraftAuth {
    /// `sas`, `x509` or `tpm`.
    #[serde(rename = "type")]
    pub auth_type: String,
    /// keyd handle of the SAS key or key pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keystorehandle: Option<KeyHandle>,
    /// certd cert ID of the identity certificate (X.509).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certstorehandle: Option<String>,
}

/// Percent-encodes a module name for a path segment, leaving `$` as reference clients do.
pub fn encode_module_id(module_id: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'$')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(module_id, SEGMENT).to_string()
}

/// The async client for identityd.
#[derive(Clone, Debug)]
pub struct Client {
    http: UdsClient,
}

impl Client {
    /// A client for identityd at `unix:///path`.
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
        let separator = if route.contains('?') { '&' } else { '?' };
        format!("{route}{separator}api-version={API_VERSION}")
    }

    /// The caller's own identity (`GET /identities/identity`).
    pub async fn get_caller_identity(&self) -> Result<Identity, ClientError> {
        self.http
            .json(
                Method::GET,
                &Self::path("/identities/identity"),
                None::<&()>,
                StatusCode::OK,
            )
            .await
    }

    /// The device identity (`POST /identities/device`).
    pub async fn get_device_identity(&self) -> Result<Identity, ClientError> {
        let body = GetDeviceRequest {
            id_type: Some("aziot".to_owned()),
        };
        self.http
            .json(
                Method::POST,
                &Self::path("/identities/device"),
                Some(&body),
                StatusCode::OK,
            )
            .await
    }

    /// How the device is provisioned (`GET /identities/provisioning`).
    pub async fn get_provisioning_info(&self) -> Result<ProvisioningInfo, ClientError> {
        self.http
            .json(
                Method::GET,
                &Self::path("/identities/provisioning"),
                None::<&()>,
                StatusCode::OK,
            )
            .await
    }

    /// Reprovisions the device and waits until that is done.
    pub async fn reprovision(&self) -> Result<(), ClientError> {
        let body = GetDeviceRequest {
            id_type: Some("aziot".to_owned()),
        };
        self.http
            .no_content(
                Method::POST,
                &Self::path("/identities/device/reprovision"),
                Some(&body),
                StatusCode::NO_CONTENT,
            )
            .await
    }

    /// Every module identity of the device in IoT Hub (without `auth`).
    pub async fn list_modules(&self) -> Result<Vec<Identity>, ClientError> {
        let response: ListIdentitiesResponse = self
            .http
            .json(
                Method::GET,
                &Self::path("/identities/modules?type=aziot"),
                None::<&()>,
                StatusCode::OK,
            )
            .await?;
        Ok(response.identities)
    }

    /// Creates module identity `module_id` in IoT Hub.
    pub async fn create_module(&self, module_id: &str) -> Result<Identity, ClientError> {
        let body = CreateModuleRequest {
            id_type: "aziot".to_owned(),
            module_id: module_id.to_owned(),
            local_id_opts: None,
        };
        self.http
            .json(
                Method::POST,
                &Self::path("/identities/modules"),
                Some(&body),
                StatusCode::OK,
            )
            .await
    }

    /// Module identity `module_id` (`id_type` is `aziot` or `local`).
    pub async fn get_module(
        &self,
        module_id: &str,
        id_type: &str,
    ) -> Result<Identity, ClientError> {
        self.http
            .json(
                Method::GET,
                &Self::path(&format!(
                    "/identities/modules/{}?type={id_type}",
                    encode_module_id(module_id)
                )),
                None::<&()>,
                StatusCode::OK,
            )
            .await
    }

    /// Re-derives and re-sends the keys of module `module_id`.
    pub async fn update_module(&self, module_id: &str) -> Result<Identity, ClientError> {
        let body = UpdateModuleRequest {
            id_type: "aziot".to_owned(),
            module_id: module_id.to_owned(),
        };
        self.http
            .json(
                Method::PUT,
                &Self::path(&format!(
                    "/identities/modules/{}?type=aziot",
                    encode_module_id(module_id)
                )),
                Some(&body),
                StatusCode::OK,
            )
            .await
    }

    /// Deletes module identity `module_id` from IoT Hub.
    pub async fn delete_module(&self, module_id: &str) -> Result<(), ClientError> {
        self.http
            .no_content(
                Method::DELETE,
                &Self::path(&format!(
                    "/identities/modules/{}?type=aziot",
                    encode_module_id(module_id)
                )),
                None::<&()>,
                StatusCode::NO_CONTENT,
            )
            .await
    }

    /// The trust bundle PEM (empty when none is stored).
    pub async fn get_trust_bundle(&self) -> Result<String, ClientError> {
        let response: TrustBundle = self
            .http
            .json(
                Method::GET,
                &Self::path("/trust-bundle"),
                None::<&()>,
                StatusCode::OK,
            )
            .await?;
        Ok(response.certificate)
    }

    /// The draft device identity (`GET /identities/aziot/device`).
    pub async fn draft_device_identity(&self) -> Result<DraftDeviceIdentity, ClientError> {
        self.http
            .json(
                Method::GET,
                "/identities/aziot/device",
                None::<&()>,
                StatusCode::OK,
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_shapes_match_the_reference() {
        let identity = Identity::Aziot(AziotSpec {
            hub_name: "hub".into(),
            gateway_host: "hub".into(),
            device_id: "d".into(),
            module_id: Some("m".into()),
            gen_id: Some("1".into()),
            auth: Some(AuthInfo::Sas {
                key_handle: KeyHandle("h".into()),
            }),
        });
        let json = serde_json::to_value(&identity).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "aziot", "spec": {"hubName": "hub", "gatewayHost": "hub",
                "deviceId": "d", "moduleId": "m", "genId": "1",
                "auth": {"type": "sas", "keyHandle": "h"}}})
        );
        let x509 = AuthInfo::X509 {
            key_handle: KeyHandle("k".into()),
            cert_id: "c".into(),
        };
        assert_eq!(
            serde_json::to_value(&x509).unwrap(),
            serde_json::json!({"type": "x509", "keyHandle": "k", "certId": "c"})
        );
        assert_eq!(
            serde_json::to_value(AuthInfo::Tpm).unwrap(),
            serde_json::json!({"type": "tpm"})
        );
        let back: Identity = serde_json::from_value(json).unwrap();
        assert_eq!(back, identity);
    }

    #[test]
    fn provisioning_info_keeps_a_null_payload() {
        let info = ProvisioningInfo {
            source: "dps".into(),
            auth: Some("x509".into()),
            endpoint: Some("https://e/".into()),
            scope_id: Some("s".into()),
            registration_id: Some("r".into()),
            payload: Some(serde_json::Value::Null),
            status: None,
            error: None,
        };
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.contains("\"payload\":null"), "{json}");
        let none = ProvisioningInfo {
            source: "none".into(),
            auth: None,
            endpoint: None,
            scope_id: None,
            registration_id: None,
            payload: None,
            status: None,
            error: None,
        };
        assert_eq!(
            serde_json::to_string(&none).unwrap(),
            r#"{"source":"none"}"#
        );
    }

    #[test]
    fn module_ids_keep_dollar() {
        assert_eq!(encode_module_id("$edgeAgent"), "$edgeAgent");
        assert_eq!(encode_module_id("a/b c"), "a%2Fb%20c");
    }
}
