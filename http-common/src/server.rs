//! The HTTP/1.1 server loop over a Unix listener.
//!
//! For every connection it reads the peer's credentials once, enforces the per-uid connection
//! budget and the daemon-wide connection cap (answering 503 at once rather than dropping or
//! parking the connection), bounds how long a request head may take to arrive and how long a
//! kept-alive connection may sit idle, receives each request body within the size limit and
//! deadline, hands a complete [`Request`] to the daemon's [`Handler`], logs one line per request,
//! and drains in-flight requests on shutdown. When the process runs out of file descriptors the
//! accept loop backs off instead of spinning and answers waiting callers 503 with a spare
//! descriptor kept for that. It knows nothing about keys, certificates or modules.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;
use tokio::time::{Instant, Sleep};

use crate::error::{error_response, HttpError};
use crate::request::{Caller, Request};
use crate::{Body, Response};

/// A daemon's request handler: its route table.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Errors are answered as responses, never dropped.
    fn handle(&self, request: Request) -> impl Future<Output = Response> + Send;
}

/// The limits every listener of a daemon shares. The daemon reads them once at start from the
/// environment ([`crate::daemon::connection_limits_from_env`]) and installs them with
/// [`set_daemon_limits`]; [`ServerOptions::default`] uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DaemonLimits {
    /// Deadline for a complete request head: from accepting the connection for the first
    /// request, from its first byte for later ones (408 and close beyond it).
    pub header_timeout: Duration,
    /// How long a kept-alive connection may wait for the next request, and how long a client
    /// may leave a response unread, before it is closed.
    pub idle_timeout: Duration,
    /// Open connections allowed across all of the daemon's listeners (503 beyond it).
    pub max_connections: usize,
}

impl DaemonLimits {
    /// The built-in limits: 10 s for a request head, 60 s idle, 1000 connections (the units
    /// run the daemons with `LimitNOFILE=4096`, leaving room for files, peers and Docker).
    pub const DEFAULT: DaemonLimits = DaemonLimits {
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 1000,
    };
}

impl Default for DaemonLimits {
    fn default() -> Self {
        DaemonLimits::DEFAULT
    }
}

static DAEMON_LIMITS: OnceLock<DaemonLimits> = OnceLock::new();
static DAEMON_CONNECTIONS: OnceLock<ConnectionCap> = OnceLock::new();

/// Installs the daemon's limits; the first call wins (false when they were already fixed, by an
/// earlier call or by a [`ServerOptions::default`] made before it).
pub fn set_daemon_limits(limits: DaemonLimits) -> bool {
    DAEMON_LIMITS.set(limits).is_ok()
}

/// The daemon's limits: those installed with [`set_daemon_limits`], else the built-in ones.
pub fn daemon_limits() -> DaemonLimits {
    *DAEMON_LIMITS.get_or_init(DaemonLimits::default)
}

/// A count of open connections with a cap, shared by every listener holding a clone of it.
#[derive(Clone, Debug)]
pub struct ConnectionCap {
    inner: Arc<CapInner>,
}

#[derive(Debug)]
struct CapInner {
    limit: usize,
    open: AtomicUsize,
}

/// One open connection counted against a [`ConnectionCap`]; released on drop.
struct CapSlot {
    cap: Arc<CapInner>,
}

impl ConnectionCap {
    /// A new, separate cap of `limit` open connections.
    pub fn new(limit: usize) -> Self {
        ConnectionCap {
            inner: Arc::new(CapInner {
                limit,
                open: AtomicUsize::new(0),
            }),
        }
    }

    /// The daemon-wide cap ([`DaemonLimits::max_connections`]): the same count for every
    /// listener of the process.
    pub fn daemon() -> Self {
        DAEMON_CONNECTIONS
            .get_or_init(|| ConnectionCap::new(daemon_limits().max_connections))
            .clone()
    }

    /// The cap.
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    fn acquire(&self) -> Option<CapSlot> {
        let taken = self
            .inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < self.inner.limit).then_some(open + 1)
            });
        taken.ok().map(|_| CapSlot {
            cap: Arc::clone(&self.inner),
        })
    }
}

