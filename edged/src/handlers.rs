//! Thin HTTP handlers: parse the request (body, query), call the service, shape the answer with
//! the route's exact success status. No business rules here.

use std::sync::Arc;

use http::StatusCode;
use http_common::{empty_response, json_response, Request, Response};

use crate::error::EdgedError;
use crate::identity::IdentityClient;
use crate::model::{
    CreateIdentityRequest, DecryptRequest, EncryptRequest, IdentityList, ModuleList, ModuleSpec,
    ServerCertificateRequest, SignRequest, TrustBundleResponse,
};
use crate::routes::{ModuleAction, WorkloadAction};
use crate::runtime::{LogOptions, ModuleRuntime};
use crate::service::Edged;

type Result = std::result::Result<Response, EdgedError>;

fn parse_bool(request: &Request, name: &str) -> std::result::Result<Option<bool>, EdgedError> {
    match request.query_param(name) {
        None => Ok(None),
        Some(value) => match value.to_ascii_lowercase().as_str() {
            "true" => Ok(Some(true)),
            "false" => Ok(Some(false)),
            _ => Err(EdgedError::invalid(
                name,
                format!("{value:?} is not true or false"),
            )),
        },
    }
}

/// Parses the logs query (spec section 3.3).
pub fn log_options(request: &Request, now: i64) -> std::result::Result<LogOptions, EdgedError> {
    let tail = match request.query_param("tail") {
        None => None,
        Some(value) if value == "all" => Some(value),
        Some(value) => {
            value.parse::<u64>().map_err(|_| {
                EdgedError::invalid("tail", format!("{value:?} is not \"all\" or a number"))
            })?;
            Some(value)
        }
    };
    let time = |name: &str| -> std::result::Result<Option<i64>, EdgedError> {
        match request.query_param(name) {
            None => Ok(None),
            Some(value) => crate::time::parse_log_time(&value, now)
                .map(Some)
                .ok_or_else(|| {
                    EdgedError::invalid(
                        name,
                        format!("{value:?} is not an RFC 3339 time, Unix seconds or a duration"),
                    )
                }),
        }
    };
    Ok(LogOptions {
        follow: parse_bool(request, "follow")?.unwrap_or(false),
        tail,
        since: time("since")?,
        until: time("until")?,
        timestamps: parse_bool(request, "timestamps")?.unwrap_or(false),
    })
}

pub(crate) async fn list_modules<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
) -> Result {
    let modules = edged.list_modules().await?;
    Ok(json_response(StatusCode::OK, &ModuleList { modules }))
}

pub(crate) async fn get_module<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    name: &str,
) -> Result {
    let name = crate::service::existing_module_name(name)?;
    Ok(json_response(
        StatusCode::OK,
        &edged.get_module(name).await?,
    ))
}

pub(crate) async fn create_module<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
) -> Result {
    // The caller is checked before the body is looked at (the service checks again, cached).
    edged.authorize_agent(&request.caller).await?;
    let spec: ModuleSpec = request.json()?;
    let details = edged.create_module(&request.caller, spec).await?;
    Ok(json_response(StatusCode::CREATED, &details))
}

pub(crate) async fn update_module<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
    name: &str,
) -> Result {
    edged.authorize_agent(&request.caller).await?;
    // A missing path module is fine (the body's module is created), but a name no container can
    // have is a mistake, not an absent module.
    if crate::service::existing_module_name(name).is_err() {
        return Err(EdgedError::invalid(
            "name",
            format!("{name:?} is not a valid module (container) name"),
        ));
    }
    let start = parse_bool(request, "start")?.unwrap_or(false);
    let spec: ModuleSpec = request.json()?;
    let details = edged
        .update_module(&request.caller, name, spec, start)
        .await?;
    Ok(json_response(StatusCode::CREATED, &details))
}

pub(crate) async fn delete_module<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
    name: &str,
) -> Result {
    edged.delete_module(&request.caller, name).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub(crate) async fn prepare_update<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
    name: &str,
) -> Result {
    edged.authorize_agent(&request.caller).await?;
    let spec: ModuleSpec = request.json()?;
    edged.prepare_update(&request.caller, name, spec).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub(crate) async fn module_action<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    name: &str,
    action: ModuleAction,
) -> Result {
    let name = crate::service::existing_module_name(name)?;
    match action {
        ModuleAction::Start => edged.start_module(name).await?,
        ModuleAction::Stop => edged.stop_module(name).await?,
        ModuleAction::Restart => edged.restart_module(name).await?,
        ModuleAction::PrepareUpdate | ModuleAction::Logs => {
            return Err(EdgedError::Internal("unreachable module action".to_owned()))
        }
    }
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub(crate) async fn module_logs<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
    name: &str,
) -> Result {
    let name = crate::service::existing_module_name(name)?;
    let options = log_options(request, crate::time::now_unix())?;
    let body = edged.module_logs(name, &options).await?;
    let mut response = hyper::Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}

pub(crate) async fn list_identities<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
) -> Result {
    let identities = edged.list_identities().await?;
    Ok(json_response(StatusCode::OK, &IdentityList { identities }))
}

pub(crate) async fn create_identity<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
) -> Result {
    edged.authorize_agent(&request.caller).await?;
    let body: CreateIdentityRequest = request.json()?;
    let identity = edged
        .create_identity(&request.caller, &body.module_id, body.managed_by)
        .await?;
    Ok(json_response(StatusCode::OK, &identity))
}

