//! edged's configuration: `config.toml` plus `config.d/*.toml`, merged by config-common, then
//! validated into [`Config`].
//!
//! Two forms are accepted and may not be mixed for the Edge CA: the Azure IoT Edge 1.6 keys that
//! `iotedge config apply` writes (`[edge_ca]`, `trust_bundle_cert`, ...) and the seed's module
//! runtime keys (`[certificates] device_ca_cert / device_ca_pk / trusted_ca_certs`). Unknown keys
//! are errors, except `moby_runtime.content_trust` and the reference's `[endpoints]` keys.

use std::collections::BTreeMap;
use std::path::PathBuf;

use config_common::{ConfigError, Loaded};
use serde::Deserialize;

/// The default base config file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/aziot/edged/config.toml";
/// The default drop-in folder.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/aziot/edged/config.d";
/// The default Edge CA cert ID (certd) and key ID (keyd).
pub const DEFAULT_EDGE_CA_ID: &str = "aziot-edged-ca";
/// The default trust bundle cert ID.
pub const DEFAULT_TRUST_BUNDLE_CERT: &str = "aziot-edged-trust-bundle";
/// The default manifest trust bundle cert ID.
pub const DEFAULT_MANIFEST_TRUST_BUNDLE_CERT: &str = "aziot-edged-manifest-trust-bundle";
/// The systemd fd name of the management socket.
pub const MANAGEMENT_SOCKET_NAME: &str = "aziot-edged.mgmt.socket";
/// The systemd fd name of the legacy workload socket.
pub const WORKLOAD_SOCKET_NAME: &str = "aziot-edged.workload.socket";

/// The validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The device's host name (`EdgeDeviceHostName` of the agent).
    pub hostname: String,
    /// State folder: `cache/`, `mnt/`, `gc/`.
    pub homedir: PathBuf,
    /// certd cert ID served by `/trust-bundle`; `None` in the seed form means "Edge CA chain plus
    /// `trusted_ca_certs`".
    pub trust_bundle_cert: Option<String>,
    /// certd cert ID served by `/manifest-trust-bundle`.
    pub manifest_trust_bundle_cert: String,
    /// When to ask identityd to reprovision.
    pub auto_reprovisioning_mode: ReprovisioningMode,
    /// Whether modules may run privileged or with added capabilities.
    pub allow_elevated_docker_permissions: bool,
    /// Per-uid connection budget of the management socket.
    pub max_requests_management: usize,
    /// Per-uid connection budget of each workload socket.
    pub max_requests_workload: usize,
    /// Extra string pairs merged into `/systeminfo`.
    pub additional_info: BTreeMap<String, String>,
    /// The Edge CA.
    pub edge_ca: EdgeCa,
    /// Seed form: certd cert ID appended to the trust bundle.
    pub trusted_ca_certs: Option<String>,
    /// The edgeAgent container edged keeps alive.
    pub agent: Agent,
    /// URIs as seen from inside containers.
    pub connect: Uris,
    /// Where edged listens.
    pub listen: Uris,
    /// Consecutive failed watchdog runs before edged exits; `None` = infinite.
    pub watchdog_max_retries: Option<u32>,
    /// Image garbage collection.
    pub image_gc: ImageGc,
    /// The Docker engine.
    pub moby: Moby,
    /// Which runtime runs the modules (`agent.type`): Docker (default) or host processes.
    pub runtime: RuntimeKind,
    /// `[process_runtime]`: settings of the process runtime (defaults when absent).
    pub process: ProcessRuntime,
    /// Peer daemons' sockets.
    pub endpoints: Endpoints,
}

/// `auto_reprovisioning_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ReprovisioningMode {
    /// Reprovision when identityd fails to return the device.
    Dynamic,
    /// Reprovision at every start.
    AlwaysOnStartup,
    /// Like `Dynamic` inside edged.
    OnErrorOnly,
}

/// The Edge CA's IDs and issuance options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeCa {
    /// certd cert ID.
    pub cert: String,
    /// keyd key pair ID.
    pub key: String,
    /// Subject of the CSR; `None` = `CN=aziot-edge CA <deviceId>`.
    pub subject: Option<Subject>,
    /// Renewal policy.
    pub auto_renew: Option<AutoRenew>,
    /// Supplied by the user (seed `[certificates]`): used as is, never issued or renewed.
    pub preloaded: bool,
}

/// The Edge CA subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// `common_name = "..."`.
    CommonName(String),
    /// `subject = { CN = "...", O = "..." }`, attribute short name → value.
    Fields(BTreeMap<String, String>),
}

/// `[edge_ca.auto_renew]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutoRenew {
    /// Create a new key on renewal.
    pub rotate_key: bool,
    /// When to renew (`80%`, `10min`, `2day`).
    pub threshold: RenewalTime,
    /// How long to wait between failed renewals.
    pub retry: RenewalTime,
}

/// A renewal policy value: the policy language certd and identityd read too.
pub use config_common::renewal::Policy as RenewalTime;