impl Drop for CapSlot {
    fn drop(&mut self) {
        self.cap.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Limits that apply to one listening socket.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Maximum request body size in bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// Deadline for receiving the body after the headers (408 beyond it).
    pub body_timeout: Duration,
    /// Concurrent open connections allowed per uid (503 beyond it).
    pub max_connections_per_uid: usize,
    /// How long in-flight requests may run after shutdown is requested.
    pub drain_timeout: Duration,
    /// See [`DaemonLimits::header_timeout`].
    pub header_timeout: Duration,
    /// See [`DaemonLimits::idle_timeout`].
    pub idle_timeout: Duration,
    /// The open-connection cap this listener counts against (daemon-wide by default).
    pub connections: ConnectionCap,
}

impl Default for ServerOptions {
    /// The usual body limits with the daemon's [`DaemonLimits`] and its shared [`ConnectionCap`].
    fn default() -> Self {
        let limits = daemon_limits();
        ServerOptions {
            max_body_bytes: 1024 * 1024,
            body_timeout: Duration::from_secs(5),
            max_connections_per_uid: 10,
            drain_timeout: Duration::from_secs(10),
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            connections: ConnectionCap::daemon(),
        }
    }
}

/// Counts open connections per uid; a slot is released when its guard drops.
#[derive(Debug, Default)]
struct ConnectionBudget {
    open: Mutex<HashMap<u32, usize>>,
}

struct BudgetSlot {
    budget: Arc<ConnectionBudget>,
    uid: u32,
}

impl ConnectionBudget {
    /// Takes a slot for `uid`; `None` when the uid is at its limit.
    fn acquire(self: &Arc<Self>, uid: u32, limit: usize) -> Option<BudgetSlot> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let count = open.entry(uid).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(BudgetSlot {
            budget: Arc::clone(self),
            uid,
        })
    }
}

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        let mut open = self
            .budget
            .open
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if let Some(count) = open.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(1);

/// How long the accept loop waits before retrying when the process or system is out of file
/// descriptors (or accept fails otherwise).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A repeated condition is logged when it starts and then at most once per this interval.
const BURST_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Refused connections kept open (daemon-wide) so their callers can send their request and
/// read the 503 instead of seeing a reset; beyond this, refused connections close at once.
const MAX_LINGERING: usize = 64;

/// How long a refused connection waits for its caller to start the request before it is
/// answered anyway.
const REFUSAL_GRACE: Duration = Duration::from_millis(200);

/// How long a refused connection is kept at most once answered.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// How much of a refused caller's request is read (and discarded) at most.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

/// The refused connections kept open now, daemon-wide ([`MAX_LINGERING`] at most).
static LINGERING: std::sync::LazyLock<ConnectionCap> =
    std::sync::LazyLock::new(|| ConnectionCap::new(MAX_LINGERING));

/// Rate limit for a log line about a condition that may repeat many times a second.
#[derive(Debug, Default)]
struct BurstLog {
    last_logged: Option<Instant>,
    /// Events since the burst began.
    total: u64,
    /// Events not logged since the last line.
    suppressed: u64,
}

impl BurstLog {
    /// Counts one event; `Some(events not logged since the last line)` when this one is logged.
    fn hit(&mut self) -> Option<u64> {
        self.total += 1;
        let now = Instant::now();
        match self.last_logged {
            Some(last) if now.duration_since(last) < BURST_LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Ends a burst; the number of events in it, if there was one.
    fn end(&mut self) -> Option<u64> {
        let total = std::mem::take(&mut self.total);
        self.last_logged = None;
        self.suppressed = 0;
        (total > 0).then_some(total)
    }
}

/// A descriptor held in reserve: when accept fails for lack of descriptors it is closed, the
/// waiting caller accepted on it and answered 503 at once, and the reserve reopened.
#[derive(Debug)]
struct SpareDescriptor(Option<std::fs::File>);

impl SpareDescriptor {
    fn open() -> Self {
        SpareDescriptor(std::fs::File::open("/dev/null").ok())
    }

    fn refill(&mut self) {
        if self.0.is_none() {
            *self = SpareDescriptor::open();
        }
    }

    /// Answers one waiting caller 503 on the spare descriptor; false when there is none (it
    /// could not be reopened yet) or no caller was taken.
    fn refuse_one(&mut self, listener: &tokio::net::UnixListener, message: &str) -> bool {
        let Some(spare) = self.0.take() else {
            self.refill();
            return false;
        };
        drop(spare);
        let refused = match listener.accept().now_or_never() {
            Some(Ok((stream, _))) => {
                // No lingering: the descriptor is needed back as the spare.
                refuse(stream, message, false);
                true
            }
            _ => false,
        };
        self.refill();
        refused
    }
}

fn is_out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Errors that concern only the one connection being accepted: retry at once.
fn is_per_connection(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM)
    )
}

