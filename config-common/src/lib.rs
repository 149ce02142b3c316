//! Configuration loading shared by every daemon.
//!
//! A daemon's configuration is a base file (`config.toml`) plus every regular `*.toml` file
//! directly inside a drop-in folder (`config.d/`), read in byte-wise order of file name and merged:
//! tables merge recursively, a later scalar replaces an earlier one, and arrays concatenate (that is
//! how `[[principal]]` entries from several packages accumulate). A missing base file counts as an
//! empty table and a missing drop-in folder is fine.
//!
//! The merged table is then deserialized strictly into the daemon's own config type. Every error
//! names the file and, where there is one, the key path. [`files`] holds the one way state
//! files are written (atomic, private, reference file names), [`glob_matches`] the principal
//! glob language and [`renewal`] the certificate renewal policy strings every daemon reads. This crate knows nothing about any daemon's keys, certificates or modules.

pub mod files;
mod glob;
pub mod renewal;

pub use glob::glob_matches;

use std::ffi::OsStr;
use std::path::PathBuf;

use serde::de::DeserializeOwned;

/// The exit code a daemon uses when its configuration is invalid (systemd units set
/// `RestartPreventExitStatus=153` so a bad config does not restart-loop).
pub const EXIT_CODE_INVALID_CONFIG: i32 = 153;

/// Where a daemon's configuration lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigPaths {
    /// The base file, conventionally `/etc/aziot/<daemon>/config.toml`.
    pub base_file: PathBuf,
    /// The drop-in folder, conventionally `/etc/aziot/<daemon>/config.d`.
    pub dropin_dir: PathBuf,
}

impl ConfigPaths {
    /// Resolves the paths with the precedence command-line flag, then environment variable, then
    /// default. `env_file` and `env_dir` name the environment variables (e.g.
    /// `AZIOT_KEYD_CONFIG`, `AZIOT_KEYD_CONFIG_DIR`).
    pub fn resolve(
        flag_file: Option<PathBuf>,
        flag_dir: Option<PathBuf>,
        env_file: &str,
        env_dir: &str,
        default_file: &str,
        default_dir: &str,
    ) -> Self {
        let from_env = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
        ConfigPaths {
            base_file: flag_file
                .or_else(|| from_env(env_file).map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(default_file)),
            dropin_dir: flag_dir
                .or_else(|| from_env(env_dir).map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(default_dir)),
        }
    }

    /// The files that currently make up the configuration, base file first (only those that
    /// exist), then the drop-ins in merge order.
    pub fn files(&self) -> Result<Vec<PathBuf>, ConfigError> {
        let mut files = Vec::new();
        if self.base_file.is_file() {
            files.push(self.base_file.clone());
        }
        let entries = match std::fs::read_dir(&self.dropin_dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(files),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: self.dropin_dir.clone(),
                    source,
                })
            }
        };
        let mut dropins = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| ConfigError::Read {
                path: self.dropin_dir.clone(),
                source,
            })?;
            let path = entry.path();
            if path.extension() == Some(OsStr::new("toml")) && path.is_file() {
                dropins.push(path);
            }
        }
        // Byte-wise order of the file name.
        dropins.sort_by(|left, right| left.file_name().cmp(&right.file_name()));
        files.extend(dropins);
        Ok(files)
    }

    /// A fingerprint of the configuration files (their names and a hash of their contents),
    /// to tell whether a reload would read anything new without parsing.
    pub fn fingerprint(&self) -> Vec<(PathBuf, Option<u64>)> {
        use std::hash::{Hash, Hasher};
        self.files()
            .unwrap_or_default()
            .into_iter()
            .map(|path| {
                let digest = std::fs::read(&path).ok().map(|bytes| {
                    let mut hasher = std::collections::hash_map::DefaultHasher::new();
                    bytes.hash(&mut hasher);
                    hasher.finish()
                });
                (path, digest)
            })
            .collect()
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file or folder could not be read.
    #[error("could not read {}", path.display())]
    Read {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid TOML.
    #[error("{} is not valid TOML: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line and column included).
        message: String,
    },
    /// A key has the wrong type or value, or is not recognized.
    #[error("{}: key `{key}`: {message}", file_description(files))]
    Invalid {
        /// The files that define the offending key (last one wins), or all files read when the
        /// key is missing altogether.
        files: Vec<PathBuf>,
        /// The dotted key path (`aziot_keys.homedir_path`, `principal[0].uid`).
        key: String,
        /// What is wrong.
        message: String,
    },
}

