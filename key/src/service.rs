//! The key service: authorization, key resolution (preloaded, token, file), the in-memory key
//! cache, handle issue and verification, and every operation of the API in terms of bytes.
//!
//! It has no HTTP types. Loaded keys are cached by ID, so a request costs one handle check, one
//! map lookup and the cryptographic operation itself. There is no global lock: writes to one key
//! ID are serialized by a per-ID lock, everything else runs concurrently. Store calls and slow
//! crypto (RSA, token operations) run on blocking threads.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use crate::config::{glob_matches, Principal};
use crate::crypto::{self, MemoryKey};
use crate::error::KeyError;
use crate::handle::{HandleSealer, HandleTarget};
use crate::store::file::{self, FileStore};
use crate::store::{
    KeyAlgorithm, KeyKind, KeyPair, KeyStore, RsaPadding, StoreError, StoredKey, SymmetricKey,
    Usage,
};

/// The reserved ID of the key that seals handles.
pub const HANDLE_VALIDATION_KEY_ID: &str = "handle-validation-key";

/// What `/encrypt` is asked to do.
#[derive(Clone, Copy, Debug)]
pub enum EncryptMechanism<'a> {
    /// AES-GCM in keyd's ciphertext format.
    Aead {
        /// The IV (1–256 bytes).
        iv: &'a [u8],
        /// The additional authenticated data.
        aad: &'a [u8],
    },
    /// RSA private-key operation with the given padding.
    Rsa(RsaPadding),
}

/// Where keys live, resolved per key ID.
#[derive(Debug)]
pub struct Storage {
    /// The file store, if `homedir_path` is set.
    pub file: Option<Arc<FileStore>>,
    /// The token for dynamic keys, if `pkcs11_base_slot` is set.
    pub token: Option<Arc<dyn KeyStore>>,
    /// Preloaded key ID → URI.
    pub preloaded: BTreeMap<String, String>,
    /// Loads a preloaded `pkcs11:` URI (present when a PKCS#11 module is configured).
    pub preloaded_pkcs11: Option<Arc<dyn PreloadedLoader>>,
}

/// Loads keys named by a URI (`pkcs11:` preloaded keys).
pub trait PreloadedLoader: Send + Sync + std::fmt::Debug {
    /// Loads the key behind `uri`; `Ok(None)` when the object does not exist.
    fn load_uri(&self, id: &str, uri: &str) -> Result<Option<StoredKey>, StoreError>;
}

impl Storage {
    fn load_uncached(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        if let Some(uri) = self.preloaded.get(id) {
            return self.load_preloaded(id, uri);
        }
        if let Some(token) = &self.token {
            if let Some(key) = token.load(id)? {
                return Ok(Some(key));
            }
        }
        match &self.file {
            Some(file) => file.load(id),
            None => Ok(None),
        }
    }

    fn load_preloaded(&self, id: &str, uri: &str) -> Result<Option<StoredKey>, StoreError> {
        if let Some(path) = uri.strip_prefix("file://") {
            let path = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
            return file::load_file(std::path::Path::new(path.as_ref()), id);
        }
        match &self.preloaded_pkcs11 {
            Some(loader) => loader.load_uri(id, uri),
            None => Err(StoreError::NotSupported(format!(
                "preloaded key {id:?} needs a PKCS#11 module"
            ))),
        }
    }

