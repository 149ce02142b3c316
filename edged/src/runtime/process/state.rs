//! The on-disk state of a process module, `<homedir>/process/<module>/`:
//!
//! - `module.json` (edged, on create): what to run, as whom, in which cgroups;
//! - `status.json` (the module's supervisor, on every change): supervisor pid and start time,
//!   process pid, start and exit times, exit code, restart count;
//! - `log`, `log.1`: the captured output (`logs.rs`); `shim.err`: the supervisor's own stderr
//!   (only what it cannot put into `log`);
//! - `data/` (owned by the module's uid, mode 0700): its home and default working folder;
//! - `root/` (archive images): the unpacked archive, owned by the module's uid.
//!
//! Both JSON files are written atomically (temp, fsync, rename) with mode 0600; the module folder
//! is root's, mode 0711, so a module reaches its `data/` but cannot read its own or another
//! module's state. These files are what lets a restarted edged adopt running modules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cgroup::ModuleCgroups;
use super::spec::{ImageKind, RestartPolicy};

/// `module.json`.
pub const RECORD_FILE: &str = "module.json";
/// `status.json`.
pub const STATUS_FILE: &str = "status.json";

/// `module.json`: everything the supervisor needs, fixed at create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    /// Random 64-hex-digit ID (the "container ID").
    pub id: String,
    /// Module name.
    pub name: String,
    /// The spec's `type`, echoed in `ModuleDetails`.
    pub module_type: String,
    /// The image path as requested.
    pub image: String,
    /// Executable or archive.
    pub image_kind: ImageKind,
    /// `sha256:<hex>` of the image file at create.
    pub image_hash: String,
    /// RFC 3339 creation time.
    pub created: String,
    /// The module's uid (0 only for an allowed `User = "root"`).
    pub uid: u32,
    /// The module's gid.
    pub gid: u32,
    /// Absolute program path.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// The complete environment.
    pub env: BTreeMap<String, String>,
    /// Working folder.
    pub working_dir: PathBuf,
    /// Memory limit (bytes).
    pub memory_bytes: Option<u64>,
    /// Process-count limit.
    pub pids_max: Option<u64>,
    /// Restart policy.
    pub restart: RestartPolicy,
    /// Labels (edged's included).
    pub labels: BTreeMap<String, String>,
    /// The cgroups.
    pub cgroups: ModuleCgroups,
    /// Log rotation size.
    pub log_max_bytes: u64,
}

/// The supervisor's view of the module process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    /// The supervisor is starting the process.
    #[default]
    Starting,
    /// The process runs.
    Running,
    /// A stop was asked for; the process has been sent SIGTERM.
    Stopping,
    /// The process ended and the restart policy will start it again after a delay.
    Restarting,
    /// The process ended for good.
    Exited,
}

/// `status.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    /// The supervisor's pid.
    pub shim_pid: i32,
    /// Its start time (clock ticks since boot), so a reused pid is not mistaken for it.
    pub shim_started: u64,
    /// State.
    pub state: ProcessState,
    /// The current (or last) process's pid.
    pub pid: Option<i32>,
    /// RFC 3339 start of the current (or last) process.
    pub started_at: Option<String>,
    /// RFC 3339 end of the last process.
    pub finished_at: Option<String>,
    /// Exit code of the last process (128 + signal when killed, as Docker reports it).
    pub exit_code: Option<i64>,
    /// Restarts by the restart policy so far.
    pub restart_count: u32,
    /// Why the process could not be started, if it could not.
    pub error: Option<String>,
}

impl ModuleStatus {
    /// Whether the supervisor that wrote this is still alive: same pid, same start time, and not
    /// a zombie (an adopted supervisor that ended waits for init, not edged, to reap it).
    pub fn supervisor_alive(&self) -> bool {
        self.shim_pid > 0
            && std::fs::read_to_string(format!("/proc/{}/stat", self.shim_pid))
                .ok()
                .and_then(|stat| living_start_time(&stat))
                == Some(self.shim_started)
    }
}

/// The start time (field 22) of a `/proc/<pid>/stat` line whose process has not ended (state,
/// field 3, is not `Z` or `X`); counted from the last `)`, since the command may hold spaces.
pub fn living_start_time(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let state = rest.split_ascii_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    crate::service::parse_start_time(stat)
}

/// Reads a JSON state file; `None` when absent or unreadable.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes a JSON state file atomically (0600).
pub fn write_json<T: Serialize>(dir: &Path, file: &str, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    config_common::files::write_atomic(dir, file, &bytes)
}

/// A module's state folder.
pub fn module_dir(root: &Path, name: &str) -> PathBuf {
    root.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zombie_has_no_living_start_time() {
        let fields = "1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(
            living_start_time(&format!("4242 (a) b) S {fields}")),
            Some(987_654)
        );
        assert_eq!(living_start_time(&format!("4242 (sh) Z {fields}")), None);
        assert_eq!(living_start_time(&format!("4242 (sh) X {fields}")), None);
        assert_eq!(living_start_time("4242 (short) S 1 2"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(living_start_time(&own).is_some());
    }
}
