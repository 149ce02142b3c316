//! An in-memory [`CertStore`] for tests that need no disk.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{CertStore, StoreError};

/// Certs in a map; lost when dropped.
#[derive(Debug, Default)]
pub struct MemoryStore {
    certs: Mutex<HashMap<String, String>>,
}

impl MemoryStore {
    fn certs(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.certs
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl CertStore for MemoryStore {
    fn load(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self.certs().get(id).cloned())
    }

    fn store(&self, id: &str, pem: &str) -> Result<(), StoreError> {
        self.certs().insert(id.to_owned(), pem.to_owned());
        Ok(())
    }

    fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.certs().remove(id);
        Ok(())
    }
}
