//! The README's run command, end to end: `tools/quickstart.sh` starts the cloud emulator, keyd,
//! certd and identityd from the binaries `cargo test --workspace` built, and identityd provisions
//! the device through the emulator's DPS.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

/// Stops whatever the quickstart started (it leaves `<run dir>/*.pid`).
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
        let Ok(entries) = std::fs::read_dir(self.run_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            if entry
                .path()
                .extension()
                .is_some_and(|extension| extension == "pid")
            {
                let pid = std::fs::read_to_string(entry.path()).unwrap();
                let _ = std::process::Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let bin = binaries_dir();
    for name in ["keyd", "certd", "identityd", "cloud-emulator"] {
        assert!(
            bin.join(name).exists(),
            "{name} is not built in {}; run cargo build --workspace",
            bin.display()
        );
    }
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
}
