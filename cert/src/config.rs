//! certd's configuration: `config.toml` plus `config.d/*.toml`, merged by config-common, then
//! validated into [`Config`]. Both the reference layout (`[preloaded_certs]`) and the seed's flat
//! `"preloaded_cert:<id>" = "/abs/path"` keys are accepted.
//!
//! The reloadable part (principals, `cert_issuance`, `preloaded_certs`) is kept apart in
//! [`Policy`] so a config change can replace it without a restart. EST settings
//! (`[cert_issuance.est]` and per-cert `method = "est"`) are resolved here into one [`EstTarget`]
//! per EST-issued cert ID, so the issuance code never looks up defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;

use config_common::{ConfigError, Loaded};
use serde::Deserialize;

/// The default listener.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/aziot/certd.sock";
/// The default keyd endpoint.
pub const DEFAULT_KEYD_ENDPOINT: &str = "unix:///run/aziot/keyd.sock";
/// The default base config file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/aziot/certd/config.toml";
/// The default drop-in folder.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/aziot/certd/config.d";
/// Key algorithms for draft-route key pairs when `key_algorithms` is not set.
pub const DEFAULT_KEY_ALGORITHMS: &str = "ec-p256:rsa-2048";
/// Validity of issued certificates when `expiry_days` is not set.
pub const DEFAULT_EXPIRY_DAYS: u32 = 30;
/// The Edge CA's cert IDs (edged's Edge CA and its renewal temp), which may be issued as CAs by
/// an implicit issuer unless their `[cert_issuance.<id>]` says `ca = false`.
pub const EDGE_CA_CERT_IDS: [&str; 2] = ["aziot-edged-ca", "aziot-edged-ca-temp"];

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Store root; dynamic certs live in `<homedir>/certs`.
    pub homedir: PathBuf,
    /// Per-uid concurrent connection budget.
    pub max_requests: usize,
    /// certd's listener URI.
    pub endpoint: String,
    /// keyd's URI.
    pub keyd_endpoint: String,
    /// The parts that a reload may change.
    pub policy: Policy,
}

/// The reloadable part of the configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Who may write which cert IDs.
    pub principals: Vec<Principal>,
    /// `[cert_issuance.local_ca]`.
    pub local_ca: Option<LocalCa>,
    /// `[cert_issuance.<certId>]`, by cert ID.
    pub issuance: BTreeMap<String, IssuanceOptions>,
    /// Preloaded certs, by cert ID.
    pub preloaded: BTreeMap<String, Preloaded>,
    /// `[cert_issuance.est]`: server trust and identity auto-renewal (set when any cert is
    /// EST-issued or the table is present).
    pub est: Option<EstSettings>,
}

/// A cert ID plus the keyd key pair ID of its private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertWithKey {
    /// The cert ID.
    pub cert: String,
    /// The keyd key pair ID.
    pub pk: String,
}

/// How certd authenticates to an EST server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EstAuth {
    /// HTTP Basic `(username, password)`.
    pub basic: Option<(String, String)>,
    /// The TLS client identity (`identity_cert` / `identity_pk`).
    pub identity: Option<CertWithKey>,
    /// Used to enroll `identity` when it does not exist yet.
    pub bootstrap: Option<CertWithKey>,
}

impl EstAuth {
    fn is_empty(&self) -> bool {
        self.basic.is_none() && self.identity.is_none() && self.bootstrap.is_none()
    }
}

/// Where and how one cert ID is enrolled over EST.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EstTarget {
    /// The base URL, ending in `/` (`simpleenroll`, `cacerts` are appended).
    pub url: String,
    /// Authentication (the cert's own, else `[cert_issuance.est]`'s).
    pub auth: EstAuth,
}

/// `[cert_issuance.est]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EstSettings {
    /// Cert IDs of CA certs trusted for the EST server's TLS certificate (besides system roots).
    pub trusted_certs: Vec<String>,
    /// The global authentication.
    pub auth: EstAuth,
    /// `urls`: cert ID (or `default`) → base URL ending in `/`.
    pub urls: BTreeMap<String, String>,
    /// `identity_auto_renew`.
    pub auto_renew: AutoRenew,
}

/// `[cert_issuance.est.identity_auto_renew]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoRenew {
    /// Renew with a new key (`<pk>-temp`, moved over `<pk>` on success).
    pub rotate_key: bool,
    /// When to renew.
    pub threshold: config_common::renewal::Policy,
    /// How long to wait after a failed attempt.
    pub retry: config_common::renewal::Policy,
}

impl Default for AutoRenew {
    fn default() -> Self {
        AutoRenew {
            rotate_key: true,
            threshold: config_common::renewal::Policy::Percent(80),
            retry: config_common::renewal::Policy::Percent(4),
        }
    }
}

impl Policy {
    /// Whether cert `id` may be issued as a CA (CSR asking for basicConstraints CA:TRUE,
    /// keyUsage keyCertSign, ...) when the caller names no issuer. `[cert_issuance.<id>] ca`
    /// decides when set; otherwise only the local CA's own cert ID and the Edge CA IDs
    /// ([`EDGE_CA_CERT_IDS`]) may, so reference configs, which have no `ca` key, keep issuing
    /// the Edge CA.
    pub fn may_be_ca(&self, id: &str) -> bool {
        match self.issuance.get(id).and_then(|options| options.ca) {
            Some(ca) => ca,
            None => {
                EDGE_CA_CERT_IDS.contains(&id)
                    || self
                        .local_ca
                        .as_ref()
                        .is_some_and(|local_ca| local_ca.cert == id)
            }
        }
    }
}

