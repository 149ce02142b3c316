//! The module commands (`list`, `logs`, `restart`) against edged's management API
//! (`/var/run/iotedge/mgmt.sock` by default, api-version `2020-07-07` as the reference CLI).
//!
//! Requests go through `http_common::UdsClient`; `logs --follow` reads its never-ending answer
//! with `UdsClient::stream`.

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use crate::error::DaemonError;

/// The management API version the CLI speaks.
pub const API_VERSION: &str = "2020-07-07";

/// `ModuleDetails` fields the CLI shows.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Module {
    /// The module name.
    pub name: String,
    /// Its status.
    pub status: ModuleStatus,
    /// Its configuration (image).
    #[serde(default)]
    pub config: ModuleConfig,
}

/// `ModuleDetails.config`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ModuleConfig {
    /// `settings`.
    #[serde(default)]
    pub settings: ModuleSettings,
}

/// `ModuleDetails.config.settings`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ModuleSettings {
    /// The image.
    #[serde(default)]
    pub image: String,
}

/// `ModuleDetails.status`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ModuleStatus {
    /// When it started.
    pub start_time: Option<String>,
    /// How it last exited.
    pub exit_status: Option<ExitStatus>,
    /// `runtimeStatus`.
    pub runtime_status: RuntimeStatus,
}

/// `exitStatus`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExitStatus {
    /// When.
    pub exit_time: String,
    /// The code, as a string.
    pub status_code: String,
}

/// `runtimeStatus`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct RuntimeStatus {
    /// `running`, `stopped`, `failed`, ...
    pub status: String,
    /// Docker's text, e.g. `Up 3 hours`.
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ModuleList {
    modules: Vec<Module>,
}

fn encode_segment(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// `GET /modules`.
pub fn list(mgmt_uri: &str, timeout: Duration) -> Result<Vec<Module>, DaemonError> {
    let client = crate::client(mgmt_uri, timeout)?;
    let list: ModuleList = crate::block_on(client.json(
        http::Method::GET,
        &format!("/modules?api-version={API_VERSION}"),
        None::<&()>,
        http::StatusCode::OK,
    ))?
    .map_err(|source| DaemonError::Request {
        what: format!("listing modules via {mgmt_uri}"),
        source,
    })?;
    let mut modules = list.modules;
    modules.sort_by(|left, right| left.name.cmp(&right.name));
    Ok(modules)
}

/// Renders `list` as the reference CLI's table.
pub fn format_list(modules: &[Module]) -> String {
    let rows: Vec<[String; 4]> = modules
        .iter()
        .map(|module| {
            let description = module
                .status
                .runtime_status
                .description
                .clone()
                .unwrap_or_default();
            [
                module.name.clone(),
                module.status.runtime_status.status.clone(),
                description,
                module.config.settings.image.clone(),
            ]
        })
        .collect();
    let header = ["NAME", "STATUS", "DESCRIPTION", "CONFIG"].map(str::to_owned);
    let mut widths = header.clone().map(|column| column.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut text = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(index, (cell, width))| {
                if index == 3 {
                    cell.clone()
                } else {
                    format!("{cell:width$}")
                }
            })
            .collect();
        text.push_str(line.join("   ").trim_end());
        text.push('\n');
    }
    text
}

/// `POST /modules/{name}/restart`.
pub fn restart(mgmt_uri: &str, name: &str) -> Result<(), DaemonError> {
    let client = crate::client(mgmt_uri, Duration::from_secs(60))?;
    crate::block_on(client.no_content(
        http::Method::POST,
        &format!(
            "/modules/{}/restart?api-version={API_VERSION}",
            encode_segment(name)
        ),
        None::<&()>,
        http::StatusCode::NO_CONTENT,
    ))?
    .map_err(|source| DaemonError::Request {
        what: format!("restarting {name} via {mgmt_uri}"),
        source,
    })
}

/// Options of `iotedge logs`.
#[derive(Clone, Debug, Default)]
pub struct LogOptions {
    /// `tail` (`all` or a count).
    pub tail: Option<String>,
    /// `since` (RFC 3339, Unix seconds or a duration such as `10m`).
    pub since: Option<String>,
    /// `until`.
    pub until: Option<String>,
    /// Keep streaming.
    pub follow: bool,
    /// Prefix lines with timestamps.
    pub timestamps: bool,
}