pub(crate) async fn update_identity<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
    name: &str,
) -> Result {
    edged.authorize_agent(&request.caller).await?;
    // Any JSON or an empty body.
    let _: Option<serde_json::Value> = request.optional_json()?;
    let identity = edged.update_identity(&request.caller, name).await?;
    Ok(json_response(StatusCode::OK, &identity))
}

pub(crate) async fn delete_identity<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
    name: &str,
) -> Result {
    edged.delete_identity(&request.caller, name).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub(crate) async fn system_info<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
) -> Result {
    let info = crate::systeminfo::system_info(edged).await;
    Ok(json_response(StatusCode::OK, &info))
}

pub(crate) async fn system_resources<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
) -> Result {
    let resources = crate::systeminfo::system_resources(edged).await?;
    Ok(json_response(StatusCode::OK, &resources))
}

pub(crate) async fn support_bundle<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
) -> Result {
    let now = crate::time::now_unix();
    let time = |name: &str| -> std::result::Result<Option<i64>, EdgedError> {
        match request.query_param(name) {
            None => Ok(None),
            Some(value) => crate::time::parse_log_time(&value, now)
                .map(Some)
                .ok_or_else(|| {
                    EdgedError::invalid(
                        name,
                        format!("{value:?} is not an RFC 3339 time, Unix seconds or a duration"),
                    )
                }),
        }
    };
    let options = crate::support::BundleOptions {
        since: time("since")?,
        until: time("until")?,
        iothub_hostname: request.query_param("iothub_hostname"),
        edge_runtime_only: parse_bool(request, "edge_runtime_only")?.unwrap_or(false),
    };
    let bytes = crate::support::support_bundle(edged, &options).await?;
    let mut response = hyper::Response::new(http_common::full_body(bytes));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/zip"),
    );
    Ok(response)
}

pub(crate) async fn reprovision<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
) -> Result {
    edged.reprovision(&request.caller).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub(crate) async fn workload_action<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
    name: &str,
    gen_id: &str,
    action: WorkloadAction,
) -> Result {
    let caller = &request.caller;
    edged.authorize_module(caller, name).await?;
    match action {
        WorkloadAction::Sign => {
            let body: SignRequest = request.json()?;
            let answer = edged.sign(caller, name, body).await?;
            Ok(json_response(StatusCode::OK, &answer))
        }
        WorkloadAction::Encrypt => {
            let body: EncryptRequest = request.json()?;
            let answer = edged.encrypt(caller, name, gen_id, body).await?;
            Ok(json_response(StatusCode::OK, &answer))
        }
        WorkloadAction::Decrypt => {
            let body: DecryptRequest = request.json()?;
            let answer = edged.decrypt(caller, name, gen_id, body).await?;
            Ok(json_response(StatusCode::OK, &answer))
        }
        WorkloadAction::ServerCertificate => {
            let body: ServerCertificateRequest = request.json()?;
            let _ = body.expiration;
            let answer = edged
                .server_certificate(caller, name, gen_id, body.common_name)
                .await?;
            Ok(json_response(StatusCode::CREATED, &answer))
        }
    }
}

pub(crate) async fn identity_certificate<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
    request: &Request,
    name: &str,
) -> Result {
    // Any body is accepted and ignored.
    let answer = edged.identity_certificate(&request.caller, name).await?;
    Ok(json_response(StatusCode::CREATED, &answer))
}

pub(crate) async fn trust_bundle<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
) -> Result {
    let certificate = edged.trust_bundle().await?;
    Ok(json_response(
        StatusCode::OK,
        &TrustBundleResponse { certificate },
    ))
}

pub(crate) async fn manifest_trust_bundle<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
) -> Result {
    let certificate = edged.manifest_trust_bundle().await?;
    Ok(json_response(
        StatusCode::OK,
        &TrustBundleResponse { certificate },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use http_common::Caller;

    fn request(query: &str) -> Request {
        Request::new(
            Method::GET,
            &format!("/modules/m/logs?{query}"),
            "",
            Caller {
                uid: 0,
                gid: 0,
                pid: 1,
            },
        )
    }

    #[test]
    fn log_query_rules() {
        let now = 10_000;
        let ok = |query: &str| log_options(&request(query), now).unwrap();
        assert_eq!(ok(""), LogOptions::default());
        let options = ok("follow=true&tail=10&since=90m&until=1700000000&timestamps=TRUE");
        assert!(options.follow && options.timestamps);
        assert_eq!(options.tail.as_deref(), Some("10"));
        assert_eq!(options.since, Some(10_000 - 5400));
        assert_eq!(options.until, Some(1_700_000_000));
        assert_eq!(ok("since=1970-01-01T00:00:10Z").since, Some(10));
        assert_eq!(ok("since=1%20day").since, Some(10_000 - 86_400));
        assert_eq!(ok("tail=all").tail.as_deref(), Some("all"));
        for (query, name) in [
            ("follow=yes", "follow"),
            ("tail=-1", "tail"),
            ("tail=x", "tail"),
            ("since=whenever", "since"),
            ("until=5 parsecs", "until"),
            ("timestamps=1", "timestamps"),
        ] {
            let error = log_options(&request(query), now).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("invalid parameter: {name}"),
                "{query}"
            );
        }
    }
}
