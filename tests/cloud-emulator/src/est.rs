//! An EST server (RFC 7030) for tests of certd's EST client: `cacerts`, `simpleenroll` and
//! `simplereenroll` under `/.well-known/est/` (with an optional label segment), answering
//! certs-only PKCS#7 in base64 (`Content-Transfer-Encoding: base64`).
//!
//! Authentication: HTTP Basic (when configured) or a TLS client certificate that chains to a
//! configured bootstrap CA or to the EST CA itself (a certificate this server issued).
//! `simplereenroll` needs a client certificate the EST CA issued, whose subject the CSR repeats.
//! Tests can make the next N enrollments answer 202 with a `Retry-After`, set the validity of
//! issued certificates (seconds, so renewal is testable), stop and resume the listener on the same
//! port ("EST down"), and read a request log.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cloud_emulator::EmulatorError> {
//! use cloud_emulator::est::{EstConfig, EstServer};
//! let est = EstServer::start(EstConfig {
//!     basic: Some(("user".into(), "pass".into())),
//!     ..EstConfig::default()
//! })
//! .await?;
//! println!("enroll at {}, trust {}", est.url(None), est.ca_cert_pem());
//! # Ok(()) }
//! ```

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use openssl::{
    asn1::Asn1Time,
    bn::{BigNum, MsbOption},
    hash::MessageDigest,
    ssl::{Ssl, SslAcceptor, SslMethod, SslOptions, SslSessionCacheMode, SslVerifyMode},
    x509::{
        extension::{
            AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage,
            SubjectKeyIdentifier,
        },
        X509Builder, X509Req, X509,
    },
};
use tokio::{net::TcpListener, task::JoinHandle, task::JoinSet};
use tokio_openssl::SslStream;

use crate::{
    pki::{self, CertAndKey, CertKind},
    util, EmulatorError,
};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// Deadline for the TLS handshake and for a request body.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the EST server starts with (all of it can be changed while it runs).
#[derive(Debug, Clone)]
pub struct EstConfig {
    /// Listen address (port 0 picks one).
    pub listen: SocketAddr,
    /// HTTP Basic credentials accepted, if any.
    pub basic: Option<(String, String)>,
    /// PEM CA certificates whose client certificates may enroll (bootstrap CAs).
    pub client_ca_pems: Vec<String>,
    /// Validity of issued certificates, in seconds.
    pub validity_secs: i64,
    /// Labels (`/.well-known/est/<label>/`) whose enrollments issue CA certificates
    /// (CA:TRUE, pathlen 0, keyCertSign): the EST server's profile for an Edge CA.
    pub ca_labels: Vec<String>,
}

impl Default for EstConfig {
    fn default() -> Self {
        EstConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            basic: None,
            client_ca_pems: Vec::new(),
            validity_secs: 30 * 86_400,
            ca_labels: Vec::new(),
        }
    }
}

/// One request the EST server answered.
#[derive(Debug, Clone)]
pub struct EstLogEntry {
    /// When it arrived.
    pub time: SystemTime,
    /// `cacerts`, `simpleenroll`, `simplereenroll` or the unknown last path segment.
    pub operation: String,
    /// The label segment, if any.
    pub label: Option<String>,
    /// The answer's status.
    pub status: u16,
    /// `basic`, `cert` or `none`: what authenticated the request.
    pub auth: &'static str,
    /// Subject CN of the TLS client certificate, if one was presented.
    pub client_cert_cn: Option<String>,
    /// Serial (uppercase hex) of the TLS client certificate, if one was presented.
    pub client_cert_serial: Option<String>,
    /// The `Content-Transfer-Encoding` header of the request.
    pub transfer_encoding: Option<String>,
    /// Subject CN of the CSR, for enrollments.
    pub csr_cn: Option<String>,
    /// Serial (uppercase hex) of the certificate issued, if one was.
    pub issued_serial: Option<String>,
    /// `Retry-After` of a 202 answer.
    pub retry_after: Option<u32>,
}

#[derive(Debug)]
struct EstState {
    basic: Option<(String, String)>,
    client_cas: Vec<X509>,
    validity_secs: i64,
    ca_labels: Vec<String>,
    /// The next this many enrollments answer 202 with `retry_after`.
    pending: u32,
    retry_after: u32,
    log: Vec<EstLogEntry>,
}

