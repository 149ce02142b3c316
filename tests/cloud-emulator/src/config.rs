//! Configuration: the TOML file read at startup and the JSON bodies of the admin API share
//! these types (snake_case field names in both).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::EmulatorError as Error;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn default_scope() -> String {
    "0ne00000000".to_string()
}

fn one() -> u32 {
    1
}

/// Whole emulator configuration (TOML file, or built in code for in-process use).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTPS listener serving both DPS and Hub routes. Default `127.0.0.1:0` (any free port).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Optional second HTTPS listener (same routes), e.g. to give the hub its own port.
    #[serde(default)]
    pub hub_listen: Option<SocketAddr>,
    /// Plain-HTTP admin listener (loopback only in practice). Default `127.0.0.1:0`.
    #[serde(default = "default_listen")]
    pub admin_listen: SocketAddr,
    /// Where to write the test CA certificate (PEM). Default: `<pki_dir>/ca.pem` when
    /// `pki_dir` is set, else `ca.pem` in a temporary directory removed at shutdown.
    #[serde(default)]
    pub ca_cert_path: Option<PathBuf>,
    /// Directory holding a persistent CA (`ca.pem` + `ca.key`); created there if missing.
    /// Without it a fresh CA is generated at every start.
    #[serde(default)]
    pub pki_dir: Option<PathBuf>,
    /// Extra host names / IPs for the server certificate (besides `localhost`, `127.0.0.1`,
    /// `::1` and the hub host names). A `:port` suffix is ignored.
    #[serde(default)]
    pub server_names: Vec<String>,
    /// The DPS ID scope served. Default `0ne00000000`.
    #[serde(default = "default_scope")]
    pub id_scope: String,
    /// Host name (authority, may carry `:port`) of the default hub, which DPS assigns devices
    /// to. Default `localhost:<bound https port>`.
    #[serde(default)]
    pub hub_hostname: Option<String>,
    /// DPS polls answered 202 `assigning` before the final answer. Default 1.
    #[serde(default = "one")]
    pub assigning_polls: u32,
    /// `Retry-After` seconds on DPS 202 answers. Default 1.
    #[serde(default = "one")]
    pub retry_after_secs: u32,
    /// Individual enrollments (`[[individual_enrollment]]`).
    #[serde(default, rename = "individual_enrollment")]
    pub individual_enrollments: Vec<IndividualEnrollment>,
    /// Group enrollments (`[[group_enrollment]]`).
    #[serde(default, rename = "group_enrollment")]
    pub group_enrollments: Vec<GroupEnrollment>,
    /// Devices pre-registered in a hub (`[[device]]`), for manual provisioning.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceSpec>,
    /// PEM files of CAs the hubs trust for `certificateAuthority` devices (X.509 group
    /// enrollment CAs are trusted automatically).
    #[serde(default)]
    pub trusted_ca_files: Vec<PathBuf>,
    /// Certificate issuance policies of enrollments (`[[certificate_issuance]]`): DPS issues a
    /// client certificate to a registration that sends a CSR (spec 9.6).
    #[serde(default, rename = "certificate_issuance")]
    pub certificate_issuance: Vec<CertificateIssuance>,
}

/// An enrollment's certificate issuance policy.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateIssuance {
    /// The enrollment: an individual enrollment's registration ID or a group's ID.
    pub enrollment: String,
    /// Lifetime of the issued certificates in seconds. Default 3600.
    #[serde(default = "default_issued_validity")]
    pub validity_secs: u64,
}

fn default_issued_validity() -> u64 {
    3600
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            hub_listen: None,
            admin_listen: default_listen(),
            ca_cert_path: None,
            pki_dir: None,
            server_names: Vec::new(),
            id_scope: default_scope(),
            hub_hostname: None,
            assigning_polls: 1,
            retry_after_secs: 1,
            individual_enrollments: Vec::new(),
            group_enrollments: Vec::new(),
            devices: Vec::new(),
            trusted_ca_files: Vec::new(),
            certificate_issuance: Vec::new(),
        }
    }
}

impl Config {
    /// Reads and parses a TOML file. Relative `*_file` / directory paths are resolved
    /// against the file's directory.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            context: format!("read config {}", path.display()),
            source,
        })?;
        let mut config = Self::from_toml_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        if let Some(base) = path.parent() {
            config.resolve_relative(base);
        }
        Ok(config)
    }

    /// Parses TOML text.
    pub fn from_toml_str(text: &str) -> Result<Self, Error> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    fn resolve_relative(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = self.ca_cert_path.as_mut() {
            fix(p);
        }
        if let Some(p) = self.pki_dir.as_mut() {
            fix(p);
        }
        self.trusted_ca_files.iter_mut().for_each(fix);
        for e in &mut self.individual_enrollments {
            if let Attestation::X509 {
                cert_file: Some(p), ..
            } = &mut e.attestation
            {
                fix(p);
            }
        }
        for g in &mut self.group_enrollments {
            if let GroupAttestation::X509 {
                ca_file: Some(p), ..
            } = &mut g.attestation
            {
                fix(p);
            }
        }
    }
}

