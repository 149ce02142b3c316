//! `iotedge check`: configuration and connectivity checks, each with a stable ID so support
//! tooling can parse the JSON output. A check ends `ok`, `warning`, `error` or `skipped` (when a
//! check it depends on failed). Details never contain secrets: configs are summarized, never
//! echoed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::apply::{daemon_dir, rendered, rooted, DROPIN_NAME};
use crate::super_config::{plan, Environment, SECRETS_DIR};

/// How a check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Passed.
    Ok,
    /// Works, but something should be looked at.
    Warning,
    /// Broken.
    Error,
    /// Not run, because a check it needs did not pass or it does not apply.
    Skipped,
}

/// One check's result.
#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    /// Stable ID, e.g. `keyd-socket-reachable`.
    pub id: &'static str,
    /// What is checked.
    pub description: &'static str,
    /// The outcome.
    pub result: Outcome,
    /// Why (free text).
    pub details: String,
}

/// Where to look.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// The super-config.
    pub super_config: PathBuf,
    /// Root of the per-daemon configs (`/` on a device).
    pub root: PathBuf,
    /// Service-user uids (for the up-to-date comparison).
    pub uids: crate::users::UidResolver,
    /// Socket overrides; `None`: the daemon's configured endpoint, else the default.
    pub keyd_uri: Option<String>,
    /// certd's socket.
    pub certd_uri: Option<String>,
    /// identityd's socket.
    pub identityd_uri: Option<String>,
    /// edged's management socket.
    pub mgmt_uri: Option<String>,
    /// Per-request deadline.
    pub timeout: Duration,
}

/// All results plus counts.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Every check, in order.
    pub checks: Vec<CheckResult>,
    /// Counts by outcome.
    pub summary: Summary,
}

/// Counts by outcome.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Summary {
    /// Passed.
    pub ok: usize,
    /// Warnings.
    pub warnings: usize,
    /// Errors.
    pub errors: usize,
    /// Skipped.
    pub skipped: usize,
}

impl Report {
    /// Whether the run fails (errors, or warnings when they count as errors).
    pub fn failed(&self, warnings_as_errors: bool) -> bool {
        self.summary.errors > 0 || (warnings_as_errors && self.summary.warnings > 0)
    }

    /// Human-readable output.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for check in &self.checks {
            let tag = match check.result {
                Outcome::Ok => "[ OK ]",
                Outcome::Warning => "[WARN]",
                Outcome::Error => "[FAIL]",
                Outcome::Skipped => "[SKIP]",
            };
            text.push_str(&format!("{tag} {} - {}\n", check.id, check.description));
            if !check.details.is_empty() {
                for line in check.details.lines() {
                    text.push_str(&format!("       {line}\n"));
                }
            }
        }
        let summary = self.summary;
        text.push_str(&format!(
            "\n{} check(s) succeeded, {} warning(s), {} error(s), {} skipped.\n",
            summary.ok, summary.warnings, summary.errors, summary.skipped
        ));
        text
    }
}

/// Uids for the up-to-date comparison; a missing user gets a placeholder and a note.
struct CheckEnvironment<'a> {
    uids: &'a crate::users::UidResolver,
    missing: std::cell::RefCell<Vec<String>>,
}

impl Environment for CheckEnvironment<'_> {
    fn uid(&self, user: &str) -> Option<u32> {
        let uid = self.uids.uid(user);
        if uid.is_none() {
            self.missing.borrow_mut().push(user.to_owned());
        }
        Some(uid.unwrap_or(u32::MAX))
    }

    fn hostname(&self) -> String {
        crate::super_config::machine_hostname()
    }
}

struct Checker {
    checks: Vec<CheckResult>,
}

impl Checker {
    fn add(
        &mut self,
        id: &'static str,
        description: &'static str,
        result: Outcome,
        details: impl Into<String>,
    ) -> Outcome {
        self.checks.push(CheckResult {
            id,
            description,
            result,
            details: details.into(),
        });
        result
    }
}

