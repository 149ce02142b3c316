//! `GET /systeminfo/supportbundle`: a zip of what helps diagnose a device — `check.json` (output
//! of `iotedge check -o json`, when the CLI is installed), `logs/<module>_log.txt`
//! (demultiplexed), `inspect/<module>.json`, `network/<network>.json` and `logs/<unit>.txt`
//! (journal of keyd, certd, identityd, edged and docker, time-filtered).
//!
//! The zip is written here with the "stored" method (no compression, so no extra crate); it is
//! built in memory and sent with `Content-Type: application/zip` and no `Content-Encoding`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt as _;

use crate::error::EdgedError;
use crate::identity::IdentityClient;
use crate::runtime::{LogOptions, ModuleRuntime};
use crate::service::Edged;

/// The journal units collected.
pub const UNITS: &[&str] = &[
    "aziot-keyd",
    "aziot-certd",
    "aziot-identityd",
    "aziot-edged",
    "docker",
];

/// The support bundle query, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BundleOptions {
    /// Unix seconds.
    pub since: Option<i64>,
    /// Unix seconds.
    pub until: Option<i64>,
    /// Passed to `iotedge check`.
    pub iothub_hostname: Option<String>,
    /// Only edgeAgent and edgeHub.
    pub edge_runtime_only: bool,
}

/// Turns Docker's framed log stream into plain text; raw (TTY) streams pass unchanged.
pub fn demultiplex(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        let framed = rest.len() >= 8 && rest[0] <= 2 && rest[1..4] == [0, 0, 0];
        if !framed {
            return bytes.to_vec();
        }
        let length = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        let Some(payload) = rest.get(8..8 + length) else {
            return bytes.to_vec();
        };
        out.extend_from_slice(payload);
        rest = &rest[8 + length..];
    }
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

/// A minimal zip writer (stored entries, no compression).
#[derive(Debug, Default)]
pub struct ZipWriter {
    data: Vec<u8>,
    central: Vec<u8>,
    entries: u16,
}

fn push16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn push32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

impl ZipWriter {
    /// Adds a file.
    pub fn add(&mut self, name: &str, contents: &[u8]) {
        let (Ok(size), Ok(offset), Ok(name_length)) = (
            u32::try_from(contents.len()),
            u32::try_from(self.data.len()),
            u16::try_from(name.len()),
        ) else {
            log::warn!("support bundle: {name} is too large for the zip; skipped");
            return;
        };
        let (year, month, day, hour, minute, second) =
            crate::time::utc_parts(crate::time::now_unix());
        let dos_time = u16::try_from((hour << 11) | (minute << 5) | (second / 2)).unwrap_or(0);
        let dos_date =
            u16::try_from(((u32::try_from(year - 1980).unwrap_or(0)) << 9) | (month << 5) | day)
                .unwrap_or(0);
        let crc = crc32(contents);
        let mut local = Vec::new();
        push32(&mut local, 0x0403_4b50);
        push16(&mut local, 20); // version needed
        push16(&mut local, 0x0800); // UTF-8 names
        push16(&mut local, 0); // stored
        push16(&mut local, dos_time);
        push16(&mut local, dos_date);
        push32(&mut local, crc);
        push32(&mut local, size);
        push32(&mut local, size);
        push16(&mut local, name_length);
        push16(&mut local, 0);
        local.extend_from_slice(name.as_bytes());
        self.data.extend_from_slice(&local);
        self.data.extend_from_slice(contents);
        let central = &mut self.central;
        push32(central, 0x0201_4b50);
        push16(central, 0x031e); // made by: Unix, 3.0
        push16(central, 20);
        push16(central, 0x0800);
        push16(central, 0);
        push16(central, dos_time);
        push16(central, dos_date);
        push32(central, crc);
        push32(central, size);
        push32(central, size);
        push16(central, name_length);
        push16(central, 0); // extra
        push16(central, 0); // comment
        push16(central, 0); // disk
        push16(central, 0); // internal attributes
        push32(central, 0o100_644 << 16); // external attributes: regular file 0644
        push32(central, offset);
        central.extend_from_slice(name.as_bytes());
        self.entries = self.entries.saturating_add(1);
    }

    /// The finished archive.
    pub fn finish(mut self) -> Vec<u8> {
        let offset = u32::try_from(self.data.len()).unwrap_or(u32::MAX);
        let size = u32::try_from(self.central.len()).unwrap_or(u32::MAX);
        let central = std::mem::take(&mut self.central);
        self.data.extend_from_slice(&central);
        let end = &mut self.data;
        push32(end, 0x0605_4b50);
        push16(end, 0);
        push16(end, 0);
        push16(end, self.entries);
        push16(end, self.entries);
        push32(end, size);
        push32(end, offset);
        push16(end, 0);
        self.data
    }
}