    /// The store that holds `id` right now, if any (token first, then file).
    fn holder(&self, id: &str) -> Result<Option<Arc<dyn KeyStore>>, StoreError> {
        if let Some(token) = &self.token {
            if token.load(id)?.is_some() {
                return Ok(Some(Arc::clone(token)));
            }
        }
        if let Some(file) = &self.file {
            match file.load(id) {
                Ok(Some(_)) | Err(StoreError::Unreadable { .. }) => {
                    return Ok(Some(Arc::clone(file) as Arc<dyn KeyStore>))
                }
                Ok(None) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(None)
    }

    /// Generates a symmetric key: token first, file when the token cannot.
    fn generate_key(&self, id: &str, usage: Usage) -> Result<StoredKey, StoreError> {
        if let Some(token) = &self.token {
            match token.generate_key(id, usage) {
                Err(StoreError::NotSupported(reason)) if self.file.is_some() => {
                    log::info!("key {id:?}: token cannot hold it ({reason}); using the file store");
                }
                other => return other,
            }
        }
        self.file_store()?.generate_key(id, usage)
    }

    /// Imports a symmetric key: token first, file when the token refuses it. A token key of the
    /// same ID is removed only after the file import succeeded (it would shadow the file), so a
    /// failed import never loses the key that was there.
    fn import_key(&self, id: &str, usage: Usage, bytes: &[u8]) -> Result<StoredKey, StoreError> {
        let Some(token) = &self.token else {
            return self.file_store()?.import_key(id, usage, bytes);
        };
        match token.import_key(id, usage, bytes) {
            Err(StoreError::NotSupported(reason)) if self.file.is_some() => {
                log::info!("key {id:?}: token refused the import ({reason}); using the file store");
                let key = self.file_store()?.import_key(id, usage, bytes)?;
                token.delete(id, KeyKind::Symmetric)?;
                Ok(key)
            }
            other => other,
        }
    }

    /// Generates a key pair with the first algorithm the store accepts. A configured token never
    /// falls back to files.
    fn generate_key_pair(
        &self,
        id: &str,
        algorithms: &[KeyAlgorithm],
    ) -> Result<StoredKey, StoreError> {
        let store: &dyn KeyStore = match (&self.token, &self.file) {
            (Some(token), _) => token.as_ref(),
            (None, Some(file)) => file.as_ref(),
            (None, None) => return Err(StoreError::NotSupported("no key storage".to_owned())),
        };
        let mut last_error = StoreError::NotSupported("no algorithm requested".to_owned());
        for &algorithm in algorithms {
            match store.generate_key_pair(id, algorithm) {
                Err(StoreError::NotSupported(reason)) => {
                    log::info!(
                        "key pair {id:?}: {algorithm:?} not supported ({reason}); trying the next"
                    );
                    last_error = StoreError::NotSupported(reason);
                }
                other => return other,
            }
        }
        Err(last_error)
    }

    fn file_store(&self) -> Result<&FileStore, StoreError> {
        self.file
            .as_deref()
            .ok_or_else(|| StoreError::NotSupported("no file store configured".to_owned()))
    }
}

/// Per-key-ID write locks.
#[derive(Debug, Default)]
struct KeyLocks {
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyLocks {
    async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if locks.len() > 1024 {
                locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            }
            Arc::clone(locks.entry(id.to_owned()).or_default())
        };
        lock.lock_owned().await
    }
}

/// A key resolved from a handle.
#[derive(Clone, Debug)]
enum ResolvedKey {
    Symmetric {
        key: Arc<dyn SymmetricKey>,
        derived: Option<Arc<MemoryKey>>,
    },
    Pair(Arc<dyn KeyPair>),
}

/// The key service.
#[derive(Debug)]
pub struct KeyService {
    sealer: HandleSealer,
    storage: Arc<Storage>,
    principals: RwLock<Arc<Vec<Principal>>>,
    cache: RwLock<HashMap<String, StoredKey>>,
    locks: KeyLocks,
}

async fn blocking<T: Send + 'static>(
    task: impl FnOnce() -> T + Send + 'static,
) -> Result<T, KeyError> {
    tokio::task::spawn_blocking(task)
        .await
        .map_err(KeyError::Task)
}

async fn maybe_blocking<T: Send + 'static>(
    inline: bool,
    task: impl FnOnce() -> T + Send + 'static,
) -> Result<T, KeyError> {
    if inline {
        Ok(task())
    } else {
        blocking(task).await
    }
}

/// The longest key ID, in bytes (the contract's limit).
pub const MAX_KEY_ID_BYTES: usize = 512;

/// The most ASCII letters and digits a key ID may contain: what the file store can name
/// (`config_common::files::MAX_ID_ALPHANUMERICS`). Checked for every store, so a key ID means the
/// same on a token (where it is the object label) as in files, and moving a key between them
/// never meets an ID one of them cannot hold.
pub const MAX_KEY_ID_ALPHANUMERICS: usize = config_common::files::MAX_ID_ALPHANUMERICS;

