//! Where dynamic certs live: the [`CertStore`] trait and its implementations ([`file::FileStore`]
//! for the daemon, [`memory::MemoryStore`] for tests).
//!
//! Stores are plain blocking key-value stores of PEM text by cert ID. They know nothing about
//! preloaded certs, authorization or concurrency: the service serializes writes per cert ID and
//! runs store calls on blocking threads.

pub mod file;
pub mod memory;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("I/O error on {path}")]
    Io {
        /// The file or folder.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A stored file is not UTF-8 text.
    #[error("stored cert {id:?} is not valid UTF-8")]
    NotText {
        /// The cert ID.
        id: String,
    },
    /// An earlier write of the same cert, which this write was merged into, failed.
    #[error("a concurrent write of the same cert failed")]
    MergedWriteFailed,
}

/// A store of PEM text by cert ID.
pub trait CertStore: Send + Sync + std::fmt::Debug {
    /// The PEM stored as `id`; `Ok(None)` when there is none.
    fn load(&self, id: &str) -> Result<Option<String>, StoreError>;

    /// Stores `pem` as `id`, replacing any previous value, durably and atomically.
    fn store(&self, id: &str, pem: &str) -> Result<(), StoreError>;

    /// Removes `id`; succeeds when it does not exist.
    fn delete(&self, id: &str) -> Result<(), StoreError>;
}
