//! systemd's file-descriptor store for per-module workload sockets (spec section 6.3).
//!
//! A running container's bind mount pins its workload socket's inode, so a socket re-created by a
//! restarted edged is invisible to it; the reference therefore restarts every module when edged
//! restarts. When systemd supervises edged (`NOTIFY_SOCKET` set, and the unit allows
//! `FileDescriptorStoreMax=`), edged hands each per-module listening socket to systemd
//! (`FDSTORE=1`, `FDNAME=edged-module-<name>`). After a restart systemd passes them back
//! (`LISTEN_FDNAMES`), edged serves on the very same sockets, and the modules keep running.
//! `systemctl stop` empties the store, so the next start falls back to the reference behaviour.
//!
//! Only when systemd says the store exists (`FDSTORE=<max>` in the environment, systemd 254+,
//! set from `FileDescriptorStoreMax=`) does anything here happen; otherwise edged behaves exactly
//! like the reference (modules stopped on shutdown and restarted at start).

use std::os::fd::{AsRawFd, RawFd};

/// The `FDNAME` prefix of per-module sockets.
pub const PREFIX: &str = "edged-module-";

/// Whether a service manager keeps descriptors for us: `NOTIFY_SOCKET` is set and `FDSTORE`
/// (set by systemd 254+ to the unit's `FileDescriptorStoreMax=`) is a positive number.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
        && std::env::var("FDSTORE")
            .ok()
            .and_then(|max| max.trim().parse::<u32>().ok())
            .is_some_and(|max| max > 0)
}

/// The `FDNAME` of a module's socket.
pub fn fd_name(module: &str) -> String {
    format!("{PREFIX}{module}")
}

/// The module names among passed fd names.
pub fn modules_in(names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter_map(|name| name.strip_prefix(PREFIX))
        .filter(|module| !module.is_empty())
        .map(str::to_owned)
        .collect()
}

fn send(message: &str, fd: Option<RawFd>) -> std::io::Result<()> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) => send_to(&socket, message, fd),
        None => Ok(()),
    }
}

/// Sends one notification datagram to `socket` (a path, or `@name` for an abstract socket),
/// with `fd` attached as `SCM_RIGHTS` when given.
fn send_to(socket: &std::ffi::OsStr, message: &str, fd: Option<RawFd>) -> std::io::Result<()> {
    let datagram = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = socket.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        datagram.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?;
    } else {
        datagram.connect(socket)?;
    }
    let Some(fd) = fd else {
        datagram.send(message.as_bytes())?;
        return Ok(());
    };
    let mut iov = libc::iovec {
        iov_base: message.as_ptr() as *mut libc::c_void,
        iov_len: message.len(),
    };
    // u64 elements keep the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; 8];
    let fd_size = u32::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_size) } as usize;
    if space > std::mem::size_of_val(&control) {
        return Err(std::io::Error::other("control buffer too small"));
    }
    // SAFETY: msghdr is plain data; every field used is set below.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = space as _;
    // SAFETY: the header points at a control buffer of `space` bytes, enough for one cmsghdr
    // carrying one int; CMSG_FIRSTHDR therefore returns a valid, aligned pointer into it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&header);
        if cmsg.is_null() {
            return Err(std::io::Error::other("no room for the control message"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_size) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
    }
    // SAFETY: the header, its iovec and its control buffer are valid for the call.
    let sent = unsafe { libc::sendmsg(datagram.as_raw_fd(), &header, 0) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Hands a listening socket to the service manager under `name` (replacing an older one).
pub fn store(name: &str, fd: RawFd) {
    if !enabled() {
        return;
    }
    let result = send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None)
        .and_then(|()| send(&format!("FDSTORE=1\nFDNAME={name}"), Some(fd)));
    if let Err(error) = result {
        log::warn!("could not store socket {name} with systemd: {error}");
    }
}

/// Drops the socket stored under `name` from the service manager's store.
pub fn remove(name: &str) {
    if !enabled() {
        return;
    }
    if let Err(error) = send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None) {
        log::warn!("could not remove socket {name} from systemd: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(fd_name("edgeHub"), "edged-module-edgeHub");
        let names = vec![
            "aziot-edged.mgmt.socket".to_owned(),
            "edged-module-edgeHub".to_owned(),
            "edged-module-".to_owned(),
            "edged-module-m.1".to_owned(),
        ];
        assert_eq!(
            modules_in(&names),
            vec!["edgeHub".to_owned(), "m.1".to_owned()]
        );
    }

    #[test]
    fn passes_a_descriptor_over_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let receiver = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        send_to(
            path.as_os_str(),
            "FDSTORE=1\nFDNAME=edged-module-x",
            Some(file.as_raw_fd()),
        )
        .unwrap();
        let mut buffer = [0u8; 128];
        let length = receiver.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..length], b"FDSTORE=1\nFDNAME=edged-module-x");
    }
}
