//! State files on disk, written the way every daemon must write them: atomically (temp file in
//! the same folder, fsync, rename, fsync of the folder), 0600 files in 0700 folders, under the
//! reference's file names so state written by the reference stays readable after an upgrade.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// The most ASCII letters and digits an ID may contain for [`reference_file_name`] to give a
/// name [`write_atomic`] can write: `<letters and digits>-<64 hex digits><extension of at most 4
/// bytes>` is 69 bytes besides the letters and digits, the temporary `.<name>.tmp-<pid>-<counter>`
/// at most 34 more, and a file name may be 255 bytes long: 255 − 34 − 69 = 152.
pub const MAX_ID_ALPHANUMERICS: usize = 152;

/// Whether `id` has few enough ASCII letters and digits for a state file of its own
/// ([`MAX_ID_ALPHANUMERICS`]).
pub fn fits_file_name(id: &str) -> bool {
    id.bytes().filter(u8::is_ascii_alphanumeric).count() <= MAX_ID_ALPHANUMERICS
}

/// The reference file name for a caller-chosen ID: the ID with everything but ASCII letters and
/// digits removed, `-`, the lowercase hex SHA-256 of the ID, then `extension` (e.g. `.key`).
/// IDs containing `/` map to flat, unique names.
pub fn reference_file_name(id: &str, extension: &str) -> String {
    use sha2::Digest as _;
    use std::fmt::Write as _;
    let mut name: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
    name.push('-');
    for byte in sha2::Sha256::digest(id.as_bytes()) {
        let _ = write!(name, "{byte:02x}");
    }
    name.push_str(extension);
    name
}

/// Creates `directory` (and its parents) if missing and gives it mode 0700.
pub fn create_private_dir(directory: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(directory)?;
    let metadata = std::fs::metadata(directory)?;
    if metadata.permissions().mode() & 0o777 != 0o700 {
        std::fs::set_permissions(directory, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Flushes a folder's entries (after a rename or removal) to disk.
pub fn sync_dir(directory: &Path) -> std::io::Result<()> {
    std::fs::File::open(directory)?.sync_all()
}

static TEMPORARY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replaces `directory/file_name` with `contents` atomically; the file ends up 0600. A reader
/// sees either the old or the new content, never a mix, and a crash leaves at most a stray
/// `.<name>.tmp-*` file.
pub fn write_atomic(directory: &Path, file_name: &str, contents: &[u8]) -> std::io::Result<()> {
    let target = directory.join(file_name);
    let temporary = directory.join(format!(
        ".{file_name}.tmp-{}-{}",
        std::process::id(),
        TEMPORARY_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &target)?;
        sync_dir(directory)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// Removes `directory/file_name` durably; `Ok(false)` when it did not exist.
pub fn remove_durable(directory: &Path, file_name: &str) -> std::io::Result<bool> {
    match std::fs::remove_file(directory.join(file_name)) {
        Ok(()) => sync_dir(directory).map(|()| true),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_longest_id_that_fits_gives_a_writable_name() {
        let id = "a".repeat(MAX_ID_ALPHANUMERICS);
        assert!(fits_file_name(&id));
        assert!(
            fits_file_name(&format!("{id}-/-.")),
            "only letters and digits count"
        );
        assert!(!fits_file_name(&format!("{id}b")));
        let dir = tempfile::tempdir().unwrap();
        // `.key` and `.cer` are the extensions the daemons use; the temporary name fits too.
        let name = reference_file_name(&id, ".cer");
        write_atomic(dir.path(), &name, b"x").unwrap();
        assert_eq!(std::fs::read(dir.path().join(&name)).unwrap(), b"x");
    }

    use super::*;

    #[test]
    fn reference_names() {
        assert_eq!(
            reference_file_name("device-id", ".key"),
            format!("deviceid-{}.key", sha256_hex(b"device-id"))
        );
        assert_ne!(
            reference_file_name("a/b", ".cer"),
            reference_file_name("ab", ".cer")
        );
        assert!(reference_file_name("aziot-edged/module/x:1:server", ".cer")
            .starts_with("aziotedgedmodulex1server-"));
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        // An independent SHA-256: the system's sha256sum.
        use std::io::Write as _;
        let mut child = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        let output = child.wait_with_output().unwrap();
        String::from_utf8(output.stdout).unwrap()[..64].to_owned()
    }

    #[test]
    fn atomic_writes_are_private_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state/keys");
        create_private_dir(&state).unwrap();
        assert_eq!(
            std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        write_atomic(&state, "a", b"one").unwrap();
        write_atomic(&state, "a", b"two").unwrap();
        assert_eq!(std::fs::read(state.join("a")).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(state.join("a"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_dir(&state).unwrap().count(),
            1,
            "no temporary file left"
        );
        assert!(remove_durable(&state, "a").unwrap());
        assert!(!remove_durable(&state, "a").unwrap());
    }
}
