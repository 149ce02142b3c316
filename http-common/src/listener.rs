//! Listening sockets: `unix:///path` (bound here, or inherited from systemd) and `fd://name` /
//! `fd://N` (inherited), following `sd_listen_fds` semantics.
//!
//! [`SystemdFds::take`] must run before any thread is started (it reads and clears the
//! `LISTEN_*` environment variables so children do not inherit them).

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The URI is not `unix:///abs/path`, `fd://name` or `fd://N`.
    #[error("invalid listener URI {uri:?}: {reason}")]
    InvalidUri {
        /// The URI given.
        uri: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The `LISTEN_*` variables are inconsistent.
    #[error("invalid socket activation environment: {0}")]
    Activation(String),
    /// `fd://name` named a socket systemd did not pass.
    #[error("systemd did not pass a socket named {0:?}")]
    MissingName(String),
    /// A passed fd is not a listening Unix stream socket.
    #[error("file descriptor {0} is not a listening Unix stream socket")]
    NotUnixListener(RawFd),
    /// Another process is already serving on the path.
    #[error("another process is already listening on {}", .0.display())]
    InUse(PathBuf),
    /// The socket could not be bound or prepared.
    #[error("could not listen on {}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A parsed listener URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerUri {
    /// `unix:///abs/path.sock`.
    Unix(PathBuf),
    /// `fd://<name>`: the passed fd with that `LISTEN_FDNAMES` entry.
    FdName(String),
    /// `fd://<n>`: raw fd number `n`.
    FdNumber(RawFd),
}

impl ListenerUri {
    /// Parses `unix:///abs/path`, `fd://name` or `fd://N`.
    pub fn parse(uri: &str) -> Result<Self, ListenError> {
        let invalid = |reason| ListenError::InvalidUri {
            uri: uri.to_owned(),
            reason,
        };
        if let Some(path) = uri.strip_prefix("unix://") {
            let path = percent_encoding::percent_decode_str(path)
                .decode_utf8()
                .map_err(|_| invalid("path is not UTF-8"))?;
            if !path.starts_with('/') {
                return Err(invalid("the socket path must be absolute (unix:///path)"));
            }
            Ok(ListenerUri::Unix(PathBuf::from(path.as_ref())))
        } else if let Some(name) = uri.strip_prefix("fd://") {
            if name.is_empty() {
                return Err(invalid("missing fd name or number"));
            }
            match name.parse::<RawFd>() {
                Ok(number) if number >= 0 => Ok(ListenerUri::FdNumber(number)),
                _ => Ok(ListenerUri::FdName(name.to_owned())),
            }
        } else {
            Err(invalid("expected unix:// or fd://"))
        }
    }
}

/// The sockets systemd passed to this process (possibly none).
#[derive(Debug, Default)]
pub struct SystemdFds {
    fds: Vec<(RawFd, Option<String>)>,
}

const SD_LISTEN_FDS_START: RawFd = 3;

impl SystemdFds {
    /// Reads `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, honours them only if `LISTEN_PID`
    /// is our pid, marks the fds close-on-exec and clears the variables.
    ///
    /// Call this before starting any thread: it changes the process environment.
    pub fn take() -> Result<Self, ListenError> {
        let pid = std::env::var("LISTEN_PID").ok();
        let count = std::env::var("LISTEN_FDS").ok();
        let names = std::env::var("LISTEN_FDNAMES").ok();
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(name);
        }
        let (Some(pid), Some(count)) = (pid, count) else {
            return Ok(SystemdFds::default());
        };
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return Ok(SystemdFds::default());
        }
        let count: RawFd = count.trim().parse().map_err(|_| {
            ListenError::Activation(format!("LISTEN_FDS={count:?} is not a number"))
        })?;
        let names: Option<Vec<String>> =
            names.map(|names| names.split(':').map(str::to_owned).collect());
        if let Some(names) = &names {
            if names.len() != usize::try_from(count).unwrap_or(0) {
                return Err(ListenError::Activation(format!(
                    "LISTEN_FDS={count} but LISTEN_FDNAMES has {} names",
                    names.len()
                )));
            }
        }
        let mut fds = Vec::new();
        for index in 0..count {
            let fd = SD_LISTEN_FDS_START + index;
            // SAFETY: fcntl on an fd number has no memory-safety preconditions; an invalid fd
            // just returns an error, which we report.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            // SAFETY: as above; setting FD_CLOEXEC on an fd we own by the activation protocol.
            if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0
            {
                return Err(ListenError::Activation(format!(
                    "passed file descriptor {fd} is not open"
                )));
            }
            let name = names
                .as_ref()
                .and_then(|names| names.get(usize::try_from(index).unwrap_or(0)).cloned());
            fds.push((fd, name));
        }
        Ok(SystemdFds { fds })
    }

    /// Whether systemd passed any socket.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// The `LISTEN_FDNAMES` names of the passed sockets, in order (empty when unnamed).
    pub fn names(&self) -> Vec<String> {
        self.fds
            .iter()
            .filter_map(|(_, name)| name.clone())
            .collect()
    }

    fn by_name(&self, name: &str) -> Option<RawFd> {
        self.fds
            .iter()
            .find(|(_, fd_name)| fd_name.as_deref() == Some(name))
            .map(|(fd, _)| *fd)
    }

    fn has_names(&self) -> bool {
        self.fds.iter().any(|(_, name)| name.is_some())
    }
}

