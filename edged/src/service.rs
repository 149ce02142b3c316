//! edged's business rules, below the HTTP handlers and above the module runtime and the peer
//! daemons: caller authorization, per-module ordering, workload listeners, the image ledger,
//! identities, signing, encryption and certificates.
//!
//! Concurrency: there is no global lock. Mutating operations on one module are ordered by that
//! module's own async mutex (pulls included, so a pull blocks only its module); reads (list, get,
//! logs) and workload calls take no lock at all. Small std mutexes guard maps and are never held
//! across an await.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_common::listener::{listen, ListenerUri, SystemdFds};
use http_common::Caller;
use key_api::{EncryptMechanism, KeyHandle, SignMechanism};

use crate::certs::{self, ModuleCertKind};
use crate::config::{Config, PullPolicy};
use crate::error::EdgedError;
use crate::gc::Ledger;
use crate::identity::{DeviceIdentity, IdentityClient, ModuleIdentity};
use crate::model::{
    CertificateResponse, DecryptRequest, DecryptResponse, EncryptRequest, EncryptResponse,
    Identity, ModuleDetails, ModuleSpec, ModuleStatus, RuntimeStatus, SignRequest, SignResponse,
};
use crate::runtime::{LogOptions, ModuleRuntime};

/// keyd's symmetric key for workload encrypt/decrypt.
pub const MASTER_ENCRYPTION_KEY: &str = "iotedge_master_encryption_id";

/// How long a positive caller check is reused per (pid, process start time, container).
pub const AUTHORIZATION_TTL: Duration = Duration::from_secs(5);

/// How long an agent update waits before replacing the agent (so the 201 reaches it).
pub const AGENT_UPDATE_DELAY: Duration = Duration::from_millis(500);

/// Docker's default grace is used for API stops; startup and shutdown use this one.
pub const STOP_ALL_GRACE: Duration = Duration::from_secs(30);

/// Why the daemon should end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// SIGTERM / SIGINT.
    Signal,
    /// A reprovision was requested: exit 154 afterwards.
    Reprovision,
    /// The watchdog failed `max_retries` times in a row.
    WatchdogFailed,
}

/// Whom a positive caller check was given to: a process (pid and start time) and a container.
#[derive(Debug, PartialEq, Eq, Hash)]
struct CallerKey {
    pid: i32,
    started: u64,
    container: String,
}

/// The start time of process `pid` (clock ticks since boot, field 22 of `/proc/<pid>/stat`);
/// `None` when the process is gone or the entry cannot be read.
pub(crate) fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a `/proc/<pid>/stat` line. The command (field 2) is in parentheses and may itself
/// hold spaces and parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // After the command come field 3 (state) onwards: field 22 is the 20th of them.
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

/// A module named in a path must be a name a container can have (Docker's rule: a letter or
/// digit, then at least one letter, digit, `_`, `.` or `-`); any other name cannot be a module,
/// so it is a 404 before the runtime sees it. Docker answers `.` and `..` (even
/// percent-encoded) with a redirect to another route, which would otherwise surface as a 500.
pub(crate) fn existing_module_name(name: &str) -> std::result::Result<&str, EdgedError> {
    let mut bytes = name.bytes();
    let valid = bytes
        .next()
        .is_some_and(|first| first.is_ascii_alphanumeric())
        && name.len() >= 2
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || b"_.-".contains(&byte));
    if valid {
        Ok(name)
    } else {
        Err(EdgedError::ModuleNotFound(name.to_owned()))
    }
}

struct ListenerHandle {
    stop: tokio::sync::oneshot::Sender<()>,
}

