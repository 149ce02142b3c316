//! Thin handlers: parse the body, decode base64, call the service, shape the answer.

use base64::Engine as _;
use http::StatusCode;
use http_common::{empty_response, json_response, Request, Response};
use key_api::{
    CreateDerivedKeyRequest, CreateKeyPairRequest, CreateKeyRequest, DecryptRequest,
    DecryptResponse, DraftHandleResponse, DraftKeyPairRequest, DraftKeyRequest, DraftSignRequest,
    DraftSignResponse, EncryptRequest, EncryptResponse, ExportDerivedKeyResponse, KeyHandle,
    KeyHandleRequest, KeyHandleResponse, MoveKeyPairRequest, ParameterResponse,
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

/// The server's view of [`key_api::SignRequest`]: the same fields, borrowed from the body, so the
/// hot path copies no strings (a handle is a few hundred bytes). `signature_body` answers
/// without a serializer. A test checks that every client request parses here.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SignBody<'a> {
    #[serde(borrow)]
    key_handle: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    algorithm: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    parameters: SignBodyParameters<'a>,
}

#[derive(serde::Deserialize)]
struct SignBodyParameters<'a> {
    #[serde(default, borrow)]
    digest: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    message: Option<std::borrow::Cow<'a, str>>,
}

/// `{"signature":"<base64>"}`: the standard base64 alphabet needs no JSON escaping.
fn signature_body(signature: &[u8]) -> Response {
    const HEAD: &[u8] = br#"{"signature":""#;
    let mut json = Vec::with_capacity(HEAD.len() + signature.len().div_ceil(3) * 4 + 2);
    json.extend_from_slice(HEAD);
    let start = json.len();
    json.resize(start + signature.len().div_ceil(3) * 4, 0);
    let written = BASE64
        .encode_slice(signature, &mut json[start..])
        .unwrap_or_default();
    json.truncate(start + written);
    json.extend_from_slice(br#""}"#);
    let mut response = http_common::Response::new(http_common::full_body(json));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

pub(crate) async fn sign(service: &KeyService, request: &Request) -> Result<Response, KeyError> {
    let body: SignBody<'_> = request.json()?;
    let handle = &body.key_handle;
    let signature = match &*body.algorithm {
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
    Ok(signature_body(&signature))
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use key_api::{SignParameters, SignRequest, SignResponse};

    #[test]
    fn sign_body_reads_what_the_client_sends() {
        for (algorithm, digest, message) in [
            ("ECDSA", Some("AAEC"), None),
            ("HMAC-SHA256", None, Some("aGVsbG8=")),
        ] {
            let sent = SignRequest {
                // `/` is escaped by some encoders: the body then owns the unescaped handle.
                key_handle: KeyHandle("sr=a/b+c==&sig=d/e=".to_owned()),
                algorithm: algorithm.to_owned(),
                parameters: SignParameters {
                    digest: digest.map(str::to_owned),
                    message: message.map(str::to_owned),
                },
            };
            let plain = serde_json::to_string(&sent).unwrap();
            let escaped = plain.replace('/', "\\/");
            for json in [plain, escaped] {
                let body: SignBody<'_> = serde_json::from_str(&json).unwrap();
                assert_eq!(body.key_handle, "sr=a/b+c==&sig=d/e=");
                assert_eq!(body.algorithm, algorithm);
                assert_eq!(body.parameters.digest.as_deref(), digest);
                assert_eq!(body.parameters.message.as_deref(), message);
            }
        }
        let missing = serde_json::from_str::<SignBody<'_>>(r#"{"keyHandle":"h","algorithm":"x"}"#);
        let Err(error) = missing else {
            panic!("a body without parameters was accepted")
        };
        assert!(error.to_string().contains("parameters"), "{error}");
    }

    #[tokio::test]
    async fn signature_body_is_the_client_answer() {
        for length in [0, 1, 2, 3, 32, 64, 71, 72, 256] {
            let signature: Vec<u8> = (0..length).map(|byte| (byte * 7 + 3) as u8).collect();
            let response = signature_body(&signature);
            assert_eq!(
                response.headers()[http::header::CONTENT_TYPE],
                "application/json"
            );
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let parsed: SignResponse = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(BASE64.decode(parsed.signature).unwrap(), signature);
        }
    }
}
