//! The EST client (RFC 7030): `simpleenroll`, `simplereenroll` and `cacerts` over HTTPS (or
//! plain HTTP, which the configuration warns about), with HTTP Basic and/or a TLS client
//! certificate whose private key stays in keyd (`key_api::rustls`: rustls asks keyd for the one
//! handshake signature). One HTTP/1.1 request per connection, with hyper's connection-level
//! client over tokio-rustls, as identityd talks to the cloud.
//!
//! Also here, pure: the PKCS#10 request certd builds for keys it holds in keyd (bootstrap and
//! renewal of the EST identity), and the parsing of certs-only PKCS#7 answers.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use der::asn1::{Any, BitString, ObjectIdentifier, OctetString, SetOfVec};
use der::Encode as _;
use http::{header, Method, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use x509_cert::attr::Attribute;
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::request::{CertReq, CertReqInfo, Version};
use x509_cert::spki::SubjectPublicKeyInfoOwned;

use crate::error::CertError;
use crate::issuance::SignatureAlgorithm;

/// Deadline of one EST exchange (connect, handshake, request, answer).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer accepted.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// How many 202 answers certd waits through for one enrollment.
pub const MAX_PENDING_ANSWERS: u32 = 10;
/// Longest `Retry-After` honoured; longer values are capped.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// The pause after a 202 without a usable `Retry-After`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(10);

const OID_EXTENSION_REQUEST: ObjectIdentifier =
    ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.14");
const OID_EXTENDED_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const OID_CLIENT_AUTH: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.2");

/// The EST operations certd uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `POST simpleenroll`: a new certificate.
    Enroll,
    /// `POST simplereenroll`: a renewal, authenticated with the certificate being renewed.
    Reenroll,
}

impl Operation {
    fn path(self) -> &'static str {
        match self {
            Operation::Enroll => "simpleenroll",
            Operation::Reenroll => "simplereenroll",
        }
    }
}

/// The credentials of one EST request.
#[derive(Clone, Default)]
pub struct Credentials {
    /// HTTP Basic `(username, password)`.
    pub basic: Option<(String, String)>,
    /// The TLS client certificate and its keyd-backed key.
    pub tls: Option<Arc<rustls::sign::CertifiedKey>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Credentials")
            .field("basic", &self.basic.as_ref().map(|(user, _)| user))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// An EST client: the trust store for the server's certificate.
#[derive(Clone, Debug)]
pub struct EstClient {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

/// The operating system's roots (or `SSL_CERT_FILE` / `SSL_CERT_DIR`) plus `extra` (DER).
pub fn roots(extra: &[Vec<u8>]) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        log::debug!("could not load some system CA certificates: {error}");
    }
    roots.add_parsable_certificates(native.certs);
    roots.add_parsable_certificates(extra.iter().map(|der| CertificateDer::from(der.clone())));
    roots
}