fn file_description(files: &[PathBuf]) -> String {
    match files {
        [] => "configuration (no files found)".to_owned(),
        [one] => one.display().to_string(),
        many => many
            .iter()
            .map(|path| path.display().to_string())
            .collect::<Vec<_>>()
            .join(" + "),
    }
}

impl ConfigError {
    /// Builds a validation error for `key` found in `table`, naming the files that set it.
    pub fn invalid(loaded: &Loaded, key: impl Into<String>, message: impl Into<String>) -> Self {
        let key = key.into();
        ConfigError::Invalid {
            files: loaded.files_defining(&key),
            key,
            message: message.into(),
        }
    }
}

/// The merged configuration table and the files it came from.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// The merged table.
    pub table: toml::Table,
    /// Each file read, with its own parsed table, in merge order.
    pub sources: Vec<(PathBuf, toml::Table)>,
}

impl Loaded {
    /// Which files set the dotted `key` (array indices such as `principal[2]` are ignored).
    /// When none does (a missing key), all files read are returned.
    pub fn files_defining(&self, key: &str) -> Vec<PathBuf> {
        let segments: Vec<&str> = key
            .split('.')
            .map(|segment| segment.split('[').next().unwrap_or(segment))
            .filter(|segment| !segment.is_empty())
            .collect();
        let defining: Vec<PathBuf> = self
            .sources
            .iter()
            .filter(|(_, table)| table_has_path(table, &segments))
            .map(|(path, _)| path.clone())
            .collect();
        if defining.is_empty() {
            self.sources.iter().map(|(path, _)| path.clone()).collect()
        } else {
            defining
        }
    }

    /// Deserializes the merged table into `T`, naming the key path on failure.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let value = toml::Value::Table(self.table.clone());
        serde_path_to_error::deserialize(value).map_err(|error| {
            let key = error.path().to_string();
            let message = error.into_inner().message().to_owned();
            ConfigError::Invalid {
                files: self.files_defining(&key),
                key,
                message,
            }
        })
    }
}

fn table_has_path(table: &toml::Table, segments: &[&str]) -> bool {
    let Some((first, rest)) = segments.split_first() else {
        return true;
    };
    match table.get(*first) {
        None => false,
        Some(_) if rest.is_empty() => true,
        Some(toml::Value::Table(inner)) => table_has_path(inner, rest),
        Some(toml::Value::Array(items)) => items.iter().any(|item| match item {
            toml::Value::Table(inner) => table_has_path(inner, rest),
            _ => false,
        }),
        Some(_) => false,
    }
}

/// Reads and merges the base file and drop-ins.
pub fn load_table(paths: &ConfigPaths) -> Result<Loaded, ConfigError> {
    let mut loaded = Loaded::default();
    for path in paths.files()? {
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let table: toml::Table =
            text.parse()
                .map_err(|error: toml::de::Error| ConfigError::Parse {
                    path: path.clone(),
                    message: error.to_string().trim_end().to_owned(),
                })?;
        merge_tables(&mut loaded.table, table.clone());
        loaded.sources.push((path, table));
    }
    Ok(loaded)
}

/// Reads, merges and deserializes a configuration in one step.
pub fn load<T: DeserializeOwned>(paths: &ConfigPaths) -> Result<T, ConfigError> {
    load_table(paths)?.deserialize()
}

