//! identityd's configuration (`config.toml` + `config.d/*.toml`, merged by config-common),
//! validated into [`Config`]: top-level settings, `[provisioning]` in every accepted shape
//! (manual SAS / connection string / X.509, DPS symmetric key / X.509, none), `[[principal]]`,
//! `[localid]` and `[endpoints]`. Every error names the file and the key.
//!
//! Secrets (the connection string's key) are kept out of `Debug` output and error messages.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use config_common::{ConfigError, Loaded};
use serde::{Deserialize, Serialize};

/// The default listener.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/aziot/identityd.sock";
/// keyd's default socket.
pub const DEFAULT_KEYD_ENDPOINT: &str = "unix:///run/aziot/keyd.sock";
/// certd's default socket.
pub const DEFAULT_CERTD_ENDPOINT: &str = "unix:///run/aziot/certd.sock";
/// The TPM service's (keyd's tpmd API) default socket.
pub const DEFAULT_TPMD_ENDPOINT: &str = key_api::tpm::DEFAULT_URI;
/// The default base config file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/aziot/identityd/config.toml";
/// The default drop-in folder.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/aziot/identityd/config.d";
/// The DPS global endpoint used when `global_endpoint` is omitted.
pub const DEFAULT_GLOBAL_ENDPOINT: &str = "https://global.azure-devices-provisioning.net/";
/// The keyd key ID a connection string's key is imported as.
pub const CONNECTION_STRING_KEY_ID: &str = "device-id";
/// The smallest allowed `cloud_timeout_sec`.
pub const MIN_CLOUD_TIMEOUT_SECS: u64 = 70;

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The device's host name (local identity CNs).
    pub hostname: String,
    /// The state folder.
    pub homedir: PathBuf,
    /// Read module identities from the cache before asking Hub.
    pub prefer_module_identity_cache: bool,
    /// Per-uid concurrent connection budget.
    pub max_requests: usize,
    /// Per-request deadline for DPS and Hub.
    pub cloud_timeout: Duration,
    /// Extra attempts for cloud requests that failed to connect or timed out.
    pub cloud_retries: u32,
    /// certd cert ID served by `GET /trust-bundle`.
    pub trust_bundle_cert: String,
    /// PEM files trusted (besides the system store) for DPS / Hub / gateway TLS.
    pub cloud_trusted_certs: Vec<PathBuf>,
    /// How the device gets its cloud identity.
    pub provisioning: Provisioning,
    /// Callers with rights.
    pub principals: Vec<Principal>,
    /// `[localid] domain`.
    pub localid_domain: Option<String>,
    /// The listener URI.
    pub endpoint: String,
    /// keyd's socket URI.
    pub keyd_endpoint: String,
    /// certd's socket URI.
    pub certd_endpoint: String,
    /// The TPM service's socket URI (keyd's tpmd listener).
    pub tpmd_endpoint: String,
}

/// `[provisioning]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum Provisioning {
    /// No cloud identity: local identities only.
    None,
    /// The hub and device ID are configured.
    Manual {
        /// The hub host name (authority; may carry `:port`).
        iothub_hostname: String,
        /// The device ID.
        device_id: String,
        /// The parent gateway (nested edge).
        local_gateway_hostname: Option<String>,
        /// The device credentials.
        authentication: ManualAuth,
    },
    /// The Device Provisioning Service assigns the hub and device ID.
    Dps {
        /// Scheme and authority of DPS (`https://host[:port]/`).
        global_endpoint: String,
        /// The ID scope.
        scope_id: String,
        /// The custom payload (parsed JSON of the configured file).
        payload: Option<serde_json::Value>,
        /// The device credentials.
        attestation: DpsAttestation,
        /// DPS issues the device's operational certificate (spec 9.6); `None`: the device
        /// authenticates to Hub with its attestation credentials.
        #[serde(skip_serializing_if = "Option::is_none")]
        operational_cert: Option<OperationalCert>,
    },
}

/// `[provisioning.operational_cert]`: DPS issues the certificate the device authenticates to
/// Hub with, from a CSR identityd sends in every registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OperationalCert {
    /// certd cert ID of the issued chain.
    pub cert_id: String,
    /// keyd key pair ID of its key.
    pub key_id: String,
    /// When to register again with a new CSR (and whether with a new key).
    pub auto_renew: AutoRenew,
}

/// The default operational certificate ID (cert and key).
pub const DEFAULT_OPERATIONAL_CERT_ID: &str = "aziot-dps-operational";

fn operational_cert_from_raw(
    loaded: &Loaded,
    raw: RawOperationalCert,
) -> Result<OperationalCert, ConfigError> {
    let id = |key: &str, value: Option<String>, scheme: &str| match value {
        None => Ok(DEFAULT_OPERATIONAL_CERT_ID.to_owned()),
        Some(value) => credential_id(loaded, key, Some(&value), scheme),
    };
    let auto_renew = raw.auto_renew.unwrap_or_else(|| AutoRenew {
        rotate_key: true,
        threshold: "80%".to_owned(),
        retry: "4%".to_owned(),
    });
    for (name, value) in [
        ("threshold", &auto_renew.threshold),
        ("retry", &auto_renew.retry),
    ] {
        if config_common::renewal::Policy::parse(value).is_none() {
            return Err(ConfigError::invalid(
                loaded,
                format!("provisioning.operational_cert.auto_renew.{name}"),
                config_common::renewal::Policy::EXPECTED,
            ));
        }
    }
    Ok(OperationalCert {
        cert_id: id("provisioning.operational_cert.cert", raw.cert, "cert://")?,
        key_id: id("provisioning.operational_cert.pk", raw.pk, "key://")?,
        auto_renew,
    })
}

