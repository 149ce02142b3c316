//! Request fuzzing shared by the daemons' `tests/fuzz.rs`: proptest strategies that turn a route
//! table into requests (arbitrary bytes, arbitrary JSON, the route's own field names with wrong
//! values, odd path IDs and query strings) and the checks every answer must pass. Sending is
//! left to each test (it owns the daemon and its client), so this module needs no HTTP crate.
//!
//! Runs are deterministic (a fixed seed) and write no regression files.

use std::fmt;

/// The proptest crate, for tests that combine these strategies (no dependency of their own).
pub use proptest;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// What a body field holds when it is right, so the fuzzer can mix right and wrong values.
#[derive(Clone, Copy, Debug)]
pub enum Field {
    /// A caller-chosen ID (key, cert, module).
    Id,
    /// A standard base64 string.
    Base64,
    /// Any string; `samples` gives known-good ones.
    Text(&'static [&'static str]),
    /// A JSON object with these fields (fuzzed like the top level).
    Nested(&'static [(&'static str, Field)]),
    /// A JSON object (its members are fuzzed as arbitrary JSON).
    Object,
    /// A JSON array.
    Array,
    /// A JSON number.
    Number,
    /// A JSON boolean.
    Bool,
}

/// One route of a daemon's route table as the fuzzer sees it.
#[derive(Clone, Debug)]
pub struct Route {
    /// `GET`, `POST`, ...
    pub method: &'static str,
    /// Path with `{...}` placeholders, each replaced by a generated path segment.
    pub path: &'static str,
    /// Top-level body fields (empty for routes without a body).
    pub fields: &'static [(&'static str, Field)],
    /// Route-specific query parameters (besides `api-version`).
    pub query: &'static [&'static str],
}

/// One request to send.
#[derive(Clone)]
pub struct Case {
    /// The method.
    pub method: String,
    /// Path and query, already percent-encoded.
    pub path_and_query: String,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The body bytes.
    pub body: Vec<u8>,
}

impl fmt::Debug for Case {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = String::from_utf8_lossy(&self.body);
        let shown: String = body.chars().take(300).collect();
        write!(
            formatter,
            "{} {} (content-type {:?}, {} body bytes: {shown:?}{})",
            self.method,
            self.path_and_query,
            self.content_type,
            self.body.len(),
            if body.chars().count() > 300 {
                "…"
            } else {
                ""
            }
        )
    }
}

/// What a daemon gives the fuzzer besides its routes.
#[derive(Clone, Debug)]
pub struct Target {
    /// The daemon's api-versions (`None` in the list: the route needs none).
    pub api_versions: &'static [&'static str],
    /// IDs that exist in the daemon (path segments and `Id` fields sometimes use them).
    pub known_ids: Vec<String>,
    /// Known-good strings for any string field (handles, PEM, ...).
    pub known_strings: Vec<String>,
}

const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/json; charset=utf-8",
    "text/plain",
    "application/x-www-form-urlencoded",
    "",
];

/// Characters that make IDs interesting: separators, escapes, dots, unicode, controls.
fn odd_id() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(".".to_owned()),
        Just("..".to_owned()),
        Just("../../etc/passwd".to_owned()),
        Just("a/b".to_owned()),
        Just("a%2Fb".to_owned()),
        Just("\u{0}".to_owned()),
        Just("\n".to_owned()),
        Just("ünïcødé-🔑".to_owned()),
        Just("\u{202e}rtl".to_owned()),
        Just(" leading space".to_owned()),
        Just("handle-validation-key".to_owned()),
        Just("$edgeAgent".to_owned()),
        Just("$edgeHub".to_owned()),
        "[a-zA-Z0-9]{150,160}",
        "[a-zA-Z0-9]{186,300}",
        "[a-z0-9-]{500,520}",
        "[-./:]{400,600}",
        "[a-z]{1,12}",
        any::<String>(),
        "\\PC{1,40}",
    ]
}

