//! The cgroups of process modules, in the layout this machine has (found at run time from
//! `/proc/self/mountinfo` and `/proc/self/cgroup`, never assumed):
//!
//! - **pure cgroup v2** (`/sys/fs/cgroup` is cgroup2, as on current devices): one cgroup per module
//!   in the unified tree tracks its processes and carries `memory.max` and `pids.max`;
//! - **hybrid** (cgroup2 at `/sys/fs/cgroup/unified` beside v1 controllers): the unified tree tracks
//!   the processes (it has `cgroup.kill`), the v1 `memory` and `pids` hierarchies carry the limits;
//! - **v1 only**: the v1 `pids` hierarchy tracks the processes.
//!
//! Every module cgroup is `<edged's own cgroup in that hierarchy>/<cgroup_name>/<module>`: edged
//! manages a subtree of its own cgroup (own-cgroup mode). The systemd transient-unit mode is not
//! implemented (docs/edged.md says why). Membership is read from `/proc/<pid>/cgroup`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// cgroup v1 or v2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Version {
    /// A v1 controller hierarchy.
    V1,
    /// The unified hierarchy.
    V2,
}

/// One mounted hierarchy and edged's place in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    /// v1 or v2.
    pub version: Version,
    /// Where it is mounted.
    pub mount: PathBuf,
    /// edged's own cgroup in it (`/` or `/a/b`).
    pub own: String,
    /// For v1: the controller this hierarchy is used for (`pids`, `memory`); empty for v2.
    pub controller: String,
}

impl Hierarchy {
    /// The folder of the cgroup at `relative` (a path starting with `/`).
    fn dir(&self, relative: &str) -> PathBuf {
        self.mount.join(relative.trim_start_matches('/'))
    }
}

/// The hierarchies the process runtime uses on this machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Tracks which processes belong to a module (and kills them).
    pub tracking: Hierarchy,
    /// Carries memory limits, when a memory controller is available.
    pub memory: Option<Hierarchy>,
    /// Carries process-count limits, when a pids controller is available.
    pub pids: Option<Hierarchy>,
}

/// A module's cgroup folders, stored with the module (they outlive edged).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleCgroups {
    /// The tracking cgroup's folder.
    pub tracking_dir: PathBuf,
    /// Its path as `/proc/<pid>/cgroup` shows it.
    pub tracking_path: String,
    /// v2 (`0::` lines) or v1 (the controller's line).
    pub tracking_version: Option<Version>,
    /// For v1 tracking: the controller whose line counts.
    pub tracking_controller: String,
    /// Every folder a module process joins (tracking first).
    pub dirs: Vec<PathBuf>,
    /// The memory cgroup and its version.
    pub memory: Option<(PathBuf, Version)>,
    /// The pids cgroup.
    pub pids: Option<PathBuf>,
}

/// A mount of a cgroup file system: (mount point, fstype, super options).
fn cgroup_mounts(mountinfo: &str) -> Vec<(PathBuf, String, String)> {
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = before.split(' ').nth(4) else {
            continue;
        };
        let mut after = after.split(' ');
        let fstype = after.next().unwrap_or("");
        let _source = after.next();
        let options = after.next().unwrap_or("");
        if fstype == "cgroup" || fstype == "cgroup2" {
            // mountinfo escapes spaces and the like as octal; cgroup mount points have none.
            mounts.push((
                PathBuf::from(mount_point),
                fstype.to_owned(),
                options.to_owned(),
            ));
        }
    }
    mounts
}

/// edged's cgroup for the v2 line (`None` key) or the v1 line listing `controller`.
fn own_path(self_cgroup: &str, controller: Option<&str>) -> Option<String> {
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        let matches = match controller {
            None => id == "0" && controllers.is_empty(),
            Some(wanted) => controllers.split(',').any(|name| name == wanted),
        };
        if matches {
            return Some(path.to_owned());
        }
    }
    None
}