impl Provisioning {
    /// The source name as `GET /identities/provisioning` reports it.
    pub fn source(&self) -> &'static str {
        match self {
            Provisioning::None => "none",
            Provisioning::Manual { .. } => "manual",
            Provisioning::Dps { .. } => "dps",
        }
    }

    /// Hex SHA-256 of the canonical JSON of these settings (`provisioning_digest`).
    pub fn digest(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        crate::util::sha256_hex(&canonical)
    }
}

/// Manual provisioning credentials.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum ManualAuth {
    /// SAS with symmetric key `key_id` in keyd.
    Sas {
        /// The keyd key ID.
        key_id: String,
        /// Key bytes from a connection string, imported into keyd at startup.
        #[serde(skip)]
        import: Option<Vec<u8>>,
    },
    /// X.509: cert `cert_id` in certd, key pair `key_id` in keyd.
    X509 {
        /// certd cert ID.
        cert_id: String,
        /// keyd key pair ID.
        key_id: String,
        /// The subject of the CSR identityd sends certd when the cert does not exist yet: CN is
        /// the device ID, then the other attributes of `csr_subject`. Not part of the
        /// provisioning digest.
        #[serde(skip)]
        csr_subject: Vec<(String, String)>,
    },
}

impl std::fmt::Debug for ManualAuth {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ManualAuth::Sas { key_id, import } => formatter
                .debug_struct("Sas")
                .field("key_id", key_id)
                .field("import", &import.as_ref().map(|_| "<redacted>"))
                .finish(),
            ManualAuth::X509 {
                cert_id,
                key_id,
                csr_subject,
            } => formatter
                .debug_struct("X509")
                .field("cert_id", cert_id)
                .field("key_id", key_id)
                .field("csr_subject", csr_subject)
                .finish(),
        }
    }
}

/// DPS attestation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum DpsAttestation {
    /// Symmetric key (individual key, or the device key derived from a group key).
    SymmetricKey {
        /// The registration ID.
        registration_id: String,
        /// The keyd key ID of the key.
        key_id: String,
    },
    /// TPM: the endorsement key enrolled in DPS; the HMAC key DPS sends lives in the TPM.
    Tpm {
        /// The registration ID.
        registration_id: String,
    },
    /// X.509 client certificate.
    X509 {
        /// The registration ID; `None`: the identity cert's CN.
        registration_id: Option<String>,
        /// certd cert ID.
        cert_id: String,
        /// keyd key pair ID.
        key_id: String,
        /// Renewal policy of the identity certificate.
        auto_renew: Option<AutoRenew>,
        /// The subject of the CSR identityd sends certd when the cert does not exist yet, from
        /// `registration_id` (a string is the CN; a DN table is kept whole); `None` without a
        /// registration ID. Not part of the provisioning digest.
        #[serde(skip)]
        csr_subject: Option<Vec<(String, String)>>,
    },
}

/// `identity_auto_renew`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoRenew {
    /// Generate a new key at renewal.
    #[serde(default)]
    pub rotate_key: bool,
    /// When to renew (`N%`, `Nmin`, `Nday`).
    pub threshold: String,
    /// Retry period (`N%`, `Nmin`, `Nday`).
    pub retry: String,
}

/// A kind of identity a principal may get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdType {
    /// The device identity.
    Device,
    /// A module identity named like the principal.
    Module,
    /// A local identity named like the principal.
    Local,
}

/// `[[principal]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Principal {
    /// The caller's uid.
    pub uid: u32,
    /// The module name.
    pub name: String,
    /// What the principal may get; `None`: the daemon (edged).
    #[serde(rename = "idtype", skip_serializing_if = "Option::is_none")]
    pub id_type: Option<Vec<IdType>>,
    /// `localid.attributes` of a local principal (`client` or `server`).
    #[serde(skip)]
    pub local_attributes: Option<String>,
}

