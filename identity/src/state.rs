//! State files under `homedir` (spec 6.7): `device_info`, `prev_state`, `provisioning_digest`
//! and the module cache `modules/<sha256(hub)>-<sha256(deviceId)>/<name>-<sha256(moduleId)>`.
//! All writes are atomic and 0600; folders are 0700. Files the reference wrote under these
//! names are readable.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Principal, Provisioning};
use crate::error::IdentityError;
use crate::util::{create_private_dir, sha256_hex, write_atomic};

/// `device_info`: where the device was last provisioned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The hub.
    pub hub_name: String,
    /// The parent gateway, if nested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_gateway_hostname: Option<String>,
    /// The device ID.
    pub device_id: String,
}

/// A module cache entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedModule {
    /// The module ID.
    pub module_id: String,
    /// The device ID.
    pub device_id: String,
    /// The Hub generation ID.
    pub generation_id: String,
    /// Who manages the module in Hub.
    #[serde(default)]
    pub managed_by: Option<String>,
}

/// The state folder.
#[derive(Clone, Debug)]
pub struct StateStore {
    homedir: PathBuf,
}

fn read_error(path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::State {
        path: path.display().to_string(),
        action: "read",
        source,
    }
}

fn write_error(path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::State {
        path: path.display().to_string(),
        action: "written",
        source,
    }
}

/// The cache file name of a module: alphanumerics of the ID, `-`, hex SHA-256 of the ID.
fn module_file_name(module_id: &str) -> String {
    config_common::files::reference_file_name(module_id, "")
}

