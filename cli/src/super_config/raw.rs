//! The raw shapes of the super-config, deserialized strictly (unknown keys are errors).
//! Polymorphic values (`{ value } | { uri }`, a URI or an issuance table) stay `toml::Value` and
//! are parsed by hand in the mapping so that errors name the exact key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::{Table, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSuperConfig {
    pub(super) hostname: Option<String>,
    #[serde(alias = "parent_hostname")]
    pub(super) local_gateway_hostname: Option<String>,
    pub(super) cloud_timeout_sec: Option<i64>,
    pub(super) cloud_retries: Option<i64>,
    pub(super) prefer_module_identity_cache: Option<bool>,
    pub(super) aziot_max_requests: Option<RawMaxRequests>,
    pub(super) localid: Option<RawLocalId>,
    pub(super) provisioning: Option<RawProvisioning>,
    #[serde(default)]
    pub(super) aziot_keys: BTreeMap<String, String>,
    #[serde(default)]
    pub(super) preloaded_keys: BTreeMap<String, String>,
    pub(super) cert_issuance: Option<RawCertIssuance>,
    #[serde(default)]
    pub(super) preloaded_certs: BTreeMap<String, Value>,
    pub(super) tpm: Option<RawTpm>,
    pub(super) trust_bundle_cert: Option<String>,
    // IoT Edge keys.
    pub(super) allow_elevated_docker_permissions: Option<bool>,
    pub(super) auto_reprovisioning_mode: Option<String>,
    pub(super) iotedge_max_requests: Option<RawEdgeMaxRequests>,
    pub(super) additional_info: Option<String>,
    pub(super) imported_master_encryption_key: Option<PathBuf>,
    pub(super) agent: Option<RawAgent>,
    pub(super) connect: Option<RawUris>,
    pub(super) listen: Option<RawUris>,
    pub(super) watchdog: Option<RawWatchdog>,
    pub(super) edge_ca: Option<RawEdgeCa>,
    pub(super) image_garbage_collection: Option<RawImageGc>,
    pub(super) moby_runtime: Option<RawMoby>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMaxRequests {
    pub(super) keyd: Option<i64>,
    pub(super) certd: Option<i64>,
    pub(super) tpmd: Option<i64>,
    pub(super) identityd: Option<i64>,
}

/// `[tpm]`: the TPM service's settings (keyd's tpmd configuration).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTpm {
    pub(super) tcti: Option<String>,
    pub(super) auth_key_index: Option<i64>,
    pub(super) hierarchy_authorization: Option<RawHierarchyAuthorization>,
}

impl std::fmt::Debug for RawTpm {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hierarchy authorizations are secrets.
        formatter
            .debug_struct("RawTpm")
            .field("tcti", &self.tcti)
            .field("auth_key_index", &self.auth_key_index)
            .finish_non_exhaustive()
    }
}

/// `[tpm.hierarchy_authorization]`.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHierarchyAuthorization {
    pub(super) endorsement: Option<String>,
    pub(super) owner: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLocalId {
    pub(super) domain: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvisioning {
    pub(super) source: String,
    pub(super) iothub_hostname: Option<String>,
    pub(super) device_id: Option<String>,
    pub(super) connection_string: Option<String>,
    pub(super) authentication: Option<RawManualAuth>,
    pub(super) global_endpoint: Option<String>,
    pub(super) id_scope: Option<String>,
    pub(super) scope_id: Option<String>,
    pub(super) payload: Option<RawPayload>,
    pub(super) attestation: Option<RawAttestation>,
    /// Ours: DPS issues the operational certificate (identityd's same table).
    pub(super) operational_cert: Option<RawOperationalCert>,
}

/// `[provisioning.operational_cert]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOperationalCert {
    pub(super) cert: Option<String>,
    pub(super) pk: Option<String>,
    pub(super) auto_renew: Option<RawAutoRenew>,
}

