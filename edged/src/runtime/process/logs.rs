//! A process module's captured output: written by its supervisor, served by edged in Docker's
//! 8-byte framed format (spec section 3.3) so edgeAgent and `iotedge logs` read it unchanged.
//!
//! File format (`log`, rotated to `log.1` when it would pass `log_max_bytes`, so a module holds
//! at most twice that): repeated records of a 13-byte header — stream (1 = stdout, 2 = stderr),
//! the Unix time in nanoseconds (8 bytes, big-endian), the payload length (4 bytes, big-endian)
//! — then the payload, one line (with its `\n`) or a piece of at most [`MAX_LINE`] bytes. A
//! record cut short by a crash is ignored.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::runtime::LogOptions;

/// The current log file.
pub const LOG_FILE: &str = "log";
/// The previous log file.
pub const OLD_LOG_FILE: &str = "log.1";
/// Longest payload of one record (Docker splits long lines at 16 KiB too).
pub const MAX_LINE: usize = 16 * 1024;
const HEADER: usize = 13;

/// One log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// 1 = stdout, 2 = stderr.
    pub stream: u8,
    /// Unix time, nanoseconds.
    pub time_nanos: i64,
    /// The line.
    pub payload: Vec<u8>,
}

/// Encodes one record.
pub fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + record.payload.len());
    out.push(record.stream);
    out.extend_from_slice(&record.time_nanos.to_be_bytes());
    let length = u32::try_from(record.payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&record.payload);
    out
}

/// Decodes the complete records at the start of `bytes`; returns them and the bytes consumed.
pub fn decode(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut offset = 0;
    while bytes.len() - offset >= HEADER {
        let header = &bytes[offset..offset + HEADER];
        let mut time = [0u8; 8];
        time.copy_from_slice(&header[1..9]);
        let length = u32::from_be_bytes([header[9], header[10], header[11], header[12]]) as usize;
        if bytes.len() - offset - HEADER < length {
            break;
        }
        records.push(Record {
            stream: header[0],
            time_nanos: i64::from_be_bytes(time),
            payload: bytes[offset + HEADER..offset + HEADER + length].to_vec(),
        });
        offset += HEADER + length;
    }
    (records, offset)
}

/// The supervisor's writer: appends records and rotates the file.
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    max_bytes: u64,
    file: std::fs::File,
    size: u64,
}

fn open_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl LogWriter {
    /// Opens (appends to) the log of the module folder `dir`.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = open_append(&dir.join(LOG_FILE))?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            dir: dir.to_owned(),
            max_bytes,
            file,
            size,
        })
    }

    /// Appends one record (rotating first when it would not fit).
    pub fn write(&mut self, record: &Record) -> std::io::Result<()> {
        let bytes = encode(record);
        let length = bytes.len() as u64;
        if self.size > 0 && self.size + length > self.max_bytes {
            std::fs::rename(self.dir.join(LOG_FILE), self.dir.join(OLD_LOG_FILE))?;
            self.file = open_append(&self.dir.join(LOG_FILE))?;
            self.size = 0;
        }
        self.file.write_all(&bytes)?;
        self.size += length;
        Ok(())
    }
}

/// Splits a stream's output into records: complete lines, or pieces of [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds bytes; returns the finished lines.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.pending.extend_from_slice(bytes);
        let mut lines = Vec::new();
        loop {
            match self.pending.iter().position(|byte| *byte == b'\n') {
                Some(end) if end < MAX_LINE => {
                    lines.push(self.pending.drain(..=end).collect());
                }
                _ if self.pending.len() >= MAX_LINE => {
                    lines.push(self.pending.drain(..MAX_LINE).collect());
                }
                _ => break,
            }
        }
        lines
    }

    /// What is left at the end of the stream.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        (!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending))
    }
}

/// RFC 3339 with nanoseconds and `Z`, as Docker prefixes lines with `timestamps=true`.
pub fn format_nanos(time_nanos: i64) -> String {
    let seconds = time_nanos.div_euclid(1_000_000_000);
    let nanos = time_nanos.rem_euclid(1_000_000_000);
    let (year, month, day, hour, minute, second) = crate::time::utc_parts(seconds);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{nanos:09}Z")
}

/// Whether a record passes `since` / `until` (Unix seconds; `until` inclusive of that second's
/// start, as Docker compares).
pub fn in_window(record: &Record, options: &LogOptions) -> bool {
    let since_ok = options
        .since
        .is_none_or(|since| record.time_nanos >= since.saturating_mul(1_000_000_000));
    let until_ok = options
        .until
        .is_none_or(|until| record.time_nanos <= until.saturating_mul(1_000_000_000));
    since_ok && until_ok
}

