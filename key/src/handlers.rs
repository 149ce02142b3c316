//! Thin handlers: parse the body, decode base64, call the service, shape the answer.

use base64::Engine as _;
use http::StatusCode;
use http_common::{empty_response, json_response, Request, Response};
use key_api::{
    CreateDerivedKeyRequest, CreateKeyPairRequest, CreateKeyRequest, DecryptRequest,
    DecryptResponse, DraftHandleResponse, DraftKeyPairRequest, DraftKeyRequest, DraftSignRequest,
    DraftSignResponse, EncryptRequest, EncryptResponse, ExportDerivedKeyResponse, KeyHandle,
    KeyHandleRequest, KeyHandleResponse, MoveKeyPairRequest, ParameterResponse, SignRequest,
    SignResponse,
};

use crate::error::KeyError;
use crate::service::{EncryptMechanism, KeyService};
use crate::store::{KeyKind, RsaPadding, Usage};

const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn decode(field: &'static str, text: &str) -> Result<Vec<u8>, KeyError> {
    BASE64
        .decode(text)
        .map_err(|error| KeyError::InvalidParameter {
            name: field,
            reason: format!("not valid base64: {error}"),
        })
}

fn encode(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

fn handle_response(handle: String) -> Response {
    json_response(
        StatusCode::OK,
        &KeyHandleResponse {
            key_handle: KeyHandle(handle),
        },
    )
}

fn required<'a, T>(field: &'static str, value: Option<&'a T>) -> Result<&'a T, KeyError> {
    value.ok_or(KeyError::InvalidParameter {
        name: field,
        reason: "is required".to_owned(),
    })
}

pub(crate) async fn create_key(
    service: &KeyService,
    request: &Request,
) -> Result<Response, KeyError> {
    let body: CreateKeyRequest = request.json()?;
    let usage = Usage::parse(&body.usage).ok_or_else(|| {
        KeyError::Unprocessable(format!(
            "invalid usage {:?}: expected a comma list of derive, encrypt, sign",
            body.usage
        ))
    })?;
    let import = body
        .key_bytes
        .as_deref()
        .map(|bytes| decode("keyBytes", bytes))
        .transpose()?;
    let handle = service
        .create_key(request.caller.uid, &body.key_id, usage, import)
        .await?;
    Ok(handle_response(handle))
}

pub(crate) async fn load_key(
    service: &KeyService,
    request: &Request,
    id: &str,
) -> Result<Response, KeyError> {
    Ok(handle_response(
        service.load_key(request.caller.uid, id).await?,
    ))
}

pub(crate) async fn delete_key(
    service: &KeyService,
    request: &Request,
) -> Result<Response, KeyError> {
    let body: KeyHandleRequest = request.json()?;
    service
        .delete(request.caller.uid, &body.key_handle.0, KeyKind::Symmetric)
        .await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub(crate) async fn create_key_pair(
    service: &KeyService,
    request: &Request,
) -> Result<Response, KeyError> {
    let body: CreateKeyPairRequest = request.json()?;
    let handle = service
        .create_key_pair(
            request.caller.uid,
            &body.key_id,
            body.preferred_algorithms.as_deref(),
        )
        .await?;
    Ok(handle_response(handle))
}

pub(crate) async fn load_key_pair(
    service: &KeyService,
    request: &Request,
    id: &str,
) -> Result<Response, KeyError> {
    Ok(handle_response(
        service.load_key_pair(request.caller.uid, id).await?,
    ))
}

pub(crate) async fn delete_key_pair(
    service: &KeyService,
    request: &Request,
) -> Result<Response, KeyError> {
    let body: KeyHandleRequest = request.json()?;
    service
        .delete(request.caller.uid, &body.key_handle.0, KeyKind::Pair)
        .await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub(crate) async fn move_key_pair(
    service: &KeyService,
    request: &Request,
    to: &str,
) -> Result<Response, KeyError> {
    let body: MoveKeyPairRequest = request.json()?;
    service
        .move_key_pair(request.caller.uid, &body.from, to)
        .await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub(crate) async fn get_parameter(
    service: &KeyService,
    request: &Request,
    name: &str,
) -> Result<Response, KeyError> {
    let body: KeyHandleRequest = request.json()?;
    let value = service.parameter(&body.key_handle.0, name).await?;
    Ok(json_response(StatusCode::OK, &ParameterResponse { value }))
}

pub(crate) async fn sign(service: &KeyService, request: &Request) -> Result<Response, KeyError> {
    let body: SignRequest = request.json()?;
    let handle = &body.key_handle.0;
    let signature = match body.algorithm.as_str() {
        "ECDSA" => {
            let digest = decode(
                "parameters.digest",
                required("parameters.digest", body.parameters.digest.as_ref())?,
            )?;
            service.sign_ecdsa(handle, digest).await?
        }
        "HMAC-SHA256" => {
            let message = decode(
                "parameters.message",
                required("parameters.message", body.parameters.message.as_ref())?,
            )?;
            service.sign_hmac(handle, message).await?
        }
        other => {
            return Err(KeyError::BadRequest(format!(
                "unsupported algorithm {other:?}"
            )))
        }
    };
    Ok(json_response(
        StatusCode::OK,
        &SignResponse {
            signature: encode(&signature),
        },
    ))
}

pub(crate) async fn encrypt(service: &KeyService, request: &Request) -> Result<Response, KeyError> {
    let body: EncryptRequest = request.json()?;
    let plaintext = decode("plaintext", &body.plaintext)?;
    let handle = &body.key_handle.0;
    let ciphertext = match body.algorithm.as_str() {
        "AEAD" => {
            let parameters = required("parameters", body.parameters.as_ref())?;
            let iv = decode("parameters.iv", &parameters.iv)?;
            let aad = decode("parameters.aad", &parameters.aad)?;
            service
                .encrypt(
                    handle,
                    EncryptMechanism::Aead { iv: &iv, aad: &aad },
                    plaintext,
                )
                .await?
        }
        "RSA-PKCS1" => {
            service
                .encrypt(handle, EncryptMechanism::Rsa(RsaPadding::Pkcs1), plaintext)
                .await?
        }
        "RSA-NO-PADDING" => {
            service
                .encrypt(handle, EncryptMechanism::Rsa(RsaPadding::None), plaintext)
                .await?
        }
        other => {
            return Err(KeyError::BadRequest(format!(
                "unsupported algorithm {other:?}"
            )))
        }
    };
    Ok(json_response(
        StatusCode::OK,
        &EncryptResponse {
            ciphertext: encode(&ciphertext),
        },
    ))
}

pub(crate) async fn decrypt(service: &KeyService, request: &Request) -> Result<Response, KeyError> {
    let body: DecryptRequest = request.json()?;
    if body.algorithm != "AEAD" {
        return Err(KeyError::BadRequest(format!(
            "unsupported algorithm {:?} for decrypt",
            body.algorithm
        )));
    }
    let parameters = required("parameters", body.parameters.as_ref())?;
    let iv = decode("parameters.iv", &parameters.iv)?;
    let aad = decode("parameters.aad", &parameters.aad)?;
    let ciphertext = decode("ciphertext", &body.ciphertext)?;
    let plaintext = service
        .decrypt(&body.key_handle.0, &iv, &aad, ciphertext)
        .await?;
    Ok(json_response(
        StatusCode::OK,
        &DecryptResponse {
            plaintext: encode(&plaintext),
        },
    ))
}

pub(crate) async fn create_derived_key(
    service: &KeyService,
    request: &Request,
) -> Result<Response, KeyError> {
    let body: CreateDerivedKeyRequest = request.json()?;
    let data = decode("derivationData", &body.derivation_data)?;
    Ok(handle_response(
        service.derive(&body.base_key_handle.0, data).await?,
    ))
}

pub(crate) async fn export_derived_key(
    service: &KeyService,
    request: &Request,
) -> Result<Response, KeyError> {
    let body: KeyHandleRequest = request.json()?;
    let key = service.export_derived(&body.key_handle.0).await?;
    Ok(json_response(
        StatusCode::OK,
        &ExportDerivedKeyResponse { key: encode(&key) },
    ))
}

/// The draft routes take their ID from the (GET) body or the query; both given must agree.
fn draft_id(
    request: &Request,
    body_value: Option<String>,
    field: &'static str,
) -> Result<String, KeyError> {
    match (body_value, request.query_param(field)) {
        (Some(body), Some(query)) if body != query => Err(KeyError::InvalidParameter {
            name: field,
            reason: "body and query parameter disagree".to_owned(),
        }),
        (Some(value), _) | (None, Some(value)) => Ok(value),
        (None, None) => Err(KeyError::InvalidParameter {
            name: field,
            reason: "is required".to_owned(),
        }),
    }
}

fn draft_handle_response(handle: String) -> Response {
    json_response(
        StatusCode::OK,
        &DraftHandleResponse {
            keystorehandle: KeyHandle(handle),
        },
    )
}

fn draft_key_id(request: &Request) -> Result<String, KeyError> {
    let body: DraftKeyRequest = request.optional_json()?.unwrap_or_default();
    draft_id(request, body.keyid, "keyid")
}

fn draft_key_pair_id(request: &Request) -> Result<String, KeyError> {
    let body: DraftKeyPairRequest = request.optional_json()?.unwrap_or_default();
    draft_id(request, body.keypairid, "keypairid")
}

pub(crate) async fn draft_create_key(
    service: &KeyService,
    request: &Request,
) -> Result<Response, KeyError> {
    let id = draft_key_id(request)?;
    let handle = service
        .create_key(request.caller.uid, &id, Usage::DERIVE_SIGN, None)
        .await?;
    Ok(draft_handle_response(handle))
}

pub(crate) async fn draft_load_key(
    service: &KeyService,
    request: &Request,
) -> Result<Response, KeyError> {
    let id = draft_key_id(request)?;
    Ok(draft_handle_response(
        service.load_key(request.caller.uid, &id).await?,
    ))
}

pub(crate) async fn draft_create_key_pair(
    service: &KeyService,
    request: &Request,
) -> Result<Response, KeyError> {
    let id = draft_key_pair_id(request)?;
    Ok(draft_handle_response(
        service
            .create_key_pair(request.caller.uid, &id, None)
            .await?,
    ))
}

pub(crate) async fn draft_load_key_pair(
    service: &KeyService,
    request: &Request,
) -> Result<Response, KeyError> {
    let id = draft_key_pair_id(request)?;
    Ok(draft_handle_response(
        service.load_key_pair(request.caller.uid, &id).await?,
    ))
}

pub(crate) async fn draft_sign(
    service: &KeyService,
    request: &Request,
) -> Result<Response, KeyError> {
    let body: DraftSignRequest = request.json()?;
    let handle = required("keystorehandle", body.keystorehandle.as_ref())?;
    let algo = required("algo", body.algo.as_ref())?;
    if algo != "HMACSHA256" && algo != "HMAC-SHA256" {
        return Err(KeyError::BadRequest(format!("unsupported algo {algo:?}")));
    }
    let data = decode("data", required("data", body.data.as_ref())?)?;
    let digest = service.sign_hmac(&handle.0, data).await?;
    Ok(json_response(
        StatusCode::OK,
        &DraftSignResponse {
            digest: encode(&digest),
        },
    ))
}
