//! Emulator of Azure IoT Hub Device Provisioning Service (DPS) registration and IoT Hub's
//! device / module identity REST API, faithful to the wire contract in the identityd spec
//! (section 9): real SAS verification, real X.509 client-certificate checks over mutual TLS,
//! DPS operations with polling, and module identities with generation IDs and etags.
//!
//! It serves HTTPS on loopback with its own test CA (written to disk so clients can trust it
//! via `SSL_CERT_FILE`), and a plain-HTTP admin API (see [`admin`](crate::admin)) for tests
//! to change state, inject faults and read the request log. Embed it with [`start`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), cloud_emulator::EmulatorError> {
//! let emu = cloud_emulator::start(cloud_emulator::Config::default()).await?;
//! println!("DPS at https://{} , CA at {}", emu.https_addr(), emu.ca_cert_path().display());
//! emu.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod config;
pub mod control;
pub mod dps;
pub mod est;
pub mod hub;
pub mod issuance;
pub mod pki;
mod reply;
pub mod sas;
mod server;
mod state;
pub mod tpm;
pub mod util;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

pub use crate::{
    config::{
        Attestation, Config, DeviceAuthSpec, DeviceSpec, FailSpec, FaultSpec, GroupAttestation,
        GroupEnrollment, IndividualEnrollment, SettingsPatch, Target,
    },
    control::Control,
    state::{LogEntry, Settings, TpmSeen},
};

/// Errors of the emulator library.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The configuration is invalid.
    #[error("configuration error: {0}")]
    Config(String),
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// OpenSSL failed (key generation, certificate building, TLS setup).
    #[error("crypto/TLS error: {0}")]
    Tls(#[from] openssl::error::ErrorStack),
    /// A value given at run time (admin API, config entry) is invalid.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The named object does not exist.
    #[error("not found: {0}")]
    NotFound(String),
}

/// A running emulator. Dropping it stops the listeners too; [`RunningEmulator::shutdown`]
/// additionally waits for them to stop.
#[derive(Debug)]
pub struct RunningEmulator {
    https_addr: SocketAddr,
    hub_https_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
    ca_cert_path: PathBuf,
    ca_cert_pem: String,
    id_scope: String,
    hub_hostname: String,
    control: Control,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _tempdir: Option<tempfile::TempDir>,
}

impl RunningEmulator {
    /// Address of the HTTPS listener serving DPS and Hub.
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr
    }

    /// Address of the optional second HTTPS listener (`hub_listen`).
    pub fn hub_https_addr(&self) -> Option<SocketAddr> {
        self.hub_https_addr
    }

    /// Address of the plain-HTTP admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Path of the CA certificate (PEM) that signed the server certificate.
    pub fn ca_cert_path(&self) -> &Path {
        &self.ca_cert_path
    }

    /// The CA certificate (PEM).
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// The DPS ID scope served.
    pub fn id_scope(&self) -> &str {
        &self.id_scope
    }

    /// Host name of the default hub (e.g. `localhost:PORT`).
    pub fn hub_hostname(&self) -> &str {
        &self.hub_hostname
    }

    /// DPS global endpoint URL for clients: `https://localhost:PORT/`.
    pub fn dps_endpoint(&self) -> String {
        format!("https://localhost:{}/", self.https_addr.port())
    }

    /// Run-time control (same operations as the admin API).
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// The JSON the binary prints when ready.
    pub fn ready_info(&self) -> serde_json::Value {
        serde_json::json!({
            "https": self.https_addr.to_string(),
            "hub_https": self.hub_https_addr.map(|a| a.to_string()),
            "admin": self.admin_addr.to_string(),
            "ca_cert": self.ca_cert_path.display().to_string(),
            "id_scope": self.id_scope,
            "hub_hostname": self.hub_hostname,
            "dps_endpoint": self.dps_endpoint(),
        })
    }

    /// Stops accepting connections, asks open connections to finish, and waits for the
    /// listeners to stop.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown_tx.send(true);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
    }
}

async fn bind(addr: SocketAddr, what: &str) -> Result<(TcpListener, SocketAddr), EmulatorError> {
    let io = |source| EmulatorError::Io {
        context: format!("bind {what} listener {addr}"),
        source,
    };
    let l = TcpListener::bind(addr).await.map_err(io)?;
    let local = l.local_addr().map_err(io)?;
    Ok((l, local))
}

