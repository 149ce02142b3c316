//! The supervisor of one process module (`edged --process-shim <module folder>`): a small
//! process of its own, started by edged in its own session, that outlives edged so a restarted
//! edged adopts the module instead of restarting it.
//!
//! It starts the module's program in the module's cgroups as the module's uid (joining the
//! cgroups and dropping privileges between fork and exec), captures stdout and stderr into the
//! module's log, records every state change in `status.json`, and applies the restart policy.
//! When the main process ends, whatever else is left in the module's cgroup is killed (as Docker
//! ends a container with its first process). SIGTERM means "stop": the module's processes get
//! SIGTERM, no restart follows, and edged kills the cgroup when its grace period is over.
//!
//! It must not: talk to any daemon, hold a lock, or write anywhere but the module folder.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;

use super::logs::{LineSplitter, LogWriter, Record};
use super::state::{self, ModuleRecord, ModuleStatus, ProcessState};

/// The first argument that selects the supervisor mode of the edged binary.
pub const SHIM_ARGUMENT: &str = "--process-shim";

/// A run shorter than this counts as a crash loop for the restart delay.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// The longest restart delay.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);
/// How long the cgroup gets to empty after the main process ended.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(10);

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn now_rfc3339() -> String {
    super::logs::format_nanos(now_nanos())
}