/// Opens the listener for `uri`.
///
/// `systemd_name` is this listener's name among several passed fds (edged's
/// `aziot-edged.mgmt.socket`); `mode` is applied to a socket this function binds itself.
pub fn listen(
    uri: &ListenerUri,
    systemd: &SystemdFds,
    systemd_name: Option<&str>,
    mode: u32,
) -> Result<tokio::net::UnixListener, ListenError> {
    let inherited = match uri {
        ListenerUri::FdNumber(fd) => Some(*fd),
        ListenerUri::FdName(name) => Some(
            systemd
                .by_name(name)
                .ok_or_else(|| ListenError::MissingName(name.clone()))?,
        ),
        ListenerUri::Unix(path) => match systemd.fds.as_slice() {
            [] => None,
            [(fd, _)] => Some(*fd),
            _ if !systemd.has_names() => None,
            _ => {
                let name = systemd_name.ok_or_else(|| {
                    ListenError::Activation(format!(
                        "several sockets passed and no name known for {}",
                        path.display()
                    ))
                })?;
                Some(
                    systemd
                        .by_name(name)
                        .ok_or_else(|| ListenError::MissingName(name.to_owned()))?,
                )
            }
        },
    };
    match (inherited, uri) {
        (Some(fd), _) => from_fd(fd),
        (None, ListenerUri::Unix(path)) => bind_path(path, mode),
        (None, _) => unreachable_listener(),
    }
}

fn unreachable_listener() -> Result<tokio::net::UnixListener, ListenError> {
    Err(ListenError::Activation("no socket to listen on".to_owned()))
}

fn from_fd(fd: RawFd) -> Result<tokio::net::UnixListener, ListenError> {
    let int_option = |level, name| -> Option<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut length = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).ok()?;
        // SAFETY: `value` and `length` are valid, writable and sized for a c_int option; an
        // invalid fd or a non-socket makes getsockopt fail, which we treat as "not a listener".
        let result = unsafe {
            libc::getsockopt(
                fd,
                level,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut length,
            )
        };
        (result == 0).then_some(value)
    };
    let is_unix_listener = int_option(libc::SOL_SOCKET, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && int_option(libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && int_option(libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1);
    if !is_unix_listener {
        return Err(ListenError::NotUnixListener(fd));
    }
    // SAFETY: the fd was checked above to be an open, listening AF_UNIX stream socket, and it is
    // ours by the activation protocol; nothing else in this process wraps it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    let io_error = |source| ListenError::Io {
        path: PathBuf::from(format!("fd://{fd}")),
        source,
    };
    listener.set_nonblocking(true).map_err(io_error)?;
    tokio::net::UnixListener::from_std(listener).map_err(io_error)
}

fn bind_path(path: &Path, mode: u32) -> Result<tokio::net::UnixListener, ListenError> {
    let io_error = |source| ListenError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        if !parent.exists() {
            std::fs::create_dir_all(parent).map_err(io_error)?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .map_err(io_error)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(metadata) => {
            // A live socket belongs to a running instance: refuse to steal it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::InUse(path.to_owned()));
            }
            if metadata.is_dir() {
                // An empty folder is what Docker leaves at a bind-mounted socket path that did
                // not exist yet; anything in it means the path is wrong, so it is not touched.
                std::fs::remove_dir(path).map_err(io_error)?;
            } else {
                std::fs::remove_file(path).map_err(io_error)?;
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(io_error(source)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_error)?;
    listener.set_nonblocking(true).map_err(io_error)?;
    tokio::net::UnixListener::from_std(listener).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_uris() {
        assert_eq!(
            ListenerUri::parse("unix:///run/aziot/keyd.sock").unwrap(),
            ListenerUri::Unix(PathBuf::from("/run/aziot/keyd.sock"))
        );
        assert_eq!(
            ListenerUri::parse("fd://aziot-edged.mgmt.socket").unwrap(),
            ListenerUri::FdName("aziot-edged.mgmt.socket".to_owned())
        );
        assert_eq!(
            ListenerUri::parse("fd://3").unwrap(),
            ListenerUri::FdNumber(3)
        );
        assert!(ListenerUri::parse("unix://relative.sock").is_err());
        assert!(ListenerUri::parse("http://localhost").is_err());
        assert!(ListenerUri::parse("fd://").is_err());
    }

    #[tokio::test]
    async fn binds_replacing_stale_files_and_refuses_live_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/test.sock");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"stale").unwrap();
        let uri = ListenerUri::Unix(path.clone());
        let listener = listen(&uri, &SystemdFds::default(), None, 0o660).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // A second instance must not steal the live socket.
        let error = listen(&uri, &SystemdFds::default(), None, 0o660).unwrap_err();
        assert!(matches!(error, ListenError::InUse(_)), "{error}");
        drop(listener);
        // Once the first is gone the stale socket file is replaced.
        listen(&uri, &SystemdFds::default(), None, 0o600).unwrap();
    }

    #[tokio::test]
    async fn replaces_an_empty_folder_but_never_a_populated_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("module.sock");
        std::fs::create_dir(&path).unwrap();
        let uri = ListenerUri::Unix(path.clone());
        drop(listen(&uri, &SystemdFds::default(), None, 0o660).unwrap());
        assert!(!std::fs::symlink_metadata(&path).unwrap().is_dir());

        let populated = dir.path().join("state");
        std::fs::create_dir(&populated).unwrap();
        std::fs::write(populated.join("keep"), b"data").unwrap();
        let error = listen(
            &ListenerUri::Unix(populated.clone()),
            &SystemdFds::default(),
            None,
            0o660,
        )
        .unwrap_err();
        assert!(matches!(error, ListenError::Io { .. }), "{error}");
        assert_eq!(std::fs::read(populated.join("keep")).unwrap(), b"data");
    }

    #[test]
    fn rejects_fds_that_are_not_unix_listeners() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let error = from_fd(fd).unwrap_err();
        assert!(matches!(error, ListenError::NotUnixListener(_)));
    }
}
