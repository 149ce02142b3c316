//! The HTTPS client for DPS and IoT Hub, and the request policy of spec section 6.8.
//!
//! Each request opens its own connection (TCP, or an HTTP CONNECT tunnel through
//! `HTTPS_PROXY`), runs a rustls handshake (client certificate signed through keyd when the
//! device uses X.509), and sends one HTTP/1.1 request with hyper's connection-level client.
//! Cloud requests are rare (provisioning, module reconciliation), so pooling would buy nothing,
//! while a fresh connection per request lets every request carry its own client identity and
//! proxy decision. SAS tokens are minted through keyd for every attempt (lifetime 300 s).
//!
//! Nothing here knows about modules or provisioning; see [`dps`] and [`hub`].

pub mod dps;
pub mod hub;
mod proxy;
pub mod sas;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use key_api::KeyHandle;

use crate::error::IdentityError;

/// Why a DPS or IoT Hub request failed.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// No connection could be made (DNS, TCP, TLS, proxy).
    #[error("cloud error: {service} at {host} is unreachable: {reason}")]
    Unreachable {
        /// `DPS` or `IoT Hub`.
        service: &'static str,
        /// The authority contacted.
        host: String,
        /// What failed.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("cloud error: {service} at {host} did not answer within {seconds} s")]
    Timeout {
        /// `DPS` or `IoT Hub`.
        service: &'static str,
        /// The authority contacted.
        host: String,
        /// The deadline.
        seconds: u64,
    },
    /// The service answered with an error status.
    #[error("cloud error: {status} {message} ({service})")]
    Status {
        /// `DPS` or `IoT Hub`.
        service: &'static str,
        /// The HTTP status.
        status: u16,
        /// The service's error code and message.
        message: String,
    },
    /// The service kept throttling (429, or 503 with `Retry-After`) after all retries.
    #[error("cloud error: {status} {service} is throttling requests")]
    Throttled {
        /// `DPS` or `IoT Hub`.
        service: &'static str,
        /// 429 or 503.
        status: u16,
        /// The last `Retry-After`.
        retry_after: Option<u32>,
    },
    /// A nested-edge parent reported that it cannot reach the cloud (`networkError: true`).
    #[error("cloud error: {status} the parent gateway cannot reach IoT Hub: {message}")]
    GatewayNetwork {
        /// The HTTP status.
        status: u16,
        /// The gateway's message.
        message: String,
    },
    /// The answer did not have the expected shape.
    #[error("cloud error: {service} sent an unexpected answer: {reason}")]
    Protocol {
        /// `DPS` or `IoT Hub`.
        service: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// DPS ended the registration with a failure status.
    #[error("cloud error: DPS registration {status}: {error_code} {message}")]
    RegistrationFailed {
        /// `failed`, `disabled`, `unassigned`.
        status: String,
        /// DPS `errorCode`.
        error_code: String,
        /// DPS `errorMessage`.
        message: String,
    },
    /// DPS did not finish the registration within the polling deadline.
    #[error("cloud error: DPS registration did not complete within {seconds} s")]
    RegistrationTimeout {
        /// The deadline.
        seconds: u64,
    },
}

impl CloudError {
    /// The status identityd answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            CloudError::Unreachable { .. }
            | CloudError::Throttled { .. }
            | CloudError::GatewayNetwork { .. } => StatusCode::SERVICE_UNAVAILABLE,
            CloudError::Timeout { .. } | CloudError::RegistrationTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            CloudError::Status { .. }
            | CloudError::Protocol { .. }
            | CloudError::RegistrationFailed { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// `Retry-After` for 503 answers.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            CloudError::Unreachable { .. } | CloudError::GatewayNetwork { .. } => Some(5),
            CloudError::Throttled { retry_after, .. } => Some(retry_after.unwrap_or(60)),
            _ => None,
        }
    }

    /// Whether the cloud could not be reached or is overloaded (use the backup / cache).
    pub fn is_network(&self) -> bool {
        match self {
            CloudError::Unreachable { .. }
            | CloudError::Timeout { .. }
            | CloudError::Throttled { .. }
            | CloudError::GatewayNetwork { .. } => true,
            CloudError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// Whether the service rejected the device's credentials or does not know the device
    /// (401, or 404 `DeviceNotFound` from IoT Hub).
    pub fn is_device_rejected(&self) -> bool {
        match self {
            CloudError::Status { status: 401, .. } => true,
            CloudError::Status {
                status: 404,
                message,
                ..
            } => message.contains("DeviceNotFound"),
            _ => false,
        }
    }
}

/// Which service a request goes to (for messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// The Device Provisioning Service.
    Dps,
    /// IoT Hub (or the parent gateway).
    Hub,
}

impl Service {
    fn name(self) -> &'static str {
        match self {
            Service::Dps => "DPS",
            Service::Hub => "IoT Hub",
        }
    }
}

