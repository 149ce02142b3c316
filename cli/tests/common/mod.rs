//! Shared helpers for the CLI's black-box tests: run `iotedge`, find the daemon binaries built
//! next to it, start a daemon (on the device paths of a [`device_root::DeviceRoot`]) and stop it
//! on drop, a SoftHSM2 token.

#![allow(dead_code)]

pub mod device_root;

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
    /// Runs `command` (a daemon, logging to `log`) and waits until `socket` accepts. On failure
    /// returns the daemon's output.
    pub fn spawn(mut command: Command, socket: &Path, log: &Path) -> Result<Daemon, String> {
        let log_file = std::fs::File::create(log).expect("create the log");
        command
            .env("AZIOT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = command.spawn().map_err(|error| error.to_string())?;
        let mut daemon = Daemon {
            child,
            socket: socket.to_owned(),
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // The socket file appears at bind(2), a moment before listen(2): a connection
            // refused in between is not a daemon that refuses, so wait until one is accepted.
            if socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_ok() {
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

    /// Whether the daemon has exited, and how.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
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

/// A SoftHSM2 token labelled `Key pairs` (user PIN 1234) in a temporary folder, with EC key
/// pairs created by opensc's pkcs11-tool.
pub struct SoftHsm {
    /// The `SOFTHSM2_CONF` file.
    pub conf: PathBuf,
    _dir: tempfile::TempDir,
}

/// SoftHSM2's module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

impl SoftHsm {
    /// Creates the token and an EC key pair for each label.
    pub fn with_key_pairs(labels: &[&str]) -> SoftHsm {
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
        for label in labels {
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
        }
        SoftHsm { conf, _dir: dir }
    }
}
