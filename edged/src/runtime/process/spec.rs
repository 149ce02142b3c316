//! What a process module is: the `ModuleSpec` → [`LaunchSpec`] translation of the process
//! runtime, and its validation (every refusal is a 400 naming the field).
//!
//! An *image* is an absolute path on the device: either an executable (the module's program,
//! `Cmd` its arguments) or a `.tar`, `.tar.gz` or `.tgz` archive unpacked into the module's own
//! folder on create (`Entrypoint` + `Cmd` its command line, a relative program resolved inside the
//! unpacked tree). `createOptions` may carry only the fields that mean something for a host
//! process: `Cmd`, `Entrypoint`, `Env`, `WorkingDir`, `User` (only `root`, and only with
//! `allow_elevated_docker_permissions`), `Labels`, and `HostConfig.Memory`,
//! `HostConfig.PidsLimit` and `HostConfig.RestartPolicy`. Everything else is Docker's.
//!
//! Pure data: no I/O here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::EdgedError;
use crate::model::ModuleSpec;

/// The `createOptions` keys the process runtime understands.
const TOP_LEVEL_KEYS: &[&str] = &[
    "Cmd",
    "Entrypoint",
    "Env",
    "WorkingDir",
    "User",
    "Labels",
    "HostConfig",
];

/// The `createOptions.HostConfig` keys the process runtime understands.
const HOST_CONFIG_KEYS: &[&str] = &["Memory", "PidsLimit", "RestartPolicy"];

/// What the image path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageKind {
    /// An executable run in place.
    Executable,
    /// A tar archive (optionally gzip-compressed) unpacked into the module's folder on create.
    Archive,
}

/// Docker's restart policy names, honoured by the module's supervisor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartName {
    /// `no` / empty: never restart.
    #[default]
    No,
    /// `always`: restart whatever the exit code.
    Always,
    /// `unless-stopped`: like `always` (a stop through the API is never undone).
    UnlessStopped,
    /// `on-failure`: restart on a non-zero exit code or a signal.
    OnFailure,
}

/// `HostConfig.RestartPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartPolicy {
    /// The policy.
    pub name: RestartName,
    /// For `on-failure`: the most restarts in a row (0 = unlimited).
    pub max_retries: u32,
}

impl RestartPolicy {
    /// Whether a process that ended with `exit_code` is started again, given how many restarts
    /// came before.
    pub fn restarts(&self, exit_code: i64, restarts_so_far: u32) -> bool {
        match self.name {
            RestartName::No => false,
            RestartName::Always | RestartName::UnlessStopped => true,
            RestartName::OnFailure => {
                exit_code != 0 && (self.max_retries == 0 || restarts_so_far < self.max_retries)
            }
        }
    }
}

/// How to run a module's process, derived from its spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// The image path as given.
    pub image: String,
    /// Executable or archive.
    pub image_kind: ImageKind,
    /// The program: absolute, or (archives) relative to the unpacked tree.
    pub program: String,
    /// Its arguments (after the program).
    pub args: Vec<String>,
    /// The environment from the spec and `createOptions.Env` (the runtime adds its own).
    pub env: BTreeMap<String, String>,
    /// `WorkingDir` (absolute), `None` = the module's own folder.
    pub working_dir: Option<String>,
    /// `User = "root"` was asked for (and allowed).
    pub root: bool,
    /// `HostConfig.Memory` in bytes.
    pub memory_bytes: Option<u64>,
    /// `HostConfig.PidsLimit`.
    pub pids_max: Option<u64>,
    /// `HostConfig.RestartPolicy`.
    pub restart: RestartPolicy,
    /// `Labels` (edged's own labels added).
    pub labels: BTreeMap<String, String>,
}

fn invalid(message: impl std::fmt::Display) -> EdgedError {
    EdgedError::BadRequest(format!("invalid process config: {message}"))
}

fn unsupported(field: &str) -> EdgedError {
    invalid(format!(
        "createOptions.{field} is not supported by the process runtime"
    ))
}

fn string_list(field: &str, value: Option<&Value>) -> Result<Vec<String>, EdgedError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str().map(str::to_owned).ok_or_else(|| {
                    invalid(format!("createOptions.{field} must be an array of strings"))
                })
            })
            .collect(),
        Some(_) => Err(invalid(format!(
            "createOptions.{field} must be an array of strings"
        ))),
    }
}