/// `[[principal]] uid = N, certs = ["glob", ...]`: write access.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Principal {
    /// The caller's uid.
    pub uid: u32,
    /// Cert ID globs (`*`, `?`).
    #[serde(default)]
    pub certs: Vec<String>,
}

/// `[cert_issuance.local_ca]`: the local CA's cert ID and keyd key ID.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalCa {
    /// The CA certificate's cert ID.
    pub cert: String,
    /// The CA private key's keyd key pair ID.
    pub pk: String,
}

/// How a cert ID is issued when the request names no issuer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Signed by keyd key pair `<certId>`.
    SelfSigned,
    /// Signed by the local CA.
    LocalCa,
    /// EST enrollment (RFC 7030) at the cert's [`EstTarget`].
    Est,
}

/// The subject an issuance option imposes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectSpec {
    /// `common_name = "..."`: the subject is just this CN.
    CommonName(String),
    /// `subject = { CN = "...", O = "..." }`: attribute short name → value, in DN order.
    Fields(Vec<(String, String)>),
}

/// `[cert_issuance.<certId>]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IssuanceOptions {
    /// The method, if set.
    pub method: Option<Method>,
    /// The imposed subject, if any.
    pub subject: Option<SubjectSpec>,
    /// Validity in days (default [`DEFAULT_EXPIRY_DAYS`]).
    pub expiry_days: Option<u32>,
    /// keyd algorithm preference for draft-route key pairs.
    pub key_algorithms: Option<String>,
    /// `ca`: whether an implicit issuer (self-signed, local CA) may issue this cert ID as a CA;
    /// unset means the default of [`Policy::may_be_ca`].
    pub ca: Option<bool>,
    /// With `method = "est"`: the resolved server and authentication.
    pub est: Option<EstTarget>,
}

/// A preloaded cert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Preloaded {
    /// Read from this file on every request.
    File(PathBuf),
    /// The concatenation of these certs, in order.
    List(Vec<String>),
}

/// Short names accepted in `subject` tables, their OIDs, and their place in the DN (lower first).
pub use cert_api::subject::ATTRIBUTES as SUBJECT_ATTRIBUTES;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoints {
    aziot_certd: Option<String>,
    aziot_keyd: Option<String>,
    // Written by shared tooling into every daemon's endpoints table; certd does not call them.
    #[allow(dead_code)]
    aziot_identityd: Option<String>,
    #[allow(dead_code)]
    aziot_tpmd: Option<String>,
}

/// One `[cert_issuance.*]` table. `local_ca` uses `cert`/`pk`; `est` the EST fields.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuance {
    method: Option<Method>,
    common_name: Option<String>,
    subject: Option<BTreeMap<String, String>>,
    expiry_days: Option<i64>,
    key_algorithms: Option<String>,
    ca: Option<bool>,
    cert: Option<String>,
    pk: Option<String>,
    // EST settings: per-cert (`url` and the auth fields) or in `[cert_issuance.est]` (the auth
    // fields, `trusted_certs`, `urls`, `identity_auto_renew`).
    url: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identity_cert: Option<String>,
    identity_pk: Option<String>,
    bootstrap_identity_cert: Option<String>,
    bootstrap_identity_pk: Option<String>,
    trusted_certs: Option<Vec<String>>,
    identity_auto_renew: Option<RawAutoRenew>,
    urls: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutoRenew {
    rotate_key: Option<bool>,
    threshold: Option<String>,
    retry: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPreloaded {
    Uri(String),
    List(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    homedir_path: Option<String>,
    max_requests: Option<i64>,
    #[serde(default)]
    cert_issuance: BTreeMap<String, RawIssuance>,
    #[serde(default)]
    preloaded_certs: BTreeMap<String, RawPreloaded>,
    #[serde(default)]
    principal: Vec<Principal>,
    #[serde(default)]
    endpoints: RawEndpoints,
    /// The seed's flat `"preloaded_cert:<id>"` keys, checked by hand.
    #[serde(flatten)]
    rest: BTreeMap<String, toml::Value>,
}

const PRELOADED_PREFIX: &str = "preloaded_cert:";

/// Checks a cert ID: 1–512 bytes of UTF-8 without NUL or ASCII control characters. Returns the
/// reason when it is not acceptable.
pub fn cert_id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("must not be empty")
    } else if id.len() > 512 {
        Some("must be at most 512 bytes")
    } else if id.chars().any(|character| character.is_ascii_control()) {
        Some("must not contain control characters")
    } else {
        None
    }
}

/// Parses a preloaded file location: `file:///abs/path` (percent-decoded) or `/abs/path`.
fn preloaded_path(value: &str) -> Result<PathBuf, &'static str> {
    let path = match value.strip_prefix("file://") {
        Some(rest) => percent_encoding::percent_decode_str(rest)
            .decode_utf8()
            .map_err(|_| "the file:// URI is not valid UTF-8 after percent-decoding")?
            .into_owned(),
        None => value.to_owned(),
    };
    if !path.starts_with('/') {
        return Err(
            "expected a file:///absolute/path URI, an absolute path, or a list of cert IDs",
        );
    }
    Ok(PathBuf::from(path))
}

