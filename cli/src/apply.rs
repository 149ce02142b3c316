//! Writes a [`Plan`] to disk: each daemon's `config.d/00-super.toml` (0600, in a 0700 `config.d`,
//! both owned by the daemon's service user; tpmd's by keyd's user, since keyd reads it) and the
//! secret files under `/var/secrets/aziot/keyd/` (0600 in 0700, owner keyd's user), all
//! atomically through
//! `config_common::files`. Also `config mp` (a minimal super-config) and the hostname guard.
//!
//! `root` prefixes every path written (tests and image builders use a folder; on a device it is
//! `/`). The paths *inside* the files always describe the real device.

use std::path::{Path, PathBuf};

use crate::error::ApplyError;
use crate::super_config::{render, Plan, SECRETS_DIR};
use crate::users::{give_to, Ownership, CERTD_USER, EDGED_USER, IDENTITYD_USER, KEYD_USER};

/// The name of the drop-in `config apply` owns in every daemon's `config.d`.
pub const DROPIN_NAME: &str = "00-super.toml";

/// One daemon's configuration folder.
#[derive(Clone, Copy, Debug)]
pub struct Daemon {
    /// The folder name under `/etc/aziot/`.
    pub name: &'static str,
    /// The service user.
    pub user: &'static str,
}

/// keyd, certd, identityd, edged, and the TPM service's folder: keyd serves the tpmd API and
/// reads `/etc/aziot/tpmd/`, so keyd's user owns it (the reference's tpmd runs as `aziottpm`).
pub const DAEMONS: [Daemon; 5] = [
    Daemon {
        name: "keyd",
        user: KEYD_USER,
    },
    Daemon {
        name: "certd",
        user: CERTD_USER,
    },
    Daemon {
        name: "identityd",
        user: IDENTITYD_USER,
    },
    Daemon {
        name: "edged",
        user: EDGED_USER,
    },
    Daemon {
        name: "tpmd",
        user: KEYD_USER,
    },
];

/// `<root>/etc/aziot/<daemon>`.
pub fn daemon_dir(root: &Path, daemon: &str) -> PathBuf {
    root.join("etc/aziot").join(daemon)
}

/// Joins an absolute device path under `root`.
pub fn rooted(root: &Path, absolute: &str) -> PathBuf {
    root.join(absolute.trim_start_matches('/'))
}

/// The rendered drop-ins of a plan, by daemon name (edged only when present).
pub fn rendered(plan: &Plan) -> Vec<(Daemon, String)> {
    let mut files = vec![
        (DAEMONS[0], render(&plan.keyd)),
        (DAEMONS[1], render(&plan.certd)),
        (DAEMONS[2], render(&plan.identityd)),
        (DAEMONS[4], render(&plan.tpmd)),
    ];
    if let Some(edged) = &plan.edged {
        files.push((DAEMONS[3], render(edged)));
    }
    files
}

/// Writes the plan under `root`; returns notes for the operator (ownership kept, files written).
pub fn write_plan(plan: &Plan, root: &Path) -> Result<Vec<String>, ApplyError> {
    let mut notes = Vec::new();
    let write_error = |path: &Path| {
        let path = path.to_owned();
        move |source| ApplyError::Write { path, source }
    };
    let own = |path: &Path, user: &str, notes: &mut Vec<String>| -> Result<(), ApplyError> {
        match give_to(path, user).map_err(write_error(path))? {
            Ownership::Changed | Ownership::Unchanged => {}
            Ownership::NoSuchUser => {
                let note =
                    format!("user {user} does not exist: its files keep their current owner");
                if !notes.contains(&note) {
                    notes.push(note);
                }
            }
            Ownership::NotPermitted => notes.push(format!(
                "not allowed to give {} to {user}: it keeps its current owner",
                path.display()
            )),
        }
        Ok(())
    };

    if !plan.secrets.is_empty() {
        let secrets_dir = rooted(root, SECRETS_DIR);
        if let Some(parent) = secrets_dir.parent() {
            std::fs::create_dir_all(parent).map_err(write_error(parent))?;
        }
        config_common::files::create_private_dir(&secrets_dir)
            .map_err(write_error(&secrets_dir))?;
        own(&secrets_dir, KEYD_USER, &mut notes)?;
        for secret in &plan.secrets {
            let path = secrets_dir.join(&secret.file_name);
            config_common::files::write_atomic(&secrets_dir, &secret.file_name, &secret.contents)
                .map_err(write_error(&path))?;
            own(&path, KEYD_USER, &mut notes)?;
            notes.push(format!("wrote {}", path.display()));
        }
    }

    for (daemon, text) in rendered(plan) {
        let base = daemon_dir(root, daemon.name);
        std::fs::create_dir_all(&base).map_err(write_error(&base))?;
        let dropin_dir = base.join("config.d");
        config_common::files::create_private_dir(&dropin_dir).map_err(write_error(&dropin_dir))?;
        own(&dropin_dir, daemon.user, &mut notes)?;
        let path = dropin_dir.join(DROPIN_NAME);
        config_common::files::write_atomic(&dropin_dir, DROPIN_NAME, text.as_bytes())
            .map_err(write_error(&path))?;
        own(&path, daemon.user, &mut notes)?;
        notes.push(format!("wrote {}", path.display()));
    }
    Ok(notes)
}

