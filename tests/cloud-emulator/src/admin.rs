//! Admin API: plain HTTP/1.1 + JSON on its own loopback TCP port, for tests to change and
//! inspect emulator state at run time. Routes (bodies use the config types, snake_case):
//!
//! | Method, path | Body | Answer |
//! |---|---|---|
//! | `GET /info` | – | addresses, CA path, scope, default hub |
//! | `GET /settings` | – | current settings |
//! | `PATCH /settings` (or `POST`) | [`SettingsPatch`] | new settings |
//! | `GET /enrollments` | – | `{individual: [...], groups: [...]}` without keys |
//! | `POST /enrollments/individual` | [`IndividualEnrollment`] | 201 |
//! | `DELETE /enrollments/individual/{registrationId}` | – | 204 / 404 |
//! | `POST /enrollments/groups` | [`GroupEnrollment`] | 201 |
//! | `DELETE /enrollments/groups/{groupId}` | – | 204 / 404 |
//! | `GET /registrations` | – | DPS registration records |
//! | `GET /hubs` | – | hub names |
//! | `GET /devices[?hub=H]` | – | devices (all hubs unless `hub`) with their modules |
//! | `POST /devices` | [`DeviceSpec`] | 201 device |
//! | `GET /devices/{id}[?hub=H]` | – | device / 404 |
//! | `DELETE /devices/{id}[?hub=H]` | – | 204 / 404 |
//! | `GET /devices/{id}/modules[?hub=H]` | – | modules / 404 |
//! | `POST /trusted-cas` | `{"pem": "..."}` | 204 |
//! | `GET /faults`, `POST /faults`, `DELETE /faults` | [`FaultSpec`] for POST | list / 204 |
//! | `GET /requests[?since=SEQ]`, `DELETE /requests` | – | request log / 204 |
//!
//! Errors: `{"message": "..."}` with 400 (bad value), 404, 405, 422 (body not parseable).

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

#[cfg(doc)]
use crate::config::{DeviceSpec, FaultSpec, GroupEnrollment, IndividualEnrollment, SettingsPatch};
use crate::{
    control::Control,
    reply::{plain_error, Reply},
    util, EmulatorError,
};

const MAX_BODY: usize = 4 * 1024 * 1024;

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    serde_json::from_slice(body)
        .map_err(|e| plain_error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()))
}

fn from_err(e: &EmulatorError) -> Reply {
    match e {
        EmulatorError::NotFound(_) => plain_error(StatusCode::NOT_FOUND, &e.to_string()),
        EmulatorError::InvalidInput(_) | EmulatorError::Config(_) | EmulatorError::Io { .. } => {
            plain_error(StatusCode::BAD_REQUEST, &e.to_string())
        }
        EmulatorError::Tls(_) => plain_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
    }
}

fn ok(v: Value) -> Reply {
    Reply::json(StatusCode::OK, v)
}

fn done(status: StatusCode, found: bool) -> Reply {
    if found {
        Reply::empty(status)
    } else {
        plain_error(StatusCode::NOT_FOUND, "not found")
    }
}

fn method_not_allowed(allow: &'static str) -> Reply {
    plain_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed").with_allow(allow)
}

/// Handles one admin request.
pub(crate) async fn handle(
    control: &Control,
    info: &Value,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return plain_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large or unreadable",
            )
            .into_response()
        }
    };
    let query = util::query_pairs(parts.uri.query());
    let hub = query
        .iter()
        .find(|(k, _)| k == "hub")
        .map(|(_, v)| v.as_str());
    let reply = match util::path_segments(parts.uri.path()) {
        Some(segs) => {
            let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
            route(control, info, &parts.method, &segs, hub, &query, &body).unwrap_or_else(|r| r)
        }
        None => plain_error(StatusCode::BAD_REQUEST, "path is not UTF-8"),
    };
    reply.into_response()
}

