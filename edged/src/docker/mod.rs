//! A small client for the Moby Engine API (v1.41) over Docker's Unix socket.
//!
//! Only what edged needs: containers (create with a raw JSON body, inspect, list, start, stop,
//! restart, remove, logs as Docker's raw framed stream, top, stats), images (pull with
//! `X-Registry-Auth`, inspect, remove), networks and the version. Every call has a 60 s deadline
//! until the response headers; streamed bodies (pull progress, logs, events) are unbounded.
//!
//! This module knows nothing about modules, labels or edged's API: that is `runtime`. It never
//! logs request headers (registry credentials travel in one).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as PooledClient;
use serde::Deserialize;

/// The Engine API version edged speaks.
pub const API_PREFIX: &str = "/v1.41";

/// Deadline until Docker's response headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(60);

/// A Docker call failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// Docker answered with an error status; `message` is Docker's.
    #[error("{message}")]
    Status {
        /// Docker's status.
        status: StatusCode,
        /// Docker's `message`.
        message: String,
    },
    /// Docker could not be reached or the exchange broke.
    #[error("could not reach the container runtime at {}", socket.display())]
    Transport {
        /// Docker's socket.
        socket: PathBuf,
        /// The transport error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Docker did not answer in time.
    #[error("the container runtime did not answer within {} s", HEADER_TIMEOUT.as_secs())]
    Timeout,
    /// Docker's answer did not parse.
    #[error("could not parse the container runtime's answer")]
    Decode(#[source] serde_json::Error),
}

impl DockerError {
    /// Docker's status, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            DockerError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether Docker said "no such container / image".
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

/// The async Docker client (cheap to clone; connections are pooled).
#[derive(Clone, Debug)]
pub struct DockerClient {
    socket: PathBuf,
    inner: PooledClient<hyperlocal::UnixConnector, Full<Bytes>>,
}

/// `GET /containers/{id}/json`, the fields edged reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerInspect {
    /// Full container ID.
    #[serde(default)]
    pub id: String,
    /// `/name`.
    #[serde(default)]
    pub name: String,
    /// Image ID (`sha256:...`).
    #[serde(default)]
    pub image: String,
    /// Runtime state.
    #[serde(default)]
    pub state: ContainerState,
    /// Configuration.
    #[serde(default)]
    pub config: ContainerConfig,
}

/// `State` of an inspect answer.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerState {
    /// `created`, `running`, `paused`, `restarting`, `removing`, `exited`, `dead`.
    #[serde(default)]
    pub status: String,
    /// Main process pid on the host (0 when not running).
    #[serde(default)]
    pub pid: i64,
    /// Last exit code.
    #[serde(default)]
    pub exit_code: Option<i64>,
    /// RFC 3339 start time (zero time when never started).
    #[serde(default)]
    pub started_at: String,
    /// RFC 3339 finish time (zero time when never finished).
    #[serde(default)]
    pub finished_at: String,
}

/// `Config` of an inspect answer.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// The image as given at create.
    #[serde(default)]
    pub image: String,
    /// Labels.
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// One entry of `GET /containers/json`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerSummary {
    /// Full container ID.
    #[serde(default)]
    pub id: String,
    /// `/name` entries.
    #[serde(default)]
    pub names: Vec<String>,
    /// Image ID.
    #[serde(default, rename = "ImageID")]
    pub image_id: String,
    /// State (`running`, `exited`, ...).
    #[serde(default)]
    pub state: String,
    /// Human-readable status (`Up 3 hours`).
    #[serde(default)]
    pub status: String,
    /// Labels.
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

impl ContainerSummary {
    /// The container name without the leading `/`.
    pub fn name(&self) -> &str {
        self.names
            .first()
            .map(|name| name.trim_start_matches('/'))
            .unwrap_or("")
    }
}

/// `GET /version`, the fields edged reads.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Version {
    /// Engine version.
    #[serde(default)]
    pub version: String,
    /// API version.
    #[serde(default)]
    pub api_version: String,
}

fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Builds a query string from pairs, percent-encoding each value.
pub fn query(pairs: &[(&str, String)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .map(|(key, value)| format!("{key}={}", encode(value)))
        .collect();
    parts.join("&")
}

#[derive(Deserialize)]
struct DockerMessage {
    message: String,
}

async fn error_of(status: StatusCode, body: Incoming) -> DockerError {
    let bytes = body
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .unwrap_or_default();
    let message = match serde_json::from_slice::<DockerMessage>(&bytes) {
        Ok(parsed) => parsed.message,
        Err(_) => {
            let text = String::from_utf8_lossy(&bytes).trim().to_owned();
            if text.is_empty() {
                status.to_string()
            } else {
                text
            }
        }
    };
    DockerError::Status { status, message }
}

impl DockerClient {
    /// A client for `unix:///var/run/docker.sock`-style URIs.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let path = uri
            .strip_prefix("unix://")
            .filter(|path| path.starts_with('/'))?;
        Some(DockerClient::new(path))
    }

    /// A client for the socket at `path`.
    pub fn new(path: impl AsRef<Path>) -> Self {
        let inner = PooledClient::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(16)
            .build(hyperlocal::UnixConnector);
        DockerClient {
            socket: path.as_ref().to_owned(),
            inner,
        }
    }

    fn transport(
        &self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> DockerError {
        DockerError::Transport {
            socket: self.socket.clone(),
            source: source.into(),
        }
    }

    /// Sends a request and returns the response head and streaming body when the status is a
    /// success (or 304); other statuses become [`DockerError::Status`].
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<hyper::Response<Incoming>, DockerError> {
        let uri: hyper::Uri =
            hyperlocal::Uri::new(&self.socket, &format!("{API_PREFIX}{path_and_query}")).into();
        let mut builder = hyper::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let has_body = body.is_some();
        if has_body {
            builder = builder.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|error| self.transport(error))?;
        let response = tokio::time::timeout(HEADER_TIMEOUT, self.inner.request(request))
            .await
            .map_err(|_| DockerError::Timeout)?
            .map_err(|error| self.transport(error))?;
        let status = response.status();
        if status.is_success() || status == StatusCode::NOT_MODIFIED {
            Ok(response)
        } else {
            Err(error_of(status, response.into_body()).await)
        }
    }

    /// Sends a request and collects the whole body.
    pub async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), DockerError> {
        let response = self.send(method, path_and_query, &[], body).await?;
        let status = response.status();
        let bytes = tokio::time::timeout(HEADER_TIMEOUT, response.into_body().collect())
            .await
            .map_err(|_| DockerError::Timeout)?
            .map_err(|error| self.transport(error))?
            .to_bytes();
        Ok((status, bytes))
    }

    /// Sends a request and parses the JSON answer.
    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
    ) -> Result<T, DockerError> {
        let (_, bytes) = self.call(method, path_and_query, body).await?;
        serde_json::from_slice(&bytes).map_err(DockerError::Decode)
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<Version, DockerError> {
        self.json(Method::GET, "/version", None).await
    }

    /// `GET /containers/{name}/json`.
    pub async fn inspect(&self, name: &str) -> Result<ContainerInspect, DockerError> {
        self.json(
            Method::GET,
            &format!("/containers/{}/json", encode(name)),
            None,
        )
        .await
    }

    /// `GET /containers/{name}/json` as raw JSON.
    pub async fn inspect_raw(&self, name: &str) -> Result<serde_json::Value, DockerError> {
        self.json(
            Method::GET,
            &format!("/containers/{}/json", encode(name)),
            None,
        )
        .await
    }

    /// `GET /containers/json?all=true` filtered by `label`.
    pub async fn list(&self, label: &str) -> Result<Vec<ContainerSummary>, DockerError> {
        let filters = serde_json::json!({ "label": [label] }).to_string();
        self.json(
            Method::GET,
            &format!(
                "/containers/json?{}",
                query(&[("all", "true".to_owned()), ("filters", filters)])
            ),
            None,
        )
        .await
    }

    /// `GET /containers/json?all=true` for the container with exactly this name.
    pub async fn summary(&self, name: &str) -> Result<Option<ContainerSummary>, DockerError> {
        let filters = serde_json::json!({ "name": [format!("^/{name}$")] }).to_string();
        let list: Vec<ContainerSummary> = self
            .json(
                Method::GET,
                &format!(
                    "/containers/json?{}",
                    query(&[("all", "true".to_owned()), ("filters", filters)])
                ),
                None,
            )
            .await?;
        Ok(list.into_iter().find(|summary| summary.name() == name))
    }

    /// `POST /containers/create?name=...` with a raw JSON body; returns the new ID.
    pub async fn create(
        &self,
        name: &str,
        body: &serde_json::Value,
    ) -> Result<String, DockerError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Created {
            id: String,
        }
        let bytes = serde_json::to_vec(body).map_err(DockerError::Decode)?;
        let created: Created = self
            .json(
                Method::POST,
                &format!("/containers/create?{}", query(&[("name", name.to_owned())])),
                Some(Bytes::from(bytes)),
            )
            .await?;
        Ok(created.id)
    }

    /// `POST /containers/{name}/start`; `Ok(false)` when it was already running (304).
    pub async fn start(&self, name: &str) -> Result<bool, DockerError> {
        let (status, _) = self
            .call(
                Method::POST,
                &format!("/containers/{}/start", encode(name)),
                None,
            )
            .await?;
        Ok(status != StatusCode::NOT_MODIFIED)
    }

    /// `POST /containers/{name}/stop?t=...`; `Ok(false)` when it was already stopped (304).
    pub async fn stop(&self, name: &str, grace: Option<Duration>) -> Result<bool, DockerError> {
        let mut path = format!("/containers/{}/stop", encode(name));
        if let Some(grace) = grace {
            path.push_str(&format!("?t={}", grace.as_secs()));
        }
        // Docker answers only after the grace period: allow it beyond the header deadline.
        let response = tokio::time::timeout(
            grace.unwrap_or(Duration::from_secs(10)) + HEADER_TIMEOUT,
            self.send(Method::POST, &path, &[], None),
        )
        .await
        .map_err(|_| DockerError::Timeout)??;
        Ok(response.status() != StatusCode::NOT_MODIFIED)
    }

    /// `POST /containers/{name}/restart`.
    pub async fn restart(&self, name: &str) -> Result<(), DockerError> {
        self.call(
            Method::POST,
            &format!("/containers/{}/restart", encode(name)),
            None,
        )
        .await
        .map(drop)
    }

    /// `DELETE /containers/{name}?force=true&v=false` (volumes kept).
    pub async fn remove(&self, name: &str) -> Result<(), DockerError> {
        self.call(
            Method::DELETE,
            &format!("/containers/{}?force=true&v=false", encode(name)),
            None,
        )
        .await
        .map(drop)
    }

    /// `GET /containers/{name}/logs?...`: Docker's raw stream.
    pub async fn logs(
        &self,
        name: &str,
        query_string: &str,
    ) -> Result<hyper::Response<Incoming>, DockerError> {
        self.send(
            Method::GET,
            &format!("/containers/{}/logs?{query_string}", encode(name)),
            &[],
            None,
        )
        .await
    }

    /// `GET /containers/{name}/top`: the host pids of the container's processes.
    pub async fn top_pids(&self, name: &str) -> Result<Vec<i32>, DockerError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Top {
            #[serde(default)]
            titles: Vec<String>,
            #[serde(default)]
            processes: Vec<Vec<String>>,
        }
        let top: Top = self
            .json(
                Method::GET,
                &format!("/containers/{}/top", encode(name)),
                None,
            )
            .await?;
        let column = top
            .titles
            .iter()
            .position(|title| title == "PID")
            .unwrap_or(1);
        Ok(top
            .processes
            .iter()
            .filter_map(|process| process.get(column)?.parse().ok())
            .collect())
    }

    /// `GET /containers/{name}/stats?stream=false`.
    pub async fn stats(&self, name: &str) -> Result<serde_json::Value, DockerError> {
        self.json(
            Method::GET,
            &format!("/containers/{}/stats?stream=false", encode(name)),
            None,
        )
        .await
    }

    /// `POST /images/create?fromImage=...`, reading the progress stream to its end. The last
    /// `errorDetail` is the error. `auth_header` is the base64url `X-Registry-Auth` value.
    pub async fn pull(&self, image: &str, auth_header: Option<&str>) -> Result<(), DockerError> {
        let headers: Vec<(&str, &str)> = auth_header
            .map(|value| vec![("X-Registry-Auth", value)])
            .unwrap_or_default();
        let (repository, tag) = split_reference(image);
        let mut pairs = vec![("fromImage", repository.to_owned())];
        if let Some(tag) = tag {
            pairs.push(("tag", tag.to_owned()));
        }
        let response = self
            .send(
                Method::POST,
                &format!("/images/create?{}", query(&pairs)),
                &headers,
                None,
            )
            .await?;
        let mut body = response.into_body();
        let mut pending = Vec::new();
        let mut last_error: Option<String> = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|error| self.transport(error))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            let mut stream =
                serde_json::Deserializer::from_slice(&pending).into_iter::<serde_json::Value>();
            let mut consumed = 0;
            while let Some(Ok(value)) = stream.next() {
                consumed = stream.byte_offset();
                if let Some(error) = value.get("error").and_then(|error| error.as_str()) {
                    last_error = Some(error.to_owned());
                } else if let Some(message) = value
                    .get("errorDetail")
                    .and_then(|detail| detail.get("message"))
                    .and_then(|message| message.as_str())
                {
                    last_error = Some(message.to_owned());
                }
            }
            pending.drain(..consumed);
        }
        match last_error {
            None => Ok(()),
            Some(message) => {
                let lower = message.to_ascii_lowercase();
                let status = if lower.contains("not found") || lower.contains("manifest unknown") {
                    StatusCode::NOT_FOUND
                } else if lower.contains("denied") || lower.contains("unauthorized") {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                Err(DockerError::Status { status, message })
            }
        }
    }

    /// `GET /images/{name}/json` → the image ID.
    pub async fn image_id(&self, name: &str) -> Result<String, DockerError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Image {
            id: String,
        }
        let image: Image = self
            .json(Method::GET, &format!("/images/{}/json", encode(name)), None)
            .await?;
        Ok(image.id)
    }

    /// `DELETE /images/{id}?force=true`.
    pub async fn remove_image(&self, id: &str) -> Result<(), DockerError> {
        self.call(
            Method::DELETE,
            &format!("/images/{}?force=true", encode(id)),
            None,
        )
        .await
        .map(drop)
    }

    /// Whether a network with exactly this name exists.
    pub async fn network_exists(&self, name: &str) -> Result<bool, DockerError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct NetworkSummary {
            #[serde(default)]
            name: String,
        }
        let filters = serde_json::json!({ "name": [name] }).to_string();
        let networks: Vec<NetworkSummary> = self
            .json(
                Method::GET,
                &format!("/networks?{}", query(&[("filters", filters)])),
                None,
            )
            .await?;
        Ok(networks.iter().any(|network| network.name == name))
    }

    /// `GET /networks/{name}`.
    pub async fn network(&self, name: &str) -> Result<serde_json::Value, DockerError> {
        self.json(Method::GET, &format!("/networks/{}", encode(name)), None)
            .await
    }

    /// `POST /networks/create`.
    pub async fn create_network(&self, body: &serde_json::Value) -> Result<(), DockerError> {
        let bytes = serde_json::to_vec(body).map_err(DockerError::Decode)?;
        self.call(Method::POST, "/networks/create", Some(Bytes::from(bytes)))
            .await
            .map(drop)
    }

    /// `GET /events` for container events with these filters: Docker's stream of JSON objects.
    pub async fn events(&self, filters: &serde_json::Value) -> Result<Incoming, DockerError> {
        let response = self
            .send(
                Method::GET,
                &format!("/events?{}", query(&[("filters", filters.to_string())])),
                &[],
                None,
            )
            .await?;
        Ok(response.into_body())
    }
}