/// Checks a key ID before any store sees it: 1–512 bytes of UTF-8, no control characters, at
/// most [`MAX_KEY_ID_ALPHANUMERICS`] ASCII letters and digits.
pub fn validate_key_id(id: &str, field: &'static str) -> Result<(), KeyError> {
    let reason = if id.is_empty() {
        "must not be empty".to_owned()
    } else if id.len() > MAX_KEY_ID_BYTES {
        format!("must be at most {MAX_KEY_ID_BYTES} bytes")
    } else if id.chars().any(|character| character.is_ascii_control()) {
        "must not contain control characters".to_owned()
    } else if !config_common::files::fits_file_name(id) {
        format!(
            "must contain at most {MAX_KEY_ID_ALPHANUMERICS} ASCII letters and digits \
             (the file store's file name limit)"
        )
    } else {
        return Ok(());
    };
    Err(KeyError::InvalidParameter {
        name: field,
        reason,
    })
}

impl KeyService {
    /// Opens storage and the handle validation key (created if missing).
    pub async fn new(storage: Storage, principals: Vec<Principal>) -> Result<Self, KeyError> {
        let storage = Arc::new(storage);
        let validation_storage = Arc::clone(&storage);
        let validation_key = blocking(move || -> Result<Arc<dyn SymmetricKey>, StoreError> {
            let id = HANDLE_VALIDATION_KEY_ID;
            let existing = match validation_storage.load_uncached(id) {
                Err(StoreError::Unreadable { .. }) => None,
                other => other?,
            };
            match existing {
                Some(StoredKey::Symmetric(key)) => Ok(key),
                Some(StoredKey::Pair(_)) => Err(StoreError::InvalidInput(
                    "the handle validation key is stored as a key pair".to_owned(),
                )),
                None => match validation_storage.generate_key(id, Usage::DERIVE_SIGN)? {
                    StoredKey::Symmetric(key) => Ok(key),
                    StoredKey::Pair(_) => Err(StoreError::InvalidInput(
                        "the handle validation key is stored as a key pair".to_owned(),
                    )),
                },
            }
        })
        .await??;
        Ok(KeyService {
            sealer: HandleSealer::new(validation_key),
            storage,
            principals: RwLock::new(Arc::new(principals)),
            cache: RwLock::new(HashMap::new()),
            locks: KeyLocks::default(),
        })
    }

    /// Replaces the principal list (config reload).
    pub fn set_principals(&self, principals: Vec<Principal>) {
        *self
            .principals
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(principals);
    }

    fn authorize(&self, uid: u32, id: &str, field: &'static str) -> Result<(), KeyError> {
        validate_key_id(id, field)?;
        if id == HANDLE_VALIDATION_KEY_ID {
            return Err(KeyError::Reserved);
        }
        if uid == 0 {
            return Ok(());
        }
        let principals = Arc::clone(
            &self
                .principals
                .read()
                .unwrap_or_else(|poison| poison.into_inner()),
        );
        let allowed = principals
            .iter()
            .filter(|principal| principal.uid == uid)
            .flat_map(|principal| principal.keys.iter())
            .any(|pattern| glob_matches(pattern, id));
        if allowed {
            Ok(())
        } else {
            Err(KeyError::Forbidden {
                uid,
                id: id.to_owned(),
            })
        }
    }

    async fn seal(&self, target: HandleTarget) -> Result<String, KeyError> {
        let sealer = self.sealer.clone();
        Ok(maybe_blocking(sealer.runs_inline(), move || sealer.seal(target)).await??)
    }

    async fn open(&self, handle: &str) -> Result<HandleTarget, KeyError> {
        if let Some(target) = self.sealer.verified(handle) {
            return Ok(target);
        }
        if self.sealer.runs_inline() {
            return Ok(self.sealer.open(handle)?);
        }
        let sealer = self.sealer.clone();
        let handle = handle.to_owned();
        Ok(blocking(move || sealer.open(&handle)).await??)
    }

    fn cached(&self, id: &str) -> Option<StoredKey> {
        self.cache
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(id)
            .cloned()
    }

    fn cache_put(&self, id: &str, key: Option<StoredKey>) {
        let mut cache = self
            .cache
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        match key {
            Some(key) => cache.insert(id.to_owned(), key),
            None => cache.remove(id),
        };
    }

