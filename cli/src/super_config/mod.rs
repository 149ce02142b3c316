//! The super-config (`/etc/aziot/config.toml`) and its mapping to one drop-in per daemon.
//!
//! [`plan`] parses the file strictly (unknown keys are errors), validates it (every error names
//! the key, never the value of a secret) and returns a [`Plan`]: the `config.d/00-super.toml`
//! table of keyd, certd, identityd, the TPM service (tpmd, served by keyd) and, when the file
//! has IoT Edge keys, edged, plus the secret files (decoded inline keys) to put under
//! `/var/secrets/aziot/keyd/`. Writing the plan is
//! [`crate::apply`]'s job; this module touches no file except the ones the super-config points
//! at (`additional_info`, `imported_master_encryption_key`).
//!
//! Well-known IDs and the mapping rules follow the configuration spec (config.md sections 3.2
//! to 3.4); the per-daemon outputs are exactly what the daemons' own parsers accept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

use crate::error::{ApplyError, Problem};

mod edge;
mod provisioning;
mod raw;
mod tpm;

use edge::{map_agent, map_edge_ca};
use provisioning::map_provisioning;
use raw::*;

/// Where `config apply` puts secrets (decoded inline keys, imported keys).
pub const SECRETS_DIR: &str = "/var/secrets/aziot/keyd";
/// keyd's state folder.
pub const KEYD_HOMEDIR: &str = "/var/lib/aziot/keyd";
/// certd's state folder.
pub const CERTD_HOMEDIR: &str = "/var/lib/aziot/certd";
/// identityd's state folder.
pub const IDENTITYD_HOMEDIR: &str = "/var/lib/aziot/identityd";
/// edged's state folder.
pub const EDGED_HOMEDIR: &str = "/var/lib/aziot/edged";
/// The DPS endpoint used when `global_endpoint` is not set.
pub const DEFAULT_DPS_ENDPOINT: &str = "https://global.azure-devices-provisioning.net/";
/// edgeAgent's image when `[agent.config] image` is not set.
pub const DEFAULT_AGENT_IMAGE: &str = "mcr.microsoft.com/azureiotedge-agent:1.6";
/// The Docker socket when `[moby_runtime] uri` is not set.
pub const DEFAULT_MOBY_URI: &str = "unix:///var/run/docker.sock";

/// A secret file to write under [`SECRETS_DIR`] (0600, owner keyd's user).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretFile {
    /// The file name inside [`SECRETS_DIR`].
    pub file_name: String,
    /// The bytes (decoded key material).
    pub contents: Vec<u8>,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SecretFile")
            .field("file_name", &self.file_name)
            .field("contents", &format_args!("<{} bytes>", self.contents.len()))
            .finish()
    }
}

/// What `config apply` writes.
#[derive(Clone, Debug)]
pub struct Plan {
    /// keyd's `00-super.toml`.
    pub keyd: Table,
    /// certd's `00-super.toml`.
    pub certd: Table,
    /// identityd's `00-super.toml`.
    pub identityd: Table,
    /// The TPM service's `00-super.toml` (`/etc/aziot/tpmd/`, read by keyd); often empty.
    pub tpmd: Table,
    /// edged's `00-super.toml`, when the super-config has IoT Edge keys.
    pub edged: Option<Table>,
    /// Secret files for keyd.
    pub secrets: Vec<SecretFile>,
    /// Problems that do not stop the apply (printed by the caller).
    pub warnings: Vec<String>,
    /// The device hostname written into identityd (and edged).
    pub hostname: String,
    /// The Docker socket (for the hostname-change guard).
    pub moby_uri: String,
}

/// What [`plan`] needs from the machine.
pub trait Environment {
    /// The uid of a service user, if known.
    fn uid(&self, user: &str) -> Option<u32>;
    /// The machine's hostname (used when the super-config has none).
    fn hostname(&self) -> String;
}

impl Environment for crate::users::UidResolver {
    fn uid(&self, user: &str) -> Option<u32> {
        crate::users::UidResolver::uid(self, user)
    }

    fn hostname(&self) -> String {
        machine_hostname()
    }
}

/// The kernel's hostname.
pub fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

// ----------------------------------------------------------------------------------------------
// Small helpers.

/// Deserializes `value` strictly; the error names `prefix` plus the path inside `value`.
fn parse_at<T: DeserializeOwned>(value: Value, prefix: &str) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let inner = error.path().to_string();
        let key = match (prefix.is_empty(), inner.as_str()) {
            (true, ".") => "(top level)".to_owned(),
            (true, _) => inner.clone(),
            (false, ".") => prefix.to_owned(),
            (false, _) => format!("{prefix}.{inner}"),
        };
        Problem::new(key, error.into_inner().message().to_owned())
    })
}

fn string(value: impl Into<String>) -> Value {
    Value::String(value.into())
}

fn strings<S: AsRef<str>>(values: &[S]) -> Value {
    Value::Array(values.iter().map(|value| string(value.as_ref())).collect())
}

fn push_unique(list: &mut Vec<String>, id: impl Into<String>) {
    let id = id.into();
    if !list.contains(&id) {
        list.push(id);
    }
}

fn secret_uri(file_name: &str) -> String {
    format!("file://{SECRETS_DIR}/{file_name}")
}

/// Checks a `file:///abs` URI.
fn check_file_uri(uri: &str, key: &str) -> Result<(), Problem> {
    match uri.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => Ok(()),
        _ => Err(Problem::new(key, "expected an absolute file:///path URI")),
    }
}

/// Checks a private key location: `file:///abs` or `pkcs11:`.
fn check_key_uri(uri: &str, key: &str) -> Result<(), Problem> {
    if uri.starts_with("pkcs11:") {
        return Ok(());
    }
    check_file_uri(uri, key)
        .map_err(|_| Problem::new(key, "expected a file:///path or pkcs11: URI"))
}

/// keyd's spelling of a key location (pkcs11 labels re-encoded).
fn keyd_uri(uri: &str, key: &str) -> Result<String, Problem> {
    if uri.starts_with("pkcs11:") {
        crate::pkcs11_uri::normalize(uri)
            .ok_or_else(|| Problem::new(key, "the pkcs11: URI's object label is not UTF-8"))
    } else {
        Ok(uri.to_owned())
    }
}

fn positive(value: i64, key: &str) -> Result<i64, Problem> {
    if value > 0 {
        Ok(value)
    } else {
        Err(Problem::new(key, "must be greater than 0"))
    }
}

/// Checks a renewal policy string: `N%` (1–99), `Nmin` or `Nday`, N > 0 (config-common's
/// policy language, the one the daemons read).
fn check_policy(value: &str, key: &str) -> Result<(), Problem> {
    match config_common::renewal::Policy::parse(value) {
        Some(_) => Ok(()),
        None => Err(Problem::new(
            key,
            format!(
                "{value:?} is not a renewal policy (N% with 1 <= N <= 99, Nmin or Nday, N > 0)"
            ),
        )),
    }
}

