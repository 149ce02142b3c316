//! Thin handlers: extract the caller, parameters and body, call the service, shape the answer.

use std::sync::Arc;

use http::StatusCode;
use http_common::{empty_response, json_response, Request, Response};
use identity_api::{CreateModuleRequest, ListIdentitiesResponse, TrustBundle};

use crate::error::IdentityError;
use crate::service::IdentityService;

type Result<T> = std::result::Result<T, IdentityError>;

/// The `type` query parameter (`aziot` or `local`).
fn id_type(request: &Request) -> Result<String> {
    match request.query_param("type") {
        None => Err(IdentityError::BadRequest(
            "missing parameter \"type\"".to_owned(),
        )),
        Some(value) if value == "aziot" || value == "local" => Ok(value),
        Some(_) => Err(IdentityError::BadRequest("invalid type".to_owned())),
    }
}

/// `type` for routes that only serve cloud identities.
fn aziot_type(request: &Request) -> Result<()> {
    match id_type(request)?.as_str() {
        "aziot" => Ok(()),
        _ => Err(IdentityError::BadRequest("invalid type".to_owned())),
    }
}

pub async fn draft_device(service: &IdentityService, request: &Request) -> Result<Response> {
    let identity = service.draft_device_identity(request.caller.uid).await?;
    Ok(json_response(StatusCode::OK, &identity))
}

pub async fn draft_reprovision(
    service: &Arc<IdentityService>,
    request: &Request,
) -> Result<Response> {
    service.reprovision(request.caller.uid).await?;
    Ok(json_response(StatusCode::OK, &serde_json::json!({})))
}

pub async fn caller_identity(service: &IdentityService, request: &Request) -> Result<Response> {
    let identity = service.caller_identity(request.caller.uid).await?;
    Ok(json_response(StatusCode::OK, &identity))
}

pub async fn device_identity(service: &IdentityService, request: &Request) -> Result<Response> {
    // The body (`{"type": "aziot"}`) is optional and its value not checked.
    request.optional_json::<serde_json::Value>()?;
    let identity = service.device_identity(request.caller.uid).await?;
    Ok(json_response(StatusCode::OK, &identity))
}

pub async fn reprovision(service: &Arc<IdentityService>, request: &Request) -> Result<Response> {
    request.optional_json::<serde_json::Value>()?;
    service.reprovision(request.caller.uid).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub async fn provisioning_info(service: &IdentityService) -> Result<Response> {
    Ok(json_response(
        StatusCode::OK,
        &service.provisioning_info().await,
    ))
}

pub async fn list_modules(service: &IdentityService, request: &Request) -> Result<Response> {
    let id_type = id_type(request)?;
    let identities = service.list_modules(request.caller.uid, &id_type).await?;
    Ok(json_response(
        StatusCode::OK,
        &ListIdentitiesResponse { identities },
    ))
}

pub async fn create_module(service: &IdentityService, request: &Request) -> Result<Response> {
    let body: CreateModuleRequest = request.json()?;
    let identity = match body.id_type.as_str() {
        "aziot" => {
            service
                .create_module(request.caller.uid, &body.module_id)
                .await?
        }
        "local" => {
            let attributes = body
                .local_id_opts
                .as_ref()
                .and_then(|options| options.attributes.as_deref());
            service
                .create_local_module(request.caller.uid, &body.module_id, attributes)
                .await?
        }
        _ => return Err(IdentityError::BadRequest("invalid type".to_owned())),
    };
    Ok(json_response(StatusCode::OK, &identity))
}

pub async fn get_module(
    service: &IdentityService,
    request: &Request,
    module_id: &str,
) -> Result<Response> {
    let id_type = id_type(request)?;
    let identity = service
        .get_module(request.caller.uid, module_id, &id_type)
        .await?;
    Ok(json_response(StatusCode::OK, &identity))
}

pub async fn update_module(
    service: &IdentityService,
    request: &Request,
    module_id: &str,
) -> Result<Response> {
    aziot_type(request)?;
    // Any JSON (or nothing) is accepted; reference clients send {"type", "moduleId"}.
    request.optional_json::<serde_json::Value>()?;
    let identity = service.update_module(request.caller.uid, module_id).await?;
    Ok(json_response(StatusCode::OK, &identity))
}

pub async fn delete_module(
    service: &IdentityService,
    request: &Request,
    module_id: &str,
) -> Result<Response> {
    aziot_type(request)?;
    service.delete_module(request.caller.uid, module_id).await?;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub async fn trust_bundle(service: &IdentityService) -> Result<Response> {
    let certificate = service.trust_bundle().await?;
    Ok(json_response(StatusCode::OK, &TrustBundle { certificate }))
}
