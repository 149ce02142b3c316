//! Test harness: runs the real `keyd` binary on a temporary socket with a temporary config, and
//! kills it on drop.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running keyd process with its own temporary folder.
pub struct Keyd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config_file: PathBuf,
    pub config_dir: PathBuf,
    child: Option<Child>,
    extra_env: Vec<(String, String)>,
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
        let socket = dir.path().join("keyd.sock");
        let config_file = dir.path().join("config.toml");
        let config_dir = dir.path().join("config.d");
        std::fs::create_dir(&config_dir).unwrap();
        let home = dir.path().join("home");
        let text = format!(
            "{}\n[endpoints]\naziot_keyd = \"unix://{}\"\n",
            config.replace("{home}", home.to_str().unwrap()),
            socket.display()
        );
        std::fs::write(&config_file, text).unwrap();
        Keyd {
            dir,
            socket,
            config_file,
            config_dir,
            child: None,
            extra_env,
        }
    }

    /// The state folder used for `{home}`.
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Starts (or restarts) the daemon and waits for its socket.
    pub fn spawn(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::File::create(self.dir.path().join("keyd.log")).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_keyd"));
        command
            .env("AZIOT_KEYD_CONFIG", &self.config_file)
            .env("AZIOT_KEYD_CONFIG_DIR", &self.config_dir)
            .env("AZIOT_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (name, value) in &self.extra_env {
            command.env(name, value);
        }
        let mut child = command.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("keyd exited early with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "keyd did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// Stops the daemon (SIGTERM, then waits).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we own; no memory is involved.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("keyd.log")).unwrap_or_default()
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

impl Drop for Keyd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
