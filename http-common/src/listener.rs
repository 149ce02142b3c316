//! Listening sockets: `unix:///path` (bound here, or inherited from systemd) and `fd://name` /
//! `fd://N` (inherited), following `sd_listen_fds` semantics.
//!
//! A `unix://` listener takes a passed fd only when that fd is its socket: bound at the very
//! path (the same socket file), or carrying the listener's systemd name (the caller's
//! `systemd_name`: a daemon's own socket unit, whose `ListenStream=` may have been moved).
//! Otherwise it binds its path, removing only a stale socket or an empty directory there. Each
//! passed fd is handed out at most once.
//!
//! [`SystemdFds::take`] must run before any thread is started (it reads and clears the
//! `LISTEN_*` environment variables so children do not inherit them).

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
    /// Two listeners asked for the same passed fd.
    #[error("file descriptor {0} is already used by another listener")]
    AlreadyTaken(RawFd),
    /// Another process is already serving on the path.
    #[error("another process is already listening on {}", .0.display())]
    InUse(PathBuf),
    /// Something other than a stale socket or an empty directory is at the socket path; it was
    /// left untouched.
    #[error(
        "will not listen on {}: it is {what}, and only a stale socket or an empty directory is \
         replaced (remove it or fix the socket path)",
        path.display()
    )]
    Occupied {
        /// The socket path.
        path: PathBuf,
        /// What is there ("a regular file", "a symbolic link", ...).
        what: &'static str,
    },
    /// A missing parent directory of the socket could not be created.
    #[error("could not create {}, the directory of socket {}", dir.display(), path.display())]
    Parent {
        /// The directory.
        dir: PathBuf,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
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

/// The sockets systemd passed to this process (possibly none), and which of them a listener
/// has taken already.
#[derive(Debug, Default)]
pub struct SystemdFds {
    fds: Vec<(RawFd, Option<String>)>,
    /// The name this daemon's own socket unit gives its fd (`aziot-keyd.socket`).
    unit_name: Option<String>,
    /// The fds handed to a listener (each may be owned by one listener only).
    taken: Mutex<Vec<RawFd>>,
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
        Ok(SystemdFds::passed(fds))
    }

    /// Sockets passed some other way than `LISTEN_*` (another supervisor, tests): each open fd
    /// with its name, `None` for an unnamed one. A listener that takes an fd owns it from then
    /// on (it closes it when dropped).
    pub fn passed(fds: Vec<(RawFd, Option<String>)>) -> Self {
        SystemdFds {
            fds,
            unit_name: None,
            taken: Mutex::new(Vec::new()),
        }
    }

    /// Records the name systemd gives this daemon's own socket unit's fd (the unit's
    /// `FileDescriptorName=`, by default the unit name, e.g. `aziot-keyd.socket`).
    pub fn with_unit_name(mut self, name: impl Into<String>) -> Self {
        self.unit_name = Some(name.into());
        self
    }

    /// The name set by [`SystemdFds::with_unit_name`].
    pub fn unit_name(&self) -> Option<&str> {
        self.unit_name.as_deref()
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

    fn taken(&self) -> std::sync::MutexGuard<'_, Vec<RawFd>> {
        self.taken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks `fd` as owned by a listener; an fd already handed out is refused.
    fn claim(&self, fd: RawFd) -> Result<(), ListenError> {
        let mut taken = self.taken();
        if taken.contains(&fd) {
            return Err(ListenError::AlreadyTaken(fd));
        }
        taken.push(fd);
        Ok(())
    }

    fn by_name(&self, name: &str) -> Option<RawFd> {
        self.fds
            .iter()
            .find(|(_, fd_name)| fd_name.as_deref() == Some(name))
            .map(|(fd, _)| *fd)
    }

    /// The passed fd a `unix://path` listener named `name` is to use: one bound at `path`, else
    /// one named `name`; fds other listeners took are skipped.
    fn for_path(&self, path: &Path, name: Option<&str>) -> Option<RawFd> {
        let taken = self.taken();
        let free = || self.fds.iter().filter(|(fd, _)| !taken.contains(fd));
        free()
            .find(|(fd, _)| bound_path(*fd).is_some_and(|bound| same_socket(&bound, path)))
            .or_else(|| {
                let name = name?;
                free().find(|(_, fd_name)| fd_name.as_deref() == Some(name))
            })
            .map(|(fd, _)| *fd)
    }
}

/// Opens the listener for `uri`.
///
/// For `unix:///path`, a passed fd is used when it is bound at `path` (the same socket file) or,
/// failing that, when its `LISTEN_FDNAMES` entry is `systemd_name` (a daemon's own socket unit,
/// `aziot-keyd.socket`); otherwise the path is bound here, with `mode`. `fd://name` and
/// `fd://N` always use the passed fd. A passed fd is handed to one listener only.
pub fn listen(
    uri: &ListenerUri,
    systemd: &SystemdFds,
    systemd_name: Option<&str>,
    mode: u32,
) -> Result<tokio::net::UnixListener, ListenError> {
    let fd = match uri {
        ListenerUri::FdNumber(fd) => *fd,
        ListenerUri::FdName(name) => systemd
            .by_name(name)
            .ok_or_else(|| ListenError::MissingName(name.clone()))?,
        ListenerUri::Unix(path) => match systemd.for_path(path, systemd_name) {
            Some(fd) => fd,
            None => return bind_path(path, mode),
        },
    };
    systemd.claim(fd)?;
    from_fd(fd)
}

/// The path an fd's Unix socket is bound to, if it is one bound to a path.
fn bound_path(fd: RawFd) -> Option<PathBuf> {
    // SAFETY: the fd is open (checked when it was passed) and stays open: `ManuallyDrop` keeps
    // this temporary wrapper from closing it; it is used only for getsockname, which fails
    // harmlessly on an fd that is not a Unix socket.
    let socket =
        std::mem::ManuallyDrop::new(unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) });
    socket.local_addr().ok()?.as_pathname().map(Path::to_owned)
}

