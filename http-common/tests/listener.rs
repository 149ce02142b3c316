//! `listener::listen` with real sockets in temporary folders.
//!
//! Socket paths: only a stale socket or an empty directory at a `unix://` path is replaced;
//! anything else is a startup error naming the path, and it is left exactly as it was.
//!
//! Passed fds (built with `SystemdFds::passed`, as systemd passes them): a `unix://` listener
//! takes an fd bound at its path, or one carrying its systemd name; otherwise it binds its own
//! path; a passed fd is never handed to two listeners.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

use std::os::fd::{IntoRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use http_common::listener::{listen, ListenError, ListenerUri, SystemdFds};

const MGMT: &str = "aziot-edged.mgmt.socket";
const WORKLOAD: &str = "aziot-edged.workload.socket";

fn unix(path: &Path) -> ListenerUri {
    ListenerUri::Unix(path.to_owned())
}

/// Listens at `path` with no passed fds.
fn bind(path: &Path) -> Result<tokio::net::UnixListener, ListenError> {
    listen(&unix(path), &SystemdFds::default(), None, 0o660)
}

/// A listening socket bound at `path`, as an fd handed over like systemd hands its sockets.
fn passed_socket(path: &Path) -> RawFd {
    UnixListener::bind(path).unwrap().into_raw_fd()
}

/// The path the listener is bound to.
fn bound(listener: &tokio::net::UnixListener) -> PathBuf {
    listener
        .local_addr()
        .unwrap()
        .as_pathname()
        .unwrap()
        .to_owned()
}

/// The error and its whole cause chain as one line.
fn chain(error: &ListenError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Asserts that listening at `path` fails with an error naming it.
fn assert_refused(path: &Path, expected: &str) {
    let error = bind(path).expect_err("listening must be refused");
    let text = chain(&error);
    assert!(
        text.contains(&path.display().to_string()),
        "the error does not name the path: {text}"
    );
    assert!(text.contains(expected), "{text}");
}

#[tokio::test]
async fn a_regular_file_at_the_socket_path_is_an_error_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyd.sock");
    std::fs::write(&path, b"not a socket: a typo in [endpoints]").unwrap();
    assert_refused(&path, "a regular file");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"not a socket: a typo in [endpoints]"
    );
}

#[tokio::test]
async fn a_symbolic_link_at_the_socket_path_is_an_error_and_neither_it_nor_its_target_changes() {
    let dir = tempfile::tempdir().unwrap();
    // A link to a file, a link to an empty folder, a link to a stale socket, a dangling link.
    let file = dir.path().join("data");
    std::fs::write(&file, b"precious").unwrap();
    let folder = dir.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let missing = dir.path().join("missing");
    for (index, target) in [&file, &folder, &stale, &missing].into_iter().enumerate() {
        let link = dir.path().join(format!("link{index}.sock"));
        std::os::unix::fs::symlink(target, &link).unwrap();
        assert_refused(&link, "a symbolic link");
        assert_eq!(&std::fs::read_link(&link).unwrap(), target, "{link:?}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    assert!(folder.is_dir());
    assert!(std::fs::symlink_metadata(&stale).is_ok());
}

#[tokio::test]
async fn a_folder_with_anything_in_it_is_an_error_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state");
    std::fs::create_dir(&path).unwrap();
    std::fs::write(path.join("keep"), b"data").unwrap();
    assert_refused(&path, "a directory that is not empty");
    assert_eq!(std::fs::read(path.join("keep")).unwrap(), b"data");
}

#[tokio::test]
async fn a_device_at_the_socket_path_is_an_error() {
    // A device node cannot be made without privileges; a FIFO is the same kind of case
    // (a special file that is not a socket) and must equally be left alone.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fifo.sock");
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a valid NUL-terminated path; no memory is shared.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    assert_refused(&path, "a FIFO");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &std::fs::symlink_metadata(&path).unwrap().file_type()
    ));
}

#[tokio::test]
async fn a_live_socket_is_an_error_and_keeps_answering() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.sock");
    let live = UnixListener::bind(&path).unwrap();
    assert_refused(&path, "already listening");
    UnixStream::connect(&path).expect("the live socket still answers");
    drop(live);
}

