//! Shared helpers for the CLI's black-box tests: run `iotedge`, find the daemon binaries built
//! next to it, start a daemon on a temporary socket and stop it on drop.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The uids the tests give the service users (they do not exist on test machines).
pub const UID_ARGS: [&str; 8] = [
    "--uid",
    "aziotks=5555",
    "--uid",
    "aziotcs=5556",
    "--uid",
    "aziotid=5557",
    "--uid",
    "iotedge=5558",
];

/// The `iotedge` binary under test.
pub fn iotedge_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_iotedge"))
}

/// A daemon binary built next to `iotedge` (keyd, certd, identityd, edged). `cargo test
/// --workspace` (tools/test.sh) builds them; a test run without them fails here, saying so.
pub fn daemon_binary(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_iotedge")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} is not built: run the tests with `cargo test --workspace` (tools/test.sh)",
        path.display()
    );
    path
}

/// Runs `iotedge` with these arguments.
pub fn iotedge(arguments: &[&str]) -> Output {
    Command::new(iotedge_binary())
        .args(arguments)
        .env_remove("IOTEDGE_HOST")
        .env_remove("AZIOT_IDENTITYD_URI")
        .output()
        .expect("run iotedge")
}

/// The text of a command's output, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `config apply --root <root>` of `fixture` (a file under tests/fixtures).
pub fn apply_fixture(fixture: &Path, root: &Path) -> Output {
    let mut arguments = vec![
        "config".to_owned(),
        "apply".to_owned(),
        "-c".to_owned(),
        fixture.display().to_string(),
        "--root".to_owned(),
        root.display().to_string(),
    ];
    arguments.extend(UID_ARGS.iter().map(|argument| (*argument).to_owned()));
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    iotedge(&arguments)
}

/// The fixtures folder.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A running daemon, killed on drop.
pub struct Daemon {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts `binary --config <base> --config-dir <dir>` and waits for `socket`. On failure
    /// returns the daemon's output.
    pub fn start(
        binary: &Path,
        base: &Path,
        dropin_dir: &Path,
        socket: &Path,
        environment: &[(&str, &str)],
    ) -> Result<Daemon, String> {
        let log = socket.with_extension("log");
        let log_file = std::fs::File::create(&log).expect("create the log");
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(base)
            .arg("--config-dir")
            .arg(dropin_dir)
            .env("AZIOT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file);
        for (name, value) in environment {
            command.env(name, value);
        }
        let child = command.spawn().map_err(|error| error.to_string())?;
        let mut daemon = Daemon {
            child,
            socket: socket.to_owned(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if socket.exists() {
                return Ok(daemon);
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(format!("exited with {status}: {}", daemon.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("did not open its socket: {}", daemon.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a daemon that may wait for peers before it binds its socket (edged waits for
    /// identityd's device identity and Docker): its configuration counts as accepted when the
    /// socket appears, it is still running after `grace`, or it exits with a code other than
    /// 153 (configuration errors exit at once with 153).
    pub fn start_and_survive(
        binary: &Path,
        base: &Path,
        dropin_dir: &Path,
        socket: &Path,
        grace: Duration,
    ) -> Result<Daemon, String> {
        let log = socket.with_extension("log");
        let log_file = std::fs::File::create(&log).expect("create the log");
        let child = Command::new(binary)
            .arg("--config")
            .arg(base)
            .arg("--config-dir")
            .arg(dropin_dir)
            .env("AZIOT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|error| error.to_string())?;
        let mut daemon = Daemon {
            child,
            socket: socket.to_owned(),
            log,
        };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !socket.exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                // 153 is the daemons' "configuration invalid"; any other early exit (a peer
                // that is not there) happened after the configuration was accepted.
                if status.code() == Some(153) {
                    return Err(format!("exited with {status}: {}", daemon.log()));
                }
                eprintln!(
                    "note: {} accepted its configuration, then exited with {status}",
                    binary.display()
                );
                return Ok(daemon);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `unix://` URI of the socket.
    pub fn uri(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A current-thread runtime for async clients in tests.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A SoftHSM2 token labelled `Key pairs` (user PIN 1234) in a temporary folder, with an EC key
/// pair labelled `label` created by opensc's pkcs11-tool.
pub struct SoftHsm {
    /// The `SOFTHSM2_CONF` file.
    pub conf: PathBuf,
    _dir: tempfile::TempDir,
}

/// SoftHSM2's module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

impl SoftHsm {
    /// Creates the token and the key pair.
    pub fn with_key_pair(label: &str) -> SoftHsm {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        let run = |program: &str, arguments: &[&str]| {
            let output = Command::new(program)
                .args(arguments)
                .env("SOFTHSM2_CONF", &conf)
                .output()
                .unwrap_or_else(|error| {
                    panic!("{program} is needed (apt-get install softhsm2 opensc): {error}")
                });
            assert!(
                output.status.success(),
                "{program} {arguments:?}: {}",
                describe(&output)
            );
        };
        run(
            "softhsm2-util",
            &[
                "--init-token",
                "--free",
                "--label",
                "Key pairs",
                "--so-pin",
                "5678",
                "--pin",
                "1234",
            ],
        );
        run(
            "pkcs11-tool",
            &[
                "--module",
                SOFTHSM_MODULE,
                "--token-label",
                "Key pairs",
                "--login",
                "--pin",
                "1234",
                "--keypairgen",
                "--key-type",
                "EC:prime256v1",
                "--label",
                label,
            ],
        );
        SoftHsm { conf, _dir: dir }
    }
}