impl EstClient {
    /// A client trusting `roots`.
    pub fn new(roots: rustls::RootCertStore) -> Self {
        EstClient {
            roots: Arc::new(roots),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }

    /// Enrolls (or re-enrolls) `csr_der` at `base_url` and returns the issued certificates
    /// (DER, leaf first). A 202 answer is retried after its `Retry-After` (capped at
    /// [`MAX_RETRY_AFTER`]), up to [`MAX_PENDING_ANSWERS`] times.
    pub async fn enroll(
        &self,
        base_url: &str,
        operation: Operation,
        csr_der: &[u8],
        credentials: &Credentials,
    ) -> Result<Vec<Vec<u8>>, CertError> {
        let url = format!("{base_url}{}", operation.path());
        let body = Bytes::from(base64_lines(csr_der));
        let mut pending = 0;
        loop {
            let answer = self
                .exchange(&url, Method::POST, Some(body.clone()), credentials)
                .await?;
            match answer.status {
                StatusCode::OK => return pkcs7_certificates(&url, &answer),
                StatusCode::ACCEPTED if pending < MAX_PENDING_ANSWERS => {
                    pending += 1;
                    let delay = retry_after(&answer.headers)
                        .unwrap_or(DEFAULT_RETRY_AFTER)
                        .min(MAX_RETRY_AFTER);
                    log::info!(
                        "EST server {url} accepted the request for later (202); asking again in \
                         {} s",
                        delay.as_secs()
                    );
                    tokio::time::sleep(delay).await;
                }
                StatusCode::ACCEPTED => {
                    return Err(CertError::EstRefused {
                        url,
                        status: 202,
                        message: format!(
                            "still pending after {MAX_PENDING_ANSWERS} Retry-After waits"
                        ),
                    })
                }
                status => return Err(refused(url, status, &answer.body)),
            }
        }
    }

    /// `GET <base>cacerts`: the EST CA certificates (DER).
    pub async fn ca_certs(
        &self,
        base_url: &str,
        credentials: &Credentials,
    ) -> Result<Vec<Vec<u8>>, CertError> {
        let url = format!("{base_url}cacerts");
        let answer = self.exchange(&url, Method::GET, None, credentials).await?;
        if answer.status != StatusCode::OK {
            return Err(refused(url, answer.status, &answer.body));
        }
        pkcs7_certificates(&url, &answer)
    }

    async fn exchange(
        &self,
        url: &str,
        method: Method,
        body: Option<Bytes>,
        credentials: &Credentials,
    ) -> Result<Answer, CertError> {
        let unreachable = |reason: String| CertError::EstUnreachable {
            url: url.to_owned(),
            reason,
        };
        match tokio::time::timeout(
            EXCHANGE_TIMEOUT,
            self.attempt(url, method, body, credentials),
        )
        .await
        {
            Ok(result) => result.map_err(unreachable),
            Err(_) => Err(unreachable(format!(
                "no answer within {} s",
                EXCHANGE_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn attempt(
        &self,
        url: &str,
        method: Method,
        body: Option<Bytes>,
        credentials: &Credentials,
    ) -> Result<Answer, String> {
        let uri: http::Uri = url.parse().map_err(|_| "invalid URL".to_owned())?;
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().ok_or("the URL has no host")?.to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|authority| authority.as_str().to_owned())
            .unwrap_or_else(|| host.clone());
        let path = uri
            .path_and_query()
            .map(|path| path.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        // An IPv6 literal comes bracketed from the URL.
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tcp = tokio::net::TcpStream::connect((bare_host.as_str(), port))
            .await
            .map_err(|error| format!("connect: {error}"))?;
        let _ = tcp.set_nodelay(true);

        let mut builder = hyper::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, authority)
            .header(
                header::USER_AGENT,
                concat!("certd/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::ACCEPT, "application/pkcs7-mime");
        if body.is_some() {
            builder = builder
                .header(header::CONTENT_TYPE, "application/pkcs10")
                .header("content-transfer-encoding", "base64");
        }
        if let Some((username, password)) = &credentials.basic {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
            builder = builder.header(header::AUTHORIZATION, format!("Basic {token}"));
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|error| format!("invalid request: {error}"))?;

        if https {
            let config = self.tls_config(credentials.tls.clone())?;
            let server_name = ServerName::try_from(bare_host.clone())
                .map_err(|_| format!("invalid server name {bare_host:?}"))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(server_name, tcp)
                .await
                .map_err(|error| format!("TLS: {error}"))?;
            send(TokioIo::new(tls), request).await
        } else {
            send(TokioIo::new(tcp), request).await
        }
    }

    fn tls_config(
        &self,
        identity: Option<Arc<rustls::sign::CertifiedKey>>,
    ) -> Result<rustls::ClientConfig, String> {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|error| error.to_string())?
            .with_root_certificates(Arc::clone(&self.roots));
        Ok(match identity {
            Some(identity) => builder.with_client_cert_resolver(Arc::new(FixedIdentity(identity))),
            None => builder.with_no_client_auth(),
        })
    }
}

async fn send<IO>(io: IO, request: hyper::Request<Full<Bytes>>) -> Result<Answer, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|error| format!("HTTP: {error}"))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            log::debug!("EST connection ended: {error}");
        }
    });
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("HTTP: {error}"))?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|error| format!("reading the answer: {error}"))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Always offers the same client certificate.
#[derive(Debug)]
struct FixedIdentity(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn refused(url: String, status: StatusCode, body: &[u8]) -> CertError {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|character| !character.is_control())
        .take(200)
        .collect();
    CertError::EstRefused {
        url,
        status: status.as_u16(),
        message: if text.trim().is_empty() {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            text.trim().to_owned()
        },
    }
}

/// `Retry-After` in seconds (an HTTP date is not used by EST servers in practice).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// Base64 in 64-character lines (RFC 7030 §4.2.1 bodies), CRLF-terminated.
pub fn base64_lines(der: &[u8]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let mut lines = String::with_capacity(text.len() + text.len() / 32 + 2);
    for chunk in text.as_bytes().chunks(64) {
        // Base64 output is ASCII.
        lines.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        lines.push_str("\r\n");
    }
    lines
}

fn pkcs7_certificates(url: &str, answer: &Answer) -> Result<Vec<Vec<u8>>, CertError> {
    parse_pkcs7(&answer.body).map_err(|reason| CertError::EstInvalidAnswer {
        url: url.to_owned(),
        reason,
    })
}