/// The module runtime, chosen by `agent.type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RuntimeKind {
    /// `docker` (the default): modules are Docker containers.
    #[default]
    Docker,
    /// `process`: modules are supervised host processes (spec section 10).
    Process,
}

/// `[process_runtime]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessRuntime {
    /// First uid (and gid) handed to modules; each module gets the lowest free one.
    pub uid_start: u32,
    /// How many uids the range holds (at most this many modules).
    pub uid_count: u32,
    /// Name of the cgroup (under edged's own cgroup) that holds one child cgroup per module.
    pub cgroup_name: String,
    /// Size at which a module's log file is rotated (one older file is kept).
    pub log_max_bytes: u64,
}

/// Default `process_runtime.uid_start`: far above the uids of ordinary accounts.
pub const DEFAULT_PROCESS_UID_START: u32 = 900_000;
/// Default `process_runtime.uid_count`.
pub const DEFAULT_PROCESS_UID_COUNT: u32 = 10_000;
/// Default `process_runtime.cgroup_name`.
pub const DEFAULT_PROCESS_CGROUP_NAME: &str = "edged-modules";
/// Default `process_runtime.log_max_bytes`.
pub const DEFAULT_PROCESS_LOG_MAX_BYTES: u64 = 10 * 1024 * 1024;

impl Default for ProcessRuntime {
    fn default() -> Self {
        ProcessRuntime {
            uid_start: DEFAULT_PROCESS_UID_START,
            uid_count: DEFAULT_PROCESS_UID_COUNT,
            cgroup_name: DEFAULT_PROCESS_CGROUP_NAME.to_owned(),
            log_max_bytes: DEFAULT_PROCESS_LOG_MAX_BYTES,
        }
    }
}

/// `imagePullPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull when creating.
    #[default]
    OnCreate,
    /// Never pull.
    Never,
}

impl PullPolicy {
    /// Parses `on-create` / `never` case-insensitively.
    pub fn parse(text: &str) -> Option<Self> {
        if text.eq_ignore_ascii_case("on-create") {
            Some(PullPolicy::OnCreate)
        } else if text.eq_ignore_ascii_case("never") {
            Some(PullPolicy::Never)
        } else {
            None
        }
    }
}

/// Registry credentials.
#[derive(Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (never logged).
    #[serde(default)]
    pub password: Option<String>,
    /// E-mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Registry host.
    #[serde(default)]
    pub serveraddress: Option<String>,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("serveraddress", &self.serveraddress)
            .finish_non_exhaustive()
    }
}

/// `[agent]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Agent {
    /// Container name (`edgeAgent`).
    pub name: String,
    /// Pull policy for the agent image.
    pub image_pull_policy: PullPolicy,
    /// The image.
    pub image: String,
    /// Docker create body (a JSON object).
    pub create_options: serde_json::Value,
    /// Registry credentials.
    pub auth: Option<RegistryAuth>,
    /// `[agent.env]`.
    pub env: BTreeMap<String, String>,
}

/// A management / workload URI pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uris {
    /// The workload socket.
    pub workload: String,
    /// The management socket.
    pub management: String,
}

/// `[image_garbage_collection]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageGc {
    /// On by default.
    pub enabled: bool,
    /// Seconds between runs (whole days).
    pub cleanup_recurrence_secs: u64,
    /// Minimum age since last use, seconds.
    pub image_age_cleanup_threshold_secs: u64,
    /// Local time of the first run, minutes after midnight.
    pub cleanup_time_minutes: u32,
}

/// `[moby_runtime]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moby {
    /// Docker's socket (`unix:///var/run/docker.sock`).
    pub uri: String,
    /// The module network.
    pub network: Network,
}

/// `moby_runtime.network`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Network name.
    pub name: String,
    /// Enable IPv6 when creating it.
    #[serde(default)]
    pub ipv6: bool,
    /// IPAM settings when creating it.
    #[serde(default)]
    pub ipam: Option<Ipam>,
}

/// `moby_runtime.network.ipam`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ipam {
    /// `[[moby_runtime.network.ipam.config]]`.
    #[serde(default)]
    pub config: Vec<IpamConfig>,
}

/// One IPAM pool.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamConfig {
    /// Gateway address.
    #[serde(default)]
    pub gateway: Option<String>,
    /// Subnet CIDR.
    #[serde(default)]
    pub subnet: Option<String>,
    /// IP range CIDR.
    #[serde(default)]
    pub ip_range: Option<String>,
}

/// Peer daemons' sockets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// keyd.
    pub keyd: String,
    /// certd.
    pub certd: String,
    /// identityd.
    pub identityd: String,
}