/// A validated renewal policy.
#[derive(Clone, Debug, PartialEq, Eq)]
struct AutoRenew {
    rotate_key: bool,
    threshold: String,
    retry: String,
}

impl AutoRenew {
    fn parse(raw: &RawAutoRenew, key: &str) -> Result<AutoRenew, Problem> {
        let threshold = raw.threshold.clone().unwrap_or_else(|| "80%".to_owned());
        let retry = raw.retry.clone().unwrap_or_else(|| "4%".to_owned());
        check_policy(&threshold, &format!("{key}.threshold"))?;
        check_policy(&retry, &format!("{key}.retry"))?;
        Ok(AutoRenew {
            rotate_key: raw.rotate_key.unwrap_or(true),
            threshold,
            retry,
        })
    }

    /// The policy of an Edge CA whose `[edge_ca.auto_renew]` is absent (quickstart or issued;
    /// the reference renews both by default).
    fn quickstart_default() -> AutoRenew {
        AutoRenew {
            rotate_key: true,
            threshold: "80%".to_owned(),
            retry: "4%".to_owned(),
        }
    }

    fn table(&self) -> Value {
        let mut table = Table::new();
        table.insert("rotate_key".into(), Value::Boolean(self.rotate_key));
        table.insert("threshold".into(), string(&self.threshold));
        table.insert("retry".into(), string(&self.retry));
        Value::Table(table)
    }
}

/// Whether `name` is a valid RFC 1123 host name.
pub fn is_rfc1123_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Decodes standard base64 with or without padding.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(text.trim())
        .ok()
        .filter(|bytes| !bytes.is_empty())
}

/// The parts of a device connection string `config apply` uses.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    /// `HostName`.
    pub hostname: String,
    /// `DeviceId`.
    pub device_id: String,
    /// The decoded `SharedAccessKey`.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ConnectionString")
            .field("hostname", &self.hostname)
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// Parses `HostName=<hub>;DeviceId=<id>;SharedAccessKey=<b64>` (any order, other components
/// ignored). Errors name the component, never its value.
pub fn parse_connection_string(text: &str, key: &str) -> Result<ConnectionString, Problem> {
    let mut components = BTreeMap::new();
    for part in text
        .trim()
        .split(';')
        .filter(|part| !part.trim().is_empty())
    {
        let Some((name, value)) = part.split_once('=') else {
            return Err(Problem::new(
                key,
                "not a connection string: every component must be Name=value",
            ));
        };
        components.insert(name.trim().to_owned(), value.trim().to_owned());
    }
    let component = |name: &str| {
        components
            .get(name)
            .filter(|value| !value.is_empty())
            .cloned()
            .ok_or_else(|| Problem::new(key, format!("the {name} component is missing or empty")))
    };
    let hostname = component("HostName")?;
    let device_id = component("DeviceId")?;
    let key_bytes = decode_base64(&component("SharedAccessKey")?)
        .ok_or_else(|| Problem::new(key, "the SharedAccessKey component is not valid base64"))?;
    Ok(ConnectionString {
        hostname,
        device_id,
        key: key_bytes,
    })
}

// ----------------------------------------------------------------------------------------------
// The mapping.

/// A symmetric key: inline bytes (written to a secrets file) or a URI.
enum SymmetricKey {
    Inline(Vec<u8>),
    Uri(String),
}

fn parse_symmetric_key(value: Value, key: &str) -> Result<SymmetricKey, Problem> {
    let raw: RawSymmetricKey = parse_at(value, key)?;
    match (raw.value, raw.uri) {
        (Some(_), Some(_)) => Err(Problem::new(key, "set either value or uri, not both")),
        (None, None) => Err(Problem::new(
            key,
            "expected { value = \"<base64>\" } or { uri = \"file:///...\" | \"pkcs11:...\" }",
        )),
        (Some(text), None) => decode_base64(&text)
            .map(SymmetricKey::Inline)
            .ok_or_else(|| Problem::new(format!("{key}.value"), "not valid base64 (or empty)")),
        (None, Some(uri)) => {
            check_key_uri(&uri, &format!("{key}.uri"))?;
            Ok(SymmetricKey::Uri(uri))
        }
    }
}

/// A certificate: an existing file or issuance options.
enum CertSpec {
    File(String),
    Issued(Box<RawIssuance>),
}

fn parse_cert(value: Value, key: &str) -> Result<CertSpec, Problem> {
    match value {
        Value::String(uri) => {
            check_file_uri(&uri, key)?;
            Ok(CertSpec::File(uri))
        }
        Value::Table(_) => Ok(CertSpec::Issued(Box::new(parse_at(value, key)?))),
        _ => Err(Problem::new(
            key,
            "expected a file:// URI or an issuance table { method = ..., ... }",
        )),
    }
}

/// The global `[cert_issuance.est]` facts per-cert EST options need.
#[derive(Default)]
struct EstGlobal {
    configured: bool,
    urls: BTreeMap<String, String>,
}

struct Mapper {
    keyd_preloaded: BTreeMap<String, String>,
    certd_preloaded: BTreeMap<String, Value>,
    certd_issuance: Table,
    keyd_identityd: Vec<String>,
    keyd_certd: Vec<String>,
    certd_identityd: Vec<String>,
    secrets: Vec<SecretFile>,
    warnings: Vec<String>,
    local_ca: bool,
    est: EstGlobal,
}

impl Mapper {
    fn warn(&mut self, key: &str, message: impl std::fmt::Display) {
        self.warnings.push(format!("`{key}`: {message}"));
    }

    fn preload_key(&mut self, id: &str, uri: &str, key: &str) -> Result<(), Problem> {
        check_key_uri(uri, key)?;
        self.keyd_preloaded
            .insert(id.to_owned(), keyd_uri(uri, key)?);
        Ok(())
    }

    fn preload_cert(&mut self, id: &str, uri: &str, key: &str) -> Result<(), Problem> {
        check_file_uri(uri, key)?;
        self.certd_preloaded.insert(id.to_owned(), string(uri));
        Ok(())
    }

    fn check_url(&mut self, url: &str, key: &str) {
        if url.starts_with("http://") {
            self.warn(key, "EST over plain http:// sends credentials unencrypted");
        }
    }

