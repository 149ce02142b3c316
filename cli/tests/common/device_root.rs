//! A device's file system for one test, without editing the daemons' configs: each daemon runs
//! in a private mount namespace (`unshare --mount`, root only) in which
//!
//! - `/etc` and `/var` are overlays whose upper layers are `etc/` and `var/` of a temporary
//!   folder (so `/etc/aziot/...`, `/var/lib/aziot/...` and `/var/secrets/...` are that folder's,
//!   and everything else is the host's, read through), and
//! - `/run` (and so `/var/run`, a link to it) is that folder's `run/`, and `/var/lib/aziot`
//!   and `/var/lib/iotedge` are bound to that folder's `var/lib/aziot` and `var/lib/iotedge`:
//!   a socket made in an overlay cannot be reached through the upper layer's path, and these
//!   are the folders under `/var` that hold sockets (edged's, the modules').
//!
//! The absolute paths a generated config names (its state folders, sockets, key and cert files,
//! `/var/run/docker.sock`) therefore resolve inside the temporary folder, and a daemon reads its
//! golden file from its default place, `/etc/aziot/<daemon>/config.d/00-super.toml`. The test
//! writes what the file refers to (secrets, certificates, `/etc/hosts`) at [`DeviceRoot::path`]
//! and talks to the daemons on their sockets there. Daemons of one device see the same files
//! (they share the folders), each in a namespace of its own that ends with it.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The shell that sets up the namespace (`$DEVICE_ROOT` is the temporary folder), then runs the
/// daemon's command line in it.
const MOUNTS: &str = r#"set -e
mount --bind "$DEVICE_ROOT/run" /run
mount -t overlay overlay -o "lowerdir=/etc,upperdir=$DEVICE_ROOT/etc,workdir=$DEVICE_ROOT/.etc-work" /etc
mount -t overlay overlay -o "lowerdir=/var,upperdir=$DEVICE_ROOT/var,workdir=$DEVICE_ROOT/.var-work" /var
for folder in /var/lib/aziot /var/lib/iotedge; do
    mkdir -p "$folder"
    mount --bind "$DEVICE_ROOT$folder" "$folder"
done
exec "$@""#;

/// The temporary folder that stands in for a device's `/etc`, `/var` and `/run`.
pub struct DeviceRoot {
    dir: tempfile::TempDir,
}

impl DeviceRoot {
    /// Creates the folder's `etc/`, `var/`, `run/` and the overlays' work folders.
    pub fn new() -> DeviceRoot {
        let dir = tempfile::tempdir().expect("tempdir");
        for folder in ["etc", "var", "run", ".etc-work", ".var-work"] {
            std::fs::create_dir(dir.path().join(folder)).expect("device root folder");
        }
        DeviceRoot { dir }
    }

    /// Where the device's absolute `device_path` (under `/etc`, `/var` or `/run`) is for the
    /// test, outside the namespace.
    pub fn path(&self, device_path: impl AsRef<Path>) -> PathBuf {
        let device_path = device_path.as_ref();
        let relative = device_path
            .strip_prefix("/var/run")
            .map(|rest| Path::new("run").join(rest))
            .or_else(|_| device_path.strip_prefix("/").map(Path::to_owned))
            .unwrap_or_else(|_| panic!("{} is not absolute", device_path.display()));
        assert!(
            ["etc", "var", "run"]
                .iter()
                .any(|top| relative.starts_with(top)),
            "{} is outside /etc, /var and /run, which are the only remapped folders",
            device_path.display()
        );
        self.dir.path().join(relative)
    }

    /// Writes `contents` at the device's `device_path` (0600, parent folders 0700, as config
    /// apply and the daemons write theirs).
    pub fn write(&self, device_path: impl AsRef<Path>, contents: impl AsRef<[u8]>) {
        let path = self.path(device_path);
        let parent = path.parent().unwrap();
        std::fs::create_dir_all(parent).unwrap();
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// `program arguments...` run in a namespace of this device.
    pub fn command(&self, program: impl AsRef<Path>) -> Command {
        let mut command = Command::new("unshare");
        command
            .args([
                "--mount",
                "--propagation",
                "private",
                "/bin/sh",
                "-c",
                MOUNTS,
            ])
            .arg("sh")
            .arg(program.as_ref())
            .env("DEVICE_ROOT", self.dir.path());
        command
    }

    /// A place for the test's own files (logs, a token), outside the remapped folders.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
