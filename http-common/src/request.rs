//! A fully received request as handlers see it, plus the shared request-parsing rules:
//! query parameters, `api-version`, path segments and JSON bodies.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde::de::{Deserialize, DeserializeOwned};

use crate::error::HttpError;

/// The peer process of a Unix-socket connection, read once per connection with `SO_PEERCRED`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The peer's user id.
    pub uid: u32,
    /// The peer's group id.
    pub gid: u32,
    /// The peer's process id (as seen from our pid namespace; 0 if unknown).
    pub pid: i32,
}

/// A request whose body has been received in full (within the size limit and deadline).
#[derive(Debug)]
pub struct Request {
    /// The HTTP method.
    pub method: Method,
    /// The path as sent, not percent-decoded.
    pub path: String,
    /// The query string as sent, without `?`.
    pub query: Option<String>,
    /// The request headers.
    pub headers: HeaderMap,
    /// The request body (possibly empty).
    pub body: Bytes,
    /// The peer process.
    pub caller: Caller,
    /// A per-process request counter used in log lines.
    pub request_id: u64,
}

impl Request {
    /// Builds a request, for handler tests that need no socket.
    pub fn new(
        method: Method,
        path_and_query: &str,
        body: impl Into<Bytes>,
        caller: Caller,
    ) -> Self {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
            None => (path_and_query.to_owned(), None),
        };
        Request {
            method,
            path,
            query,
            headers: HeaderMap::new(),
            body: body.into(),
            caller,
            request_id: 0,
        }
    }

    /// The query parameters, `application/x-www-form-urlencoded`-decoded.
    pub fn query_pairs(&self) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
        query_pairs(self.query.as_deref())
    }

    /// The first value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_pairs()
            .into_iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    }

    /// Checks the `Content-Type` (absent or `application/json`, else 415).
    pub fn check_json_content_type(&self) -> Result<(), HttpError> {
        let Some(content_type) = self.headers.get(http::header::CONTENT_TYPE) else {
            return Ok(());
        };
        if content_type
            .as_bytes()
            .eq_ignore_ascii_case(b"application/json")
        {
            return Ok(());
        }
        let media_type = content_type
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim();
        if media_type.eq_ignore_ascii_case("application/json") {
            Ok(())
        } else {
            Err(HttpError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "unsupported content type {:?}, expected application/json",
                    content_type.to_str().unwrap_or("(not text)")
                ),
            ))
        }
    }

    /// Parses a required JSON body: 415 for a non-JSON content type, 400 for an empty body,
    /// 422 with the parser's message for a body that does not fit `T`.
    /// `T` may borrow strings from the body.
    pub fn json<'a, T: Deserialize<'a>>(&'a self) -> Result<T, HttpError> {
        self.check_json_content_type()?;
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err(HttpError::bad_request("missing request body"));
        }
        parse_json(&self.body)
    }

    /// Parses an optional JSON body: `None` when the body is empty.
    pub fn optional_json<T: DeserializeOwned>(&self) -> Result<Option<T>, HttpError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        self.check_json_content_type()?;
        parse_json(&self.body).map(Some)
    }
}

/// Parses JSON into `T`; failures are 422 with the parser's message and the failing field path.
pub fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, HttpError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = T::deserialize(&mut deserializer)
        .and_then(|value| deserializer.end().map(|()| value))
        .map_err(|error| {
            HttpError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("request body is not valid: {error}"),
            )
        })?;
    Ok(value)
}

/// Decodes a query string as `application/x-www-form-urlencoded`.
pub fn query_pairs(query: Option<&str>) -> Vec<(Cow<'_, str>, Cow<'_, str>)> {
    pairs(query).collect()
}

/// [`query_pairs`] without collecting them (the per-request `api-version` check allocates
/// nothing).
fn pairs(query: Option<&str>) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(key), form_decode(value))
        })
}

fn form_decode(text: &str) -> Cow<'_, str> {
    if !text.contains(['+', '%']) {
        return Cow::Borrowed(text);
    }
    let spaced = text.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// Percent-decodes one path segment (or the rest of a path) once. Invalid UTF-8 → 400.
pub fn decode_path(text: &str) -> Result<String, HttpError> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| HttpError::bad_request("path is not valid UTF-8 after percent-decoding"))
}