/// A complete `{"message": ...}` answer that closes the connection, as raw HTTP/1.1 bytes (for
/// connections that never reach hyper).
fn raw_answer(status: StatusCode, message: &str, retry_after: Option<u32>) -> Vec<u8> {
    let body = serde_json::json!({ "message": message }).to_string();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if let Some(seconds) = retry_after {
        head.push_str(&format!("retry-after: {seconds}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// Answers a refused connection 503 with `Retry-After: 1` and closes it, never parking it.
///
/// The answer goes out as soon as the caller has started sending its request, or after
/// [`REFUSAL_GRACE`] if it sends nothing: a client that finds an answer on a connection before
/// it has sent its request (hyper's does) takes the connection for broken and reports a
/// transport error instead of the 503. Then what the caller sends is read and discarded for at
/// most [`REFUSAL_LINGER`], so it reads the answer rather than a reset. At most
/// [`MAX_LINGERING`] refused connections are handled that way at a time (daemon-wide); beyond
/// that, or without `linger`, the answer is written at once without blocking (it fits an empty
/// socket buffer) and the connection closed.
fn refuse(stream: UnixStream, message: &str, linger: bool) {
    let answer = raw_answer(StatusCode::SERVICE_UNAVAILABLE, message, Some(1));
    let slot = linger.then(|| LINGERING.acquire()).flatten();
    let Some(slot) = slot else {
        let _ = stream.try_write(&answer);
        drain_ready(&stream);
        return;
    };
    tokio::spawn(async move {
        let _slot = slot;
        let mut stream = stream;
        let mut buffer = [0_u8; 4096];
        // The first bytes of the request (discarded), EOF (the caller left), or the grace.
        let first = tokio::time::timeout(REFUSAL_GRACE, stream.read(&mut buffer)).await;
        if let Ok(Ok(0) | Err(_)) = first {
            return;
        }
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            stream.write_all(&answer).await?;
            let mut drained = 0;
            while drained < REFUSAL_DRAIN_BYTES {
                match stream.read(&mut buffer).await? {
                    0 => break,
                    read => drained += read,
                }
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

/// Reads (and discards) what the caller has already sent, without blocking.
fn drain_ready(stream: &UnixStream) {
    let mut buffer = [0_u8; 4096];
    let mut drained = 0;
    while drained < REFUSAL_DRAIN_BYTES {
        match stream.try_read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => drained += read,
        }
    }
}

/// `10 s`, or `250 ms` for limits that are not whole seconds.
fn describe(duration: Duration) -> String {
    if duration.subsec_nanos() == 0 {
        format!("{} s", duration.as_secs())
    } else {
        format!("{} ms", duration.as_millis())
    }
}

/// What a connection is waiting for, which decides the deadline that applies to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiting {
    /// The first request's head (since accept), or a later head whose first byte has arrived.
    Head,
    /// The next request on a kept-alive connection (no byte of it yet).
    Idle,
}

#[derive(Debug)]
struct Phase {
    /// Requests whose response has not been sent completely (no deadline while one is).
    busy: usize,
    waiting: Waiting,
    deadline: Instant,
    /// The task reading the socket, woken when a response ends so the idle deadline is armed
    /// (its last read may have found the connection busy, with no timer to wake it).
    reader: Option<std::task::Waker>,
}

/// The request/response phase of one connection, shared by its I/O, its service and its
/// response bodies.
#[derive(Debug)]
struct Tracker {
    phase: Mutex<Phase>,
    header_timeout: Duration,
    idle_timeout: Duration,
}

impl Tracker {
    fn new(options: &ServerOptions) -> Arc<Self> {
        Arc::new(Tracker {
            phase: Mutex::new(Phase {
                busy: 0,
                waiting: Waiting::Head,
                deadline: Instant::now() + options.header_timeout,
                reader: None,
            }),
            header_timeout: options.header_timeout,
            idle_timeout: options.idle_timeout,
        })
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// A request head was received: no deadline until its response is sent.
    fn begin(self: &Arc<Self>) -> BusyGuard {
        self.phase().busy += 1;
        BusyGuard(Some(Arc::clone(self)))
    }

    fn end(&self) {
        let mut phase = self.phase();
        phase.busy = phase.busy.saturating_sub(1);
        if phase.busy == 0 {
            phase.waiting = Waiting::Idle;
            phase.deadline = Instant::now() + self.idle_timeout;
            if let Some(reader) = phase.reader.take() {
                reader.wake();
            }
        }
    }

    /// Bytes arrived: on an idle connection the next head has begun.
    fn received(&self) {
        let mut phase = self.phase();
        if phase.busy == 0 && phase.waiting == Waiting::Idle {
            phase.waiting = Waiting::Head;
            phase.deadline = Instant::now() + self.header_timeout;
        }
    }

    /// The read deadline in force, if any; while busy, remembers `reader` to wake at the end.
    fn deadline(&self, reader: &std::task::Waker) -> Option<(Instant, Waiting)> {
        let mut phase = self.phase();
        if phase.busy > 0 {
            match &phase.reader {
                Some(known) if known.will_wake(reader) => {}
                _ => phase.reader = Some(reader.clone()),
            }
            return None;
        }
        Some((phase.deadline, phase.waiting))
    }
}

/// Marks a request as answered when its response body is finished or dropped.
#[derive(Debug)]
struct BusyGuard(Option<Arc<Tracker>>);

impl BusyGuard {
    fn release(&mut self) {
        if let Some(tracker) = self.0.take() {
            tracker.end();
        }
    }
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.release();
    }
}

/// A response body that ends its request's busy phase when it ends.
struct TrackedBody {
    body: Body,
    busy: BusyGuard,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(context);
        if let Poll::Ready(None) = frame {
            this.busy.release();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket with its deadlines: while no request is being answered a read fails
/// once the head or idle deadline passes (answering 408 first if no response was ever sent on
/// the connection), and a write fails once the client has not taken any bytes for the idle
/// timeout.
struct Watched {
    stream: UnixStream,
    tracker: Arc<Tracker>,
    read_timer: Pin<Box<Sleep>>,
    write_timer: Pin<Box<Sleep>>,
    write_stalled_until: Option<Instant>,
    wrote_any: bool,
}

impl Watched {
    fn new(stream: UnixStream, tracker: Arc<Tracker>) -> Self {
        let now = Instant::now();
        Watched {
            stream,
            tracker,
            read_timer: Box::pin(tokio::time::sleep_until(now)),
            write_timer: Box::pin(tokio::time::sleep_until(now)),
            write_stalled_until: None,
            wrote_any: false,
        }
    }

    fn expired(&mut self, waiting: Waiting) -> std::io::Error {
        let message = match waiting {
            Waiting::Head => format!(
                "request head not received within {}",
                describe(self.tracker.header_timeout)
            ),
            Waiting::Idle => format!(
                "no request within the idle timeout of {}",
                describe(self.tracker.idle_timeout)
            ),
        };
        if waiting == Waiting::Head && !self.wrote_any {
            // Best effort and without blocking: the caller learns why, nothing waits on it.
            let answer = raw_answer(StatusCode::REQUEST_TIMEOUT, &message, None);
            let _ = self.stream.try_write(&answer);
            self.wrote_any = true;
        }
        std::io::Error::new(std::io::ErrorKind::TimedOut, message)
    }

    fn written(
        &mut self,
        context: &mut Context<'_>,
        result: Poll<std::io::Result<usize>>,
    ) -> Poll<std::io::Result<usize>> {
        match result {
            Poll::Ready(result) => {
                self.write_stalled_until = None;
                if matches!(result, Ok(written) if written > 0) {
                    self.wrote_any = true;
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let idle_timeout = self.tracker.idle_timeout;
                let deadline = *self
                    .write_stalled_until
                    .get_or_insert_with(|| Instant::now() + idle_timeout);
                if self.write_timer.deadline() != deadline {
                    self.write_timer.as_mut().reset(deadline);
                }
                if self.write_timer.as_mut().poll(context).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the client read nothing for {}",
                            describe(self.tracker.idle_timeout)
                        ),
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buffer.filled().len();
        match Pin::new(&mut this.stream).poll_read(context, buffer) {
            Poll::Ready(Ok(())) => {
                if buffer.filled().len() > before {
                    this.tracker.received();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
            Poll::Pending => {}
        }
        if let Some((deadline, waiting)) = this.tracker.deadline(context.waker()) {
            if this.read_timer.deadline() != deadline {
                this.read_timer.as_mut().reset(deadline);
            }
            if this.read_timer.as_mut().poll(context).is_ready() {
                return Poll::Ready(Err(this.expired(waiting)));
            }
        }
        Poll::Pending
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(context, buffer);
        this.written(context, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(context, buffers);
        this.written(context, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(context)
    }
}

/// Serves `handler` on `listener` until `shutdown` resolves, then drains in-flight requests for
/// at most `options.drain_timeout`.
pub async fn serve<H: Handler>(
    listener: tokio::net::UnixListener,
    handler: Arc<H>,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let budget = Arc::new(ConnectionBudget::default());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The head and idle deadlines are enforced by `Watched` (hyper's header timer also runs
    // while a kept-alive connection is idle, so it cannot tell the two apart); no timer is set,
    // so hyper's own stays off.
    builder.keep_alive(true);
    let mut spare = SpareDescriptor::open();
    let mut accept_failures = BurstLog::default();
    let mut refusals = BurstLog::default();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    if let Some(failures) = accept_failures.end() {
                        log::info!("accepting connections again (after {failures} failed accepts)");
                    }
                    spare.refill();
                    stream
                }
                Err(error) if is_per_connection(&error) => {
                    log::debug!("accept failed for one connection: {error}");
                    continue;
                }
                Err(error) => {
                    let out_of_descriptors = is_out_of_descriptors(&error);
                    if let Some(suppressed) = accept_failures.hit() {
                        log::warn!(
                            "cannot accept connections: {error} ({} connections open; {suppressed} \
                             more failures since the last message); retrying every {} ms",
                            options.connections.open(),
                            ACCEPT_BACKOFF.as_millis()
                        );
                    }
                    if out_of_descriptors
                        && spare.refuse_one(&listener, "the service is out of file descriptors")
                    {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            },
        };
        let caller = match stream.peer_cred() {
            Ok(credentials) => Caller {
                uid: credentials.uid(),
                gid: credentials.gid(),
                pid: credentials.pid().unwrap_or(0),
            },
            Err(error) => {
                log::warn!("could not read peer credentials, closing connection: {error}");
                continue;
            }
        };
        let slots = budget
            .acquire(caller.uid, options.max_connections_per_uid)
            .ok_or_else(|| {
                format!(
                    "too many concurrent connections for uid {} (limit {})",
                    caller.uid, options.max_connections_per_uid
                )
            })
            .and_then(|uid_slot| {
                options
                    .connections
                    .acquire()
                    .map(|cap_slot| (uid_slot, cap_slot))
                    .ok_or_else(|| {
                        format!(
                            "too many open connections (limit {})",
                            options.connections.limit()
                        )
                    })
            });
        let slots = match slots {
            Ok(slots) => slots,
            Err(message) => {
                if let Some(suppressed) = refusals.hit() {
                    log::warn!(
                        "{message}: answering 503 to uid {} pid {} ({suppressed} more refused \
                         since the last message)",
                        caller.uid,
                        caller.pid
                    );
                }
                refuse(stream, &message, true);
                continue;
            }
        };
        let tracker = Tracker::new(&options);
        let service = {
            let handler = Arc::clone(&handler);
            let tracker = Arc::clone(&tracker);
            let options = options.clone();
            hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let busy = tracker.begin();
                let handler = Arc::clone(&handler);
                let options = options.clone();
                async move {
                    let response = answer(request, caller, &options, handler.as_ref()).await;
                    Ok::<_, Infallible>(response.map(|body| TrackedBody { body, busy }))
                }
            })
        };
        let connection =
            builder.serve_connection(TokioIo::new(Watched::new(stream, tracker)), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _slots = slots;
            if let Err(error) = connection.await {
                log::debug!("connection from pid {} ended: {error}", caller.pid);
            }
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => log::info!("all connections closed"),
        () = tokio::time::sleep(options.drain_timeout) => {
            log::warn!("drain deadline passed; closing remaining connections");
        }
    }
}

async fn answer<H: Handler>(
    request: hyper::Request<Incoming>,
    caller: Caller,
    options: &ServerOptions,
    handler: &H,
) -> Response {
    let request_id = REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed);
    let method = request.method().clone();
    let path_and_query = log::log_enabled!(log::Level::Info).then(|| {
        request
            .uri()
            .path_and_query()
            .map_or_else(|| request.uri().path().to_owned(), ToString::to_string)
    });
    let response = match receive(request, caller, request_id, options).await {
        Ok(request) => handler.handle(request).await,
        Err(error) => close_after(error_response(&error)),
    };
    if let Some(path_and_query) = path_and_query {
        log::info!(
            "[{request_id}] {method} {path_and_query} uid={} pid={} -> {}",
            caller.uid,
            caller.pid,
            response.status().as_u16()
        );
    }
    response
}

fn close_after(mut response: Response) -> Response {
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

async fn receive(
    request: hyper::Request<Incoming>,
    caller: Caller,
    request_id: u64,
    options: &ServerOptions,
) -> Result<Request, HttpError> {
    let (parts, body) = request.into_parts();
    let too_large = || {
        HttpError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds {} bytes", options.max_body_bytes),
        )
    };
    let declared_length = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > options.max_body_bytes as u64) {
        return Err(too_large());
    }
    let body: Bytes = if declared_length == Some(0) {
        Bytes::new()
    } else {
        let mut collect = std::pin::pin!(Limited::new(body, options.max_body_bytes).collect());
        // Small bodies usually arrived with the headers: take them without arming a timer.
        let ready =
            std::future::poll_fn(|context| std::task::Poll::Ready(collect.as_mut().poll(context)))
                .await;
        let collected = match ready {
            std::task::Poll::Ready(collected) => collected,
            std::task::Poll::Pending => tokio::time::timeout(options.body_timeout, collect)
                .await
                .map_err(|_| {
                HttpError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body not received in time",
                )
            })?,
        };
        match collected {
            Ok(collected) => collected.to_bytes(),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
            Err(error) => {
                return Err(HttpError::bad_request(format!(
                    "could not read request body: {error}"
                )))
            }
        }
    };
    Ok(Request {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
        caller,
        request_id,
    })
}

/// Resolves when SIGTERM or SIGINT arrives.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    // Registered now, not at the first poll: a SIGTERM during start-up (before the daemon
    // awaits this) must not fall through to the default action and kill the process.
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        let (mut terminate, mut interrupt) = match (terminate, interrupt) {
            (Ok(terminate), Ok(interrupt)) => (terminate, interrupt),
            (Err(error), _) | (_, Err(error)) => {
                log::error!("cannot listen for SIGTERM and SIGINT: {error}");
                return std::future::pending().await;
            }
        };
        tokio::select! {
            _ = terminate.recv() => log::info!("SIGTERM received, shutting down"),
            _ = interrupt.recv() => log::info!("SIGINT received, shutting down"),
        }
    }
}

/// Tells systemd the daemon is ready (`READY=1` on `NOTIFY_SOCKET`), if it is listening.
pub fn notify_ready() {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let datagram = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = socket.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            datagram.send_to_addr(b"READY=1", &address)?;
        } else {
            datagram.send_to(b"READY=1", &socket)?;
        }
        Ok(())
    })();
    if let Err(error) = result {
        log::warn!("could not notify systemd of readiness: {error}");
    }
}
