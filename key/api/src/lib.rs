//! keyd's API: the serializable wire types of every route and the one async [`Client`].
//!
//! These are the only keyd types that cross a socket. Byte fields travel as standard base64
//! strings; the typed client methods take and return raw bytes.

use base64::Engine as _;
use http::{Method, StatusCode};
use http_common::{ClientError, UdsClient};
use serde::{Deserialize, Serialize};

#[cfg(feature = "rustls")]
pub mod rustls;
#[cfg(feature = "signing")]
pub mod signing;
pub mod tpm;

/// The api-version the client sends (every compatible route exists in both versions).
pub const API_VERSION: &str = "2021-05-01";

/// Every api-version keyd knows, oldest first.
pub const API_VERSIONS: &[&str] = &["2020-09-01", "2021-05-01"];

/// An opaque key handle. It is a bearer credential: its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyHandle(pub String);

impl std::fmt::Debug for KeyHandle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("KeyHandle(<redacted>)")
    }
}

/// `POST /key`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateKeyRequest {
    /// The key ID.
    pub key_id: String,
    /// Comma list of `derive`, `encrypt`, `sign`.
    pub usage: String,
    /// Base64 key bytes to import (replaces an existing key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_bytes: Option<String>,
}

/// The answer of every route that hands out a handle.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyHandleResponse {
    /// The handle.
    pub key_handle: KeyHandle,
}

/// `DELETE /key`, `DELETE /keypair`, `POST /parameters/*`, `POST /derivedkey/export`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyHandleRequest {
    /// The handle.
    pub key_handle: KeyHandle,
}

/// `POST /keypair`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateKeyPairRequest {
    /// The key pair ID.
    pub key_id: String,
    /// `:`-separated algorithm preference (`ec-p256`, `rsa-2048`, `rsa-4096`, `*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_algorithms: Option<String>,
}

/// `POST /keypair/{keyId}` (move).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MoveKeyPairRequest {
    /// The source key pair ID.
    pub from: String,
}

/// `POST /parameters/{name}` answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParameterResponse {
    /// The parameter value (base64, or plain text for `algorithm`).
    pub value: String,
}

/// `POST /sign`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignRequest {
    /// The handle.
    pub key_handle: KeyHandle,
    /// `ECDSA` or `HMAC-SHA256`.
    pub algorithm: String,
    /// The mechanism's parameters.
    pub parameters: SignParameters,
}

/// `parameters` of `POST /sign`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignParameters {
    /// ECDSA: base64 of the digest to sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// HMAC-SHA256: base64 of the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `POST /sign` answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignResponse {
    /// Base64 signature.
    pub signature: String,
}

/// `parameters` of AEAD encrypt/decrypt.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AeadParameters {
    /// Base64 IV (1–256 bytes).
    pub iv: String,
    /// Base64 additional authenticated data.
    pub aad: String,
}

/// `POST /encrypt`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptRequest {
    /// The handle.
    pub key_handle: KeyHandle,
    /// `AEAD`, `RSA-PKCS1` or `RSA-NO-PADDING`.
    pub algorithm: String,
    /// AEAD parameters (absent or null for the RSA algorithms).
    #[serde(default)]
    pub parameters: Option<AeadParameters>,
    /// Base64 plaintext.
    pub plaintext: String,
}

/// `POST /encrypt` answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptResponse {
    /// Base64 ciphertext.
    pub ciphertext: String,
}

/// `POST /decrypt`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptRequest {
    /// The handle.
    pub key_handle: KeyHandle,
    /// `AEAD`.
    pub algorithm: String,
    /// AEAD parameters.
    #[serde(default)]
    pub parameters: Option<AeadParameters>,
    /// Base64 ciphertext.
    pub ciphertext: String,
}

/// `POST /decrypt` answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptResponse {
    /// Base64 plaintext.
    pub plaintext: String,
}

/// `POST /derivedkey`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateDerivedKeyRequest {
    /// Handle of the symmetric base key.
    pub base_key_handle: KeyHandle,
    /// Base64 derivation data (0–1024 bytes).
    pub derivation_data: String,
}

/// `POST /derivedkey/export` answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportDerivedKeyResponse {
    /// Base64 of the 32 derived key bytes.
    pub key: String,
}

/// Draft `POST|GET /keystore/key`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DraftKeyRequest {
    /// The key ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyid: Option<String>,
}

/// Draft `POST|GET /keystore/keypair`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DraftKeyPairRequest {
    /// The key pair ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keypairid: Option<String>,
}

/// Draft answer carrying a handle.
#[derive(Debug, Serialize, Deserialize)]
pub struct DraftHandleResponse {
    /// The handle.
    pub keystorehandle: KeyHandle,
}

