//! edged, the module runtime: runs edge modules as Docker containers (or, with
//! `agent.type = "process"`, as supervised host processes), keeps edgeAgent alive,
//! owns the Edge CA, and serves the IoT Edge management API (edgeAgent, the CLI) and workload
//! API (every module) over Unix sockets. Keys, certificates and identities come from keyd, certd
//! and identityd through their sockets.
//!
//! Request flow: `http-common` server → [`routes`] (the two route tables) → [`handlers`] (parse,
//! shape answers) → [`service::Edged`] (caller checks, per-module ordering, listeners, identities,
//! crypto through keyd, certificates through certd) → [`runtime::ModuleRuntime`]
//! ([`runtime::docker::DockerRuntime`] on [`docker`], or [`runtime::process::ProcessRuntime`]). Nothing below `handlers` builds HTTP
//! answers; the runtime never sees edged's API types.

pub mod certs;
pub mod config;
pub mod docker;
pub mod error;
pub mod fdstore;
pub mod gc;
mod handlers;
pub mod identity;
pub mod model;
pub mod routes;
pub mod runtime;
pub mod service;
pub mod support;
pub mod systeminfo;
pub mod time;
pub mod watchdog;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http_common::listener::{listen, ListenerUri, SystemdFds};

pub use config::Config;
pub use error::EdgedError;
pub use service::{Edged, ExitReason};

use crate::identity::{DeviceIdentity, HttpIdentityClient, IdentityClient};
use crate::runtime::docker::DockerRuntime;
use crate::runtime::process::ProcessRuntime;
use crate::runtime::ModuleRuntime;

/// Why startup failed before anything was served.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A step failed.
    #[error("{step}")]
    Step {
        /// The step.
        step: &'static str,
        /// The cause.
        #[source]
        source: EdgedError,
    },
    /// A listener could not be opened.
    #[error("could not open the {which} socket")]
    Listen {
        /// `management` or `workload`.
        which: &'static str,
        /// The cause.
        #[source]
        source: http_common::listener::ListenError,
    },
}

fn step(step: &'static str) -> impl FnOnce(EdgedError) -> StartupError {
    move |source| StartupError::Step { step, source }
}

/// The device digest stored in `<homedir>/cache/provisioning_state`.
pub fn device_digest(device: &DeviceIdentity) -> String {
    let json = serde_json::json!({
        "device_id": device.device_id,
        "gateway_host_name": device.gateway_host,
        "hub_name": device.hub_name,
    });
    let bytes = serde_json::to_vec(&json).unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(openssl::sha::sha256(&bytes))
}