/// The hostname in identityd's current merged configuration under `root`, if any.
pub fn current_identityd_hostname(root: &Path) -> Option<String> {
    let base = daemon_dir(root, "identityd");
    let paths = config_common::ConfigPaths {
        base_file: base.join("config.toml"),
        dropin_dir: base.join("config.d"),
    };
    let loaded = config_common::load_table(&paths).ok()?;
    loaded.table.get("hostname")?.as_str().map(str::to_owned)
}

/// The owner label edgeAgent puts on the containers it creates.
pub const EDGE_OWNER_LABEL: &str =
    "net.azure-devices.edge.owner=Microsoft.Azure.Devices.Edge.Agent";

/// Names of containers created by edgeAgent, from the Docker Engine at `moby_uri`.
pub fn edge_agent_containers(moby_uri: &str) -> Result<Vec<String>, crate::DaemonError> {
    #[derive(serde::Deserialize)]
    struct Container {
        #[serde(rename = "Names", default)]
        names: Vec<String>,
    }
    let client = crate::client(moby_uri, std::time::Duration::from_secs(10))?;
    let filters = serde_json::json!({ "label": [EDGE_OWNER_LABEL] }).to_string();
    let path = format!(
        "/containers/json?all=true&filters={}",
        percent_encoding::utf8_percent_encode(&filters, percent_encoding::NON_ALPHANUMERIC)
    );
    let containers: Vec<Container> =
        crate::block_on(client.json(http::Method::GET, &path, None::<&()>, http::StatusCode::OK))?
            .map_err(|source| crate::DaemonError::Request {
                what: format!("listing containers via {moby_uri}"),
                source,
            })?;
    Ok(containers
        .into_iter()
        .flat_map(|container| container.names)
        .map(|name| name.trim_start_matches('/').to_owned())
        .collect())
}

/// Refuses a hostname change while edgeAgent's modules exist (their certs name the old host).
/// Returns a note when Docker could not be asked.
pub fn guard_hostname_change(plan: &Plan, root: &Path) -> Result<Option<String>, ApplyError> {
    if plan.edged.is_none() {
        return Ok(None);
    }
    let Some(old) = current_identityd_hostname(root) else {
        return Ok(None);
    };
    if old == plan.hostname {
        return Ok(None);
    }
    match edge_agent_containers(&plan.moby_uri) {
        Ok(modules) if modules.is_empty() => Ok(None),
        Ok(modules) => Err(ApplyError::HostnameChangeWithModules {
            old,
            new: plan.hostname.clone(),
            modules: modules.join(", "),
        }),
        Err(error) => Ok(Some(format!(
            "the hostname changes from {old:?} to {:?}; could not ask Docker whether modules \
             exist ({error}); if they do, remove them",
            plan.hostname
        ))),
    }
}

/// Writes a minimal super-config with manual connection-string provisioning (`config mp`).
/// The connection string is validated first; the file is 0600 and written atomically.
pub fn write_minimal(
    connection_string: &str,
    output: &Path,
    force: bool,
    edge: bool,
) -> Result<(), ApplyError> {
    crate::super_config::parse_connection_string(connection_string, "--connection-string")
        .map_err(|problem| ApplyError::Invalid {
            path: output.to_owned(),
            problem,
        })?;
    if output.exists() && !force {
        return Err(ApplyError::Exists {
            path: output.to_owned(),
        });
    }
    let quoted = toml::Value::String(connection_string.trim().to_owned()).to_string();
    let mut text = format!(
        "# Written by `iotedge config mp`. Apply with `iotedge config apply`.\n\
         # See docs/install.md for every key.\n\n\
         [provisioning]\nsource = \"manual\"\nconnection_string = {quoted}\n"
    );
    if edge {
        text.push_str(&format!(
            "\n[agent]\nname = \"edgeAgent\"\ntype = \"docker\"\n\n[agent.config]\nimage = \"{}\"\n",
            crate::super_config::DEFAULT_AGENT_IMAGE
        ));
    }
    let directory = match output.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&directory).map_err(|source| ApplyError::Write {
        path: directory.clone(),
        source,
    })?;
    let file_name = output
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| ApplyError::Write {
            path: output.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        })?;
    config_common::files::write_atomic(&directory, file_name, text.as_bytes()).map_err(|source| {
        ApplyError::Write {
            path: output.to_owned(),
            source,
        }
    })
}