/// Whether a route needs `api-version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionRule {
    /// A compatible route: `api-version` is mandatory and must be at least the given version
    /// (an index into the daemon's known versions, oldest first).
    Required {
        /// Index of the route's first version.
        since: usize,
    },
    /// A seed draft route: `api-version` may be omitted; if present it must be known.
    Optional,
}

/// Checks the `api-version` query parameter against a daemon's known versions (oldest first)
/// and returns the index of the given version, if any.
pub fn check_api_version(
    query: Option<&str>,
    known: &[&str],
    rule: VersionRule,
) -> Result<Option<usize>, HttpError> {
    let mut found: Option<Cow<'_, str>> = None;
    for (key, value) in pairs(query) {
        if key == "api-version" {
            if found.is_some() {
                return Err(HttpError::bad_request(
                    "api-version specified more than once",
                ));
            }
            found = Some(value);
        }
    }
    let index = match found {
        None => {
            return match rule {
                VersionRule::Required { .. } => {
                    Err(HttpError::bad_request("api-version not specified"))
                }
                VersionRule::Optional => Ok(None),
            }
        }
        Some(value) => known
            .iter()
            .position(|version| *version == value)
            .ok_or_else(|| HttpError::bad_request(format!("invalid api-version {value:?}")))?,
    };
    if let VersionRule::Required { since } = rule {
        if index < since {
            return Err(HttpError::not_found());
        }
    }
    Ok(Some(index))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &["2020-09-01", "2021-05-01"];

    fn check(query: Option<&str>, rule: VersionRule, expected: Result<Option<usize>, (u16, &str)>) {
        let actual = check_api_version(query, KNOWN, rule)
            .map_err(|error| (error.status.as_u16(), error.message));
        let expected = expected.map_err(|(status, message)| (status, message.to_owned()));
        assert_eq!(actual, expected, "query {query:?}");
    }

    #[test]
    fn api_version_rules() {
        let required = VersionRule::Required { since: 0 };
        check(Some("api-version=2020-09-01"), required, Ok(Some(0)));
        check(Some("x=1&api-version=2021-05-01"), required, Ok(Some(1)));
        check(None, required, Err((400, "api-version not specified")));
        check(
            Some("other=1"),
            required,
            Err((400, "api-version not specified")),
        );
        check(
            Some("api-version=2019-01-01"),
            required,
            Err((400, "invalid api-version \"2019-01-01\"")),
        );
        check(
            Some("api-version=2020-09-01&api-version=2020-09-01"),
            required,
            Err((400, "api-version specified more than once")),
        );
        check(
            Some("api-version=2020-09-01"),
            VersionRule::Required { since: 1 },
            Err((404, "not found")),
        );
        check(None, VersionRule::Optional, Ok(None));
        check(
            Some("api-version=bogus"),
            VersionRule::Optional,
            Err((400, "invalid api-version \"bogus\"")),
        );
    }

    #[test]
    fn query_decoding() {
        let pairs = query_pairs(Some("a=b+c&d=%2F%20&flag&&e="));
        let pairs: Vec<(String, String)> = pairs
            .into_iter()
            .map(|(key, value)| (key.into_owned(), value.into_owned()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("a".into(), "b c".into()),
                ("d".into(), "/ ".into()),
                ("flag".into(), "".into()),
                ("e".into(), "".into()),
            ]
        );
    }

    #[test]
    fn json_body_rules() {
        let caller = Caller {
            uid: 0,
            gid: 0,
            pid: 1,
        };
        let empty = Request::new(Method::POST, "/x", "", caller);
        assert_eq!(empty.json::<serde_json::Value>().unwrap_err().status, 400);
        let bad = Request::new(Method::POST, "/x", "{", caller);
        assert_eq!(bad.json::<serde_json::Value>().unwrap_err().status, 422);
        let trailing = Request::new(Method::POST, "/x", "{} x", caller);
        assert_eq!(
            trailing.json::<serde_json::Value>().unwrap_err().status,
            422
        );
        let mut typed = Request::new(Method::POST, "/x", "{}", caller);
        typed.headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        assert_eq!(typed.json::<serde_json::Value>().unwrap_err().status, 415);
        typed.headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("Application/JSON; charset=utf-8"),
        );
        assert!(typed.json::<serde_json::Value>().is_ok());
    }
}
