//! [`ModuleRuntime`] with host processes instead of containers (spec section 10), chosen by
//! `agent.type = "process"`.
//!
//! Each module is a supervised process tree: a supervisor (`shim`, the edged binary in its
//! `--process-shim` mode) per running module, which starts the module's program in the module's
//! own cgroups (`cgroup`) as the module's own uid, captures its output (`logs`), records its state
//! (`state`) and applies its restart policy. What a module spec may say is in `spec`.
//!
//! Nothing here holds a lock across I/O except `create`, which serializes uid allocation.
//! The supervisors and cgroups outlive edged: a restarted edged reads `<homedir>/process/*` and
//! carries on with the running modules (their workload sockets are re-bound at the same path,
//! which a process reaches by path, so nothing is restarted).

pub mod cgroup;
pub mod logs;
pub mod shim;
pub mod spec;
pub mod state;

use std::collections::BTreeSet;
use std::io::{Read as _, Seek as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};

use crate::config;
use crate::error::EdgedError;
use crate::model::{ExitStatus, ModuleDetails, ModuleSpec, ModuleStatus, RuntimeStatus, Settings};
use crate::runtime::{LogOptions, ModuleRuntime};

use self::spec::ImageKind;
use self::state::{ModuleRecord, ProcessState};

/// Docker's default stop grace, used when the API does not give one.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a start waits for the supervisor to report.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a supervisor gets to finish after its module's processes were killed.
const SHIM_EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a followed log is polled for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The host-process implementation of [`ModuleRuntime`].
#[derive(Debug)]
pub struct ProcessRuntime {
    /// The canonical homedir.
    homedir: PathBuf,
    /// `<homedir>/process`.
    root: PathBuf,
    settings: config::ProcessRuntime,
    allow_root: bool,
    layout: std::sync::Mutex<cgroup::Layout>,
    shim_program: PathBuf,
    create_lock: tokio::sync::Mutex<()>,
}

fn io_error(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> EdgedError {
    move |source| EdgedError::io(step, source)
}

fn now_rfc3339() -> String {
    crate::time::format_unix(crate::time::now_unix(), "Z")
}

fn random_id() -> String {
    let mut bytes = [0u8; 32];
    if openssl::rand::rand_bytes(&mut bytes).is_err() {
        // Not a secret: uniqueness is all that matters.
        let seed = format!("{:?}{}", Instant::now(), std::process::id());
        bytes = openssl::sha::sha256(seed.as_bytes());
    }
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn file_hash(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = openssl::sha::Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let count = file.read(&mut buffer)?;
        if count == 0 {
            break;
        }
        hasher.update(&buffer[..count]);
    }
    let digest: String = hasher
        .finish()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    Ok(format!("sha256:{digest}"))
}

/// Checks that an image exists (an executable file, or a readable archive file).
fn check_image(image: &str, kind: ImageKind) -> Result<(), EdgedError> {
    let not_found = || EdgedError::ImageNotFound(image.to_owned());
    let metadata = std::fs::metadata(image).map_err(|_| not_found())?;
    if !metadata.is_file() {
        return Err(not_found());
    }
    if kind == ImageKind::Executable && metadata.permissions().mode() & 0o111 == 0 {
        return Err(EdgedError::BadRequest(format!(
            "invalid process config: settings.image {image:?} is not executable"
        )));
    }
    Ok(())
}

fn chown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

fn make_dir(path: &Path, mode: u32) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error),
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// `runtimeStatus` and its description from the supervisor's record.
fn runtime_status(status: Option<&state::ModuleStatus>) -> (&'static str, String) {
    let Some(status) = status else {
        return ("stopped", "Created".to_owned());
    };
    let exited = |code: Option<i64>, at: &Option<String>| {
        let text = format!(
            "Exited ({}) at {}",
            code.map_or("?".to_owned(), |code| code.to_string()),
            at.as_deref().unwrap_or("?")
        );
        (if code == Some(0) { "stopped" } else { "failed" }, text)
    };
    let alive = status.supervisor_alive();
    match status.state {
        ProcessState::Exited => {
            let (state, text) = exited(status.exit_code, &status.finished_at);
            match &status.error {
                Some(error) => (state, format!("{text}: {error}")),
                None => (state, text),
            }
        }
        _ if !alive => (
            "dead",
            "the module's supervisor ended without recording an exit".to_owned(),
        ),
        ProcessState::Starting => ("running", "Starting".to_owned()),
        ProcessState::Running | ProcessState::Stopping => (
            "running",
            format!(
                "Up since {} (pid {})",
                status.started_at.as_deref().unwrap_or("?"),
                status.pid.unwrap_or(0)
            ),
        ),
        ProcessState::Restarting => (
            "stopped",
            format!(
                "Restarting ({}) after restart {}",
                status.exit_code.unwrap_or(0),
                status.restart_count
            ),
        ),
    }
}