    /// Loads key `id` through the cache. The caller may already hold the ID's lock.
    async fn load_locked(&self, id: &str) -> Result<Option<StoredKey>, KeyError> {
        if let Some(key) = self.cached(id) {
            return Ok(Some(key));
        }
        let storage = Arc::clone(&self.storage);
        let owned_id = id.to_owned();
        let loaded = blocking(move || storage.load_uncached(&owned_id)).await??;
        if let Some(key) = &loaded {
            self.cache_put(id, Some(key.clone()));
        }
        Ok(loaded)
    }

    async fn load(&self, id: &str) -> Result<Option<StoredKey>, KeyError> {
        if let Some(key) = self.cached(id) {
            return Ok(Some(key));
        }
        let _guard = self.locks.lock(id).await;
        self.load_locked(id).await
    }

    /// `POST /key`: create-if-absent, or import (replace) when `import` is given.
    pub async fn create_key(
        &self,
        uid: u32,
        id: &str,
        usage: Usage,
        import: Option<Vec<u8>>,
    ) -> Result<String, KeyError> {
        self.authorize(uid, id, "keyId")?;
        if let Some(bytes) = &import {
            if bytes.is_empty() || bytes.len() > 1024 {
                return Err(KeyError::InvalidParameter {
                    name: "keyBytes",
                    reason: "must decode to 1-1024 bytes".to_owned(),
                });
            }
        }
        let preloaded = self.storage.preloaded.contains_key(id);
        let _guard = self.locks.lock(id).await;
        let existing = match self.load_locked(id).await {
            Err(KeyError::Unreadable(..)) if !preloaded => None,
            other => other?,
        };
        match (&existing, &import) {
            (Some(StoredKey::Pair(_)), _) => {
                return Err(KeyError::KindConflict {
                    existing: "key pair",
                    id: id.to_owned(),
                })
            }
            (Some(StoredKey::Symmetric(_)), None) => {}
            (_, Some(_)) | (None, None) if preloaded => {
                return Err(KeyError::Preloaded(id.to_owned()))
            }
            (_, Some(bytes)) => {
                let storage = Arc::clone(&self.storage);
                let (owned_id, bytes) = (id.to_owned(), bytes.clone());
                let key = blocking(move || storage.import_key(&owned_id, usage, &bytes)).await??;
                self.cache_put(id, Some(key));
            }
            (None, None) => {
                let storage = Arc::clone(&self.storage);
                let owned_id = id.to_owned();
                let key = blocking(move || storage.generate_key(&owned_id, usage)).await??;
                self.cache_put(id, Some(key));
            }
        }
        self.seal(HandleTarget::Key(id.to_owned())).await
    }

    /// `GET /key/{id}`.
    pub async fn load_key(&self, uid: u32, id: &str) -> Result<String, KeyError> {
        self.authorize(uid, id, "keyId")?;
        match self.load(id).await? {
            Some(StoredKey::Symmetric(_)) => self.seal(HandleTarget::Key(id.to_owned())).await,
            Some(StoredKey::Pair(_)) | None => Err(KeyError::NotFound(id.to_owned())),
        }
    }

    /// `POST /keypair`: create-if-absent.
    pub async fn create_key_pair(
        &self,
        uid: u32,
        id: &str,
        preferred_algorithms: Option<&str>,
    ) -> Result<String, KeyError> {
        self.authorize(uid, id, "keyId")?;
        let algorithms = KeyAlgorithm::parse_preference(preferred_algorithms).ok_or_else(|| {
            KeyError::InvalidParameter {
                name: "preferredAlgorithms",
                reason: "names no supported algorithm".to_owned(),
            }
        })?;
        let preloaded = self.storage.preloaded.contains_key(id);
        let _guard = self.locks.lock(id).await;
        let existing = match self.load_locked(id).await {
            Err(KeyError::Unreadable(..)) if !preloaded => None,
            other => other?,
        };
        match existing {
            Some(StoredKey::Pair(_)) => {}
            Some(StoredKey::Symmetric(_)) => {
                return Err(KeyError::KindConflict {
                    existing: "key",
                    id: id.to_owned(),
                })
            }
            None if preloaded => return Err(KeyError::Preloaded(id.to_owned())),
            None => {
                let storage = Arc::clone(&self.storage);
                let owned_id = id.to_owned();
                let key =
                    blocking(move || storage.generate_key_pair(&owned_id, &algorithms)).await??;
                self.cache_put(id, Some(key));
            }
        }
        self.seal(HandleTarget::KeyPair(id.to_owned())).await
    }

