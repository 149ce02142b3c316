//! edged's view of identityd: the [`IdentityClient`] trait (what edged asks), and
//! [`HttpIdentityClient`], which speaks identityd's compatible API (`api-version=2020-09-01`)
//! over its Unix socket.
//!
//! The wire types here mirror identityd's `{"type": "aziot", "spec": {...}}` shapes; they are
//! private to this module. Key handles are keyd's opaque, redacted [`KeyHandle`].

use std::future::Future;

use http::{Method, StatusCode};
use http_common::{ClientError, UdsClient};
use key_api::KeyHandle;
use serde::{Deserialize, Serialize};

/// The api-version edged sends to identityd.
pub const API_VERSION: &str = "2020-09-01";

/// The device identity as edged uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// IoT Hub host name.
    pub hub_name: String,
    /// Parent gateway in nested edge, else the hub.
    pub gateway_host: String,
    /// Device ID.
    pub device_id: String,
}

/// A module identity as edged uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleIdentity {
    /// Module ID.
    pub module_id: String,
    /// Hub generation ID.
    pub gen_id: String,
    /// keyd handle of the module's derived SAS key (absent in lists).
    pub key_handle: Option<KeyHandle>,
    /// Whether identityd returned a local identity.
    pub local: bool,
}

/// What edged asks of identityd.
pub trait IdentityClient: Send + Sync + 'static {
    /// `POST /identities/device`.
    fn get_device(&self) -> impl Future<Output = Result<DeviceIdentity, ClientError>> + Send;
    /// `POST /identities/device/reprovision`.
    fn reprovision(&self) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// `GET /identities/modules?type=aziot`.
    fn list_modules(&self)
        -> impl Future<Output = Result<Vec<ModuleIdentity>, ClientError>> + Send;
    /// `POST /identities/modules`.
    fn create_module(
        &self,
        module_id: &str,
    ) -> impl Future<Output = Result<ModuleIdentity, ClientError>> + Send;
    /// `GET /identities/modules/{m}?type=aziot`.
    fn get_module(
        &self,
        module_id: &str,
    ) -> impl Future<Output = Result<ModuleIdentity, ClientError>> + Send;
    /// `PUT /identities/modules/{m}?type=aziot`.
    fn update_module(
        &self,
        module_id: &str,
    ) -> impl Future<Output = Result<ModuleIdentity, ClientError>> + Send;
    /// `DELETE /identities/modules/{m}?type=aziot`.
    fn delete_module(
        &self,
        module_id: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", content = "spec", rename_all = "lowercase")]
enum WireIdentity {
    Aziot(WireAziotSpec),
    Local(WireLocalSpec),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireAziotSpec {
    hub_name: String,
    #[serde(default)]
    gateway_host: Option<String>,
    device_id: String,
    #[serde(default)]
    module_id: Option<String>,
    #[serde(default)]
    gen_id: Option<String>,
    #[serde(default)]
    auth: Option<WireAuth>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireLocalSpec {
    module_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct WireAuth {
    #[serde(rename = "type")]
    auth_type: String,
    #[serde(rename = "keyHandle", default)]
    key_handle: Option<KeyHandle>,
}

#[derive(Debug, Deserialize)]
struct WireList {
    identities: Vec<WireIdentity>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireModuleRequest<'a> {
    #[serde(rename = "type")]
    id_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    module_id: Option<&'a str>,
}

fn unexpected(message: &str) -> ClientError {
    ClientError::Status {
        status: StatusCode::BAD_GATEWAY,
        message: message.to_owned(),
    }
}

fn module_of(identity: WireIdentity) -> ModuleIdentity {
    match identity {
        WireIdentity::Aziot(spec) => ModuleIdentity {
            module_id: spec.module_id.unwrap_or_default(),
            gen_id: spec.gen_id.unwrap_or_default(),
            key_handle: spec.auth.and_then(|auth| {
                (auth.auth_type == "sas")
                    .then_some(auth.key_handle)
                    .flatten()
            }),
            local: false,
        },
        WireIdentity::Local(spec) => ModuleIdentity {
            module_id: spec.module_id,
            gen_id: String::new(),
            key_handle: None,
            local: true,
        },
    }
}

/// Percent-encodes a module name for a path segment, leaving `$` as reference clients do.
fn encode_module_id(module_id: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'$')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(module_id, SEGMENT).to_string()
}

/// identityd over its Unix socket.
#[derive(Clone, Debug)]
pub struct HttpIdentityClient {
    http: UdsClient,
}

impl HttpIdentityClient {
    /// A client for `unix:///path`.
    pub fn from_uri(uri: &str) -> Result<Self, ClientError> {
        Ok(HttpIdentityClient {
            http: UdsClient::from_uri(uri)?,
        })
    }

    fn path(route: &str) -> String {
        let separator = if route.contains('?') { '&' } else { '?' };
        format!("{route}{separator}api-version={API_VERSION}")
    }
}

impl IdentityClient for HttpIdentityClient {
    async fn get_device(&self) -> Result<DeviceIdentity, ClientError> {
        let body = WireModuleRequest {
            id_type: "aziot",
            module_id: None,
        };
        let identity: WireIdentity = self
            .http
            .json(
                Method::POST,
                &Self::path("/identities/device"),
                Some(&body),
                StatusCode::OK,
            )
            .await?;
        match identity {
            WireIdentity::Aziot(spec) => Ok(DeviceIdentity {
                gateway_host: spec
                    .gateway_host
                    .filter(|host| !host.is_empty())
                    .unwrap_or_else(|| spec.hub_name.clone()),
                hub_name: spec.hub_name,
                device_id: spec.device_id,
            }),
            WireIdentity::Local(_) => Err(unexpected("identityd returned a local device identity")),
        }
    }

    async fn reprovision(&self) -> Result<(), ClientError> {
        let body = WireModuleRequest {
            id_type: "aziot",
            module_id: None,
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

    async fn list_modules(&self) -> Result<Vec<ModuleIdentity>, ClientError> {
        let list: WireList = self
            .http
            .json(
                Method::GET,
                &Self::path("/identities/modules?type=aziot"),
                None::<&()>,
                StatusCode::OK,
            )
            .await?;
        Ok(list.identities.into_iter().map(module_of).collect())
    }

    async fn create_module(&self, module_id: &str) -> Result<ModuleIdentity, ClientError> {
        let body = WireModuleRequest {
            id_type: "aziot",
            module_id: Some(module_id),
        };
        let identity: WireIdentity = self
            .http
            .json(
                Method::POST,
                &Self::path("/identities/modules"),
                Some(&body),
                StatusCode::OK,
            )
            .await?;
        Ok(module_of(identity))
    }

    async fn get_module(&self, module_id: &str) -> Result<ModuleIdentity, ClientError> {
        let identity: WireIdentity = self
            .http
            .json(
                Method::GET,
                &Self::path(&format!(
                    "/identities/modules/{}?type=aziot",
                    encode_module_id(module_id)
                )),
                None::<&()>,
                StatusCode::OK,
            )
            .await?;
        Ok(module_of(identity))
    }

    async fn update_module(&self, module_id: &str) -> Result<ModuleIdentity, ClientError> {
        let body = WireModuleRequest {
            id_type: "aziot",
            module_id: Some(module_id),
        };
        let identity: WireIdentity = self
            .http
            .json(
                Method::PUT,
                &Self::path(&format!(
                    "/identities/modules/{}?type=aziot",
                    encode_module_id(module_id)
                )),
                Some(&body),
                StatusCode::OK,
            )
            .await?;
        Ok(module_of(identity))
    }

    async fn delete_module(&self, module_id: &str) -> Result<(), ClientError> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_identityd_shapes() {
        let module: WireIdentity = serde_json::from_value(serde_json::json!({
            "type": "aziot",
            "spec": {"hubName": "h", "gatewayHost": "h", "deviceId": "d", "moduleId": "m",
                     "genId": "g1", "auth": {"type": "sas", "keyHandle": "secret-handle"}}
        }))
        .unwrap();
        let module = module_of(module);
        assert_eq!(module.module_id, "m");
        assert_eq!(module.gen_id, "g1");
        assert_eq!(module.key_handle, Some(KeyHandle("secret-handle".into())));
        assert!(!format!("{module:?}").contains("secret-handle"));
        let local: WireIdentity = serde_json::from_value(serde_json::json!({
            "type": "local", "spec": {"moduleId": "l"}
        }))
        .unwrap();
        assert!(module_of(local).local);
        assert_eq!(encode_module_id("$edgeAgent"), "$edgeAgent");
        assert_eq!(encode_module_id("a/b"), "a%2Fb");
    }
}
