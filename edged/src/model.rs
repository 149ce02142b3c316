//! The JSON shapes of the management and workload APIs (`ModuleSpec`, `ModuleDetails`,
//! `Identity`, `SystemInfo`, the workload bodies), exactly as edgeAgent and the SDKs expect them.
//!
//! Plain data only: no I/O and no HTTP types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::RegistryAuth;

/// The label every module container carries.
pub const OWNER_LABEL: &str = "net.azure-devices.edge.owner";
/// Its value.
pub const OWNER_VALUE: &str = "Microsoft.Azure.Devices.Edge.Agent";
/// The image as the module spec requested it.
pub const ORIGINAL_IMAGE_LABEL: &str = "net.azure-devices.edge.original-image";
/// edgeAgent's drift-detection label for create options (JSON string).
pub const CREATE_OPTIONS_LABEL: &str = "net.azure-devices.edge.create-options";
/// edgeAgent's drift-detection label for the environment (JSON string).
pub const ENV_LABEL: &str = "net.azure-devices.edge.env";

/// `ModuleSpec`: the body of module create, update and prepareupdate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleSpec {
    /// Module (container) name.
    pub name: String,
    /// `docker`.
    #[serde(rename = "type")]
    pub module_type: String,
    /// `on-create` (default) or `never`, case-insensitive.
    #[serde(
        rename = "imagePullPolicy",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub image_pull_policy: Option<String>,
    /// Settings and environment.
    pub config: ModuleConfig,
}

/// `config` of a `ModuleSpec`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleConfig {
    /// Docker settings.
    pub settings: Settings,
    /// Environment variables.
    #[serde(default)]
    pub env: Vec<EnvVar>,
}

/// `config.settings` of a `ModuleSpec`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    /// The image reference.
    pub image: String,
    /// A Docker `ContainerCreate` body, passed through.
    #[serde(
        rename = "createOptions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub create_options: Option<serde_json::Value>,
    /// Registry credentials (never echoed back).
    #[serde(default, skip_serializing)]
    pub auth: Option<RegistryAuth>,
    /// Image digest (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Image ID (informational).
    #[serde(rename = "imageHash", default, skip_serializing_if = "Option::is_none")]
    pub image_hash: Option<String>,
}

/// One `{"key", "value"}` environment entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvVar {
    /// Name.
    pub key: String,
    /// Value.
    pub value: String,
}

/// `ModuleDetails`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModuleDetails {
    /// The container ID.
    pub id: String,
    /// The module name.
    pub name: String,
    /// `docker`.
    #[serde(rename = "type")]
    pub module_type: String,
    /// `{"settings": {...}, "env": [...]}`.
    pub config: serde_json::Value,
    /// Runtime status.
    pub status: ModuleStatus,
}

/// `ModuleDetails.status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    /// Last start (RFC 3339, `Z`).
    #[serde(rename = "startTime", default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// Last exit, when both code and time are known.
    #[serde(
        rename = "exitStatus",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub exit_status: Option<ExitStatus>,
    /// The mapped state.
    #[serde(rename = "runtimeStatus")]
    pub runtime_status: RuntimeStatus,
}

/// `exitStatus`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// RFC 3339, `Z`.
    #[serde(rename = "exitTime")]
    pub exit_time: String,
    /// The exit code as a decimal string.
    #[serde(rename = "statusCode")]
    pub status_code: String,
}

/// `runtimeStatus`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeStatus {
    /// `running`, `stopped`, `failed`, `dead`, `unknown`.
    pub status: String,
    /// Docker's human-readable status text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// `ModuleList`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModuleList {
    /// The modules.
    pub modules: Vec<ModuleDetails>,
}

/// `Identity` of the management API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// Module ID.
    pub module_id: String,
    /// Who manages it (`iotedge`).
    pub managed_by: String,
    /// Hub generation ID.
    pub generation_id: String,
    /// Always `sas`.
    pub auth_type: String,
}

/// `IdentityList`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdentityList {
    /// The identities.
    pub identities: Vec<Identity>,
}

/// `POST /identities` body.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateIdentityRequest {
    /// The module ID.
    pub module_id: String,
    /// Who manages it (default `iotedge`).
    #[serde(default)]
    pub managed_by: Option<String>,
}

/// Workload `sign` body.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignRequest {
    /// Base64 data to sign.
    pub data: String,
    /// Ignored.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Ignored.
    #[serde(default)]
    pub algo: Option<String>,
}

/// Workload `sign` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignResponse {
    /// Base64 HMAC-SHA256.
    pub digest: String,
}

/// Workload `encrypt` body.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptRequest {
    /// Base64 plaintext.
    pub plaintext: String,
    /// Base64 IV.
    pub initialization_vector: String,
}

/// Workload `encrypt` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EncryptResponse {
    /// Base64 ciphertext.
    pub ciphertext: String,
}

/// Workload `decrypt` body.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptRequest {
    /// Base64 ciphertext.
    pub ciphertext: String,
    /// Base64 IV.
    pub initialization_vector: String,
}

/// Workload `decrypt` answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DecryptResponse {
    /// Base64 plaintext.
    pub plaintext: String,
}

/// Workload server certificate body.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerCertificateRequest {
    /// The CN and first SAN.
    pub common_name: String,
    /// Ignored (validity comes from certd).
    #[serde(default)]
    pub expiration: Option<String>,
}

/// `CertificateResponse`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateResponse {
    /// `{"type": "key", "bytes": "<PKCS#8 PEM>"}`.
    pub private_key: PrivateKey,
    /// PEM leaf then the Edge CA chain.
    pub certificate: String,
    /// RFC 3339 notAfter of the leaf.
    pub expiration: String,
}

impl std::fmt::Debug for CertificateResponse {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("CertificateResponse")
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

/// `privateKey` of a `CertificateResponse` (its `Debug` output is redacted).
#[derive(Clone, Serialize, Deserialize)]
pub struct PrivateKey {
    /// `key`.
    #[serde(rename = "type")]
    pub key_type: String,
    /// PKCS#8 PEM text.
    pub bytes: String,
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("PrivateKey(<redacted>)")
    }
}

/// `{"certificate": "<PEM>"}` of the trust bundle routes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrustBundleResponse {
    /// PEM certificates.
    pub certificate: String,
}

/// `SystemInfo`: fixed keys plus `additional_info` pairs.
pub type SystemInfo = BTreeMap<String, serde_json::Value>;