impl Config {
    /// Validates a merged configuration table.
    pub fn from_loaded(loaded: &Loaded) -> Result<Config, ConfigError> {
        let raw: RawConfig = loaded.deserialize()?;

        let mut preloaded: BTreeMap<String, (String, Preloaded)> = BTreeMap::new();
        for (name, value) in &raw.rest {
            let Some(id) = name.strip_prefix(PRELOADED_PREFIX) else {
                return Err(ConfigError::invalid(loaded, name.clone(), "unknown field"));
            };
            let toml::Value::String(value) = value else {
                return Err(ConfigError::invalid(
                    loaded,
                    name.clone(),
                    "expected a string (an absolute path)",
                ));
            };
            if let Some(problem) = cert_id_problem(id) {
                return Err(ConfigError::invalid(
                    loaded,
                    name.clone(),
                    format!("invalid cert ID: {problem}"),
                ));
            }
            let path = preloaded_path(value)
                .map_err(|reason| ConfigError::invalid(loaded, name.clone(), reason))?;
            preloaded.insert(id.to_owned(), (name.clone(), Preloaded::File(path)));
        }
        for (id, value) in raw.preloaded_certs {
            let key = format!("preloaded_certs.{id}");
            if let Some(problem) = cert_id_problem(&id) {
                return Err(ConfigError::invalid(
                    loaded,
                    "preloaded_certs",
                    format!("invalid cert ID {id:?}: {problem}"),
                ));
            }
            let entry = match value {
                RawPreloaded::Uri(uri) => Preloaded::File(
                    preloaded_path(&uri)
                        .map_err(|reason| ConfigError::invalid(loaded, &key, reason))?,
                ),
                RawPreloaded::List(members) => Preloaded::List(members),
            };
            if let Some((previous_key, previous)) = preloaded.get(&id) {
                if *previous != entry {
                    return Err(ConfigError::invalid(
                        loaded,
                        key,
                        format!(
                            "conflicts with `{previous_key}`, which is set to a different value"
                        ),
                    ));
                }
            }
            preloaded.insert(id, (key, entry));
        }
        for (id, (key, entry)) in &preloaded {
            let Preloaded::List(members) = entry else {
                continue;
            };
            for member in members {
                if member == id {
                    return Err(ConfigError::invalid(loaded, key, "the list names itself"));
                }
                if let Some(problem) = cert_id_problem(member) {
                    return Err(ConfigError::invalid(
                        loaded,
                        key,
                        format!("invalid cert ID {member:?}: {problem}"),
                    ));
                }
                if let Some((_, Preloaded::List(_))) = preloaded.get(member) {
                    return Err(ConfigError::invalid(
                        loaded,
                        key,
                        format!("member {member:?} is itself a list; lists cannot be nested"),
                    ));
                }
            }
        }

        let mut local_ca = None;
        let mut est_table = None;
        let mut issuance = BTreeMap::new();
        for (id, options) in raw.cert_issuance {
            let key = format!("cert_issuance.{id}");
            if id == "est" {
                est_table = Some(parse_est_table(loaded, &key, options)?);
                continue;
            }
            if id == "local_ca" {
                local_ca = Some(parse_local_ca(loaded, &key, options)?);
                continue;
            }
            if let Some(problem) = cert_id_problem(&id) {
                return Err(ConfigError::invalid(
                    loaded,
                    key,
                    format!("invalid cert ID: {problem}"),
                ));
            }
            let mut options = options;
            let cert_est = take_cert_est(loaded, &key, &mut options)?;
            let mut parsed = parse_options(loaded, &key, options)?;
            if parsed.method == Some(Method::Est) {
                parsed.est = Some(EstTarget {
                    url: cert_est.0.unwrap_or_default(),
                    auth: cert_est.1,
                });
            } else if cert_est.0.is_some() || !cert_est.1.is_empty() {
                let field = if cert_est.0.is_some() { "url" } else { "auth" };
                return Err(ConfigError::invalid(
                    loaded,
                    format!("{key}.{field}"),
                    "EST settings need method = \"est\"",
                ));
            }
            issuance.insert(id, parsed);
        }
        let est = resolve_est(loaded, est_table, &mut issuance)?;
        for (id, options) in &issuance {
            if options.method == Some(Method::LocalCa) && local_ca.is_none() {
                return Err(ConfigError::invalid(
                    loaded,
                    format!("cert_issuance.{id}.method"),
                    "method \"local_ca\" needs [cert_issuance.local_ca] with cert and pk",
                ));
            }
        }

        for (index, principal) in raw.principal.iter().enumerate() {
            if principal.certs.iter().any(String::is_empty) {
                return Err(ConfigError::invalid(
                    loaded,
                    format!("principal[{index}].certs"),
                    "empty glob",
                ));
            }
        }

        let Some(homedir) = raw.homedir_path else {
            return Err(ConfigError::invalid(loaded, "homedir_path", "is required"));
        };
        if !homedir.starts_with('/') {
            return Err(ConfigError::invalid(
                loaded,
                "homedir_path",
                "must be an absolute path",
            ));
        }
        let max_requests = match raw.max_requests {
            None => 10,
            Some(value) => usize::try_from(value)
                .ok()
                .filter(|value| *value > 0)
                .ok_or_else(|| {
                    ConfigError::invalid(loaded, "max_requests", "must be at least 1")
                })?,
        };

        let endpoint = http_common::daemon::listener_endpoint(
            loaded,
            "aziot_certd",
            raw.endpoints.aziot_certd,
            DEFAULT_ENDPOINT,
        )?;
        let keyd_endpoint = http_common::daemon::peer_endpoint(
            loaded,
            "aziot_keyd",
            raw.endpoints.aziot_keyd,
            DEFAULT_KEYD_ENDPOINT,
        )?;

        Ok(Config {
            homedir: PathBuf::from(homedir),
            max_requests,
            endpoint,
            keyd_endpoint,
            policy: Policy {
                principals: raw.principal,
                local_ca,
                issuance,
                preloaded: preloaded
                    .into_iter()
                    .map(|(id, (_, entry))| (id, entry))
                    .collect(),
                est,
            },
        })
    }
}