/// Runs a command with a deadline; its stdout when it ran (whatever its exit code).
fn run_command(program: &str, arguments: &[String], timeout: Duration) -> Option<Vec<u8>> {
    let mut child = Command::new(program)
        .args(arguments)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut output = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut output);
        output
    });
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    reader.join().ok()
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|folder| folder.join(program).is_file())
    })
}

/// Builds the support bundle.
pub async fn support_bundle<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    options: &BundleOptions,
) -> Result<Vec<u8>, EdgedError> {
    let mut zip = ZipWriter::default();
    if on_path("iotedge") {
        let mut arguments = vec!["check".to_owned(), "-o".to_owned(), "json".to_owned()];
        if let Some(hub) = &options.iothub_hostname {
            arguments.push("--iothub-hostname".to_owned());
            arguments.push(hub.clone());
        }
        let output = tokio::task::spawn_blocking(move || {
            run_command("iotedge", &arguments, Duration::from_secs(60))
        })
        .await
        .ok()
        .flatten();
        if let Some(output) = output {
            zip.add("check.json", &output);
        }
    }
    let agent = edged.config.agent.name.clone();
    let modules = edged.runtime.list().await?;
    for module in modules {
        let name = module.name;
        if options.edge_runtime_only && name != agent && name != "edgeAgent" && name != "edgeHub" {
            continue;
        }
        let log_options = LogOptions {
            follow: false,
            tail: None,
            since: options.since,
            until: options.until,
            timestamps: true,
        };
        match edged.runtime.logs(&name, &log_options).await {
            Ok(body) => match body.collect().await {
                Ok(collected) => {
                    zip.add(
                        &format!("logs/{name}_log.txt"),
                        &demultiplex(&collected.to_bytes()),
                    );
                }
                Err(error) => log::warn!("support bundle: logs of {name}: {error}"),
            },
            Err(error) => log::warn!("support bundle: logs of {name}: {error}"),
        }
        match edged.runtime.inspect(&name).await {
            Ok(value) => zip.add(
                &format!("inspect/{name}.json"),
                &serde_json::to_vec_pretty(&value).unwrap_or_default(),
            ),
            Err(error) => log::warn!("support bundle: inspect of {name}: {error}"),
        }
    }
    if let Ok(Some((network, value))) = edged.runtime.network_info().await {
        zip.add(
            &format!("network/{network}.json"),
            &serde_json::to_vec_pretty(&value).unwrap_or_default(),
        );
    }
    if on_path("journalctl") {
        let (since, until) = (options.since, options.until);
        let journals = tokio::task::spawn_blocking(move || {
            UNITS
                .iter()
                .filter_map(|unit| {
                    let mut arguments = vec![
                        "-u".to_owned(),
                        (*unit).to_owned(),
                        "--no-pager".to_owned(),
                        "-o".to_owned(),
                        "short-iso".to_owned(),
                    ];
                    if let Some(since) = since {
                        arguments.push(format!("--since=@{since}"));
                    }
                    if let Some(until) = until {
                        arguments.push(format!("--until=@{until}"));
                    }
                    run_command("journalctl", &arguments, Duration::from_secs(30))
                        .map(|output| (*unit, output))
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (unit, output) in journals {
            zip.add(&format!("logs/{unit}.txt"), &output);
        }
    }
    Ok(zip.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demultiplexes_frames_and_passes_raw_streams() {
        let mut framed = vec![1, 0, 0, 0, 0, 0, 0, 3];
        framed.extend_from_slice(b"ab\n");
        framed.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 2]);
        framed.extend_from_slice(b"c\n");
        assert_eq!(demultiplex(&framed), b"ab\nc\n");
        assert_eq!(demultiplex(b"plain tty output\n"), b"plain tty output\n");
        assert_eq!(
            demultiplex(&[1, 0, 0, 0, 0, 0, 0, 9, b'x']),
            [1, 0, 0, 0, 0, 0, 0, 9, b'x']
        );
    }

    #[test]
    fn crc_and_zip_layout() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let mut zip = ZipWriter::default();
        zip.add("a.txt", b"hello");
        zip.add("dir/b.json", b"{}");
        let bytes = zip.finish();
        assert_eq!(&bytes[..4], b"PK\x03\x04");
        let end = &bytes[bytes.len() - 22..];
        assert_eq!(&end[..4], b"PK\x05\x06");
        assert_eq!(u16::from_le_bytes([end[10], end[11]]), 2);
    }
}
