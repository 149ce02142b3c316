//! A daemon under test: the real binary with its own folder (config.toml, config.d, home, socket,
//! log), started with `AZIOT_<DAEMON>_CONFIG[_DIR]` pointing there, waited for until its socket
//! answers, stopped with SIGTERM, and killed on drop.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A daemon binary built next to `anchor` (a test's `env!("CARGO_BIN_EXE_...")`); fails with the
/// command that builds it when it is missing.
pub fn sibling_binary(anchor: &str, name: &str) -> PathBuf {
    let path = Path::new(anchor).with_file_name(name);
    assert!(
        path.exists(),
        "the {name} binary is missing at {}: run `cargo build -p {name}` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// One daemon process with its own folder (config, config.d, home, socket, log).
#[derive(Debug)]
pub struct Daemon {
    name: &'static str,
    binary: PathBuf,
    pub dir: PathBuf,
    pub socket: PathBuf,
    env_file: &'static str,
    env_dir: &'static str,
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Daemon {
    pub fn new(
        name: &'static str,
        binary: PathBuf,
        root: &Path,
        env_file: &'static str,
        env_dir: &'static str,
    ) -> Daemon {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("config.d")).unwrap();
        // Reachable by the unprivileged uids that some tests act as.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Daemon {
            name,
            binary,
            socket: dir.join(format!("{name}.sock")),
            dir,
            env_file,
            env_dir,
            env: Vec::new(),
            child: None,
        }
    }

    /// The base config file.
    pub fn config_file(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// The drop-in folder.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("config.d")
    }

    /// The state folder.
    pub fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .env(self.env_file, self.config_file())
            .env(self.env_dir, self.config_dir())
            .env("AZIOT_LOG", "debug")
            .stdin(Stdio::null());
        for (name, value) in &self.env {
            command.env(name, value);
        }
        command
    }

    /// Starts the daemon (no waiting).
    pub fn launch(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap();
        let child = self
            .command()
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Starts (or restarts) the daemon and waits for its socket.
    pub fn spawn(&mut self) {
        self.launch();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("{} exited early with {status}:\n{}", self.name, self.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
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
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Runs the binary once with the current config and returns its exit code and output.
    pub fn run_to_exit(&self) -> (Option<i32>, String) {
        let output = self.command().output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code(), text)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