    /// `GET /keypair/{id}`.
    pub async fn load_key_pair(&self, uid: u32, id: &str) -> Result<String, KeyError> {
        self.authorize(uid, id, "keyId")?;
        match self.load(id).await? {
            Some(StoredKey::Pair(_)) => self.seal(HandleTarget::KeyPair(id.to_owned())).await,
            Some(StoredKey::Symmetric(_)) | None => Err(KeyError::NotFound(id.to_owned())),
        }
    }

    /// `DELETE /key` (`kind` Symmetric) and `DELETE /keypair` (`kind` Pair).
    pub async fn delete(&self, uid: u32, handle: &str, kind: KeyKind) -> Result<(), KeyError> {
        let id = match (self.open(handle).await?, kind) {
            (HandleTarget::Key(id), KeyKind::Symmetric)
            | (HandleTarget::KeyPair(id), KeyKind::Pair) => id,
            (_, KeyKind::Symmetric) => return Err(KeyError::WrongHandleKind("a key")),
            (_, KeyKind::Pair) => return Err(KeyError::WrongHandleKind("a key pair")),
        };
        self.authorize(uid, &id, "keyHandle")?;
        if self.storage.preloaded.contains_key(&id) {
            return Err(KeyError::Preloaded(id));
        }
        let _guard = self.locks.lock(&id).await;
        match self.load_locked(&id).await {
            Ok(Some(key)) if key.kind() != kind => {
                // The ID now holds the other kind: nothing of this kind is left to delete.
                return Ok(());
            }
            Ok(_) | Err(KeyError::Unreadable(..)) => {}
            Err(error) => return Err(error),
        }
        let storage = Arc::clone(&self.storage);
        let owned_id = id.clone();
        blocking(move || -> Result<(), StoreError> {
            if let Some(token) = &storage.token {
                token.delete(&owned_id, kind)?;
            }
            if let Some(file) = &storage.file {
                file.delete(&owned_id, kind)?;
            }
            Ok(())
        })
        .await??;
        self.cache_put(&id, None);
        Ok(())
    }

    /// `POST /keypair/{to}` with `{"from": ...}`: moves a key pair, replacing `to`.
    pub async fn move_key_pair(&self, uid: u32, from: &str, to: &str) -> Result<(), KeyError> {
        self.authorize(uid, from, "from")?;
        self.authorize(uid, to, "keyId")?;
        if from == to {
            return Err(KeyError::BadRequest(
                "source and destination for move are identical".to_owned(),
            ));
        }
        // Preloaded keys are read-only: neither moved away nor replaced (409, as delete and
        // import of them).
        if let Some(id) = [from, to]
            .into_iter()
            .find(|id| self.storage.preloaded.contains_key(*id))
        {
            return Err(KeyError::Preloaded(id.to_owned()));
        }
        // Lock both IDs in a fixed order so two opposite moves cannot deadlock.
        let (first, second) = if from < to { (from, to) } else { (to, from) };
        let _first_guard = self.locks.lock(first).await;
        let _second_guard = self.locks.lock(second).await;
        match self.load_locked(from).await? {
            Some(StoredKey::Pair(_)) => {}
            Some(StoredKey::Symmetric(_)) => {
                return Err(KeyError::BadRequest(format!(
                    "key {from:?} is not a key pair"
                )))
            }
            None => return Err(KeyError::NotFound(from.to_owned())),
        }
        let storage = Arc::clone(&self.storage);
        let (owned_from, owned_to) = (from.to_owned(), to.to_owned());
        blocking(move || -> Result<Result<(), KeyError>, StoreError> {
            let Some(source) = storage.holder(&owned_from)? else {
                return Ok(Err(KeyError::NotFound(owned_from)));
            };
            if let Some(destination) = storage.holder(&owned_to)? {
                if destination.name() != source.name() {
                    return Ok(Err(KeyError::BadRequest(
                        "source and destination are in different key stores".to_owned(),
                    )));
                }
            }
            source.move_key_pair(&owned_from, &owned_to)?;
            Ok(Ok(()))
        })
        .await???;
        let moved = self.cached(from);
        self.cache_put(from, None);
        self.cache_put(to, moved);
        Ok(())
    }