/// A path segment: a known ID or an odd one, percent-encoded (raw `/` kept sometimes).
fn path_segment(known: Vec<String>) -> impl Strategy<Value = String> {
    let known = if known.is_empty() {
        vec!["x".to_owned()]
    } else {
        known
    };
    prop_oneof![
        4 => proptest::sample::select(known),
        4 => odd_id(),
    ]
    .prop_flat_map(|id| (Just(id), any::<bool>()))
    .prop_map(|(id, keep_slash)| percent_encode(&id, keep_slash))
}

/// Percent-encodes everything but unreserved characters (and `/` if `keep_slash`).
pub fn percent_encode(text: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) || (keep_slash && byte == b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn query(
    versions: &'static [&'static str],
    extra: &'static [&'static str],
    segment: BoxedStrategy<String>,
) -> impl Strategy<Value = String> {
    let version = proptest::sample::select(versions.to_vec());
    let good = version.clone().prop_map(|v| format!("api-version={v}"));
    let extra_names = if extra.is_empty() {
        vec!["x"]
    } else {
        extra.to_vec()
    };
    prop_oneof![
        14 => good.clone(),
        1 => Just(String::new()),
        1 => Just("api-version=".to_owned()),
        1 => "[ -~]{0,30}".prop_map(|v| format!("api-version={}", percent_encode(&v, false))),
        1 => (version.clone(), version.clone()).prop_map(|(a, b)| format!("api-version={a}&api-version={b}")),
        1 => Just("api-version=2099-01-01".to_owned()),
        1 => Just("%ZZ=%".to_owned()),
        1 => Just("&&&=&".to_owned()),
        1 => "\\PC{0,20}".prop_map(|v| percent_encode(&v, false)),
        3 => (good, proptest::sample::select(extra_names), segment)
            .prop_map(|(good, name, value)| format!("{good}&{name}={value}")),
    ]
}

/// Raw JSON text of a value that is wrong for most fields: out-of-range numbers, huge or odd
/// strings, base64 garbage, deep nesting.
pub fn nasty_json() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("0".to_owned()),
        Just("-1".to_owned()),
        Just("1e400".to_owned()),
        Just("-1e400".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("-9223372036854775809".to_owned()),
        Just("123456789012345678901234567890.5".to_owned()),
        Just("-0".to_owned()),
        Just("0.5".to_owned()),
        Just("\"\"".to_owned()),
        Just("\"\\u0000\"".to_owned()),
        Just("\"\\ud800\"".to_owned()),
        Just("\"ünïcødé 🔑 \\u202e\"".to_owned()),
        Just("\"====\"".to_owned()),
        Just("\"@@@@\"".to_owned()),
        Just("\"A\"".to_owned()),
        Just("\"QUJD\\n\"".to_owned()),
        Just("\"QUJDRA\"".to_owned()),
        Just("[]".to_owned()),
        Just("{}".to_owned()),
        (1_usize..70_000).prop_map(|n| format!("\"{}\"", "a".repeat(n))),
        (1_usize..3_000).prop_map(|n| format!("\"{}\"", "ü".repeat(n))),
        (1_usize..600).prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth))),
        (1_usize..600).prop_map(|depth| format!(
            "{}1{}",
            "{\"a\":".repeat(depth),
            "}".repeat(depth)
        )),
        odd_id().prop_map(|id| json_string(&id)),
        json_value().prop_map(|value| value.to_string()),
    ]
}

/// A JSON string literal.
pub fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_owned()).to_string()
}

/// Arbitrary JSON values (bounded depth and size).
pub fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