/// Runs the supervisor for the module folder `dir`; the process exit code is 0 unless the
/// module's record cannot be read.
pub fn main(dir: &Path) -> std::process::ExitCode {
    let Some(record) = state::read_json::<ModuleRecord>(&dir.join(state::RECORD_FILE)) else {
        eprintln!(
            "edged process shim: no readable module record in {}",
            dir.display()
        );
        return std::process::ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("edged process shim: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(supervise(dir.to_owned(), record));
    std::process::ExitCode::SUCCESS
}

struct Supervisor {
    dir: PathBuf,
    record: ModuleRecord,
    status: ModuleStatus,
    log: Arc<Mutex<Option<LogWriter>>>,
}

impl Supervisor {
    fn save(&self) {
        if let Err(error) = state::write_json(&self.dir, state::STATUS_FILE, &self.status) {
            self.note(&format!("could not write the module status: {error}"));
        }
    }

    /// A line from the supervisor itself, in the module's log as stderr.
    fn note(&self, text: &str) {
        write_line(&self.log, 2, format!("[edged] {text}\n").into_bytes());
    }
}

fn write_line(log: &Arc<Mutex<Option<LogWriter>>>, stream: u8, payload: Vec<u8>) {
    let mut guard = log.lock().unwrap_or_else(|poison| poison.into_inner());
    if let Some(writer) = guard.as_mut() {
        let _ = writer.write(&Record {
            stream,
            time_nanos: now_nanos(),
            payload,
        });
    }
}

async fn pump(
    mut reader: impl tokio::io::AsyncRead + Unpin,
    stream: u8,
    log: Arc<Mutex<Option<LogWriter>>>,
) {
    let mut splitter = LineSplitter::default();
    let mut buffer = vec![0u8; 8192];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(count) => {
                for line in splitter.push(&buffer[..count]) {
                    write_line(&log, stream, line);
                }
            }
        }
    }
    if let Some(rest) = splitter.finish() {
        write_line(&log, stream, rest);
    }
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

/// Builds the module's command: cleared environment, the module's, its working folder, and a
/// pre-exec step that joins the cgroups, starts a session and drops to the module's uid.
fn command(record: &ModuleRecord) -> std::io::Result<tokio::process::Command> {
    let cgroup_files: Vec<CString> = record
        .cgroups
        .dirs
        .iter()
        .map(|dir| c_path(&dir.join("cgroup.procs")))
        .collect::<std::io::Result<_>>()?;
    let ids = (record.uid != 0).then_some((record.uid, record.gid));
    let working_dir = c_path(&record.working_dir)?;
    let mut command = tokio::process::Command::new(&record.program);
    command
        .args(&record.args)
        .env_clear()
        .envs(&record.env)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(false);
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // calls are allowed: it makes raw system calls (open, write, close, setsid, setgroups,
    // setgid, setuid, chdir) on data prepared before the fork, and neither allocates nor locks.
    unsafe {
        command.pre_exec(move || {
            for file in &cgroup_files {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written < 0 {
                    return Err(error);
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((uid, gid)) = ids {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // As the module's uid: a folder it may not enter is an error, not root's favour.
            if libc::chdir(working_dir.as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(command)
}

fn exit_code(status: std::process::ExitStatus) -> i64 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => i64::from(code),
        (None, Some(signal)) => 128 + i64::from(signal),
        (None, None) => -1,
    }
}

async fn supervise(dir: PathBuf, record: ModuleRecord) {
    let log = Arc::new(Mutex::new(LogWriter::open(&dir, record.log_max_bytes).ok()));
    let previous: ModuleStatus =
        state::read_json(&dir.join(state::STATUS_FILE)).unwrap_or_default();
    let shim_pid = i32::try_from(std::process::id()).unwrap_or(0);
    let mut supervisor = Supervisor {
        status: ModuleStatus {
            shim_pid,
            shim_started: crate::service::process_start_time(shim_pid).unwrap_or(0),
            state: ProcessState::Starting,
            restart_count: 0,
            ..previous
        },
        dir,
        record,
        log,
    };
    supervisor.save();
    let Ok(mut terminate) =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        supervisor.note("could not watch SIGTERM");
        return;
    };
    let mut stopping = false;
    let mut quick_failures: u32 = 0;
    loop {
        let started = Instant::now();
        let code = match command(&supervisor.record).and_then(|mut command| command.spawn()) {
            Err(error) => {
                let text = format!(
                    "could not start {}: {error}",
                    supervisor.record.program.display()
                );
                supervisor.note(&text);
                supervisor.status.error = Some(text);
                supervisor.status.pid = None;
                supervisor.status.started_at = None;
                // As a shell reports a program it cannot run.
                127
            }
            Ok(mut child) => {
                supervisor.status.error = None;
                supervisor.status.pid = child.id().and_then(|pid| i32::try_from(pid).ok());
                supervisor.status.started_at = Some(now_rfc3339());
                supervisor.status.state = ProcessState::Running;
                supervisor.save();
                let mut pumps = Vec::new();
                if let Some(stdout) = child.stdout.take() {
                    pumps.push(tokio::spawn(pump(stdout, 1, Arc::clone(&supervisor.log))));
                }
                if let Some(stderr) = child.stderr.take() {
                    pumps.push(tokio::spawn(pump(stderr, 2, Arc::clone(&supervisor.log))));
                }
                let status = loop {
                    tokio::select! {
                        status = child.wait() => break status,
                        _ = terminate.recv(), if !stopping => {
                            stopping = true;
                            supervisor.status.state = ProcessState::Stopping;
                            supervisor.save();
                            supervisor.record.cgroups.signal_all(libc::SIGTERM);
                        }
                    }
                };
                // The main process ended: nothing else of the module may stay behind.
                let cgroups = supervisor.record.cgroups.clone();
                let _ =
                    tokio::task::spawn_blocking(move || cgroups.kill_all(CLEANUP_TIMEOUT)).await;
                for pump in pumps {
                    let _ = pump.await;
                }
                match status {
                    Ok(status) => exit_code(status),
                    Err(error) => {
                        supervisor.note(&format!("could not wait for the process: {error}"));
                        -1
                    }
                }
            }
        };
        supervisor.status.exit_code = Some(code);
        supervisor.status.finished_at = Some(now_rfc3339());
        if started.elapsed() >= STABLE_RUN {
            quick_failures = 0;
        }
        let restart = !stopping
            && supervisor
                .record
                .restart
                .restarts(code, supervisor.status.restart_count);
        if !restart {
            supervisor.status.state = ProcessState::Exited;
            supervisor.save();
            return;
        }
        // Docker's back-off: 100 ms, doubling while the process keeps dying quickly.
        let delay = Duration::from_millis(100)
            .saturating_mul(1u32 << quick_failures.min(10))
            .min(MAX_RESTART_DELAY);
        quick_failures = quick_failures.saturating_add(1);
        supervisor.status.state = ProcessState::Restarting;
        supervisor.save();
        supervisor.note(&format!(
            "exited with {code}; restarting in {} ms (restart policy)",
            delay.as_millis()
        ));
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = terminate.recv() => {
                supervisor.status.state = ProcessState::Exited;
                supervisor.save();
                return;
            }
        }
        supervisor.status.restart_count = supervisor.status.restart_count.saturating_add(1);
    }
}