    async fn resolve(&self, handle: &str) -> Result<ResolvedKey, KeyError> {
        match self.open(handle).await? {
            HandleTarget::Key(id) => match self.load(&id).await? {
                Some(StoredKey::Symmetric(key)) => {
                    Ok(ResolvedKey::Symmetric { key, derived: None })
                }
                Some(StoredKey::Pair(_)) => Err(KeyError::WrongMechanism),
                None => Err(KeyError::NotFound(id)),
            },
            HandleTarget::KeyPair(id) => match self.load(&id).await? {
                Some(StoredKey::Pair(key)) => Ok(ResolvedKey::Pair(key)),
                Some(StoredKey::Symmetric(_)) => Err(KeyError::WrongMechanism),
                None => Err(KeyError::NotFound(id)),
            },
            HandleTarget::Derived(base_handle, data) => {
                let base = match Box::pin(self.resolve(&base_handle)).await? {
                    ResolvedKey::Symmetric { key, derived: None } => key,
                    _ => return Err(KeyError::WrongMechanism),
                };
                let bytes =
                    maybe_blocking(base.runs_inline(), move || base.hmac_sha256(&data)).await??;
                let derived = Arc::new(MemoryKey::new(bytes)?);
                Ok(ResolvedKey::Symmetric {
                    key: Arc::clone(&derived) as Arc<dyn SymmetricKey>,
                    derived: Some(derived),
                })
            }
        }
    }

    async fn resolve_symmetric(
        &self,
        handle: &str,
    ) -> Result<(Arc<dyn SymmetricKey>, bool), KeyError> {
        match self.resolve(handle).await? {
            ResolvedKey::Symmetric { key, derived } => Ok((key, derived.is_some())),
            ResolvedKey::Pair(_) => Err(KeyError::WrongMechanism),
        }
    }

    async fn resolve_pair(&self, handle: &str) -> Result<Arc<dyn KeyPair>, KeyError> {
        match self.resolve(handle).await? {
            ResolvedKey::Pair(key) => Ok(key),
            ResolvedKey::Symmetric { .. } => Err(KeyError::WrongMechanism),
        }
    }

    /// `POST /parameters/{name}`.
    pub async fn parameter(&self, handle: &str, name: &str) -> Result<String, KeyError> {
        let key = match self.resolve(handle).await? {
            ResolvedKey::Pair(key) => key,
            ResolvedKey::Symmetric { .. } => return Err(KeyError::WrongHandleKind("a key pair")),
        };
        crypto::public_parameter(key.public_key(), name).map_err(|error| match error {
            crypto::ParameterError::Unknown => KeyError::InvalidParameter {
                name: "parameterName",
                reason: format!("unknown parameter {name:?}"),
            },
            crypto::ParameterError::NotApplicable => KeyError::WrongMechanism,
            crypto::ParameterError::Crypto(stack) => KeyError::Store(StoreError::Crypto(stack)),
        })
    }

    /// HMAC-SHA256 with a symmetric or derived key.
    pub async fn sign_hmac(&self, handle: &str, message: Vec<u8>) -> Result<Vec<u8>, KeyError> {
        let (key, _) = self.resolve_symmetric(handle).await?;
        Ok(maybe_blocking(key.runs_inline(), move || key.hmac_sha256(&message)).await??)
    }

    /// ECDSA over a caller-computed digest (1–64 bytes), DER signature.
    pub async fn sign_ecdsa(&self, handle: &str, digest: Vec<u8>) -> Result<Vec<u8>, KeyError> {
        if digest.is_empty() || digest.len() > 64 {
            return Err(KeyError::InvalidParameter {
                name: "digest",
                reason: "must be 1-64 bytes".to_owned(),
            });
        }
        let key = self.resolve_pair(handle).await?;
        if key.public_key().id() != openssl::pkey::Id::EC {
            return Err(KeyError::WrongMechanism);
        }
        Ok(maybe_blocking(key.runs_inline(), move || key.ecdsa_sign(&digest)).await??)
    }

