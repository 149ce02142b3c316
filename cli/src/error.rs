//! The typed errors of the library part of the CLI. `main.rs` turns them into messages and exit
//! codes; nothing here prints. Messages never contain secrets (connection strings, keys, PINs,
//! passwords): validation errors name the key and the problem, never the value of a secret.

use std::path::PathBuf;

/// A problem with one key of the super-config, before the file name is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The dotted key path, e.g. `provisioning.attestation.symmetric_key`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Why `config apply` (or `config mp`) failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The super-config could not be read.
    #[error("could not read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The super-config is not valid TOML.
    #[error("{}: not valid TOML: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (positions, no values of secrets beyond the offending line).
        message: String,
    },
    /// A key of the super-config is invalid.
    #[error("{}: invalid `{}`: {}", path.display(), problem.key, problem.message)]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key and the reason.
        problem: Problem,
    },
    /// A file the super-config points at could not be read.
    #[error("could not read {} (named by `{key}`)", path.display())]
    ReadReferenced {
        /// The key naming the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A service user is needed for a principal but does not exist.
    #[error(
        "user {0:?} does not exist: create the service users (contrib/systemd/aziot-sysusers.conf) \
         or pass --uid {0}=<uid>"
    )]
    UnknownUser(String),
    /// An output file or folder could not be written.
    #[error("could not write {}", path.display())]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The command needs root.
    #[error("this command must run as root (or write elsewhere with --root DIR)")]
    NotRoot,
    /// The output file exists and `--force` was not given.
    #[error("{} already exists; pass --force to overwrite it", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The hostname would change while edgeAgent's modules exist.
    #[error(
        "the hostname changes from {old:?} to {new:?}, but modules created by edgeAgent still exist \
         ({modules}); remove them first (docker rm -f ...), because their certificates and \
         identities are bound to the old hostname"
    )]
    HostnameChangeWithModules {
        /// The hostname in identityd's current config.
        old: String,
        /// The new hostname.
        new: String,
        /// The containers found.
        modules: String,
    },
}

/// Why a request to a daemon failed, for the commands that talk to sockets.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The endpoint URI is not usable.
    #[error("invalid endpoint {0:?}: expected unix:///absolute/path")]
    Endpoint(String),
    /// The request failed (unreachable, timeout, unexpected status).
    #[error("{what}")]
    Request {
        /// What was being done, e.g. `listing modules via unix:///var/run/iotedge/mgmt.sock`.
        what: String,
        /// The client's error.
        #[source]
        source: http_common::ClientError,
    },
    /// The local async runtime could not start.
    #[error("could not start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// Writing the output failed (e.g. a closed pipe).
    #[error("could not write the output")]
    Output(#[source] std::io::Error),
}

/// Why a systemd wrapper failed.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// systemd is not the init system here.
    #[error(
        "systemd is not running on this machine (no /run/systemd/system), so {what} is not \
         available; run the daemons yourself (see docs/operations.md)"
    )]
    NoSystemd {
        /// The operation.
        what: String,
    },
    /// A tool could not be started.
    #[error("could not run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("{program} {arguments} failed ({status})")]
    Failed {
        /// The program.
        program: String,
        /// Its arguments.
        arguments: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// A drop-in could not be written.
    #[error("could not write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A request to identityd failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}