    /// Builds certd's `[cert_issuance.<cert_id>]` from issuance options found at `key`.
    fn issuance(
        &mut self,
        cert_id: &str,
        raw: &RawIssuance,
        key: &str,
        default_common_name: Option<&str>,
    ) -> Result<Table, Problem> {
        let mut options = Table::new();
        let method = raw.method.as_deref().ok_or_else(|| {
            Problem::new(
                format!("{key}.method"),
                "is required (est, local_ca or self_signed)",
            )
        })?;
        match method {
            "est" | "local_ca" | "self_signed" => {}
            other => {
                return Err(Problem::new(
                    format!("{key}.method"),
                    format!("unknown method {other:?} (expected est, local_ca or self_signed)"),
                ))
            }
        }
        options.insert("method".into(), string(method));
        match (&raw.common_name, &raw.subject) {
            (Some(_), Some(_)) => {
                return Err(Problem::new(
                    format!("{key}.subject"),
                    format!("{key}.common_name and {key}.subject cannot both be set"),
                ))
            }
            (Some(common_name), None) => {
                options.insert("common_name".into(), string(common_name));
            }
            (None, Some(subject)) => {
                if subject.is_empty() {
                    return Err(Problem::new(
                        format!("{key}.subject"),
                        "must name at least one attribute",
                    ));
                }
                let table: Table = subject
                    .iter()
                    .map(|(name, value)| (name.clone(), string(value)))
                    .collect();
                options.insert("subject".into(), Value::Table(table));
            }
            (None, None) => {
                if let Some(common_name) = default_common_name {
                    options.insert("common_name".into(), string(common_name));
                }
            }
        }
        if let Some(days) = raw.expiry_days {
            if days <= 0 {
                return Err(Problem::new(
                    format!("{key}.expiry_days"),
                    "expiry_days must be greater than 0",
                ));
            }
            options.insert("expiry_days".into(), Value::Integer(days));
        }
        let est_fields = [
            ("url", raw.url.is_some()),
            ("username", raw.username.is_some()),
            ("password", raw.password.is_some()),
            ("identity_cert", raw.identity_cert.is_some()),
            ("identity_pk", raw.identity_pk.is_some()),
            (
                "bootstrap_identity_cert",
                raw.bootstrap_identity_cert.is_some(),
            ),
            ("bootstrap_identity_pk", raw.bootstrap_identity_pk.is_some()),
        ];
        match method {
            "est" => {
                let url = raw
                    .url
                    .clone()
                    .or_else(|| self.est.urls.get(cert_id).cloned())
                    .or_else(|| self.est.urls.get("default").cloned());
                match (&raw.url, url) {
                    (_, None) => {
                        return Err(Problem::new(
                            format!("{key}.url"),
                            format!(
                                "no EST URL for cert {cert_id:?}: set url here, or \
                                 [cert_issuance.est.urls] {cert_id} or default"
                            ),
                        ))
                    }
                    (Some(url), Some(_)) => {
                        self.check_url(url, &format!("{key}.url"));
                        options.insert("url".into(), string(url));
                    }
                    (None, Some(_)) => {}
                }
                if let Some(username) = &raw.username {
                    options.insert("username".into(), string(username));
                }
                if let Some(password) = &raw.password {
                    options.insert("password".into(), string(password));
                }
                self.est_identity(
                    &mut options,
                    &format!("-{cert_id}"),
                    key,
                    (&raw.identity_cert, &raw.identity_pk),
                    (&raw.bootstrap_identity_cert, &raw.bootstrap_identity_pk),
                    false,
                )?;
            }
            _ => {
                if let Some((field, _)) = est_fields.iter().find(|(_, present)| *present) {
                    return Err(Problem::new(
                        format!("{key}.{field}"),
                        "only allowed with method = \"est\"",
                    ));
                }
                if method == "local_ca" && !self.local_ca {
                    return Err(Problem::new(
                        format!("{key}.method"),
                        "method \"local_ca\" needs [cert_issuance.local_ca]",
                    ));
                }
                if method == "self_signed" {
                    // certd signs with the key pair named like the cert.
                    push_unique(&mut self.keyd_certd, cert_id);
                }
            }
        }
        Ok(options)
    }

    /// Maps an EST identity (existing cert + key) or bootstrap identity to the IDs
    /// `est-id<suffix>` / `est-bootstrap-id<suffix>` and writes them into `options`.
    fn est_identity(
        &mut self,
        options: &mut Table,
        suffix: &str,
        key: &str,
        identity: (&Option<String>, &Option<String>),
        bootstrap: (&Option<String>, &Option<String>),
        rotate_key: bool,
    ) -> Result<(), Problem> {
        let identity_id = format!("est-id{suffix}");
        let bootstrap_id = format!("est-bootstrap-id{suffix}");
        let has_identity = identity.0.is_some() || identity.1.is_some();
        let has_bootstrap = bootstrap.0.is_some() || bootstrap.1.is_some();
        if has_identity && has_bootstrap {
            return Err(Problem::new(
                format!("{key}.bootstrap_identity_cert"),
                "set either identity_cert/identity_pk or bootstrap_identity_cert/bootstrap_identity_pk, not both",
            ));
        }
        let pair = |cert: &Option<String>, pk: &Option<String>, prefix: &str| match (cert, pk) {
            (Some(cert), Some(pk)) => Ok(Some((cert.clone(), pk.clone()))),
            (None, None) => Ok(None),
            (Some(_), None) => Err(Problem::new(
                format!("{key}.{prefix}_pk"),
                "is required with the cert",
            )),
            (None, Some(_)) => Err(Problem::new(
                format!("{key}.{prefix}_cert"),
                "is required with the key",
            )),
        };
        if let Some((cert, pk)) = pair(identity.0, identity.1, "identity")? {
            self.preload_cert(&identity_id, &cert, &format!("{key}.identity_cert"))?;
            self.preload_key(&identity_id, &pk, &format!("{key}.identity_pk"))?;
            options.insert("identity_cert".into(), string(&identity_id));
            options.insert("identity_pk".into(), string(&identity_id));
            push_unique(&mut self.keyd_certd, &identity_id);
        }
        if let Some((cert, pk)) = pair(bootstrap.0, bootstrap.1, "bootstrap_identity")? {
            self.preload_cert(
                &bootstrap_id,
                &cert,
                &format!("{key}.bootstrap_identity_cert"),
            )?;
            self.preload_key(&bootstrap_id, &pk, &format!("{key}.bootstrap_identity_pk"))?;
            options.insert("bootstrap_identity_cert".into(), string(&bootstrap_id));
            options.insert("bootstrap_identity_pk".into(), string(&bootstrap_id));
            // The identity is enrolled with the bootstrap identity and kept dynamically.
            options.insert("identity_cert".into(), string(&identity_id));
            options.insert("identity_pk".into(), string(&identity_id));
            push_unique(&mut self.keyd_certd, &identity_id);
            push_unique(&mut self.keyd_certd, &bootstrap_id);
        }
        // certd renews an identity it enrolled with a bootstrap identity under a new key
        // `<id>-temp` (the reference grants it whether or not rotate_key is set).
        if rotate_key || has_bootstrap {
            push_unique(&mut self.keyd_certd, format!("{identity_id}-temp"));
        }
        Ok(())
    }
}