/// Draft `POST /keystore/sign`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DraftSignRequest {
    /// The handle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keystorehandle: Option<KeyHandle>,
    /// `HMACSHA256` (or `HMAC-SHA256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algo: Option<String>,
    /// Base64 data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// Draft `POST /keystore/sign` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct DraftSignResponse {
    /// Base64 HMAC.
    pub digest: String,
}

/// What `/sign` should do.
#[derive(Clone, Copy, Debug)]
pub enum SignMechanism<'a> {
    /// ECDSA over a digest the caller computed.
    Ecdsa {
        /// The digest.
        digest: &'a [u8],
    },
    /// HMAC-SHA256 over a message.
    HmacSha256 {
        /// The message.
        message: &'a [u8],
    },
}

/// What `/encrypt` should do.
#[derive(Clone, Copy, Debug)]
pub enum EncryptMechanism<'a> {
    /// AES-GCM in keyd's ciphertext format.
    Aead {
        /// The IV.
        iv: &'a [u8],
        /// The additional authenticated data.
        aad: &'a [u8],
    },
    /// RSA private-key operation with PKCS#1 v1.5 type-1 padding.
    RsaPkcs1,
    /// Raw RSA private-key operation.
    RsaNoPadding,
}

/// The async client for keyd.
#[derive(Clone, Debug)]
pub struct Client {
    http: UdsClient,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(text: &str) -> Result<Vec<u8>, ClientError> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|error| ClientError::Status {
            status: StatusCode::BAD_GATEWAY,
            message: format!("keyd answered invalid base64: {error}"),
        })
}