fn parse_local_ca(loaded: &Loaded, key: &str, raw: RawIssuance) -> Result<LocalCa, ConfigError> {
    let extra = [
        ("method", raw.method.is_some()),
        ("common_name", raw.common_name.is_some()),
        ("subject", raw.subject.is_some()),
        ("expiry_days", raw.expiry_days.is_some()),
        ("key_algorithms", raw.key_algorithms.is_some()),
        ("ca", raw.ca.is_some()),
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
        ("trusted_certs", raw.trusted_certs.is_some()),
        ("identity_auto_renew", raw.identity_auto_renew.is_some()),
        ("urls", raw.urls.is_some()),
    ];
    if let Some((field, _)) = extra.iter().find(|(_, present)| *present) {
        return Err(ConfigError::invalid(
            loaded,
            format!("{key}.{field}"),
            "only cert and pk may be set in [cert_issuance.local_ca]",
        ));
    }
    let required = |value: Option<String>, field: &str| {
        value
            .filter(|value| cert_id_problem(value).is_none())
            .ok_or_else(|| {
                ConfigError::invalid(
                    loaded,
                    format!("{key}.{field}"),
                    "a non-empty ID is required",
                )
            })
    };
    Ok(LocalCa {
        cert: required(raw.cert, "cert")?,
        pk: required(raw.pk, "pk")?,
    })
}

fn parse_options(
    loaded: &Loaded,
    key: &str,
    raw: RawIssuance,
) -> Result<IssuanceOptions, ConfigError> {
    for (field, present) in [("cert", raw.cert.is_some()), ("pk", raw.pk.is_some())] {
        if present {
            return Err(ConfigError::invalid(
                loaded,
                format!("{key}.{field}"),
                "only allowed in [cert_issuance.local_ca]",
            ));
        }
    }
    let subject = match (raw.common_name, raw.subject) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::invalid(
                loaded,
                format!("{key}.subject"),
                "common_name and subject cannot both be set",
            ))
        }
        (Some(common_name), None) => {
            if common_name.is_empty() {
                return Err(ConfigError::invalid(
                    loaded,
                    format!("{key}.common_name"),
                    "must not be empty",
                ));
            }
            Some(SubjectSpec::CommonName(common_name))
        }
        (None, Some(fields)) => {
            if fields.is_empty() {
                return Err(ConfigError::invalid(
                    loaded,
                    format!("{key}.subject"),
                    "must name at least one attribute",
                ));
            }
            for name in fields.keys() {
                if !SUBJECT_ATTRIBUTES.iter().any(|(known, _)| known == name) {
                    let known: Vec<&str> =
                        SUBJECT_ATTRIBUTES.iter().map(|(name, _)| *name).collect();
                    return Err(ConfigError::invalid(
                        loaded,
                        format!("{key}.subject.{name}"),
                        format!("unknown attribute; expected one of {}", known.join(", ")),
                    ));
                }
            }
            let mut ordered: Vec<(String, String)> = fields.into_iter().collect();
            ordered.sort_by_key(|(name, _)| {
                SUBJECT_ATTRIBUTES
                    .iter()
                    .position(|(known, _)| known == name)
                    .unwrap_or(usize::MAX)
            });
            Some(SubjectSpec::Fields(ordered))
        }
        (None, None) => None,
    };
    let expiry_days = match raw.expiry_days {
        None => None,
        Some(days) => Some(
            u32::try_from(days)
                .ok()
                .filter(|days| *days > 0 && *days <= 365 * 100)
                .ok_or_else(|| {
                    ConfigError::invalid(
                        loaded,
                        format!("{key}.expiry_days"),
                        "expiry_days must be greater than 0 (and at most 36500)",
                    )
                })?,
        ),
    };
    if let Some(algorithms) = &raw.key_algorithms {
        if algorithms.is_empty() {
            return Err(ConfigError::invalid(
                loaded,
                format!("{key}.key_algorithms"),
                "must not be empty",
            ));
        }
    }
    Ok(IssuanceOptions {
        method: raw.method,
        subject,
        expiry_days,
        key_algorithms: raw.key_algorithms,
        ca: raw.ca,
        est: None,
    })
}

