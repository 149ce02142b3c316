//! `iotedge system ...`: thin wrappers over `systemctl` and `journalctl` for the daemons' units,
//! and `reprovision` through identityd's socket. Where systemd is not the init system (a
//! container, a test machine) the wrappers say so instead of failing obscurely.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::{DaemonError, SystemError};

/// The services, in start order (keyd and certd are socket-activated).
pub const IDENTITY_SERVICES: [&str; 3] = [
    "aziot-keyd.service",
    "aziot-certd.service",
    "aziot-identityd.service",
];
/// The identity services' sockets (keyd serves the TPM service on `aziot-tpmd.socket`).
pub const IDENTITY_SOCKETS: [&str; 4] = [
    "aziot-keyd.socket",
    "aziot-tpmd.socket",
    "aziot-certd.socket",
    "aziot-identityd.socket",
];
/// edged's service.
pub const EDGED_SERVICE: &str = "aziot-edged.service";
/// edged's sockets.
pub const EDGED_SOCKETS: [&str; 2] = ["aziot-edged.mgmt.socket", "aziot-edged.workload.socket"];

/// Log levels accepted by `set-log-level` (the daemons' `AZIOT_LOG`).
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// Whether systemd is the running init system (`sd_booted()`).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Whether IoT Edge (edged) is configured on this machine.
pub fn edge_installed(root: &Path) -> bool {
    let edged = crate::apply::daemon_dir(root, "edged");
    edged.join("config.toml").is_file()
        || edged
            .join("config.d")
            .join(crate::apply::DROPIN_NAME)
            .is_file()
}

/// Every unit of the installation: sockets first, then services.
pub fn units(edge: bool) -> Vec<&'static str> {
    let mut units: Vec<&str> = IDENTITY_SOCKETS.to_vec();
    if edge {
        units.extend(EDGED_SOCKETS);
    }
    units.extend(IDENTITY_SERVICES);
    if edge {
        units.push(EDGED_SERVICE);
    }
    units
}

fn require_systemd(what: &str) -> Result<(), SystemError> {
    if systemd_running() {
        Ok(())
    } else {
        Err(SystemError::NoSystemd {
            what: what.to_owned(),
        })
    }
}

fn run(program: &str, arguments: &[&str]) -> Result<(), SystemError> {
    let status = Command::new(program)
        .args(arguments)
        .status()
        .map_err(|source| SystemError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    if status.success() {
        Ok(())
    } else {
        Err(SystemError::Failed {
            program: program.to_owned(),
            arguments: arguments.join(" "),
            status,
        })
    }
}

/// `systemctl is-active` of every unit: (unit, state).
pub fn status(edge: bool) -> Result<Vec<(String, String)>, SystemError> {
    require_systemd("`system status`")?;
    let mut states = Vec::new();
    for unit in units(edge) {
        let output = Command::new("systemctl")
            .args(["is-active", unit])
            .output()
            .map_err(|source| SystemError::Spawn {
                program: "systemctl".into(),
                source,
            })?;
        let state = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        states.push((
            unit.to_owned(),
            if state.is_empty() {
                "unknown".into()
            } else {
                state
            },
        ));
    }
    Ok(states)
}

/// Shows the daemons' journal; `extra` is passed to journalctl (e.g. `-f`, `--since today`).
pub fn logs(edge: bool, extra: &[String]) -> Result<(), SystemError> {
    require_systemd("`system logs` (journald)")?;
    let mut arguments: Vec<String> = Vec::new();
    for service in IDENTITY_SERVICES {
        arguments.push("-u".into());
        arguments.push(service.trim_end_matches(".service").into());
    }
    if edge {
        arguments.push("-u".into());
        arguments.push(EDGED_SERVICE.trim_end_matches(".service").into());
    }
    arguments.push("--no-pager".into());
    arguments.extend(extra.iter().cloned());
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    run("journalctl", &arguments)
}

/// Stops every service (edged first). Their sockets stop with them (`PartOf=` in the units), so
/// nothing comes back on demand until `restart` or `systemctl start` of the sockets.
pub fn stop(edge: bool) -> Result<(), SystemError> {
    require_systemd("`system stop`")?;
    let mut services = Vec::new();
    if edge {
        services.push(EDGED_SERVICE);
    }
    services.extend([
        "aziot-identityd.service",
        "aziot-keyd.service",
        "aziot-certd.service",
    ]);
    let mut arguments = vec!["stop"];
    arguments.extend(services);
    run("systemctl", &arguments)
}

/// The restart of config.md 3.1 step 6: stop edged, identityd, keyd, certd; start the sockets;
/// start identityd, then edged (keyd and certd come back through socket activation).
pub fn restart(edge: bool) -> Result<(), SystemError> {
    stop(edge)?;
    let mut sockets: Vec<&str> = vec!["start"];
    sockets.extend(IDENTITY_SOCKETS);
    if edge {
        sockets.extend(EDGED_SOCKETS);
    }
    run("systemctl", &sockets)?;
    run("systemctl", &["start", "aziot-identityd.service"])?;
    if edge {
        run("systemctl", &["start", EDGED_SERVICE])?;
    }
    Ok(())
}

/// Writes `<root>/etc/systemd/system/<service>.d/log-level.conf` with `AZIOT_LOG=<level>` for
/// every service and reloads systemd when it runs. Returns the files written.
pub fn set_log_level(root: &Path, level: &str, edge: bool) -> Result<Vec<PathBuf>, SystemError> {
    let mut services: Vec<&str> = IDENTITY_SERVICES.to_vec();
    if edge {
        services.push(EDGED_SERVICE);
    }
    let mut written = Vec::new();
    for service in services {
        let directory =
            crate::apply::rooted(root, "/etc/systemd/system").join(format!("{service}.d"));
        let path = directory.join("log-level.conf");
        std::fs::create_dir_all(&directory)
            .and_then(|()| {
                std::fs::write(
                    &path,
                    format!("# Written by `iotedge system set-log-level`.\n[Service]\nEnvironment=AZIOT_LOG={level}\n"),
                )
            })
            .map_err(|source| SystemError::Write {
                path: path.clone(),
                source,
            })?;
        written.push(path);
    }
    if root == Path::new("/") && systemd_running() {
        run("systemctl", &["daemon-reload"])?;
    }
    Ok(written)
}

/// Asks identityd to reprovision the device and waits until it is done.
pub fn reprovision(identityd_uri: &str) -> Result<(), SystemError> {
    // DPS registration may poll for up to 5 minutes.
    let client = crate::client(identityd_uri, Duration::from_secs(360))?;
    let body = serde_json::json!({ "type": "aziot" });
    crate::block_on(client.no_content(
        http::Method::POST,
        "/identities/device/reprovision?api-version=2020-09-01",
        Some(&body),
        http::StatusCode::NO_CONTENT,
    ))?
    .map_err(|source| DaemonError::Request {
        what: format!("reprovisioning via {identityd_uri}"),
        source,
    })?;
    Ok(())
}
