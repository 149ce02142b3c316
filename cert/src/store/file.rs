//! The file cert store: one file per cert under `<homedir>/certs/`, in the reference layout so
//! cert stores written by the reference keep working after an upgrade.
//!
//! File name: the ID with everything but ASCII letters and digits removed, `-`, the lowercase hex
//! SHA-256 of the ID, `.cer`. IDs containing `/` (module certs) therefore map to a flat, unique
//! name. Content: the PEM exactly as stored. Writes are atomic (temp file in the same folder,
//! fsync, rename, fsync of the folder); files are 0600 in a 0700 folder.

use std::path::{Path, PathBuf};

use config_common::files;

use super::{CertStore, StoreError};

/// Certs in files under one folder.
#[derive(Debug)]
pub struct FileStore {
    directory: PathBuf,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl FileStore {
    /// Opens (creating it 0700 if missing) `<homedir>/certs`.
    pub fn open(homedir: &Path) -> Result<Self, StoreError> {
        let directory = homedir.join("certs");
        files::create_private_dir(&directory).map_err(io_error(&directory))?;
        Ok(FileStore { directory })
    }

    /// The file that holds cert `id`.
    pub fn path_for(&self, id: &str) -> PathBuf {
        self.directory.join(file_name(id))
    }
}

/// The reference file name of cert `id`.
pub fn file_name(id: &str) -> String {
    files::reference_file_name(id, ".cer")
}

impl CertStore for FileStore {
    fn load(&self, id: &str) -> Result<Option<String>, StoreError> {
        let path = self.path_for(id);
        match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8(bytes)
                .map(Some)
                .map_err(|_| StoreError::NotText { id: id.to_owned() }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(io_error(&path)(source)),
        }
    }

    fn store(&self, id: &str, pem: &str) -> Result<(), StoreError> {
        files::write_atomic(&self.directory, &file_name(id), pem.as_bytes())
            .map_err(io_error(&self.path_for(id)))
    }

    fn delete(&self, id: &str) -> Result<(), StoreError> {
        files::remove_durable(&self.directory, &file_name(id))
            .map(drop)
            .map_err(io_error(&self.path_for(id)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    #[test]
    fn reference_file_names() {
        // The reference names the file for "device-id" like this (sha256 of "device-id").
        assert_eq!(
            file_name("device-id"),
            format!("deviceid-{}.cer", hex(&openssl::sha::sha256(b"device-id")))
        );
        let module = file_name("aziot-edged/module/edgeHub:1:server");
        assert!(
            module.starts_with("aziotedgedmoduleedgeHub1server-"),
            "{module}"
        );
        assert!(!module.contains('/'));
        assert_ne!(file_name("a/b"), file_name("ab"));
        assert_eq!(file_name("x").len(), "x-".len() + 64 + ".cer".len());
    }

    #[test]
    fn round_trip_modes_and_delete() {
        let home = tempfile::tempdir().unwrap();
        let store = FileStore::open(home.path()).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&home.path().join("certs")), 0o700);

        assert_eq!(store.load("a/b").unwrap(), None);
        store.store("a/b", "PEM 1").unwrap();
        store.store("a/b", "PEM 2").unwrap();
        assert_eq!(store.load("a/b").unwrap().as_deref(), Some("PEM 2"));
        assert_eq!(mode(&store.path_for("a/b")), 0o600);
        // No temporary files are left behind.
        let entries = std::fs::read_dir(home.path().join("certs"))
            .unwrap()
            .count();
        assert_eq!(entries, 1);

        store.delete("a/b").unwrap();
        store.delete("a/b").unwrap();
        assert_eq!(store.load("a/b").unwrap(), None);
    }

    #[test]
    fn reads_a_reference_layout_store() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join("certs")).unwrap();
        let name = format!(
            "aziotedgedca-{}.cer",
            hex(&openssl::sha::sha256(b"aziot-edged-ca"))
        );
        std::fs::write(home.path().join("certs").join(name), "reference pem").unwrap();
        let store = FileStore::open(home.path()).unwrap();
        assert_eq!(
            store.load("aziot-edged-ca").unwrap().as_deref(),
            Some("reference pem")
        );
    }
}