#[derive(Debug)]
struct Inner {
    ca: CertAndKey,
    state: Mutex<EstState>,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, EstState> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// A running EST server. Dropping it stops it.
pub struct EstServer {
    addr: SocketAddr,
    inner: Arc<Inner>,
    acceptor: Arc<SslAcceptor>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for EstServer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EstServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl EstServer {
    /// Creates the EST CA and its server certificate (`localhost`, `127.0.0.1`) and listens.
    pub async fn start(config: EstConfig) -> Result<EstServer, EmulatorError> {
        let ca = pki::issue(
            "cloud emulator EST CA",
            CertKind::Ca,
            None,
            &[],
            pki::DEFAULT_VALIDITY,
        )?;
        let server = pki::issue(
            "cloud emulator EST server",
            CertKind::Server,
            Some(&ca),
            &["localhost".to_string(), "127.0.0.1".to_string()],
            pki::DEFAULT_VALIDITY,
        )?;
        let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
        builder.set_private_key(&server.key)?;
        builder.set_certificate(&server.cert)?;
        builder.add_extra_chain_cert(ca.cert.clone())?;
        builder.check_private_key()?;
        // Any client certificate is accepted at handshake time and checked per request.
        builder.set_verify_callback(SslVerifyMode::PEER, |_preverify, _context| true);
        builder.set_session_id_context(b"cloud-emulator-est")?;
        builder.set_session_cache_mode(SslSessionCacheMode::OFF);
        builder.set_options(SslOptions::NO_TICKET);
        let acceptor = Arc::new(builder.build());

        let mut client_cas = Vec::new();
        for pem in &config.client_ca_pems {
            client_cas.extend(pki::parse_pem_bundle(pem)?);
        }
        let inner = Arc::new(Inner {
            ca,
            state: Mutex::new(EstState {
                basic: config.basic,
                client_cas,
                validity_secs: config.validity_secs,
                ca_labels: config.ca_labels,
                pending: 0,
                retry_after: 0,
                log: Vec::new(),
            }),
        });
        let listener = bind(config.listen).await?;
        let addr = listener.local_addr().map_err(|source| EmulatorError::Io {
            context: "EST listener address".to_string(),
            source,
        })?;
        let server = EstServer {
            addr,
            inner,
            acceptor,
            task: Mutex::new(None),
        };
        server.serve(listener);
        log::info!("EST server listening on https://{addr}/.well-known/est/");
        Ok(server)
    }

    fn serve(&self, listener: TcpListener) {
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&self.acceptor),
            Arc::clone(&self.inner),
        ));
        if let Some(old) = self.task_slot().replace(task) {
            old.abort();
        }
    }

    fn task_slot(&self) -> std::sync::MutexGuard<'_, Option<JoinHandle<()>>> {
        self.task
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL (`https://localhost:PORT/.well-known/est/`, plus `label/`), ending in `/`.
    pub fn url(&self, label: Option<&str>) -> String {
        let mut url = format!("https://localhost:{}/.well-known/est/", self.addr.port());
        if let Some(label) = label {
            url.push_str(label);
            url.push('/');
        }
        url
    }

    /// The EST CA: it signs the server certificate and every issued certificate.
    pub fn ca(&self) -> &CertAndKey {
        &self.inner.ca
    }

    /// The EST CA certificate (PEM).
    pub fn ca_cert_pem(&self) -> String {
        self.inner.ca.cert_pem()
    }

    /// Stops listening and drops open connections: clients get "connection refused".
    pub fn stop(&self) {
        if let Some(task) = self.task_slot().take() {
            task.abort();
        }
    }

    /// Listens again on the same port after [`EstServer::stop`].
    pub async fn resume(&self) -> Result<(), EmulatorError> {
        self.stop();
        // The aborted accept loop drops its listener when it is next polled; retry the bind.
        let mut attempts = 0;
        let listener = loop {
            match bind(self.addr).await {
                Ok(listener) => break listener,
                Err(error) if attempts < 100 => {
                    attempts += 1;
                    log::debug!("EST rebind: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => return Err(error),
            }
        };
        self.serve(listener);
        Ok(())
    }

    /// The next `count` enrollments (`simpleenroll`, `simplereenroll`) answer 202 with
    /// `Retry-After: retry_after_secs`.
    pub fn set_pending(&self, count: u32, retry_after_secs: u32) {
        let mut state = self.inner.lock();
        state.pending = count;
        state.retry_after = retry_after_secs;
    }

    /// Sets the validity of certificates issued from now on.
    pub fn set_validity_secs(&self, seconds: i64) {
        self.inner.lock().validity_secs = seconds;
    }

    /// Sets (or removes) the accepted Basic credentials.
    pub fn set_basic(&self, basic: Option<(String, String)>) {
        self.inner.lock().basic = basic;
    }

    /// Trusts another CA (PEM) for client-certificate authentication.
    pub fn add_client_ca(&self, pem: &str) -> Result<(), EmulatorError> {
        let certificates = pki::parse_pem_bundle(pem)?;
        self.inner.lock().client_cas.extend(certificates);
        Ok(())
    }

    /// Every request answered so far, oldest first.
    pub fn log(&self) -> Vec<EstLogEntry> {
        self.inner.lock().log.clone()
    }
}

impl Drop for EstServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, EmulatorError> {
    let io = |source| EmulatorError::Io {
        context: format!("bind EST listener {addr}"),
        source,
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(io)?;
    socket.set_reuseaddr(true).map_err(io)?;
    socket.bind(addr).map_err(io)?;
    socket.listen(64).map_err(io)
}

/// Accepts connections; the connections live in this task's set, so aborting the task (stop)
/// drops them all.
async fn accept_loop(listener: TcpListener, acceptor: Arc<SslAcceptor>, inner: Arc<Inner>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _peer)) => {
                    connections.spawn(connection(tcp, Arc::clone(&acceptor), Arc::clone(&inner)));
                }
                Err(error) => {
                    log::warn!("EST accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// The client certificate chain of a connection: leaf, then the rest.
#[derive(Debug, Clone)]
struct Peer {
    leaf: X509,
    rest: Vec<X509>,
}

async fn connection(tcp: tokio::net::TcpStream, acceptor: Arc<SslAcceptor>, inner: Arc<Inner>) {
    let stream = Ssl::new(acceptor.context()).and_then(|ssl| SslStream::new(ssl, tcp));
    let Ok(mut stream) = stream else {
        return;
    };
    match tokio::time::timeout(IO_TIMEOUT, Pin::new(&mut stream).accept()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            log::debug!("EST TLS handshake failed: {error}");
            return;
        }
        Err(_) => return,
    }
    let peer = stream.ssl().peer_certificate().map(|leaf| {
        let leaf_der = leaf.to_der().ok();
        let rest = stream
            .ssl()
            .peer_cert_chain()
            .map(|chain| {
                chain
                    .iter()
                    .filter(|certificate| certificate.to_der().ok() != leaf_der)
                    .map(|certificate| certificate.to_owned())
                    .collect()
            })
            .unwrap_or_default();
        Peer { leaf, rest }
    });
    let service = service_fn(move |request| {
        let inner = Arc::clone(&inner);
        let peer = peer.clone();
        async move { Ok::<_, Infallible>(handle(&inner, peer.as_ref(), request).await) }
    });
    if let Err(error) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        log::debug!("EST connection ended: {error}");
    }
}

fn text_reply(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    response
}

fn pkcs7_reply(certificates: &[&X509]) -> Response<Full<Bytes>> {
    let ders: Vec<Vec<u8>> = certificates
        .iter()
        .filter_map(|certificate| certificate.to_der().ok())
        .collect();
    let body = base64_lines(&certs_only_pkcs7(&ders));
    let mut response = Response::new(Full::new(Bytes::from(body)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/pkcs7-mime; smime-type=certs-only"),
    );
    headers.insert(
        "content-transfer-encoding",
        header::HeaderValue::from_static("base64"),
    );
    response
}

fn base64_lines(der: &[u8]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut lines = String::new();
    for chunk in text.as_bytes().chunks(64) {
        lines.push_str(&String::from_utf8_lossy(chunk));
        lines.push_str("\r\n");
    }
    lines
}

/// A DER TLV.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let length = content.len();
    if length < 0x80 {
        out.push(length as u8);
    } else {
        let bytes: Vec<u8> = length
            .to_be_bytes()
            .into_iter()
            .skip_while(|byte| *byte == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// A degenerate (certs-only) PKCS#7 SignedData holding `certificates` (RFC 7030 §4.1.3).
pub fn certs_only_pkcs7(certificates: &[Vec<u8>]) -> Vec<u8> {
    const OID_SIGNED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];
    const OID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
    let mut signed_data = Vec::new();
    signed_data.extend(tlv(0x02, &[1])); // version 1
    signed_data.extend(tlv(0x31, &[])); // digestAlgorithms: none
    signed_data.extend(tlv(0x30, &tlv(0x06, OID_DATA))); // encapContentInfo: data, absent
    signed_data.extend(tlv(0xa0, &certificates.concat())); // [0] IMPLICIT certificates
    signed_data.extend(tlv(0x31, &[])); // signerInfos: none
    let mut content_info = tlv(0x06, OID_SIGNED_DATA);
    content_info.extend(tlv(0xa0, &tlv(0x30, &signed_data)));
    tlv(0x30, &content_info)
}

fn serial_hex(certificate: &X509) -> Option<String> {
    certificate
        .serial_number()
        .to_bn()
        .ok()
        .and_then(|bn| bn.to_hex_str().ok())
        .map(|hex| hex.to_string())
}

fn decode_basic(value: &str) -> Option<(String, String)> {
    let token = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Issues a certificate for `request` (subject and key from the CSR) valid for `validity_secs`
/// from now: a client certificate (EKU clientAuth), or with `as_ca` a CA (CA:TRUE, pathlen 0,
/// keyCertSign, cRLSign).
fn issue_for(
    ca: &CertAndKey,
    request: &X509Req,
    validity_secs: i64,
    as_ca: bool,
) -> Result<X509, openssl::error::ErrorStack> {
    let key = request.public_key()?;
    let mut builder = X509Builder::new()?;
    builder.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    builder.set_serial_number(&serial)?;
    builder.set_subject_name(request.subject_name())?;
    builder.set_issuer_name(ca.cert.subject_name())?;
    builder.set_pubkey(&key)?;
    let now = i64::try_from(util::now_secs()).unwrap_or(0);
    let not_before = Asn1Time::from_unix(now - 1)?;
    let not_after = Asn1Time::from_unix(now + validity_secs)?;
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    if as_ca {
        builder.append_extension(BasicConstraints::new().critical().ca().pathlen(0).build()?)?;
        builder.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
    } else {
        builder.append_extension(BasicConstraints::new().critical().build()?)?;
        builder.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
        builder.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
    }
    let context = builder.x509v3_context(Some(&ca.cert), None);
    let ski = SubjectKeyIdentifier::new().build(&context)?;
    let aki = AuthorityKeyIdentifier::new().keyid(false).build(&context)?;
    builder.append_extension(ski)?;
    builder.append_extension(aki)?;
    builder.sign(&ca.key, MessageDigest::sha256())?;
    Ok(builder.build())
}

/// Parses an enrollment body: base64 (in lines) of a DER CSR, or a PEM CSR; checks its
/// signature.
fn parse_request(body: &[u8]) -> Result<X509Req, String> {
    let text = String::from_utf8_lossy(body);
    let request = if text.contains("-----BEGIN") {
        X509Req::from_pem(body).map_err(|_| "invalid PEM certification request".to_owned())?
    } else {
        let compact: String = text.split_ascii_whitespace().collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|_| "the body is not base64".to_owned())?;
        X509Req::from_der(&der).map_err(|_| "the body is not a PKCS#10 request".to_owned())?
    };
    let key = request
        .public_key()
        .map_err(|_| "unusable public key".to_owned())?;
    if !request.verify(&key).unwrap_or(false) {
        return Err("the CSR signature is invalid".to_owned());
    }
    Ok(request)
}

async fn handle(
    inner: &Inner,
    peer: Option<&Peer>,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let time = SystemTime::now();
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(IO_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await
    {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        _ => Err(()),
    };
    let path = parts.uri.path().to_owned();
    let rest = path.strip_prefix("/.well-known/est/").unwrap_or("");
    let segments: Vec<&str> = rest.split('/').filter(|part| !part.is_empty()).collect();
    let (label, operation) = match segments.as_slice() {
        [operation] => (None, operation.to_string()),
        [label, operation] => (Some(label.to_string()), operation.to_string()),
        _ => (None, String::new()),
    };
    let mut entry = EstLogEntry {
        time,
        operation: operation.clone(),
        label,
        status: 0,
        auth: "none",
        client_cert_cn: peer.and_then(|peer| pki::leaf_cn(&peer.leaf)),
        client_cert_serial: peer.and_then(|peer| serial_hex(&peer.leaf)),
        transfer_encoding: parts
            .headers
            .get("content-transfer-encoding")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned),
        csr_cn: None,
        issued_serial: None,
        retry_after: None,
    };
    let mut state = inner.lock();
    let basic_ok = match (&state.basic, parts.headers.get(header::AUTHORIZATION)) {
        (Some(expected), Some(value)) => value
            .to_str()
            .ok()
            .and_then(decode_basic)
            .is_some_and(|given| given == *expected),
        _ => false,
    };
    let issued_by_us = peer.is_some_and(|peer| {
        pki::chain_verifies(&peer.leaf, &peer.rest, std::slice::from_ref(&inner.ca.cert))
    });
    let cert_ok = issued_by_us
        || peer.is_some_and(|peer| pki::chain_verifies(&peer.leaf, &peer.rest, &state.client_cas));
    entry.auth = if cert_ok {
        "cert"
    } else if basic_ok {
        "basic"
    } else {
        "none"
    };

    let response = match (parts.method.clone(), operation.as_str()) {
        (Method::GET, "cacerts") => pkcs7_reply(&[&inner.ca.cert]),
        (Method::POST, "simpleenroll" | "simplereenroll") => {
            let reenroll = operation == "simplereenroll";
            if !cert_ok && !basic_ok {
                let mut response = text_reply(StatusCode::UNAUTHORIZED, "authentication required");
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Basic realm=\"est\""),
                );
                response
            } else if reenroll && !issued_by_us {
                text_reply(
                    StatusCode::FORBIDDEN,
                    "simplereenroll needs the certificate being renewed as TLS client certificate",
                )
            } else if state.pending > 0 {
                state.pending -= 1;
                entry.retry_after = Some(state.retry_after);
                let mut response = text_reply(StatusCode::ACCEPTED, "pending");
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    header::HeaderValue::from(state.retry_after),
                );
                response
            } else {
                match body
                    .as_deref()
                    .map_err(|_| "unreadable body".to_owned())
                    .and_then(parse_request)
                {
                    Err(reason) => text_reply(StatusCode::BAD_REQUEST, &reason),
                    Ok(csr) => {
                        entry.csr_cn = csr
                            .subject_name()
                            .entries_by_nid(openssl::nid::Nid::COMMONNAME)
                            .next()
                            .and_then(|cn| cn.data().to_string().ok());
                        let same_subject = peer.is_some_and(|peer| {
                            peer.leaf.subject_name().to_der().ok()
                                == csr.subject_name().to_der().ok()
                        });
                        if reenroll && !same_subject {
                            text_reply(
                                StatusCode::BAD_REQUEST,
                                "the CSR's subject differs from the certificate being renewed",
                            )
                        } else {
                            let as_ca = entry
                                .label
                                .as_ref()
                                .is_some_and(|label| state.ca_labels.contains(label));
                            match issue_for(&inner.ca, &csr, state.validity_secs, as_ca) {
                                Ok(certificate) => {
                                    entry.issued_serial = serial_hex(&certificate);
                                    pkcs7_reply(&[&certificate])
                                }
                                Err(error) => text_reply(
                                    StatusCode::INTERNAL_SERVER_ERROR,
                                    &format!("issuing failed: {error}"),
                                ),
                            }
                        }
                    }
                }
            }
        }
        (_, "cacerts" | "simpleenroll" | "simplereenroll") => {
            text_reply(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => text_reply(StatusCode::NOT_FOUND, "not found"),
    };
    entry.status = response.status().as_u16();
    log::debug!("EST {} {} -> {}", parts.method, path, entry.status);
    state.log.push(entry);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certs_only_pkcs7_parses_with_openssl() {
        let ca = pki::TestCa::new("pkcs7 test").unwrap();
        let leaf = ca.issue_client("leaf").unwrap();
        let der = certs_only_pkcs7(&[leaf.cert.to_der().unwrap(), ca.ca.cert.to_der().unwrap()]);
        let pkcs7 = openssl::pkcs7::Pkcs7::from_der(&der).unwrap();
        let certificates = pkcs7.signed().unwrap().certificates().unwrap();
        assert_eq!(certificates.len(), 2);
        assert_eq!(
            certificates.get(0).unwrap().to_der().unwrap(),
            leaf.cert.to_der().unwrap()
        );
        // Long contents use multi-byte lengths.
        let big = tlv(0x04, &[0u8; 300]);
        assert_eq!(&big[..4], &[0x04, 0x82, 0x01, 0x2c]);
    }
}