/// The certificates of a certs-only PKCS#7 (`application/pkcs7-mime`) given as PEM, as base64
/// of the DER (in lines) or as the DER itself.
pub fn parse_pkcs7(body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let text = String::from_utf8_lossy(body);
    let pkcs7 = if text.contains("-----BEGIN") {
        openssl::pkcs7::Pkcs7::from_pem(body).map_err(|_| "invalid PKCS#7 PEM".to_owned())?
    } else {
        let compact: String = text
            .chars()
            .filter(|character| !character.is_ascii_whitespace())
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .unwrap_or_else(|_| body.to_vec());
        openssl::pkcs7::Pkcs7::from_der(&der)
            .map_err(|_| "the answer is not a PKCS#7 certs-only message".to_owned())?
    };
    let certificates = pkcs7
        .signed()
        .and_then(|signed| signed.certificates())
        .ok_or("the PKCS#7 message holds no certificates")?;
    let mut ders = Vec::new();
    for certificate in certificates {
        ders.push(
            certificate
                .to_der()
                .map_err(|_| "a certificate of the PKCS#7 message cannot be encoded")?,
        );
    }
    if ders.is_empty() {
        return Err("the PKCS#7 message holds no certificates".to_owned());
    }
    Ok(ders)
}

/// Orders an enrollment answer leaf first: the certificate whose public key is `public_key`
/// (DER SPKI) comes first; the others keep their order.
pub fn leaf_first(mut certificates: Vec<Vec<u8>>, public_key_der: &[u8]) -> Vec<Vec<u8>> {
    let position = certificates.iter().position(|der| {
        openssl::x509::X509::from_der(der)
            .ok()
            .and_then(|certificate| certificate.public_key().ok())
            .and_then(|key| key.public_key_to_der().ok())
            .is_some_and(|key| key == public_key_der)
    });
    if let Some(position) = position {
        let leaf = certificates.remove(position);
        certificates.insert(0, leaf);
    }
    certificates
}

/// A CertificationRequestInfo for `subject` and `spki` asking for EKU clientAuth (an EST
/// identity), and its DER (what keyd signs).
pub fn client_auth_request(
    subject: Name,
    spki: SubjectPublicKeyInfoOwned,
) -> Result<(CertReqInfo, Vec<u8>), CertError> {
    let encoding = |error: der::Error| CertError::Encoding(error.to_string());
    let usage = x509_cert::ext::pkix::ExtendedKeyUsage(vec![OID_CLIENT_AUTH]);
    let extension = Extension {
        extn_id: OID_EXTENDED_KEY_USAGE,
        critical: false,
        extn_value: OctetString::new(usage.to_der().map_err(encoding)?).map_err(encoding)?,
    };
    let extensions: Vec<Extension> = vec![extension];
    let value = Any::encode_from(&extensions).map_err(encoding)?;
    let mut values = SetOfVec::new();
    values.insert(value).map_err(encoding)?;
    let mut attributes = SetOfVec::new();
    attributes
        .insert(Attribute {
            oid: OID_EXTENSION_REQUEST,
            values,
        })
        .map_err(encoding)?;
    let info = CertReqInfo {
        version: Version::V1,
        subject,
        public_key: spki,
        attributes,
    };
    let der = info.to_der().map_err(encoding)?;
    Ok((info, der))
}

/// The DER of the signed request.
pub fn signed_request(
    info: CertReqInfo,
    algorithm: SignatureAlgorithm,
    signature: &[u8],
) -> Result<Vec<u8>, CertError> {
    let encoding = |error: der::Error| CertError::Encoding(error.to_string());
    CertReq {
        info,
        algorithm: algorithm.identifier(),
        signature: BitString::from_bytes(signature).map_err(encoding)?,
    }
    .to_der()
    .map_err(encoding)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_lines_are_64_characters() {
        let text = base64_lines(&[7u8; 100]);
        let lines: Vec<&str> = text.split("\r\n").collect();
        assert_eq!(lines[0].len(), 64);
        assert_eq!(lines.last(), Some(&""));
        let joined: String = lines.concat();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(joined)
                .unwrap(),
            vec![7u8; 100]
        );
    }

    #[test]
    fn garbage_is_not_pkcs7() {
        assert!(parse_pkcs7(b"hello").is_err());
        assert!(parse_pkcs7(b"").is_err());
        assert!(parse_pkcs7(b"-----BEGIN PKCS7-----\nAAAA\n-----END PKCS7-----\n").is_err());
    }

    #[test]
    fn retry_after_seconds() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert(header::RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }
}