/// The `GET /modules/{name}/logs` path and query.
pub fn logs_path(name: &str, options: &LogOptions) -> String {
    let mut query = format!("api-version={API_VERSION}&follow={}", options.follow);
    let encode = |value: &str| {
        percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    if let Some(tail) = &options.tail {
        query.push_str(&format!("&tail={}", encode(tail)));
    }
    if let Some(since) = &options.since {
        query.push_str(&format!("&since={}", encode(since)));
    }
    if let Some(until) = &options.until {
        query.push_str(&format!("&until={}", encode(until)));
    }
    if options.timestamps {
        query.push_str("&timestamps=true");
    }
    format!("/modules/{}/logs?{query}", encode_segment(name))
}

/// Splits Docker's multiplexed log stream (8-byte frame headers: stream type, 3 zero bytes,
/// big-endian length) into (stream, payload) frames; returns the unconsumed rest. A body that
/// is not framed (a TTY container) comes back as one stdout frame.
pub fn demultiplex(buffer: &[u8], end: bool) -> (Vec<(u8, Vec<u8>)>, usize) {
    let mut frames = Vec::new();
    let mut offset = 0;
    while buffer.len() - offset >= 8 {
        let header = &buffer[offset..offset + 8];
        if !matches!(header[0], 0..=2) || header[1..4] != [0, 0, 0] {
            // Not framed: pass through as is.
            frames.push((1, buffer[offset..].to_vec()));
            return (frames, buffer.len());
        }
        let length = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if buffer.len() - offset - 8 < length {
            break;
        }
        frames.push((header[0], buffer[offset + 8..offset + 8 + length].to_vec()));
        offset += 8 + length;
    }
    if end && offset < buffer.len() {
        frames.push((1, buffer[offset..].to_vec()));
        offset = buffer.len();
    }
    (frames, offset)
}

fn write_frames(frames: Vec<(u8, Vec<u8>)>) -> Result<(), DaemonError> {
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    for (stream, payload) in frames {
        let result = if stream == 2 {
            stderr.lock().write_all(&payload)
        } else {
            stdout.lock().write_all(&payload)
        };
        result.map_err(DaemonError::Output)?;
    }
    stdout.lock().flush().map_err(DaemonError::Output)
}

/// `GET /modules/{name}/logs`, demultiplexed to stdout and stderr.
pub fn logs(mgmt_uri: &str, name: &str, options: &LogOptions) -> Result<(), DaemonError> {
    let what = || format!("reading the logs of {name} via {mgmt_uri}");
    let path = logs_path(name, options);
    if options.follow {
        return crate::block_on(follow(mgmt_uri, &path, what()))?;
    }
    let client = crate::client(mgmt_uri, Duration::from_secs(120))?;
    let response = crate::block_on(client.send(http::Method::GET, &path, &[], Bytes::new()))?
        .map_err(|source| DaemonError::Request {
            what: what(),
            source,
        })?;
    if response.status != http::StatusCode::OK {
        return Err(DaemonError::Request {
            what: what(),
            source: http_common::ClientError::Status {
                status: response.status,
                message: http_common::client::error_message(&response.body),
            },
        });
    }
    let (frames, _) = demultiplex(&response.body, true);
    write_frames(frames)
}

/// Streams a followed log until edged ends it (the module stopped) or the user interrupts.
async fn follow(mgmt_uri: &str, path: &str, what: String) -> Result<(), DaemonError> {
    let client = crate::client(mgmt_uri, Duration::from_secs(120))?;
    let failed = |source| DaemonError::Request {
        what: what.clone(),
        source,
    };
    let mut response = client
        .stream(http::Method::GET, path, &[], Bytes::new())
        .await
        .map_err(failed)?;
    if response.status != http::StatusCode::OK {
        let body = response.body.collect().await.map_err(failed)?;
        return Err(failed(http_common::ClientError::Status {
            status: response.status,
            message: http_common::client::error_message(&body),
        }));
    }
    let mut pending = Vec::new();
    while let Some(chunk) = response.body.chunk().await.map_err(failed)? {
        pending.extend_from_slice(&chunk);
        let (frames, consumed) = demultiplex(&pending, false);
        pending.drain(..consumed);
        write_frames(frames)?;
    }
    let (frames, _) = demultiplex(&pending, true);
    write_frames(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stream: u8, payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![stream, 0, 0, 0];
        bytes.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn demultiplexes_docker_frames_and_keeps_partial_ones() {
        let mut stream = frame(1, b"out\n");
        stream.extend(frame(2, b"err\n"));
        let partial = frame(1, b"later\n");
        stream.extend_from_slice(&partial[..5]);
        let (frames, consumed) = demultiplex(&stream, false);
        assert_eq!(frames, vec![(1, b"out\n".to_vec()), (2, b"err\n".to_vec())]);
        assert_eq!(consumed, stream.len() - 5);
        let (frames, _) = demultiplex(b"plain text without frames\n", true);
        assert_eq!(frames, vec![(1, b"plain text without frames\n".to_vec())]);
    }

    #[test]
    fn logs_query() {
        let options = LogOptions {
            tail: Some("10".into()),
            since: Some("1 day".into()),
            ..LogOptions::default()
        };
        assert_eq!(
            logs_path("$edgeAgent", &options),
            "/modules/%24edgeAgent/logs?api-version=2020-07-07&follow=false&tail=10&since=1%20day"
        );
    }
}