/// Parses and validates a super-config and maps it to the per-daemon drop-ins.
/// `path` is only used in error messages.
pub fn plan(text: &str, path: &Path, environment: &dyn Environment) -> Result<Plan, ApplyError> {
    let table: Table = text
        .parse()
        .map_err(|error: toml::de::Error| ApplyError::Parse {
            path: path.to_owned(),
            message: error.message().to_owned(),
        })?;
    let invalid = |problem: Problem| ApplyError::Invalid {
        path: path.to_owned(),
        problem,
    };
    let raw: RawSuperConfig = parse_at(Value::Table(table), "").map_err(invalid)?;
    map(raw, environment).map_err(|error| match error {
        MapError::Problem(problem) => invalid(problem),
        MapError::Other(error) => error,
    })
}

enum MapError {
    Problem(Problem),
    Other(ApplyError),
}

impl From<Problem> for MapError {
    fn from(problem: Problem) -> Self {
        MapError::Problem(problem)
    }
}

impl From<ApplyError> for MapError {
    fn from(error: ApplyError) -> Self {
        MapError::Other(error)
    }
}

fn map(raw: RawSuperConfig, environment: &dyn Environment) -> Result<Plan, MapError> {
    let edge = raw.allow_elevated_docker_permissions.is_some()
        || raw.auto_reprovisioning_mode.is_some()
        || raw.iotedge_max_requests.is_some()
        || raw.additional_info.is_some()
        || raw.imported_master_encryption_key.is_some()
        || raw.agent.is_some()
        || raw.connect.is_some()
        || raw.listen.is_some()
        || raw.watchdog.is_some()
        || raw.edge_ca.is_some()
        || raw.image_garbage_collection.is_some()
        || raw.moby_runtime.is_some();
    let mut mapper = Mapper {
        keyd_preloaded: BTreeMap::new(),
        certd_preloaded: BTreeMap::new(),
        certd_issuance: Table::new(),
        keyd_identityd: vec!["aziot_identityd_master_id".to_owned()],
        keyd_certd: Vec::new(),
        certd_identityd: Vec::new(),
        secrets: Vec::new(),
        warnings: Vec::new(),
        local_ca: false,
        est: EstGlobal::default(),
    };

    // Top-level identity settings.
    let hostname = raw
        .hostname
        .clone()
        .unwrap_or_else(|| environment.hostname());
    if !is_rfc1123_hostname(&hostname) {
        mapper.warn(
            "hostname",
            format!("{hostname:?} is not a valid RFC 1123 host name; modules may fail TLS to it"),
        );
    }
    if let Some(timeout) = raw.cloud_timeout_sec {
        if timeout < 70 {
            return Err(Problem::new(
                "cloud_timeout_sec",
                "cloud_timeout_sec must be at least 70 seconds",
            )
            .into());
        }
    }
    if let Some(retries) = raw.cloud_retries {
        if retries < 0 || retries > i64::from(u32::MAX) {
            return Err(Problem::new("cloud_retries", "must be a non-negative integer").into());
        }
    }
    let mut max_requests = BTreeMap::new();
    if let Some(limits) = &raw.aziot_max_requests {
        for (name, value) in [
            ("keyd", limits.keyd),
            ("certd", limits.certd),
            ("tpmd", limits.tpmd),
            ("identityd", limits.identityd),
        ] {
            let key = format!("aziot_max_requests.{name}");
            let value = value.ok_or_else(|| {
                Problem::new(&key, "is required when [aziot_max_requests] is present (keyd, certd, tpmd and identityd)")
            })?;
            max_requests.insert(name, positive(value, &key)?);
        }
    }

    // [cert_issuance]: local CA and global EST settings first, per-cert options refer to them.
    if let Some(cert_issuance) = &raw.cert_issuance {
        if let Some(est) = &cert_issuance.est {
            mapper.est.configured = true;
            mapper.est.urls = est.urls.clone();
            let mut table = Table::new();
            let mut trusted = Vec::new();
            for (index, uri) in est.trusted_certs.iter().enumerate() {
                let id = format!("est-server-ca-{}", index + 1);
                mapper.preload_cert(
                    &id,
                    uri,
                    &format!("cert_issuance.est.trusted_certs[{index}]"),
                )?;
                trusted.push(id);
            }
            if !trusted.is_empty() {
                table.insert("trusted_certs".into(), strings(&trusted));
            }
            let auth = est.auth.as_ref();
            let empty = RawEstAuth::default();
            let auth = auth.unwrap_or(&empty);
            if let Some(username) = &auth.username {
                table.insert("username".into(), string(username));
            }
            if let Some(password) = &auth.password {
                table.insert("password".into(), string(password));
            }
            let renew = match &est.identity_auto_renew {
                Some(renew) => Some(AutoRenew::parse(
                    renew,
                    "cert_issuance.est.identity_auto_renew",
                )?),
                None => None,
            };
            mapper.est_identity(
                &mut table,
                "",
                "cert_issuance.est.auth",
                (&auth.identity_cert, &auth.identity_pk),
                (&auth.bootstrap_identity_cert, &auth.bootstrap_identity_pk),
                renew.as_ref().is_some_and(|renew| renew.rotate_key),
            )?;
            if let Some(renew) = renew {
                table.insert("identity_auto_renew".into(), renew.table());
            }
            if !est.urls.is_empty() {
                for (id, url) in &est.urls {
                    mapper.check_url(url, &format!("cert_issuance.est.urls.{id}"));
                }
                let urls: Table = est
                    .urls
                    .iter()
                    .map(|(id, url)| (id.clone(), string(url)))
                    .collect();
                table.insert("urls".into(), Value::Table(urls));
            }
            mapper
                .certd_issuance
                .insert("est".into(), Value::Table(table));
        }
        if let Some(local_ca) = cert_issuance.local_ca.clone() {
            let key = "cert_issuance.local_ca";
            let Value::Table(mut local_ca_table) = local_ca else {
                return Err(Problem::new(key, "expected a table").into());
            };
            mapper.local_ca = true;
            match local_ca_table.remove("cert") {
                Some(Value::String(cert)) => {
                    let pk = match local_ca_table.remove("pk") {
                        Some(Value::String(pk)) => pk,
                        _ => {
                            return Err(Problem::new(
                                format!("{key}.pk"),
                                "is required with a preloaded cert (file:// or pkcs11: URI)",
                            )
                            .into())
                        }
                    };
                    if let Some(extra) = local_ca_table.keys().next() {
                        return Err(Problem::new(
                            format!("{key}.{extra}"),
                            "unknown field (a preloaded local CA has only cert and pk)",
                        )
                        .into());
                    }
                    mapper.preload_cert("local-ca", &cert, &format!("{key}.cert"))?;
                    mapper.preload_key("local-ca", &pk, &format!("{key}.pk"))?;
                }
                Some(issued @ Value::Table(_)) => {
                    if let Some(extra) = local_ca_table.keys().next() {
                        return Err(Problem::new(format!("{key}.{extra}"), "unknown field").into());
                    }
                    let options: RawIssuance = parse_at(issued, &format!("{key}.cert"))?;
                    let issued = issue_local_ca(&mut mapper, &options, &format!("{key}.cert"))?;
                    mapper
                        .certd_issuance
                        .insert("local-ca".into(), Value::Table(issued));
                }
                Some(_) => {
                    return Err(Problem::new(
                        format!("{key}.cert"),
                        "expected a file:// URI or an issuance table",
                    )
                    .into())
                }
                None => {
                    // Issuance options directly in [cert_issuance.local_ca].
                    let options: RawIssuance = parse_at(Value::Table(local_ca_table), key)?;
                    let issued = issue_local_ca(&mut mapper, &options, key)?;
                    mapper
                        .certd_issuance
                        .insert("local-ca".into(), Value::Table(issued));
                }
            }
            push_unique(&mut mapper.keyd_certd, "local-ca");
            let mut table = Table::new();
            table.insert("cert".into(), string("local-ca"));
            table.insert("pk".into(), string("local-ca"));
            mapper
                .certd_issuance
                .insert("local_ca".into(), Value::Table(table));
        }
    }

    // [provisioning].
    let provisioning_raw = raw.provisioning.ok_or_else(|| {
        Problem::new(
            "provisioning",
            "is required ([provisioning] source = \"manual\" | \"dps\" | \"none\")",
        )
    })?;
    let provisioning = map_provisioning(
        &mut mapper,
        provisioning_raw,
        raw.local_gateway_hostname.as_deref(),
    )?;

    // User-preloaded keys and certs (generated IDs win, with a warning).
    for (id, uri) in &raw.preloaded_keys {
        let key = format!("preloaded_keys.{id}");
        check_key_uri(uri, &key)?;
        if mapper.keyd_preloaded.contains_key(id) {
            mapper.warn(
                &key,
                format!("{id:?} is also generated from other settings; the generated entry wins"),
            );
            continue;
        }
        let normalized = keyd_uri(uri, &key)?;
        mapper.keyd_preloaded.insert(id.clone(), normalized);
    }
    for (id, value) in &raw.preloaded_certs {
        let key = format!("preloaded_certs.{id}");
        match value {
            Value::String(uri) => check_file_uri(uri, &key)?,
            Value::Array(items) if items.iter().all(Value::is_str) => {}
            _ => {
                return Err(
                    Problem::new(&key, "expected a file:// URI or a list of cert IDs").into(),
                )
            }
        }
        if mapper.certd_preloaded.contains_key(id) {
            mapper.warn(
                &key,
                format!("{id:?} is also generated from other settings; the generated entry wins"),
            );
            continue;
        }
        mapper.certd_preloaded.insert(id.clone(), value.clone());
    }

    // Trust bundles.
    if let Some(uri) = &raw.trust_bundle_cert {
        mapper.preload_cert("trust-bundle-user", uri, "trust_bundle_cert")?;
    }
    let mut aziot_bundle = Vec::new();
    if edge {
        aziot_bundle.push("aziot-edged-ca");
    }
    if raw.trust_bundle_cert.is_some() {
        aziot_bundle.push("trust-bundle-user");
    }
    if !aziot_bundle.is_empty() {
        mapper
            .certd_preloaded
            .insert("aziot-trust-bundle".into(), strings(&aziot_bundle));
    }

    // IoT Edge.
    let mut keyd_edged = Vec::new();
    let mut certd_edged = Vec::new();
    let mut edged = None;
    let moby_uri = raw
        .moby_runtime
        .as_ref()
        .and_then(|moby| moby.uri.clone())
        .unwrap_or_else(|| DEFAULT_MOBY_URI.to_owned());
    if edge {
        let mut edged_table = Table::new();
        edged_table.insert("hostname".into(), string(&hostname));
        edged_table.insert("homedir".into(), string(EDGED_HOMEDIR));
        edged_table.insert(
            "trust_bundle_cert".into(),
            string("aziot-edged-trust-bundle"),
        );
        let mut edge_bundle = vec!["aziot-edged-ca"];
        if raw.trust_bundle_cert.is_some() {
            edge_bundle.push("trust-bundle-user");
        }
        mapper
            .certd_preloaded
            .insert("aziot-edged-trust-bundle".into(), strings(&edge_bundle));

        let mode = raw.auto_reprovisioning_mode.as_deref().unwrap_or("Dynamic");
        if !["Dynamic", "AlwaysOnStartup", "OnErrorOnly"].contains(&mode) {
            return Err(Problem::new(
                "auto_reprovisioning_mode",
                format!("unknown mode {mode:?} (expected Dynamic, AlwaysOnStartup or OnErrorOnly)"),
            )
            .into());
        }
        edged_table.insert("auto_reprovisioning_mode".into(), string(mode));
        edged_table.insert(
            "allow_elevated_docker_permissions".into(),
            Value::Boolean(raw.allow_elevated_docker_permissions.unwrap_or(true)),
        );
        if let Some(limits) = &raw.iotedge_max_requests {
            let management = positive(
                limits.management.unwrap_or(50),
                "iotedge_max_requests.management",
            )?;
            let workload = positive(
                limits.workload.unwrap_or(10),
                "iotedge_max_requests.workload",
            )?;
            if (management, workload) != (50, 10) {
                let mut table = Table::new();
                table.insert("management".into(), Value::Integer(management));
                table.insert("workload".into(), Value::Integer(workload));
                edged_table.insert("iotedge_max_requests".into(), Value::Table(table));
            }
        }
        if let Some(uri) = &raw.additional_info {
            check_file_uri(uri, "additional_info")?;
            let file = PathBuf::from(&uri["file://".len()..]);
            let text =
                std::fs::read_to_string(&file).map_err(|source| ApplyError::ReadReferenced {
                    key: "additional_info".into(),
                    path: file.clone(),
                    source,
                })?;
            let info: Table = text.parse().map_err(|error: toml::de::Error| {
                Problem::new(
                    "additional_info",
                    format!("{} is not TOML: {}", file.display(), error.message()),
                )
            })?;
            for (name, value) in &info {
                if !value.is_str() {
                    return Err(Problem::new(
                        "additional_info",
                        format!("{}: {name:?} must be a string", file.display()),
                    )
                    .into());
                }
            }
            edged_table.insert("additional_info".into(), Value::Table(info));
        }
        if let Some(path) = &raw.imported_master_encryption_key {
            let bytes = std::fs::read(path).map_err(|source| ApplyError::ReadReferenced {
                key: "imported_master_encryption_key".into(),
                path: path.clone(),
                source,
            })?;
            let file_name = "imported-master-encryption-key";
            mapper.secrets.push(SecretFile {
                file_name: file_name.into(),
                contents: bytes,
            });
            mapper
                .keyd_preloaded
                .insert("iotedge_master_encryption_id".into(), secret_uri(file_name));
        }

        // Edge CA.
        let edge_ca_table = map_edge_ca(&mut mapper, raw.edge_ca.unwrap_or_default())?;
        // certd may use the Edge CA key when it issues the Edge CA (a preloaded one it only
        // stores; module certs are signed with the handle edged passes), and the temporary key
        // when it self-signs the renewed CA. edged renews (certificate `aziot-edged-ca-temp`)
        // only with `[edge_ca.auto_renew]`, and makes the temporary key only with `rotate_key`.
        let preloaded = mapper.keyd_preloaded.contains_key("aziot-edged-ca");
        let self_signed = mapper
            .certd_issuance
            .get("aziot-edged-ca")
            .and_then(|options| options.get("method"))
            .and_then(Value::as_str)
            == Some("self_signed");
        let renewal = edge_ca_table.get("auto_renew");
        let rotates_key = renewal
            .and_then(|renewal| renewal.get("rotate_key"))
            .and_then(Value::as_bool)
            == Some(true);
        if !preloaded {
            push_unique(&mut mapper.keyd_certd, "aziot-edged-ca");
        }
        if self_signed {
            push_unique(&mut mapper.keyd_certd, "aziot-edged-ca-temp");
        }
        keyd_edged.push("aziot-edged-ca".to_owned());
        keyd_edged.push("iotedge_master_encryption_id".to_owned());
        certd_edged.push("aziot-edged-ca".to_owned());
        certd_edged.push("aziot-edged/module/*".to_owned());
        if rotates_key {
            keyd_edged.push("aziot-edged-ca-temp".to_owned());
        }
        if renewal.is_some() {
            certd_edged.push("aziot-edged-ca-temp".to_owned());
        }
        edged_table.insert("edge_ca".into(), Value::Table(edge_ca_table));

        edged_table.insert("agent".into(), Value::Table(map_agent(raw.agent)?));
        let uris = |raw: Option<RawUris>, workload: &str, management: &str| {
            let raw = raw.unwrap_or(RawUris {
                workload_uri: None,
                management_uri: None,
            });
            let mut table = Table::new();
            table.insert(
                "workload_uri".into(),
                string(raw.workload_uri.unwrap_or_else(|| workload.to_owned())),
            );
            table.insert(
                "management_uri".into(),
                string(raw.management_uri.unwrap_or_else(|| management.to_owned())),
            );
            table
        };
        edged_table.insert(
            "connect".into(),
            Value::Table(uris(
                raw.connect,
                "unix:///var/run/iotedge/workload.sock",
                "unix:///var/run/iotedge/mgmt.sock",
            )),
        );
        edged_table.insert(
            "listen".into(),
            Value::Table(uris(
                raw.listen,
                "fd://aziot-edged.workload.socket",
                "fd://aziot-edged.mgmt.socket",
            )),
        );
        let max_retries = match raw.watchdog.and_then(|watchdog| watchdog.max_retries) {
            None => string("infinite"),
            Some(Value::String(text)) if text == "infinite" => string("infinite"),
            Some(Value::Integer(count)) if count > 0 => Value::Integer(count),
            Some(_) => {
                return Err(Problem::new(
                    "watchdog.max_retries",
                    "expected \"infinite\" or a positive integer",
                )
                .into())
            }
        };
        let mut watchdog = Table::new();
        watchdog.insert("max_retries".into(), max_retries);
        edged_table.insert("watchdog".into(), Value::Table(watchdog));
        let mut moby = Table::new();
        moby.insert("uri".into(), string(&moby_uri));
        let (network, content_trust) = match raw.moby_runtime {
            Some(RawMoby {
                network,
                content_trust,
                ..
            }) => (network, content_trust),
            None => (None, None),
        };
        moby.insert(
            "network".into(),
            network.unwrap_or_else(|| string("azure-iot-edge")),
        );
        if let Some(content_trust) = content_trust {
            moby.insert("content_trust".into(), content_trust);
        }
        edged_table.insert("moby_runtime".into(), Value::Table(moby));
        if let Some(gc) = raw.image_garbage_collection {
            let enabled = gc.enabled.unwrap_or(true);
            let recurrence = gc.cleanup_recurrence.unwrap_or_else(|| "1d".into());
            let threshold = gc
                .image_age_cleanup_threshold
                .unwrap_or_else(|| "7d".into());
            let time = gc.cleanup_time.unwrap_or_else(|| "00:00".into());
            if (
                enabled,
                recurrence.as_str(),
                threshold.as_str(),
                time.as_str(),
            ) != (true, "1d", "7d", "00:00")
            {
                let mut table = Table::new();
                table.insert("enabled".into(), Value::Boolean(enabled));
                table.insert("cleanup_recurrence".into(), string(recurrence));
                table.insert("image_age_cleanup_threshold".into(), string(threshold));
                table.insert("cleanup_time".into(), string(time));
                edged_table.insert("image_garbage_collection".into(), Value::Table(table));
            }
        }
        edged = Some(edged_table);
    }

    // Principals.
    let uid = |user: &str| {
        environment
            .uid(user)
            .map(|uid| Value::Integer(i64::from(uid)))
            .ok_or_else(|| ApplyError::UnknownUser(user.to_owned()))
    };
    let principal = |uid: Value, field: &str, ids: &[String]| {
        let mut table = Table::new();
        table.insert("uid".into(), uid);
        table.insert(field.into(), strings(ids));
        Value::Table(table)
    };

    // keyd.
    // keyd refuses a pkcs11: key without a PKCS#11 library, so say so here.
    if !raw.aziot_keys.contains_key("pkcs11_lib_path") {
        if let Some((id, _)) = mapper
            .keyd_preloaded
            .iter()
            .find(|(_, uri)| uri.starts_with("pkcs11:"))
        {
            return Err(Problem::new(
                "aziot_keys.pkcs11_lib_path",
                format!("is required: key {id:?} is in a PKCS#11 token (a pkcs11: URI)"),
            )
            .into());
        }
    }
    let mut keyd = Table::new();
    let mut aziot_keys = Table::new();
    for (name, value) in &raw.aziot_keys {
        if name == "homedir_path" {
            mapper.warn(
                "aziot_keys.homedir_path",
                format!("ignored: keyd's store is always {KEYD_HOMEDIR}"),
            );
            continue;
        }
        aziot_keys.insert(name.clone(), string(value));
    }
    aziot_keys.insert("homedir_path".into(), string(KEYD_HOMEDIR));
    keyd.insert("aziot_keys".into(), Value::Table(aziot_keys));
    if !mapper.keyd_preloaded.is_empty() {
        let preloaded: Table = mapper
            .keyd_preloaded
            .iter()
            .map(|(id, uri)| (id.clone(), string(uri)))
            .collect();
        keyd.insert("preloaded_keys".into(), Value::Table(preloaded));
    }
    let mut keyd_principals = vec![principal(
        uid(crate::users::IDENTITYD_USER)?,
        "keys",
        &mapper.keyd_identityd,
    )];
    if !mapper.keyd_certd.is_empty() {
        keyd_principals.push(principal(
            uid(crate::users::CERTD_USER)?,
            "keys",
            &mapper.keyd_certd,
        ));
    }
    if edge {
        keyd_principals.push(principal(
            uid(crate::users::EDGED_USER)?,
            "keys",
            &keyd_edged,
        ));
    }
    keyd.insert("principal".into(), Value::Array(keyd_principals));
    if let Some(limit) = max_requests.get("keyd").filter(|limit| **limit != 10) {
        keyd.insert("max_requests".into(), Value::Integer(*limit));
    }

    // The TPM service (keyd reads the tpmd files).
    let tpmd = tpm::map_tpm(raw.tpm.as_ref(), max_requests.get("tpmd").copied())?;

    // certd.
    let mut certd = Table::new();
    certd.insert("homedir_path".into(), string(CERTD_HOMEDIR));
    if let Some(limit) = max_requests.get("certd").filter(|limit| **limit != 10) {
        certd.insert("max_requests".into(), Value::Integer(*limit));
    }
    if !mapper.certd_issuance.is_empty() {
        certd.insert(
            "cert_issuance".into(),
            Value::Table(mapper.certd_issuance.clone()),
        );
    }
    if !mapper.certd_preloaded.is_empty() {
        let preloaded: Table = mapper.certd_preloaded.clone().into_iter().collect();
        certd.insert("preloaded_certs".into(), Value::Table(preloaded));
    }
    let mut certd_principals = Vec::new();
    if !mapper.certd_identityd.is_empty() {
        certd_principals.push(principal(
            uid(crate::users::IDENTITYD_USER)?,
            "certs",
            &mapper.certd_identityd,
        ));
    }
    if edge {
        certd_principals.push(principal(
            uid(crate::users::EDGED_USER)?,
            "certs",
            &certd_edged,
        ));
    }
    if !certd_principals.is_empty() {
        certd.insert("principal".into(), Value::Array(certd_principals));
    }

    // identityd.
    let mut identityd = Table::new();
    identityd.insert("hostname".into(), string(&hostname));
    identityd.insert("homedir".into(), string(IDENTITYD_HOMEDIR));
    identityd.insert(
        "prefer_module_identity_cache".into(),
        Value::Boolean(raw.prefer_module_identity_cache.unwrap_or(false)),
    );
    if let Some(limit) = max_requests.get("identityd").filter(|limit| **limit != 10) {
        identityd.insert("max_requests".into(), Value::Integer(*limit));
    }
    if let Some(timeout) = raw.cloud_timeout_sec {
        identityd.insert("cloud_timeout_sec".into(), Value::Integer(timeout));
    }
    if let Some(retries) = raw.cloud_retries {
        identityd.insert("cloud_retries".into(), Value::Integer(retries));
    }
    if let Some(localid) = &raw.localid {
        let mut table = Table::new();
        table.insert("domain".into(), string(&localid.domain));
        identityd.insert("localid".into(), Value::Table(table));
    }
    identityd.insert("provisioning".into(), Value::Table(provisioning));
    let identityd_principals = if edge {
        let mut table = Table::new();
        table.insert("uid".into(), uid(crate::users::EDGED_USER)?);
        table.insert("name".into(), string("aziot-edge"));
        vec![Value::Table(table)]
    } else {
        Vec::new()
    };
    identityd.insert("principal".into(), Value::Array(identityd_principals));

    Ok(Plan {
        keyd,
        certd,
        identityd,
        tpmd,
        edged,
        secrets: mapper.secrets,
        warnings: mapper.warnings,
        hostname,
        moby_uri,
    })
}