/// Merges `overlay` into `base`: tables recursively, arrays concatenated, scalars replaced.
pub fn merge_tables(base: &mut toml::Table, overlay: toml::Table) {
    for (key, overlay_value) in overlay {
        match (base.get_mut(&key), overlay_value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(overlay_table)) => {
                merge_tables(base_table, overlay_table);
            }
            (Some(toml::Value::Array(base_array)), toml::Value::Array(overlay_array)) => {
                base_array.extend(overlay_array);
            }
            (_, overlay_value) => {
                base.insert(key, overlay_value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: Option<String>,
        #[serde(default)]
        principal: Vec<Principal>,
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Principal {
        uid: u32,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        a: Option<u32>,
        b: Option<u32>,
    }

    fn write_config(
        base: Option<&str>,
        dropins: &[(&str, &str)],
    ) -> (tempfile::TempDir, ConfigPaths) {
        let dir = tempfile::tempdir().unwrap();
        let paths = ConfigPaths {
            base_file: dir.path().join("config.toml"),
            dropin_dir: dir.path().join("config.d"),
        };
        if let Some(base) = base {
            std::fs::write(&paths.base_file, base).unwrap();
        }
        if !dropins.is_empty() {
            std::fs::create_dir(&paths.dropin_dir).unwrap();
        }
        for (name, text) in dropins {
            std::fs::write(paths.dropin_dir.join(name), text).unwrap();
        }
        (dir, paths)
    }

    #[test]
    fn merges_tables_concatenates_arrays_and_sorts_dropins() {
        let (_dir, paths) = write_config(
            Some("name = \"base\"\n[[principal]]\nuid = 1\n[inner]\na = 1\nb = 1\n"),
            &[
                ("20-late.toml", "name = \"late\"\n[[principal]]\nuid = 3\n"),
                ("10-early.toml", "[[principal]]\nuid = 2\n[inner]\nb = 2\n"),
                ("ignored.txt", "this is not toml at all ["),
            ],
        );
        let sample: Sample = load(&paths).unwrap();
        assert_eq!(sample.name.as_deref(), Some("late"));
        assert_eq!(
            sample.principal,
            vec![
                Principal { uid: 1 },
                Principal { uid: 2 },
                Principal { uid: 3 }
            ]
        );
        assert_eq!(
            sample.inner,
            Some(Inner {
                a: Some(1),
                b: Some(2)
            })
        );
    }

    #[test]
    fn missing_base_and_dir_give_empty_table() {
        let (_dir, paths) = write_config(None, &[]);
        let sample: Sample = load(&paths).unwrap();
        assert_eq!(
            sample,
            Sample {
                name: None,
                principal: vec![],
                inner: None
            }
        );
    }

    #[test]
    fn errors_name_file_and_key() {
        let (_dir, paths) = write_config(
            Some("name = \"base\"\n"),
            &[("50-bad.toml", "[[principal]]\nuid = \"not a number\"\n")],
        );
        let message = load::<Sample>(&paths).unwrap_err().to_string();
        assert!(message.contains("50-bad.toml"), "{message}");
        assert!(!message.contains("config.toml"), "{message}");
        assert!(message.contains("principal[0].uid"), "{message}");

        let (_dir, paths) = write_config(Some("[inner]\nc = 1\n"), &[]);
        let message = load::<Sample>(&paths).unwrap_err().to_string();
        assert!(message.contains("config.toml"), "{message}");
        assert!(message.contains("inner"), "{message}");
        assert!(message.contains("unknown field `c`"), "{message}");
    }

    #[test]
    fn parse_error_names_file() {
        let (_dir, paths) = write_config(Some("ok = 1\n"), &[("00-broken.toml", "x = [\n")]);
        let error = load_table(&paths).unwrap_err();
        assert!(
            matches!(error, ConfigError::Parse { ref path, .. } if path.ends_with("00-broken.toml"))
        );
    }

    #[test]
    fn resolve_prefers_flag_then_env_then_default() {
        let paths = ConfigPaths::resolve(
            Some(PathBuf::from("/flag.toml")),
            None,
            "CONFIG_COMMON_TEST_UNSET_FILE",
            "CONFIG_COMMON_TEST_UNSET_DIR",
            "/default.toml",
            "/default.d",
        );
        assert_eq!(paths.base_file, PathBuf::from("/flag.toml"));
        assert_eq!(paths.dropin_dir, PathBuf::from("/default.d"));
    }
}
