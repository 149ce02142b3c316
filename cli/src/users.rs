//! Service users: uid lookup by name (through NSS, `getpwnam_r`) and file ownership.
//!
//! Principals need real uids, so a missing user is an error unless the operator names its uid
//! (`--uid name=N`). Ownership is best effort: when a service user does not exist (a test
//! machine, a container without the packages' sysusers), the file keeps its current owner and
//! the caller reports that; a machine is never failed over ownership.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::Path;

/// keyd's service user.
pub const KEYD_USER: &str = "aziotks";
/// certd's service user.
pub const CERTD_USER: &str = "aziotcs";
/// identityd's service user.
pub const IDENTITYD_USER: &str = "aziotid";
/// edged's service user.
pub const EDGED_USER: &str = "iotedge";

/// A user's uid and primary gid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Account {
    /// The uid.
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
}

/// Looks a user up by name; `None` when it does not exist (or the lookup failed).
pub fn lookup(name: &str) -> Option<Account> {
    let name = CString::new(name).ok()?;
    let mut buffer = vec![0u8; 16 * 1024];
    // SAFETY: `passwd` is plain old data; zeroed is a valid (unused) value that getpwnam_r
    // overwrites before we read it.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the call: `name` is NUL-terminated, `buffer` is
    // writable for its length, and `entry`/`result` are live locals.
    let status = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            &mut result,
        )
    };
    if status != 0 || result.is_null() {
        return None;
    }
    Some(Account {
        uid: entry.pw_uid,
        gid: entry.pw_gid,
    })
}

/// Resolves the uids written into principals: `--uid name=N` overrides first, then the system.
#[derive(Clone, Debug, Default)]
pub struct UidResolver {
    overrides: BTreeMap<String, u32>,
}

impl UidResolver {
    /// A resolver with these overrides.
    pub fn new(overrides: BTreeMap<String, u32>) -> Self {
        UidResolver { overrides }
    }

    /// The uid of `name`, or `None` when neither an override nor the system knows it.
    pub fn uid(&self, name: &str) -> Option<u32> {
        self.overrides
            .get(name)
            .copied()
            .or_else(|| lookup(name).map(|account| account.uid))
    }
}

/// What happened to a file's ownership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// Now owned by the user.
    Changed,
    /// Already owned by the user.
    Unchanged,
    /// The user does not exist; the file keeps its owner.
    NoSuchUser,
    /// The change was refused (not root); the file keeps its owner.
    NotPermitted,
}

/// Gives `path` to `user` (uid and primary group) when that user exists.
pub fn give_to(path: &Path, user: &str) -> std::io::Result<Ownership> {
    use std::os::unix::fs::MetadataExt as _;
    let Some(account) = lookup(user) else {
        return Ok(Ownership::NoSuchUser);
    };
    let metadata = std::fs::symlink_metadata(path)?;
    if metadata.uid() == account.uid && metadata.gid() == account.gid {
        return Ok(Ownership::Unchanged);
    }
    match std::os::unix::fs::chown(path, Some(account.uid), Some(account.gid)) {
        Ok(()) => Ok(Ownership::Changed),
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            Ok(Ownership::NotPermitted)
        }
        Err(error) => Err(error),
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_nonsense_does_not() {
        assert_eq!(lookup("root").map(|account| account.uid), Some(0));
        assert_eq!(lookup("no-such-user-for-iotedge-tests"), None);
        let resolver = UidResolver::new(BTreeMap::from([("aziotks".to_owned(), 4242)]));
        assert_eq!(resolver.uid("aziotks"), Some(4242));
        assert_eq!(resolver.uid("root"), Some(0));
    }
}