/// An individual enrollment: one registration ID with its own credential.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndividualEnrollment {
    /// Registration ID (the `{registrationId}` of the DPS URL).
    pub registration_id: String,
    /// Device ID to create in the hub. Default: the registration ID.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Hub to assign to, overriding the emulator-wide assigned hub.
    #[serde(default)]
    pub assigned_hub: Option<String>,
    /// Returned as `registrationState.payload` (the "custom allocation" answer).
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// Marks the hub device as an IoT Edge device (`capabilities.iotEdge`).
    #[serde(default)]
    pub iot_edge: bool,
    /// How the device proves itself.
    pub attestation: Attestation,
}

/// Individual enrollment attestation.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Attestation {
    /// SAS tokens signed with one of these base64 keys.
    SymmetricKey {
        /// Primary key, base64.
        primary_key: String,
        /// Secondary key, base64.
        #[serde(default)]
        secondary_key: Option<String>,
    },
    /// The TLS client certificate is the enrolled one (give at least one of the fields).
    X509 {
        /// The enrolled certificate, PEM (first certificate used).
        #[serde(default)]
        cert_pem: Option<String>,
        /// File holding the enrolled certificate, PEM.
        #[serde(default)]
        cert_file: Option<PathBuf>,
        /// SHA-1 or SHA-256 thumbprints (hex) that identify the enrolled certificate.
        #[serde(default)]
        thumbprints: Vec<String>,
    },
    /// TPM attestation (spec 9.7): the device proves it holds this endorsement key.
    Tpm {
        /// The EK public area, base64 of its `TPM2B_PUBLIC` (as the device sends it and
        /// `tpm2_readpublic -f tss` writes it) or of the bare `TPMT_PUBLIC`.
        endorsement_key: String,
    },
}

impl std::fmt::Debug for Attestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attestation::SymmetricKey { .. } => f.write_str("SymmetricKey { <redacted> }"),
            Attestation::X509 {
                cert_file,
                thumbprints,
                cert_pem,
            } => f
                .debug_struct("X509")
                .field("cert_pem", &cert_pem.is_some())
                .field("cert_file", cert_file)
                .field("thumbprints", thumbprints)
                .finish(),
            Attestation::Tpm { .. } => f.write_str("Tpm { .. }"),
        }
    }
}

/// A group enrollment: any registration ID whose credential derives from the group's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupEnrollment {
    /// Group name (reported as `enrollmentGroupId`).
    pub group_id: String,
    /// Hub to assign to, overriding the emulator-wide assigned hub.
    #[serde(default)]
    pub assigned_hub: Option<String>,
    /// Returned as `registrationState.payload`.
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// Marks hub devices as IoT Edge devices.
    #[serde(default)]
    pub iot_edge: bool,
    /// How members prove themselves.
    pub attestation: GroupAttestation,
}

/// Group enrollment attestation.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GroupAttestation {
    /// Members sign with `base64(HMAC-SHA256(groupKey, registrationId))`.
    SymmetricKey {
        /// Group primary key, base64.
        primary_key: String,
        /// Group secondary key, base64.
        #[serde(default)]
        secondary_key: Option<String>,
    },
    /// Members' leaf certificates chain to this CA (give `ca_pem` or `ca_file`; a bundle
    /// may hold several CAs).
    X509 {
        /// CA certificate(s), PEM.
        #[serde(default)]
        ca_pem: Option<String>,
        /// File holding the CA certificate(s), PEM.
        #[serde(default)]
        ca_file: Option<PathBuf>,
    },
}

impl std::fmt::Debug for GroupAttestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupAttestation::SymmetricKey { .. } => f.write_str("SymmetricKey { <redacted> }"),
            GroupAttestation::X509 { ca_pem, ca_file } => f
                .debug_struct("X509")
                .field("ca_pem", &ca_pem.is_some())
                .field("ca_file", ca_file)
                .finish(),
        }
    }
}

/// A device added directly to a hub (manual provisioning).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Hub host name. Default: the default hub.
    #[serde(default)]
    pub hub: Option<String>,
    /// Device ID.
    pub device_id: String,
    /// Marks the device as an IoT Edge device.
    #[serde(default)]
    pub iot_edge: bool,
    /// How the device authenticates to the hub.
    pub authentication: DeviceAuthSpec,
}

/// Hub device authentication.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeviceAuthSpec {
    /// SAS keys (base64); missing keys are generated (32 random bytes).
    Sas {
        /// Primary key, base64.
        #[serde(default)]
        primary_key: Option<String>,
        /// Secondary key, base64.
        #[serde(default)]
        secondary_key: Option<String>,
    },
    /// Self-signed X.509: the client cert's SHA-1 or SHA-256 thumbprint must match. Give
    /// `primary_thumbprint` or `cert_pem` (its SHA-256 thumbprint is used).
    SelfSigned {
        /// Primary thumbprint, hex.
        #[serde(default)]
        primary_thumbprint: Option<String>,
        /// Secondary thumbprint, hex.
        #[serde(default)]
        secondary_thumbprint: Option<String>,
        /// The device certificate, PEM.
        #[serde(default)]
        cert_pem: Option<String>,
    },
    /// CA-signed X.509: chain verifies to a trusted CA and the leaf CN is the device ID.
    /// `ca_pem`, if given, is added to the hubs' trusted CAs.
    CertificateAuthority {
        /// CA certificate(s) to trust, PEM.
        #[serde(default)]
        ca_pem: Option<String>,
    },
}

