//! The README's run command, end to end: `tools/quickstart.sh` starts the cloud emulator, keyd,
//! certd, identityd and (with a reachable Docker Engine) edged from the binaries
//! `cargo test --workspace` built; identityd provisions the device through the emulator's DPS and
//! edged runs the edgeAgent container.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// Stops whatever the quickstart started (`tools/quickstart.sh --stop`).
struct Stack {
    dir: tempfile::TempDir,
}

impl Stack {
    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repository_root().join("tools/quickstart.sh"))
            .arg("--stop")
            .env("QUICKSTART_DIR", self.run_dir())
            .output();
    }
}

fn repository_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// Takes the machine-wide lock edged's Docker tests use (a fresh edged removes every container
/// an agent created, so two runs against one Docker Engine must not overlap). Released on drop.
fn docker_lock() -> std::fs::File {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("edged-docker-tests.lock"))
        .unwrap();
    // SAFETY: flock(2) on an fd we own; it blocks until the lock is ours and is released when the
    // file is closed.
    let result = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    assert_eq!(result, 0, "flock failed");
    file
}

fn docker_reachable() -> bool {
    std::process::Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|output| output.status.success())
}

fn binaries_dir() -> PathBuf {
    // target/debug/deps/quickstart-<hash> → target/debug
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned()
}

#[test]
fn quickstart_provisions_a_device_end_to_end() {
    let root = repository_root();
    let bin = binaries_dir();
    for name in ["keyd", "certd", "identityd", "edged", "cloud-emulator"] {
        assert!(
            bin.join(name).exists(),
            "{name} is not built in {}; run cargo build --workspace",
            bin.display()
        );
    }
    let _docker = docker_lock();
    let stack = Stack {
        dir: tempfile::tempdir().unwrap(),
    };
    let run_dir = stack.run_dir();
    let output = std::process::Command::new(root.join("tools/quickstart.sh"))
        .args(["--detach", "--no-build"])
        .env("QUICKSTART_DIR", &run_dir)
        .env("QUICKSTART_BIN_DIR", &bin)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("device provisioned through DPS"),
        "{stdout}"
    );

    // The device identity comes from the emulator's DPS assignment, with a keyd handle.
    let answer = std::process::Command::new("curl")
        .args(["-sf", "--unix-socket"])
        .arg(run_dir.join("sockets/identityd.sock"))
        .args(["-H", "content-type: application/json", "-X", "POST"])
        .args([
            "http://identityd/identities/device?api-version=2020-09-01",
            "-d",
            r#"{"type":"aziot"}"#,
        ])
        .output()
        .unwrap();
    assert!(answer.status.success(), "{answer:?}");
    let identity: serde_json::Value = serde_json::from_slice(&answer.stdout).unwrap();
    assert_eq!(
        identity["spec"]["deviceId"], "quickstart-device",
        "{identity}"
    );
    assert_eq!(identity["spec"]["auth"]["type"], "sas", "{identity}");
    assert!(identity["spec"]["auth"]["keyHandle"]
        .as_str()
        .unwrap()
        .starts_with("sr="));

    // The emulator really registered it (its log records the DPS registration).
    let ready = std::fs::read_to_string(run_dir.join("emulator/ready.json")).unwrap();
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    let admin = ready["admin"].as_str().unwrap();
    let registrations = std::process::Command::new("curl")
        .args(["-sf", &format!("http://{admin}/registrations")])
        .output()
        .unwrap();
    let registrations = String::from_utf8_lossy(&registrations.stdout);
    assert!(
        registrations.contains("quickstart-device"),
        "{registrations}"
    );

    // With a Docker Engine (as on CI), edged runs and has started the edgeAgent container.
    if docker_reachable() {
        assert!(stdout.contains("edgeAgent running"), "{stdout}");
        let modules = std::process::Command::new("curl")
            .args(["-sf", "--unix-socket"])
            .arg(run_dir.join("sockets/edged.sock"))
            .arg("http://edged/modules?api-version=2020-07-07")
            .output()
            .unwrap();
        let modules: serde_json::Value = serde_json::from_slice(&modules.stdout).unwrap();
        let agent = modules["modules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|module| module["name"] == "edgeAgent")
            .unwrap_or_else(|| panic!("no edgeAgent in {modules}"));
        assert_eq!(
            agent["status"]["runtimeStatus"]["status"], "running",
            "{agent}"
        );
    }
}
