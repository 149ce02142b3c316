//! The HTTP/1.1 server loop over a Unix listener.
//!
//! For every connection it reads the peer's credentials once, enforces the per-uid connection
//! budget (answering 503 rather than dropping), receives each request body within the size limit
//! and deadline, hands a complete [`Request`] to the daemon's [`Handler`], logs one line per
//! request, and drains in-flight requests on shutdown. It knows nothing about keys, certificates
//! or modules.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::error::{error_response, HttpError};
use crate::request::{Caller, Request};
use crate::Response;

/// A daemon's request handler: its route table.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Errors are answered as responses, never dropped.
    fn handle(&self, request: Request) -> impl Future<Output = Response> + Send;
}

/// Limits that apply to one listening socket.
#[derive(Clone, Copy, Debug)]
pub struct ServerOptions {
    /// Maximum request body size in bytes (413 beyond it).
    pub max_body_bytes: usize,
    /// Deadline for receiving the body after the headers (408 beyond it).
    pub body_timeout: Duration,
    /// Concurrent open connections allowed per uid (503 beyond it).
    pub max_connections_per_uid: usize,
    /// How long in-flight requests may run after shutdown is requested.
    pub drain_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_body_bytes: 1024 * 1024,
            body_timeout: Duration::from_secs(5),
            max_connections_per_uid: 10,
            drain_timeout: Duration::from_secs(10),
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
    builder.keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    log::warn!("accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
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
        let slot = budget.acquire(caller.uid, options.max_connections_per_uid);
        if slot.is_none() {
            log::warn!(
                "uid {} is over its connection budget ({}); answering 503",
                caller.uid,
                options.max_connections_per_uid
            );
        }
        let handler = Arc::clone(&handler);
        let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            let handler = Arc::clone(&handler);
            let over_budget = slot.is_none();
            async move {
                Ok::<_, Infallible>(
                    answer(request, caller, over_budget, &options, handler.as_ref()).await,
                )
            }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
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
    over_budget: bool,
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
    let response = if over_budget {
        let mut error = HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many concurrent connections for uid {} (limit {})",
                caller.uid, options.max_connections_per_uid
            ),
        );
        error.retry_after = Some(1);
        close_after(error_response(&error))
    } else {
        match receive(request, caller, request_id, options).await {
            Ok(request) => handler.handle(request).await,
            Err(error) => close_after(error_response(&error)),
        }
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
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            log::error!("cannot listen for SIGTERM: {error}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = terminate.recv() => log::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT received, shutting down"),
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