/// How a request authenticates.
#[derive(Clone, Debug)]
pub enum RequestAuth {
    /// No credential.
    None,
    /// A SAS token for `resource`, signed by keyd with `handle` (HMAC-SHA256).
    Sas {
        /// The token audience.
        resource: String,
        /// The key's handle.
        handle: KeyHandle,
        /// `skn` (DPS: `registration`).
        key_name: Option<&'static str>,
    },
    /// A SAS token for `resource`, signed in the TPM with its authentication key.
    TpmSas {
        /// The token audience.
        resource: String,
        /// `skn` (DPS: `registration`).
        key_name: Option<&'static str>,
        /// The TPM service.
        tpm: key_api::tpm::TpmClient,
    },
    /// A TLS client certificate whose key is in keyd.
    X509(Arc<rustls::sign::CertifiedKey>),
}

/// One request to DPS or Hub.
#[derive(Debug)]
pub struct CloudRequest {
    /// Which service (messages and logs).
    pub service: Service,
    /// The method.
    pub method: Method,
    /// `host[:port]` to connect to.
    pub authority: String,
    /// Path and query.
    pub path_and_query: String,
    /// The credential.
    pub auth: RequestAuth,
    /// Extra headers (`If-Match`).
    pub headers: Vec<(&'static str, String)>,
    /// JSON body.
    pub body: Option<Vec<u8>>,
}

/// An answer.
#[derive(Debug)]
pub struct CloudResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl CloudResponse {
    /// `Retry-After` in seconds, if present and numeric.
    pub fn retry_after(&self) -> Option<u32> {
        self.headers
            .get(http::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse().ok())
    }

    /// The error this answer represents (call for non-success statuses).
    pub fn into_error(self, service: Service) -> CloudError {
        let details = ErrorDetails::parse(&self.body);
        if details.network_error {
            return CloudError::GatewayNetwork {
                status: self.status.as_u16(),
                message: details.message,
            };
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            return CloudError::Throttled {
                service: service.name(),
                status: 429,
                retry_after: self.retry_after(),
            };
        }
        let message = match details.code {
            Some(code) if !details.message.contains(&code) => {
                format!("{code}: {}", details.message)
            }
            _ => details.message,
        };
        CloudError::Status {
            service: service.name(),
            status: self.status.as_u16(),
            message,
        }
    }
}

/// The error fields DPS and Hub use: `errorCode`/`code` + `message`/`errorMessage` (DPS),
/// `Message` (Hub), `networkError` (nested gateway).
#[derive(Debug, Default)]
struct ErrorDetails {
    code: Option<String>,
    message: String,
    network_error: bool,
}

impl ErrorDetails {
    fn parse(body: &[u8]) -> ErrorDetails {
        let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(body) else {
            let text = String::from_utf8_lossy(body);
            let text: String = text.chars().take(300).collect();
            return ErrorDetails {
                code: None,
                message: if text.trim().is_empty() {
                    "(no message)".to_owned()
                } else {
                    text.trim().to_owned()
                },
                network_error: false,
            };
        };
        let text = |names: &[&str]| {
            names.iter().find_map(|name| match object.get(*name) {
                Some(serde_json::Value::String(text)) => Some(text.clone()),
                Some(serde_json::Value::Number(number)) => Some(number.to_string()),
                _ => None,
            })
        };
        ErrorDetails {
            code: text(&["errorCode", "code", "ErrorCode"]),
            message: text(&["message", "errorMessage", "Message", "ExceptionMessage"])
                .unwrap_or_else(|| "(no message)".to_owned()),
            network_error: matches!(
                object.get("networkError"),
                Some(serde_json::Value::Bool(true))
            ),
        }
    }
}

/// The HTTPS client with the cloud request policy.
#[derive(Clone, Debug)]
pub struct CloudClient {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    timeout: Duration,
    retries: u32,
    retry_pause: Duration,
    proxy: Option<proxy::Proxy>,
    keyd: key_api::Client,
}

/// The 429 back-off schedule without `Retry-After`: (base seconds, maximum random extra).
const THROTTLE_SCHEDULE: [(u64, u64); 4] = [(60, 10), (120, 20), (180, 30), (300, 30)];
/// Longest `Retry-After` honoured (longer values are capped).
const MAX_RETRY_AFTER_SECS: u32 = 600;
/// Largest answer body accepted.
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

impl CloudClient {
    /// A client trusting `roots`, with the per-request deadline and connection retries, that
    /// signs SAS tokens through `keyd`.
    pub fn new(
        roots: rustls::RootCertStore,
        timeout: Duration,
        retries: u32,
        keyd: key_api::Client,
    ) -> Self {
        CloudClient {
            roots: Arc::new(roots),
            provider: tls::provider(),
            timeout,
            retries,
            retry_pause: Duration::from_secs(3),
            proxy: proxy::Proxy::from_env(),
            keyd,
        }
    }

