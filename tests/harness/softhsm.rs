//! SoftHSM2 tokens for the PKCS#11 tests: every test gets its own token folder and
//! `SOFTHSM2_CONF`, so tests run in parallel without seeing each other's objects.
//!
//! SoftHSM2 and OpenSC (`pkcs11-tool`) are required: a missing one fails the test, it does not
//! skip it.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The SoftHSM2 PKCS#11 module (Debian's path).
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every test token.
pub const PIN: &str = "1234";
const SO_PIN: &str = "5678";

/// One initialized SoftHSM2 token in a temporary folder.
#[derive(Debug)]
pub struct SoftHsm {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
    pub label: String,
    pub slot: u64,
}

impl SoftHsm {
    /// Creates a token labelled `label` with user PIN [`PIN`].
    pub fn new(label: &str) -> SoftHsm {
        assert!(
            Path::new(MODULE).is_file(),
            "SoftHSM2 is not installed ({MODULE} is missing): apt-get install softhsm2 opensc"
        );
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                tokens.display()
            ),
        )
        .unwrap();
        let output = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", SO_PIN, "--pin", PIN])
            .output()
            .expect("softhsm2-util must be installed (apt-get install softhsm2)");
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "softhsm2-util failed: {text}");
        let slot = text
            .split("reassigned to slot ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse().ok())
            .unwrap_or_else(|| panic!("no slot number in: {text}"));
        SoftHsm {
            dir,
            conf,
            label: label.to_owned(),
            slot,
        }
    }

    /// The environment keyd (and pkcs11-tool) need to find this token.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![("SOFTHSM2_CONF".to_owned(), self.conf.display().to_string())]
    }

    /// A keyd config with a file store and this token as the base slot.
    pub fn keyd_config(&self) -> String {
        format!(
            "max_requests = 64\n[aziot_keys]\nhomedir_path = \"{{home}}\"\npkcs11_lib_path = \"{MODULE}\"\npkcs11_base_slot = \"pkcs11:token={}?pin-value={PIN}\"\n",
            self.label
        )
    }

    /// Runs `pkcs11-tool` logged in to this token; returns success and stdout+stderr.
    pub fn tool(&self, args: &[&str]) -> (bool, String) {
        let output = Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--module", MODULE, "--token-label", &self.label])
            .args(["--login", "--pin", PIN])
            .args(args)
            .output()
            .expect("pkcs11-tool must be installed (apt-get install opensc)");
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    }

    /// Like [`SoftHsm::tool`], failing the test when the tool fails.
    pub fn tool_ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.tool(args);
        assert!(ok, "pkcs11-tool {args:?} failed: {text}");
        text
    }

    /// `pkcs11-tool --list-objects`, split into one block per object.
    pub fn objects(&self) -> Vec<String> {
        let text = self.tool_ok(&["--list-objects"]);
        let mut objects: Vec<String> = Vec::new();
        for line in text.lines() {
            if line.ends_with("Object;") || line.contains(" Object; ") {
                objects.push(String::new());
            }
            if let Some(current) = objects.last_mut() {
                current.push_str(line);
                current.push('\n');
            }
        }
        objects
    }

    /// The object blocks whose label is exactly `label`.
    pub fn objects_labelled(&self, label: &str) -> Vec<String> {
        self.objects()
            .into_iter()
            .filter(|object| {
                object
                    .lines()
                    .any(|line| line.trim() == format!("label:      {label}"))
            })
            .collect()
    }

    /// A file in this token's temporary folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