/// Finds the layout from the texts of `/proc/self/mountinfo` and `/proc/self/cgroup`, and the
/// controllers the unified root offers (`cgroup.controllers`).
pub fn layout_from(mountinfo: &str, self_cgroup: &str, v2_controllers: &str) -> Option<Layout> {
    let mounts = cgroup_mounts(mountinfo);
    let unified = mounts
        .iter()
        .find(|(_, fstype, _)| fstype == "cgroup2")
        .and_then(|(mount, _, _)| {
            own_path(self_cgroup, None).map(|own| Hierarchy {
                version: Version::V2,
                mount: mount.clone(),
                own,
                controller: String::new(),
            })
        });
    let v1 = |controller: &str| {
        mounts
            .iter()
            .find(|(_, fstype, options)| {
                fstype == "cgroup" && options.split(',').any(|option| option == controller)
            })
            .and_then(|(mount, _, _)| {
                own_path(self_cgroup, Some(controller)).map(|own| Hierarchy {
                    version: Version::V1,
                    mount: mount.clone(),
                    own,
                    controller: controller.to_owned(),
                })
            })
    };
    let v2_has = |controller: &str| {
        v2_controllers
            .split_whitespace()
            .any(|name| name == controller)
    };
    let limit = |controller: &str| match &unified {
        Some(unified) if v2_has(controller) => Some(unified.clone()),
        _ => v1(controller),
    };
    let memory = limit("memory");
    let pids = limit("pids");
    let tracking = unified.clone().or_else(|| pids.clone())?;
    Some(Layout {
        tracking,
        memory,
        pids,
    })
}

/// The layout of this machine.
pub fn detect() -> std::io::Result<Layout> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let self_cgroup = std::fs::read_to_string("/proc/self/cgroup")?;
    let v2_controllers = cgroup_mounts(&mountinfo)
        .iter()
        .find(|(_, fstype, _)| fstype == "cgroup2")
        .and_then(|(mount, _, _)| std::fs::read_to_string(mount.join("cgroup.controllers")).ok())
        .unwrap_or_default();
    layout_from(&mountinfo, &self_cgroup, &v2_controllers).ok_or_else(|| {
        std::io::Error::other(
            "no usable cgroup hierarchy (neither cgroup2 nor a v1 pids hierarchy is mounted)",
        )
    })
}

fn join_relative(own: &str, parts: &[&str]) -> String {
    let mut path = own.trim_end_matches('/').to_owned();
    for part in parts {
        path.push('/');
        path.push_str(part);
    }
    path
}

fn write_control(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value).map_err(|error| {
        std::io::Error::new(error.kind(), format!("{}/{file}: {error}", dir.display()))
    })
}

impl Layout {
    /// Creates the parent cgroup `<own>/<name>` in every hierarchy used, and in the unified
    /// tree enables the controllers the module cgroups need. Returns a warning text for limits
    /// that will not be available.
    pub fn prepare(&mut self, name: &str) -> std::io::Result<Vec<String>> {
        let mut warnings = Vec::new();
        let parent = |hierarchy: &Hierarchy| hierarchy.dir(&join_relative(&hierarchy.own, &[name]));
        std::fs::create_dir_all(parent(&self.tracking))?;
        let v2_controllers: Vec<&str> = [("memory", &self.memory), ("pids", &self.pids)]
            .into_iter()
            .filter(|(_, hierarchy)| {
                hierarchy
                    .as_ref()
                    .is_some_and(|hierarchy| hierarchy.version == Version::V2)
            })
            .map(|(controller, _)| controller)
            .collect();
        if !v2_controllers.is_empty() {
            if let Err(error) = self.enable_v2(name, &v2_controllers) {
                warnings.push(format!(
                    "cgroup v2 controllers {v2_controllers:?} cannot be enabled for modules ({error}); \
                     memory and pids limits are unavailable"
                ));
                for controller in v2_controllers {
                    match controller {
                        "memory" => self.memory = None,
                        _ => self.pids = None,
                    }
                }
            }
        }
        for hierarchy in [&self.memory, &self.pids].into_iter().flatten() {
            if hierarchy.version == Version::V1 {
                std::fs::create_dir_all(parent(hierarchy))?;
            }
        }
        Ok(warnings)
    }