#[tokio::test]
async fn a_stale_socket_and_an_empty_folder_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(UnixStream::connect(&stale).is_err());
    let listener = bind(&stale).unwrap();
    UnixStream::connect(&stale).expect("the new socket answers");
    let mode = std::fs::metadata(&stale).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    drop(listener);

    let folder = dir.path().join("module.sock");
    std::fs::create_dir(&folder).unwrap();
    let _listener = bind(&folder).unwrap();
    UnixStream::connect(&folder).expect("the new socket answers");
}

#[tokio::test]
async fn missing_parent_folders_are_created_0755_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/aziot/nested/keyd.sock");
    // SAFETY: umask only swaps the process file-creation mask; no memory is involved. Other
    // tests in this binary set explicit modes, so a short-lived restrictive mask is harmless.
    let old = unsafe { libc::umask(0o077) };
    let result = bind(&path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let _listener = result.unwrap();
    for folder in ["run", "run/aziot", "run/aziot/nested"] {
        let mode = std::fs::metadata(dir.path().join(folder))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o755, "{folder}");
    }
}

#[tokio::test]
async fn without_passed_fds_a_unix_listener_binds_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyd.sock");
    let listener = bind(&path).unwrap();
    assert_eq!(bound(&listener), path);
}

#[tokio::test]
async fn one_fd_named_for_the_listener_is_taken_wherever_it_is_bound() {
    // keyd under systemd: its unit's fd (`aziot-keyd.socket`), ListenStream= moved elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let unit_path = dir.path().join("unit.sock");
    let configured = dir.path().join("configured.sock");
    let fd = passed_socket(&unit_path);
    let systemd = SystemdFds::passed(vec![(fd, Some("aziot-keyd.socket".to_owned()))]);
    let listener = listen(
        &unix(&configured),
        &systemd,
        Some("aziot-keyd.socket"),
        0o660,
    )
    .unwrap();
    assert_eq!(bound(&listener), unit_path);
    assert!(!configured.exists());
}

#[tokio::test]
async fn one_fd_named_for_another_listener_is_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let mgmt_path = dir.path().join("mgmt.sock");
    let custom = dir.path().join("custom/workload.sock");
    let fd = passed_socket(&mgmt_path);
    let systemd = SystemdFds::passed(vec![(fd, Some(MGMT.to_owned()))]);
    let workload = listen(&unix(&custom), &systemd, Some(WORKLOAD), 0o666).unwrap();
    assert_eq!(bound(&workload), custom);
    // The management fd is still there for its own listener.
    let management = listen(&ListenerUri::FdName(MGMT.to_owned()), &systemd, None, 0o660).unwrap();
    assert_eq!(bound(&management), mgmt_path);
}

#[tokio::test]
async fn a_named_fd_bound_at_the_listeners_path_is_taken_whatever_its_name() {
    // edged configured with `unix://` paths under systemd with both socket units: the fds carry
    // the units' names, the listener asks for none.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mgmt.sock");
    let other = passed_socket(&dir.path().join("workload.sock"));
    let fd = passed_socket(&path);
    let systemd = SystemdFds::passed(vec![
        (other, Some(WORKLOAD.to_owned())),
        (fd, Some(MGMT.to_owned())),
    ]);
    let listener = listen(&unix(&path), &systemd, None, 0o660).unwrap();
    assert_eq!(bound(&listener), path);
    // It is the passed socket (not a new one bound over it): the fd is now the listener's.
    assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&listener), fd);
}

#[tokio::test]
async fn with_both_named_fds_each_listener_takes_its_own_and_a_custom_path_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mgmt_path = dir.path().join("mgmt.sock");
    let workload_path = dir.path().join("workload.sock");
    let both = || {
        SystemdFds::passed(vec![
            (passed_socket(&workload_path), Some(WORKLOAD.to_owned())),
            (passed_socket(&mgmt_path), Some(MGMT.to_owned())),
        ])
    };

    // By name.
    let systemd = both();
    let management = listen(&unix(&mgmt_path), &systemd, Some(MGMT), 0o660).unwrap();
    let workload = listen(&unix(&workload_path), &systemd, Some(WORKLOAD), 0o666).unwrap();
    assert_eq!(bound(&management), mgmt_path);
    assert_eq!(bound(&workload), workload_path);
    drop((management, workload));
    std::fs::remove_file(&mgmt_path).unwrap();
    std::fs::remove_file(&workload_path).unwrap();

    // As edged listens: `unix://` by path only. The unit's workload socket is not served for a
    // custom workload path, which edged binds itself.
    let systemd = both();
    let custom = dir.path().join("custom/workload.sock");
    let management = listen(&unix(&mgmt_path), &systemd, None, 0o660).unwrap();
    let workload = listen(&unix(&custom), &systemd, None, 0o666).unwrap();
    assert_eq!(bound(&management), mgmt_path);
    assert_eq!(bound(&workload), custom);
    UnixStream::connect(&custom).expect("the custom workload socket answers");
}

