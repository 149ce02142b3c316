//! The file key store: one file per key under `<homedir>/keys/`, in the reference layout so keys
//! created by the reference keep working after an upgrade.
//!
//! File name: the ID with everything but ASCII letters and digits removed, `-`, the lowercase hex
//! SHA-256 of the ID, `.key`. Content decides the kind: a PEM private key is a key pair, anything
//! else is the raw bytes of a symmetric key. Writes are atomic (temp file, fsync, rename, fsync of
//! the folder); files are 0600 in a 0700 folder.

use std::path::{Path, PathBuf};

use config_common::files;
use std::sync::Arc;

use openssl::pkey::PKey;

use crate::crypto::{MemoryKey, MemoryKeyPair};
use crate::store::{KeyAlgorithm, KeyKind, KeyStore, StoreError, StoredKey, Usage};

/// Keys in files under one folder.
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
    /// Opens (creating it 0700 if missing) `<homedir>/keys`.
    pub fn open(homedir: &Path) -> Result<Self, StoreError> {
        let directory = homedir.join("keys");
        files::create_private_dir(&directory).map_err(io_error(&directory))?;
        Ok(FileStore { directory })
    }

    /// The file that holds key `id`.
    pub fn path_for(&self, id: &str) -> PathBuf {
        self.directory.join(file_name(id))
    }

    /// Writes `contents` to the file of `id` atomically with mode 0600.
    fn write(&self, id: &str, contents: &[u8]) -> Result<(), StoreError> {
        files::write_atomic(&self.directory, &file_name(id), contents)
            .map_err(io_error(&self.path_for(id)))
    }

    /// Moves an unparsable file aside (`<name>.corrupt-<unix seconds>`) before a create replaces it.
    fn set_aside_corrupt(&self, id: &str) -> Result<(), StoreError> {
        let path = self.path_for(id);
        if !path.exists() {
            return Ok(());
        }
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let mut aside = path.clone().into_os_string();
        aside.push(format!(".corrupt-{seconds}"));
        log::warn!(
            "key {id:?}: unreadable file {} moved to {}",
            path.display(),
            Path::new(&aside).display()
        );
        std::fs::rename(&path, &aside).map_err(io_error(&path))
    }
}

/// The reference file name of key `id`.
pub fn file_name(id: &str) -> String {
    files::reference_file_name(id, ".key")
}

/// Reads a key file: a PEM private key is a key pair, other non-empty content a symmetric key.
/// `Ok(None)` when the file does not exist.
pub fn load_file(path: &Path, id: &str) -> Result<Option<StoredKey>, StoreError> {
    let contents = match std::fs::read(path) {
        Ok(contents) => contents,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error(path)(source)),
    };
    parse_key(&contents, id).map(Some)
}

fn parse_key(contents: &[u8], id: &str) -> Result<StoredKey, StoreError> {
    let unreadable = || StoreError::Unreadable { id: id.to_owned() };
    if contents.is_empty() {
        return Err(unreadable());
    }
    let trimmed = contents.trim_ascii_start();
    if trimmed.starts_with(b"-----BEGIN") {
        // PKCS#8, traditional RSA and SEC1 EC PEM are all accepted here.
        let private = PKey::private_key_from_pem(trimmed).map_err(|_| unreadable())?;
        let pair = MemoryKeyPair::new(private).map_err(|_| unreadable())?;
        return Ok(StoredKey::Pair(Arc::new(pair)));
    }
    Ok(StoredKey::Symmetric(Arc::new(MemoryKey::new(
        contents.to_vec(),
    )?)))
}

impl KeyStore for FileStore {
    fn name(&self) -> &'static str {
        "file"
    }

    fn load(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        load_file(&self.path_for(id), id)
    }

    fn generate_key(&self, id: &str, _usage: Usage) -> Result<StoredKey, StoreError> {
        let mut bytes = vec![0_u8; 32];
        crate::crypto::random_bytes(&mut bytes)?;
        self.set_aside_corrupt(id)?;
        self.write(id, &bytes)?;
        Ok(StoredKey::Symmetric(Arc::new(MemoryKey::new(bytes)?)))
    }

    fn import_key(&self, id: &str, _usage: Usage, bytes: &[u8]) -> Result<StoredKey, StoreError> {
        self.write(id, bytes)?;
        Ok(StoredKey::Symmetric(Arc::new(MemoryKey::new(
            bytes.to_vec(),
        )?)))
    }

    fn generate_key_pair(
        &self,
        id: &str,
        algorithm: KeyAlgorithm,
    ) -> Result<StoredKey, StoreError> {
        let private = MemoryKeyPair::generate(algorithm)?;
        let pem = private.private_key_to_pem_pkcs8()?;
        self.set_aside_corrupt(id)?;
        self.write(id, &pem)?;
        Ok(StoredKey::Pair(Arc::new(MemoryKeyPair::new(private)?)))
    }

    fn delete(&self, id: &str, _kind: KeyKind) -> Result<(), StoreError> {
        files::remove_durable(&self.directory, &file_name(id))
            .map(drop)
            .map_err(io_error(&self.path_for(id)))
    }

    fn move_key_pair(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let source = self.path_for(from);
        std::fs::rename(&source, self.path_for(to)).map_err(io_error(&source))?;
        files::sync_dir(&self.directory).map_err(io_error(&source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn reference_file_names() {
        let name = file_name("device-id");
        assert!(name.starts_with("deviceid-"), "{name}");
        assert!(name.ends_with(".key"));
        assert_eq!(name.len(), "deviceid-".len() + 64 + ".key".len());
        assert_ne!(file_name("a/b"), file_name("ab"));
    }

    #[test]
    fn writes_are_private_and_corrupt_files_are_set_aside() {
        let home = tempfile::tempdir().unwrap();
        let store = FileStore::open(home.path()).unwrap();
        let directory_mode = std::fs::metadata(home.path().join("keys"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(directory_mode & 0o777, 0o700);

        store
            .import_key("k", Usage::DERIVE_SIGN, b"secret")
            .unwrap();
        let path = store.path_for("k");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");

        std::fs::write(
            store.path_for("p"),
            b"-----BEGIN PRIVATE KEY-----\ngarbage\n",
        )
        .unwrap();
        assert!(matches!(
            store.load("p"),
            Err(StoreError::Unreadable { .. })
        ));
        store.generate_key_pair("p", KeyAlgorithm::EcP256).unwrap();
        assert!(matches!(store.load("p").unwrap(), Some(StoredKey::Pair(_))));
        let aside = std::fs::read_dir(home.path().join("keys"))
            .unwrap()
            .filter(|entry| {
                entry
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".corrupt-")
            })
            .count();
        assert_eq!(aside, 1);
    }
}
