//! A private software TPM: `swtpm socket --tpm2` on free loopback ports with its own state
//! folder (killed on drop), and tpm2-tools run against it. A missing swtpm or tpm2-tools is a
//! test failure (tools/install-deps.sh installs both).
//!
//! swtpm serves one TCP client at a time: stop the process holding a TCTI connection (keyd)
//! before running [`Swtpm::tool`].

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running swtpm.
#[derive(Debug)]
pub struct Swtpm {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two consecutive free TCP ports (server, control).
fn free_port_pair() -> u16 {
    loop {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

impl Swtpm {
    /// Starts a fresh TPM (manufactured state, started up: `not-need-init,startup-clear`) and
    /// waits until it accepts connections.
    pub fn start() -> Swtpm {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        // Another process may take a port between the probe and swtpm's bind: try a few pairs.
        for _ in 0..5 {
            let port = free_port_pair();
            let mut child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("swtpm must be installed (tools/install-deps.sh)");
            let deadline = Instant::now() + Duration::from_secs(30);
            let ready = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    break true;
                }
                assert!(
                    Instant::now() < deadline,
                    "swtpm did not listen within 30 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            };
            if ready {
                return Swtpm { child, dir, port };
            }
        }
        panic!("swtpm could not start on a free port");
    }

    /// The TCTI string for this TPM (tpm2-tools, keyd's `tcti`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// A path in this TPM's scratch folder (where [`Swtpm::tool`] runs).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The scratch folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs a tpm2-tools command against this TPM in its scratch folder; panics with its
    /// stderr on failure; returns its stdout.
    pub fn tool(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", self.tcti())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("tpm2-tools must be installed (tools/install-deps.sh)");
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Flushes transient objects (without a resource manager they stay loaded between tools).
    pub fn flush_transient(&self) {
        self.tool(&["tpm2_flushcontext", "-t"]);
    }

    /// `tpm2_readpublic -c <handle> -f <format> -o`: `tss` is the TPM2B_PUBLIC, `tpmt` the bare
    /// TPMT_PUBLIC.
    pub fn read_public(&self, handle: &str, format: &str) -> Vec<u8> {
        let file = format!("{handle}.{format}.pub");
        self.tool(&["tpm2_readpublic", "-c", handle, "-f", format, "-o", &file]);
        std::fs::read(self.path(&file)).unwrap()
    }

    /// The TPM's name of a handle (nameAlg || digest), `tpm2_readpublic -n`.
    pub fn name(&self, handle: &str) -> Vec<u8> {
        let file = format!("{handle}.name");
        self.tool(&["tpm2_readpublic", "-c", handle, "-n", &file]);
        std::fs::read(self.path(&file)).unwrap()
    }
}