/// Fetches the device identity: on an HTTP error from identityd, asks it to reprovision and
/// retries every 5 s; on connection errors, waits and retries. `None` if `shutdown` came first.
pub async fn device_identity<I: IdentityClient>(
    identity: &I,
    always_reprovision: bool,
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Option<DeviceIdentity> {
    let mut reprovision = always_reprovision;
    loop {
        if reprovision {
            log::info!("asking identityd to reprovision the device");
            if let Err(error) = identity.reprovision().await {
                log::warn!("identityd could not reprovision: {error}");
            }
        }
        match identity.get_device().await {
            Ok(device) => return Some(device),
            Err(error) => {
                reprovision = error.status().is_some();
                log::warn!(
                    "could not get the device identity from identityd: {}; retrying in 5 s",
                    http_common::error::error_chain(&error)
                );
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = &mut *shutdown => return None,
        }
    }
}

fn prepare_homedir(homedir: &Path) -> Result<PathBuf, EdgedError> {
    for folder in ["cache", "mnt", "gc"] {
        std::fs::create_dir_all(homedir.join(folder)).map_err(|source| {
            EdgedError::io(format!("could not create {folder} in the homedir"), source)
        })?;
    }
    std::fs::canonicalize(homedir)
        .map_err(|source| EdgedError::io("could not resolve the homedir", source))
}

/// Runs edged until `shutdown` resolves or the daemon decides to end; returns why it ended.
/// `passed_fd_names` are the `LISTEN_FDNAMES` entries of the fds in `systemd` (sockets of the
/// `.socket` units and of the fd store).
pub async fn run(
    config: Config,
    systemd: SystemdFds,
    passed_fd_names: Vec<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<ExitReason, StartupError> {
    let mut shutdown = Box::pin(shutdown);
    let homedir = prepare_homedir(&config.homedir).map_err(step("preparing the homedir"))?;
    let keyd = key_api::Client::from_uri(&config.endpoints.keyd)
        .map_err(|source| EdgedError::keyd("invalid keyd endpoint", source))
        .map_err(step("connecting to keyd"))?;
    let certd = cert_api::Client::from_uri(&config.endpoints.certd)
        .map_err(|source| EdgedError::certd("invalid certd endpoint", source))
        .map_err(step("connecting to certd"))?;
    let identity = HttpIdentityClient::from_uri(&config.endpoints.identityd)
        .map_err(|source| EdgedError::identity("invalid identityd endpoint", source))
        .map_err(step("connecting to identityd"))?;
    match config.runtime {
        config::RuntimeKind::Docker => {
            let docker = docker::DockerClient::from_uri(&config.moby.uri).ok_or_else(|| {
                StartupError::Step {
                    step: "connecting to Docker",
                    source: EdgedError::BadRequest(format!(
                        "invalid moby_runtime.uri {:?}",
                        config.moby.uri
                    )),
                }
            })?;
            let runtime = DockerRuntime::new(
                docker,
                config.allow_elevated_docker_permissions,
                config.moby.network.clone(),
            );
            let backends = Backends {
                runtime,
                identity,
                keyd,
                certd,
            };
            run_with(
                config,
                homedir,
                backends,
                systemd,
                &passed_fd_names,
                &mut shutdown,
            )
            .await
        }
        config::RuntimeKind::Process => {
            let runtime = ProcessRuntime::new(&config, &homedir)
                .map_err(step("preparing the process runtime"))?;
            let backends = Backends {
                runtime,
                identity,
                keyd,
                certd,
            };
            run_with(
                config,
                homedir,
                backends,
                systemd,
                &passed_fd_names,
                &mut shutdown,
            )
            .await
        }
    }
}

/// What edged talks to.
#[derive(Debug)]
pub struct Backends<R, I> {
    /// The module runtime.
    pub runtime: R,
    /// identityd.
    pub identity: I,
    /// keyd.
    pub keyd: key_api::Client,
    /// certd.
    pub certd: cert_api::Client,
}

/// [`run`] with the runtime and identity client chosen by the caller (tests use fakes).
pub async fn run_with<R: ModuleRuntime, I: IdentityClient>(
    config: Config,
    homedir: PathBuf,
    backends: Backends<R, I>,
    systemd: SystemdFds,
    passed_fd_names: &[String],
    shutdown: &mut (impl Future<Output = ()> + Unpin),
) -> Result<ExitReason, StartupError> {
    let Backends {
        runtime,
        identity,
        keyd,
        certd,
    } = backends;
    let always = config.auto_reprovisioning_mode == config::ReprovisioningMode::AlwaysOnStartup;
    let Some(device) = device_identity(&identity, always, shutdown).await else {
        return Ok(ExitReason::Signal);
    };
    log::info!(
        "device {} on hub {} (gateway {})",
        device.device_id,
        device.hub_name,
        device.gateway_host
    );
    runtime
        .prepare()
        .await
        .map_err(step("preparing the module network"))?;
    let edge_ca_key = certs::ensure_edge_ca(&config.edge_ca, &device.device_id, &keyd, &certd)
        .await
        .map_err(step("preparing the Edge CA"))?;

    let (exit_sender, mut exit_receiver) = tokio::sync::mpsc::unbounded_channel();
    let edged = Arc::new(Edged::new(
        config,
        runtime,
        identity,
        keyd,
        certd,
        homedir.clone(),
        device.clone(),
        exit_sender,
    ));
    edged.set_edge_ca_key(edge_ca_key);

    // Bind mounts pin socket inodes. Modules whose sockets systemd kept for us (fd store) keep
    // running on the very same sockets; every other module is stopped, as in the reference.
    let mut kept = Vec::new();
    if !systemd.is_empty() {
        let existing: Vec<String> = match edged.runtime.list().await {
            Ok(modules) => modules.into_iter().map(|module| module.name).collect(),
            Err(error) => {
                log::warn!("could not list modules: {error}");
                Vec::new()
            }
        };
        for module in fdstore::modules_in(passed_fd_names) {
            let name = fdstore::fd_name(&module);
            match listen(&ListenerUri::FdName(name.clone()), &systemd, None, 0o666) {
                Ok(listener) if existing.contains(&module) => {
                    edged.adopt_listener(&module, listener);
                    kept.push(module);
                }
                Ok(_) => fdstore::remove(&name),
                Err(error) => log::warn!("could not use the stored socket {name}: {error}"),
            }
        }
    }
    if edged.runtime.keeps_modules_across_restarts() {
        // Host processes reach their sockets by path: every running module is adopted as is.
        match edged.runtime.list().await {
            Ok(modules) => kept = modules.into_iter().map(|module| module.name).collect(),
            Err(error) => log::warn!("could not list modules to adopt them: {error}"),
        }
        log::info!("adopting {} existing module(s)", kept.len());
    }
    edged.stop_all(service::STOP_ALL_GRACE, &kept).await;

    let digest = device_digest(&device);
    let cache_dir = homedir.join("cache");
    let previous = std::fs::read_to_string(cache_dir.join("provisioning_state")).ok();
    if previous.as_deref().map(str::trim) != Some(digest.as_str()) {
        log::info!("the device identity changed (or is new); removing all modules");
        edged
            .remove_all()
            .await
            .map_err(step("removing modules of the previous identity"))?;
        config_common::files::write_atomic(&cache_dir, "provisioning_state", digest.as_bytes())
            .map_err(|source| EdgedError::io("could not store the provisioning state", source))
            .map_err(step("storing the provisioning state"))?;
    }

    // Listeners: management first, then workload (legacy, then one per module).
    let management_uri = ListenerUri::parse(&edged.config.listen.management).map_err(|source| {
        StartupError::Listen {
            which: "management",
            source,
        }
    })?;
    // `fd://<name>` takes the socket unit's fd; a `unix://` listener takes a passed fd only when
    // it is bound at that path (no name fallback: a custom path is bound here, never served on
    // the unit's socket elsewhere), and each fd goes to one listener.
    let management =
        listen(&management_uri, &systemd, None, 0o660).map_err(|source| StartupError::Listen {
            which: "management",
            source,
        })?;
    let workload_uri = ListenerUri::parse(&edged.config.listen.workload).map_err(|source| {
        StartupError::Listen {
            which: "workload",
            source,
        }
    })?;
    let workload =
        listen(&workload_uri, &systemd, None, 0o666).map_err(|source| StartupError::Listen {
            which: "workload",
            source,
        })?;
    // Sockets edged bound itself go to the fd store too, so the agent's mounts stay valid.
    for (name, listener) in [
        (config::MANAGEMENT_SOCKET_NAME, &management),
        (config::WORKLOAD_SOCKET_NAME, &workload),
    ] {
        if !passed_fd_names.iter().any(|passed| passed == name) {
            fdstore::store(name, std::os::fd::AsRawFd::as_raw_fd(listener));
        }
    }
    let management_options = http_common::ServerOptions {
        max_body_bytes: 4 * 1024 * 1024,
        max_connections_per_uid: edged.config.max_requests_management,
        ..http_common::ServerOptions::default()
    };
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(http_common::serve(
        management,
        Arc::new(routes::ManagementRouter::new(Arc::clone(&edged))),
        management_options,
        edged.shutdown_signal(),
    ));
    servers.spawn(http_common::serve(
        workload,
        Arc::new(routes::WorkloadRouter::new(Arc::clone(&edged))),
        edged.workload_options(),
        edged.shutdown_signal(),
    ));
    match edged.runtime.list().await {
        Ok(modules) => {
            for module in modules {
                if let Err(error) = edged.ensure_listener(&module.name) {
                    log::warn!("module {}: {error}", module.name);
                }
            }
        }
        Err(error) => log::warn!("could not list modules for their workload sockets: {error}"),
    }
    http_common::server::notify_ready();
    log::info!("edged is serving");

    let (stop_background, background_stopped) = tokio::sync::watch::channel(false);
    let background_stop = |mut receiver: tokio::sync::watch::Receiver<bool>| async move {
        let _ = receiver.wait_for(|stopped| *stopped).await;
    };
    let watchdog = tokio::spawn(watchdog::run(
        Arc::clone(&edged),
        background_stop(background_stopped.clone()),
    ));
    let removals = tokio::spawn(watchdog::watch_agent_removals(Arc::clone(&edged)));
    let image_gc = tokio::spawn(watchdog::image_gc(Arc::clone(&edged)));
    let renewal = tokio::spawn(watchdog::edge_ca_renewal(Arc::clone(&edged)));

    let reason = tokio::select! {
        () = &mut *shutdown => ExitReason::Signal,
        reason = exit_receiver.recv() => reason.unwrap_or(ExitReason::Signal),
    };
    log::info!("shutting down ({reason:?})");
    let _ = stop_background.send(true);
    removals.abort();
    image_gc.abort();
    renewal.abort();
    // A watchdog run in the middle of a slow pull is not waited for.
    let mut watchdog = watchdog;
    if tokio::time::timeout(Duration::from_secs(5), &mut watchdog)
        .await
        .is_err()
    {
        watchdog.abort();
    }
    edged.begin_shutdown();
    if edged.runtime.keeps_modules_across_restarts() && reason != ExitReason::Reprovision {
        // The next edged adopts them (their supervisors and cgroups outlive this process).
        log::info!("leaving the process modules running for the next edged to adopt");
    } else if fdstore::enabled() && reason != ExitReason::Reprovision {
        // systemd keeps the sockets across a restart (and drops them on `systemctl stop`, after
        // which the next start stops the modules): leave the modules running.
        log::info!("leaving modules running; their sockets are in systemd's fd store");
    } else {
        edged.stop_all(service::STOP_ALL_GRACE, &[]).await;
    }
    // serve() drains in-flight requests for at most 10 s.
    while servers.join_next().await.is_some() {}
    if reason == ExitReason::Reprovision {
        let cache = homedir.join("cache");
        if let Err(error) = std::fs::remove_dir_all(&cache) {
            log::warn!("could not delete {}: {error}", cache.display());
        }
        if let Err(error) = edged.identity.reprovision().await {
            log::error!("identityd could not reprovision: {error}");
        }
    }
    Ok(reason)
}
