//! A daemon under test: the real binary with its own folder (config.toml, config.d, home, socket,
//! log), started with `AZIOT_<DAEMON>_CONFIG[_DIR]` pointing there, waited for until its socket
//! answers, stopped with SIGTERM, and killed on drop.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::RawFd;
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

    /// Listens on `socket` instead of `<folder>/<name>.sock` (the config must say so too).
    pub fn with_socket(mut self, socket: PathBuf) -> Daemon {
        self.socket = socket;
        self
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

    fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("log"))
            .unwrap()
    }

    /// Starts the daemon (no waiting).
    pub fn launch(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.socket);
        let log = self.log_file();
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
        self.spawn_within(Duration::from_secs(30));
    }

    /// Like [`Daemon::spawn`] with another deadline for the socket to answer.
    pub fn spawn_within(&mut self, timeout: Duration) {
        self.launch();
        self.wait_for_socket(timeout);
    }

    fn wait_for_socket(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
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

    /// Starts the daemon under `systemd-socket-activate`, which binds `sockets` (path, fd name)
    /// and passes them as named fds; returns once the first socket exists (the activator
    /// launches the daemon on the first connection).
    pub fn spawn_activated(&mut self, sockets: &[(&Path, &str)], timeout: Duration) {
        self.stop();
        let log = self.log_file();
        let mut command = Command::new("systemd-socket-activate");
        for (path, _) in sockets {
            let _ = std::fs::remove_file(path);
            command.arg("-l").arg(path);
        }
        let names: Vec<&str> = sockets.iter().map(|(_, name)| *name).collect();
        command
            .arg(format!("--fdname={}", names.join(":")))
            .arg(format!(
                "--setenv={}={}",
                self.env_file,
                self.config_file().display()
            ))
            .arg(format!(
                "--setenv={}={}",
                self.env_dir,
                self.config_dir().display()
            ))
            .arg("--setenv=AZIOT_LOG=debug")
            .arg(&self.binary)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = command
            .spawn()
            .expect("systemd-socket-activate (from the systemd package) is needed");
        self.child = Some(child);
        let deadline = Instant::now() + timeout;
        while !sockets[0].0.exists() {
            assert!(
                Instant::now() < deadline,
                "systemd-socket-activate did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the daemon the way systemd restarts a unit with a file-descriptor store: `fds`
    /// (name, fd) are passed as fds 3.. with `LISTEN_FDS`, `LISTEN_FDNAMES` and a `LISTEN_PID`
    /// equal to the daemon's pid (a shell sets it and execs the daemon); waits for the socket.
    pub fn spawn_with_fds(&mut self, fds: &[(String, RawFd)], timeout: Duration) {
        use std::os::unix::process::CommandExt;
        self.stop();
        let log = self.log_file();
        let names: Vec<&str> = fds.iter().map(|(name, _)| name.as_str()).collect();
        let raw: Vec<RawFd> = fds.iter().map(|(_, fd)| *fd).collect();
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\"")
            .arg(&self.binary)
            .env(self.env_file, self.config_file())
            .env(self.env_dir, self.config_dir())
            .env("AZIOT_LOG", "debug")
            .env("LISTEN_FDS", raw.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2) are made.
        unsafe {
            command.pre_exec(move || {
                let mut high = Vec::with_capacity(raw.len());
                for fd in &raw {
                    let copy = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 200);
                    if copy < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high.push(copy);
                }
                for (index, copy) in high.iter().enumerate() {
                    if libc::dup2(*copy, 3 + index as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        self.child = Some(command.spawn().unwrap());
        self.wait_for_socket(timeout);
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    /// Stops the daemon (SIGTERM, then waits; killed after 60 s) and returns its exit code, or
    /// `None` when it was not running or died from a signal.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on the pid of a child we own; no memory is involved.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the daemon with SIGKILL (no clean-up on its side) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the daemon to exit on its own and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
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