// ---- raw (serde) shapes ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    hostname: Option<String>,
    homedir: Option<PathBuf>,
    trust_bundle_cert: Option<String>,
    manifest_trust_bundle_cert: Option<String>,
    auto_reprovisioning_mode: Option<ReprovisioningMode>,
    allow_elevated_docker_permissions: Option<bool>,
    iotedge_max_requests: Option<RawMaxRequests>,
    additional_info: Option<BTreeMap<String, String>>,
    edge_ca: Option<RawEdgeCa>,
    certificates: Option<RawCertificates>,
    agent: Option<RawAgent>,
    connect: Option<RawUris>,
    listen: Option<RawListen>,
    watchdog: Option<RawWatchdog>,
    image_garbage_collection: Option<RawGc>,
    moby_runtime: Option<RawMoby>,
    process_runtime: Option<RawProcessRuntime>,
    endpoints: Option<RawEndpoints>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProcessRuntime {
    uid_start: Option<u32>,
    uid_count: Option<u32>,
    cgroup_name: Option<String>,
    log_max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaxRequests {
    management: Option<usize>,
    workload: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdgeCa {
    cert: Option<String>,
    key: Option<String>,
    common_name: Option<String>,
    subject: Option<BTreeMap<String, String>>,
    auto_renew: Option<RawAutoRenew>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoRenew {
    rotate_key: Option<bool>,
    threshold: Option<String>,
    retry: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificates {
    device_ca_cert: Option<String>,
    device_ca_pk: Option<String>,
    trusted_ca_certs: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Option<String>,
    #[serde(rename = "type")]
    agent_type: Option<String>,
    #[serde(rename = "imagePullPolicy")]
    image_pull_policy: Option<String>,
    config: RawAgentConfig,
    env: Option<BTreeMap<String, toml::Value>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentConfig {
    image: String,
    #[serde(rename = "createOptions")]
    create_options: Option<toml::Value>,
    auth: Option<RegistryAuth>,
    digest: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUris {
    workload_uri: Option<String>,
    management_uri: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    workload_uri: Option<String>,
    management_uri: Option<String>,
    // The reference's TLS floor for its (unused here) TCP listeners: accepted and ignored.
    #[allow(dead_code)]
    min_tls_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatchdog {
    max_retries: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGc {
    enabled: Option<bool>,
    cleanup_recurrence: Option<String>,
    image_age_cleanup_threshold: Option<String>,
    cleanup_time: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMoby {
    uri: Option<String>,
    network: Option<RawNetwork>,
    // Accepted and ignored, as in the reference.
    #[allow(dead_code)]
    content_trust: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawNetwork {
    Name(String),
    Table(Network),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoints {
    aziot_keyd_url: Option<String>,
    aziot_certd_url: Option<String>,
    aziot_identityd_url: Option<String>,
    // The spelling shared tooling writes into every daemon's endpoints table.
    aziot_keyd: Option<String>,
    aziot_certd: Option<String>,
    aziot_identityd: Option<String>,
    #[allow(dead_code)]
    aziot_tpmd: Option<String>,
    #[allow(dead_code)]
    aziot_tpmd_url: Option<String>,
}

/// Strips `cert://` / `key://` from a seed-form ID.
fn strip_scheme<'a>(value: &'a str, scheme: &str) -> &'a str {
    value.strip_prefix(scheme).unwrap_or(value)
}

/// Parses `N%` (1–99), `Nmin`, `Nday` with N > 0 (surrounding spaces allowed).
pub fn parse_renewal_time(text: &str) -> Option<RenewalTime> {
    RenewalTime::parse(text.trim())
}

/// Parses a whole number of days (`7d`, `1 day`, `2days`) into seconds.
fn parse_days(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits_end);
    let value: u64 = number.parse().ok()?;
    match unit.trim() {
        "d" | "day" | "days" => (value > 0).then(|| value.checked_mul(86_400)).flatten(),
        _ => None,
    }
}

fn parse_clock(text: &str) -> Option<u32> {
    let (hours, minutes) = text.trim().split_once(':')?;
    if hours.len() != 2 || minutes.len() != 2 {
        return None;
    }
    let hours: u32 = hours.parse().ok()?;
    let minutes: u32 = minutes.parse().ok()?;
    (hours < 24 && minutes < 60).then_some(hours * 60 + minutes)
}

impl Config {
    /// Deserializes and validates the merged configuration.
    pub fn from_loaded(loaded: &Loaded) -> Result<Config, ConfigError> {
        let raw: RawConfig = loaded.deserialize()?;
        let invalid = |key: &str, message: &str| ConfigError::invalid(loaded, key, message);

        let hostname = raw
            .hostname
            .filter(|name| !name.trim().is_empty())
            .ok_or_else(|| invalid("hostname", "is required"))?;
        let homedir = raw
            .homedir
            .ok_or_else(|| invalid("homedir", "is required"))?;
        if !homedir.is_absolute() {
            return Err(invalid("homedir", "must be an absolute path"));
        }

        let (edge_ca, trusted_ca_certs) = match (raw.edge_ca, raw.certificates) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "certificates",
                    "[certificates] and [edge_ca] cannot both be set",
                ))
            }
            (None, Some(certificates)) => {
                let cert = certificates
                    .device_ca_cert
                    .map(|id| strip_scheme(&id, "cert://").to_owned());
                let key = certificates
                    .device_ca_pk
                    .map(|id| strip_scheme(&id, "key://").to_owned());
                let preloaded = match (&cert, &key) {
                    (Some(_), Some(_)) => true,
                    (None, None) => false,
                    _ => {
                        return Err(invalid(
                            "certificates.device_ca_cert",
                            "device_ca_cert and device_ca_pk must be set together",
                        ))
                    }
                };
                let trusted = certificates
                    .trusted_ca_certs
                    .map(|id| strip_scheme(&id, "cert://").to_owned());
                (
                    EdgeCa {
                        cert: cert.unwrap_or_else(|| DEFAULT_EDGE_CA_ID.to_owned()),
                        key: key.unwrap_or_else(|| DEFAULT_EDGE_CA_ID.to_owned()),
                        subject: None,
                        auto_renew: None,
                        preloaded,
                    },
                    trusted,
                )
            }
            (edge_ca, None) => {
                let edge_ca = edge_ca.unwrap_or(RawEdgeCa {
                    cert: None,
                    key: None,
                    common_name: None,
                    subject: None,
                    auto_renew: None,
                });
                let subject = match (edge_ca.common_name, edge_ca.subject) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            "edge_ca.subject",
                            "common_name and subject cannot both be set",
                        ))
                    }
                    (Some(name), None) => Some(Subject::CommonName(name)),
                    (None, Some(fields)) => Some(Subject::Fields(fields)),
                    (None, None) => None,
                };
                let auto_renew = match edge_ca.auto_renew {
                    None => None,
                    Some(renew) => Some(AutoRenew {
                        rotate_key: renew.rotate_key.unwrap_or(true),
                        threshold: match renew.threshold {
                            None => RenewalTime::Percent(80),
                            Some(text) => parse_renewal_time(&text).ok_or_else(|| {
                                invalid("edge_ca.auto_renew.threshold", RenewalTime::EXPECTED)
                            })?,
                        },
                        retry: match renew.retry {
                            None => RenewalTime::Percent(4),
                            Some(text) => parse_renewal_time(&text).ok_or_else(|| {
                                invalid("edge_ca.auto_renew.retry", RenewalTime::EXPECTED)
                            })?,
                        },
                    }),
                };
                (
                    EdgeCa {
                        cert: edge_ca
                            .cert
                            .unwrap_or_else(|| DEFAULT_EDGE_CA_ID.to_owned()),
                        key: edge_ca.key.unwrap_or_else(|| DEFAULT_EDGE_CA_ID.to_owned()),
                        subject,
                        auto_renew,
                        preloaded: false,
                    },
                    None,
                )
            }
        };
        if edge_ca.cert.is_empty() || edge_ca.key.is_empty() {
            return Err(invalid("edge_ca", "cert and key IDs must not be empty"));
        }

        let trust_bundle_cert = match raw.trust_bundle_cert {
            Some(id) => Some(id),
            // The seed form builds the bundle itself unless told otherwise.
            None if trusted_ca_certs.is_some() || edge_ca.preloaded => None,
            None => Some(DEFAULT_TRUST_BUNDLE_CERT.to_owned()),
        };

        let raw_agent = raw
            .agent
            .ok_or_else(|| invalid("agent", "is required ([agent.config] image)"))?;
        let runtime = match raw_agent.agent_type.as_deref() {
            None | Some("docker") => RuntimeKind::Docker,
            Some("process") => RuntimeKind::Process,
            Some(_) => return Err(invalid("agent.type", "expected \"docker\" or \"process\"")),
        };
        if raw.process_runtime.is_some() && runtime != RuntimeKind::Process {
            return Err(invalid(
                "process_runtime",
                "is only used with agent.type = \"process\"",
            ));
        }
        let process = match raw.process_runtime {
            None => ProcessRuntime::default(),
            Some(table) => {
                let defaults = ProcessRuntime::default();
                let process = ProcessRuntime {
                    uid_start: table.uid_start.unwrap_or(defaults.uid_start),
                    uid_count: table.uid_count.unwrap_or(defaults.uid_count),
                    cgroup_name: table.cgroup_name.unwrap_or(defaults.cgroup_name),
                    log_max_bytes: table.log_max_bytes.unwrap_or(defaults.log_max_bytes),
                };
                if process.uid_start == 0 {
                    return Err(invalid(
                        "process_runtime.uid_start",
                        "must not be 0 (modules never run as root by allocation)",
                    ));
                }
                if process.uid_count == 0
                    || process.uid_start.checked_add(process.uid_count).is_none()
                {
                    return Err(invalid(
                        "process_runtime.uid_count",
                        "must be positive and keep the range below 2^32",
                    ));
                }
                let name = &process.cgroup_name;
                let valid_name = !name.is_empty()
                    && name != "."
                    && name != ".."
                    && name
                        .bytes()
                        .all(|byte| byte.is_ascii_alphanumeric() || b"_.-".contains(&byte));
                if !valid_name {
                    return Err(invalid(
                        "process_runtime.cgroup_name",
                        "expected one path component of letters, digits, '_', '.' and '-'",
                    ));
                }
                if process.log_max_bytes < 4096 {
                    return Err(invalid(
                        "process_runtime.log_max_bytes",
                        "must be at least 4096",
                    ));
                }
                process
            }
        };
        let image_pull_policy = match &raw_agent.image_pull_policy {
            None => PullPolicy::OnCreate,
            Some(text) => PullPolicy::parse(text).ok_or_else(|| {
                invalid(
                    "agent.imagePullPolicy",
                    "expected \"on-create\" or \"never\"",
                )
            })?,
        };
        let create_options = match raw_agent.config.create_options {
            None => serde_json::Value::Object(serde_json::Map::new()),
            Some(value) => {
                let json = serde_json::to_value(&value)
                    .map_err(|error| invalid("agent.config.createOptions", &error.to_string()))?;
                if !json.is_object() {
                    return Err(invalid(
                        "agent.config.createOptions",
                        "must be a table (a Docker create body)",
                    ));
                }
                json
            }
        };
        let _ = raw_agent.config.digest;
        let mut agent_env = BTreeMap::new();
        for (key, value) in raw_agent.env.unwrap_or_default() {
            let text = match value {
                toml::Value::String(text) => text,
                toml::Value::Integer(number) => number.to_string(),
                toml::Value::Float(number) => number.to_string(),
                toml::Value::Boolean(flag) => flag.to_string(),
                _ => {
                    return Err(invalid(
                        &format!("agent.env.{key}"),
                        "must be a string, number or boolean",
                    ))
                }
            };
            agent_env.insert(key, text);
        }
        let agent = Agent {
            name: raw_agent
                .name
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "edgeAgent".to_owned()),
            image_pull_policy,
            image: raw_agent.config.image,
            create_options,
            auth: raw_agent.config.auth,
            env: agent_env,
        };
        if agent.image.trim().is_empty() {
            return Err(invalid("agent.config.image", "must not be empty"));
        }

        let connect = raw.connect.unwrap_or(RawUris {
            workload_uri: None,
            management_uri: None,
        });
        let connect = Uris {
            workload: connect
                .workload_uri
                .unwrap_or_else(|| "unix:///var/run/iotedge/workload.sock".to_owned()),
            management: connect
                .management_uri
                .unwrap_or_else(|| "unix:///var/run/iotedge/mgmt.sock".to_owned()),
        };
        let listen = raw.listen.unwrap_or(RawListen {
            workload_uri: None,
            management_uri: None,
            min_tls_version: None,
        });
        let listen = Uris {
            workload: listen
                .workload_uri
                .unwrap_or_else(|| format!("fd://{WORKLOAD_SOCKET_NAME}")),
            management: listen
                .management_uri
                .unwrap_or_else(|| format!("fd://{MANAGEMENT_SOCKET_NAME}")),
        };
        for (key, uri) in [
            ("listen.workload_uri", &listen.workload),
            ("listen.management_uri", &listen.management),
        ] {
            http_common::listener::ListenerUri::parse(uri)
                .map_err(|error| invalid(key, &error.to_string()))?;
        }
        for (key, uri) in [
            ("connect.workload_uri", &connect.workload),
            ("connect.management_uri", &connect.management),
        ] {
            if !(uri.starts_with("unix:///")
                || uri.starts_with("http://")
                || uri.starts_with("https://"))
            {
                return Err(invalid(key, "expected unix:///path (or http(s)://)"));
            }
        }

        let watchdog_max_retries = match raw.watchdog.and_then(|watchdog| watchdog.max_retries) {
            None => None,
            Some(toml::Value::String(text)) if text.eq_ignore_ascii_case("infinite") => None,
            Some(toml::Value::Integer(number)) if number > 0 => {
                Some(u32::try_from(number).unwrap_or(u32::MAX))
            }
            Some(_) => {
                return Err(invalid(
                    "watchdog.max_retries",
                    "expected \"infinite\" or a positive integer",
                ))
            }
        };

        let gc = raw.image_garbage_collection.unwrap_or(RawGc {
            enabled: None,
            cleanup_recurrence: None,
            image_age_cleanup_threshold: None,
            cleanup_time: None,
        });
        let image_gc = ImageGc {
            enabled: gc.enabled.unwrap_or(true),
            cleanup_recurrence_secs: match gc.cleanup_recurrence {
                None => 86_400,
                Some(text) => parse_days(&text).ok_or_else(|| {
                    invalid(
                        "image_garbage_collection.cleanup_recurrence",
                        "expected a whole number of days such as \"1d\"",
                    )
                })?,
            },
            image_age_cleanup_threshold_secs: match gc.image_age_cleanup_threshold {
                None => 7 * 86_400,
                Some(text) => parse_days(&text).ok_or_else(|| {
                    invalid(
                        "image_garbage_collection.image_age_cleanup_threshold",
                        "expected a whole number of days such as \"7d\"",
                    )
                })?,
            },
            cleanup_time_minutes: match gc.cleanup_time {
                None => 0,
                Some(text) => parse_clock(&text).ok_or_else(|| {
                    invalid(
                        "image_garbage_collection.cleanup_time",
                        "expected HH:MM (24-hour local time)",
                    )
                })?,
            },
        };

        let moby = raw.moby_runtime.unwrap_or(RawMoby {
            uri: None,
            network: None,
            content_trust: None,
        });
        let moby = Moby {
            uri: moby
                .uri
                .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned()),
            network: match moby.network {
                None => Network {
                    name: "azure-iot-edge".to_owned(),
                    ipv6: false,
                    ipam: None,
                },
                Some(RawNetwork::Name(name)) => Network {
                    name,
                    ipv6: false,
                    ipam: None,
                },
                Some(RawNetwork::Table(network)) => network,
            },
        };
        if !moby.uri.starts_with("unix:///") {
            return Err(invalid(
                "moby_runtime.uri",
                "expected unix:///path (only Unix sockets are supported)",
            ));
        }
        if moby.network.name.is_empty() {
            return Err(invalid("moby_runtime.network", "name must not be empty"));
        }

        let endpoints = raw.endpoints.unwrap_or(RawEndpoints {
            aziot_keyd_url: None,
            aziot_certd_url: None,
            aziot_identityd_url: None,
            aziot_keyd: None,
            aziot_certd: None,
            aziot_identityd: None,
            aziot_tpmd: None,
            aziot_tpmd_url: None,
        });
        let endpoints = Endpoints {
            keyd: endpoints
                .aziot_keyd_url
                .or(endpoints.aziot_keyd)
                .unwrap_or_else(|| "unix:///run/aziot/keyd.sock".to_owned()),
            certd: endpoints
                .aziot_certd_url
                .or(endpoints.aziot_certd)
                .unwrap_or_else(|| "unix:///run/aziot/certd.sock".to_owned()),
            identityd: endpoints
                .aziot_identityd_url
                .or(endpoints.aziot_identityd)
                .unwrap_or_else(|| "unix:///run/aziot/identityd.sock".to_owned()),
        };
        for (key, uri) in [
            ("endpoints.aziot_keyd_url", &endpoints.keyd),
            ("endpoints.aziot_certd_url", &endpoints.certd),
            ("endpoints.aziot_identityd_url", &endpoints.identityd),
        ] {
            http_common::UdsClient::from_uri(uri)
                .map_err(|error| invalid(key, &error.to_string()))?;
        }

        let max_requests = raw.iotedge_max_requests.unwrap_or(RawMaxRequests {
            management: None,
            workload: None,
        });
        let max_requests_management = max_requests.management.unwrap_or(50);
        let max_requests_workload = max_requests.workload.unwrap_or(10);
        if max_requests_management == 0 || max_requests_workload == 0 {
            return Err(invalid("iotedge_max_requests", "limits must be positive"));
        }

        Ok(Config {
            hostname,
            homedir,
            trust_bundle_cert,
            manifest_trust_bundle_cert: raw
                .manifest_trust_bundle_cert
                .unwrap_or_else(|| DEFAULT_MANIFEST_TRUST_BUNDLE_CERT.to_owned()),
            auto_reprovisioning_mode: raw
                .auto_reprovisioning_mode
                .unwrap_or(ReprovisioningMode::Dynamic),
            allow_elevated_docker_permissions: raw
                .allow_elevated_docker_permissions
                .unwrap_or(true),
            max_requests_management,
            max_requests_workload,
            additional_info: raw.additional_info.unwrap_or_default(),
            edge_ca,
            trusted_ca_certs,
            agent,
            connect,
            listen,
            watchdog_max_retries,
            image_gc,
            moby,
            runtime,
            process,
            endpoints,
        })
    }

    /// Parses a configuration from one TOML text (tests and tools).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let table: toml::Table =
            text.parse()
                .map_err(|error: toml::de::Error| ConfigError::Parse {
                    path: PathBuf::from("(inline)"),
                    message: error.to_string(),
                })?;
        let loaded = Loaded {
            table: table.clone(),
            sources: vec![(PathBuf::from("(inline)"), table)],
        };
        Config::from_loaded(&loaded)
    }

    /// The socket path of a `unix://` URI, if it is one.
    pub fn unix_path(uri: &str) -> Option<PathBuf> {
        uri.strip_prefix("unix://")
            .filter(|path| path.starts_with('/'))
            .map(PathBuf::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IOTEDGE_16: &str = r#"
hostname = "my-device"
trust_bundle_cert = "aziot-edged-trust-bundle"
manifest_trust_bundle_cert = "aziot-edged-manifest-trust-bundle"
auto_reprovisioning_mode = "AlwaysOnStartup"
homedir = "/var/lib/aziot/edged"
allow_elevated_docker_permissions = false
iotedge_max_requests = { management = 40, workload = 8 }
additional_info = { site = "plant-7" }

[edge_ca]
cert = "my-ca"
key = "my-ca-key"
subject = { CN = "ca", O = "org" }
[edge_ca.auto_renew]
rotate_key = true
threshold = "70%"
retry = "10min"

[agent]
name = "edgeAgent"
type = "docker"
imagePullPolicy = "Never"
[agent.config]
image = "mcr.microsoft.com/azureiotedge-agent:1.6"
createOptions = { HostConfig = { Binds = ["/iotedge/storage:/iotedge/storage"] } }
[agent.config.auth]
serveraddress = "example.azurecr.io"
username = "user"
password = "secret"
[agent.env]
RuntimeLogLevel = "info"
Retries = 3

[connect]
workload_uri = "unix:///var/run/iotedge/workload.sock"
management_uri = "unix:///var/run/iotedge/mgmt.sock"
[listen]
workload_uri = "fd://aziot-edged.workload.socket"
management_uri = "fd://aziot-edged.mgmt.socket"

[watchdog]
max_retries = 5

[image_garbage_collection]
enabled = true
cleanup_recurrence = "2d"
image_age_cleanup_threshold = "7d"
cleanup_time = "13:30"

[moby_runtime]
uri = "unix:///var/run/docker.sock"
content_trust = { ca_certs = { "x" = "y" } }
[moby_runtime.network]
name = "azure-iot-edge"
ipv6 = true
[[moby_runtime.network.ipam.config]]
gateway = "172.18.0.1"
subnet = "172.18.0.0/16"
ip_range = "172.18.0.0/24"

[endpoints]
aziot_keyd_url = "unix:///tmp/keyd.sock"
aziot_certd_url = "unix:///tmp/certd.sock"
aziot_identityd_url = "unix:///tmp/identityd.sock"
"#;

    #[test]
    fn parses_the_iotedge_16_form() {
        let config = Config::from_toml(IOTEDGE_16).unwrap();
        assert_eq!(config.hostname, "my-device");
        assert_eq!(
            config.auto_reprovisioning_mode,
            ReprovisioningMode::AlwaysOnStartup
        );
        assert!(!config.allow_elevated_docker_permissions);
        assert_eq!(config.max_requests_management, 40);
        assert_eq!(config.max_requests_workload, 8);
        assert_eq!(config.edge_ca.cert, "my-ca");
        assert_eq!(config.edge_ca.key, "my-ca-key");
        assert!(!config.edge_ca.preloaded);
        assert!(matches!(config.edge_ca.subject, Some(Subject::Fields(_))));
        let renew = config.edge_ca.auto_renew.clone().unwrap();
        assert_eq!(renew.threshold, RenewalTime::Percent(70));
        assert_eq!(
            renew.retry,
            RenewalTime::Duration(std::time::Duration::from_secs(600))
        );
        assert_eq!(config.agent.image_pull_policy, PullPolicy::Never);
        assert_eq!(
            config.agent.create_options["HostConfig"]["Binds"][0],
            "/iotedge/storage:/iotedge/storage"
        );
        assert_eq!(config.agent.env["Retries"], "3");
        assert_eq!(
            config.agent.auth.as_ref().unwrap().password.as_deref(),
            Some("secret")
        );
        assert!(!format!("{:?}", config.agent.auth).contains("secret"));
        assert_eq!(config.watchdog_max_retries, Some(5));
        assert_eq!(config.image_gc.cleanup_recurrence_secs, 2 * 86_400);
        assert_eq!(config.image_gc.cleanup_time_minutes, 13 * 60 + 30);
        assert!(config.moby.network.ipv6);
        assert_eq!(
            config.moby.network.ipam.as_ref().unwrap().config[0]
                .subnet
                .as_deref(),
            Some("172.18.0.0/16")
        );
        assert_eq!(config.endpoints.keyd, "unix:///tmp/keyd.sock");
        assert_eq!(
            config.trust_bundle_cert.as_deref(),
            Some("aziot-edged-trust-bundle")
        );
    }

    #[test]
    fn parses_the_seed_form() {
        let config = Config::from_toml(
            r#"
hostname = "my-device"
homedir = "/var/lib/iotedge/iotedged"
[certificates]
device_ca_cert = "cert://device-ca"
device_ca_pk = "key://device-ca"
trusted_ca_certs = "trusted-ca"
[agent]
name = "edgeAgent"
type = "docker"
[agent.config]
image = "mcr.microsoft.com/azureiotedge-agent:1.6"
[connect]
management_uri = "unix:///var/lib/iotedge/mgmt.sock"
workload_uri = "unix:///var/lib/iotedge/workload.sock"
[listen]
management_uri = "unix:///var/lib/iotedge/mgmt.sock"
workload_uri = "unix:///var/lib/iotedge/workload.sock"
[moby_runtime]
uri = "unix:///var/run/docker.sock"
"#,
        )
        .unwrap();
        assert_eq!(config.edge_ca.cert, "device-ca");
        assert_eq!(config.edge_ca.key, "device-ca");
        assert!(config.edge_ca.preloaded);
        assert_eq!(config.trusted_ca_certs.as_deref(), Some("trusted-ca"));
        assert_eq!(config.trust_bundle_cert, None);
        assert_eq!(config.moby.network.name, "azure-iot-edge");
        assert_eq!(
            config.listen.management,
            "unix:///var/lib/iotedge/mgmt.sock"
        );
        assert_eq!(
            config.endpoints.identityd,
            "unix:///run/aziot/identityd.sock"
        );
    }

    fn error_of(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn the_runtime_is_chosen_by_agent_type_with_process_settings() {
        let docker = Config::from_toml(
            "hostname = \"h\"\nhomedir = \"/h\"\n[agent.config]\nimage = \"i\"\n",
        )
        .unwrap();
        assert_eq!(docker.runtime, RuntimeKind::Docker);
        assert_eq!(docker.process, ProcessRuntime::default());
        let process = Config::from_toml(PROCESS).unwrap();
        assert_eq!(process.runtime, RuntimeKind::Process);
        assert_eq!(process.process.uid_start, DEFAULT_PROCESS_UID_START);
        let tuned = Config::from_toml(&format!(
            "{PROCESS}[process_runtime]\nuid_start = 70000\nuid_count = 50\ncgroup_name = \"mods\"\nlog_max_bytes = 8192\n"
        ))
        .unwrap();
        assert_eq!(
            tuned.process,
            ProcessRuntime {
                uid_start: 70_000,
                uid_count: 50,
                cgroup_name: "mods".to_owned(),
                log_max_bytes: 8192,
            }
        );
    }

    /// A minimal process-runtime config.
    const PROCESS: &str =
        "hostname = \"h\"\nhomedir = \"/h\"\n[agent]\ntype = \"process\"\n[agent.config]\nimage = \"/bin/agent\"\n";

    #[test]
    fn rejects_invalid_configs() {
        let base = "hostname = \"h\"\nhomedir = \"/h\"\n[agent.config]\nimage = \"i\"\n";
        let cases: Vec<(String, &str)> = vec![
            ("homedir = \"/h\"\n[agent.config]\nimage = \"i\"\n".into(), "hostname"),
            (format!("{base}bogus = 1\n"), "unknown field `bogus`"),
            (
                format!("{base}[edge_ca]\ncert = \"a\"\n[certificates]\ndevice_ca_cert = \"b\"\ndevice_ca_pk = \"b\"\n"),
                "cannot both be set",
            ),
            (
                format!("{base}[edge_ca]\ncommon_name = \"a\"\nsubject = {{ CN = \"b\" }}\n"),
                "common_name and subject",
            ),
            (
                format!("{base}[edge_ca.auto_renew]\nthreshold = \"120%\"\n"),
                "edge_ca.auto_renew.threshold",
            ),
            (format!("{base}[watchdog]\nmax_retries = 0\n"), "watchdog.max_retries"),
            (
                format!("{base}[image_garbage_collection]\ncleanup_time = \"25:00\"\n"),
                "cleanup_time",
            ),
            (
                "hostname = \"h\"\nhomedir = \"/h\"\n[agent]\nimagePullPolicy = \"sometimes\"\n[agent.config]\nimage = \"i\"\n".into(),
                "imagePullPolicy",
            ),
            (
                format!("{base}[moby_runtime]\nuri = \"tcp://docker:2375\"\n"),
                "moby_runtime.uri",
            ),
            ("hostname = \"h\"\nhomedir = \"relative\"\n[agent.config]\nimage = \"i\"\n".into(), "absolute"),
            (
                "hostname = \"h\"\nhomedir = \"/h\"\n[agent]\ntype = \"rkt\"\n[agent.config]\nimage = \"i\"\n".into(),
                "agent.type",
            ),
            (
                format!("{base}[process_runtime]\nuid_start = 5000\n"),
                "only used with agent.type = \"process\"",
            ),
            (
                format!("{PROCESS}[process_runtime]\nuid_start = 0\n"),
                "process_runtime.uid_start",
            ),
            (
                format!("{PROCESS}[process_runtime]\nuid_start = 4294967000\nuid_count = 1000\n"),
                "process_runtime.uid_count",
            ),
            (
                format!("{PROCESS}[process_runtime]\ncgroup_name = \"a/b\"\n"),
                "process_runtime.cgroup_name",
            ),
            (
                format!("{PROCESS}[process_runtime]\nlog_max_bytes = 10\n"),
                "process_runtime.log_max_bytes",
            ),
            (
                format!("{PROCESS}[process_runtime]\nuid_range = 1\n"),
                "unknown field `uid_range`",
            ),
        ];
        for (text, expected) in cases {
            let message = error_of(&text);
            assert!(
                message.contains(expected),
                "{expected:?} not in {message:?}"
            );
        }
    }

    #[test]
    fn renewal_and_day_values() {
        assert_eq!(parse_renewal_time("80%"), Some(RenewalTime::Percent(80)));
        assert_eq!(parse_renewal_time("0%"), None);
        assert_eq!(
            parse_renewal_time("2day"),
            Some(RenewalTime::Duration(std::time::Duration::from_secs(
                172_800
            )))
        );
        assert_eq!(parse_renewal_time("0min"), None);
        assert_eq!(parse_days("1d"), Some(86_400));
        assert_eq!(parse_days("3 days"), Some(3 * 86_400));
        assert_eq!(parse_days("1h"), None);
        assert_eq!(parse_clock("00:00"), Some(0));
        assert_eq!(parse_clock("7:00"), None);
    }
}