/// Checks an EST base URL (`http://` or `https://`, with a host) and returns it ending in `/`.
fn est_url(loaded: &Loaded, key: &str, url: &str) -> Result<String, ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| ConfigError::invalid(loaded, key, "not a valid URL"))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") => log::warn!(
            "EST server URL {url:?} ({key}) uses unencrypted HTTP, which exposes the device to \
             man-in-the-middle attacks; configure HTTPS for the EST server"
        ),
        _ => {
            return Err(ConfigError::invalid(
                loaded,
                key,
                "must be an http:// or https:// URL",
            ))
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid(loaded, key, "the URL has no host"));
    }
    if uri.query().is_some() {
        return Err(ConfigError::invalid(
            loaded,
            key,
            "the URL must not have a query",
        ));
    }
    let mut url = url.to_owned();
    if !url.ends_with('/') {
        url.push('/');
    }
    Ok(url)
}

/// Reads the EST authentication fields of one table: Basic needs both `username` and
/// `password`, a TLS identity both `identity_cert` and `identity_pk`, and a bootstrap identity
/// both of its fields and an identity to enroll.
fn take_auth(loaded: &Loaded, key: &str, raw: &mut RawIssuance) -> Result<EstAuth, ConfigError> {
    let pair = |first: Option<String>,
                second: Option<String>,
                names: (&str, &str)|
     -> Result<Option<(String, String)>, ConfigError> {
        match (first, second) {
            (None, None) => Ok(None),
            (Some(first), Some(second)) => {
                if first.is_empty() {
                    return Err(ConfigError::invalid(
                        loaded,
                        format!("{key}.{}", names.0),
                        "must not be empty",
                    ));
                }
                Ok(Some((first, second)))
            }
            (Some(_), None) => Err(ConfigError::invalid(
                loaded,
                format!("{key}.{}", names.1),
                format!("is required with {}", names.0),
            )),
            (None, Some(_)) => Err(ConfigError::invalid(
                loaded,
                format!("{key}.{}", names.0),
                format!("is required with {}", names.1),
            )),
        }
    };
    let id_pair = |cert: Option<String>,
                   pk: Option<String>,
                   names: (&str, &str)|
     -> Result<Option<CertWithKey>, ConfigError> {
        let Some((cert, pk)) = pair(cert, pk, names)? else {
            return Ok(None);
        };
        for (value, name) in [(&cert, names.0), (&pk, names.1)] {
            if let Some(problem) = cert_id_problem(value) {
                return Err(ConfigError::invalid(
                    loaded,
                    format!("{key}.{name}"),
                    format!("invalid ID: {problem}"),
                ));
            }
        }
        Ok(Some(CertWithKey { cert, pk }))
    };
    let basic = pair(
        raw.username.take(),
        raw.password.take(),
        ("username", "password"),
    )?;
    let identity = id_pair(
        raw.identity_cert.take(),
        raw.identity_pk.take(),
        ("identity_cert", "identity_pk"),
    )?;
    let bootstrap = id_pair(
        raw.bootstrap_identity_cert.take(),
        raw.bootstrap_identity_pk.take(),
        ("bootstrap_identity_cert", "bootstrap_identity_pk"),
    )?;
    if bootstrap.is_some() && identity.is_none() {
        return Err(ConfigError::invalid(
            loaded,
            format!("{key}.identity_cert"),
            "is required with bootstrap_identity_cert (the identity the bootstrap cert enrolls)",
        ));
    }
    Ok(EstAuth {
        basic,
        identity,
        bootstrap,
    })
}

/// Takes the per-cert EST fields (`url` and authentication) out of `raw`; the fields only
/// `[cert_issuance.est]` may have are refused.
fn take_cert_est(
    loaded: &Loaded,
    key: &str,
    raw: &mut RawIssuance,
) -> Result<(Option<String>, EstAuth), ConfigError> {
    for (field, present) in [
        ("trusted_certs", raw.trusted_certs.is_some()),
        ("urls", raw.urls.is_some()),
        ("identity_auto_renew", raw.identity_auto_renew.is_some()),
    ] {
        if present {
            return Err(ConfigError::invalid(
                loaded,
                format!("{key}.{field}"),
                "only allowed in [cert_issuance.est]",
            ));
        }
    }
    let url = match raw.url.take() {
        Some(url) => Some(est_url(loaded, &format!("{key}.url"), &url)?),
        None => None,
    };
    Ok((url, take_auth(loaded, key, raw)?))
}

fn renew_policy(
    loaded: &Loaded,
    key: &str,
    value: Option<String>,
    default: config_common::renewal::Policy,
) -> Result<config_common::renewal::Policy, ConfigError> {
    match value {
        None => Ok(default),
        Some(text) => config_common::renewal::Policy::parse(&text).ok_or_else(|| {
            ConfigError::invalid(loaded, key, config_common::renewal::Policy::EXPECTED)
        }),
    }
}