/// One frame of Docker's multiplexed stream for a record.
pub fn frame(record: &Record, timestamps: bool) -> Vec<u8> {
    let mut payload = Vec::with_capacity(record.payload.len() + 32);
    if timestamps {
        payload.extend_from_slice(format_nanos(record.time_nanos).as_bytes());
        payload.push(b' ');
    }
    payload.extend_from_slice(&record.payload);
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.push(if record.stream == 2 { 2 } else { 1 });
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(&payload);
    out
}

/// The records of both files of the module folder `dir`, oldest first, and the size of the
/// current file that was read.
pub fn read_all(dir: &Path) -> (Vec<Record>, u64, Option<u64>) {
    let mut records = Vec::new();
    if let Ok(bytes) = std::fs::read(dir.join(OLD_LOG_FILE)) {
        records.extend(decode(&bytes).0);
    }
    let (consumed, inode) = match std::fs::read(dir.join(LOG_FILE)) {
        Ok(bytes) => {
            let (current, consumed) = decode(&bytes);
            records.extend(current);
            (consumed as u64, inode_of(&dir.join(LOG_FILE)))
        }
        Err(_) => (0, None),
    };
    (records, consumed, inode)
}

/// The inode of a file (rotation detection).
pub fn inode_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|metadata| metadata.ino())
}

/// Selects and frames the records a query asks for (window, then `tail`).
pub fn select(records: &[Record], options: &LogOptions) -> Bytes {
    let in_window: Vec<&Record> = records
        .iter()
        .filter(|record| in_window(record, options))
        .collect();
    let skip = match options.tail.as_deref() {
        None | Some("all") => 0,
        Some(count) => {
            let count: usize = count.parse().unwrap_or(usize::MAX);
            in_window.len().saturating_sub(count)
        }
    };
    let mut out = Vec::new();
    for record in &in_window[skip..] {
        out.extend_from_slice(&frame(record, options.timestamps));
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(stream: u8, seconds: i64, text: &str) -> Record {
        Record {
            stream,
            time_nanos: seconds * 1_000_000_000 + 5,
            payload: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_ignored() {
        let records = vec![record(1, 10, "a\n"), record(2, 11, "bb\n")];
        let mut bytes: Vec<u8> = records.iter().flat_map(encode).collect();
        let whole = bytes.len();
        bytes.extend_from_slice(&encode(&record(1, 12, "torn\n"))[..7]);
        let (decoded, consumed) = decode(&bytes);
        assert_eq!(decoded, records);
        assert_eq!(consumed, whole);
    }

    #[test]
    fn lines_are_split_at_newlines_and_at_the_line_limit() {
        let mut splitter = LineSplitter::default();
        assert_eq!(splitter.push(b"one\ntw"), vec![b"one\n".to_vec()]);
        assert_eq!(splitter.push(b"o\n"), vec![b"two\n".to_vec()]);
        let long = vec![b'x'; MAX_LINE + 3];
        let pieces = splitter.push(&long);
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].len(), MAX_LINE);
        assert_eq!(splitter.finish(), Some(b"xxx".to_vec()));
        assert_eq!(splitter.finish(), None);
    }

    #[test]
    fn queries_select_by_window_then_tail_and_frame_like_docker() {
        let records = vec![
            record(1, 100, "a\n"),
            record(2, 200, "b\n"),
            record(1, 300, "c\n"),
        ];
        let texts = |options: LogOptions| {
            let bytes = select(&records, &options);
            let mut out = Vec::new();
            let mut rest = &bytes[..];
            while rest.len() >= 8 {
                let length = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
                out.push((
                    rest[0],
                    String::from_utf8_lossy(&rest[8..8 + length]).into_owned(),
                ));
                rest = &rest[8 + length..];
            }
            out
        };
        assert_eq!(
            texts(LogOptions::default()),
            vec![(1, "a\n".into()), (2, "b\n".into()), (1, "c\n".into())]
        );
        let tail = LogOptions {
            tail: Some("1".into()),
            ..LogOptions::default()
        };
        assert_eq!(texts(tail), vec![(1, "c\n".into())]);
        let window = LogOptions {
            since: Some(150),
            until: Some(250),
            ..LogOptions::default()
        };
        assert_eq!(texts(window), vec![(2, "b\n".into())]);
        let stamped = LogOptions {
            tail: Some("1".into()),
            timestamps: true,
            ..LogOptions::default()
        };
        assert_eq!(
            texts(stamped),
            vec![(1, "1970-01-01T00:05:00.000000005Z c\n".into())]
        );
    }

    #[test]
    fn the_writer_rotates_into_one_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = LogWriter::open(dir.path(), 64).unwrap();
        for second in 0..10 {
            writer.write(&record(1, second, "0123456789\n")).unwrap();
        }
        let (records, _, _) = read_all(dir.path());
        // 24 bytes a record, 64 bytes a file: two in the current file, two in the old one.
        assert_eq!(records.len(), 4);
        assert_eq!(records.last().unwrap().time_nanos, 9_000_000_005);
        assert!(std::fs::metadata(dir.path().join(LOG_FILE)).unwrap().len() <= 64);
    }
}
