//! IoT Hub device and module identity REST (spec 9.5): `GET /devices/{id}`,
//! `GET /devices/{id}/modules`, and `GET|PUT|DELETE /devices/{id}/modules/{moduleId}`.
//! Every call must be authenticated as the device in the path.

use http::{Method, StatusCode};
use serde_json::Value;

use crate::{
    dps::RequestInfo,
    reply::{hub_error, Reply},
    state::{HubAuth, Module, State},
    util::{self, ApiVersion},
};

/// `api-version` values accepted on Hub routes.
pub const HUB_API_VERSIONS: &[&str] = &[
    "2017-11-08-preview",
    "2018-06-30",
    "2020-05-31-preview",
    "2020-09-30",
    "2021-04-12",
];

fn check_api_version(query: Option<&str>) -> Result<(), Reply> {
    let bad = |msg: String| Err(hub_error(StatusCode::BAD_REQUEST, "ArgumentInvalid", &msg));
    match util::api_version(query) {
        ApiVersion::Missing => bad("api-version not specified".to_string()),
        ApiVersion::Repeated => bad("api-version specified more than once".to_string()),
        ApiVersion::Value(v) if HUB_API_VERSIONS.contains(&v.as_str()) => Ok(()),
        ApiVersion::Value(v) => bad(format!("invalid api-version {v:?}")),
    }
}

/// True if the `If-Match` value matches `etag` (`*`, quoted or bare, comma lists, `W/`).
pub(crate) fn etag_matches(if_match: &str, etag: &str) -> bool {
    if_match.split(',').any(|candidate| {
        let c = candidate.trim();
        let c = c.strip_prefix("W/").unwrap_or(c);
        c == "*" || c.trim_matches('"') == etag
    })
}

enum Route<'a> {
    Device(&'a str),
    Modules(&'a str),
    Module(&'a str, &'a str),
}

/// Handles a Hub request. `segs` are the decoded path segments (`segs[0] == "devices"`).
pub(crate) fn handle(state: &mut State, req: &RequestInfo<'_>, segs: &[String]) -> Reply {
    let route = match segs {
        [_, d] => Route::Device(d),
        [_, d, m] if m == "modules" => Route::Modules(d),
        [_, d, m, id] if m == "modules" => Route::Module(d, id),
        _ => return hub_error(StatusCode::NOT_FOUND, "NotFound", "no such route"),
    };
    let (allowed, allow_header): (&[Method], &'static str) = match route {
        Route::Device(_) | Route::Modules(_) => (&[Method::GET], "GET"),
        Route::Module(..) => (
            &[Method::GET, Method::PUT, Method::DELETE],
            "GET, PUT, DELETE",
        ),
    };
    if !allowed.contains(req.method) {
        return hub_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        )
        .with_allow(allow_header);
    }
    if let Err(r) = check_api_version(req.query) {
        return r;
    }
    let (device_id, suffix) = match route {
        Route::Device(d) => (d, String::new()),
        Route::Modules(d) => (d, "/modules".to_string()),
        Route::Module(d, m) => (d, format!("/modules/{m}")),
    };
    if device_id.is_empty() {
        return hub_error(
            StatusCode::BAD_REQUEST,
            "ArgumentInvalid",
            "empty device ID",
        );
    }
    let hub_key = state.hub_for_host(req.host);
    if let Err(why) =
        state.authenticate_device(&hub_key, device_id, &suffix, req.cred, util::now_secs())
    {
        log::info!("Hub: request for device {device_id:?} rejected: {why}");
        return hub_error(
            StatusCode::UNAUTHORIZED,
            "IotHubUnauthorizedAccess",
            "Unauthorized",
        )
        .with_auth(Some(false));
    }
    let reply = match route {
        Route::Device(_) => get_device(state, &hub_key, device_id),
        Route::Modules(_) => list_modules(state, &hub_key, device_id),
        Route::Module(_, "") => hub_error(
            StatusCode::BAD_REQUEST,
            "ArgumentInvalid",
            "empty module ID",
        ),
        Route::Module(_, m) => match *req.method {
            Method::GET => get_module(state, &hub_key, device_id, m),
            Method::PUT => put_module(state, &hub_key, device_id, m, req),
            _ => delete_module(state, &hub_key, device_id, m, req.if_match),
        },
    };
    reply.with_auth(Some(true))
}

fn device_not_found(device_id: &str) -> Reply {
    hub_error(
        StatusCode::NOT_FOUND,
        "DeviceNotFound",
        &format!("Device {device_id} not registered"),
    )
}

fn module_not_found(device_id: &str, module_id: &str) -> Reply {
    hub_error(
        StatusCode::NOT_FOUND,
        "ModuleNotFound",
        &format!("Module {module_id} on device {device_id} not found"),
    )
}