impl Principal {
    /// Whether the principal's idtype includes `id_type`.
    pub fn has(&self, id_type: IdType) -> bool {
        self.id_type
            .as_ref()
            .is_some_and(|types| types.contains(&id_type))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hostname: Option<String>,
    homedir: Option<PathBuf>,
    #[serde(default)]
    prefer_module_identity_cache: bool,
    max_requests: Option<usize>,
    cloud_timeout_sec: Option<u64>,
    cloud_retries: Option<u32>,
    trust_bundle_cert: Option<String>,
    #[serde(default)]
    cloud_trusted_certs: Vec<String>,
    provisioning: Option<RawProvisioning>,
    #[serde(default)]
    principal: Vec<RawPrincipal>,
    localid: Option<RawLocalId>,
    #[serde(default)]
    endpoints: RawEndpoints,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoints {
    aziot_identityd: Option<String>,
    aziot_keyd: Option<String>,
    aziot_certd: Option<String>,
    aziot_tpmd: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocalId {
    domain: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    uid: u32,
    name: String,
    idtype: Option<OneOrMany>,
    localid: Option<RawLocalIdOpts>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocalIdOpts {
    #[serde(rename = "type")]
    id_type: String,
    attributes: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvisioning {
    source: String,
    iothub_hostname: Option<String>,
    device_id: Option<String>,
    connection_string: Option<String>,
    local_gateway_hostname: Option<String>,
    authentication: Option<RawManualAuth>,
    global_endpoint: Option<String>,
    scope_id: Option<String>,
    id_scope: Option<String>,
    payload: Option<RawPayload>,
    attestation: Option<RawAttestation>,
    operational_cert: Option<RawOperationalCert>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOperationalCert {
    cert: Option<String>,
    pk: Option<String>,
    auto_renew: Option<AutoRenew>,
}

impl std::fmt::Debug for RawProvisioning {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RawProvisioning")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPayload {
    uri: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManualAuth {
    method: String,
    device_id_pk: Option<String>,
    identity_cert: Option<String>,
    identity_pk: Option<String>,
    csr_subject: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttestation {
    method: String,
    registration_id: Option<toml::Value>,
    symmetric_key: Option<String>,
    identity_cert: Option<String>,
    identity_pk: Option<String>,
    identity_auto_renew: Option<AutoRenew>,
}

/// Turns a credential reference (`<id>`, `key://<id>`, `cert://<id>`) into the ID.
fn credential_id(
    loaded: &Loaded,
    key: &str,
    value: Option<&String>,
    scheme: &str,
) -> Result<String, ConfigError> {
    let value = value.ok_or_else(|| ConfigError::invalid(loaded, key, "missing"))?;
    if value.starts_with("file://") || value.starts_with("pkcs11:") {
        return Err(ConfigError::invalid(
            loaded,
            key,
            "file:// and pkcs11: URIs are not accepted here; name a keyd key ID / certd cert ID \
             (preload the file or token object in keyd/certd, or use the super-config)",
        ));
    }
    let id = value.strip_prefix(scheme).unwrap_or(value);
    if id.is_empty() {
        return Err(ConfigError::invalid(loaded, key, "empty ID"));
    }
    if id.contains("://") {
        return Err(ConfigError::invalid(
            loaded,
            key,
            format!("expected an ID or a {scheme}<id> URI"),
        ));
    }
    Ok(id.to_owned())
}

/// Checks a cloud host name (`host` or `host:port`).
fn check_authority(loaded: &Loaded, key: &str, value: &str) -> Result<(), ConfigError> {
    match crate::util::split_authority(value) {
        Some(_) => Ok(()),
        None => Err(ConfigError::invalid(
            loaded,
            key,
            format!("{value:?} is not a host name (host or host:port)"),
        )),
    }
}

/// A parsed connection string: `HostName=<hub>;DeviceId=<id>;SharedAccessKey=<b64>`.
struct ConnectionString {
    hub: String,
    device_id: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ConnectionString")
            .field("hub", &self.hub)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

fn parse_connection_string(text: &str) -> Result<ConnectionString, String> {
    let (mut hub, mut device_id, mut key) = (None, None, None);
    for component in text.split(';').filter(|part| !part.trim().is_empty()) {
        let (name, value) = component
            .split_once('=')
            .ok_or_else(|| "a component is not Name=Value".to_owned())?;
        match name.trim() {
            "HostName" => hub = Some(value.trim().to_owned()),
            "DeviceId" => device_id = Some(value.trim().to_owned()),
            "SharedAccessKey" => key = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    let hub = hub.filter(|v| !v.is_empty()).ok_or("HostName is missing")?;
    let device_id = device_id
        .filter(|v| !v.is_empty())
        .ok_or("DeviceId is missing")?;
    let key = key
        .filter(|v| !v.is_empty())
        .ok_or("SharedAccessKey is missing")?;
    let key = base64::engine::general_purpose::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
    .decode(key.as_bytes())
    .map_err(|_| "SharedAccessKey is not base64".to_owned())?;
    if key.is_empty() {
        return Err("SharedAccessKey is empty".to_owned());
    }
    Ok(ConnectionString {
        hub,
        device_id,
        key,
    })
}

/// A DN table as (attribute, value) pairs, CN first: `cn` replaces the table's CN when given.
fn dn_subject(
    loaded: &Loaded,
    key: &str,
    table: &toml::Table,
    cn: Option<&str>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut subject = Vec::with_capacity(table.len() + 1);
    let mut others = Vec::with_capacity(table.len());
    for (name, value) in table {
        let toml::Value::String(value) = value else {
            return Err(ConfigError::invalid(
                loaded,
                format!("{key}.{name}"),
                "expected a string",
            ));
        };
        if name.eq_ignore_ascii_case("CN") {
            if cn.is_none() {
                subject.push(("CN".to_owned(), value.clone()));
            }
        } else {
            others.push((name.to_uppercase(), value.clone()));
        }
    }
    if let Some(cn) = cn {
        subject.push(("CN".to_owned(), cn.to_owned()));
    }
    subject.extend(others);
    // An attribute no certificate subject can carry is a configuration error now, not a failed
    // provisioning round later.
    crate::renewal::subject_from_pairs(&subject)
        .map_err(|reason| ConfigError::invalid(loaded, key, reason))?;
    Ok(subject)
}

fn registration_id_value(
    loaded: &Loaded,
    key: &str,
    value: Option<&toml::Value>,
) -> Result<Option<String>, ConfigError> {
    match value {
        None => Ok(None),
        Some(toml::Value::String(id)) if !id.is_empty() => Ok(Some(id.clone())),
        Some(toml::Value::Table(table)) => match table.get("CN") {
            Some(toml::Value::String(cn)) if !cn.is_empty() => Ok(Some(cn.clone())),
            _ => Err(ConfigError::invalid(
                loaded,
                key,
                "a DN table must have a string CN (the registration ID)",
            )),
        },
        Some(_) => Err(ConfigError::invalid(
            loaded,
            key,
            "expected a non-empty string or a DN table with CN",
        )),
    }
}

fn file_uri_path(loaded: &Loaded, key: &str, uri: &str) -> Result<PathBuf, ConfigError> {
    match uri.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => {
            let decoded = percent_encoding::percent_decode_str(path)
                .decode_utf8()
                .map_err(|_| ConfigError::invalid(loaded, key, "path is not UTF-8"))?;
            Ok(PathBuf::from(decoded.as_ref()))
        }
        _ => Err(ConfigError::invalid(
            loaded,
            key,
            "expected an absolute file:// URI (file:///path)",
        )),
    }
}

fn unexpected(loaded: &Loaded, key: &str, present: bool, context: &str) -> Result<(), ConfigError> {
    if present {
        Err(ConfigError::invalid(
            loaded,
            key,
            format!("not valid with {context}"),
        ))
    } else {
        Ok(())
    }
}

fn provisioning_from_raw(
    loaded: &Loaded,
    raw: RawProvisioning,
) -> Result<Provisioning, ConfigError> {
    let manual_only = [
        (
            "provisioning.iothub_hostname",
            raw.iothub_hostname.is_some(),
        ),
        ("provisioning.device_id", raw.device_id.is_some()),
        (
            "provisioning.connection_string",
            raw.connection_string.is_some(),
        ),
        ("provisioning.authentication", raw.authentication.is_some()),
    ];
    let dps_only = [
        (
            "provisioning.global_endpoint",
            raw.global_endpoint.is_some(),
        ),
        ("provisioning.scope_id", raw.scope_id.is_some()),
        ("provisioning.id_scope", raw.id_scope.is_some()),
        ("provisioning.payload", raw.payload.is_some()),
        ("provisioning.attestation", raw.attestation.is_some()),
        (
            "provisioning.operational_cert",
            raw.operational_cert.is_some(),
        ),
    ];
    match raw.source.as_str() {
        "none" => {
            for (key, present) in manual_only.iter().chain(dps_only.iter()) {
                unexpected(loaded, key, *present, "source = \"none\"")?;
            }
            unexpected(
                loaded,
                "provisioning.local_gateway_hostname",
                raw.local_gateway_hostname.is_some(),
                "source = \"none\"",
            )?;
            Ok(Provisioning::None)
        }
        "manual" => {
            for (key, present) in dps_only {
                unexpected(loaded, key, present, "source = \"manual\"")?;
            }
            if let Some(gateway) = &raw.local_gateway_hostname {
                check_authority(loaded, "provisioning.local_gateway_hostname", gateway)?;
            }
            if let Some(text) = &raw.connection_string {
                for (key, present) in [
                    (
                        "provisioning.iothub_hostname",
                        raw.iothub_hostname.is_some(),
                    ),
                    ("provisioning.device_id", raw.device_id.is_some()),
                    ("provisioning.authentication", raw.authentication.is_some()),
                ] {
                    unexpected(loaded, key, present, "connection_string")?;
                }
                let parsed = parse_connection_string(text).map_err(|reason| {
                    ConfigError::invalid(loaded, "provisioning.connection_string", reason)
                })?;
                check_connection_string_file_mode(loaded)?;
                check_authority(loaded, "provisioning.connection_string", &parsed.hub)?;
                return Ok(Provisioning::Manual {
                    iothub_hostname: parsed.hub,
                    device_id: parsed.device_id,
                    local_gateway_hostname: raw.local_gateway_hostname,
                    authentication: ManualAuth::Sas {
                        key_id: CONNECTION_STRING_KEY_ID.to_owned(),
                        import: Some(parsed.key),
                    },
                });
            }
            let iothub_hostname = raw.iothub_hostname.ok_or_else(|| {
                ConfigError::invalid(
                    loaded,
                    "provisioning.iothub_hostname",
                    "missing (or give connection_string)",
                )
            })?;
            check_authority(loaded, "provisioning.iothub_hostname", &iothub_hostname)?;
            let device_id = raw
                .device_id
                .filter(|id| !id.is_empty())
                .ok_or_else(|| ConfigError::invalid(loaded, "provisioning.device_id", "missing"))?;
            let auth = raw.authentication.ok_or_else(|| {
                ConfigError::invalid(loaded, "provisioning.authentication", "missing")
            })?;
            let authentication = match auth.method.as_str() {
                "sas" => {
                    for (key, present) in [
                        (
                            "provisioning.authentication.identity_cert",
                            auth.identity_cert.is_some(),
                        ),
                        (
                            "provisioning.authentication.identity_pk",
                            auth.identity_pk.is_some(),
                        ),
                        (
                            "provisioning.authentication.csr_subject",
                            auth.csr_subject.is_some(),
                        ),
                    ] {
                        unexpected(loaded, key, present, "method = \"sas\"")?;
                    }
                    ManualAuth::Sas {
                        key_id: credential_id(
                            loaded,
                            "provisioning.authentication.device_id_pk",
                            auth.device_id_pk.as_ref(),
                            "key://",
                        )?,
                        import: None,
                    }
                }
                "x509" => {
                    unexpected(
                        loaded,
                        "provisioning.authentication.device_id_pk",
                        auth.device_id_pk.is_some(),
                        "method = \"x509\"",
                    )?;
                    // CN is always the device ID; a DN table adds its other attributes.
                    let csr_subject = match &auth.csr_subject {
                        None | Some(toml::Value::String(_)) => {
                            vec![("CN".to_owned(), device_id.clone())]
                        }
                        Some(toml::Value::Table(table)) => dn_subject(
                            loaded,
                            "provisioning.authentication.csr_subject",
                            table,
                            Some(&device_id),
                        )?,
                        Some(_) => {
                            return Err(ConfigError::invalid(
                                loaded,
                                "provisioning.authentication.csr_subject",
                                "expected a CN string or a DN table",
                            ))
                        }
                    };
                    ManualAuth::X509 {
                        csr_subject,
                        cert_id: credential_id(
                            loaded,
                            "provisioning.authentication.identity_cert",
                            auth.identity_cert.as_ref(),
                            "cert://",
                        )?,
                        key_id: credential_id(
                            loaded,
                            "provisioning.authentication.identity_pk",
                            auth.identity_pk.as_ref(),
                            "key://",
                        )?,
                    }
                }
                other => {
                    return Err(ConfigError::invalid(
                        loaded,
                        "provisioning.authentication.method",
                        format!("unknown method {other:?} (expected \"sas\" or \"x509\")"),
                    ))
                }
            };
            Ok(Provisioning::Manual {
                iothub_hostname,
                device_id,
                local_gateway_hostname: raw.local_gateway_hostname,
                authentication,
            })
        }
        "dps" => {
            for (key, present) in manual_only {
                unexpected(loaded, key, present, "source = \"dps\"")?;
            }
            if raw.local_gateway_hostname.is_some() {
                return Err(ConfigError::invalid(
                    loaded,
                    "provisioning.local_gateway_hostname",
                    "DPS provisioning is not supported in nested mode (with local_gateway_hostname)",
                ));
            }
            let scope_id = match (raw.scope_id, raw.id_scope) {
                (Some(a), Some(b)) if a != b => {
                    return Err(ConfigError::invalid(
                        loaded,
                        "provisioning.id_scope",
                        "conflicts with provisioning.scope_id",
                    ))
                }
                (Some(scope), _) | (None, Some(scope)) if !scope.is_empty() => scope,
                _ => {
                    return Err(ConfigError::invalid(
                        loaded,
                        "provisioning.scope_id",
                        "missing (scope_id, alias id_scope)",
                    ))
                }
            };
            let global_endpoint = match raw.global_endpoint {
                None => DEFAULT_GLOBAL_ENDPOINT.to_owned(),
                Some(endpoint) => {
                    let authority = endpoint
                        .strip_prefix("https://")
                        .map(|rest| rest.split('/').next().unwrap_or(""))
                        .filter(|authority| crate::util::split_authority(authority).is_some())
                        .ok_or_else(|| {
                            ConfigError::invalid(
                                loaded,
                                "provisioning.global_endpoint",
                                format!("{endpoint:?} is not an https:// URL"),
                            )
                        })?;
                    format!("https://{authority}/")
                }
            };
            let payload = match raw.payload {
                None => None,
                Some(payload) => {
                    let path = file_uri_path(loaded, "provisioning.payload.uri", &payload.uri)?;
                    let text = std::fs::read(&path).map_err(|error| {
                        ConfigError::invalid(
                            loaded,
                            "provisioning.payload.uri",
                            format!("cannot read {}: {error}", path.display()),
                        )
                    })?;
                    Some(serde_json::from_slice(&text).map_err(|error| {
                        ConfigError::invalid(
                            loaded,
                            "provisioning.payload.uri",
                            format!("{} is not JSON: {error}", path.display()),
                        )
                    })?)
                }
            };
            let attestation = raw.attestation.ok_or_else(|| {
                ConfigError::invalid(loaded, "provisioning.attestation", "missing")
            })?;
            let registration_id = registration_id_value(
                loaded,
                "provisioning.attestation.registration_id",
                attestation.registration_id.as_ref(),
            )?;
            let csr_subject = match &attestation.registration_id {
                Some(toml::Value::Table(table)) => Some(dn_subject(
                    loaded,
                    "provisioning.attestation.registration_id",
                    table,
                    None,
                )?),
                _ => registration_id
                    .as_ref()
                    .map(|id| vec![("CN".to_owned(), id.clone())]),
            };
            // Fields only the X.509 method takes, and the registration ID the others require.
            let x509_only = [
                (
                    "provisioning.attestation.identity_cert",
                    attestation.identity_cert.is_some(),
                ),
                (
                    "provisioning.attestation.identity_pk",
                    attestation.identity_pk.is_some(),
                ),
                (
                    "provisioning.attestation.identity_auto_renew",
                    attestation.identity_auto_renew.is_some(),
                ),
            ];
            let required_registration_id = || {
                registration_id.clone().ok_or_else(|| {
                    ConfigError::invalid(
                        loaded,
                        "provisioning.attestation.registration_id",
                        "missing",
                    )
                })
            };
            let attestation = match attestation.method.as_str() {
                "symmetric_key" => {
                    for (key, present) in x509_only {
                        unexpected(loaded, key, present, "method = \"symmetric_key\"")?;
                    }
                    DpsAttestation::SymmetricKey {
                        registration_id: required_registration_id()?,
                        key_id: credential_id(
                            loaded,
                            "provisioning.attestation.symmetric_key",
                            attestation.symmetric_key.as_ref(),
                            "key://",
                        )?,
                    }
                }
                "x509" => {
                    unexpected(
                        loaded,
                        "provisioning.attestation.symmetric_key",
                        attestation.symmetric_key.is_some(),
                        "method = \"x509\"",
                    )?;
                    if let Some(renew) = &attestation.identity_auto_renew {
                        for (name, value) in [("threshold", &renew.threshold), ("retry", &renew.retry)] {
                            if config_common::renewal::Policy::parse(value).is_none() {
                                return Err(ConfigError::invalid(
                                    loaded,
                                    format!("provisioning.attestation.identity_auto_renew.{name}"),
                                    config_common::renewal::Policy::EXPECTED,
                                ));
                            }
                        }
                    }
                    DpsAttestation::X509 {
                        registration_id,
                        cert_id: credential_id(
                            loaded,
                            "provisioning.attestation.identity_cert",
                            attestation.identity_cert.as_ref(),
                            "cert://",
                        )?,
                        key_id: credential_id(
                            loaded,
                            "provisioning.attestation.identity_pk",
                            attestation.identity_pk.as_ref(),
                            "key://",
                        )?,
                        auto_renew: attestation.identity_auto_renew,
                        csr_subject,
                    }
                }
                "tpm" => {
                    let symmetric = (
                        "provisioning.attestation.symmetric_key",
                        attestation.symmetric_key.is_some(),
                    );
                    for (key, present) in x509_only.into_iter().chain([symmetric]) {
                        unexpected(loaded, key, present, "method = \"tpm\"")?;
                    }
                    DpsAttestation::Tpm {
                        registration_id: required_registration_id()?,
                    }
                }
                other => {
                    return Err(ConfigError::invalid(
                        loaded,
                        "provisioning.attestation.method",
                        format!(
                            "unknown method {other:?} (expected \"symmetric_key\", \"x509\" or \"tpm\")"
                        ),
                    ))
                }
            };
            let operational_cert = raw
                .operational_cert
                .map(|raw| operational_cert_from_raw(loaded, raw))
                .transpose()?;
            Ok(Provisioning::Dps {
                global_endpoint,
                scope_id,
                payload,
                attestation,
                operational_cert,
            })
        }
        other => Err(ConfigError::invalid(
            loaded,
            "provisioning.source",
            format!("unknown source {other:?} (expected \"manual\", \"dps\" or \"none\")"),
        )),
    }
}

/// A file holding a connection string must not be readable by group or others.
fn check_connection_string_file_mode(loaded: &Loaded) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    for path in loaded.files_defining("provisioning.connection_string") {
        if let Ok(metadata) = std::fs::metadata(&path) {
            if metadata.permissions().mode() & 0o077 != 0 {
                return Err(ConfigError::Invalid {
                    files: vec![path.clone()],
                    key: "provisioning.connection_string".to_owned(),
                    message: format!(
                        "{} holds a secret and must not be accessible by group or others (chmod 0600)",
                        path.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

impl Config {
    /// Validates a merged configuration table.
    pub fn from_loaded(loaded: &Loaded) -> Result<Config, ConfigError> {
        let raw: RawConfig = loaded.deserialize()?;
        let hostname = raw
            .hostname
            .filter(|name| !name.is_empty())
            .ok_or_else(|| ConfigError::invalid(loaded, "hostname", "missing"))?;
        let homedir = raw
            .homedir
            .ok_or_else(|| ConfigError::invalid(loaded, "homedir", "missing"))?;
        if !homedir.is_absolute() {
            return Err(ConfigError::invalid(
                loaded,
                "homedir",
                "must be an absolute path",
            ));
        }
        let max_requests = http_common::daemon::max_requests(loaded, raw.max_requests)?;
        let cloud_timeout_sec = raw.cloud_timeout_sec.unwrap_or(MIN_CLOUD_TIMEOUT_SECS);
        if cloud_timeout_sec < MIN_CLOUD_TIMEOUT_SECS {
            return Err(ConfigError::invalid(
                loaded,
                "cloud_timeout_sec",
                format!("must be at least {MIN_CLOUD_TIMEOUT_SECS}"),
            ));
        }
        let mut cloud_trusted_certs = Vec::new();
        for (index, uri) in raw.cloud_trusted_certs.iter().enumerate() {
            let key = format!("cloud_trusted_certs[{index}]");
            let path = file_uri_path(loaded, &key, uri)?;
            if let Err(error) = std::fs::metadata(&path) {
                return Err(ConfigError::invalid(
                    loaded,
                    key,
                    format!("cannot read {}: {error}", path.display()),
                ));
            }
            cloud_trusted_certs.push(path);
        }
        let provisioning = match raw.provisioning {
            Some(provisioning) => provisioning_from_raw(loaded, provisioning)?,
            None => return Err(ConfigError::invalid(loaded, "provisioning", "missing")),
        };
        let principals = principals_from_raw(loaded, raw.principal, &provisioning, &raw.localid)?;
        Ok(Config {
            hostname,
            homedir,
            prefer_module_identity_cache: raw.prefer_module_identity_cache,
            max_requests,
            cloud_timeout: Duration::from_secs(cloud_timeout_sec),
            cloud_retries: raw.cloud_retries.unwrap_or(1),
            trust_bundle_cert: raw
                .trust_bundle_cert
                .unwrap_or_else(|| "aziot-trust-bundle".to_owned()),
            cloud_trusted_certs,
            provisioning,
            principals,
            localid_domain: raw.localid.map(|localid| localid.domain),
            endpoint: http_common::daemon::listener_endpoint(
                loaded,
                "aziot_identityd",
                raw.endpoints.aziot_identityd,
                DEFAULT_ENDPOINT,
            )?,
            keyd_endpoint: http_common::daemon::peer_endpoint(
                loaded,
                "aziot_keyd",
                raw.endpoints.aziot_keyd,
                DEFAULT_KEYD_ENDPOINT,
            )?,
            certd_endpoint: http_common::daemon::peer_endpoint(
                loaded,
                "aziot_certd",
                raw.endpoints.aziot_certd,
                DEFAULT_CERTD_ENDPOINT,
            )?,
            tpmd_endpoint: http_common::daemon::peer_endpoint(
                loaded,
                "aziot_tpmd",
                raw.endpoints.aziot_tpmd,
                DEFAULT_TPMD_ENDPOINT,
            )?,
        })
    }
}

fn principals_from_raw(
    loaded: &Loaded,
    raw: Vec<RawPrincipal>,
    provisioning: &Provisioning,
    localid: &Option<RawLocalId>,
) -> Result<Vec<Principal>, ConfigError> {
    let mut principals: Vec<Principal> = Vec::new();
    for (index, raw) in raw.into_iter().enumerate() {
        let key = |field: &str| format!("principal[{index}].{field}");
        if raw.name.is_empty() {
            return Err(ConfigError::invalid(loaded, key("name"), "empty name"));
        }
        if principals.iter().any(|other| other.name == raw.name) {
            return Err(ConfigError::invalid(
                loaded,
                key("name"),
                format!("duplicate principal name {:?}", raw.name),
            ));
        }
        let names = match raw.idtype {
            None => None,
            Some(OneOrMany::One(one)) => Some(vec![one]),
            Some(OneOrMany::Many(many)) => Some(many),
        };
        let id_type = match names {
            None => None,
            Some(names) => {
                let mut types = Vec::new();
                for name in names {
                    let id_type = match name.as_str() {
                        "device" => IdType::Device,
                        "module" => IdType::Module,
                        "local" => IdType::Local,
                        other => {
                            return Err(ConfigError::invalid(
                                loaded,
                                key("idtype"),
                                format!(
                                    "unknown idtype {other:?} (expected device, module or local)"
                                ),
                            ))
                        }
                    };
                    if !types.contains(&id_type) {
                        types.push(id_type);
                    }
                }
                Some(types)
            }
        };
        let types = id_type.as_deref().unwrap_or(&[]);
        let is_local = types.contains(&IdType::Local);
        if is_local && localid.is_none() {
            return Err(ConfigError::invalid(
                loaded,
                key("idtype"),
                "a local principal needs [localid] domain",
            ));
        }
        let local_attributes = match raw.localid {
            Some(_) if !is_local => {
                return Err(ConfigError::invalid(
                    loaded,
                    key("localid"),
                    "localid is only valid on principals whose idtype includes local",
                ))
            }
            Some(options) => {
                if options.id_type != "x509" {
                    return Err(ConfigError::invalid(
                        loaded,
                        key("localid.type"),
                        "expected \"x509\"",
                    ));
                }
                let attributes = options.attributes.unwrap_or_else(|| "client".to_owned());
                if attributes != "client" && attributes != "server" {
                    return Err(ConfigError::invalid(
                        loaded,
                        key("localid.attributes"),
                        "expected \"client\" or \"server\"",
                    ));
                }
                Some(attributes)
            }
            None if is_local => Some("client".to_owned()),
            None => None,
        };
        if matches!(provisioning, Provisioning::None)
            && (types.contains(&IdType::Device) || types.contains(&IdType::Module))
        {
            return Err(ConfigError::invalid(
                loaded,
                key("idtype"),
                "device and module identities need provisioning other than source = \"none\"",
            ));
        }
        if id_type.is_none() && principals.iter().any(|other| other.id_type.is_none()) {
            log::warn!(
                "principal[{index}] ({:?}) has no idtype but an earlier principal is already the daemon; it is ignored",
                raw.name
            );
        }
        principals.push(Principal {
            uid: raw.uid,
            name: raw.name,
            id_type,
            local_attributes,
        });
    }
    Ok(principals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let table: toml::Table = text.parse().unwrap();
        let loaded = Loaded {
            table: table.clone(),
            sources: vec![(PathBuf::from("/etc/identityd/config.toml"), table)],
        };
        Config::from_loaded(&loaded).map_err(|error| error.to_string())
    }

    const BASE: &str = "hostname = \"h\"\nhomedir = \"/var/lib/id\"\n";

    #[test]
    fn a_csr_subject_dn_keeps_its_attributes_and_the_device_id_as_cn() {
        let manual = |subject: &str| {
            parse(&format!(
                "{BASE}[provisioning]\nsource = \"manual\"\niothub_hostname = \"hub\"\ndevice_id = \"dev\"\n\
                 [provisioning.authentication]\nmethod = \"x509\"\nidentity_cert = \"c\"\nidentity_pk = \"k\"\n\
                 csr_subject = {subject}\n"
            ))
        };
        let config = manual("{ CN = \"other\", o = \"Contoso\" }").unwrap();
        let Provisioning::Manual {
            authentication: ManualAuth::X509 { csr_subject, .. },
            ..
        } = config.provisioning
        else {
            panic!("manual X.509 expected");
        };
        assert_eq!(
            csr_subject,
            [("CN".into(), "dev".into()), ("O".into(), "Contoso".into())]
        );
        // An attribute no subject can carry is refused at load, naming the key.
        let error = manual("{ CN = \"dev\", FOO = \"x\" }").unwrap_err();
        assert!(
            error.contains("provisioning.authentication.csr_subject") && error.contains("FOO"),
            "{error}"
        );
    }

    #[test]
    fn seed_x509_example_is_accepted() {
        let config = parse(&format!(
            "{BASE}[provisioning]\nsource = \"dps\"\nscope_id = \"0ne00000000\"\n\
             [provisioning.attestation]\nmethod = \"x509\"\nidentity_cert = \"cert://device-id\"\n\
             identity_pk = \"key://device-id\"\n"
        ))
        .unwrap();
        assert_eq!(
            config.provisioning,
            Provisioning::Dps {
                global_endpoint: DEFAULT_GLOBAL_ENDPOINT.to_owned(),
                scope_id: "0ne00000000".to_owned(),
                payload: None,
                attestation: DpsAttestation::X509 {
                    registration_id: None,
                    cert_id: "device-id".to_owned(),
                    key_id: "device-id".to_owned(),
                    auto_renew: None,
                    csr_subject: None,
                },
                operational_cert: None,
            }
        );
        assert_eq!(config.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(config.cloud_timeout, Duration::from_secs(70));
    }

    #[test]
    fn operational_cert_settings() {
        let dps =
            "[provisioning]\nsource = \"dps\"\nscope_id = \"s\"\n[provisioning.attestation]\n\
                   method = \"symmetric_key\"\nregistration_id = \"r\"\nsymmetric_key = \"k\"\n";
        let config = parse(&format!("{BASE}{dps}[provisioning.operational_cert]\n")).unwrap();
        let Provisioning::Dps {
            operational_cert: Some(operational),
            ..
        } = &config.provisioning
        else {
            panic!("no operational cert: {:?}", config.provisioning);
        };
        assert_eq!(operational.cert_id, DEFAULT_OPERATIONAL_CERT_ID);
        assert_eq!(operational.key_id, DEFAULT_OPERATIONAL_CERT_ID);
        assert!(operational.auto_renew.rotate_key);
        assert_eq!(operational.auto_renew.threshold, "80%");
        // Without the table the provisioning digest is what it was before the table existed.
        let plain = parse(&format!("{BASE}{dps}")).unwrap();
        assert!(!serde_json::to_string(&plain.provisioning)
            .unwrap()
            .contains("operational_cert"));
        for (extra, key) in [
            (
                "[provisioning.operational_cert]\ncert = \"file:///x\"\n",
                "provisioning.operational_cert.cert",
            ),
            (
                "[provisioning.operational_cert]\nauto_renew = { threshold = \"100%\", retry = \"1%\" }\n",
                "provisioning.operational_cert.auto_renew.threshold",
            ),
            ("[provisioning.operational_cert]\nsurprise = 1\n", "surprise"),
        ] {
            let error = parse(&format!("{BASE}{dps}{extra}")).unwrap_err();
            assert!(error.contains(key), "{extra}: {error}");
        }
        let manual = "[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName=h;DeviceId=d;SharedAccessKey=YQ==\"\n\
                      [provisioning.operational_cert]\n";
        let error = parse(&format!("{BASE}{manual}")).unwrap_err();
        assert!(error.contains("provisioning.operational_cert"), "{error}");
    }

    #[test]
    fn manual_shapes() {
        let config = parse(&format!(
            "{BASE}[provisioning]\nsource = \"manual\"\niothub_hostname = \"localhost:8443\"\n\
             device_id = \"d1\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n"
        ))
        .unwrap();
        assert!(matches!(
            config.provisioning,
            Provisioning::Manual { ref iothub_hostname, authentication: ManualAuth::Sas { ref key_id, import: None }, .. }
                if iothub_hostname == "localhost:8443" && key_id == "device-id"
        ));
        let config = parse(&format!(
            "{BASE}[provisioning]\nsource = \"dps\"\nid_scope = \"s\"\nglobal_endpoint = \"https://localhost:9/x/y\"\n\
             [provisioning.attestation]\nmethod = \"symmetric_key\"\nregistration_id = \"r\"\nsymmetric_key = \"key://k\"\n"
        ))
        .unwrap();
        assert!(matches!(
            config.provisioning,
            Provisioning::Dps { ref global_endpoint, ref scope_id, .. }
                if global_endpoint == "https://localhost:9/" && scope_id == "s"
        ));
    }

    #[test]
    fn connection_strings() {
        let parsed =
            parse_connection_string("SharedAccessKey=AAEC;HostName=hub.net;x=y;DeviceId=d")
                .unwrap();
        assert_eq!(parsed.hub, "hub.net");
        assert_eq!(parsed.device_id, "d");
        assert_eq!(parsed.key, vec![0, 1, 2]);
        assert!(parse_connection_string("HostName=h;DeviceId=d").is_err());
        let error =
            parse_connection_string("HostName=h;DeviceId=d;SharedAccessKey=%%%").unwrap_err();
        assert!(!error.contains("%%%"));
    }

    #[test]
    fn invalid_configs_name_the_key() {
        let manual =
            "[provisioning]\nsource = \"manual\"\niothub_hostname = \"h\"\ndevice_id = \"d\"\n\
                      [provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"k\"\n";
        let cases = [
            (format!("homedir = \"/x\"\n{manual}"), "hostname"),
            (format!("{BASE}cloud_timeout_sec = 10\n{manual}"), "cloud_timeout_sec"),
            (format!("{BASE}surprise = 1\n{manual}"), "unknown field"),
            (
                format!("{BASE}[provisioning]\nsource = \"dps\"\nscope_id = \"s\"\n[provisioning.attestation]\nmethod = \"tpm\"\n"),
                "provisioning.attestation.registration_id",
            ),
            (
                format!("{BASE}[provisioning]\nsource = \"dps\"\nscope_id = \"s\"\n[provisioning.attestation]\nmethod = \"tpm\"\nregistration_id = \"r\"\nsymmetric_key = {{ value = \"YQ==\" }}\n"),
                "provisioning.attestation.symmetric_key",
            ),
            (
                format!("{BASE}[provisioning]\nsource = \"manual\"\niothub_hostname = \"h\"\ndevice_id = \"d\"\n\
                         [provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"file:///x\"\n"),
                "provisioning.authentication.device_id_pk",
            ),
            (
                format!("{BASE}[provisioning]\nsource = \"dps\"\nscope_id = \"s\"\nlocal_gateway_hostname = \"p\"\n\
                         [provisioning.attestation]\nmethod = \"symmetric_key\"\nregistration_id = \"r\"\nsymmetric_key = \"k\"\n"),
                "nested mode",
            ),
            (
                format!("{BASE}[provisioning]\nsource = \"none\"\n[[principal]]\nuid = 1\nname = \"m\"\nidtype = \"module\"\n"),
                "principal[0].idtype",
            ),
            (
                format!("{BASE}{manual}[[principal]]\nuid = 1\nname = \"m\"\n[[principal]]\nuid = 2\nname = \"m\"\n"),
                "duplicate principal name",
            ),
            (
                format!("{BASE}{manual}[[principal]]\nuid = 1\nname = \"m\"\nidtype = [\"local\"]\n"),
                "[localid]",
            ),
            (
                format!("{BASE}{manual}[[principal]]\nuid = 1\nname = \"m\"\nidtype = [\"module\"]\nlocalid = {{ type = \"x509\" }}\n"),
                "principal[0].localid",
            ),
            (
                format!("{BASE}[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName=h;DeviceId=d;SharedAccessKey=AA==\"\ndevice_id = \"d\"\n"),
                "provisioning.device_id",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(&text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.contains("/etc/identityd/config.toml"), "{error}");
        }
    }

    #[test]
    fn principals_accept_a_single_idtype_string() {
        let config = parse(&format!(
            "{BASE}[provisioning]\nsource = \"manual\"\niothub_hostname = \"h\"\ndevice_id = \"d\"\n\
             [provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"k\"\n\
             [[principal]]\nuid = 1001\nname = \"hostmodule1\"\nidtype = \"module\"\n\
             [[principal]]\nuid = 1002\nname = \"aziot-edge\"\n"
        ))
        .unwrap();
        assert_eq!(config.principals[0].id_type, Some(vec![IdType::Module]));
        assert_eq!(config.principals[1].id_type, None);
    }

    #[test]
    fn digest_changes_with_settings() {
        let a = Provisioning::None.digest();
        let b = Provisioning::Manual {
            iothub_hostname: "h".into(),
            device_id: "d".into(),
            local_gateway_hostname: None,
            authentication: ManualAuth::Sas {
                key_id: "k".into(),
                import: Some(vec![1]),
            },
        }
        .digest();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
    }
}