/// Whether the socket bound at `bound` is the one at `path`: the same path, or the same socket
/// file reached another way (`/var/run` is usually a link to `/run`, and systemd rewrites
/// `ListenStream=/var/run/...` to `/run/...`).
fn same_socket(bound: &Path, path: &Path) -> bool {
    if bound == path {
        return true;
    }
    match (std::fs::metadata(bound), std::fs::metadata(path)) {
        (Ok(bound), Ok(path)) => {
            bound.file_type().is_socket() && bound.dev() == path.dev() && bound.ino() == path.ino()
        }
        _ => false,
    }
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
    // ours by the activation protocol; `SystemdFds::claim` made sure no other listener in this
    // process wraps it.
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
    create_parents(path)?;
    clear_path(path)?;
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(io_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_error)?;
    listener.set_nonblocking(true).map_err(io_error)?;
    tokio::net::UnixListener::from_std(listener).map_err(io_error)
}

/// Creates the socket's missing parent directories, each mode 0755 whatever the umask.
fn create_parents(path: &Path) -> Result<(), ListenError> {
    let mut missing = Vec::new();
    for dir in path.ancestors().skip(1) {
        match std::fs::metadata(dir) {
            Ok(_) => break,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => missing.push(dir),
            // Not searchable, or a path component is a file: bind reports it.
            Err(_) => break,
        }
    }
    for dir in missing.into_iter().rev() {
        let parent_error = |source| ListenError::Parent {
            dir: dir.to_owned(),
            path: path.to_owned(),
            source,
        };
        match std::fs::DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(parent_error)?,
            // Created meanwhile by someone else: theirs, left as it is.
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(parent_error(error)),
        }
    }
    Ok(())
}

/// Makes room for the socket: removes a stale socket (nobody accepts on it) or an empty
/// directory (what Docker leaves at a bind-mounted socket path that did not exist yet). Anything
/// else is refused and left in place. `lstat` is used throughout: a symbolic link is never
/// followed, so nothing outside the path itself can be removed.
fn clear_path(path: &Path) -> Result<(), ListenError> {
    let io_error = |source| ListenError::Io {
        path: path.to_owned(),
        source,
    };
    let occupied = |what| ListenError::Occupied {
        path: path.to_owned(),
        what,
    };
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(io_error(source)),
    };
    let file_type = metadata.file_type();
    if file_type.is_dir() {
        // rmdir removes only an empty directory, and never follows a link put there meanwhile.
        return match std::fs::remove_dir(path) {
            Ok(()) => Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::ENOTEMPTY) => {
                Err(occupied("a directory that is not empty"))
            }
            Err(source) => Err(io_error(source)),
        };
    }
    if !file_type.is_socket() {
        return Err(occupied(if file_type.is_symlink() {
            "a symbolic link"
        } else if file_type.is_file() {
            "a regular file"
        } else if file_type.is_block_device() || file_type.is_char_device() {
            "a device"
        } else if file_type.is_fifo() {
            "a FIFO"
        } else {
            "not a socket"
        }));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        // A live socket belongs to a running instance: refuse to steal it.
        Ok(_) => return Err(ListenError::InUse(path.to_owned())),
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {}
        // Not allowed to connect, or anything else: it cannot be shown to be stale.
        Err(source) => return Err(io_error(source)),
    }
    // Remove it only if it is still the socket just found stale.
    match std::fs::symlink_metadata(path) {
        Ok(now) if now.dev() == metadata.dev() && now.ino() == metadata.ino() => {
            std::fs::remove_file(path).map_err(io_error)
        }
        Ok(_) => Err(occupied("a file that changed while it was checked")),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(io_error(source)),
    }
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

    #[test]
    fn rejects_fds_that_are_not_unix_listeners() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let error = from_fd(fd).unwrap_err();
        assert!(matches!(error, ListenError::NotUnixListener(_)));
    }
}
