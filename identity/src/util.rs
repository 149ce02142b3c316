//! Small helpers shared by the modules: hashing, host names, atomic file writes.

use std::path::Path;

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(sha256(bytes).as_ref())
}

/// SHA-256.
pub fn sha256(bytes: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, bytes)
}

/// Splits `host` or `host:port` (IPv6 as `[::1]:port`) into host and port (default 443).
/// `None` when it is not a plausible authority.
pub fn split_authority(authority: &str) -> Option<(String, u16)> {
    if authority.is_empty()
        || authority
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | '?' | '#' | '@'))
    {
        return None;
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => 443,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(':') => {
            Some((host.to_owned(), port.parse().ok()?))
        }
        Some(_) => None,
        None => Some((authority.to_owned(), 443)),
    }
}

/// Writes `contents` to `path` atomically (temp file in the same folder, fsync, rename, fsync
/// of the folder), mode 0600 — config-common's one implementation.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let directory = path
        .parent()
        .ok_or_else(|| std::io::Error::other("path has no parent folder"))?;
    let file_name = path
        .file_name()
        .and_then(|name| name.to_str())
        .ok_or_else(|| std::io::Error::other("path has no UTF-8 file name"))?;
    config_common::files::write_atomic(directory, file_name, contents)
}

/// Creates `path` (and parents) as a 0700 folder.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    config_common::files::create_private_dir(path)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |duration| duration.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        let cases = [
            ("hub.net", Some(("hub.net", 443))),
            ("localhost:8443", Some(("localhost", 8443))),
            ("[::1]:9", Some(("::1", 9))),
            ("127.0.0.1:1", Some(("127.0.0.1", 1))),
            ("h:x", None),
            ("", None),
            ("a/b", None),
            ("::1", None),
        ];
        for (input, expected) in cases {
            assert_eq!(
                split_authority(input),
                expected.map(|(h, p)| (h.to_owned(), p)),
                "{input}"
            );
        }
    }

    #[test]
    fn atomic_writes_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
