//! The accept loop when the process is out of file descriptors: this test lowers its own
//! RLIMIT_NOFILE (it is the only test in this binary, so nothing else shares the limit) and
//! fills the descriptor table, with a caller waiting to be accepted. The server must not spin
//! (CPU time over a second of EMFILE stays low), log the condition once rather than once per
//! retry, serve the waiting caller when descriptors free up, and, once it has its spare
//! descriptor back, answer a caller that arrives during EMFILE 503 at once instead of leaving
//! it waiting in the backlog.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use http_common::{json_response, Handler, Request, Response, ServerOptions};

struct Ok200;

impl Handler for Ok200 {
    async fn handle(&self, _request: Request) -> Response {
        json_response(StatusCode::OK, &serde_json::json!({ "ok": true }))
    }
}

/// Keeps every warning logged.
struct Warnings(Arc<Mutex<Vec<String>>>);

impl log::Log for Warnings {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.level() <= log::Level::Warn {
            self.0.lock().unwrap().push(record.args().to_string());
        }
    }

    fn flush(&self) {}
}

fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given, which lives on this stack.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    let micros = |time: libc::timeval| time.tv_sec as u64 * 1_000_000 + time.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// Opens descriptors until the limit is reached.
fn exhaust() -> Vec<std::fs::File> {
    let mut fillers = Vec::new();
    loop {
        match std::fs::File::open("/dev/null") {
            Ok(file) => fillers.push(file),
            Err(error) => {
                assert_eq!(error.raw_os_error(), Some(libc::EMFILE), "{error}");
                return fillers;
            }
        }
    }
}

/// Connects (on a descriptor freed for it) and sends a request.
fn call(socket: &std::path::Path) -> UnixStream {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .write_all(b"GET /x HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream
}

/// The status line of the whole answer (the server closes after it).
fn answer(mut stream: UnixStream) -> String {
    let mut seen = Vec::new();
    let result = stream.read_to_end(&mut seen);
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(result.is_ok(), "no answer within 3 s: {result:?} {text:?}");
    text
}

#[test]
fn out_of_descriptors_the_server_backs_off_recovers_and_refuses_at_once() {
    let warnings = Arc::new(Mutex::new(Vec::new()));
    log::set_boxed_logger(Box::new(Warnings(Arc::clone(&warnings)))).unwrap();
    log::set_max_level(log::LevelFilter::Info);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("s.sock");
    let listener = {
        let _entered = runtime.enter();
        tokio::net::UnixListener::bind(&socket).unwrap()
    };

    // A limit a little above what is open now, then every descriptor taken but one, which the
    // waiting caller takes.
    let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the rlimit on this stack.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = (open_now + 64).min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    let mut fillers = exhaust();
    fillers.pop();
    let waiting = call(&socket);
    // The server starts with no descriptor to spare: accept fails with EMFILE.
    runtime.spawn(http_common::serve(
        listener,
        Arc::new(Ok200),
        ServerOptions::default(),
        std::future::pending(),
    ));
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_time() - before;
    assert!(
        spent < Duration::from_millis(200),
        "{spent:?} of CPU in 1 s of EMFILE"
    );
    {
        let warnings = warnings.lock().unwrap();
        let emfile: Vec<_> = warnings
            .iter()
            .filter(|line| line.contains("Too many open files"))
            .collect();
        assert_eq!(
            emfile.len(),
            1,
            "one line per burst, not per retry: {warnings:#?}"
        );
    }

    // Descriptors free up: the waiting caller is served.
    fillers.truncate(fillers.len().saturating_sub(8));
    let text = answer(waiting);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");

    // Out of descriptors again (the server has its spare back): a new caller gets 503 at once.
    std::thread::sleep(Duration::from_millis(100));
    fillers.extend(exhaust());
    fillers.pop();
    let refused = call(&socket);
    let text = answer(refused);
    assert!(text.starts_with("HTTP/1.1 503"), "{text:?}");
    assert!(text.contains("retry-after: 1"), "{text:?}");
    assert!(
        text.ends_with(r#"{"message":"the service is out of file descriptors"}"#),
        "{text:?}"
    );

    drop(fillers);
    let text = answer(call(&socket));
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
}
