//! keyd's configuration: the reference layout (`[aziot_keys]`, `[preloaded_keys]`) and the seed's
//! flat layout (top-level `homedir_path`, `"preloaded_key:<id>"`), accepted side by side, merged
//! from `config.toml` and `config.d/*.toml` by config-common, then validated into [`Config`].

use std::collections::BTreeMap;
use std::path::PathBuf;

use config_common::{ConfigError, Loaded};
use serde::Deserialize;

/// The default listener.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/aziot/keyd.sock";
/// The default base config file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/aziot/keyd/config.toml";
/// The default drop-in folder.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/aziot/keyd/config.d";

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Per-uid concurrent connection budget.
    pub max_requests: usize,
    /// Root of the file store (`<homedir>/keys`); `None` when only a token is used.
    pub homedir: Option<PathBuf>,
    /// The PKCS#11 module and base slot, when configured.
    pub pkcs11: Option<Pkcs11Config>,
    /// Preloaded keys: ID → `file://` or `pkcs11:` URI.
    pub preloaded_keys: BTreeMap<String, String>,
    /// Who may create, load, move and delete which key IDs.
    pub principals: Vec<Principal>,
    /// The listener URI.
    pub endpoint: String,
}

/// PKCS#11 settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// Absolute path of the PKCS#11 module.
    pub lib_path: PathBuf,
    /// RFC 7512 URI of the token for dynamic keys (`None`: token only for preloaded keys).
    pub base_slot: Option<String>,
}

/// `[[principal]] uid = N, keys = ["glob", ...]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Principal {
    /// The caller's uid.
    pub uid: u32,
    /// Key ID globs (`*`, `?`).
    #[serde(default)]
    pub keys: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Endpoints {
    aziot_keyd: Option<String>,
    // Written by shared tooling into every daemon's endpoints table; keyd does not call them.
    #[allow(dead_code)]
    aziot_certd: Option<String>,
    #[allow(dead_code)]
    aziot_identityd: Option<String>,
    #[allow(dead_code)]
    aziot_tpmd: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    max_requests: Option<usize>,
    #[serde(default)]
    aziot_keys: BTreeMap<String, String>,
    #[serde(default)]
    preloaded_keys: BTreeMap<String, String>,
    #[serde(default)]
    principal: Vec<Principal>,
    #[serde(default)]
    endpoints: Endpoints,
    /// The seed's flat keys, checked by hand.
    #[serde(flatten)]
    rest: BTreeMap<String, toml::Value>,
}

const PRELOADED_PREFIX: &str = "preloaded_key:";

/// Collects one setting that may be given in two places; different values are an error.
struct Setting {
    value: Option<(String, String)>,
}

impl Setting {
    fn new() -> Self {
        Setting { value: None }
    }

    fn set(&mut self, loaded: &Loaded, key: String, value: String) -> Result<(), ConfigError> {
        if let Some((previous_key, previous_value)) = &self.value {
            if *previous_value != value {
                return Err(ConfigError::invalid(
                    loaded,
                    key,
                    format!("conflicts with `{previous_key}`, which is set to a different value"),
                ));
            }
        }
        self.value = Some((key, value));
        Ok(())
    }
}