/// Parses `[cert_issuance.est]`.
fn parse_est_table(
    loaded: &Loaded,
    key: &str,
    mut raw: RawIssuance,
) -> Result<EstSettings, ConfigError> {
    let extra = [
        ("method", raw.method.is_some()),
        ("common_name", raw.common_name.is_some()),
        ("subject", raw.subject.is_some()),
        ("expiry_days", raw.expiry_days.is_some()),
        ("key_algorithms", raw.key_algorithms.is_some()),
        ("ca", raw.ca.is_some()),
        ("cert", raw.cert.is_some()),
        ("pk", raw.pk.is_some()),
        ("url", raw.url.is_some()),
    ];
    if let Some((field, _)) = extra.iter().find(|(_, present)| *present) {
        let hint = if *field == "url" {
            "not allowed in [cert_issuance.est]; use [cert_issuance.est.urls] default = \"...\""
        } else {
            "not allowed in [cert_issuance.est]"
        };
        return Err(ConfigError::invalid(loaded, format!("{key}.{field}"), hint));
    }
    let auth = take_auth(loaded, key, &mut raw)?;
    let trusted_certs = raw.trusted_certs.unwrap_or_default();
    for (index, id) in trusted_certs.iter().enumerate() {
        if let Some(problem) = cert_id_problem(id) {
            return Err(ConfigError::invalid(
                loaded,
                format!("{key}.trusted_certs[{index}]"),
                format!("invalid cert ID: {problem}"),
            ));
        }
    }
    let mut urls = BTreeMap::new();
    for (id, url) in raw.urls.unwrap_or_default() {
        let url = est_url(loaded, &format!("{key}.urls.{id}"), &url)?;
        urls.insert(id, url);
    }
    let defaults = AutoRenew::default();
    let auto_renew = match raw.identity_auto_renew {
        None => defaults,
        Some(renew) => {
            let renew_key = format!("{key}.identity_auto_renew");
            AutoRenew {
                rotate_key: renew.rotate_key.unwrap_or(defaults.rotate_key),
                threshold: renew_policy(
                    loaded,
                    &format!("{renew_key}.threshold"),
                    renew.threshold,
                    defaults.threshold,
                )?,
                retry: renew_policy(
                    loaded,
                    &format!("{renew_key}.retry"),
                    renew.retry,
                    defaults.retry,
                )?,
            }
        }
    };
    Ok(EstSettings {
        trusted_certs,
        auth,
        urls,
        auto_renew,
    })
}

/// Completes every `method = "est"` cert's target: the URL from the cert, `urls.<certId>` or
/// `urls.default`, the authentication from the cert or `[cert_issuance.est]`. Returns the EST
/// settings when EST is used at all.
fn resolve_est(
    loaded: &Loaded,
    table: Option<EstSettings>,
    issuance: &mut BTreeMap<String, IssuanceOptions>,
) -> Result<Option<EstSettings>, ConfigError> {
    let uses_est = issuance
        .values()
        .any(|options| options.method == Some(Method::Est));
    if !uses_est {
        return Ok(table);
    }
    let settings = table.unwrap_or_else(|| EstSettings {
        trusted_certs: Vec::new(),
        auth: EstAuth::default(),
        urls: BTreeMap::new(),
        auto_renew: AutoRenew::default(),
    });
    for (id, options) in issuance.iter_mut() {
        let Some(target) = options.est.as_mut() else {
            continue;
        };
        if target.url.is_empty() {
            target.url = settings
                .urls
                .get(id)
                .or_else(|| settings.urls.get("default"))
                .cloned()
                .ok_or_else(|| {
                    ConfigError::invalid(
                        loaded,
                        format!("cert_issuance.{id}.url"),
                        "method \"est\" needs a url here or in [cert_issuance.est.urls] \
                         (the cert ID or default)",
                    )
                })?;
        }
        if target.auth.is_empty() {
            target.auth = settings.auth.clone();
        }
    }
    Ok(Some(settings))
}