fn issue_local_ca(mapper: &mut Mapper, options: &RawIssuance, key: &str) -> Result<Table, Problem> {
    if options.method.as_deref() == Some("local_ca") {
        return Err(Problem::new(
            format!("{key}.method"),
            "the local CA cannot be issued by itself",
        ));
    }
    let mut options = options.clone();
    if options.method.is_none() {
        options.method = Some("self_signed".to_owned());
    }
    if options.auto_renew.is_some() {
        return Err(Problem::new(
            format!("{key}.auto_renew"),
            "the local CA is not renewed automatically",
        ));
    }
    let mut issued = mapper.issuance("local-ca", &options, key, None)?;
    // certd issues a CA without an issuer only for IDs allowed to be one.
    issued.insert("ca".into(), Value::Boolean(true));
    Ok(issued)
}

/// Serializes a drop-in with the generated-file header.
pub fn render(table: &Table) -> String {
    let body = toml::to_string(table).unwrap_or_default();
    format!(
        "# Generated by `iotedge config apply` from the super-config (/etc/aziot/config.toml).\n\
         # Do not edit: the next `config apply` overwrites this file. Change the super-config,\n\
         # or add your own drop-in next to this one (files merge in name order).\n\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Environment for Fixed {
        fn uid(&self, user: &str) -> Option<u32> {
            match user {
                "aziotks" => Some(5555),
                "aziotcs" => Some(5556),
                "aziotid" => Some(5557),
                "iotedge" => Some(5558),
                _ => None,
            }
        }

        fn hostname(&self) -> String {
            "machine".into()
        }
    }

    const MANUAL: &str = "[provisioning]\nsource = \"manual\"\niothub_hostname = \"h\"\ndevice_id = \"d\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = { value = \"AAAA\" }\n";

    /// identityd's `registration_id` for a DPS X.509 device cert issued with `subject`.
    fn registration_id(registration_id: Option<&str>, subject: &str) -> Option<Value> {
        let id_line = registration_id
            .map(|id| format!("registration_id = \"{id}\"\n"))
            .unwrap_or_default();
        let text = format!(
            "[provisioning]\nsource = \"dps\"\nid_scope = \"s\"\n[provisioning.attestation]\n\
             method = \"x509\"\n{id_line}identity_cert = {{ method = \"local_ca\", subject = {subject} }}\n\
             [cert_issuance.local_ca]\ncert = \"file:///ca.pem\"\npk = \"file:///ca.key\"\n"
        );
        let plan = plan(&text, Path::new("/etc/aziot/config.toml"), &Fixed).unwrap();
        plan.identityd["provisioning"]["attestation"]
            .get("registration_id")
            .cloned()
    }

    #[test]
    fn a_dn_subject_is_the_registration_id_only_when_its_cn_is_the_id() {
        let dn = |pairs: &[(&str, &str)]| {
            Some(Value::Table(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), string(*v)))
                    .collect(),
            ))
        };
        // The reference's form: the DN (names upper-case) with CN = the registration ID.
        assert_eq!(
            registration_id(Some("dev"), "{ cn = \"dev\", o = \"Contoso\" }"),
            dn(&[("CN", "dev"), ("O", "Contoso")])
        );
        assert_eq!(
            registration_id(None, "{ CN = \"dev\", L = \"AQ\" }"),
            dn(&[("CN", "dev"), ("L", "AQ")])
        );
        // A registration ID the DN does not carry is kept as given; a DN without CN is no ID.
        assert_eq!(
            registration_id(Some("other"), "{ CN = \"dev\", O = \"Contoso\" }"),
            Some(string("other"))
        );
        assert_eq!(
            registration_id(Some("dev"), "{ O = \"Contoso\" }"),
            Some(string("dev"))
        );
        assert_eq!(registration_id(None, "{ O = \"Contoso\" }"), None);
    }

    fn error(text: &str) -> String {
        plan(text, Path::new("/etc/aziot/config.toml"), &Fixed)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn invalid_super_configs_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("", "invalid `provisioning`"),
            ("surprise = 1\n", "unknown field `surprise`"),
            (&format!("cloud_timeout_sec = 10\n{MANUAL}"), "`cloud_timeout_sec`: cloud_timeout_sec must be at least 70 seconds"),
            ("parent_hostname = \"p\"\n[provisioning]\nsource = \"dps\"\nid_scope = \"s\"\n[provisioning.attestation]\nmethod = \"tpm\"\nregistration_id = \"r\"\n", "DPS provisioning is not supported in nested mode"),
            (&format!("[aziot_max_requests]\nkeyd = 1\ncertd = 1\ntpmd = 1\n{MANUAL}"), "`aziot_max_requests.identityd`"),
            (&format!("[tpm]\nauth_key_index = \"0x00_01_00\"\n{MANUAL}"), "`tpm.auth_key_index`"),
            (&format!("[tpm]\ntcti = \"carrier-pigeon\"\n{MANUAL}"), "`tpm.tcti`: unsupported TCTI"),
            (&format!("[tpm]\nsurprise = 1\n{MANUAL}"), "unknown field `surprise`"),
            ("[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName=h;DeviceId=d\"\n", "the SharedAccessKey component is missing"),
            ("[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName=h;DeviceId=d;SharedAccessKey=!!!\"\n", "not valid base64"),
            ("[provisioning]\nsource = \"manual\"\niothub_hostname = \"h\"\ndevice_id = \"d\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = { value = \"%%\" }\n", "`provisioning.authentication.device_id_pk.value`"),
            ("[provisioning]\nsource = \"manual\"\niothub_hostname = \"h\"\ndevice_id = \"d\"\n[provisioning.authentication]\nmethod = \"x509\"\nidentity_cert = { method = \"self_signed\", expiry_days = 0 }\n", "expiry_days must be greater than 0"),
            ("[provisioning]\nsource = \"manual\"\niothub_hostname = \"h\"\ndevice_id = \"d\"\n[provisioning.authentication]\nmethod = \"x509\"\nidentity_cert = { method = \"self_signed\", common_name = \"a\", subject = { CN = \"b\" } }\n", "common_name and provisioning.authentication.identity_cert.subject"),
            ("[provisioning]\nsource = \"manual\"\niothub_hostname = \"h\"\ndevice_id = \"d\"\n[provisioning.authentication]\nmethod = \"x509\"\nidentity_cert = { method = \"est\" }\n", "no EST URL for cert \"device-id\""),
            (&format!("{MANUAL}[edge_ca.auto_renew]\nrotate_key = false\n"), "`edge_ca.auto_renew.rotate_key`"),
            ("[provisioning]\nsource = \"manual\"\niothub_hostname = \"h\"\ndevice_id = \"d\"\n[provisioning.authentication]\nmethod = \"x509\"\nidentity_cert = \"file:///c.pem\"\nidentity_pk = \"pkcs11:token=t;object=d\"\n", "`aziot_keys.pkcs11_lib_path`"),
            (&format!("{MANUAL}[edge_ca.auto_renew]\nthreshold = \"100%\"\n"), "`edge_ca.auto_renew.threshold`"),
            (&format!("{MANUAL}[cert_issuance.est.auth]\nidentity_cert = \"file:///a\"\nidentity_pk = \"file:///b\"\nbootstrap_identity_cert = \"file:///c\"\nbootstrap_identity_pk = \"file:///d\"\n"), "not both"),
        ];
        for (text, expected) in cases {
            let message = error(text);
            assert!(message.contains(expected), "{text:?}\n  gave: {message}");
            assert!(message.contains("/etc/aziot/config.toml"), "{message}");
        }
    }

    #[test]
    fn secrets_stay_out_of_errors_and_debug() {
        let message = error("[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName=h;SharedAccessKey=c2VjcmV0\"\n");
        assert!(!message.contains("c2VjcmV0"), "{message}");
        let plan = plan(MANUAL, Path::new("/x"), &Fixed).unwrap();
        assert_eq!(plan.secrets[0].contents, vec![0, 0, 0]);
        assert!(!format!("{:?}", plan.secrets).contains("[0, 0, 0]"));
    }

    #[test]
    fn operational_cert_goes_to_identityd_with_its_rights() {
        let text = "[provisioning]\nsource = \"dps\"\nid_scope = \"s\"\n[provisioning.attestation]\n\
                    method = \"tpm\"\nregistration_id = \"r\"\n[provisioning.operational_cert]\ncert = \"op\"\n";
        let plan = plan(text, Path::new("/etc/aziot/config.toml"), &Fixed).unwrap();
        let operational = &plan.identityd["provisioning"]["operational_cert"];
        assert_eq!(operational["cert"].as_str(), Some("op"));
        assert_eq!(operational["pk"].as_str(), Some("aziot-dps-operational"));
        let rights = |table: &Table, field: &str| -> Vec<String> {
            table["principal"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|principal| principal["uid"].as_integer() == Some(5557))
                .flat_map(|principal| principal[field].as_array().unwrap().clone())
                .map(|id| id.as_str().unwrap().to_owned())
                .collect()
        };
        let keys = rights(&plan.keyd, "keys");
        assert!(
            keys.contains(&"aziot-dps-operational".to_owned()),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"aziot-dps-operational-temp".to_owned()),
            "{keys:?}"
        );
        assert!(rights(&plan.certd, "certs").contains(&"op".to_owned()));
        let manual = error(&format!("{MANUAL}[provisioning.operational_cert]\n"));
        assert!(manual.contains("provisioning.operational_cert"), "{manual}");
        let file = error(&text.replace("cert = \"op\"", "cert = \"file:///op.pem\""));
        assert!(
            file.contains("provisioning.operational_cert.cert"),
            "{file}"
        );
    }

    #[test]
    fn policies() {
        for good in ["1%", "99%", "5min", "1day"] {
            check_policy(good, "k").unwrap();
        }
        for bad in ["0%", "100%", "0min", "min", "5", "-1day", "1 day"] {
            assert!(check_policy(bad, "k").is_err(), "{bad}");
        }
    }

    #[test]
    fn warnings_do_not_stop_apply() {
        let plan = plan(
            &format!("hostname = \"not_valid!\"\n{MANUAL}"),
            Path::new("/x"),
            &Fixed,
        )
        .unwrap();
        assert!(
            plan.warnings
                .iter()
                .any(|warning| warning.contains("RFC 1123")),
            "{:?}",
            plan.warnings
        );
    }
}
