//! HTTP/1.1 over Unix sockets, shared by every daemon.
//!
//! - [`listener`]: bind `unix:///path` or take a systemd-passed socket (`fd://name`).
//! - [`server`]: the accept loop with peer credentials, per-uid connection budget, daemon-wide
//!   connection cap, request-head and idle deadlines, body limits, request logging and graceful
//!   shutdown; daemons plug in a [`server::Handler`].
//! - [`request`]: the received request and the shared parsing rules (`api-version`, query,
//!   JSON bodies).
//! - [`error`]: the `{"message": ...}` error body and the [`error::ApiError`] trait through
//!   which each daemon maps its errors to statuses in one place.
//! - [`client`]: the one pooled async client over a Unix socket.
//! - [`daemon`]: the start-up every daemon binary shares (arguments, config, connection limits
//!   from the environment, exit codes) and the configuration watcher.
//!
//! This crate knows nothing about keys, certificates, identities or modules.

pub mod client;
pub mod daemon;
pub mod error;
pub mod listener;
pub mod memory;
pub mod request;
pub mod server;

pub use client::{ClientError, UdsClient};
pub use error::{error_response, ApiError, HttpError};
pub use request::{check_api_version, Caller, Request, VersionRule};
pub use server::{serve, Handler, ServerOptions};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;

/// The response body type: usually a full buffer, or a stream (edged logs).
pub type Body =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// The response type every handler returns.
pub type Response = hyper::Response<Body>;

/// A body holding `bytes`.
pub fn full_body(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON response with this status.
pub fn json_response<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut response = hyper::Response::new(full_body(bytes));
            *response.status_mut() = status;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(error) => {
            log::error!("could not serialize a response: {error}");
            let mut response =
                hyper::Response::new(full_body(&br#"{"message":"internal error"}"#[..]));
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            response
        }
    }
}

/// An empty response with this status (204).
pub fn empty_response(status: StatusCode) -> Response {
    let mut response = hyper::Response::new(full_body(Bytes::new()));
    *response.status_mut() = status;
    response
}

/// Sets up logging for a daemon: `AZIOT_LOG` (env_logger syntax, default `info`), each line
/// prefixed with its syslog priority (`<3>` error … `<7>` debug) so journald keeps levels.
pub fn init_logging() {
    use std::io::Write;
    let _ = env_logger::Builder::new()
        .parse_filters(&std::env::var("AZIOT_LOG").unwrap_or_else(|_| "info".to_owned()))
        .format(|formatter, record| {
            let priority = match record.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(
                formatter,
                "<{priority}>{} [{}] {}",
                record.level(),
                record.target(),
                record.args()
            )
        })
        .try_init();
}
