//! Test harness: the real `keyd` binary as a `system_tests::Daemon` in a temporary folder, with
//! a config written from a template, killed on drop.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use system_tests::Daemon;

/// A keyd process with its own temporary folder.
pub struct Keyd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config_file: PathBuf,
    pub config_dir: PathBuf,
    daemon: Daemon,
}

impl Keyd {
    /// Writes `config` (TOML without `[endpoints]`, which is added) and starts keyd. `{home}`
    /// in `config` is replaced by a fresh state folder.
    pub fn start(config: &str) -> Keyd {
        Keyd::start_with_env(config, Vec::new())
    }

    /// Like [`Keyd::start`] with extra environment variables for the daemon.
    pub fn start_with_env(config: &str, extra_env: Vec<(String, String)>) -> Keyd {
        let mut keyd = Keyd::prepare(config, extra_env);
        keyd.spawn();
        keyd
    }

    /// Writes the configuration without starting keyd.
    pub fn prepare(config: &str, extra_env: Vec<(String, String)>) -> Keyd {
        let dir = tempfile::tempdir().unwrap();
        let mut daemon = Daemon::new(
            "keyd",
            PathBuf::from(env!("CARGO_BIN_EXE_keyd")),
            dir.path(),
            "AZIOT_KEYD_CONFIG",
            "AZIOT_KEYD_CONFIG_DIR",
        );
        daemon.env = extra_env;
        let text = format!(
            "{}\n[endpoints]\naziot_keyd = \"unix://{}\"\n",
            config.replace("{home}", daemon.home().to_str().unwrap()),
            daemon.socket.display()
        );
        std::fs::write(daemon.config_file(), text).unwrap();
        Keyd {
            socket: daemon.socket.clone(),
            config_file: daemon.config_file(),
            config_dir: daemon.config_dir(),
            dir,
            daemon,
        }
    }

    /// The state folder used for `{home}`.
    pub fn home(&self) -> PathBuf {
        self.daemon.home()
    }

    /// Starts (or restarts) the daemon and waits for its first answer: the socket accepts
    /// before keyd has opened its stores, and tests that look at the key folder need them open.
    pub fn spawn(&mut self) {
        use std::io::{Read as _, Write as _};
        self.daemon.spawn();
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: keyd\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 "),
            "keyd did not answer:\n{}",
            self.log()
        );
    }

    /// Stops the daemon (SIGTERM, then waits).
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// The daemon's log so far (all runs).
    pub fn log(&self) -> String {
        self.daemon.log()
    }

    /// The typed client.
    pub fn client(&self) -> key_api::Client {
        key_api::Client::new(http_common::UdsClient::new(&self.socket))
    }

    /// The raw HTTP client.
    pub fn http(&self) -> http_common::UdsClient {
        http_common::UdsClient::new(&self.socket)
    }
}

/// Runs `keyd` once with `config` and returns its exit status and output (for startup errors).
pub fn run_to_exit(
    config_file: &Path,
    config_dir: &Path,
    extra_env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keyd"));
    command
        .env("AZIOT_KEYD_CONFIG", config_file)
        .env("AZIOT_KEYD_CONFIG_DIR", config_dir)
        .stdin(Stdio::null());
    for (name, value) in extra_env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}

/// base64 (standard).
pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// base64 decode (standard).
pub fn unb64(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}