/// A plausible-but-right value of `field` (raw JSON text).
fn good_json(field: Field, target: &Target) -> BoxedStrategy<String> {
    let ids = if target.known_ids.is_empty() {
        vec!["x".to_owned()]
    } else {
        target.known_ids.clone()
    };
    let strings = if target.known_strings.is_empty() {
        vec!["x".to_owned()]
    } else {
        target.known_strings.clone()
    };
    match field {
        Field::Id => prop_oneof![
            proptest::sample::select(ids).prop_map(|id| json_string(&id)),
            "[a-z][a-z0-9-]{0,20}".prop_map(|id| json_string(&id)),
        ]
        .boxed(),
        Field::Base64 => proptest::collection::vec(any::<u8>(), 0..80)
            .prop_map(|bytes| json_string(&base64(&bytes)))
            .boxed(),
        Field::Text(samples) if !samples.is_empty() => prop_oneof![
            proptest::sample::select(samples.to_vec()).prop_map(json_string),
            proptest::sample::select(strings).prop_map(|text| json_string(&text)),
        ]
        .boxed(),
        Field::Text(_) => proptest::sample::select(strings)
            .prop_map(|text| json_string(&text))
            .boxed(),
        Field::Nested(fields) => object_of(fields, target, false),
        Field::Object => json_value()
            .prop_map(|value| match value {
                serde_json::Value::Object(_) => value.to_string(),
                other => format!("{{\"a\":{other}}}"),
            })
            .boxed(),
        Field::Array => json_value().prop_map(|value| format!("[{value}]")).boxed(),
        Field::Number => any::<u32>().prop_map(|n| n.to_string()).boxed(),
        Field::Bool => any::<bool>().prop_map(|b| b.to_string()).boxed(),
    }
}

/// The route's fields, each right, wrong, or left out, plus sometimes an unknown field.
fn structured_body(route: &Route, target: &Target, all_good: bool) -> BoxedStrategy<Vec<u8>> {
    object_of(route.fields, target, all_good)
        .prop_map(String::into_bytes)
        .boxed()
}

/// A JSON object (raw text) of `fields`, each right, wrong or left out, sometimes with an
/// unknown member; with `all_good`, every field present with a plausible value (the requests
/// that get past parsing into the service).
fn object_of(
    fields: &'static [(&'static str, Field)],
    target: &Target,
    all_good: bool,
) -> BoxedStrategy<String> {
    let fields: Vec<BoxedStrategy<Option<(String, String)>>> = fields
        .iter()
        .map(|&(name, field)| {
            if all_good {
                return good_json(field, target)
                    .prop_map(move |value| Some((name.to_owned(), value)))
                    .boxed();
            }
            prop_oneof![
                7 => good_json(field, target).prop_map(move |value| Some((name.to_owned(), value))),
                2 => nasty_json().prop_map(move |value| Some((name.to_owned(), value))),
                1 => Just(None),
            ]
            .boxed()
        })
        .collect();
    (fields, proptest::option::weighted(0.2, nasty_json()))
        .prop_map(|(fields, extra)| {
            let mut members: Vec<String> = fields
                .into_iter()
                .flatten()
                .map(|(name, value)| format!("{}:{value}", json_string(&name)))
                .collect();
            if let Some(extra) = extra {
                members.push(format!("\"unknownField\":{extra}"));
            }
            format!("{{{}}}", members.join(","))
        })
        .boxed()
}