    /// Sends a request with the retry policy: connection failures and timeouts are retried
    /// `retries` times after 3 s; 429 (and 503 with `Retry-After`) up to 4 times after
    /// `Retry-After` or the 60/120/180/300 s schedule. Any other HTTP answer is returned.
    pub async fn send(&self, request: &CloudRequest) -> Result<CloudResponse, IdentityError> {
        let service = request.service.name();
        let mut network_failures = 0;
        let mut throttled = 0;
        loop {
            let authorization = self.authorization(&request.auth).await?;
            let attempt =
                tokio::time::timeout(self.timeout, self.exchange(request, authorization)).await;
            let failure = match attempt {
                Ok(Ok(response)) => {
                    let throttling = response.status == StatusCode::TOO_MANY_REQUESTS
                        || (response.status == StatusCode::SERVICE_UNAVAILABLE
                            && response.retry_after().is_some());
                    if !throttling || throttled >= THROTTLE_SCHEDULE.len() {
                        return Ok(response);
                    }
                    let delay = match response.retry_after() {
                        Some(seconds) => {
                            Duration::from_secs(u64::from(seconds.min(MAX_RETRY_AFTER_SECS)))
                        }
                        None => {
                            let (base, extra) = THROTTLE_SCHEDULE[throttled];
                            Duration::from_secs(base + random_below(extra + 1))
                        }
                    };
                    throttled += 1;
                    log::warn!(
                        "{service} answered {} to {} {}; retrying in {} s",
                        response.status.as_u16(),
                        request.method,
                        request.path_and_query,
                        delay.as_secs()
                    );
                    tokio::time::sleep(delay).await;
                    continue;
                }
                Ok(Err(reason)) => CloudError::Unreachable {
                    service,
                    host: request.authority.clone(),
                    reason,
                },
                Err(_) => CloudError::Timeout {
                    service,
                    host: request.authority.clone(),
                    seconds: self.timeout.as_secs(),
                },
            };
            if network_failures >= self.retries {
                return Err(failure.into());
            }
            network_failures += 1;
            log::warn!("{failure}; retrying in {} s", self.retry_pause.as_secs());
            tokio::time::sleep(self.retry_pause).await;
        }
    }

    async fn authorization(&self, auth: &RequestAuth) -> Result<Option<String>, IdentityError> {
        match auth {
            RequestAuth::Sas {
                resource,
                handle,
                key_name,
            } => sas::token(&self.keyd, handle, resource, *key_name)
                .await
                .map(Some)
                .map_err(IdentityError::keyd("signing a SAS token")),
            RequestAuth::TpmSas {
                resource,
                key_name,
                tpm,
            } => sas::tpm_token(tpm, resource, *key_name)
                .await
                .map(Some)
                .map_err(IdentityError::tpm("signing a SAS token in the TPM")),
            _ => Ok(None),
        }
    }

    fn tls_config(&self, auth: &RequestAuth) -> Result<rustls::ClientConfig, String> {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|error| error.to_string())?
            .with_root_certificates(Arc::clone(&self.roots));
        Ok(match auth {
            RequestAuth::X509(identity) => {
                builder.with_client_cert_resolver(Arc::new(FixedIdentity(Arc::clone(identity))))
            }
            _ => builder.with_no_client_auth(),
        })
    }

