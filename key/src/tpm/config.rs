//! The TPM service's configuration, read as the reference's tpmd reads it:
//! `/etc/aziot/tpmd/config.toml` plus `config.d/*.toml` (or `AZIOT_TPMD_CONFIG` /
//! `AZIOT_TPMD_CONFIG_DIR`), top-level `tcti`, `auth_key_index`, `max_requests`,
//! `[hierarchy_authorization] endorsement / owner` and `[endpoints] aziot_tpmd`. Ours adds
//! `[[principal]] uid = N`: further uids allowed on the tpmd socket (identityd's user is found by
//! name; see [`TpmConfig::allowed_uids`]).

use config_common::{ConfigError, ConfigPaths, Loaded};
use serde::Deserialize;

/// The default tpmd listener.
pub const DEFAULT_ENDPOINT: &str = "unix:///run/aziot/tpmd.sock";
/// The default base config file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/aziot/tpmd/config.toml";
/// The default drop-in folder.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/aziot/tpmd/config.d";
/// The environment variable naming the base config file.
pub const CONFIG_ENV: &str = "AZIOT_TPMD_CONFIG";
/// The environment variable naming the drop-in folder.
pub const CONFIG_DIR_ENV: &str = "AZIOT_TPMD_CONFIG_DIR";
/// The systemd socket unit whose fd keyd serves the tpmd API on.
pub const SOCKET_UNIT: &str = "aziot-tpmd.socket";
/// The default `auth_key_index` (persistent handle 0x81000100).
pub const DEFAULT_AUTH_KEY_INDEX: u32 = 0x100;
/// The first persistent object handle (TPM 2.0 Part 2, 7.5).
pub const PERSISTENT_OBJECT_BASE: u32 = 0x8100_0000;
/// Where the endorsement key lives.
pub const ENDORSEMENT_KEY_HANDLE: u32 = 0x8101_0001;
/// Where the storage root key lives.
pub const STORAGE_ROOT_KEY_HANDLE: u32 = 0x8100_0001;

/// The validated tpmd configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct TpmConfig {
    /// The TCTI: `device[:path]`, `swtpm[:host=..,port=..]`, `mssim[:..]`, `tabrmd[:..]`.
    pub tcti: String,
    /// The authentication key's persistent handle is `0x81000000 + auth_key_index`.
    pub auth_key_index: u32,
    /// The endorsement hierarchy's authorization (empty: none).
    pub endorsement_auth: String,
    /// The owner hierarchy's authorization (empty: none).
    pub owner_auth: String,
    /// Per-uid concurrent connection budget on the tpmd socket.
    pub max_requests: usize,
    /// The listener URI.
    pub endpoint: String,
    /// `[[principal]] uid`: uids allowed besides root, keyd's own and identityd's.
    pub principal_uids: Vec<u32>,
}

