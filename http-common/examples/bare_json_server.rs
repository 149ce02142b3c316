//! The benchmark baseline: a bare tokio + hyper server on a Unix socket that only reads the body,
//! parses it as JSON and answers a fixed JSON object. keyd's throughput is compared against it
//! (`tools/bench-keyd.sh`).
//!
//! Usage: `bare_json_server /path/to/socket`

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| std::io::Error::other("usage: bare_json_server SOCKET"))?;
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(|request: hyper::Request<Incoming>| async move {
                    let body = request
                        .into_body()
                        .collect()
                        .await
                        .map(|collected| collected.to_bytes())
                        .unwrap_or_default();
                    let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&body);
                    let answer: &'static [u8] = if parsed.is_ok() {
                        br#"{"signature":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}"#
                    } else {
                        br#"{"message":"bad json"}"#
                    };
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(answer)))
                            .unwrap_or_default(),
                    )
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
