//! edged's view of identityd: the [`IdentityClient`] trait (what edged asks), implemented for
//! identityd's own typed client (`identity_api::Client`, over its Unix socket). Tests may
//! implement it in-process. Key handles are keyd's opaque, redacted [`KeyHandle`].

use std::future::Future;

use http::StatusCode;
use http_common::ClientError;
use identity_api::{AuthInfo, Identity};
use key_api::KeyHandle;

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

fn unexpected(message: &str) -> ClientError {
    ClientError::Status {
        status: StatusCode::BAD_GATEWAY,
        message: message.to_owned(),
    }
}

fn module_of(identity: Identity) -> ModuleIdentity {
    match identity {
        Identity::Aziot(spec) => ModuleIdentity {
            module_id: spec.module_id.unwrap_or_default(),
            gen_id: spec.gen_id.unwrap_or_default(),
            key_handle: match spec.auth {
                Some(AuthInfo::Sas { key_handle }) => Some(key_handle),
                _ => None,
            },
            local: false,
        },
        Identity::Local(spec) => ModuleIdentity {
            module_id: spec.module_id,
            gen_id: String::new(),
            key_handle: None,
            local: true,
        },
    }
}

/// identityd through its typed client.
pub type HttpIdentityClient = identity_api::Client;

impl IdentityClient for identity_api::Client {
    async fn get_device(&self) -> Result<DeviceIdentity, ClientError> {
        match self.get_device_identity().await? {
            Identity::Aziot(spec) => Ok(DeviceIdentity {
                gateway_host: if spec.gateway_host.is_empty() {
                    spec.hub_name.clone()
                } else {
                    spec.gateway_host
                },
                hub_name: spec.hub_name,
                device_id: spec.device_id,
            }),
            Identity::Local(_) => Err(unexpected("identityd returned a local device identity")),
        }
    }

    async fn reprovision(&self) -> Result<(), ClientError> {
        identity_api::Client::reprovision(self).await
    }

    async fn list_modules(&self) -> Result<Vec<ModuleIdentity>, ClientError> {
        Ok(identity_api::Client::list_modules(self)
            .await?
            .into_iter()
            .map(module_of)
            .collect())
    }

    async fn create_module(&self, module_id: &str) -> Result<ModuleIdentity, ClientError> {
        identity_api::Client::create_module(self, module_id)
            .await
            .map(module_of)
    }

    async fn get_module(&self, module_id: &str) -> Result<ModuleIdentity, ClientError> {
        identity_api::Client::get_module(self, module_id, "aziot")
            .await
            .map(module_of)
    }

    async fn update_module(&self, module_id: &str) -> Result<ModuleIdentity, ClientError> {
        identity_api::Client::update_module(self, module_id)
            .await
            .map(module_of)
    }

    async fn delete_module(&self, module_id: &str) -> Result<(), ClientError> {
        identity_api::Client::delete_module(self, module_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_identityd_shapes() {
        let module: Identity = serde_json::from_value(serde_json::json!({
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
        let local: Identity = serde_json::from_value(serde_json::json!({
            "type": "local", "spec": {"moduleId": "l"}
        }))
        .unwrap();
        assert!(module_of(local).local);
    }
}