/// `ModuleDetails` of a process module (spec section 3.1, with the process runtime's values).
pub fn details(record: &ModuleRecord, status: Option<&state::ModuleStatus>) -> ModuleDetails {
    let (state, description) = runtime_status(status);
    let exit_status = status.and_then(|status| match (status.exit_code, &status.finished_at) {
        (Some(code), Some(time)) => Some(ExitStatus {
            exit_time: time.clone(),
            status_code: code.to_string(),
        }),
        _ => None,
    });
    ModuleDetails {
        id: record.id.clone(),
        name: record.name.clone(),
        module_type: record.module_type.clone(),
        config: json!({
            "settings": {
                "image": record.image,
                "imageHash": record.image_hash,
                "createOptions": { "Labels": record.labels },
            },
            "env": [],
        }),
        status: ModuleStatus {
            start_time: status.and_then(|status| status.started_at.clone()),
            exit_status,
            runtime_status: RuntimeStatus {
                status: state.to_owned(),
                description: Some(description),
            },
        },
    }
}

impl ProcessRuntime {
    /// A runtime keeping its state under `<homedir>/process`; finds this machine's cgroup layout.
    pub fn new(config: &config::Config, homedir: &Path) -> Result<Self, EdgedError> {
        // SAFETY: geteuid(2) reads a process attribute; it cannot fail and touches no memory.
        if unsafe { libc::geteuid() } != 0 {
            return Err(EdgedError::io(
                "the process runtime needs edged to run as root (it runs each module as its own \
                 uid and writes the modules' cgroups)",
                std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            ));
        }
        let layout = cgroup::detect().map_err(io_error("could not find the cgroup layout"))?;
        let shim_program = std::env::current_exe().map_err(io_error(
            "could not find the edged binary for module supervisors",
        ))?;
        log::info!(
            "process runtime: modules tracked in {:?} cgroup {}{}, memory limits {}, pids limits {}",
            layout.tracking.version,
            layout.tracking.mount.display(),
            layout.tracking.own,
            layout
                .memory
                .as_ref()
                .map_or("unavailable".to_owned(), |hierarchy| format!("{:?}", hierarchy.version)),
            layout
                .pids
                .as_ref()
                .map_or("unavailable".to_owned(), |hierarchy| format!("{:?}", hierarchy.version)),
        );
        Ok(ProcessRuntime {
            homedir: homedir.to_owned(),
            root: homedir.join("process"),
            settings: config.process.clone(),
            allow_root: config.allow_elevated_docker_permissions,
            layout: std::sync::Mutex::new(layout),
            shim_program,
            create_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn module_dir(&self, name: &str) -> Result<PathBuf, EdgedError> {
        let name = crate::service::existing_module_name(name)?;
        Ok(state::module_dir(&self.root, name))
    }

    fn record(&self, name: &str) -> Result<ModuleRecord, EdgedError> {
        let dir = self.module_dir(name)?;
        state::read_json(&dir.join(state::RECORD_FILE))
            .ok_or_else(|| EdgedError::ModuleNotFound(name.to_owned()))
    }

    fn status(&self, name: &str) -> Option<state::ModuleStatus> {
        let dir = self.module_dir(name).ok()?;
        state::read_json(&dir.join(state::STATUS_FILE))
    }

    fn used_uids(&self) -> BTreeSet<u32> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return BTreeSet::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                state::read_json::<ModuleRecord>(&entry.path().join(state::RECORD_FILE))
            })
            .map(|record| record.uid)
            .collect()
    }

