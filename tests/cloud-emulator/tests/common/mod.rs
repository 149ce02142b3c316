//! Test helpers: a real HTTPS client (OpenSSL + hyper, trusting the emulator's CA file and
//! optionally presenting a client certificate chain), a plain-HTTP admin client, and an
//! independent SAS token builder.

// Helpers outside #[test] fns are still test code: unwrap is the right failure mode here.
#![allow(dead_code, clippy::unwrap_used)]

use std::{net::SocketAddr, path::Path, pin::Pin, time::SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use cloud_emulator::pki::CertAndKey;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use openssl::{
    hash::MessageDigest,
    pkey::PKey,
    sign::Signer,
    ssl::{SslConnector, SslMethod, SslVerifyMode},
    x509::X509,
};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

/// An answer: status, headers, body parsed as JSON (`Null` if empty or not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: Value,
}

impl Answer {
    pub fn retry_after(&self) -> Option<u32> {
        self.headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }
}

/// Client identity for mutual TLS: leaf + key, plus extra chain certs (intermediates).
#[derive(Clone)]
pub struct ClientIdentity {
    pub leaf: CertAndKey,
    pub chain: Vec<X509>,
}

/// Request builder state.
pub struct Req<'a> {
    pub method: Method,
    pub path: String,
    pub host: Option<String>,
    pub headers: Vec<(&'a str, String)>,
    pub body: Option<Value>,
}

impl<'a> Req<'a> {
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Req {
            method,
            path: path.into(),
            host: None,
            headers: Vec::new(),
            body: None,
        }
    }
    pub fn host(mut self, h: impl Into<String>) -> Self {
        self.host = Some(h.into());
        self
    }
    pub fn header(mut self, k: &'a str, v: impl Into<String>) -> Self {
        self.headers.push((k, v.into()));
        self
    }
    pub fn auth(self, token: impl Into<String>) -> Self {
        self.header("authorization", token)
    }
    pub fn json(mut self, v: Value) -> Self {
        self.body = Some(v);
        self
    }
}

async fn send<S>(io: S, req: Req<'_>, default_host: &str) -> Answer
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method(req.method)
        .uri(req.path)
        .header("host", req.host.as_deref().unwrap_or(default_host));
    for (k, v) in &req.headers {
        b = b.header(*k, v);
    }
    let body = match &req.body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            Bytes::from(serde_json::to_vec(v).unwrap())
        }
        None => Bytes::new(),
    };
    let resp = sender
        .send_request(b.body(Full::new(body)).unwrap())
        .await
        .expect("send request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        json,
    }
}

/// HTTPS request to the emulator. The server name checked is `localhost`; the CA file is the
/// emulator's (as a client using `SSL_CERT_FILE` would).
pub async fn https(
    addr: SocketAddr,
    ca_file: &Path,
    identity: Option<&ClientIdentity>,
    req: Req<'_>,
) -> Answer {
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_ca_file(ca_file).unwrap();
    b.set_verify(SslVerifyMode::PEER);
    if let Some(id) = identity {
        b.set_certificate(&id.leaf.cert).unwrap();
        b.set_private_key(&id.leaf.key).unwrap();
        for c in &id.chain {
            b.add_extra_chain_cert(c.clone()).unwrap();
        }
    }
    let ssl = b
        .build()
        .configure()
        .unwrap()
        .into_ssl("localhost")
        .unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = SslStream::new(ssl, tcp).unwrap();
    Pin::new(&mut stream)
        .connect()
        .await
        .expect("TLS handshake with the emulator");
    send(stream, req, &format!("localhost:{}", addr.port())).await
}

/// Plain-HTTP admin request.
pub async fn admin(addr: SocketAddr, req: Req<'_>) -> Answer {
    let tcp = TcpStream::connect(addr).await.unwrap();
    send(tcp, req, "admin").await
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// HMAC-SHA256 computed here with OpenSSL, independently of the emulator's code.
pub fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let pkey = PKey::hmac(key).unwrap();
    let mut s = Signer::new(MessageDigest::sha256(), &pkey).unwrap();
    s.update(data).unwrap();
    s.sign_to_vec().unwrap()
}

/// Percent-encodes everything outside RFC 3986 unreserved characters.
pub fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A SAS token as a conforming client builds it (spec 9.1).
pub fn sas(resource: &str, key_b64: &str, expiry: u64, skn: Option<&str>) -> String {
    let sr = pct(&resource.to_lowercase());
    sas_with_literal_sr(&sr, key_b64, expiry, skn)
}

/// A SAS token whose `sr` text is used exactly as given.
pub fn sas_with_literal_sr(sr: &str, key_b64: &str, expiry: u64, skn: Option<&str>) -> String {
    let sig = b64(&hmac(&unb64(key_b64), format!("{sr}\n{expiry}").as_bytes()));
    let mut t = format!(
        "SharedAccessSignature sr={sr}&sig={}&se={expiry}",
        pct(&sig)
    );
    if let Some(skn) = skn {
        t.push_str(&format!("&skn={skn}"));
    }
    t
}

/// Group-enrollment device key derivation, computed independently.
pub fn derive(group_key_b64: &str, registration_id: &str) -> String {
    b64(&hmac(&unb64(group_key_b64), registration_id.as_bytes()))
}

/// A random 32-byte key, base64.
pub fn random_key() -> String {
    let mut k = [0u8; 32];
    openssl::rand::rand_bytes(&mut k).unwrap();
    b64(&k)
}

/// A config with fast polling defaults for tests.
pub fn test_config() -> cloud_emulator::Config {
    cloud_emulator::Config {
        assigning_polls: 1,
        retry_after_secs: 1,
        ..cloud_emulator::Config::default()
    }
}

/// Length of a base64 value once decoded.
pub fn unb64_len(s: &str) -> usize {
    unb64(s).len()
}