fn encode_id(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

impl Client {
    /// A client for keyd at `unix:///path`.
    pub fn from_uri(uri: &str) -> Result<Self, ClientError> {
        Ok(Client {
            http: UdsClient::from_uri(uri)?,
        })
    }

    /// A client over an existing HTTP client.
    pub fn new(http: UdsClient) -> Self {
        Client { http }
    }

    fn path(route: &str) -> String {
        format!("{route}?api-version={API_VERSION}")
    }

    async fn handle(
        &self,
        method: Method,
        route: &str,
        body: Option<&impl Serialize>,
    ) -> Result<KeyHandle, ClientError> {
        let response: KeyHandleResponse = self
            .http
            .json(method, &Self::path(route), body, StatusCode::OK)
            .await?;
        Ok(response.key_handle)
    }

    /// Creates symmetric key `id` if absent (`usage` e.g. `"derive,sign"`).
    pub async fn create_key_if_not_exists(
        &self,
        id: &str,
        usage: &str,
    ) -> Result<KeyHandle, ClientError> {
        let body = CreateKeyRequest {
            key_id: id.to_owned(),
            usage: usage.to_owned(),
            key_bytes: None,
        };
        self.handle(Method::POST, "/key", Some(&body)).await
    }

    /// Imports `bytes` as symmetric key `id`, replacing any existing one.
    pub async fn import_key(
        &self,
        id: &str,
        usage: &str,
        bytes: &[u8],
    ) -> Result<KeyHandle, ClientError> {
        let body = CreateKeyRequest {
            key_id: id.to_owned(),
            usage: usage.to_owned(),
            key_bytes: Some(b64(bytes)),
        };
        self.handle(Method::POST, "/key", Some(&body)).await
    }

    /// A handle to existing symmetric key `id`.
    pub async fn load_key(&self, id: &str) -> Result<KeyHandle, ClientError> {
        self.handle(Method::GET, &format!("/key/{}", encode_id(id)), None::<&()>)
            .await
    }

    /// Creates key pair `id` if absent.
    pub async fn create_key_pair_if_not_exists(
        &self,
        id: &str,
        preferred_algorithms: Option<&str>,
    ) -> Result<KeyHandle, ClientError> {
        let body = CreateKeyPairRequest {
            key_id: id.to_owned(),
            preferred_algorithms: preferred_algorithms.map(str::to_owned),
        };
        self.handle(Method::POST, "/keypair", Some(&body)).await
    }

    /// A handle to existing key pair `id`.
    pub async fn load_key_pair(&self, id: &str) -> Result<KeyHandle, ClientError> {
        self.handle(
            Method::GET,
            &format!("/keypair/{}", encode_id(id)),
            None::<&()>,
        )
        .await
    }

    /// Moves key pair `from` to `to`, replacing `to`.
    pub async fn move_key_pair(&self, from: &str, to: &str) -> Result<(), ClientError> {
        let body = MoveKeyPairRequest {
            from: from.to_owned(),
        };
        self.http
            .no_content(
                Method::POST,
                &Self::path(&format!("/keypair/{}", encode_id(to))),
                Some(&body),
                StatusCode::NO_CONTENT,
            )
            .await
    }

    /// Deletes the symmetric key behind `handle`.
    pub async fn delete_key(&self, handle: &KeyHandle) -> Result<(), ClientError> {
        let body = KeyHandleRequest {
            key_handle: handle.clone(),
        };
        self.http
            .no_content(
                Method::DELETE,
                &Self::path("/key"),
                Some(&body),
                StatusCode::NO_CONTENT,
            )
            .await
    }

    /// Deletes the key pair behind `handle`.
    pub async fn delete_key_pair(&self, handle: &KeyHandle) -> Result<(), ClientError> {
        let body = KeyHandleRequest {
            key_handle: handle.clone(),
        };
        self.http
            .no_content(
                Method::DELETE,
                &Self::path("/keypair"),
                Some(&body),
                StatusCode::NO_CONTENT,
            )
            .await
    }

    /// A public parameter of a key pair (`algorithm`, `ec-curve-oid`, `ec-point`,
    /// `rsa-modulus`, `rsa-exponent`), as keyd sends it.
    pub async fn get_key_pair_public_parameter(
        &self,
        handle: &KeyHandle,
        name: &str,
    ) -> Result<String, ClientError> {
        let body = KeyHandleRequest {
            key_handle: handle.clone(),
        };
        let response: ParameterResponse = self
            .http
            .json(
                Method::POST,
                &Self::path(&format!("/parameters/{}", encode_id(name))),
                Some(&body),
                StatusCode::OK,
            )
            .await?;
        Ok(response.value)
    }

    /// Signs with the key behind `handle`.
    pub async fn sign(
        &self,
        handle: &KeyHandle,
        mechanism: SignMechanism<'_>,
    ) -> Result<Vec<u8>, ClientError> {
        let (algorithm, parameters) = match mechanism {
            SignMechanism::Ecdsa { digest } => (
                "ECDSA",
                SignParameters {
                    digest: Some(b64(digest)),
                    message: None,
                },
            ),
            SignMechanism::HmacSha256 { message } => (
                "HMAC-SHA256",
                SignParameters {
                    digest: None,
                    message: Some(b64(message)),
                },
            ),
        };
        let body = SignRequest {
            key_handle: handle.clone(),
            algorithm: algorithm.to_owned(),
            parameters,
        };
        let response: SignResponse = self
            .http
            .json(
                Method::POST,
                &Self::path("/sign"),
                Some(&body),
                StatusCode::OK,
            )
            .await?;
        unb64(&response.signature)
    }

    /// Encrypts with the key behind `handle`.
    pub async fn encrypt(
        &self,
        handle: &KeyHandle,
        mechanism: EncryptMechanism<'_>,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let (algorithm, parameters) = match mechanism {
            EncryptMechanism::Aead { iv, aad } => (
                "AEAD",
                Some(AeadParameters {
                    iv: b64(iv),
                    aad: b64(aad),
                }),
            ),
            EncryptMechanism::RsaPkcs1 => ("RSA-PKCS1", None),
            EncryptMechanism::RsaNoPadding => ("RSA-NO-PADDING", None),
        };
        let body = EncryptRequest {
            key_handle: handle.clone(),
            algorithm: algorithm.to_owned(),
            parameters,
            plaintext: b64(plaintext),
        };
        let response: EncryptResponse = self
            .http
            .json(
                Method::POST,
                &Self::path("/encrypt"),
                Some(&body),
                StatusCode::OK,
            )
            .await?;
        unb64(&response.ciphertext)
    }

    /// AEAD-decrypts with the key behind `handle`.
    pub async fn decrypt(
        &self,
        handle: &KeyHandle,
        iv: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        let body = DecryptRequest {
            key_handle: handle.clone(),
            algorithm: "AEAD".to_owned(),
            parameters: Some(AeadParameters {
                iv: b64(iv),
                aad: b64(aad),
            }),
            ciphertext: b64(ciphertext),
        };
        let response: DecryptResponse = self
            .http
            .json(
                Method::POST,
                &Self::path("/decrypt"),
                Some(&body),
                StatusCode::OK,
            )
            .await?;
        unb64(&response.plaintext)
    }

    /// A handle to `HMAC-SHA256(base, derivation_data)`.
    pub async fn create_derived_key(
        &self,
        base: &KeyHandle,
        derivation_data: &[u8],
    ) -> Result<KeyHandle, ClientError> {
        let body = CreateDerivedKeyRequest {
            base_key_handle: base.clone(),
            derivation_data: b64(derivation_data),
        };
        self.handle(Method::POST, "/derivedkey", Some(&body)).await
    }

    /// The bytes of a derived key.
    pub async fn export_derived_key(&self, handle: &KeyHandle) -> Result<Vec<u8>, ClientError> {
        let body = KeyHandleRequest {
            key_handle: handle.clone(),
        };
        let response: ExportDerivedKeyResponse = self
            .http
            .json(
                Method::POST,
                &Self::path("/derivedkey/export"),
                Some(&body),
                StatusCode::OK,
            )
            .await?;
        unb64(&response.key)
    }
}