    /// `POST /encrypt`.
    pub async fn encrypt(
        &self,
        handle: &str,
        mechanism: EncryptMechanism<'_>,
        plaintext: Vec<u8>,
    ) -> Result<Vec<u8>, KeyError> {
        match mechanism {
            EncryptMechanism::Aead { iv, aad } => {
                check_iv(iv)?;
                let (key, _) = self.resolve_symmetric(handle).await?;
                let (iv, aad) = (iv.to_vec(), aad.to_vec());
                let (ciphertext, tag) = maybe_blocking(key.runs_inline(), move || {
                    key.aes_gcm_encrypt(&iv, &aad, &plaintext)
                })
                .await??;
                Ok(crypto::aead_seal(&ciphertext, &tag))
            }
            EncryptMechanism::Rsa(padding) => {
                let key = self.resolve_pair(handle).await?;
                let rsa = key
                    .public_key()
                    .rsa()
                    .map_err(|_| KeyError::WrongMechanism)?;
                let modulus_length = usize::try_from(rsa.size()).unwrap_or(0);
                let acceptable = match padding {
                    RsaPadding::Pkcs1 => plaintext.len() <= modulus_length.saturating_sub(11),
                    RsaPadding::None => plaintext.len() == modulus_length,
                };
                if !acceptable {
                    return Err(KeyError::InvalidParameter {
                        name: "plaintext",
                        reason: match padding {
                            RsaPadding::Pkcs1 => format!(
                                "must be at most {} bytes",
                                modulus_length.saturating_sub(11)
                            ),
                            RsaPadding::None => format!("must be exactly {modulus_length} bytes"),
                        },
                    });
                }
                Ok(maybe_blocking(key.runs_inline(), move || {
                    key.rsa_private_encrypt(padding, &plaintext)
                })
                .await??)
            }
        }
    }

    /// `POST /decrypt` (AEAD only).
    pub async fn decrypt(
        &self,
        handle: &str,
        iv: &[u8],
        aad: &[u8],
        ciphertext: Vec<u8>,
    ) -> Result<Vec<u8>, KeyError> {
        check_iv(iv)?;
        let parts = crypto::aead_open(&ciphertext).map_err(|error| match error {
            crypto::AeadFormatError::Malformed => KeyError::MalformedCiphertext,
            crypto::AeadFormatError::UnknownVersion(version) => {
                KeyError::UnknownCiphertextVersion(version)
            }
        })?;
        let (key, _) = self.resolve_symmetric(handle).await?;
        if parts.version == crypto::AEAD_VERSION_LEGACY && !key.accepts_legacy_ciphertext() {
            return Err(KeyError::BadRequest(
                "legacy ciphertext version 1 cannot be decrypted with a token key".to_owned(),
            ));
        }
        let (iv, aad, body, tag) = (
            iv.to_vec(),
            aad.to_vec(),
            parts.ciphertext.to_vec(),
            parts.tag,
        );
        maybe_blocking(key.runs_inline(), move || {
            key.aes_gcm_decrypt(&iv, &aad, &body, &tag)
        })
        .await??
        .ok_or(KeyError::DecryptionFailed)
    }

    /// `POST /derivedkey`.
    pub async fn derive(&self, base_handle: &str, data: Vec<u8>) -> Result<String, KeyError> {
        if data.len() > 1024 {
            return Err(KeyError::InvalidParameter {
                name: "derivationData",
                reason: "must be at most 1024 bytes".to_owned(),
            });
        }
        match self.open(base_handle).await? {
            HandleTarget::Key(id) => match self.load(&id).await? {
                Some(StoredKey::Symmetric(_)) => {}
                Some(StoredKey::Pair(_)) => return Err(KeyError::WrongMechanism),
                None => return Err(KeyError::NotFound(id)),
            },
            HandleTarget::KeyPair(_) => return Err(KeyError::WrongMechanism),
            HandleTarget::Derived(..) => return Err(KeyError::NestedDerivation),
        }
        self.seal(HandleTarget::Derived(base_handle.to_owned(), data))
            .await
    }

    /// `POST /derivedkey/export`.
    pub async fn export_derived(&self, handle: &str) -> Result<Vec<u8>, KeyError> {
        match self.resolve(handle).await? {
            ResolvedKey::Symmetric {
                derived: Some(derived),
                ..
            } => Ok(derived.bytes().to_vec()),
            _ => Err(KeyError::WrongHandleKind("a derived key")),
        }
    }
}

fn check_iv(iv: &[u8]) -> Result<(), KeyError> {
    if iv.is_empty() || iv.len() > 256 {
        return Err(KeyError::InvalidParameter {
            name: "iv",
            reason: "must be 1-256 bytes".to_owned(),
        });
    }
    Ok(())
}