    /// Enables `controllers` in `<own>/cgroup.subtree_control` and `<own>/<name>/...`. When edged's
    /// own (non-root) cgroup holds processes the kernel refuses ("no internal processes"), so edged
    /// first moves itself into the leaf `<own>/edged`.
    fn enable_v2(&mut self, name: &str, controllers: &[&str]) -> std::io::Result<()> {
        let tracking = &self.tracking;
        let own_dir = tracking.dir(&tracking.own);
        let value: String = controllers
            .iter()
            .map(|controller| format!("+{controller} "))
            .collect();
        let value = value.trim_end();
        if write_control(&own_dir, "cgroup.subtree_control", value).is_err() && tracking.own != "/"
        {
            let leaf = own_dir.join("edged");
            std::fs::create_dir_all(&leaf)?;
            write_control(&leaf, "cgroup.procs", &std::process::id().to_string())?;
            write_control(&own_dir, "cgroup.subtree_control", value)?;
        }
        let parent = tracking.dir(&join_relative(&tracking.own, &[name]));
        write_control(&parent, "cgroup.subtree_control", value)
    }

    /// The cgroups of module `module` under the parent `name` (not created yet).
    pub fn module_cgroups(&self, name: &str, module: &str) -> ModuleCgroups {
        let tracking_path = join_relative(&self.tracking.own, &[name, module]);
        let tracking_dir = self.tracking.dir(&tracking_path);
        let dir_of =
            |hierarchy: &Hierarchy| hierarchy.dir(&join_relative(&hierarchy.own, &[name, module]));
        let mut dirs = vec![tracking_dir.clone()];
        let memory = self
            .memory
            .as_ref()
            .map(|hierarchy| (dir_of(hierarchy), hierarchy.version));
        let pids = self.pids.as_ref().map(dir_of);
        for dir in memory.iter().map(|(dir, _)| dir).chain(pids.iter()) {
            if !dirs.contains(dir) {
                dirs.push(dir.clone());
            }
        }
        ModuleCgroups {
            tracking_dir,
            tracking_path,
            tracking_version: Some(self.tracking.version),
            tracking_controller: self.tracking.controller.clone(),
            dirs,
            memory,
            pids,
        }
    }
}

impl ModuleCgroups {
    /// Creates the folders (again, after a reboot) and writes the limits.
    pub fn create(&self, memory_bytes: Option<u64>, pids_max: Option<u64>) -> Result<(), String> {
        for dir in &self.dirs {
            std::fs::create_dir_all(dir)
                .map_err(|error| format!("could not create cgroup {}: {error}", dir.display()))?;
        }
        match (&self.memory, memory_bytes) {
            (Some((dir, Version::V2)), limit) => write_control(
                dir,
                "memory.max",
                &limit.map_or("max".to_owned(), |bytes| bytes.to_string()),
            )
            .map_err(|error| error.to_string())?,
            (Some((dir, Version::V1)), limit) => write_control(
                dir,
                "memory.limit_in_bytes",
                &limit.map_or("-1".to_owned(), |bytes| bytes.to_string()),
            )
            .map_err(|error| error.to_string())?,
            (None, Some(_)) => {
                return Err(
                    "HostConfig.Memory: no memory controller is available to edged".to_owned(),
                )
            }
            (None, None) => {}
        }
        match (&self.pids, pids_max) {
            (Some(dir), limit) => write_control(
                dir,
                "pids.max",
                &limit.map_or("max".to_owned(), |count| count.to_string()),
            )
            .map_err(|error| error.to_string())?,
            (None, Some(_)) => {
                return Err(
                    "HostConfig.PidsLimit: no pids controller is available to edged".to_owned(),
                )
            }
            (None, None) => {}
        }
        Ok(())
    }