    fn allocate_uid(&self) -> Result<u32, EdgedError> {
        let used = self.used_uids();
        let start = self.settings.uid_start;
        (start..start.saturating_add(self.settings.uid_count))
            .find(|uid| !used.contains(uid))
            .ok_or_else(|| {
                EdgedError::Conflict(format!(
                    "no free module uid left in [process_runtime] ({} uids from {start})",
                    self.settings.uid_count
                ))
            })
    }

    /// Unpacks an archive image into `target` as the module's uid (so an archive cannot write
    /// outside what that uid may write), reading the archive through edged's own descriptor.
    async fn unpack(
        &self,
        image: &str,
        target: &Path,
        uid: u32,
        gid: u32,
    ) -> Result<(), EdgedError> {
        let archive =
            std::fs::File::open(image).map_err(|_| EdgedError::ImageNotFound(image.to_owned()))?;
        let mut command = tokio::process::Command::new("tar");
        command.arg(if image.ends_with(".tar") {
            "-xf"
        } else {
            "-xzf"
        });
        command
            .arg("-")
            .arg("-C")
            .arg(target)
            .arg("--no-same-owner")
            .stdin(archive)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        if uid != 0 {
            command.uid(uid).gid(gid);
        }
        let output = command
            .output()
            .await
            .map_err(io_error("could not run tar to unpack the image"))?;
        if !output.status.success() {
            return Err(EdgedError::BadRequest(format!(
                "invalid process config: could not unpack {image:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    async fn create_locked(&self, spec: &ModuleSpec) -> Result<String, EdgedError> {
        let launch = spec::launch_spec(spec, self.allow_root)?;
        let dir = self.module_dir(&spec.name)?;
        if dir.join(state::RECORD_FILE).exists() {
            return Err(EdgedError::Conflict(format!(
                "the module name {:?} is already in use",
                spec.name
            )));
        }
        check_image(&launch.image, launch.image_kind)?;
        let (uid, gid) = if launch.root {
            (0, 0)
        } else {
            let uid = self.allocate_uid()?;
            (uid, uid)
        };
        let cgroups = {
            let layout = self
                .layout
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if launch.memory_bytes.is_some() && layout.memory.is_none() {
                return Err(EdgedError::BadRequest(
                    "invalid process config: createOptions.HostConfig.Memory: no memory controller \
                     is available to edged on this device"
                        .to_owned(),
                ));
            }
            if launch.pids_max.is_some() && layout.pids.is_none() {
                return Err(EdgedError::BadRequest(
                    "invalid process config: createOptions.HostConfig.PidsLimit: no pids controller \
                     is available to edged on this device"
                        .to_owned(),
                ));
            }
            layout.module_cgroups(&self.settings.cgroup_name, &spec.name)
        };
        // A folder without module.json is the rest of a failed create: start over.
        let _ = std::fs::remove_dir_all(&dir);
        let step = format!("could not create the folder of module {}", spec.name);
        make_dir(&self.root, 0o711).map_err(io_error(step.clone()))?;
        make_dir(&dir, 0o711).map_err(io_error(step.clone()))?;
        let data = dir.join("data");
        make_dir(&data, 0o700).map_err(io_error(step.clone()))?;
        chown(&data, uid, gid).map_err(io_error(step.clone()))?;

        let image_path = PathBuf::from(&launch.image);
        let image_hash = tokio::task::spawn_blocking(move || file_hash(&image_path))
            .await
            .map_err(|error| EdgedError::Internal(format!("hashing task failed: {error}")))?
            .map_err(|_| EdgedError::ImageNotFound(launch.image.clone()))?;

        let (program, default_dir) = match launch.image_kind {
            ImageKind::Executable => (PathBuf::from(&launch.program), data.clone()),
            ImageKind::Archive => {
                let unpacked = dir.join("root");
                make_dir(&unpacked, 0o755).map_err(io_error(step.clone()))?;
                chown(&unpacked, uid, gid).map_err(io_error(step.clone()))?;
                if let Err(error) = self.unpack(&launch.image, &unpacked, uid, gid).await {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(error);
                }
                let program = if launch.program.starts_with('/') {
                    PathBuf::from(&launch.program)
                } else {
                    unpacked.join(&launch.program)
                };
                if !program.is_file() {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(EdgedError::BadRequest(format!(
                        "invalid process config: the program {:?} is not in the archive",
                        launch.program
                    )));
                }
                (program, unpacked)
            }
        };
        let mut env = launch.env.clone();
        env.entry("PATH".to_owned())
            .or_insert_with(|| "/usr/local/bin:/usr/bin:/bin".to_owned());
        env.entry("HOME".to_owned())
            .or_insert_with(|| data.display().to_string());
        // No mount namespace: the module reaches its own socket directly (spec section 10).
        env.insert(
            "IOTEDGE_WORKLOADURI".to_owned(),
            format!(
                "unix://{}",
                self.homedir
                    .join("mnt")
                    .join(format!("{}.sock", spec.name))
                    .display()
            ),
        );
        let record = ModuleRecord {
            id: random_id(),
            name: spec.name.clone(),
            module_type: spec.module_type.clone(),
            image: launch.image.clone(),
            image_kind: launch.image_kind,
            image_hash,
            created: now_rfc3339(),
            uid,
            gid,
            program,
            args: launch.args.clone(),
            env,
            working_dir: launch
                .working_dir
                .as_ref()
                .map_or(default_dir, PathBuf::from),
            memory_bytes: launch.memory_bytes,
            pids_max: launch.pids_max,
            restart: launch.restart,
            labels: launch.labels.clone(),
            cgroups,
            log_max_bytes: self.settings.log_max_bytes,
        };
        state::write_json(&dir, state::RECORD_FILE, &record).map_err(io_error(step))?;
        log::info!(
            "created process module {} (uid {uid}, program {})",
            record.name,
            record.program.display()
        );
        Ok(record.id)
    }

    async fn wait_supervisor_gone(&self, name: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let alive = self
                .status(name)
                .is_some_and(|status| status.supervisor_alive());
            if !alive {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn kill_cgroup(&self, record: &ModuleRecord) {
        let cgroups = record.cgroups.clone();
        let name = record.name.clone();
        let emptied =
            tokio::task::spawn_blocking(move || cgroups.kill_all(Duration::from_secs(10)))
                .await
                .unwrap_or(false);
        if !emptied {
            log::warn!("module {name}: processes are left in its cgroup after SIGKILL");
        }
    }

    /// Ends the supervisor and everything in the cgroup; `grace` = how long SIGTERM may take.
    async fn end(&self, record: &ModuleRecord, grace: Duration) {
        let name = &record.name;
        if let Some(status) = self
            .status(name)
            .filter(state::ModuleStatus::supervisor_alive)
        {
            // SAFETY: kill(2) on the supervisor's pid, checked against its start time just now.
            unsafe { libc::kill(status.shim_pid, libc::SIGTERM) };
            if !self.wait_supervisor_gone(name, grace).await {
                log::info!(
                    "module {name} did not stop within {} s; killing it",
                    grace.as_secs()
                );
                self.kill_cgroup(record).await;
                if !self.wait_supervisor_gone(name, SHIM_EXIT_TIMEOUT).await {
                    log::warn!("the supervisor of module {name} does not end; killing it");
                    // SAFETY: as above; the pid was re-checked by supervisor_alive.
                    unsafe { libc::kill(status.shim_pid, libc::SIGKILL) };
                    let _ = self.wait_supervisor_gone(name, SHIM_EXIT_TIMEOUT).await;
                }
            }
        }
        self.kill_cgroup(record).await;
        // A supervisor that died without recording the end: record it now.
        if let (Ok(dir), Some(mut status)) = (self.module_dir(name), self.status(name)) {
            if status.state != ProcessState::Exited && !status.supervisor_alive() {
                status.state = ProcessState::Exited;
                status.finished_at = Some(now_rfc3339());
                if let Err(error) = state::write_json(&dir, state::STATUS_FILE, &status) {
                    log::warn!("module {name}: could not record its end: {error}");
                }
            }
        }
    }

    /// At startup: a module whose supervisor vanished without recording an end (the device
    /// restarted, or someone killed it) has its leftovers killed and its end recorded (exit code
    /// unknown: `failed`); with `always` or `unless-stopped` it is started again, as Docker
    /// restarts such containers when it starts. Running modules are left alone (adopted).
    async fn recover(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let (Ok(record), Some(mut status)) = (self.record(&name), self.status(&name)) else {
                continue;
            };
            if status.state == ProcessState::Exited || status.supervisor_alive() {
                continue;
            }
            log::warn!("module {name}: its supervisor ended without recording an exit");
            self.kill_cgroup(&record).await;
            status.state = ProcessState::Exited;
            status.exit_code = None;
            status.finished_at = Some(now_rfc3339());
            status.error =
                Some("the module's supervisor ended without recording an exit".to_owned());
            if let Err(error) = state::write_json(&entry.path(), state::STATUS_FILE, &status) {
                log::warn!("module {name}: could not record its end: {error}");
                continue;
            }
            if matches!(
                record.restart.name,
                spec::RestartName::Always | spec::RestartName::UnlessStopped
            ) {
                log::info!("module {name}: starting it again (restart policy)");
                if let Err(error) = self.start(&name).await {
                    log::warn!("module {name} did not start again: {error}");
                }
            }
        }
    }

    /// Starts a supervisor for the module folder `dir`; returns its pid and a receiver that
    /// fires when it ends while this edged runs.
    fn spawn_supervisor(
        &self,
        dir: &Path,
    ) -> Result<(u32, tokio::sync::oneshot::Receiver<()>), EdgedError> {
        let errors = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join("shim.err"))
            .map_err(io_error("could not open the supervisor's error file"))?;
        let mut command = tokio::process::Command::new(&self.shim_program);
        command
            .arg(shim::SHIM_ARGUMENT)
            .arg(dir)
            .env_clear()
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(errors)
            .kill_on_drop(false);
        // SAFETY: runs between fork and exec; setsid(2) is async-signal-safe and touches no
        // memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(io_error("could not start the module's supervisor"))?;
        let pid = child.id().unwrap_or(0);
        let (ended, ended_receiver) = tokio::sync::oneshot::channel();
        // Reap it when it ends while this edged runs (after a restart, init does).
        tokio::spawn(async move {
            let _ = child.wait().await;
            let _ = ended.send(());
        });
        Ok((pid, ended_receiver))
    }
}

impl ModuleRuntime for ProcessRuntime {
    fn validate(&self, spec: &ModuleSpec) -> Result<(), EdgedError> {
        if spec.module_type != "process" && spec.module_type != "docker" {
            return Err(EdgedError::BadRequest(format!(
                "module type {:?} is not supported (expected \"process\"; \"docker\" is accepted \
                 for edgeAgent's deployments)",
                spec.module_type
            )));
        }
        crate::service::existing_module_name(&spec.name)
            .map_err(|_| EdgedError::BadRequest(format!("invalid module name {:?}", spec.name)))?;
        spec::launch_spec(spec, self.allow_root).map(drop)
    }

    async fn pull(&self, settings: &Settings) -> Result<Option<String>, EdgedError> {
        // Images are files on the device: "pulling" checks that the file is there.
        let image = settings.image.trim();
        check_image(image, spec::image_kind(image)?)?;
        Ok(None)
    }

    async fn create(&self, spec: &ModuleSpec) -> Result<String, EdgedError> {
        let _allocation = self.create_lock.lock().await;
        self.create_locked(spec).await
    }

    async fn get(&self, name: &str) -> Result<ModuleDetails, EdgedError> {
        let record = self.record(name)?;
        Ok(details(&record, self.status(name).as_ref()))
    }

    async fn list(&self) -> Result<Vec<ModuleDetails>, EdgedError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(EdgedError::io("could not list the process modules", error)),
        };
        let mut modules = Vec::new();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Ok(record) = self.record(&name) {
                modules.push(details(&record, self.status(&name).as_ref()));
            }
        }
        modules.sort_by(|left, right| left.name.cmp(&right.name));
        Ok(modules)
    }

    async fn start(&self, name: &str) -> Result<(), EdgedError> {
        let record = self.record(name)?;
        let dir = self.module_dir(name)?;
        if self
            .status(name)
            .is_some_and(|status| status.supervisor_alive())
        {
            return Ok(());
        }
        // Leftovers of a supervisor that died: nothing old may share the cgroup.
        self.kill_cgroup(&record).await;
        record
            .cgroups
            .create(record.memory_bytes, record.pids_max)
            .map_err(|message| {
                EdgedError::io(
                    format!("could not prepare the cgroups of module {name}"),
                    std::io::Error::other(message),
                )
            })?;
        let (pid, mut ended) = self.spawn_supervisor(&dir)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let supervisor_ended = ended.try_recv().is_ok();
            if let Some(status) = self.status(name) {
                if u32::try_from(status.shim_pid).ok() == Some(pid)
                    && status.state != ProcessState::Starting
                {
                    if let Some(error) = status.error {
                        return Err(EdgedError::BadRequest(format!(
                            "module {name} could not start: {error}"
                        )));
                    }
                    log::info!("started process module {name} (pid {:?})", status.pid);
                    return Ok(());
                }
            }
            if supervisor_ended {
                let errors = std::fs::read_to_string(dir.join("shim.err")).unwrap_or_default();
                return Err(EdgedError::Internal(format!(
                    "the supervisor of module {name} ended before starting it: {}",
                    errors.lines().last().unwrap_or("no reason given")
                )));
            }
            if Instant::now() >= deadline {
                return Err(EdgedError::Internal(format!(
                    "the supervisor of module {name} did not report within {} s",
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&self, name: &str, grace: Option<Duration>) -> Result<(), EdgedError> {
        let record = self.record(name)?;
        self.end(&record, grace.unwrap_or(DEFAULT_STOP_GRACE)).await;
        Ok(())
    }

    async fn restart(&self, name: &str) -> Result<(), EdgedError> {
        self.stop(name, None).await?;
        self.start(name).await
    }

    async fn remove(&self, name: &str) -> Result<String, EdgedError> {
        let record = self.record(name)?;
        let dir = self.module_dir(name)?;
        // Forceful, as Docker's forced removal: no grace.
        self.kill_cgroup(&record).await;
        self.end(&record, Duration::ZERO).await;
        let cgroups = record.cgroups.clone();
        let _ = tokio::task::spawn_blocking(move || cgroups.remove()).await;
        std::fs::remove_dir_all(&dir).map_err(io_error(format!(
            "could not delete the folder of module {name}"
        )))?;
        log::info!("removed process module {name}");
        // No image ID: process images are the user's files, never collected.
        Ok(String::new())
    }

    async fn logs(
        &self,
        name: &str,
        options: &LogOptions,
    ) -> Result<http_common::Body, EdgedError> {
        let dir = self.module_dir(name)?;
        self.record(name)?;
        let (records, offset, inode) = logs::read_all(&dir);
        let first = logs::select(&records, options);
        let until_passed = options
            .until
            .is_some_and(|until| until <= crate::time::now_unix());
        if !options.follow || until_passed {
            return Ok(http_common::full_body(first));
        }
        let (mut sender, body) = http_body_util::channel::Channel::<
            Bytes,
            Box<dyn std::error::Error + Send + Sync>,
        >::new(8);
        let status_file = dir.join(state::STATUS_FILE);
        let options = options.clone();
        tokio::spawn(async move {
            if sender.send_data(first).await.is_err() {
                return;
            }
            let mut follower = Follower { dir, offset, inode };
            loop {
                let running =
                    state::read_json::<state::ModuleStatus>(&status_file).is_some_and(|status| {
                        status.supervisor_alive() && status.state != ProcessState::Exited
                    });
                let fresh: Vec<logs::Record> = follower
                    .poll()
                    .into_iter()
                    .filter(|record| logs::in_window(record, &options))
                    .collect();
                if !fresh.is_empty() {
                    let mut bytes = Vec::new();
                    for record in &fresh {
                        bytes.extend_from_slice(&logs::frame(record, options.timestamps));
                    }
                    if sender.send_data(Bytes::from(bytes)).await.is_err() {
                        return;
                    }
                }
                let until_passed = options
                    .until
                    .is_some_and(|until| until <= crate::time::now_unix());
                if (!running && fresh.is_empty()) || until_passed {
                    return;
                }
                tokio::time::sleep(FOLLOW_POLL).await;
            }
        });
        Ok(body.map_err(|error| error).boxed())
    }

    async fn contains_process(&self, name: &str, pid: i32) -> Result<bool, EdgedError> {
        if pid <= 0 {
            return Ok(false);
        }
        let record = match self.record(name) {
            Ok(record) => record,
            Err(EdgedError::ModuleNotFound(_)) => return Ok(false),
            Err(error) => return Err(error),
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            return Ok(false);
        };
        Ok(record.cgroups.contains(&text))
    }

    async fn stats(&self, name: &str) -> Result<Value, EdgedError> {
        let record = self.record(name)?;
        let cgroups = &record.cgroups;
        let cpu_usage_nanos = std::fs::read_to_string(cgroups.tracking_dir.join("cpu.stat"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|line| line.strip_prefix("usage_usec "))
                    .and_then(|value| value.trim().parse::<u64>().ok())
            })
            .map(|micros| micros.saturating_mul(1000));
        Ok(json!({
            "id": record.id,
            "name": format!("/{}", record.name),
            "read": now_rfc3339(),
            "pids_stats": { "current": cgroups.pids().len() },
            "memory_stats": {
                "usage": cgroups.memory_usage(),
                "limit": cgroups.memory_limit(),
            },
            "cpu_stats": { "cpu_usage": { "total_usage": cpu_usage_nanos } },
        }))
    }

    async fn version(&self) -> Result<String, EdgedError> {
        Ok(format!(
            "edged process runtime {}",
            env!("CARGO_PKG_VERSION")
        ))
    }

    async fn prepare(&self) -> Result<(), EdgedError> {
        make_dir(&self.root, 0o711).map_err(io_error("could not create <homedir>/process"))?;
        let warnings = {
            let mut layout = self
                .layout
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            layout.prepare(&self.settings.cgroup_name)
        }
        .map_err(io_error("could not create the modules' parent cgroup"))?;
        for warning in warnings {
            log::warn!("process runtime: {warning}");
        }
        self.recover().await;
        Ok(())
    }

    async fn image_id(&self, _image: &str) -> Result<Option<String>, EdgedError> {
        // Image files are the user's: never in the image ledger, never garbage-collected.
        Ok(None)
    }

    async fn remove_image(&self, _id: &str) -> Result<(), EdgedError> {
        Ok(())
    }

    async fn inspect(&self, name: &str) -> Result<Value, EdgedError> {
        let record = self.record(name)?;
        let mut value = serde_json::to_value(&record)
            .map_err(|error| EdgedError::Internal(format!("could not encode a record: {error}")))?;
        // The environment may hold secrets a deployment passed in: not in support bundles.
        value["env"] = json!(record.env.keys().collect::<Vec<_>>());
        value["status"] = serde_json::to_value(self.status(name)).unwrap_or(Value::Null);
        Ok(value)
    }

    async fn network_info(&self) -> Result<Option<(String, Value)>, EdgedError> {
        // Process modules share the host's network.
        Ok(None)
    }

    async fn wait_removed(&self, name: &str) -> Result<(), EdgedError> {
        let mut seen = false;
        loop {
            let exists = self.record(name).is_ok();
            if seen && !exists {
                return Ok(());
            }
            seen |= exists;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn keeps_modules_across_restarts(&self) -> bool {
        true
    }
}

/// Reads a module's log as it grows, across rotations.
struct Follower {
    dir: PathBuf,
    offset: u64,
    inode: Option<u64>,
}

impl Follower {
    fn read_from(path: &Path, offset: u64) -> (Vec<logs::Record>, u64) {
        let Ok(mut file) = std::fs::File::open(path) else {
            return (Vec::new(), offset);
        };
        if file.seek(std::io::SeekFrom::Start(offset)).is_err() {
            return (Vec::new(), offset);
        }
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_err() {
            return (Vec::new(), offset);
        }
        let (records, consumed) = logs::decode(&bytes);
        (records, offset + consumed as u64)
    }

    fn poll(&mut self) -> Vec<logs::Record> {
        let current = self.dir.join(logs::LOG_FILE);
        let inode = logs::inode_of(&current);
        let mut records = Vec::new();
        if inode != self.inode && self.inode.is_some() {
            // Rotated: finish the old file (now log.1), then read the new one from its start.
            let old = self.dir.join(logs::OLD_LOG_FILE);
            if logs::inode_of(&old) == self.inode {
                records.extend(Self::read_from(&old, self.offset).0);
            }
            self.offset = 0;
        }
        self.inode = inode;
        let (fresh, offset) = Self::read_from(&current, self.offset);
        self.offset = offset;
        records.extend(fresh);
        records
    }
}