impl Config {
    /// Validates a merged configuration table.
    pub fn from_loaded(loaded: &Loaded) -> Result<Config, ConfigError> {
        let raw: RawConfig = loaded.deserialize()?;
        let mut homedir = Setting::new();
        let mut lib_path = Setting::new();
        let mut base_slot = Setting::new();
        let mut preloaded: BTreeMap<String, Setting> = BTreeMap::new();

        let mut storage_parameter =
            |key: String, name: &str, value: String| -> Result<(), ConfigError> {
                match name {
                    "homedir_path" => homedir.set(loaded, key, value),
                    "pkcs11_lib_path" => lib_path.set(loaded, key, value),
                    "pkcs11_base_slot" => base_slot.set(loaded, key, value),
                    other => match other.strip_prefix(PRELOADED_PREFIX) {
                        Some("") => Err(ConfigError::invalid(
                            loaded,
                            key,
                            "preloaded key with an empty ID",
                        )),
                        Some(id) => preloaded
                            .entry(id.to_owned())
                            .or_insert_with(Setting::new)
                            .set(loaded, key, value),
                        None => Err(ConfigError::invalid(
                            loaded,
                            key,
                            format!("unrecognized storage parameter {other:?}"),
                        )),
                    },
                }
            };
        for (name, value) in &raw.aziot_keys {
            storage_parameter(format!("aziot_keys.{name}"), name, value.clone())?;
        }
        for (name, value) in &raw.rest {
            let is_storage = matches!(
                name.as_str(),
                "homedir_path" | "pkcs11_lib_path" | "pkcs11_base_slot"
            ) || name.starts_with(PRELOADED_PREFIX);
            if !is_storage {
                return Err(ConfigError::invalid(loaded, name.clone(), "unknown field"));
            }
            let toml::Value::String(value) = value else {
                return Err(ConfigError::invalid(
                    loaded,
                    name.clone(),
                    "expected a string",
                ));
            };
            storage_parameter(name.clone(), name, value.clone())?;
        }
        for (id, value) in &raw.preloaded_keys {
            if id.is_empty() {
                return Err(ConfigError::invalid(
                    loaded,
                    "preloaded_keys",
                    "preloaded key with an empty ID",
                ));
            }
            preloaded
                .entry(id.clone())
                .or_insert_with(Setting::new)
                .set(loaded, format!("preloaded_keys.{id}"), value.clone())?;
        }

        let pkcs11 = match (lib_path.value, base_slot.value) {
            (Some((_, lib_path)), base_slot) => Some(Pkcs11Config {
                lib_path: PathBuf::from(lib_path),
                base_slot: base_slot.map(|(_, slot)| slot),
            }),
            (None, Some((key, _))) => {
                return Err(ConfigError::invalid(
                    loaded,
                    key,
                    "pkcs11_base_slot needs pkcs11_lib_path",
                ))
            }
            (None, None) => None,
        };
        if let Some(pkcs11) = &pkcs11 {
            if !pkcs11.lib_path.is_absolute() {
                return Err(ConfigError::invalid(
                    loaded,
                    "pkcs11_lib_path",
                    "must be an absolute path",
                ));
            }
        }

        let mut preloaded_keys = BTreeMap::new();
        for (id, setting) in preloaded {
            let Some((key, uri)) = setting.value else {
                continue;
            };
            if let Some(path) = uri.strip_prefix("file://") {
                if !path.starts_with('/') {
                    return Err(ConfigError::invalid(
                        loaded,
                        key,
                        "a file:// URI must be absolute (file:///path)",
                    ));
                }
            } else if uri.starts_with("pkcs11:") {
                if pkcs11.is_none() {
                    return Err(ConfigError::invalid(
                        loaded,
                        key,
                        format!(
                            "preloaded key {id:?} is a pkcs11: URI but pkcs11_lib_path is not set"
                        ),
                    ));
                }
            } else {
                return Err(ConfigError::invalid(
                    loaded,
                    key,
                    "expected a file:// or pkcs11: URI",
                ));
            }
            preloaded_keys.insert(id, uri);
        }

        let homedir = homedir.value.map(|(_, path)| PathBuf::from(path));
        let has_token = pkcs11
            .as_ref()
            .is_some_and(|pkcs11| pkcs11.base_slot.is_some());
        if homedir.is_none() && !has_token {
            return Err(ConfigError::invalid(
                loaded,
                "aziot_keys",
                "no key storage configured (set homedir_path, or pkcs11_lib_path and pkcs11_base_slot)",
            ));
        }
        for (index, principal) in raw.principal.iter().enumerate() {
            if principal.keys.iter().any(String::is_empty) {
                return Err(ConfigError::invalid(
                    loaded,
                    format!("principal[{index}].keys"),
                    "empty glob",
                ));
            }
        }
        let max_requests = http_common::daemon::max_requests(loaded, raw.max_requests)?;

        let endpoint = http_common::daemon::listener_endpoint(
            loaded,
            "aziot_keyd",
            raw.endpoints.aziot_keyd,
            DEFAULT_ENDPOINT,
        )?;

        Ok(Config {
            max_requests,
            homedir,
            pkcs11,
            preloaded_keys,
            principals: raw.principal,
            endpoint,
        })
    }
}

pub use config_common::glob_matches;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        let table: toml::Table = text.parse().unwrap();
        let loaded = Loaded {
            table: table.clone(),
            sources: vec![(PathBuf::from("/etc/keyd/config.toml"), table)],
        };
        Config::from_loaded(&loaded).map_err(|error| error.to_string())
    }

    #[test]
    fn reference_and_seed_layouts_agree() {
        let reference = parse(
            r#"
            [aziot_keys]
            homedir_path = "/var/lib/aziot/keyd"
            [preloaded_keys]
            device-id = "file:///var/secrets/device-id"
            [[principal]]
            uid = 5556
            keys = ["device-id"]
            "#,
        )
        .unwrap();
        let seed = parse(
            r#"
            homedir_path = "/var/lib/aziot/keyd"
            "preloaded_key:device-id" = "file:///var/secrets/device-id"
            [[principal]]
            uid = 5556
            keys = ["device-id"]
            "#,
        )
        .unwrap();
        assert_eq!(reference, seed);
        assert_eq!(reference.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(reference.max_requests, 10);
    }

    #[test]
    fn invalid_configs_name_the_key() {
        let cases = [
            ("", "no key storage configured"),
            (
                "[aziot_keys]\nbogus = \"x\"\n",
                "unrecognized storage parameter \"bogus\"",
            ),
            (
                "homedir_path = \"/a\"\n[aziot_keys]\nhomedir_path = \"/b\"\n",
                "conflicts",
            ),
            (
                "homedir_path = \"/a\"\nsurprise = 1\n",
                "`surprise`: unknown field",
            ),
            (
                "homedir_path = \"/a\"\n[preloaded_keys]\nx = \"relative\"\n",
                "preloaded_keys.x",
            ),
            (
                "homedir_path = \"/a\"\n[preloaded_keys]\nx = \"pkcs11:object=x\"\n",
                "pkcs11_lib_path is not set",
            ),
            (
                "homedir_path = \"/a\"\n\"preloaded_key:\" = \"file:///x\"\n",
                "empty ID",
            ),
            (
                "homedir_path = \"/a\"\n[[principal]]\nuid = \"x\"\n",
                "principal[0].uid",
            ),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
            assert!(error.contains("/etc/keyd/config.toml"), "{error}");
        }
        // Identical values in both places are fine.
        parse("homedir_path = \"/a\"\n[aziot_keys]\nhomedir_path = \"/a\"\n").unwrap();
    }
}
