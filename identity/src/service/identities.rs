//! The device and caller identity reads, provisioning info and the trust bundle.

use identity_api::{
    AuthInfo, AziotSpec, DraftAuth, DraftDeviceIdentity, Identity, ProvisioningInfo,
};

use super::{CallerKind, Device, DeviceCredentials, DeviceState, IdentityService};
use crate::cloud::tls;
use crate::config::{DpsAttestation, IdType, ManualAuth, Provisioning};
use crate::error::IdentityError;

impl IdentityService {
    async fn device_auth(&self, device: &Device) -> Result<AuthInfo, IdentityError> {
        Ok(match &device.credentials {
            DeviceCredentials::Sas { key_id } => AuthInfo::Sas {
                key_handle: self
                    .keyd
                    .load_key(key_id)
                    .await
                    .map_err(IdentityError::keyd(format!(
                        "loading device key {key_id:?}"
                    )))?,
            },
            DeviceCredentials::Tpm => AuthInfo::Tpm,
            DeviceCredentials::X509 { cert_id, key_id } => {
                AuthInfo::X509 {
                    key_handle: self.keyd.load_key_pair(key_id).await.map_err(
                        IdentityError::keyd(format!("loading identity key pair {key_id:?}")),
                    )?,
                    cert_id: cert_id.clone(),
                }
            }
        })
    }

    /// The device identity for a caller with device rights.
    pub async fn device_identity(&self, uid: u32) -> Result<Identity, IdentityError> {
        if !self.caller_kind(uid).may_get_device() {
            return Err(IdentityError::Forbidden { uid });
        }
        let device = self.device().await?;
        let auth = self.device_auth(&device).await?;
        Ok(Identity::Aziot(AziotSpec {
            hub_name: device.hub_name.clone(),
            gateway_host: device.gateway_host.clone(),
            device_id: device.device_id.clone(),
            module_id: None,
            gen_id: None,
            auth: Some(auth),
        }))
    }

    /// The draft route's device identity.
    pub async fn draft_device_identity(
        &self,
        uid: u32,
    ) -> Result<DraftDeviceIdentity, IdentityError> {
        if !self.caller_kind(uid).may_get_device() {
            return Err(IdentityError::Forbidden { uid });
        }
        let device = self.device().await?;
        let auth = match self.device_auth(&device).await? {
            AuthInfo::Sas { key_handle } => DraftAuth {
                auth_type: "sas".to_owned(),
                keystorehandle: Some(key_handle),
                certstorehandle: None,
            },
            AuthInfo::X509 {
                key_handle,
                cert_id,
            } => DraftAuth {
                auth_type: "x509".to_owned(),
                keystorehandle: Some(key_handle),
                certstorehandle: Some(cert_id),
            },
            AuthInfo::Tpm => DraftAuth {
                auth_type: "tpm".to_owned(),
                keystorehandle: None,
                certstorehandle: None,
            },
        };
        Ok(DraftDeviceIdentity {
            id: format!("aziot://{}/device/{}", device.hub_name, device.device_id),
            managed_by: format!("aziot://{}/", device.hub_name),
            auth,
        })
    }

    /// `GET /identities/identity`: the device identity, or the caller's own module identity.
    pub async fn caller_identity(&self, uid: u32) -> Result<Identity, IdentityError> {
        let kind = self.caller_kind(uid);
        if kind.may_get_device() {
            return self.device_identity(uid).await;
        }
        match kind {
            CallerKind::HostProcess(principal) if principal.has(IdType::Module) => {
                self.get_module(uid, &principal.name, "aziot").await
            }
            CallerKind::HostProcess(principal) if principal.has(IdType::Local) => {
                self.get_module(uid, &principal.name, "local").await
            }
            _ => Err(IdentityError::Forbidden { uid }),
        }
    }

    /// `GET /identities/provisioning`.
    pub async fn provisioning_info(&self) -> ProvisioningInfo {
        let (status, error) = match self.device_state() {
            DeviceState::Starting => (Some("provisioning"), None),
            DeviceState::Ready(_) => (Some("provisioned"), None),
            DeviceState::NotProvisioned => (None, None),
            DeviceState::Failed(error) => (
                Some("failed"),
                Some(http_common::ApiError::server_message(error.as_ref())),
            ),
        };
        let mut info = self.provisioning_settings().await;
        if info.source != "none" {
            info.status = status.map(str::to_owned);
            info.error = error;
        }
        info
    }

    async fn provisioning_settings(&self) -> ProvisioningInfo {
        let settings = self.settings();
        match &settings.provisioning {
            Provisioning::None => ProvisioningInfo {
                source: "none".to_owned(),
                auth: None,
                endpoint: None,
                scope_id: None,
                registration_id: None,
                payload: None,
                status: None,
                error: None,
            },
            Provisioning::Manual { authentication, .. } => ProvisioningInfo {
                source: "manual".to_owned(),
                auth: Some(
                    match authentication {
                        ManualAuth::Sas { .. } => "sas",
                        ManualAuth::X509 { .. } => "x509",
                    }
                    .to_owned(),
                ),
                endpoint: None,
                scope_id: None,
                registration_id: None,
                payload: None,
                status: None,
                error: None,
            },
            Provisioning::Dps {
                global_endpoint,
                scope_id,
                payload,
                attestation,
                ..
            } => {
                let (auth, registration_id) = match attestation {
                    DpsAttestation::SymmetricKey {
                        registration_id, ..
                    } => ("symmetric_key", Some(registration_id.clone())),
                    DpsAttestation::Tpm { registration_id } => {
                        ("tpm", Some(registration_id.clone()))
                    }
                    DpsAttestation::X509 {
                        registration_id: Some(id),
                        ..
                    } => ("x509", Some(id.clone())),
                    DpsAttestation::X509 { cert_id, .. } => (
                        "x509",
                        match self.certd.get_cert(cert_id).await {
                            Ok(pem) => tls::leaf_common_name(&pem),
                            Err(error) => {
                                log::warn!(
                                    "cannot read identity certificate {cert_id:?}: {}",
                                    http_common::error::error_chain(&error)
                                );
                                None
                            }
                        },
                    ),
                };
                ProvisioningInfo {
                    source: "dps".to_owned(),
                    auth: Some(auth.to_owned()),
                    endpoint: Some(global_endpoint.clone()),
                    scope_id: Some(scope_id.clone()),
                    registration_id,
                    payload: Some(payload.clone().unwrap_or(serde_json::Value::Null)),
                    status: None,
                    error: None,
                }
            }
        }
    }

    /// `GET /trust-bundle`.
    pub async fn trust_bundle(&self) -> Result<String, IdentityError> {
        match self.certd.get_cert(&self.fixed.trust_bundle_cert).await {
            Ok(pem) => Ok(pem),
            Err(error) if error.is_not_found() => Ok(String::new()),
            Err(error) => Err(IdentityError::certd("loading the trust bundle")(error)),
        }
    }
}
