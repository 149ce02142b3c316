//! Connection limits of the real server on a real Unix socket, with short configured timeouts:
//! the request-head deadline (a silent connection, a trickled head), the idle keep-alive
//! timeout (and none while a request is being answered), the per-uid budget and the daemon-wide
//! cap answered 503 at once without parking the refused connection.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use http_common::server::ConnectionCap;
use http_common::{json_response, Handler, Request, Response, ServerOptions, UdsClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// `/slow` answers after 1.5 s, `/endless` with a body that never ends; everything else at once.
struct Echo;

impl Handler for Echo {
    async fn handle(&self, request: Request) -> Response {
        if request.path == "/endless" {
            let chunks = futures_util::stream::iter(std::iter::repeat_with(|| {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                    bytes::Bytes::from(vec![b'x'; 64 * 1024]),
                ))
            }));
            return hyper::Response::new(http_body_util::BodyExt::boxed(
                http_body_util::StreamBody::new(chunks),
            ));
        }
        if request.path == "/slow" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        json_response(StatusCode::OK, &serde_json::json!({ "path": request.path }))
    }
}

fn options(header: Duration, idle: Duration) -> ServerOptions {
    ServerOptions {
        header_timeout: header,
        idle_timeout: idle,
        connections: ConnectionCap::new(1000),
        ..ServerOptions::default()
    }
}

fn start(dir: &Path, name: &str, options: ServerOptions) -> PathBuf {
    let socket = dir.join(name);
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(http_common::serve(
        listener,
        Arc::new(Echo),
        options,
        std::future::pending(),
    ));
    socket
}

/// One parsed response.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HashMap<String, String>,
    body: serde_json::Value,
}

/// Parses the first complete response in `bytes`; `None` while incomplete. Returns its length.
fn parse(bytes: &[u8]) -> Option<(Answer, usize)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let head_end = text.find("\r\n\r\n")?;
    let mut lines = text[..head_end].split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    let length: usize = headers.get("content-length")?.parse().ok()?;
    let end = head_end + 4 + length;
    if bytes.len() < end {
        return None;
    }
    let body = serde_json::from_slice(&bytes[head_end + 4..end]).unwrap();
    Some((
        Answer {
            status,
            headers,
            body,
        },
        end,
    ))
}

