//! certd's use of keyd: one shared, pooled [`key_api::Client`] (keep-alive connections, at most
//! five requests in flight, below keyd's per-uid budget), plus two small caches that keep the
//! steady-state cost of an issuance at a single keyd call (the signature):
//!
//! - handles to certd's own key pairs (`<certId>` for self-signed, the local CA's `pk`), by key
//!   ID; a handle keyd no longer accepts is dropped and loaded again once;
//! - public keys behind handles (from keyd `/parameters`), by SHA-256 of the handle (handles are
//!   bearer credentials: they are never logged or put in error messages). A cached key is only
//!   trusted to say "matches"; a mismatch is re-checked with keyd, and the issued certificate's
//!   signature is verified against the expected key afterwards, so a stale entry can never let a
//!   wrong key through.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use http::StatusCode;
use http_common::ClientError;
use key_api::{EncryptMechanism, KeyHandle, SignMechanism};

use crate::error::CertError;
use crate::issuance::{PublicKey, SignatureAlgorithm};

/// Cache entries kept at most; the caches are cleared when they grow past this.
const CACHE_LIMIT: usize = 1024;

/// A key certd signs with.
#[derive(Clone, Copy, Debug)]
pub enum SigningKey<'a> {
    /// A handle the caller supplied (`issuer.privateKeyHandle`).
    Caller(&'a KeyHandle),
    /// One of certd's own key pairs in keyd, by key ID.
    Certd(&'a str),
}

/// keyd, as certd uses it.
#[derive(Debug)]
pub struct Keys {
    client: key_api::Client,
    handles: Mutex<HashMap<String, KeyHandle>>,
    public_keys: Mutex<HashMap<[u8; 32], PublicKey>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn handle_digest(handle: &KeyHandle) -> [u8; 32] {
    openssl::sha::sha256(handle.0.as_bytes())
}

/// Maps a keyd failure to certd's error for the key it concerned.
fn keyd_error(error: ClientError, key: SigningKey<'_>, step: &'static str) -> CertError {
    let status = error.status();
    match (status, key) {
        (None, _) => match error {
            ClientError::Decode(_) | ClientError::InvalidEndpoint(_) => CertError::Keyd {
                step,
                source: error,
            },
            _ => CertError::KeydUnavailable(error),
        },
        (Some(StatusCode::SERVICE_UNAVAILABLE), _) => CertError::KeydUnavailable(error),
        (
            Some(status @ (StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND)),
            SigningKey::Caller(_),
        ) => {
            let message = match error {
                ClientError::Status { message, .. } => message,
                other => other.to_string(),
            };
            CertError::IssuerHandle { status, message }
        }
        (Some(StatusCode::FORBIDDEN), SigningKey::Certd(key_id)) => CertError::KeydForbidden {
            key_id: key_id.to_owned(),
            source: error,
        },
        (Some(StatusCode::NOT_FOUND), SigningKey::Certd(key_id)) => {
            CertError::KeyPairNotFound(key_id.to_owned())
        }
        _ => CertError::Keyd {
            step,
            source: error,
        },
    }
}

fn decode_parameter(step: &'static str, value: &str) -> Result<Vec<u8>, CertError> {
    base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|error| CertError::Keyd {
            step,
            source: ClientError::Status {
                status: StatusCode::BAD_GATEWAY,
                message: format!("keyd answered invalid base64: {error}"),
            },
        })
}

impl Keys {
    /// Uses `client` for every keyd call.
    pub fn new(client: key_api::Client) -> Self {
        Keys {
            client,
            handles: Mutex::new(HashMap::new()),
            public_keys: Mutex::new(HashMap::new()),
        }
    }

    fn remember_handle(&self, key_id: &str, handle: &KeyHandle) {
        let mut handles = lock(&self.handles);
        if handles.len() >= CACHE_LIMIT {
            handles.clear();
        }
        handles.insert(key_id.to_owned(), handle.clone());
    }

    /// A handle to certd's key pair `key_id` (cached).
    pub(crate) async fn handle_for(&self, key_id: &str) -> Result<KeyHandle, CertError> {
        if let Some(handle) = lock(&self.handles).get(key_id).cloned() {
            return Ok(handle);
        }
        let handle =
            self.client.load_key_pair(key_id).await.map_err(|error| {
                keyd_error(error, SigningKey::Certd(key_id), "loading a key pair")
            })?;
        self.remember_handle(key_id, &handle);
        Ok(handle)
    }

    fn forget_handle(&self, key_id: &str) {
        lock(&self.handles).remove(key_id);
    }

    /// Renames key pair `from` to `to` in keyd (replacing `to`), forgetting both cached handles.
    pub async fn move_key_pair(&self, from: &str, to: &str) -> Result<(), CertError> {
        self.forget(SigningKey::Certd(from));
        self.forget(SigningKey::Certd(to));
        self.client
            .move_key_pair(from, to)
            .await
            .map_err(|error| keyd_error(error, SigningKey::Certd(from), "moving a key pair"))
    }

    /// Creates key pair `key_id` in keyd if it does not exist (`algorithms` as keyd's
    /// `preferredAlgorithms`).
    pub async fn create_key_pair(&self, key_id: &str, algorithms: &str) -> Result<(), CertError> {
        let handle = self
            .client
            .create_key_pair_if_not_exists(key_id, Some(algorithms))
            .await
            .map_err(|error| keyd_error(error, SigningKey::Certd(key_id), "creating a key pair"))?;
        self.remember_handle(key_id, &handle);
        Ok(())
    }

    /// Runs `operation` with the handle for `key`; for certd's own keys, a handle keyd rejects
    /// (400: e.g. keyd's state was reset) is reloaded and the operation tried once more.
    async fn with_handle<T, F, Fut>(
        &self,
        key: SigningKey<'_>,
        step: &'static str,
        operation: F,
    ) -> Result<T, CertError>
    where
        F: Fn(KeyHandle) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        match key {
            SigningKey::Caller(handle) => operation(handle.clone())
                .await
                .map_err(|error| keyd_error(error, key, step)),
            SigningKey::Certd(key_id) => {
                let handle = self.handle_for(key_id).await?;
                match operation(handle).await {
                    Err(error) if error.status() == Some(StatusCode::BAD_REQUEST) => {
                        self.forget_handle(key_id);
                        let handle = self.handle_for(key_id).await?;
                        operation(handle)
                            .await
                            .map_err(|error| keyd_error(error, key, step))
                    }
                    other => other.map_err(|error| keyd_error(error, key, step)),
                }
            }
        }
    }

    /// The public key behind `key`. With `cached`, a previously fetched value may be returned.
    pub async fn public_key(
        &self,
        key: SigningKey<'_>,
        cached: bool,
    ) -> Result<PublicKey, CertError> {
        const STEP: &str = "reading a public key";
        let handle = match key {
            SigningKey::Caller(handle) => handle.clone(),
            SigningKey::Certd(key_id) => self.handle_for(key_id).await?,
        };
        let digest = handle_digest(&handle);
        if cached {
            if let Some(public_key) = lock(&self.public_keys).get(&digest).cloned() {
                return Ok(public_key);
            }
        }
        let client = &self.client;
        let algorithm = self
            .with_handle(key, STEP, |handle| async move {
                client
                    .get_key_pair_public_parameter(&handle, "algorithm")
                    .await
            })
            .await?;
        let parameter = |name: &'static str| {
            self.with_handle(key, STEP, move |handle| async move {
                client.get_key_pair_public_parameter(&handle, name).await
            })
        };
        let public_key = match algorithm.as_str() {
            "ECDSA" => {
                let (curve_oid, point) =
                    tokio::try_join!(parameter("ec-curve-oid"), parameter("ec-point"))?;
                PublicKey::Ec {
                    curve_oid: decode_parameter(STEP, &curve_oid)?,
                    point: decode_parameter(STEP, &point)?,
                }
            }
            "RSA" => {
                let (modulus, exponent) =
                    tokio::try_join!(parameter("rsa-modulus"), parameter("rsa-exponent"))?;
                PublicKey::Rsa {
                    modulus: decode_parameter(STEP, &modulus)?,
                    exponent: decode_parameter(STEP, &exponent)?,
                }
            }
            other => {
                return Err(CertError::Keyd {
                    step: STEP,
                    source: ClientError::Status {
                        status: StatusCode::BAD_GATEWAY,
                        message: format!("unknown key algorithm {other:?}"),
                    },
                })
            }
        };
        let mut public_keys = lock(&self.public_keys);
        if public_keys.len() >= CACHE_LIMIT {
            public_keys.clear();
        }
        public_keys.insert(digest, public_key.clone());
        Ok(public_key)
    }

    /// Drops what is cached about `key` (after it turned out not to be what was expected).
    pub fn forget(&self, key: SigningKey<'_>) {
        match key {
            SigningKey::Caller(handle) => {
                lock(&self.public_keys).remove(&handle_digest(handle));
            }
            SigningKey::Certd(key_id) => {
                if let Some(handle) = lock(&self.handles).remove(key_id) {
                    lock(&self.public_keys).remove(&handle_digest(&handle));
                }
            }
        }
    }

    /// Signs a TBSCertificate with `key`: ECDSA over SHA-256(TBS) through keyd `/sign`, or RSA
    /// PKCS#1 v1.5 over the SHA-256 DigestInfo through keyd `/encrypt` `RSA-PKCS1`. Returns the
    /// signature bytes for the certificate's BIT STRING.
    pub async fn sign(
        &self,
        key: SigningKey<'_>,
        algorithm: SignatureAlgorithm,
        tbs_der: &[u8],
    ) -> Result<Vec<u8>, CertError> {
        let input = algorithm.keyd_input(tbs_der);
        let client = &self.client;
        let input = input.as_slice();
        self.with_handle(key, "signing", |handle| async move {
            match algorithm {
                SignatureAlgorithm::EcdsaSha256 => {
                    client
                        .sign(&handle, SignMechanism::Ecdsa { digest: input })
                        .await
                }
                SignatureAlgorithm::RsaSha256 => {
                    client
                        .encrypt(&handle, EncryptMechanism::RsaPkcs1, input)
                        .await
                }
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyd_failures_map_to_the_spec_statuses() {
        use http_common::ApiError as _;
        let status = |status: StatusCode| ClientError::Status {
            status,
            message: "keyd says no".into(),
        };
        let handle = KeyHandle("secret-handle".into());
        let caller = SigningKey::Caller(&handle);
        let own = SigningKey::Certd("local-ca");

        let error = keyd_error(status(StatusCode::BAD_REQUEST), caller, "signing");
        assert_eq!(error.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error.to_string(), "issuer.privateKeyHandle: keyd says no");
        let error = keyd_error(status(StatusCode::NOT_FOUND), caller, "signing");
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        let error = keyd_error(status(StatusCode::FORBIDDEN), own, "signing");
        assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            error.server_message(),
            "certd is not authorized in keyd for key \"local-ca\""
        );
        let error = keyd_error(status(StatusCode::SERVICE_UNAVAILABLE), own, "signing");
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.retry_after(), Some(1));
        let error = keyd_error(
            ClientError::Timeout {
                socket: "/run/keyd.sock".into(),
                timeout: std::time::Duration::from_secs(1),
            },
            caller,
            "signing",
        );
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!format!("{error:?}").contains("secret-handle"));
    }
}