impl std::fmt::Debug for RawProvisioning {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection string is a secret.
        formatter
            .debug_struct("RawProvisioning")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPayload {
    pub(super) uri: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawManualAuth {
    pub(super) method: String,
    pub(super) device_id_pk: Option<Value>,
    pub(super) identity_cert: Option<Value>,
    pub(super) identity_pk: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAttestation {
    pub(super) method: String,
    pub(super) registration_id: Option<String>,
    pub(super) symmetric_key: Option<Value>,
    pub(super) identity_cert: Option<Value>,
    pub(super) identity_pk: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSymmetricKey {
    pub(super) value: Option<String>,
    pub(super) uri: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIssuance {
    pub(super) method: Option<String>,
    pub(super) common_name: Option<String>,
    pub(super) subject: Option<BTreeMap<String, String>>,
    pub(super) expiry_days: Option<i64>,
    pub(super) url: Option<String>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) identity_cert: Option<String>,
    pub(super) identity_pk: Option<String>,
    pub(super) bootstrap_identity_cert: Option<String>,
    pub(super) bootstrap_identity_pk: Option<String>,
    pub(super) auto_renew: Option<RawAutoRenew>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAutoRenew {
    pub(super) rotate_key: Option<bool>,
    pub(super) threshold: Option<String>,
    pub(super) retry: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertIssuance {
    pub(super) local_ca: Option<Value>,
    pub(super) est: Option<RawEst>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEst {
    #[serde(default)]
    pub(super) trusted_certs: Vec<String>,
    pub(super) auth: Option<RawEstAuth>,
    pub(super) identity_auto_renew: Option<RawAutoRenew>,
    #[serde(default)]
    pub(super) urls: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEstAuth {
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) identity_cert: Option<String>,
    pub(super) identity_pk: Option<String>,
    pub(super) bootstrap_identity_cert: Option<String>,
    pub(super) bootstrap_identity_pk: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEdgeMaxRequests {
    pub(super) management: Option<i64>,
    pub(super) workload: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgent {
    pub(super) name: Option<String>,
    #[serde(rename = "type")]
    pub(super) agent_type: Option<String>,
    #[serde(rename = "imagePullPolicy")]
    pub(super) image_pull_policy: Option<String>,
    pub(super) config: Option<RawAgentConfig>,
    pub(super) env: Option<Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgentConfig {
    pub(super) image: Option<String>,
    #[serde(rename = "createOptions")]
    pub(super) create_options: Option<Value>,
    pub(super) auth: Option<RawAgentAuth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAgentAuth {
    pub(super) serveraddress: Option<String>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
}

impl std::fmt::Debug for RawAgentAuth {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RawAgentAuth")
            .field("serveraddress", &self.serveraddress)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUris {
    pub(super) workload_uri: Option<String>,
    pub(super) management_uri: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWatchdog {
    pub(super) max_retries: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEdgeCa {
    pub(super) auto_generated_edge_ca_expiry_days: Option<i64>,
    pub(super) cert: Option<String>,
    pub(super) pk: Option<String>,
    pub(super) method: Option<String>,
    pub(super) common_name: Option<String>,
    pub(super) subject: Option<BTreeMap<String, String>>,
    pub(super) expiry_days: Option<i64>,
    pub(super) url: Option<String>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) identity_cert: Option<String>,
    pub(super) identity_pk: Option<String>,
    pub(super) bootstrap_identity_cert: Option<String>,
    pub(super) bootstrap_identity_pk: Option<String>,
    pub(super) auto_renew: Option<RawAutoRenew>,
}

impl RawEdgeCa {
    pub(super) fn issuance(&self) -> RawIssuance {
        RawIssuance {
            method: self.method.clone(),
            common_name: self.common_name.clone(),
            subject: self.subject.clone(),
            expiry_days: self.expiry_days,
            url: self.url.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            identity_cert: self.identity_cert.clone(),
            identity_pk: self.identity_pk.clone(),
            bootstrap_identity_cert: self.bootstrap_identity_cert.clone(),
            bootstrap_identity_pk: self.bootstrap_identity_pk.clone(),
            auto_renew: self.auto_renew.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawImageGc {
    pub(super) enabled: Option<bool>,
    pub(super) cleanup_recurrence: Option<String>,
    pub(super) image_age_cleanup_threshold: Option<String>,
    pub(super) cleanup_time: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMoby {
    pub(super) uri: Option<String>,
    pub(super) network: Option<Value>,
    pub(super) content_trust: Option<Value>,
}
