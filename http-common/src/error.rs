//! The one error body every daemon answers with: `{"message": "..."}`.
//!
//! Daemons define their own typed error enums and implement [`ApiError`] for them, which is the
//! single place where an error gets its HTTP status. [`error_response`] turns any such error into
//! a response: for 4xx the message is the error and its cause chain, for 5xx it is a short public
//! text and the full chain is logged once.

use std::fmt::Write as _;

use http::{HeaderValue, StatusCode};

use crate::Response;

/// An error that knows which HTTP status it is.
pub trait ApiError: std::error::Error {
    /// The HTTP status this error answers with.
    fn status(&self) -> StatusCode;

    /// The short text used as `message` for 5xx answers (no paths, OS errors or token codes).
    fn server_message(&self) -> String {
        "internal error".to_owned()
    }

    /// The `Retry-After` seconds for 503 answers.
    fn retry_after(&self) -> Option<u32> {
        None
    }

    /// The `Allow` header for 405 answers.
    fn allow(&self) -> Option<&'static str> {
        None
    }
}

/// An error raised by the HTTP layer itself (routing, api-version, body handling).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// The status to answer with.
    pub status: StatusCode,
    /// The message for the body.
    pub message: String,
    /// The `Allow` header for 405 answers.
    pub allow: Option<&'static str>,
    /// `Retry-After` seconds for 503 answers.
    pub retry_after: Option<u32>,
}

impl HttpError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
            allow: None,
            retry_after: None,
        }
    }

    /// 400 with this message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        HttpError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404 `not found`.
    pub fn not_found() -> Self {
        HttpError::new(StatusCode::NOT_FOUND, "not found")
    }

    /// 405 with the `Allow` header naming the methods the path serves (e.g. `"GET, POST"`).
    pub fn method_not_allowed(allow: &'static str) -> Self {
        HttpError {
            allow: Some(allow),
            ..HttpError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl std::error::Error for HttpError {}

impl ApiError for HttpError {
    fn status(&self) -> StatusCode {
        self.status
    }

    fn server_message(&self) -> String {
        // HTTP-layer texts are written to be public.
        self.message.clone()
    }

    fn retry_after(&self) -> Option<u32> {
        self.retry_after
    }

    fn allow(&self) -> Option<&'static str> {
        self.allow
    }
}

/// The error and its `source()` chain joined by `"\ncaused by: "`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, "\ncaused by: {cause}");
        source = cause.source();
    }
    text
}

/// Turns an error into the `{"message": ...}` response, logging 5xx chains once.
pub fn error_response<E: ApiError>(error: &E) -> Response {
    let status = error.status();
    let message = if status.is_server_error() {
        let public = error.server_message();
        log::error!("{public}: {}", error_chain(error));
        public
    } else {
        error_chain(error)
    };
    let mut response = crate::json_response(status, &serde_json::json!({ "message": message }));
    if let Some(allow) = error.allow() {
        response
            .headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static(allow));
    }
    if let Some(seconds) = error.retry_after() {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    impl ApiError for Outer {
        fn status(&self) -> StatusCode {
            StatusCode::BAD_REQUEST
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("disk at /secret/path broke")]
    struct Internal;

    impl ApiError for Internal {
        fn status(&self) -> StatusCode {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }

    async fn body_of(response: Response) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn client_errors_carry_the_chain_server_errors_do_not() {
        let response = error_response(&Outer(std::io::Error::other("inner")));
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            body_of(response).await["message"],
            "outer\ncaused by: inner"
        );

        let response = error_response(&Internal);
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body_of(response).await["message"], "internal error");
    }

    #[tokio::test]
    async fn method_not_allowed_has_allow_header() {
        let response = error_response(&HttpError::method_not_allowed("GET, POST"));
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[http::header::ALLOW], "GET, POST");
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            "application/json"
        );
    }
}