impl std::fmt::Debug for TpmConfig {
    // The hierarchy authorizations are secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmConfig")
            .field("tcti", &self.tcti)
            .field(
                "auth_key_index",
                &format_args!("{:#x}", self.auth_key_index),
            )
            .field("max_requests", &self.max_requests)
            .field("endpoint", &self.endpoint)
            .field("principal_uids", &self.principal_uids)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HierarchyAuthorization {
    #[serde(default)]
    endorsement: String,
    #[serde(default)]
    owner: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Endpoints {
    aziot_tpmd: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrincipal {
    uid: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    max_requests: Option<usize>,
    tcti: Option<String>,
    auth_key_index: Option<i64>,
    #[serde(default)]
    hierarchy_authorization: HierarchyAuthorization,
    #[serde(default)]
    endpoints: Endpoints,
    #[serde(default)]
    principal: Vec<RawPrincipal>,
}

impl TpmConfig {
    /// Where the tpmd configuration lives (environment, else the defaults).
    pub fn paths() -> ConfigPaths {
        ConfigPaths::resolve(
            None,
            None,
            CONFIG_ENV,
            CONFIG_DIR_ENV,
            DEFAULT_CONFIG_FILE,
            DEFAULT_CONFIG_DIR,
        )
    }

    /// Validates a merged tpmd configuration table (an empty one gives the defaults).
    pub fn from_loaded(loaded: &Loaded) -> Result<TpmConfig, ConfigError> {
        let raw: RawConfig = loaded.deserialize()?;
        let tcti = raw.tcti.unwrap_or_else(|| "device".to_owned());
        if let Err(reason) = super::device::check_tcti(&tcti) {
            return Err(ConfigError::invalid(loaded, "tcti", reason));
        }
        let auth_key_index = match raw.auth_key_index {
            None => DEFAULT_AUTH_KEY_INDEX,
            // TPM 2.0 Part 3, 28.5.1: persistent object handles run to 0x81FFFFFF, and the
            // reference allows the same range.
            Some(index @ 0..=0x7F_FFFF) => index as u32,
            Some(_) => {
                return Err(ConfigError::invalid(
                    loaded,
                    "auth_key_index",
                    "must be an integer in 0x000000..=0x7FFFFF",
                ))
            }
        };
        for (name, value) in [
            ("endorsement", &raw.hierarchy_authorization.endorsement),
            ("owner", &raw.hierarchy_authorization.owner),
        ] {
            // TPM2B_AUTH holds at most a SHA-256 digest's worth of bytes.
            if value.len() > 32 || value.contains('\0') {
                return Err(ConfigError::invalid(
                    loaded,
                    format!("hierarchy_authorization.{name}"),
                    "must be at most 32 bytes without NUL",
                ));
            }
        }
        let max_requests = http_common::daemon::max_requests(loaded, raw.max_requests)?;
        let endpoint = http_common::daemon::listener_endpoint(
            loaded,
            "aziot_tpmd",
            raw.endpoints.aziot_tpmd,
            DEFAULT_ENDPOINT,
        )?;
        Ok(TpmConfig {
            tcti,
            auth_key_index,
            endorsement_auth: raw.hierarchy_authorization.endorsement,
            owner_auth: raw.hierarchy_authorization.owner,
            max_requests,
            endpoint,
            principal_uids: raw.principal.into_iter().map(|p| p.uid).collect(),
        })
    }

    /// The authentication key's persistent handle.
    pub fn auth_key_handle(&self) -> u32 {
        PERSISTENT_OBJECT_BASE + self.auth_key_index
    }

    /// Who may call the tpmd API: root, keyd's own uid, the `aziotid` user (identityd) when it
    /// exists, and the `[[principal]]` uids. The socket's mode is the first gate (the packaged
    /// socket unit makes it 0660 `aziottpm:aziottpm`, as the reference's is); this is the second.
    pub fn allowed_uids(&self) -> Vec<u32> {
        // SAFETY: geteuid(2) has no preconditions and cannot fail.
        let own = unsafe { libc::geteuid() };
        let mut uids = vec![0, own];
        if let Some(uid) = uid_of_user("aziotid") {
            uids.push(uid);
        }
        uids.extend(&self.principal_uids);
        uids.sort_unstable();
        uids.dedup();
        uids
    }
}

/// The uid of a user named in /etc/passwd (no NSS: system users of a device live there).
fn uid_of_user(name: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name)
            .then(|| fields.nth(1)?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn parse(text: &str) -> Result<TpmConfig, String> {
        let table: toml::Table = text.parse().unwrap();
        let loaded = Loaded {
            table: table.clone(),
            sources: vec![(PathBuf::from("/etc/aziot/tpmd/config.toml"), table)],
        };
        TpmConfig::from_loaded(&loaded).map_err(|error| error.to_string())
    }

    #[test]
    fn empty_file_gives_the_reference_defaults() {
        let config = parse("").unwrap();
        assert_eq!(config.tcti, "device");
        assert_eq!(config.auth_key_handle(), 0x8100_0100);
        assert_eq!(config.endpoint, DEFAULT_ENDPOINT);
        assert!(config.endorsement_auth.is_empty() && config.owner_auth.is_empty());
    }

    #[test]
    fn reference_keys_are_read() {
        let config = parse(
            r#"
            max_requests = 7
            tcti = "swtpm:host=127.0.0.1,port=2321"
            auth_key_index = 0x01_02_03
            [hierarchy_authorization]
            endorsement = "hello"
            owner = "world"
            [endpoints]
            aziot_tpmd = "unix:///custom/tpmd.sock"
            "#,
        )
        .unwrap();
        assert_eq!(config.max_requests, 7);
        assert_eq!(config.tcti, "swtpm:host=127.0.0.1,port=2321");
        assert_eq!(config.auth_key_handle(), 0x8101_0203);
        assert_eq!(config.endorsement_auth, "hello");
        assert_eq!(config.owner_auth, "world");
        assert_eq!(config.endpoint, "unix:///custom/tpmd.sock");
        assert!(!format!("{config:?}").contains("hello"));
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (text, expected) in [
            ("auth_key_index = 0x800000", "auth_key_index"),
            ("auth_key_index = -1", "auth_key_index"),
            ("max_requests = 0", "`max_requests`: must be at least 1"),
            ("tcti = \"carrier-pigeon\"", "tcti"),
            ("tcti = \"swtpm:port=notanumber\"", "tcti"),
            ("surprise = 1", "surprise"),
            (
                "[hierarchy_authorization]\nowner = \"0123456789012345678901234567890123\"",
                "hierarchy_authorization.owner",
            ),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