    /// One attempt: connect, handshake, send, read the answer. Errors are transport errors.
    async fn exchange(
        &self,
        request: &CloudRequest,
        authorization: Option<String>,
    ) -> Result<CloudResponse, String> {
        let (host, port) = crate::util::split_authority(&request.authority)
            .ok_or_else(|| format!("invalid host name {:?}", request.authority))?;
        let tcp = match &self.proxy {
            Some(proxy) if proxy.applies_to(&host) => proxy.connect(&host, port).await?,
            _ => tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|error| format!("connect: {error}"))?,
        };
        let _ = tcp.set_nodelay(true);
        let server_name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| format!("invalid server name {host:?}"))?;
        let config = self.tls_config(&request.auth)?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|error| format!("TLS: {error}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|error| format!("HTTP: {error}"))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                log::debug!("cloud connection ended: {error}");
            }
        });
        let mut builder = hyper::Request::builder()
            .method(request.method.clone())
            .uri(&request.path_and_query)
            .header(http::header::HOST, &request.authority)
            .header(
                http::header::USER_AGENT,
                concat!("identityd/", env!("CARGO_PKG_VERSION")),
            )
            .header(http::header::ACCEPT, "application/json");
        if request.body.is_some() {
            builder = builder.header(
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            );
        }
        if let Some(authorization) = authorization {
            builder = builder.header(http::header::AUTHORIZATION, authorization);
        }
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        let body = Full::new(Bytes::from(request.body.clone().unwrap_or_default()));
        let http_request = builder
            .body(body)
            .map_err(|error| format!("invalid request: {error}"))?;
        let response = sender
            .send_request(http_request)
            .await
            .map_err(|error| format!("HTTP: {error}"))?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|error| format!("reading the answer: {error}"))?
            .to_bytes();
        log::debug!(
            "{} {} {} -> {}",
            request.service.name(),
            request.method,
            request.path_and_query,
            parts.status.as_u16()
        );
        Ok(CloudResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// A random number in `0..bound`.
fn random_below(bound: u64) -> u64 {
    let mut bytes = [0u8; 8];
    let random = ring::rand::SystemRandom::new();
    if bound == 0 || ring::rand::SecureRandom::fill(&random, &mut bytes).is_err() {
        return 0;
    }
    u64::from_le_bytes(bytes) % bound
}

/// Always offers the same client identity.
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

/// Percent-encodes one path segment (everything outside RFC 3986 unreserved, except `$` when
/// `keep_dollar`).
pub fn encode_segment(segment: &str, keep_dollar: bool) -> String {
    const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    const WITH_DOLLAR: &percent_encoding::AsciiSet = &UNRESERVED.remove(b'$');
    let set = if keep_dollar { WITH_DOLLAR } else { UNRESERVED };
    percent_encoding::utf8_percent_encode(segment, set).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: u16, body: &str) -> CloudResponse {
        CloudResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn error_bodies() {
        let dps = response(
            401,
            r#"{"errorCode":401002,"trackingId":"x","message":"Unauthorized"}"#,
        )
        .into_error(Service::Dps);
        assert_eq!(
            dps.to_string(),
            "cloud error: 401 401002: Unauthorized (DPS)"
        );
        assert!(dps.is_device_rejected());
        let hub = response(
            404,
            r#"{"Message":"ErrorCode:DeviceNotFound;no such device","ExceptionMessage":"t"}"#,
        )
        .into_error(Service::Hub);
        assert!(hub.is_device_rejected());
        assert_eq!(hub.status(), StatusCode::BAD_GATEWAY);
        let gateway =
            response(502, r#"{"message":"upstream","networkError":true}"#).into_error(Service::Hub);
        assert!(gateway.is_network());
        assert_eq!(gateway.status(), StatusCode::SERVICE_UNAVAILABLE);
        let plain = response(500, "oops").into_error(Service::Hub);
        assert!(plain.is_network());
        assert_eq!(plain.to_string(), "cloud error: 500 oops (IoT Hub)");
    }

    #[test]
    fn segments() {
        assert_eq!(encode_segment("$edgeAgent", true), "$edgeAgent");
        assert_eq!(encode_segment("$edgeAgent", false), "%24edgeAgent");
        assert_eq!(encode_segment("a b/c", true), "a%20b%2Fc");
    }
}