#[tokio::test]
async fn one_unnamed_fd_bound_at_the_listeners_path_is_taken() {
    // `systemd-socket-activate -l PATH` without --fdname.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyd.sock");
    let fd = passed_socket(&path);
    let systemd = SystemdFds::passed(vec![(fd, None)]);
    let listener = listen(&unix(&path), &systemd, Some("aziot-keyd.socket"), 0o660).unwrap();
    assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&listener), fd);
}

#[tokio::test]
async fn one_unnamed_fd_bound_elsewhere_is_not_taken() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = dir.path().join("elsewhere.sock");
    let configured = dir.path().join("keyd.sock");
    let systemd = SystemdFds::passed(vec![(passed_socket(&elsewhere), None)]);
    let listener = listen(
        &unix(&configured),
        &systemd,
        Some("aziot-keyd.socket"),
        0o660,
    )
    .unwrap();
    assert_eq!(bound(&listener), configured);
}

#[tokio::test]
async fn an_unnamed_fd_is_found_through_a_linked_folder() {
    // systemd rewrites ListenStream=/var/run/x.sock to /run/x.sock; /var/run links to /run.
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    let var_run = dir.path().join("var-run");
    std::os::unix::fs::symlink(&run, &var_run).unwrap();
    let mgmt = passed_socket(&run.join("mgmt.sock"));
    let workload = passed_socket(&run.join("workload.sock"));
    let systemd = SystemdFds::passed(vec![(mgmt, None), (workload, None)]);
    let listener = listen(&unix(&var_run.join("workload.sock")), &systemd, None, 0o666).unwrap();
    assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&listener), workload);
}

/// The reference config set `socket-activated-one-custom`: the management socket comes from
/// systemd (`fd://aziot-edged.mgmt.socket`, the only fd passed) and the workload socket is a
/// custom `unix://` path. The one fd must not be handed to the workload listener too (before,
/// it was wrapped twice and the second registration failed with "File exists").
#[tokio::test]
async fn socket_activated_one_custom_binds_the_custom_workload_path() {
    let dir = tempfile::tempdir().unwrap();
    let mgmt_path = dir.path().join("mgmt.sock");
    let custom = dir.path().join("custom/workload.sock");
    let fd = passed_socket(&mgmt_path);
    let systemd = SystemdFds::passed(vec![(fd, Some(MGMT.to_owned()))]);
    let management = listen(&ListenerUri::FdName(MGMT.to_owned()), &systemd, None, 0o660).unwrap();
    let workload = listen(&unix(&custom), &systemd, None, 0o666).unwrap();
    assert_eq!(std::os::fd::AsRawFd::as_raw_fd(&management), fd);
    assert_eq!(bound(&workload), custom);
    UnixStream::connect(&custom).expect("the custom workload socket answers");
    UnixStream::connect(&mgmt_path).expect("the management socket answers");
}

#[tokio::test]
async fn a_passed_fd_goes_to_one_listener_only() {
    let dir = tempfile::tempdir().unwrap();
    let fd = passed_socket(&dir.path().join("mgmt.sock"));
    let systemd = SystemdFds::passed(vec![(fd, Some(MGMT.to_owned()))]);
    let _first = listen(&ListenerUri::FdName(MGMT.to_owned()), &systemd, None, 0o660).unwrap();
    for uri in [
        ListenerUri::FdName(MGMT.to_owned()),
        ListenerUri::FdNumber(fd),
    ] {
        let error = listen(&uri, &systemd, None, 0o660).unwrap_err();
        assert!(
            matches!(error, ListenError::AlreadyTaken(taken) if taken == fd),
            "{error}"
        );
    }
    let error = listen(
        &ListenerUri::FdName(WORKLOAD.to_owned()),
        &systemd,
        None,
        0o660,
    )
    .unwrap_err();
    assert!(matches!(error, ListenError::MissingName(_)), "{error}");
}