/// Splits `repo[:tag][@digest]` into the `fromImage` and `tag` query values. A digest reference
/// is passed whole as `fromImage`.
pub fn split_reference(image: &str) -> (&str, Option<&str>) {
    if image.contains('@') {
        return (image, None);
    }
    let last_slash = image.rfind('/').map_or(0, |index| index + 1);
    match image[last_slash..].rfind(':') {
        Some(colon) => {
            let split = last_slash + colon;
            (&image[..split], Some(&image[split + 1..]))
        }
        None => (image, Some("latest")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        let cases = [
            ("busybox", ("busybox", Some("latest"))),
            ("busybox:1.36", ("busybox", Some("1.36"))),
            (
                "localhost:5000/agent",
                ("localhost:5000/agent", Some("latest")),
            ),
            (
                "localhost:5000/agent:1.6",
                ("localhost:5000/agent", Some("1.6")),
            ),
            (
                "mcr.microsoft.com/azureiotedge-agent:1.6",
                ("mcr.microsoft.com/azureiotedge-agent", Some("1.6")),
            ),
            ("repo@sha256:abc", ("repo@sha256:abc", None)),
        ];
        for (image, expected) in cases {
            assert_eq!(split_reference(image), expected, "{image}");
        }
    }

    #[test]
    fn query_encoding() {
        assert_eq!(
            query(&[("a", "b c".to_owned()), ("f", "{\"x\":1}".to_owned())]),
            "a=b%20c&f=%7B%22x%22%3A1%7D"
        );
    }
}