/// Starts the emulator: binds the listeners, creates the CA and server certificate, loads
/// the configured enrollments and devices, and serves in background tasks of the current
/// Tokio runtime.
pub async fn start(config: Config) -> Result<RunningEmulator, EmulatorError> {
    let (https, https_addr) = bind(config.listen, "HTTPS").await?;
    let hub_https = match config.hub_listen {
        Some(a) => Some(bind(a, "hub HTTPS").await?),
        None => None,
    };
    let (admin, admin_addr) = bind(config.admin_listen, "admin").await?;

    let hub_hostname = config
        .hub_hostname
        .clone()
        .unwrap_or_else(|| format!("localhost:{}", https_addr.port()));

    let mut state = state::State::new(
        config.id_scope.clone(),
        hub_hostname.clone(),
        config.assigning_polls,
        config.retry_after_secs,
    );
    let cfg_err =
        |what: String| move |e: EmulatorError| EmulatorError::Config(format!("{what}: {e}"));
    state.dps_issuing_ca = Some(
        pki::TestCa::new("Cloud Emulator DPS Issuing CA")
            .map_err(|error| EmulatorError::Config(format!("DPS issuing CA: {error}")))?,
    );
    for policy in &config.certificate_issuance {
        state
            .issuance
            .insert(policy.enrollment.clone(), policy.validity_secs);
    }
    for path in &config.trusted_ca_files {
        let pem = std::fs::read_to_string(path).map_err(|source| EmulatorError::Io {
            context: format!("read {}", path.display()),
            source,
        })?;
        state
            .add_trusted_ca(&pem)
            .map_err(cfg_err(path.display().to_string()))?;
    }
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        hub_hostname.clone(),
    ];
    names.extend(config.server_names.iter().cloned());
    for e in &config.individual_enrollments {
        names.extend(e.assigned_hub.iter().cloned());
        state.add_individual(e.clone()).map_err(cfg_err(format!(
            "individual_enrollment {:?}",
            e.registration_id
        )))?;
    }
    for g in &config.group_enrollments {
        names.extend(g.assigned_hub.iter().cloned());
        state
            .add_group(g.clone())
            .map_err(cfg_err(format!("group_enrollment {:?}", g.group_id)))?;
    }
    for d in &config.devices {
        names.extend(d.hub.iter().cloned());
        state
            .add_device(d.clone())
            .map_err(cfg_err(format!("device {:?}", d.device_id)))?;
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(util::host_part(n).to_ascii_lowercase()));

    let (tempdir, ca_cert_path) = match (&config.ca_cert_path, &config.pki_dir) {
        (Some(p), _) => (None, p.clone()),
        (None, Some(dir)) => (None, dir.join("ca.pem")),
        (None, None) => {
            let dir = tempfile::Builder::new()
                .prefix("cloud-emulator-")
                .tempdir()
                .map_err(|source| EmulatorError::Io {
                    context: "create temporary directory".to_string(),
                    source,
                })?;
            let path = dir.path().join("ca.pem");
            (Some(dir), path)
        }
    };
    let pki = pki::ServerPki::new(config.pki_dir.as_deref(), &names, &ca_cert_path)?;
    let acceptor = server::acceptor(&pki)?;
    let ca_cert_pem = pki.ca.cert_pem();

    let shared = state::Shared::new(state);
    let control = Control::new(shared.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let mut tasks = vec![tokio::spawn(server::tls_accept_loop(
        https,
        acceptor.clone(),
        shared.clone(),
        shutdown_rx.clone(),
    ))];
    let hub_https_addr = hub_https.map(|(listener, addr)| {
        tasks.push(tokio::spawn(server::tls_accept_loop(
            listener,
            acceptor.clone(),
            shared.clone(),
            shutdown_rx.clone(),
        )));
        addr
    });

    let mut emu = RunningEmulator {
        https_addr,
        hub_https_addr,
        admin_addr,
        ca_cert_path,
        ca_cert_pem,
        id_scope: config.id_scope.clone(),
        hub_hostname,
        control: control.clone(),
        shutdown_tx,
        tasks: Vec::new(),
        _tempdir: tempdir,
    };
    let info = Arc::new(emu.ready_info());
    tasks.push(tokio::spawn(server::admin_accept_loop(
        admin,
        control,
        info,
        shutdown_rx,
    )));
    emu.tasks = tasks;
    log::info!(
        "cloud emulator ready: https {https_addr}, admin {admin_addr}, scope {}, hub {}",
        emu.id_scope,
        emu.hub_hostname
    );
    Ok(emu)
}