/// Bodies stay under the servers' 1 MiB limit: beyond it http-common answers 413 and closes at
/// once, before the body is read, so a client still writing it sees a broken pipe instead of the
/// answer (a server-side behaviour of `http-common/src/server.rs`, left to its owner).
fn body(route: &Route, target: &Target) -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        1 => Just(Vec::new()),
        2 => proptest::collection::vec(any::<u8>(), 0..300),
        2 => json_value().prop_map(|value| value.to_string().into_bytes()),
        1 => nasty_json().prop_map(String::into_bytes),
        6 => structured_body(route, target, false),
        5 => structured_body(route, target, true),
    ]
    .boxed()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0_u32, |n, (i, &byte)| n | (u32::from(byte) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Requests for one route.
pub fn route_case(route: &Route, target: &Target) -> BoxedStrategy<Case> {
    let placeholders = route.path.matches('{').count();
    let segments = proptest::collection::vec(path_segment(target.known_ids.clone()), placeholders);
    let segment = path_segment(target.known_ids.clone()).boxed();
    let query = if target.api_versions.is_empty() {
        Just(String::new()).boxed()
    } else {
        query(target.api_versions, route.query, segment).boxed()
    };
    let content_type = prop_oneof![
        8 => Just(Some("application/json".to_owned())),
        1 => proptest::sample::select(CONTENT_TYPES).prop_map(|t| Some(t.to_owned())),
        1 => Just(None),
    ];
    let method = prop_oneof![
        12 => Just(route.method.to_owned()),
        1 => proptest::sample::select(&["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"][..])
            .prop_map(str::to_owned),
    ];
    let path = route.path;
    (method, segments, query, content_type, body(route, target))
        .prop_map(move |(method, segments, query, content_type, body)| {
            let mut filled = String::new();
            let mut rest = path;
            let mut segments = segments.into_iter();
            while let Some(start) = rest.find('{') {
                filled.push_str(&rest[..start]);
                filled.push_str(&segments.next().unwrap_or_default());
                let end = rest[start..]
                    .find('}')
                    .map_or(rest.len(), |end| start + end + 1);
                rest = &rest[end..];
            }
            filled.push_str(rest);
            let path_and_query = if query.is_empty() {
                filled
            } else {
                format!("{filled}?{query}")
            };
            Case {
                method,
                path_and_query,
                content_type,
                body,
            }
        })
        .boxed()
}

/// Requests for any route of the table.
pub fn table_cases(routes: &[Route], target: &Target) -> BoxedStrategy<Case> {
    let strategies: Vec<BoxedStrategy<Case>> = routes
        .iter()
        .map(|route| route_case(route, target))
        .collect();
    proptest::strategy::Union::new(strategies).boxed()
}

/// Checks one answer: never a 5xx (a 503 only if `allow_503`), and every 4xx/5xx body is JSON
/// with a `message` string (except for `HEAD`, whose answers have no body).
pub fn check_answer(case: &Case, status: u16, body: &[u8], allow_503: bool) -> Result<(), String> {
    if status >= 500 && !(status == 503 && allow_503) {
        return Err(format!(
            "answered {status}: {}",
            String::from_utf8_lossy(body)
        ));
    }
    if status >= 400 && case.method != "HEAD" {
        let message = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|value| {
                value
                    .get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_owned)
            });
        if message.is_none() {
            return Err(format!(
                "answered {status} without a JSON {{\"message\": ...}} body: {:?}",
                String::from_utf8_lossy(body)
            ));
        }
    }
    Ok(())
}

/// Sends `case` to `socket` within `timeout`; no answer (a dropped connection or a hang) is a
/// failure.
pub async fn send(
    socket: &std::path::Path,
    timeout: std::time::Duration,
    case: &Case,
) -> Result<(http::StatusCode, bytes::Bytes), String> {
    let headers: Vec<(&str, &str)> = case
        .content_type
        .as_deref()
        .map(|value| ("content-type", value))
        .into_iter()
        .collect();
    let method = http::Method::from_bytes(case.method.as_bytes())
        .map_err(|error| format!("the case's method is not a method: {error}"))?;
    http_common::UdsClient::new(socket)
        .with_timeout(timeout)
        .send(
            method,
            &case.path_and_query,
            &headers,
            bytes::Bytes::from(case.body.clone()),
        )
        .await
        .map(|response| (response.status, response.body))
        .map_err(|error| format!("no answer (dropped connection or hang): {error}"))
}

/// The check after each case: `daemon` still answers `GET path` on `socket` with 200.
pub async fn still_answers(
    daemon: &str,
    socket: &std::path::Path,
    path: &str,
) -> Result<(), String> {
    let answer = http_common::UdsClient::new(socket)
        .send(http::Method::GET, path, &[], bytes::Bytes::new())
        .await
        .map_err(|error| format!("{daemon} stopped answering: {error}"))?;
    if answer.status != http::StatusCode::OK {
        return Err(format!(
            "{daemon} answers {} to a good request",
            answer.status
        ));
    }
    Ok(())
}

/// Runs `cases` requests drawn from `strategy` through `check` with a fixed seed and no
/// regression files; panics with the (shrunk) failing request.
pub fn run<T: fmt::Debug>(
    cases: u32,
    strategy: &BoxedStrategy<T>,
    check: impl Fn(&T) -> Result<(), String>,
) {
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let result = runner.run(strategy, |case| {
        check(&case).map_err(|reason| TestCaseError::fail(format!("{case:?}: {reason}")))
    });
    if let Err(error) = result {
        panic!("fuzzing found a failure: {error}");
    }
}
