//! The one async HTTP-over-Unix-socket client that every daemon, tool and test uses.
//!
//! Connections are pooled and kept alive; at most [`MAX_CONCURRENT_REQUESTS`] requests are in
//! flight at once per client, so an internal client stays below the peer's per-uid budget.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as PooledClient;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Requests in flight at once per client (peers allow 10 connections per uid by default).
pub const MAX_CONCURRENT_REQUESTS: usize = 5;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint URI is not `unix:///abs/path`.
    #[error("invalid endpoint {0:?}: expected unix:///absolute/path")]
    InvalidEndpoint(String),
    /// The request could not be sent or the answer not received.
    #[error("could not reach {}", socket.display())]
    Transport {
        /// The peer's socket.
        socket: PathBuf,
        /// The transport error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The peer did not answer in time.
    #[error("{} did not answer within {} s", socket.display(), timeout.as_secs())]
    Timeout {
        /// The peer's socket.
        socket: PathBuf,
        /// The deadline.
        timeout: Duration,
    },
    /// The peer answered with a status other than the expected one.
    #[error("{status}: {message}")]
    Status {
        /// The status received.
        status: StatusCode,
        /// The `message` of the peer's error body (or the raw body).
        message: String,
    },
    /// The success body did not parse.
    #[error("could not parse the response body")]
    Decode(#[source] serde_json::Error),
}

impl ClientError {
    /// The peer's status, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the peer answered 404 (the named resource does not exist).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

/// A raw answer: status, headers and body.
#[derive(Debug)]
pub struct RawResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

/// An answer whose body is read as it arrives ([`UdsClient::stream`]).
#[derive(Debug)]
pub struct StreamingResponse {
    /// The status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body, chunk by chunk.
    pub body: ResponseBody,
}

/// The body of a [`StreamingResponse`]; holds the request's in-flight slot until dropped.
#[derive(Debug)]
pub struct ResponseBody {
    body: hyper::body::Incoming,
    socket: PathBuf,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl ResponseBody {
    /// The next chunk of data, or `None` at the end of the body.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        while let Some(frame) = self.body.frame().await {
            let frame = frame.map_err(|error| ClientError::Transport {
                socket: self.socket.clone(),
                source: Box::new(error),
            })?;
            if let Ok(data) = frame.into_data() {
                return Ok(Some(data));
            }
        }
        Ok(None)
    }

    /// The rest of the body.
    pub async fn collect(self) -> Result<Bytes, ClientError> {
        // The in-flight slot is held until the body has been read.
        let ResponseBody {
            body,
            socket,
            _permit,
        } = self;
        match BodyExt::collect(body).await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) => Err(ClientError::Transport {
                socket,
                source: Box::new(error),
            }),
        }
    }
}

/// A pooled client for one peer socket.
#[derive(Clone, Debug)]
pub struct UdsClient {
    socket: PathBuf,
    inner: PooledClient<hyperlocal::UnixConnector, Full<Bytes>>,
    in_flight: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
}

impl UdsClient {
    /// A client for `unix:///abs/path`.
    pub fn from_uri(uri: &str) -> Result<Self, ClientError> {
        let path = uri
            .strip_prefix("unix://")
            .filter(|path| path.starts_with('/'))
            .ok_or_else(|| ClientError::InvalidEndpoint(uri.to_owned()))?;
        Ok(UdsClient::new(path))
    }

    /// A client for the socket at `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        let inner = PooledClient::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(20))
            .pool_max_idle_per_host(MAX_CONCURRENT_REQUESTS)
            .build(hyperlocal::UnixConnector);
        UdsClient {
            socket: path.as_ref().to_owned(),
            inner,
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS)),
            timeout: Duration::from_secs(60),
        }
    }

    /// Sets the per-request deadline (default 60 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The peer's socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and returns whatever the peer answered. The deadline covers the whole
    /// exchange, body included.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<RawResponse, ClientError> {
        let exchange = async {
            let response = self.start(method, path_and_query, headers, body).await?;
            let body = response.body.collect().await?;
            Ok(RawResponse {
                status: response.status,
                headers: response.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| self.timed_out())?
    }

    /// Sends one request and returns the answer's status and headers with its body still to be
    /// read, for answers that may not end (a followed log). The deadline covers the status and
    /// headers only; the request counts as in flight until the body is dropped.
    pub async fn stream(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<StreamingResponse, ClientError> {
        tokio::time::timeout(
            self.timeout,
            self.start(method, path_and_query, headers, body),
        )
        .await
        .map_err(|_| self.timed_out())?
    }

    async fn start(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<StreamingResponse, ClientError> {
        let uri: hyper::Uri = hyperlocal::Uri::new(&self.socket, path_and_query).into();
        let mut builder = hyper::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|error| self.transport(Box::new(error)))?;
        let permit = Arc::clone(&self.in_flight)
            .acquire_owned()
            .await
            .map_err(|error| self.transport(Box::new(error)))?;
        let response = self
            .inner
            .request(request)
            .await
            .map_err(|error| self.transport(Box::new(error)))?;
        let (parts, body) = response.into_parts();
        Ok(StreamingResponse {
            status: parts.status,
            headers: parts.headers,
            body: ResponseBody {
                body,
                socket: self.socket.clone(),
                _permit: permit,
            },
        })
    }

    fn transport(&self, source: Box<dyn std::error::Error + Send + Sync>) -> ClientError {
        ClientError::Transport {
            socket: self.socket.clone(),
            source,
        }
    }

    fn timed_out(&self) -> ClientError {
        ClientError::Timeout {
            socket: self.socket.clone(),
            timeout: self.timeout,
        }
    }

    /// Sends `body` as JSON (if any) and parses the answer as `Resp` when the status equals
    /// `expected`; any other status becomes [`ClientError::Status`] with the peer's message.
    pub async fn json<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Req>,
        expected: StatusCode,
    ) -> Result<Resp, ClientError> {
        let response = self.call(method, path_and_query, body, expected).await?;
        let body: &[u8] = if response.body.is_empty() {
            b"null"
        } else {
            &response.body
        };
        serde_json::from_slice(body).map_err(ClientError::Decode)
    }

    /// Like [`UdsClient::json`] for answers without a body (204).
    pub async fn no_content<Req: Serialize + ?Sized>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Req>,
        expected: StatusCode,
    ) -> Result<(), ClientError> {
        self.call(method, path_and_query, body, expected)
            .await
            .map(drop)
    }

    async fn call<Req: Serialize + ?Sized>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<&Req>,
        expected: StatusCode,
    ) -> Result<RawResponse, ClientError> {
        let (headers, bytes): (&[(&str, &str)], Bytes) = match body {
            Some(body) => (
                &[("content-type", "application/json")],
                Bytes::from(serde_json::to_vec(body).map_err(ClientError::Decode)?),
            ),
            None => (&[], Bytes::new()),
        };
        let response = self.send(method, path_and_query, headers, bytes).await?;
        if response.status != expected {
            return Err(ClientError::Status {
                status: response.status,
                message: error_message(&response.body),
            });
        }
        Ok(response)
    }
}

/// The `message` of an error body, or the body itself when it is not the JSON error shape.
pub fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => error.message,
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    }
}