/// Reads until the server closes the connection; panics if it is still open after `within`.
async fn read_to_close(stream: &mut UnixStream, within: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    tokio::time::timeout(within, async {
        let mut buffer = [0_u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => seen.extend_from_slice(&buffer[..read]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the server kept the connection open for {within:?} (read {:?})",
            String::from_utf8_lossy(&seen)
        )
    });
    seen
}

/// Reads one response without waiting for the connection to close.
async fn read_answer(stream: &mut UnixStream, within: Duration) -> Answer {
    let mut seen = Vec::new();
    tokio::time::timeout(within, async {
        let mut buffer = [0_u8; 4096];
        loop {
            if let Some((answer, _)) = parse(&seen) {
                return answer;
            }
            let read = stream.read(&mut buffer).await.unwrap();
            assert!(
                read > 0,
                "closed before an answer: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buffer[..read]);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no answer within {within:?}: {:?}",
            String::from_utf8_lossy(&seen)
        )
    })
}

async fn get(stream: &mut UnixStream, path: &str) -> Answer {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_answer(stream, Duration::from_secs(5)).await
}

/// A fresh connection is served 200 (retrying while the server notices closed connections).
async fn served_again(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = UnixStream::connect(socket).await.unwrap();
        let answer = get(&mut stream, "/fresh").await;
        if answer.status == 200 {
            return;
        }
        assert_eq!(answer.status, 503, "{answer:?}");
        assert!(Instant::now() < deadline, "never served again: {answer:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_nothing_gets_408_and_is_closed_at_the_header_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let header = Duration::from_millis(400);
    let socket = start(
        dir.path(),
        "s.sock",
        options(header, Duration::from_secs(30)),
    );
    let started = Instant::now();
    let mut stream = UnixStream::connect(&socket).await.unwrap();
    let seen = read_to_close(&mut stream, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    assert!(elapsed >= header - Duration::from_millis(20), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let (answer, _) = parse(&seen).unwrap();
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(answer.headers["content-type"], "application/json");
    assert_eq!(
        answer.body["message"],
        "request head not received within 400 ms"
    );
    served_again(&socket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_head_is_cut_off_at_the_deadline_not_per_byte() {
    let dir = tempfile::tempdir().unwrap();
    let header = Duration::from_millis(500);
    let socket = start(
        dir.path(),
        "s.sock",
        options(header, Duration::from_secs(30)),
    );
    let started = Instant::now();
    let stream = UnixStream::connect(&socket).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    // 30 bytes, one every 100 ms: each byte comes well within the deadline, the head does not.
    let trickle = tokio::spawn(async move {
        for byte in b"GET /ok HTTP/1.1\r\nHost: test\r\n\r\n" {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Keep the write half open: the server, not the client, must end it.
        std::future::pending::<()>().await;
    });
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut seen))
        .await
        .expect("the trickled connection was never cut off")
        .ok();
    let elapsed = started.elapsed();
    trickle.abort();
    assert!(elapsed >= header - Duration::from_millis(20), "{elapsed:?}");
    assert!(
        elapsed < Duration::from_millis(1500),
        "cut off after {elapsed:?}, not at the 500 ms deadline"
    );
    let (answer, _) = parse(&seen).unwrap();
    assert_eq!(answer.status, 408, "{answer:?}");
    served_again(&socket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_close_at_the_idle_timeout_busy_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let header = Duration::from_millis(300);
    let idle = Duration::from_millis(900);
    let socket = start(dir.path(), "s.sock", options(header, idle));

    // Kept alive past the header timeout: a second request 500 ms later is served.
    let mut stream = UnixStream::connect(&socket).await.unwrap();
    assert_eq!(get(&mut stream, "/one").await.status, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&mut stream, "/two").await.status, 200);
    // Then idle: closed (without an answer) at the idle timeout.
    let answered = Instant::now();
    let seen = read_to_close(&mut stream, Duration::from_secs(5)).await;
    let elapsed = answered.elapsed();
    assert!(seen.is_empty(), "{:?}", String::from_utf8_lossy(&seen));
    assert!(elapsed >= idle - Duration::from_millis(50), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");

    // A request being answered for longer than both timeouts is not cut off, and the
    // connection then gets its idle time again.
    let mut stream = UnixStream::connect(&socket).await.unwrap();
    let started = Instant::now();
    let answer = get(&mut stream, "/slow").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body["path"], "/slow");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(get(&mut stream, "/after").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_response_is_cut_off_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let idle = Duration::from_millis(500);
    let socket = start(dir.path(), "s.sock", options(Duration::from_secs(30), idle));
    let mut stream = UnixStream::connect(&socket).await.unwrap();
    stream
        .write_all(b"GET /endless HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    // The response is being sent (no idle deadline applies), but the client reads nothing
    // for well past the idle timeout: the server gives up on the write and closes, so what
    // is left to read is only what the socket buffers held.
    tokio::time::sleep(idle * 4).await;
    let mut buffer = vec![0_u8; 64 * 1024];
    let mut first = Vec::new();
    let mut total = 0;
    tokio::time::timeout(Duration::from_secs(5), async {
        while total < 64 * 1024 * 1024 {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    if first.is_empty() {
                        first = buffer[..read].to_vec();
                    }
                    total += read;
                }
            }
        }
    })
    .await
    .unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));
    assert!(
        total < 64 * 1024 * 1024,
        "the server kept sending to a client that had stopped reading"
    );
    served_again(&socket).await;
}

/// Keeps a connection open that has been answered once (so the server has counted it).
async fn held(socket: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(socket).await.unwrap();
    assert_eq!(get(&mut stream, "/held").await.status, 200);
    stream
}

/// A connection that sends nothing gets a 503 at once (within the server's 200 ms grace for a
/// caller to start its request), and the server closes it within about a second although the
/// caller keeps its end open.
async fn refused_at_once(socket: &Path, message: &str) {
    let started = Instant::now();
    let mut stream = UnixStream::connect(socket).await.unwrap();
    let answer = read_answer(&mut stream, Duration::from_secs(1)).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.headers["retry-after"], "1");
    assert_eq!(answer.headers["content-type"], "application/json");
    assert_eq!(answer.body["message"], message);
    read_to_close(&mut stream, Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_uid_budget_the_next_connection_gets_503_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let socket = start(
        dir.path(),
        "s.sock",
        ServerOptions {
            max_connections_per_uid: 2,
            ..options(Duration::from_secs(30), Duration::from_secs(30))
        },
    );
    let first = held(&socket).await;
    let second = held(&socket).await;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let message = format!("too many concurrent connections for uid {uid} (limit 2)");
    refused_at_once(&socket, &message).await;
    // A caller that sends its request at once (hyper's client) reads the 503, not a broken
    // connection.
    for _ in 0..20 {
        let response = UdsClient::new(&socket)
            .send(http::Method::GET, "/x", &[], bytes::Bytes::new())
            .await
            .unwrap();
        assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers["retry-after"], "1");
    }
    // Many refused callers that never read nor close do not hold the server's descriptors.
    let mut ignored = Vec::new();
    for _ in 0..200 {
        ignored.push(UnixStream::connect(&socket).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for stream in &mut ignored {
        let seen = read_to_close(stream, Duration::from_millis(500)).await;
        assert_eq!(parse(&seen).unwrap().0.status, 503);
    }
    drop((first, second));
    served_again(&socket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_daemon_cap_the_next_connection_gets_503_at_once_on_any_listener() {
    let dir = tempfile::tempdir().unwrap();
    let cap = ConnectionCap::new(3);
    let shared = ServerOptions {
        max_connections_per_uid: 100,
        connections: cap.clone(),
        ..options(Duration::from_secs(30), Duration::from_secs(30))
    };
    let a = start(dir.path(), "a.sock", shared.clone());
    let b = start(dir.path(), "b.sock", shared);
    let held_a = vec![held(&a).await, held(&a).await];
    let held_b = held(&b).await;
    assert_eq!(cap.open(), 3);
    refused_at_once(&b, "too many open connections (limit 3)").await;
    refused_at_once(&a, "too many open connections (limit 3)").await;
    drop(held_b);
    served_again(&a).await;
    drop(held_a);
    served_again(&b).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while cap.open() != 0 {
        assert!(Instant::now() < deadline, "{} still counted", cap.open());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