impl StateStore {
    /// Opens (creating, 0700) the state folder.
    pub fn open(homedir: &Path) -> Result<StateStore, IdentityError> {
        create_private_dir(homedir).map_err(|error| write_error(homedir, error))?;
        Ok(StateStore {
            homedir: homedir.to_owned(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.homedir.join(name)
    }

    fn read_optional(&self, path: &Path) -> Result<Option<String>, IdentityError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Some(text)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(read_error(path, error)),
        }
    }

    /// The device from the last provisioning; `None` when absent, `unprovisioned` or
    /// unreadable (logged).
    pub fn device_info(&self) -> Option<DeviceInfo> {
        let path = self.path("device_info");
        let text = match self.read_optional(&path) {
            Ok(Some(text)) => text,
            Ok(None) => return None,
            Err(error) => {
                log::warn!("{}", http_common::error::error_chain(&error));
                return None;
            }
        };
        if text.trim() == "unprovisioned" {
            return None;
        }
        match toml::from_str::<DeviceInfo>(&text) {
            Ok(info) if !info.hub_name.is_empty() && !info.device_id.is_empty() => Some(info),
            Ok(_) => None,
            Err(error) => {
                log::warn!("ignoring unparsable {}: {error}", path.display());
                None
            }
        }
    }

    /// Writes `device_info` (`None`: the literal `unprovisioned`).
    pub fn set_device_info(&self, info: Option<&DeviceInfo>) -> Result<(), IdentityError> {
        let path = self.path("device_info");
        let text = match info {
            Some(info) => toml::to_string(info)
                .map_err(|error| write_error(&path, std::io::Error::other(error.to_string())))?,
            None => "unprovisioned".to_owned(),
        };
        write_atomic(&path, text.as_bytes()).map_err(|error| write_error(&path, error))
    }

    /// The provisioning digest that produced `device_info`.
    pub fn provisioning_digest(&self) -> Option<String> {
        self.read_optional(&self.path("provisioning_digest"))
            .ok()
            .flatten()
            .map(|text| text.trim().to_owned())
    }

    /// Writes `provisioning_digest`.
    pub fn set_provisioning_digest(&self, digest: &str) -> Result<(), IdentityError> {
        let path = self.path("provisioning_digest");
        write_atomic(&path, digest.as_bytes()).map_err(|error| write_error(&path, error))
    }

    /// Module names of principals with idtype `module` recorded in `prev_state`.
    pub fn previous_modules(&self) -> Vec<String> {
        let Ok(Some(text)) = self.read_optional(&self.path("prev_state")) else {
            return Vec::new();
        };
        let Ok(table) = text.parse::<toml::Table>() else {
            log::warn!("ignoring unparsable prev_state");
            return Vec::new();
        };
        let Some(toml::Value::Array(principals)) = table.get("principal") else {
            return Vec::new();
        };
        principals
            .iter()
            .filter_map(|principal| {
                let principal = principal.as_table()?;
                let name = principal.get("name")?.as_str()?;
                let is_module = match principal.get("idtype")? {
                    toml::Value::String(one) => one == "module",
                    toml::Value::Array(many) => many.iter().any(|v| v.as_str() == Some("module")),
                    _ => false,
                };
                is_module.then(|| name.to_owned())
            })
            .collect()
    }

    /// Writes `prev_state`: the principals and provisioning settings (secrets are never
    /// serialized).
    pub fn set_previous_state(
        &self,
        principals: &[Principal],
        provisioning: &Provisioning,
    ) -> Result<(), IdentityError> {
        let path = self.path("prev_state");
        let fail = |message: String| write_error(&path, std::io::Error::other(message));
        let mut json = serde_json::json!({
            "principal": principals,
            "provisioning": provisioning,
        });
        strip_nulls(&mut json);
        let value: toml::Value =
            serde_json::from_value(json).map_err(|error| fail(error.to_string()))?;
        let text = toml::to_string(&value).map_err(|error| fail(error.to_string()))?;
        write_atomic(&path, text.as_bytes()).map_err(|error| write_error(&path, error))
    }

    fn modules_root(&self) -> PathBuf {
        self.path("modules")
    }

    fn module_dir(&self, hub_name: &str, device_id: &str) -> PathBuf {
        self.modules_root().join(format!(
            "{}-{}",
            sha256_hex(hub_name.as_bytes()),
            sha256_hex(device_id.as_bytes())
        ))
    }

    /// A cached module.
    pub fn cached_module(
        &self,
        hub_name: &str,
        device_id: &str,
        module_id: &str,
    ) -> Option<CachedModule> {
        let path = self
            .module_dir(hub_name, device_id)
            .join(module_file_name(module_id));
        let text = std::fs::read(&path).ok()?;
        serde_json::from_slice::<CachedModule>(&text)
            .ok()
            .filter(|module| module.module_id == module_id)
    }

    /// Every cached module of the device.
    pub fn cached_modules(&self, hub_name: &str, device_id: &str) -> Vec<CachedModule> {
        let Ok(entries) = std::fs::read_dir(self.module_dir(hub_name, device_id)) else {
            return Vec::new();
        };
        let mut modules: Vec<CachedModule> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| std::fs::read(entry.path()).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect();
        modules.sort_by(|a, b| a.module_id.cmp(&b.module_id));
        modules
    }

    /// Caches a module.
    pub fn cache_module(&self, hub_name: &str, module: &CachedModule) -> Result<(), IdentityError> {
        let dir = self.module_dir(hub_name, &module.device_id);
        create_private_dir(&self.modules_root())
            .and_then(|()| create_private_dir(&dir))
            .map_err(|error| write_error(&dir, error))?;
        let path = dir.join(module_file_name(&module.module_id));
        let bytes = serde_json::to_vec(module).unwrap_or_default();
        write_atomic(&path, &bytes).map_err(|error| write_error(&path, error))
    }

    /// Removes a module from the cache.
    pub fn uncache_module(&self, hub_name: &str, device_id: &str, module_id: &str) {
        let path = self
            .module_dir(hub_name, device_id)
            .join(module_file_name(module_id));
        let _ = std::fs::remove_file(path);
    }

    /// Removes the whole module cache (the device changed).
    pub fn clear_modules(&self) {
        let root = self.modules_root();
        if let Err(error) = std::fs::remove_dir_all(&root) {
            if error.kind() != std::io::ErrorKind::NotFound {
                log::warn!("could not remove {}: {error}", root.display());
            }
        }
    }
}

fn strip_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|_, inner| !inner.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(items) => {
            items.retain(|inner| !inner.is_null());
            items.iter_mut().for_each(strip_nulls);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IdType;

    #[test]
    fn round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("home")).unwrap();
        assert_eq!(store.device_info(), None);
        let info = DeviceInfo {
            hub_name: "localhost:8443".into(),
            local_gateway_hostname: None,
            device_id: "d1".into(),
        };
        store.set_device_info(Some(&info)).unwrap();
        assert_eq!(store.device_info(), Some(info));
        store.set_device_info(None).unwrap();
        assert_eq!(store.device_info(), None);

        let principals = vec![
            Principal {
                uid: 1,
                name: "m1".into(),
                id_type: Some(vec![IdType::Module]),
                local_attributes: None,
            },
            Principal {
                uid: 2,
                name: "edge".into(),
                id_type: None,
                local_attributes: None,
            },
        ];
        store
            .set_previous_state(&principals, &Provisioning::None)
            .unwrap();
        assert_eq!(store.previous_modules(), vec!["m1".to_owned()]);

        let module = CachedModule {
            module_id: "$edgeAgent".into(),
            device_id: "d1".into(),
            generation_id: "1".into(),
            managed_by: None,
        };
        store.cache_module("hub", &module).unwrap();
        assert_eq!(
            store.cached_module("hub", "d1", "$edgeAgent"),
            Some(module.clone())
        );
        assert_eq!(store.cached_modules("hub", "d1"), vec![module]);
        store.uncache_module("hub", "d1", "$edgeAgent");
        assert_eq!(store.cached_module("hub", "d1", "$edgeAgent"), None);
        store.clear_modules();
    }

    #[test]
    fn reads_the_reference_prev_state_shape() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        std::fs::write(
            dir.path().join("prev_state"),
            "hostname = \"h\"\n[[principal]]\nuid = 1\nname = \"a\"\nidtype = [\"module\"]\n\
             [[principal]]\nuid = 2\nname = \"b\"\nidtype = \"device\"\n",
        )
        .unwrap();
        assert_eq!(store.previous_modules(), vec!["a".to_owned()]);
    }
}