/// A positive byte or count limit; 0 and -1 mean "none" as in Docker.
fn limit(field: &str, value: Option<&Value>) -> Result<Option<u64>, EdgedError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value) => match value.as_i64() {
            Some(0 | -1) => Ok(None),
            Some(number) if number > 0 => Ok(Some(number.unsigned_abs())),
            _ => Err(invalid(format!(
                "createOptions.{field} must be a positive integer (0 or -1 for none)"
            ))),
        },
    }
}

/// Classifies an image path.
pub fn image_kind(image: &str) -> Result<ImageKind, EdgedError> {
    let absolute = image.starts_with('/') && !image.contains('\0');
    if !absolute || image.split('/').any(|component| component == "..") {
        return Err(invalid(format!(
            "settings.image must be an absolute path to an executable or to a .tar, .tar.gz or \
             .tgz archive (got {image:?})"
        )));
    }
    if [".tar", ".tar.gz", ".tgz"]
        .iter()
        .any(|suffix| image.ends_with(suffix))
    {
        Ok(ImageKind::Archive)
    } else {
        Ok(ImageKind::Executable)
    }
}

/// Translates and checks a module spec (`allow_root`: `allow_elevated_docker_permissions`).
pub fn launch_spec(spec: &ModuleSpec, allow_root: bool) -> Result<LaunchSpec, EdgedError> {
    let image = spec.config.settings.image.trim().to_owned();
    let kind = image_kind(&image)?;
    let options = match &spec.config.settings.create_options {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(object)) => object.clone(),
        Some(_) => return Err(invalid("createOptions must be a JSON object")),
    };
    for (key, value) in &options {
        if !TOP_LEVEL_KEYS.contains(&key.as_str()) && !value.is_null() {
            return Err(unsupported(key));
        }
    }

    let entrypoint = string_list("Entrypoint", options.get("Entrypoint"))?;
    let cmd = string_list("Cmd", options.get("Cmd"))?;
    let (program, args) = match kind {
        ImageKind::Executable => {
            if !entrypoint.is_empty() {
                return Err(invalid(
                    "createOptions.Entrypoint: the image is the program; put its arguments in Cmd",
                ));
            }
            (image.clone(), cmd)
        }
        ImageKind::Archive => {
            let mut command_line = entrypoint;
            command_line.extend(cmd);
            if command_line.is_empty() {
                return Err(invalid(
                    "an archive image needs Entrypoint or Cmd naming the program inside it",
                ));
            }
            let program = command_line.remove(0);
            if program.is_empty() || program.split('/').any(|component| component == "..") {
                return Err(invalid(format!(
                    "the program {program:?} must be a path inside the archive or absolute"
                )));
            }
            (program, command_line)
        }
    };

    let mut env = BTreeMap::new();
    for variable in &spec.config.env {
        if env
            .insert(variable.key.clone(), variable.value.clone())
            .is_some()
        {
            return Err(EdgedError::BadRequest(format!(
                "duplicate environment variable {:?}",
                variable.key
            )));
        }
    }
    for entry in string_list("Env", options.get("Env"))? {
        let (key, value) = entry.split_once('=').unwrap_or((&entry, ""));
        env.insert(key.to_owned(), value.to_owned());
    }
    if env
        .keys()
        .any(|key| key.is_empty() || key.contains('\0') || key.contains('='))
        || env.values().any(|value| value.contains('\0'))
    {
        return Err(invalid(
            "environment names must be non-empty without '=' or NUL",
        ));
    }

    let working_dir = match options.get("WorkingDir") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) if text.is_empty() => None,
        Some(Value::String(text)) if text.starts_with('/') && !text.contains('\0') => {
            Some(text.clone())
        }
        Some(_) => return Err(invalid("createOptions.WorkingDir must be an absolute path")),
    };

    let root = match options.get("User") {
        None | Some(Value::Null) => false,
        Some(Value::String(user)) if user.is_empty() => false,
        Some(Value::String(user)) if ["root", "0", "0:0", "root:root"].contains(&user.as_str()) => {
            if !allow_root {
                return Err(invalid(
                    "createOptions.User: running as root needs allow_elevated_docker_permissions = true",
                ));
            }
            true
        }
        Some(_) => {
            return Err(invalid(
                "createOptions.User: only \"root\" may be named; every other module runs as \
                 its own uid from [process_runtime]",
            ))
        }
    };

    let mut labels = BTreeMap::new();
    match options.get("Labels") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (key, value) in map {
                let text = value
                    .as_str()
                    .ok_or_else(|| invalid("createOptions.Labels values must be strings"))?;
                labels.insert(key.clone(), text.to_owned());
            }
        }
        Some(_) => return Err(invalid("createOptions.Labels must be an object")),
    }
    labels.insert(
        crate::model::OWNER_LABEL.to_owned(),
        crate::model::OWNER_VALUE.to_owned(),
    );
    labels.insert(
        crate::model::ORIGINAL_IMAGE_LABEL.to_owned(),
        spec.config.settings.image.clone(),
    );

    let mut memory_bytes = None;
    let mut pids_max = None;
    let mut restart = RestartPolicy::default();
    match options.get("HostConfig") {
        None | Some(Value::Null) => {}
        Some(Value::Object(host_config)) => {
            for (key, value) in host_config {
                if !HOST_CONFIG_KEYS.contains(&key.as_str()) && !value.is_null() {
                    return Err(unsupported(&format!("HostConfig.{key}")));
                }
            }
            memory_bytes = limit("HostConfig.Memory", host_config.get("Memory"))?;
            pids_max = limit("HostConfig.PidsLimit", host_config.get("PidsLimit"))?;
            match host_config.get("RestartPolicy") {
                None | Some(Value::Null) => {}
                Some(Value::Object(policy)) => {
                    for key in policy.keys() {
                        if key != "Name" && key != "MaximumRetryCount" {
                            return Err(unsupported(&format!("HostConfig.RestartPolicy.{key}")));
                        }
                    }
                    restart.name = match policy.get("Name").and_then(Value::as_str) {
                        None | Some("" | "no") => RestartName::No,
                        Some("always") => RestartName::Always,
                        Some("unless-stopped") => RestartName::UnlessStopped,
                        Some("on-failure") => RestartName::OnFailure,
                        Some(other) => {
                            return Err(invalid(format!(
                                "createOptions.HostConfig.RestartPolicy.Name {other:?} (expected \
                                 \"no\", \"always\", \"unless-stopped\" or \"on-failure\")"
                            )))
                        }
                    };
                    restart.max_retries = match policy.get("MaximumRetryCount") {
                        None | Some(Value::Null) => 0,
                        Some(value) => value
                            .as_u64()
                            .and_then(|count| u32::try_from(count).ok())
                            .ok_or_else(|| {
                            invalid(
                                "createOptions.HostConfig.RestartPolicy.MaximumRetryCount \
                                     must be a non-negative integer",
                            )
                        })?,
                    };
                }
                Some(_) => {
                    return Err(invalid(
                        "createOptions.HostConfig.RestartPolicy must be an object",
                    ))
                }
            }
        }
        Some(_) => return Err(invalid("createOptions.HostConfig must be an object")),
    }

    Ok(LaunchSpec {
        image,
        image_kind: kind,
        program,
        args,
        env,
        working_dir,
        root,
        memory_bytes,
        pids_max,
        restart,
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EnvVar, ModuleConfig, Settings};
    use serde_json::json;

    fn spec(image: &str, create_options: Value, env: &[(&str, &str)]) -> ModuleSpec {
        ModuleSpec {
            name: "m".into(),
            module_type: "process".into(),
            image_pull_policy: None,
            config: ModuleConfig {
                settings: Settings {
                    image: image.into(),
                    create_options: Some(create_options),
                    auth: None,
                    digest: None,
                    image_hash: None,
                },
                env: env
                    .iter()
                    .map(|(key, value)| EnvVar {
                        key: (*key).into(),
                        value: (*value).into(),
                    })
                    .collect(),
            },
        }
    }

    #[test]
    fn an_executable_image_takes_cmd_as_arguments_and_merges_env() {
        let launch = launch_spec(
            &spec(
                "/usr/bin/python3",
                json!({"Cmd": ["/opt/m.py", "-v"], "Env": ["B=options", "C=c"],
                       "WorkingDir": "/tmp", "Labels": {"x": "y"},
                       "HostConfig": {"Memory": 1048576, "PidsLimit": 64,
                                      "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 3}}}),
                &[("B", "spec"), ("A", "a")],
            ),
            false,
        )
        .unwrap();
        assert_eq!(launch.image_kind, ImageKind::Executable);
        assert_eq!(launch.program, "/usr/bin/python3");
        assert_eq!(launch.args, vec!["/opt/m.py", "-v"]);
        assert_eq!(
            launch.env.iter().collect::<Vec<_>>(),
            vec![
                (&"A".to_owned(), &"a".to_owned()),
                (&"B".to_owned(), &"options".to_owned()),
                (&"C".to_owned(), &"c".to_owned())
            ]
        );
        assert_eq!(launch.working_dir.as_deref(), Some("/tmp"));
        assert_eq!(launch.memory_bytes, Some(1_048_576));
        assert_eq!(launch.pids_max, Some(64));
        assert_eq!(
            launch.restart,
            RestartPolicy {
                name: RestartName::OnFailure,
                max_retries: 3
            }
        );
        assert_eq!(launch.labels["x"], "y");
        assert_eq!(
            launch.labels[crate::model::ORIGINAL_IMAGE_LABEL],
            "/usr/bin/python3"
        );
        assert!(!launch.root);
    }

    #[test]
    fn an_archive_image_takes_its_program_from_entrypoint_and_cmd() {
        let launch = launch_spec(
            &spec(
                "/srv/m.tar.gz",
                json!({"Entrypoint": ["bin/run"], "Cmd": ["x"]}),
                &[],
            ),
            false,
        )
        .unwrap();
        assert_eq!(launch.image_kind, ImageKind::Archive);
        assert_eq!(launch.program, "bin/run");
        assert_eq!(launch.args, vec!["x"]);
    }

    #[test]
    fn docker_only_and_bad_fields_are_refused_by_name() {
        let cases = [
            (
                "/bin/true",
                json!({"ExposedPorts": {"80/tcp": {}}}),
                "createOptions.ExposedPorts",
            ),
            (
                "/bin/true",
                json!({"HostConfig": {"Binds": ["/a:/b"]}}),
                "createOptions.HostConfig.Binds",
            ),
            (
                "/bin/true",
                json!({"HostConfig": {"Privileged": true}}),
                "createOptions.HostConfig.Privileged",
            ),
            (
                "/bin/true",
                json!({"NetworkingConfig": {}}),
                "createOptions.NetworkingConfig",
            ),
            (
                "/bin/true",
                json!({"Entrypoint": ["/bin/sh"]}),
                "createOptions.Entrypoint",
            ),
            (
                "/bin/true",
                json!({"Cmd": "echo hi"}),
                "createOptions.Cmd must be an array",
            ),
            ("/bin/true", json!({"User": "1000"}), "createOptions.User"),
            (
                "/bin/true",
                json!({"User": "root"}),
                "allow_elevated_docker_permissions",
            ),
            ("/bin/true", json!({"WorkingDir": "rel"}), "WorkingDir"),
            (
                "/bin/true",
                json!({"HostConfig": {"Memory": "1g"}}),
                "HostConfig.Memory",
            ),
            (
                "/bin/true",
                json!({"HostConfig": {"RestartPolicy": {"Name": "sometimes"}}}),
                "RestartPolicy.Name",
            ),
            (
                "/bin/true",
                json!([1]),
                "createOptions must be a JSON object",
            ),
            (
                "busybox:latest",
                json!({}),
                "settings.image must be an absolute path",
            ),
            (
                "/a/../b",
                json!({}),
                "settings.image must be an absolute path",
            ),
            ("/m.tgz", json!({}), "needs Entrypoint or Cmd"),
            (
                "/m.tgz",
                json!({"Cmd": ["../escape"]}),
                "must be a path inside the archive",
            ),
        ];
        for (image, options, expected) in cases {
            let error = launch_spec(&spec(image, options, &[]), false)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{expected:?} not in {error:?}");
            assert!(error.starts_with("invalid process config: "), "{error}");
        }
        let duplicate = launch_spec(
            &spec("/bin/true", json!({}), &[("A", "1"), ("A", "2")]),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(duplicate.contains("duplicate environment variable"));
        assert!(
            launch_spec(&spec("/bin/true", json!({"User": "root"}), &[]), true)
                .unwrap()
                .root
        );
    }

    #[test]
    fn restart_policies() {
        let policy = |name, max_retries| RestartPolicy { name, max_retries };
        let cases = [
            (policy(RestartName::No, 0), 1, 0, false),
            (policy(RestartName::Always, 0), 0, 9, true),
            (policy(RestartName::UnlessStopped, 0), 0, 0, true),
            (policy(RestartName::OnFailure, 0), 0, 0, false),
            (policy(RestartName::OnFailure, 0), 137, 50, true),
            (policy(RestartName::OnFailure, 2), 1, 1, true),
            (policy(RestartName::OnFailure, 2), 1, 2, false),
        ];
        for (policy, code, so_far, expected) in cases {
            assert_eq!(
                policy.restarts(code, so_far),
                expected,
                "{policy:?} {code} {so_far}"
            );
        }
    }
}