fn route(
    c: &Control,
    info: &Value,
    method: &Method,
    segs: &[&str],
    hub: Option<&str>,
    query: &[(String, String)],
    body: &[u8],
) -> Result<Reply, Reply> {
    let m = method.clone();
    Ok(match segs {
        ["info"] => match m {
            Method::GET => ok(info.clone()),
            _ => method_not_allowed("GET"),
        },
        ["settings"] => match m {
            Method::GET => ok(json!(c.settings())),
            Method::PATCH | Method::POST | Method::PUT => {
                let s = c.patch_settings(parse(body)?).map_err(|e| from_err(&e))?;
                ok(json!(s))
            }
            _ => method_not_allowed("GET, PATCH, POST, PUT"),
        },
        ["enrollments"] => match m {
            Method::GET => ok(c.enrollments()),
            _ => method_not_allowed("GET"),
        },
        ["enrollments", "individual"] => match m {
            Method::POST => {
                c.add_individual_enrollment(parse(body)?)
                    .map_err(|e| from_err(&e))?;
                Reply::empty(StatusCode::CREATED)
            }
            _ => method_not_allowed("POST"),
        },
        ["enrollments", "individual", id] => match m {
            Method::DELETE => done(StatusCode::NO_CONTENT, c.remove_individual_enrollment(id)),
            _ => method_not_allowed("DELETE"),
        },
        ["enrollments", "groups"] => match m {
            Method::POST => {
                c.add_group_enrollment(parse(body)?)
                    .map_err(|e| from_err(&e))?;
                Reply::empty(StatusCode::CREATED)
            }
            _ => method_not_allowed("POST"),
        },
        ["enrollments", "groups", id] => match m {
            Method::DELETE => done(StatusCode::NO_CONTENT, c.remove_group_enrollment(id)),
            _ => method_not_allowed("DELETE"),
        },
        ["registrations"] => match m {
            Method::GET => ok(json!(c.registrations())),
            _ => method_not_allowed("GET"),
        },
        ["hubs"] => match m {
            Method::GET => ok(json!(c.hubs())),
            _ => method_not_allowed("GET"),
        },
        ["devices"] => match m {
            Method::GET => ok(json!(c.devices(hub))),
            Method::POST => {
                let d = c.add_device(parse(body)?).map_err(|e| from_err(&e))?;
                Reply::json(StatusCode::CREATED, d)
            }
            _ => method_not_allowed("GET, POST"),
        },
        ["devices", id] => match m {
            Method::GET => match c.device(hub, id) {
                Some(d) => ok(d),
                None => plain_error(StatusCode::NOT_FOUND, "device not found"),
            },
            Method::DELETE => done(StatusCode::NO_CONTENT, c.remove_device(hub, id)),
            _ => method_not_allowed("GET, DELETE"),
        },
        ["devices", id, "modules"] => match m {
            Method::GET => match c.modules(hub, id) {
                Some(ms) => ok(json!(ms)),
                None => plain_error(StatusCode::NOT_FOUND, "device not found"),
            },
            _ => method_not_allowed("GET"),
        },
        ["trusted-cas"] => match m {
            Method::POST => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Pem {
                    pem: String,
                }
                let p: Pem = parse(body)?;
                c.add_trusted_ca(&p.pem).map_err(|e| from_err(&e))?;
                Reply::empty(StatusCode::NO_CONTENT)
            }
            _ => method_not_allowed("POST"),
        },
        ["faults"] => match m {
            Method::GET => ok(json!(c.faults())),
            Method::POST => {
                c.add_fault(parse(body)?).map_err(|e| from_err(&e))?;
                Reply::empty(StatusCode::NO_CONTENT)
            }
            Method::DELETE => {
                c.clear_faults();
                Reply::empty(StatusCode::NO_CONTENT)
            }
            _ => method_not_allowed("GET, POST, DELETE"),
        },
        ["requests"] => match m {
            Method::GET => {
                let since: u64 = match query.iter().find(|(k, _)| k == "since") {
                    Some((_, v)) => v.parse().map_err(|_| {
                        plain_error(StatusCode::BAD_REQUEST, "since must be a number")
                    })?,
                    None => 0,
                };
                let entries: Vec<_> = c.requests().into_iter().filter(|e| e.seq > since).collect();
                ok(json!(entries))
            }
            Method::DELETE => {
                c.clear_requests();
                Reply::empty(StatusCode::NO_CONTENT)
            }
            _ => method_not_allowed("GET, DELETE"),
        },
        _ => plain_error(StatusCode::NOT_FOUND, "not found"),
    })
}