/// The running daemon's state, shared by every request.
pub struct Edged<R, I> {
    /// The validated configuration.
    pub config: Config,
    /// The module runtime.
    pub runtime: R,
    /// identityd.
    pub identity: I,
    /// keyd.
    pub keyd: key_api::Client,
    /// certd.
    pub certd: cert_api::Client,
    /// The canonical homedir (bind-mount sources must be canonical).
    pub homedir: PathBuf,
    /// The image-use ledger.
    pub ledger: Ledger,
    /// Wakes the watchdog early (agent container destroyed).
    pub watchdog_wake: tokio::sync::Notify,
    device: RwLock<DeviceIdentity>,
    edge_ca_key: RwLock<Option<KeyHandle>>,
    encryption_key: Mutex<Option<KeyHandle>>,
    module_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    authorized: Mutex<HashMap<CallerKey, Instant>>,
    listeners: Mutex<HashMap<String, ListenerHandle>>,
    exit: tokio::sync::mpsc::UnboundedSender<ExitReason>,
    shutdown: tokio::sync::watch::Sender<bool>,
    started: Instant,
}

impl<R, I> std::fmt::Debug for Edged<R, I> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Edged")
            .field("homedir", &self.homedir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn decode_b64(name: &str, value: &str) -> Result<Vec<u8>, EdgedError> {
    base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|error| EdgedError::invalid(name, format!("not valid base64: {error}")))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The pull policy of a spec (400 for an unknown value).
pub fn pull_policy(spec: &ModuleSpec) -> Result<PullPolicy, EdgedError> {
    match &spec.image_pull_policy {
        None => Ok(PullPolicy::OnCreate),
        Some(text) => PullPolicy::parse(text).ok_or_else(|| {
            EdgedError::BadRequest(format!(
                "invalid imagePullPolicy {text:?} (expected \"on-create\" or \"never\")"
            ))
        }),
    }
}

/// The `ModuleDetails` echoed by create and update: the request's spec and a status.
pub fn echo_details(spec: &ModuleSpec, id: String, status: &str) -> ModuleDetails {
    ModuleDetails {
        id,
        name: spec.name.clone(),
        module_type: spec.module_type.clone(),
        config: serde_json::to_value(&spec.config).unwrap_or(serde_json::Value::Null),
        status: ModuleStatus {
            start_time: None,
            exit_status: None,
            runtime_status: RuntimeStatus {
                status: status.to_owned(),
                description: None,
            },
        },
    }
}

fn is_not_found(error: &EdgedError) -> bool {
    match error {
        EdgedError::ModuleNotFound(_) => true,
        EdgedError::Docker(error) => error.is_not_found(),
        _ => false,
    }
}

fn identity_of(module: ModuleIdentity, managed_by: &str) -> Result<Identity, EdgedError> {
    if module.local {
        return Err(EdgedError::LocalIdentity(module.module_id));
    }
    Ok(Identity {
        module_id: module.module_id,
        managed_by: managed_by.to_owned(),
        generation_id: module.gen_id,
        auth_type: "sas".to_owned(),
    })
}

impl<R: ModuleRuntime, I: IdentityClient> Edged<R, I> {
    /// Builds the state. `exit` receives requests to end the daemon.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        runtime: R,
        identity: I,
        keyd: key_api::Client,
        certd: cert_api::Client,
        homedir: PathBuf,
        device: DeviceIdentity,
        exit: tokio::sync::mpsc::UnboundedSender<ExitReason>,
    ) -> Self {
        let ledger = Ledger::open(&homedir);
        Edged {
            config,
            runtime,
            identity,
            keyd,
            certd,
            homedir,
            ledger,
            watchdog_wake: tokio::sync::Notify::new(),
            device: RwLock::new(device),
            edge_ca_key: RwLock::new(None),
            encryption_key: Mutex::new(None),
            module_locks: Mutex::new(HashMap::new()),
            authorized: Mutex::new(HashMap::new()),
            listeners: Mutex::new(HashMap::new()),
            exit,
            shutdown: tokio::sync::watch::channel(false).0,
            started: Instant::now(),
        }
    }

    /// The device identity fetched at startup.
    pub fn device(&self) -> DeviceIdentity {
        self.device
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Sets keyd's handle to the Edge CA key.
    pub fn set_edge_ca_key(&self, handle: KeyHandle) {
        *self
            .edge_ca_key
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Some(handle);
    }

    fn edge_ca_key(&self) -> Result<KeyHandle, EdgedError> {
        self.edge_ca_key
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
            .ok_or_else(|| EdgedError::Internal("the Edge CA is not ready".to_owned()))
    }

    /// When edged started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Asks the daemon to end.
    pub fn request_exit(&self, reason: ExitReason) {
        let _ = self.exit.send(reason);
    }

    /// The per-module ordering lock.
    pub fn module_lock(&self, name: &str) -> Arc<tokio::sync::Mutex<()>> {
        Arc::clone(
            lock(&self.module_locks)
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(()))),
        )
    }

    // ---- caller authorization ----

    /// Allows the call only from a process of `container` (spec section 5).
    pub async fn authorize(&self, caller: &Caller, container: &str) -> Result<(), EdgedError> {
        if caller.pid <= 0 {
            log::info!("forbidden: the caller has no pid (container {container})");
            return Err(EdgedError::Forbidden);
        }
        // A pid alone is not a process: once it exits its pid can be reused by a process of
        // another container. The start time tells the two apart, so a cached answer is only
        // ever reused for the very process it was given to.
        let Some(started) = process_start_time(caller.pid) else {
            log::info!(
                "forbidden: pid {} has no readable /proc entry (container {container})",
                caller.pid
            );
            return Err(EdgedError::Forbidden);
        };
        let key = CallerKey {
            pid: caller.pid,
            started,
            container: container.to_owned(),
        };
        if let Some(at) = lock(&self.authorized).get(&key) {
            if at.elapsed() < AUTHORIZATION_TTL {
                return Ok(());
            }
        }
        match self.runtime.contains_process(container, caller.pid).await {
            Ok(true) => {
                // Cache only when the pid still names the process that was checked.
                if process_start_time(caller.pid) == Some(started) {
                    let mut authorized = lock(&self.authorized);
                    if authorized.len() > 4096 {
                        authorized.retain(|_, at| at.elapsed() < AUTHORIZATION_TTL);
                    }
                    authorized.insert(key, Instant::now());
                }
                Ok(())
            }
            Ok(false) => {
                log::info!(
                    "forbidden: pid {} is not a process of container {container}",
                    caller.pid
                );
                Err(EdgedError::Forbidden)
            }
            Err(error) => {
                log::info!(
                    "forbidden: could not check pid {} against container {container}: {error}",
                    caller.pid
                );
                Err(EdgedError::Forbidden)
            }
        }
    }

    /// Allows the call only from the agent container.
    pub async fn authorize_agent(&self, caller: &Caller) -> Result<(), EdgedError> {
        let agent = self.config.agent.name.clone();
        self.authorize(caller, &agent).await
    }

    /// Allows the call only from module `name` (`$` trimmed).
    pub async fn authorize_module(&self, caller: &Caller, name: &str) -> Result<(), EdgedError> {
        self.authorize(caller, name.trim_start_matches('$')).await
    }

    // ---- workload listeners ----

    /// `<homedir>/mnt`.
    pub fn mnt_dir(&self) -> PathBuf {
        self.homedir.join("mnt")
    }

    /// `<homedir>/mnt/<name>.sock`.
    pub fn module_socket(&self, name: &str) -> PathBuf {
        self.mnt_dir().join(format!("{name}.sock"))
    }

    /// Server options of a workload socket.
    pub fn workload_options(&self) -> http_common::ServerOptions {
        http_common::ServerOptions {
            max_body_bytes: 4 * 1024 * 1024,
            max_connections_per_uid: self.config.max_requests_workload,
            ..http_common::ServerOptions::default()
        }
    }

    /// A future that resolves when the daemon shuts down.
    pub fn shutdown_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut receiver = self.shutdown.subscribe();
        async move {
            let _ = receiver.wait_for(|down| *down).await;
        }
    }

    /// Stops every listener.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.send(true);
        lock(&self.listeners).clear();
    }

    /// Makes sure module `name` has a workload socket listener. A live one is kept: a running
    /// container's bind mount pins the socket's inode, so re-creating it would cut the module off.
    pub fn ensure_listener(self: &Arc<Self>, name: &str) -> Result<(), EdgedError> {
        if self.has_listener(name) && self.module_socket(name).exists() {
            return Ok(());
        }
        self.start_listener(name)
    }

    /// (Re)creates module `name`'s workload socket listener.
    pub fn start_listener(self: &Arc<Self>, name: &str) -> Result<(), EdgedError> {
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(EdgedError::BadRequest(format!(
                "invalid module name {name:?}"
            )));
        }
        let path = self.module_socket(name);
        if let Some(old) = lock(&self.listeners).remove(name) {
            let _ = old.stop.send(());
        }
        // Unlink first: the old listener (if any) keeps its inode until it has stopped.
        let _ = std::fs::remove_file(&path);
        let listener = listen(
            &ListenerUri::Unix(path.clone()),
            &SystemdFds::default(),
            None,
            0o666,
        )
        .map_err(|error| {
            EdgedError::io(
                format!("could not listen on the workload socket of {name}"),
                std::io::Error::other(error),
            )
        })?;
        crate::fdstore::store(
            &crate::fdstore::fd_name(name),
            std::os::fd::AsRawFd::as_raw_fd(&listener),
        );
        self.spawn_listener(name, listener);
        log::info!("listening for module {name} on {}", path.display());
        Ok(())
    }

    /// Serves module `name`'s workload API on a socket inherited from systemd's fd store.
    pub fn adopt_listener(self: &Arc<Self>, name: &str, listener: tokio::net::UnixListener) {
        self.spawn_listener(name, listener);
        log::info!("kept the workload socket of module {name} across the restart");
    }

    fn spawn_listener(self: &Arc<Self>, name: &str, listener: tokio::net::UnixListener) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let global = self.shutdown_signal();
        let router = Arc::new(crate::routes::WorkloadRouter::new(Arc::clone(self)));
        let options = self.workload_options();
        tokio::spawn(async move {
            http_common::serve(listener, router, options, async move {
                tokio::select! {
                    _ = stopped => {}
                    () = global => {}
                }
            })
            .await;
        });
        if let Some(old) = lock(&self.listeners).insert(name.to_owned(), ListenerHandle { stop }) {
            let _ = old.stop.send(());
        }
    }

    /// Stops module `name`'s workload listener (the socket file stays).
    pub fn stop_listener(&self, name: &str) {
        if let Some(handle) = lock(&self.listeners).remove(name) {
            let _ = handle.stop.send(());
            crate::fdstore::remove(&crate::fdstore::fd_name(name));
        }
    }

    fn has_listener(&self, name: &str) -> bool {
        lock(&self.listeners).contains_key(name)
    }

    // ---- management: modules ----

    /// `GET /modules`.
    pub async fn list_modules(&self) -> Result<Vec<ModuleDetails>, EdgedError> {
        self.runtime.list().await
    }

    /// `GET /modules/{name}`.
    pub async fn get_module(&self, name: &str) -> Result<ModuleDetails, EdgedError> {
        self.runtime.get(name).await
    }

    async fn pull_and_record(&self, spec: &ModuleSpec) -> Result<(), EdgedError> {
        let started = Instant::now();
        let image_id = self.runtime.pull(&spec.config.settings).await?;
        log::info!(
            "pulled image {} for module {} in {} ms",
            spec.config.settings.image,
            spec.name,
            started.elapsed().as_millis()
        );
        if let Some(id) = image_id {
            self.ledger.record(&id);
        }
        Ok(())
    }

    async fn record_image(&self, image: &str) {
        if let Ok(Some(id)) = self.runtime.image_id(image).await {
            self.ledger.record(&id);
        }
    }

    /// `POST /modules`.
    pub async fn create_module(
        &self,
        caller: &Caller,
        spec: ModuleSpec,
    ) -> Result<ModuleDetails, EdgedError> {
        self.authorize_agent(caller).await?;
        let policy = pull_policy(&spec)?;
        self.runtime.validate(&spec)?;
        let module_lock = self.module_lock(&spec.name);
        let _ordered = module_lock.lock().await;
        if policy == PullPolicy::OnCreate {
            self.pull_and_record(&spec).await?;
        }
        let id = self.runtime.create(&spec).await?;
        self.record_image(&spec.config.settings.image).await;
        Ok(echo_details(&spec, id, "stopped"))
    }

    /// `PUT /modules/{name}?start=`.
    pub async fn update_module(
        self: &Arc<Self>,
        caller: &Caller,
        path_name: &str,
        spec: ModuleSpec,
        start: bool,
    ) -> Result<ModuleDetails, EdgedError> {
        self.authorize_agent(caller).await?;
        let policy = pull_policy(&spec)?;
        self.runtime.validate(&spec)?;
        let status = if start { "running" } else { "stopped" };
        if path_name == self.config.agent.name {
            // Re-creating the agent kills the caller's connection: answer first.
            let edged = Arc::clone(self);
            let path_name = path_name.to_owned();
            let background_spec = spec.clone();
            tokio::spawn(async move {
                // Let the answer reach the agent before its container goes away.
                tokio::time::sleep(AGENT_UPDATE_DELAY).await;
                if let Err(error) = edged
                    .replace_module(&path_name, &background_spec, policy, start)
                    .await
                {
                    log::error!(
                        "updating the agent module {path_name} failed: {}",
                        http_common::error::error_chain(&error)
                    );
                }
            });
            return Ok(echo_details(&spec, String::new(), status));
        }
        let id = self.replace_module(path_name, &spec, policy, start).await?;
        Ok(echo_details(&spec, id, status))
    }

    /// Stop → remove → pull → create → start (spec section 3.2).
    pub async fn replace_module(
        self: &Arc<Self>,
        path_name: &str,
        spec: &ModuleSpec,
        policy: PullPolicy,
        start: bool,
    ) -> Result<String, EdgedError> {
        let mut names = vec![path_name.to_owned(), spec.name.clone()];
        names.sort();
        names.dedup();
        let locks: Vec<_> = names.iter().map(|name| self.module_lock(name)).collect();
        let mut guards = Vec::new();
        for module_lock in &locks {
            guards.push(module_lock.lock().await);
        }
        match self.runtime.stop(path_name, None).await {
            Ok(()) => {}
            Err(error) if is_not_found(&error) => {}
            Err(error) => return Err(error),
        }
        match self.runtime.remove(path_name).await {
            Ok(image) => self.ledger.record(&image),
            Err(error) if is_not_found(&error) => {}
            Err(error) => return Err(error),
        }
        if path_name != spec.name {
            self.stop_listener(path_name);
            let _ = std::fs::remove_file(self.module_socket(path_name));
        }
        if policy == PullPolicy::OnCreate {
            self.pull_and_record(spec).await?;
        }
        let id = self.runtime.create(spec).await?;
        self.record_image(&spec.config.settings.image).await;
        if start {
            if let Err(error) = self.ensure_listener(&spec.name) {
                log::error!(
                    "module {}: {}",
                    spec.name,
                    http_common::error::error_chain(&error)
                );
            }
            if let Err(error) = self.runtime.start(&spec.name).await {
                log::error!(
                    "module {} was updated but did not start: {}",
                    spec.name,
                    http_common::error::error_chain(&error)
                );
            }
        }
        drop(guards);
        Ok(id)
    }

    /// `POST /modules/{name}/prepareupdate`.
    pub async fn prepare_update(
        &self,
        caller: &Caller,
        path_name: &str,
        spec: ModuleSpec,
    ) -> Result<(), EdgedError> {
        self.authorize_agent(caller).await?;
        let policy = pull_policy(&spec)?;
        self.runtime.validate(&spec)?;
        if spec.name != path_name {
            return Err(EdgedError::BadRequest(format!(
                "the module name in the body ({:?}) does not match the path ({path_name:?})",
                spec.name
            )));
        }
        if policy == PullPolicy::OnCreate {
            self.pull_and_record(&spec).await?;
        }
        Ok(())
    }

    /// `DELETE /modules/{name}`.
    pub async fn delete_module(&self, caller: &Caller, name: &str) -> Result<(), EdgedError> {
        // The caller first, so others get 403 whatever the name.
        self.authorize_agent(caller).await?;
        let name = existing_module_name(name)?;
        let module_lock = self.module_lock(name);
        let _ordered = module_lock.lock().await;
        let image = self.runtime.remove(name).await.map_err(|error| {
            if is_not_found(&error) {
                EdgedError::ModuleNotFound(name.to_owned())
            } else {
                error
            }
        })?;
        self.ledger.record(&image);
        self.stop_listener(name);
        let _ = std::fs::remove_file(self.module_socket(name));
        Ok(())
    }

    /// `POST /modules/{name}/start`.
    pub async fn start_module(self: &Arc<Self>, name: &str) -> Result<(), EdgedError> {
        let module_lock = self.module_lock(name);
        let _ordered = module_lock.lock().await;
        // Make sure the module exists before binding a socket for it.
        self.runtime.get(name).await?;
        self.ensure_listener(name)?;
        self.runtime.start(name).await
    }

    /// `POST /modules/{name}/stop`.
    pub async fn stop_module(&self, name: &str) -> Result<(), EdgedError> {
        let module_lock = self.module_lock(name);
        let _ordered = module_lock.lock().await;
        self.runtime.get(name).await?;
        self.stop_listener(name);
        self.runtime.stop(name, None).await
    }

    /// `POST /modules/{name}/restart`.
    pub async fn restart_module(self: &Arc<Self>, name: &str) -> Result<(), EdgedError> {
        let module_lock = self.module_lock(name);
        let _ordered = module_lock.lock().await;
        self.runtime.get(name).await?;
        self.ensure_listener(name)?;
        self.runtime.restart(name).await
    }

    /// `GET /modules/{name}/logs`.
    pub async fn module_logs(
        &self,
        name: &str,
        options: &LogOptions,
    ) -> Result<http_common::Body, EdgedError> {
        self.runtime.get(name).await?;
        self.runtime.logs(name, options).await
    }

    /// Stops every module but those in `keep`, in parallel with `grace` each (startup and
    /// shutdown).
    pub async fn stop_all(&self, grace: Duration, keep: &[String]) {
        let modules = match self.runtime.list().await {
            Ok(modules) => modules,
            Err(error) => {
                log::warn!("could not list modules to stop them: {error}");
                return;
            }
        };
        let stops = modules
            .iter()
            .filter(|module| module.status.runtime_status.status == "running")
            .filter(|module| !keep.contains(&module.name))
            .map(|module| async move {
                if let Err(error) = self.runtime.stop(&module.name, Some(grace)).await {
                    log::warn!("could not stop module {}: {error}", module.name);
                }
            });
        join_all(stops).await;
    }

    /// Removes every module (device identity changed).
    pub async fn remove_all(&self) -> Result<(), EdgedError> {
        let modules = self.runtime.list().await?;
        let removals = modules.iter().map(|module| async move {
            match self.runtime.remove(&module.name).await {
                Ok(image) => self.ledger.record(&image),
                Err(error) => log::warn!("could not remove module {}: {error}", module.name),
            }
        });
        join_all(removals).await;
        Ok(())
    }

    // ---- management: identities ----

    /// `GET /identities`.
    pub async fn list_identities(&self) -> Result<Vec<Identity>, EdgedError> {
        let modules =
            self.identity.list_modules().await.map_err(|source| {
                EdgedError::identity("failed to list module identities", source)
            })?;
        Ok(modules
            .into_iter()
            .filter(|module| !module.local)
            .filter_map(|module| identity_of(module, "iotedge").ok())
            .collect())
    }

    /// `POST /identities`.
    pub async fn create_identity(
        &self,
        caller: &Caller,
        module_id: &str,
        managed_by: Option<String>,
    ) -> Result<Identity, EdgedError> {
        self.authorize_agent(caller).await?;
        if module_id.is_empty() {
            return Err(EdgedError::invalid("moduleId", "must not be empty"));
        }
        let module = self
            .identity
            .create_module(module_id)
            .await
            .map_err(|source| {
                EdgedError::identity(
                    format!("failed to create module identity for {module_id}"),
                    source,
                )
            })?;
        identity_of(module, managed_by.as_deref().unwrap_or("iotedge"))
    }

    /// `PUT /identities/{name}`.
    pub async fn update_identity(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Identity, EdgedError> {
        self.authorize_agent(caller).await?;
        let module = self.identity.update_module(name).await.map_err(|source| {
            EdgedError::identity(
                format!("failed to update module identity for {name}"),
                source,
            )
        })?;
        identity_of(module, "iotedge")
    }

    /// `DELETE /identities/{name}`.
    pub async fn delete_identity(&self, caller: &Caller, name: &str) -> Result<(), EdgedError> {
        self.authorize_agent(caller).await?;
        self.identity.delete_module(name).await.map_err(|source| {
            EdgedError::identity(
                format!("failed to delete module identity for {name}"),
                source,
            )
        })
    }

    /// `POST /device/reprovision`: answered at once, done by the main loop.
    pub async fn reprovision(&self, caller: &Caller) -> Result<(), EdgedError> {
        self.authorize_agent(caller).await?;
        log::info!("reprovisioning requested by the agent");
        self.request_exit(ExitReason::Reprovision);
        Ok(())
    }

    // ---- workload ----

    /// `POST /modules/{name}/genid/{genid}/sign`.
    pub async fn sign(
        &self,
        caller: &Caller,
        name: &str,
        request: SignRequest,
    ) -> Result<SignResponse, EdgedError> {
        self.authorize_module(caller, name).await?;
        let data = decode_b64("data", &request.data)?;
        let step = format!("failed to get module identity for {name}");
        let module = self
            .identity
            .get_module(name)
            .await
            .map_err(|source| EdgedError::identity(step.clone(), source))?;
        if module.local {
            return Err(EdgedError::LocalIdentity(name.to_owned()));
        }
        let handle = module
            .key_handle
            .ok_or_else(|| EdgedError::Internal(format!("{step}: the identity has no SAS key")))?;
        let digest = self
            .keyd
            .sign(&handle, SignMechanism::HmacSha256 { message: &data })
            .await
            .map_err(|source| {
                EdgedError::keyd(format!("failed to sign for module {name}"), source)
            })?;
        Ok(SignResponse {
            digest: b64(&digest),
        })
    }

    async fn encryption_key(&self) -> Result<KeyHandle, EdgedError> {
        if let Some(handle) = lock(&self.encryption_key).clone() {
            return Ok(handle);
        }
        let handle = self
            .keyd
            .create_key_if_not_exists(MASTER_ENCRYPTION_KEY, "encrypt")
            .await
            .map_err(|source| {
                EdgedError::keyd("failed to load the master encryption key", source)
            })?;
        *lock(&self.encryption_key) = Some(handle.clone());
        Ok(handle)
    }

    /// `POST /modules/{name}/genid/{genid}/encrypt`.
    pub async fn encrypt(
        &self,
        caller: &Caller,
        name: &str,
        gen_id: &str,
        request: EncryptRequest,
    ) -> Result<EncryptResponse, EdgedError> {
        self.authorize_module(caller, name).await?;
        let plaintext = decode_b64("plaintext", &request.plaintext)?;
        let iv = decode_b64("initializationVector", &request.initialization_vector)?;
        let aad = format!("{name}{gen_id}");
        let handle = self.encryption_key().await?;
        let ciphertext = self
            .keyd
            .encrypt(
                &handle,
                EncryptMechanism::Aead {
                    iv: &iv,
                    aad: aad.as_bytes(),
                },
                &plaintext,
            )
            .await
            .map_err(|source| {
                EdgedError::keyd(format!("failed to encrypt for module {name}"), source)
            })?;
        Ok(EncryptResponse {
            ciphertext: b64(&ciphertext),
        })
    }

    /// `POST /modules/{name}/genid/{genid}/decrypt`.
    pub async fn decrypt(
        &self,
        caller: &Caller,
        name: &str,
        gen_id: &str,
        request: DecryptRequest,
    ) -> Result<DecryptResponse, EdgedError> {
        self.authorize_module(caller, name).await?;
        let ciphertext = decode_b64("ciphertext", &request.ciphertext)?;
        let iv = decode_b64("initializationVector", &request.initialization_vector)?;
        let aad = format!("{name}{gen_id}");
        let handle = self.encryption_key().await?;
        let plaintext = self
            .keyd
            .decrypt(&handle, &iv, aad.as_bytes(), &ciphertext)
            .await
            .map_err(|source| {
                let step = format!("failed to decrypt for module {name}");
                match source.status() {
                    // keyd refuses ciphertext that does not authenticate: the caller's input.
                    Some(status) if status.is_client_error() => {
                        EdgedError::invalid("ciphertext", format!("{step}: {source}"))
                    }
                    _ => EdgedError::keyd(step, source),
                }
            })?;
        Ok(DecryptResponse {
            plaintext: b64(&plaintext),
        })
    }

    /// `POST /modules/{name}/certificate/identity`.
    pub async fn identity_certificate(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<CertificateResponse, EdgedError> {
        self.authorize_module(caller, name).await?;
        let device = self.device();
        certs::issue_module_cert(
            &self.certd,
            &self.config.edge_ca.cert,
            &self.edge_ca_key()?,
            name,
            ModuleCertKind::Identity {
                hub_name: device.hub_name,
                device_id: device.device_id,
            },
        )
        .await
    }

    /// `POST /modules/{name}/genid/{genid}/certificate/server`.
    pub async fn server_certificate(
        &self,
        caller: &Caller,
        name: &str,
        gen_id: &str,
        common_name: String,
    ) -> Result<CertificateResponse, EdgedError> {
        self.authorize_module(caller, name).await?;
        if common_name.trim().is_empty() {
            return Err(EdgedError::invalid("commonName", "must not be empty"));
        }
        certs::issue_module_cert(
            &self.certd,
            &self.config.edge_ca.cert,
            &self.edge_ca_key()?,
            name,
            ModuleCertKind::Server {
                common_name,
                gen_id: gen_id.to_owned(),
            },
        )
        .await
    }

    /// `GET /trust-bundle`.
    pub async fn trust_bundle(&self) -> Result<String, EdgedError> {
        match &self.config.trust_bundle_cert {
            Some(id) => self.certd.get_cert(id).await.map_err(|source| {
                if source.is_not_found() {
                    EdgedError::CertificateNotFound(id.clone())
                } else {
                    EdgedError::certd("failed to read the trust bundle", source)
                }
            }),
            None => {
                let mut bundles = vec![self
                    .certd
                    .get_cert(&self.config.edge_ca.cert)
                    .await
                    .map_err(|source| {
                        EdgedError::certd("failed to read the Edge CA chain", source)
                    })?];
                if let Some(trusted) = &self.config.trusted_ca_certs {
                    match self.certd.get_cert(trusted).await {
                        Ok(pem) => bundles.push(pem),
                        Err(source) if source.is_not_found() => {
                            log::warn!("trusted_ca_certs {trusted:?} does not exist in certd");
                        }
                        Err(source) => {
                            return Err(EdgedError::certd(
                                "failed to read trusted_ca_certs",
                                source,
                            ))
                        }
                    }
                }
                Ok(certs::merge_bundles(&bundles))
            }
        }
    }

    /// `GET /manifest-trust-bundle` (empty when absent).
    pub async fn manifest_trust_bundle(&self) -> Result<String, EdgedError> {
        match self
            .certd
            .get_cert(&self.config.manifest_trust_bundle_cert)
            .await
        {
            Ok(pem) => Ok(pem),
            Err(source) if source.is_not_found() => Ok(String::new()),
            Err(source) => Err(EdgedError::certd(
                "failed to read the manifest trust bundle",
                source,
            )),
        }
    }
}

/// Runs futures concurrently and waits for all (no extra crates).
pub async fn join_all<F: std::future::Future<Output = ()>>(futures: impl IntoIterator<Item = F>) {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(move |context| {
        pinned.retain_mut(|future| future.as_mut().poll(context).is_pending());
        if pinned.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_counted_from_the_last_parenthesis() {
        let stat = "4242 (a) b (c) d) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 10 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("4242 (short) S 1 2"), None);
        assert_eq!(parse_start_time("no parenthesis"), None);
    }

    #[test]
    fn this_process_has_a_start_time_and_a_missing_pid_has_none() {
        let own = i32::try_from(std::process::id()).unwrap();
        assert!(process_start_time(own).is_some());
        assert_eq!(process_start_time(i32::MAX), None);
    }
}