    /// The pids in the module's tracking cgroup (empty when it does not exist).
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.tracking_dir.join("cgroup.procs"))
            .map(|text| {
                text.lines()
                    .filter_map(|line| line.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether `/proc/<pid>/cgroup` (given as text) puts the process in this module.
    pub fn contains(&self, proc_cgroup: &str) -> bool {
        let wanted = match self.tracking_version {
            Some(Version::V2) => None,
            Some(Version::V1) => Some(self.tracking_controller.as_str()),
            None => return false,
        };
        let Some(path) = own_path(proc_cgroup, wanted) else {
            return false;
        };
        // A process in a deleted cgroup shows " (deleted)": not a member any more.
        path == self.tracking_path
            || path
                .strip_prefix(&self.tracking_path)
                .is_some_and(|rest| rest.starts_with('/'))
    }

    /// Sends `signal` to every process of the module.
    pub fn signal_all(&self, signal: i32) {
        for pid in self.pids() {
            // SAFETY: kill(2) with a pid read from the module's own cgroup; no memory involved.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Kills every process of the module (`cgroup.kill` where the kernel has it, else SIGKILL to
    /// each pid until none is left) and waits up to `timeout` for the cgroup to empty.
    pub fn kill_all(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let kill_file = self.tracking_dir.join("cgroup.kill");
        loop {
            if self.pids().is_empty() {
                return true;
            }
            if !(self.tracking_version == Some(Version::V2)
                && std::fs::write(&kill_file, "1").is_ok())
            {
                self.signal_all(libc::SIGKILL);
            }
            if Instant::now() >= deadline {
                return self.pids().is_empty();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the folders (after [`ModuleCgroups::kill_all`]); a folder the kernel still holds
    /// is retried for up to 5 s.
    pub fn remove(&self) {
        for dir in self.dirs.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                    Err(error) => {
                        if Instant::now() >= deadline {
                            log::warn!("could not remove cgroup {}: {error}", dir.display());
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
    }

    /// Memory in use (bytes), when a memory cgroup exists.
    pub fn memory_usage(&self) -> Option<u64> {
        let (dir, version) = self.memory.as_ref()?;
        let file = match version {
            Version::V2 => "memory.current",
            Version::V1 => "memory.usage_in_bytes",
        };
        std::fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The memory limit (bytes), when one is set.
    pub fn memory_limit(&self) -> Option<u64> {
        let (dir, version) = self.memory.as_ref()?;
        let file = match version {
            Version::V2 => "memory.max",
            Version::V1 => "memory.limit_in_bytes",
        };
        std::fs::read_to_string(dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID_MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
";
    const HYBRID_SELF: &str = "9:pids:/\n4:memory:/process_api/0e9a\n2:cpu,cpuacct:/\n0::/\n";

    #[test]
    fn hybrid_tracks_in_the_unified_tree_and_limits_in_v1() {
        let layout = layout_from(HYBRID_MOUNTS, HYBRID_SELF, "hugetlb\n").unwrap();
        assert_eq!(layout.tracking.version, Version::V2);
        assert_eq!(
            layout.tracking.mount,
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        let memory = layout.memory.clone().unwrap();
        assert_eq!(
            (memory.version, memory.own.as_str()),
            (Version::V1, "/process_api/0e9a")
        );
        assert_eq!(layout.pids.clone().unwrap().version, Version::V1);
        let module = layout.module_cgroups("edged-modules", "m1");
        assert_eq!(module.tracking_path, "/edged-modules/m1");
        assert_eq!(
            module.dirs,
            vec![
                PathBuf::from("/sys/fs/cgroup/unified/edged-modules/m1"),
                PathBuf::from("/sys/fs/cgroup/memory/process_api/0e9a/edged-modules/m1"),
                PathBuf::from("/sys/fs/cgroup/pids/edged-modules/m1"),
            ]
        );
        assert!(module.contains("4:memory:/x\n0::/edged-modules/m1\n"));
        assert!(module.contains("0::/edged-modules/m1/child\n"));
        assert!(!module.contains("0::/edged-modules/m10\n"));
        assert!(!module.contains("0::/edged-modules/m2\n"));
        assert!(!module.contains("0::/\n"));
        assert!(!module.contains(""));
    }

    #[test]
    fn pure_v2_keeps_everything_in_one_tree() {
        let mounts = "25 20 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        let layout = layout_from(
            mounts,
            "0::/system.slice/aziot-edged.service\n",
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        assert_eq!(layout.memory.as_ref().unwrap().version, Version::V2);
        let module = layout.module_cgroups("edged-modules", "m");
        assert_eq!(
            module.dirs,
            vec![PathBuf::from(
                "/sys/fs/cgroup/system.slice/aziot-edged.service/edged-modules/m"
            )]
        );
        assert!(module.contains("0::/system.slice/aziot-edged.service/edged-modules/m\n"));
        assert!(!module.contains("0::/system.slice/aziot-edged.service\n"));
    }

    #[test]
    fn v1_only_tracks_with_pids_and_nothing_is_no_layout() {
        let mounts = "33 30 0:29 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let layout = layout_from(mounts, "3:pids:/a\n", "").unwrap();
        assert_eq!(layout.tracking.version, Version::V1);
        let module = layout.module_cgroups("n", "m");
        assert!(module.contains("3:pids:/a/n/m\n"));
        assert!(!module.contains("0::/a/n/m\n"));
        assert!(layout_from("", "0::/\n", "").is_none());
    }
}