impl std::fmt::Debug for DeviceAuthSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceAuthSpec::Sas { .. } => f.write_str("Sas { <redacted> }"),
            DeviceAuthSpec::SelfSigned {
                primary_thumbprint,
                secondary_thumbprint,
                ..
            } => f
                .debug_struct("SelfSigned")
                .field("primary_thumbprint", primary_thumbprint)
                .field("secondary_thumbprint", secondary_thumbprint)
                .finish_non_exhaustive(),
            DeviceAuthSpec::CertificateAuthority { .. } => f.write_str("CertificateAuthority"),
        }
    }
}

/// Run-time settings, changed through `PATCH /settings` (all fields optional there).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    /// Hub that DPS assigns devices to from now on.
    #[serde(default)]
    pub assigned_hub: Option<String>,
    /// DPS polls answered `assigning` before the final answer.
    #[serde(default)]
    pub assigning_polls: Option<u32>,
    /// `Retry-After` seconds on DPS 202 answers.
    #[serde(default)]
    pub retry_after_secs: Option<u32>,
    /// Make new registrations end `failed` (`Some(spec)`), or succeed again (`null` in JSON
    /// clears it — send `{"fail_registrations": null}`).
    #[serde(default, deserialize_with = "double_option")]
    pub fail_registrations: Option<Option<FailSpec>>,
    /// Delay every DPS answer by this many milliseconds.
    #[serde(default)]
    pub dps_delay_ms: Option<u64>,
    /// Delay every Hub answer by this many milliseconds.
    #[serde(default)]
    pub hub_delay_ms: Option<u64>,
}

fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// How failed registrations are reported.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FailSpec {
    /// `registrationState.errorCode`. Default 400209.
    #[serde(default = "default_fail_code")]
    pub error_code: u32,
    /// `registrationState.errorMessage`.
    #[serde(default = "default_fail_message")]
    pub message: String,
}

fn default_fail_code() -> u32 {
    400_209
}

fn default_fail_message() -> String {
    "Custom allocation failed with status code: 400".to_string()
}

impl Default for FailSpec {
    fn default() -> Self {
        FailSpec {
            error_code: default_fail_code(),
            message: default_fail_message(),
        }
    }
}

/// Which service a fault or delay targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// DPS routes (`/{scope}/registrations/...`).
    Dps,
    /// Hub routes (`/devices/...`).
    Hub,
}

/// Fault injection: the next `count` requests to `target` get `status` with `Retry-After`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// `dps` or `hub`.
    pub target: Target,
    /// HTTP status to answer, 400–599 (typically 429 or 503).
    pub status: u16,
    /// How many requests get the fault.
    pub count: u32,
    /// `Retry-After` value in seconds; omitted from the answer when `None`.
    #[serde(default)]
    pub retry_after_secs: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_example() {
        let c = Config::from_toml_str(
            r#"
            listen = "127.0.0.1:8443"
            id_scope = "0ne0000ABCD"
            hub_hostname = "localhost:8443"
            assigning_polls = 0

            [[individual_enrollment]]
            registration_id = "dev1"
            payload = { modelId = "dtmi:x;1" }
            attestation = { type = "symmetric_key", primary_key = "AAAA" }

            [[individual_enrollment]]
            registration_id = "dev2"
            [individual_enrollment.attestation]
            type = "x509"
            thumbprints = ["AB:CD"]

            [[group_enrollment]]
            group_id = "g1"
            attestation = { type = "x509", ca_file = "ca.pem" }

            [[device]]
            device_id = "manual1"
            authentication = { type = "sas" }
            "#,
        )
        .unwrap();
        assert_eq!(c.id_scope, "0ne0000ABCD");
        assert_eq!(c.assigning_polls, 0);
        assert_eq!(c.individual_enrollments.len(), 2);
        assert!(matches!(
            c.group_enrollments[0].attestation,
            GroupAttestation::X509 { .. }
        ));
        assert_eq!(c.devices[0].device_id, "manual1");
        assert!(Config::from_toml_str("bogus = 1").is_err());
    }

    #[test]
    fn debug_redacts_keys() {
        let a = Attestation::SymmetricKey {
            primary_key: "c2VjcmV0".into(),
            secondary_key: None,
        };
        assert!(!format!("{a:?}").contains("c2VjcmV0"));
    }

    #[test]
    fn settings_patch_null_clears_failure() {
        let p: SettingsPatch = serde_json::from_str(r#"{"fail_registrations": null}"#).unwrap();
        assert_eq!(p.fail_registrations, Some(None));
        let p: SettingsPatch = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(p.fail_registrations, None);
    }
}
