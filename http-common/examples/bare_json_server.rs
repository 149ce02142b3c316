//! The benchmark baselines: a bare tokio + hyper server on a Unix socket with none of keyd's
//! logic. keyd's throughput is compared against it (`tools/bench-keyd.sh`).
//!
//! - `bare_json_server SOCKET` reads the body, parses it as JSON and answers a fixed JSON object:
//!   the limit of the HTTP side for HMAC, whose crypto costs next to nothing.
//! - `bare_json_server SOCKET --ecdsa` also decodes `parameters.digest`, signs it with an
//!   in-memory P-256 key through OpenSSL (as keyd's file store does) and answers the base64 DER
//!   signature: the limit for ECDSA, where the signature is most of the cost.

use std::convert::Infallible;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::Private;

#[derive(serde::Deserialize)]
struct Body {
    parameters: Parameters,
}

#[derive(serde::Deserialize)]
struct Parameters {
    digest: String,
}

/// The answer to one request body: a fixed one, or a real ECDSA signature over its digest.
fn answer(body: &[u8], key: Option<&EcKey<Private>>) -> Option<Bytes> {
    let Some(key) = key else {
        serde_json::from_slice::<serde_json::Value>(body).ok()?;
        return Some(Bytes::from_static(
            br#"{"signature":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#,
        ));
    };
    let body: Body = serde_json::from_slice(body).ok()?;
    let engine = base64::engine::general_purpose::STANDARD;
    let digest = engine.decode(body.parameters.digest).ok()?;
    let signature = openssl::ecdsa::EcdsaSig::sign(&digest, key)
        .and_then(|signature| signature.to_der())
        .ok()?;
    let json = serde_json::json!({ "signature": engine.encode(signature) });
    serde_json::to_vec(&json).ok().map(Bytes::from)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| std::io::Error::other("usage: bare_json_server SOCKET [--ecdsa]"))?;
    let key = match args.next().as_deref() {
        None => None,
        Some("--ecdsa") => {
            let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
            Some(Arc::new(EcKey::generate(&group)?))
        }
        Some(other) => return Err(std::io::Error::other(format!("unknown option {other}"))),
    };
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let key = key.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let key = key.clone();
                async move {
                    let body = request
                        .into_body()
                        .collect()
                        .await
                        .map(|collected| collected.to_bytes())
                        .unwrap_or_default();
                    let answer = answer(&body, key.as_deref())
                        .unwrap_or(Bytes::from_static(br#"{"message":"bad request"}"#));
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(answer))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