pub use config_common::glob_matches;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let table: toml::Table = text.parse().unwrap();
        let loaded = Loaded {
            table: table.clone(),
            sources: vec![(PathBuf::from("/etc/certd/config.toml"), table)],
        };
        Config::from_loaded(&loaded).map_err(|error| error.to_string())
    }

    #[test]
    fn full_example_parses() {
        let config = parse(
            r#"
            homedir_path = "/var/lib/aziot/certd"
            max_requests = 20
            "preloaded_cert:seed" = "/var/secrets/seed.cer"

            [cert_issuance.local_ca]
            cert = "local-ca"
            pk = "local-ca"

            [cert_issuance.device-id]
            method = "local_ca"
            common_name = "my-device"
            expiry_days = 365

            [cert_issuance.aziot-edged-ca]
            method = "self_signed"
            subject = { O = "Contoso", CN = "edge ca", C = "US" }

            [preloaded_certs]
            local-ca = "file:///var/secrets/local%2Dca.pem"
            aziot-edged-trust-bundle = ["aziot-edged-ca", "trust-bundle-user"]

            [[principal]]
            uid = 5558
            certs = ["aziot-edged-ca", "aziot-edged/module/*"]

            [endpoints]
            aziot_certd = "unix:///tmp/certd.sock"
            aziot_keyd = "unix:///tmp/keyd.sock"
            aziot_identityd = "unix:///tmp/identityd.sock"
            "#,
        )
        .unwrap();
        assert_eq!(config.max_requests, 20);
        assert_eq!(config.endpoint, "unix:///tmp/certd.sock");
        assert_eq!(config.keyd_endpoint, "unix:///tmp/keyd.sock");
        let policy = &config.policy;
        assert_eq!(
            policy.local_ca,
            Some(LocalCa {
                cert: "local-ca".into(),
                pk: "local-ca".into()
            })
        );
        assert_eq!(
            policy.preloaded["local-ca"],
            Preloaded::File("/var/secrets/local-ca.pem".into())
        );
        assert_eq!(
            policy.preloaded["seed"],
            Preloaded::File("/var/secrets/seed.cer".into())
        );
        assert_eq!(
            policy.issuance["device-id"],
            IssuanceOptions {
                method: Some(Method::LocalCa),
                subject: Some(SubjectSpec::CommonName("my-device".into())),
                expiry_days: Some(365),
                key_algorithms: None,
                ca: None,
                est: None,
            }
        );
        assert_eq!(
            policy.issuance["aziot-edged-ca"].subject,
            Some(SubjectSpec::Fields(vec![
                ("C".into(), "US".into()),
                ("O".into(), "Contoso".into()),
                ("CN".into(), "edge ca".into()),
            ]))
        );
    }

    #[test]
    fn ca_rule_defaults_and_key() {
        let config = parse(
            r#"
            homedir_path = "/h"
            [cert_issuance.local_ca]
            cert = "my-root"
            pk = "my-root-key"
            [cert_issuance.my-root]
            method = "self_signed"
            [cert_issuance.aziot-edged-ca]
            method = "self_signed"
            [cert_issuance.aziot-edged-ca-temp]
            method = "self_signed"
            ca = false
            [cert_issuance.sub-ca]
            method = "local_ca"
            ca = true
            [cert_issuance.leaf]
            method = "local_ca"
            "#,
        )
        .unwrap();
        let policy = &config.policy;
        assert_eq!(policy.issuance["sub-ca"].ca, Some(true));
        assert!(policy.may_be_ca("my-root"), "the local CA's own cert ID");
        assert!(policy.may_be_ca("aziot-edged-ca"), "the Edge CA by default");
        assert!(!policy.may_be_ca("aziot-edged-ca-temp"), "ca = false wins");
        assert!(policy.may_be_ca("sub-ca"));
        assert!(!policy.may_be_ca("leaf"));
        assert!(!policy.may_be_ca("unconfigured"));
        assert!(!policy.may_be_ca("my-root-key"));
        // Without a local CA, only the Edge CA IDs default to CA-allowed.
        let policy = Policy::default();
        assert!(policy.may_be_ca("aziot-edged-ca-temp"));
        assert!(!policy.may_be_ca("local-ca"));

        let error = parse(
            "homedir_path = \"/h\"\n[cert_issuance.local_ca]\ncert = \"a\"\npk = \"a\"\nca = true",
        )
        .unwrap_err();
        assert!(error.contains("cert_issuance.local_ca.ca"), "{error}");
        let error = parse("homedir_path = \"/h\"\n[cert_issuance.x]\nca = \"yes\"").unwrap_err();
        assert!(error.contains("cert_issuance.x.ca"), "{error}");
    }

    #[test]
    fn defaults() {
        let config = parse("homedir_path = \"/h\"").unwrap();
        assert_eq!(config.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(config.keyd_endpoint, DEFAULT_KEYD_ENDPOINT);
        assert_eq!(config.max_requests, 10);
        assert_eq!(config.policy, Policy::default());
    }

    #[test]
    fn invalid_configs_name_the_key() {
        let cases = [
            ("", "key `homedir_path`: is required"),
            ("homedir_path = \"rel\"", "must be an absolute path"),
            ("homedir_path = \"/h\"\nsurprise = 1", "`surprise`: unknown field"),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\nmethod = \"est\"",
                "cert_issuance.x.url",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\nurl = \"https://est\"",
                "cert_issuance.x.url",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\nmethod = \"est\"\nurl = \"ftp://est/\"",
                "cert_issuance.x.url",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\nmethod = \"est\"\nurl = \"https://est/\"\nusername = \"u\"",
                "cert_issuance.x.password",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\nmethod = \"est\"\nurl = \"https://est/\"\nbootstrap_identity_cert = \"b\"\nbootstrap_identity_pk = \"b\"",
                "cert_issuance.x.identity_cert",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\nmethod = \"est\"\nurl = \"https://est/\"\ntrusted_certs = []",
                "cert_issuance.x.trusted_certs",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.est]\nurl = \"https://est/\"",
                "cert_issuance.est.url",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.est.identity_auto_renew]\nthreshold = \"100%\"",
                "cert_issuance.est.identity_auto_renew.threshold",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.est.identity_auto_renew]\nretry = \"0min\"",
                "cert_issuance.est.identity_auto_renew.retry",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.est.identity_auto_renew]\nsoon = true",
                "cert_issuance.est",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.est.urls]\ndefault = \"est.example\"",
                "cert_issuance.est.urls.default",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\nexpiry_days = 0",
                "expiry_days must be greater than 0",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\ncommon_name = \"a\"\nsubject = { CN = \"b\" }",
                "common_name and subject cannot both be set",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\nsubject = { XX = \"b\" }",
                "cert_issuance.x.subject.XX",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\nmethod = \"magic\"",
                "cert_issuance.x.method",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\nmethod = \"local_ca\"",
                "needs [cert_issuance.local_ca]",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.local_ca]\ncert = \"c\"",
                "cert_issuance.local_ca.pk",
            ),
            (
                "homedir_path = \"/h\"\n[cert_issuance.x]\nbogus = 1",
                "cert_issuance.x.bogus",
            ),
            (
                "homedir_path = \"/h\"\n[preloaded_certs]\nx = \"relative\"",
                "preloaded_certs.x",
            ),
            (
                "homedir_path = \"/h\"\n[preloaded_certs]\nx = [\"x\"]",
                "the list names itself",
            ),
            (
                "homedir_path = \"/h\"\n[preloaded_certs]\nx = [\"y\"]\ny = [\"z\"]",
                "lists cannot be nested",
            ),
            (
                "homedir_path = \"/h\"\n\"preloaded_cert:x\" = \"/a\"\n[preloaded_certs]\nx = \"file:///b\"",
                "conflicts",
            ),
            (
                "homedir_path = \"/h\"\n[[principal]]\nuid = \"x\"",
                "principal[0].uid",
            ),
            (
                "homedir_path = \"/h\"\n[[principal]]\nuid = 1\ncerts = [\"\"]",
                "principal[0].certs",
            ),
            ("homedir_path = \"/h\"\nmax_requests = 0", "max_requests"),
            (
                "homedir_path = \"/h\"\n[endpoints]\naziot_edged = \"x\"",
                "endpoints.aziot_edged",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.contains("/etc/certd/config.toml"), "{error}");
        }
        // The same preloaded cert given identically both ways is fine.
        parse("homedir_path = \"/h\"\n\"preloaded_cert:x\" = \"/a\"\n[preloaded_certs]\nx = \"file:///a\"")
            .unwrap();
    }

    #[test]
    fn est_configs_resolve_urls_and_auth() {
        let config = parse(
            r#"
            homedir_path = "/h"
            [cert_issuance.est]
            trusted_certs = ["est-ca"]
            username = "user"
            password = "secret"
            identity_cert = "est-id"
            identity_pk = "est-id"
            bootstrap_identity_cert = "est-boot"
            bootstrap_identity_pk = "est-boot"
            [cert_issuance.est.urls]
            default = "https://est.example/.well-known/est"
            special = "http://other.example:8080/.well-known/est/label/"
            [cert_issuance.est.identity_auto_renew]
            rotate_key = false
            threshold = "50%"
            retry = "2min"
            [cert_issuance.device-id]
            method = "est"
            [cert_issuance.special]
            method = "est"
            [cert_issuance.own]
            method = "est"
            url = "https://own.example/est"
            identity_cert = "own-id"
            identity_pk = "own-key"
            "#,
        )
        .unwrap();
        let policy = &config.policy;
        let est = policy.est.as_ref().unwrap();
        assert_eq!(est.trusted_certs, ["est-ca"]);
        assert!(!est.auto_renew.rotate_key);
        assert_eq!(
            est.auto_renew.threshold,
            config_common::renewal::Policy::Percent(50)
        );
        assert_eq!(
            est.auto_renew.retry,
            config_common::renewal::Policy::Duration(std::time::Duration::from_secs(120))
        );
        let device = policy.issuance["device-id"].est.as_ref().unwrap();
        assert_eq!(device.url, "https://est.example/.well-known/est/");
        assert_eq!(device.auth.basic, Some(("user".into(), "secret".into())));
        assert_eq!(
            device.auth.bootstrap,
            Some(CertWithKey {
                cert: "est-boot".into(),
                pk: "est-boot".into()
            })
        );
        let special = policy.issuance["special"].est.as_ref().unwrap();
        assert_eq!(
            special.url,
            "http://other.example:8080/.well-known/est/label/"
        );
        let own = policy.issuance["own"].est.as_ref().unwrap();
        assert_eq!(own.url, "https://own.example/est/");
        assert_eq!(
            own.auth.basic, None,
            "a cert's own auth replaces the global"
        );
        assert_eq!(
            own.auth.identity,
            Some(CertWithKey {
                cert: "own-id".into(),
                pk: "own-key".into()
            })
        );
        // Defaults of identity_auto_renew.
        let config = parse(
            "homedir_path = \"/h\"\n[cert_issuance.x]\nmethod = \"est\"\nurl = \"https://e/\"",
        )
        .unwrap();
        assert_eq!(config.policy.est.unwrap().auto_renew, AutoRenew::default());
    }

    #[test]
    fn cert_ids() {
        assert_eq!(cert_id_problem("aziot-edged/module/m:1:server"), None);
        assert!(cert_id_problem("").is_some());
        assert!(cert_id_problem("a\nb").is_some());
        assert!(cert_id_problem("a\0b").is_some());
        assert!(cert_id_problem(&"x".repeat(513)).is_some());
        assert_eq!(cert_id_problem(&"x".repeat(512)), None);
    }
}