fn get_device(state: &State, hub_key: &str, device_id: &str) -> Reply {
    match state
        .hubs
        .get(hub_key)
        .and_then(|h| h.devices.get(device_id))
    {
        Some(d) => Reply::json(StatusCode::OK, d.to_json()).with_etag(&d.etag),
        None => device_not_found(device_id),
    }
}

fn list_modules(state: &State, hub_key: &str, device_id: &str) -> Reply {
    match state
        .hubs
        .get(hub_key)
        .and_then(|h| h.devices.get(device_id))
    {
        Some(d) => Reply::json(
            StatusCode::OK,
            Value::Array(d.modules.values().map(Module::to_json).collect()),
        ),
        None => device_not_found(device_id),
    }
}

fn get_module(state: &State, hub_key: &str, device_id: &str, module_id: &str) -> Reply {
    let Some(d) = state
        .hubs
        .get(hub_key)
        .and_then(|h| h.devices.get(device_id))
    else {
        return device_not_found(device_id);
    };
    match d.modules.get(module_id) {
        Some(m) => Reply::json(StatusCode::OK, m.to_json()).with_etag(&m.etag),
        None => module_not_found(device_id, module_id),
    }
}

fn put_module(
    state: &mut State,
    hub_key: &str,
    device_id: &str,
    module_id: &str,
    req: &RequestInfo<'_>,
) -> Reply {
    let invalid = |msg: &str| hub_error(StatusCode::BAD_REQUEST, "ArgumentInvalid", msg);
    let body: serde_json::Map<String, Value> = if req.body.iter().all(u8::is_ascii_whitespace) {
        return invalid("request body is required");
    } else {
        match serde_json::from_slice(req.body) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return invalid("request body must be a JSON object"),
            Err(e) => return invalid(&format!("invalid request body: {e}")),
        }
    };
    for (field, want) in [("moduleId", module_id), ("deviceId", device_id)] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == want => {}
            Some(_) => return invalid(&format!("{field} in the body does not match the path")),
        }
    }
    let managed_by = match body.get("managedBy") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return invalid("managedBy must be a string"),
    };
    let auth = match HubAuth::from_json(body.get("authentication")) {
        Ok(a) => a,
        Err(e) => return invalid(&e),
    };
    let etag = state.next_etag();
    let hub = state.hub_mut(hub_key);
    let Some(device) = hub.devices.get_mut(device_id) else {
        return device_not_found(device_id);
    };
    match (req.if_match, device.modules.get_mut(module_id)) {
        (None, Some(_)) => hub_error(
            StatusCode::CONFLICT,
            "ModuleAlreadyExistsOnDevice",
            &format!("Module {module_id} already exists on device {device_id}"),
        ),
        (None, None) => {
            let m = Module {
                module_id: module_id.to_string(),
                device_id: device_id.to_string(),
                managed_by,
                generation_id: util::random_generation_id(),
                etag,
                auth: auth.unwrap_or_else(|| HubAuth::sas(None, None)),
            };
            log::info!("Hub: created module {device_id}/{module_id}");
            let reply = Reply::json(StatusCode::OK, m.to_json()).with_etag(&m.etag);
            device.modules.insert(module_id.to_string(), m);
            reply
        }
        (Some(_), None) => module_not_found(device_id, module_id),
        (Some(cond), Some(m)) if !etag_matches(cond, &m.etag) => hub_error(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "If-Match does not match the module's etag",
        ),
        (Some(_), Some(m)) => {
            m.managed_by = managed_by;
            if let Some(a) = auth {
                m.auth = a;
            }
            m.etag = etag;
            log::info!("Hub: updated module {device_id}/{module_id}");
            Reply::json(StatusCode::OK, m.to_json()).with_etag(&m.etag)
        }
    }
}

fn delete_module(
    state: &mut State,
    hub_key: &str,
    device_id: &str,
    module_id: &str,
    if_match: Option<&str>,
) -> Reply {
    let Some(device) = state
        .hubs
        .get_mut(hub_key)
        .and_then(|h| h.devices.get_mut(device_id))
    else {
        return device_not_found(device_id);
    };
    let Some(m) = device.modules.get(module_id) else {
        return module_not_found(device_id, module_id);
    };
    if !etag_matches(if_match.unwrap_or("*"), &m.etag) {
        return hub_error(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "If-Match does not match the module's etag",
        );
    }
    device.modules.remove(module_id);
    log::info!("Hub: deleted module {device_id}/{module_id}");
    Reply::empty(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::etag_matches;

    #[test]
    fn if_match_forms() {
        assert!(etag_matches("*", "MQ=="));
        assert!(etag_matches("\"MQ==\"", "MQ=="));
        assert!(etag_matches("MQ==", "MQ=="));
        assert!(etag_matches("W/\"x\", \"MQ==\"", "MQ=="));
        assert!(!etag_matches("\"Mg==\"", "MQ=="));
    }
}