fn endpoint(root: &Path, daemon: &str, key: &str, default: &str) -> String {
    let base = daemon_dir(root, daemon);
    let paths = config_common::ConfigPaths {
        base_file: base.join("config.toml"),
        dropin_dir: base.join("config.d"),
    };
    config_common::load_table(&paths)
        .ok()
        .and_then(|loaded| {
            loaded
                .table
                .get("endpoints")?
                .get(key)?
                .as_str()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| default.to_owned())
}

/// Any HTTP answer on the socket means the daemon is there.
fn reachable(uri: &str, timeout: Duration) -> Result<http::StatusCode, String> {
    let client = crate::client(uri, timeout).map_err(|error| error.to_string())?;
    crate::block_on(client.send(http::Method::GET, "/", &[], bytes::Bytes::new()))
        .map_err(|error| error.to_string())?
        .map(|response| response.status)
        .map_err(|error| error_chain(&error))
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Runs every check.
pub fn run(options: &CheckOptions) -> Report {
    let mut checker = Checker { checks: Vec::new() };

    // The super-config.
    let text = std::fs::read_to_string(&options.super_config);
    let parsed = text
        .as_ref()
        .map_err(|error| error.to_string())
        .and_then(|text| {
            text.parse::<toml::Table>()
                .map_err(|error| error.message().to_owned())
        });
    let well_formed = match &parsed {
        Ok(_) => checker.add(
            "config-toml-well-formed",
            "the super-config is well-formed TOML",
            Outcome::Ok,
            options.super_config.display().to_string(),
        ),
        Err(error) => checker.add(
            "config-toml-well-formed",
            "the super-config is well-formed TOML",
            Outcome::Error,
            format!("{}: {error}", options.super_config.display()),
        ),
    };
    let environment = CheckEnvironment {
        uids: &options.uids,
        missing: std::cell::RefCell::new(Vec::new()),
    };
    let mut the_plan = None;
    if well_formed == Outcome::Ok {
        match text
            .as_ref()
            .map(|text| plan(text, &options.super_config, &environment))
        {
            Ok(Ok(plan)) => {
                let details = plan.warnings.join("\n");
                let outcome = if plan.warnings.is_empty() {
                    Outcome::Ok
                } else {
                    Outcome::Warning
                };
                checker.add(
                    "config-valid",
                    "the super-config is valid",
                    outcome,
                    details,
                );
                the_plan = Some(plan);
            }
            Ok(Err(error)) => {
                checker.add(
                    "config-valid",
                    "the super-config is valid",
                    Outcome::Error,
                    error_chain(&error),
                );
            }
            Err(_) => {}
        }
    } else {
        checker.add(
            "config-valid",
            "the super-config is valid",
            Outcome::Skipped,
            "the super-config could not be read",
        );
    }
    let edge = the_plan.as_ref().map_or_else(
        || crate::system::edge_installed(&options.root),
        |plan| plan.edged.is_some(),
    );

    // The generated drop-ins match the super-config.
    match &the_plan {
        Some(plan) => {
            let mut stale = Vec::new();
            for (daemon, expected) in rendered(plan) {
                let path = daemon_dir(&options.root, daemon.name)
                    .join("config.d")
                    .join(DROPIN_NAME);
                match std::fs::read_to_string(&path) {
                    Ok(current) if current == expected => {}
                    Ok(_) => stale.push(format!("{} differs", path.display())),
                    Err(_) => stale.push(format!("{} is missing", path.display())),
                }
            }
            // Inline keys go to fixed file names, so a changed key leaves every drop-in the
            // same: compare the key files too (never printing them). Unreadable without root.
            let secrets_dir = rooted(&options.root, SECRETS_DIR);
            for secret in &plan.secrets {
                let path = secrets_dir.join(&secret.file_name);
                match std::fs::read(&path) {
                    Ok(current) if current == secret.contents => {}
                    Ok(_) => stale.push(format!("{} holds another key", path.display())),
                    Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {}
                    Err(_) => stale.push(format!("{} is missing", path.display())),
                }
            }
            let missing = environment.missing.borrow().clone();
            if !missing.is_empty() {
                checker.add(
                    "config-up-to-date",
                    "the daemons' configs were generated from the current super-config",
                    Outcome::Warning,
                    format!(
                        "service users missing ({}); create them before `config apply`",
                        missing.join(", ")
                    ),
                );
            } else if stale.is_empty() {
                checker.add(
                    "config-up-to-date",
                    "the daemons' configs were generated from the current super-config",
                    Outcome::Ok,
                    "",
                );
            } else {
                stale.push("run `iotedge config apply`".into());
                checker.add(
                    "config-up-to-date",
                    "the daemons' configs were generated from the current super-config",
                    Outcome::Warning,
                    stale.join("\n"),
                );
            }
        }
        None => {
            checker.add(
                "config-up-to-date",
                "the daemons' configs were generated from the current super-config",
                Outcome::Skipped,
                "the super-config is not valid",
            );
        }
    }

    // Each daemon's merged config parses, and its preloaded files exist.
    let mut daemons = vec![
        (
            "keyd",
            "keyd-config-well-formed",
            "keyd's config.toml and config.d are well-formed TOML",
        ),
        (
            "certd",
            "certd-config-well-formed",
            "certd's config.toml and config.d are well-formed TOML",
        ),
        (
            "identityd",
            "identityd-config-well-formed",
            "identityd's config.toml and config.d are well-formed TOML",
        ),
    ];
    if edge {
        daemons.push((
            "edged",
            "edged-config-well-formed",
            "edged's config.toml and config.d are well-formed TOML",
        ));
    }
    let mut missing_files = Vec::new();
    for (daemon, id, description) in daemons {
        let base = daemon_dir(&options.root, daemon);
        let paths = config_common::ConfigPaths {
            base_file: base.join("config.toml"),
            dropin_dir: base.join("config.d"),
        };
        match config_common::load_table(&paths) {
            Ok(loaded) if loaded.sources.is_empty() => {
                checker.add(
                    id,
                    description,
                    Outcome::Error,
                    format!(
                        "no config under {} (run `iotedge config apply`)",
                        base.display()
                    ),
                );
            }
            Ok(loaded) => {
                checker.add(id, description, Outcome::Ok, "");
                let preloaded = match daemon {
                    "keyd" => loaded.table.get("preloaded_keys"),
                    "certd" => loaded.table.get("preloaded_certs"),
                    _ => None,
                };
                if let Some(toml::Value::Table(entries)) = preloaded {
                    for (name, value) in entries {
                        let Some(path) = value.as_str().and_then(|uri| uri.strip_prefix("file://"))
                        else {
                            continue;
                        };
                        let on_disk = crate::apply::rooted(&options.root, path);
                        if !on_disk.exists() {
                            missing_files.push(format!(
                                "{daemon} {name}: {} does not exist",
                                on_disk.display()
                            ));
                        }
                    }
                }
            }
            Err(error) => {
                checker.add(id, description, Outcome::Error, error_chain(&error));
            }
        }
    }
    if missing_files.is_empty() {
        checker.add(
            "preloaded-files-exist",
            "the key and cert files named in keyd's and certd's configs exist",
            Outcome::Ok,
            "",
        );
    } else {
        checker.add(
            "preloaded-files-exist",
            "the key and cert files named in keyd's and certd's configs exist",
            Outcome::Warning,
            missing_files.join("\n"),
        );
    }

    // Sockets.
    let sockets = [
        (
            "keyd-socket-reachable",
            "keyd answers on its socket",
            "keyd",
            "aziot_keyd",
            options.keyd_uri.clone(),
            crate::DEFAULT_KEYD_URI,
        ),
        (
            "certd-socket-reachable",
            "certd answers on its socket",
            "certd",
            "aziot_certd",
            options.certd_uri.clone(),
            crate::DEFAULT_CERTD_URI,
        ),
        (
            "identityd-socket-reachable",
            "identityd answers on its socket",
            "identityd",
            "aziot_identityd",
            options.identityd_uri.clone(),
            crate::DEFAULT_IDENTITYD_URI,
        ),
    ];
    let mut identityd_uri = None;
    let mut identityd_up = false;
    for (id, description, daemon, key, override_uri, default) in sockets {
        let uri = override_uri.unwrap_or_else(|| endpoint(&options.root, daemon, key, default));
        let outcome = match reachable(&uri, options.timeout) {
            Ok(_) => checker.add(id, description, Outcome::Ok, uri.clone()),
            Err(error) => checker.add(id, description, Outcome::Error, error),
        };
        if daemon == "identityd" {
            identityd_up = outcome == Outcome::Ok;
            identityd_uri = Some(uri);
        }
    }

    // Provisioning.
    let id = "identityd-provisioned";
    let description = "identityd has provisioned the device";
    match identityd_uri.filter(|_| identityd_up) {
        None => {
            checker.add(
                id,
                description,
                Outcome::Skipped,
                "identityd is not reachable",
            );
        }
        Some(uri) => {
            #[derive(serde::Deserialize)]
            struct Identity {
                spec: Spec,
            }
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Spec {
                hub_name: String,
                device_id: String,
            }
            let result = crate::client(&uri, options.timeout).map(|client| {
                crate::block_on(client.json::<_, Identity>(
                    http::Method::POST,
                    "/identities/device?api-version=2020-09-01",
                    Some(&serde_json::json!({ "type": "aziot" })),
                    http::StatusCode::OK,
                ))
            });
            match result {
                Ok(Ok(Ok(identity))) => checker.add(
                    id,
                    description,
                    Outcome::Ok,
                    format!(
                        "device {} in {}",
                        identity.spec.device_id, identity.spec.hub_name
                    ),
                ),
                Ok(Ok(Err(error))) => match error.status() {
                    Some(http::StatusCode::NOT_FOUND) => checker.add(
                        id,
                        description,
                        Outcome::Warning,
                        format!("no cloud identity (provisioning source \"none\"?): {error}"),
                    ),
                    Some(http::StatusCode::FORBIDDEN | http::StatusCode::UNAUTHORIZED) => checker
                        .add(
                            id,
                            description,
                            Outcome::Warning,
                            format!("not allowed to ask (run as root): {error}"),
                        ),
                    _ => checker.add(id, description, Outcome::Error, error_chain(&error)),
                },
                Ok(Err(error)) | Err(error) => {
                    checker.add(id, description, Outcome::Error, error_chain(&error))
                }
            };
        }
    }

    // IoT Edge.
    if edge {
        let moby = the_plan
            .as_ref()
            .map(|plan| plan.moby_uri.clone())
            .unwrap_or_else(|| crate::super_config::DEFAULT_MOBY_URI.to_owned());
        match reachable(&moby, options.timeout) {
            Ok(_) => checker.add(
                "container-engine-installed",
                "the container engine answers",
                Outcome::Ok,
                moby,
            ),
            Err(error) => checker.add(
                "container-engine-installed",
                "the container engine answers",
                Outcome::Error,
                error,
            ),
        };
        let mgmt = options
            .mgmt_uri
            .clone()
            .unwrap_or_else(|| crate::DEFAULT_MGMT_URI.to_owned());
        match crate::edge::list(&mgmt, options.timeout) {
            Ok(modules) => checker.add(
                "edged-mgmt-reachable",
                "edged answers on its management socket",
                Outcome::Ok,
                format!("{} module(s)", modules.len()),
            ),
            Err(error) => checker.add(
                "edged-mgmt-reachable",
                "edged answers on its management socket",
                Outcome::Error,
                error_chain(&error),
            ),
        };
    }

    let mut summary = Summary::default();
    for check in &checker.checks {
        match check.result {
            Outcome::Ok => summary.ok += 1,
            Outcome::Warning => summary.warnings += 1,
            Outcome::Error => summary.errors += 1,
            Outcome::Skipped => summary.skipped += 1,
        }
    }
    Report {
        checks: checker.checks,
        summary,
    }
}
