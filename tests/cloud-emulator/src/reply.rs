//! A transport-independent answer built by the DPS and Hub handlers, turned into an HTTP
//! response by the server, plus the error-body shapes of each service.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

use crate::util;

/// What a handler answers.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub body: Option<Value>,
    pub retry_after: Option<u32>,
    pub allow: Option<&'static str>,
    pub etag: Option<String>,
    /// Whether authentication passed (`None` if not evaluated).
    pub auth_ok: Option<bool>,
    /// True for injected faults.
    pub fault: bool,
    /// TPM keys from a DPS `register` body, for the request log (boxed: rarely present, and
    /// it keeps `Reply` small).
    pub tpm: Option<Box<crate::state::TpmSeen>>,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: StatusCode, body: Value) -> Self {
        Reply {
            status,
            body: Some(body),
            retry_after: None,
            allow: None,
            etag: None,
            auth_ok: None,
            fault: false,
            tpm: None,
        }
    }

    /// An answer without body (204).
    pub fn empty(status: StatusCode) -> Self {
        Reply {
            body: None,
            ..Reply::json(status, Value::Null)
        }
    }

    /// Adds `Retry-After`.
    pub fn with_retry_after(mut self, secs: Option<u32>) -> Self {
        self.retry_after = secs;
        self
    }

    /// Records the authentication result.
    pub fn with_auth(mut self, ok: Option<bool>) -> Self {
        self.auth_ok = ok;
        self
    }

    /// Records the TPM keys of the request (for the log).
    pub fn with_tpm(mut self, tpm: Option<crate::state::TpmSeen>) -> Self {
        self.tpm = tpm.map(Box::new);
        self
    }

    /// Adds an `ETag` header (quoted).
    pub fn with_etag(mut self, etag: &str) -> Self {
        self.etag = Some(etag.to_string());
        self
    }

    /// Adds an `Allow` header (for 405).
    pub fn with_allow(mut self, allow: &'static str) -> Self {
        self.allow = Some(allow);
        self
    }

    /// Converts into an HTTP response.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let body = match &self.body {
            Some(v) => Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
            None => Bytes::new(),
        };
        let mut resp = Response::new(Full::new(body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        if self.body.is_some() {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
        }
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(allow) = self.allow {
            h.insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if let Some(etag) = &self.etag {
            if let Ok(v) = HeaderValue::from_str(&format!("\"{etag}\"")) {
                h.insert(header::ETAG, v);
            }
        }
        resp
    }
}

/// DPS error body: `{errorCode, trackingId, message, timestampUtc}`.
pub(crate) fn dps_error(status: StatusCode, code: u32, message: &str) -> Reply {
    Reply::json(
        status,
        json!({
            "errorCode": code,
            "trackingId": util::random_guid(),
            "message": message,
            "timestampUtc": util::now_rfc3339(),
        }),
    )
}

/// IoT Hub error body: `{"Message": "ErrorCode:<code>;<text>", "ExceptionMessage": ...}`.
pub(crate) fn hub_error(status: StatusCode, code: &str, message: &str) -> Reply {
    Reply::json(
        status,
        json!({
            "Message": format!("ErrorCode:{code};{message}"),
            "ExceptionMessage": format!(
                "Tracking ID:{}-TimeStamp:{}",
                util::random_guid().replace('-', ""),
                util::now_rfc3339()
            ),
        }),
    )
}

/// Generic error body used outside DPS/Hub routes and by the admin API: `{"message": ...}`.
pub(crate) fn plain_error(status: StatusCode, message: &str) -> Reply {
    Reply::json(status, json!({ "message": message }))
}
