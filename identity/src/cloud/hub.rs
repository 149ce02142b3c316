//! IoT Hub module identity REST (spec 9.5), authenticated as the device.

use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::{encode_segment, CloudClient, CloudRequest, RequestAuth, Service};
use crate::error::IdentityError;

/// The api-version sent to IoT Hub (passes through a parent edgeHub).
pub const API_VERSION: &str = "2017-11-08-preview";

/// A module as IoT Hub describes it (fields identityd uses; others ignored).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HubModule {
    /// The module ID.
    pub module_id: String,
    /// The device ID.
    #[serde(default)]
    pub device_id: String,
    /// The generation ID.
    #[serde(default)]
    pub generation_id: Option<String>,
    /// Who manages the module.
    #[serde(default)]
    pub managed_by: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModuleBody<'a> {
    module_id: &'a str,
    device_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    authentication: Option<Authentication>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Authentication {
    #[serde(rename = "type")]
    auth_type: &'static str,
    symmetric_key: SymmetricKey,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SymmetricKey {
    primary_key: String,
    secondary_key: String,
}

/// Where and as whom module requests go.
#[derive(Clone, Debug)]
pub struct HubTarget {
    /// `host[:port]` to connect to (the hub, or the parent gateway).
    pub gateway_host: String,
    /// The device ID.
    pub device_id: String,
    /// The device's credential.
    pub auth: RequestAuth,
}

fn module_path(target: &HubTarget, module_id: Option<&str>) -> String {
    let mut path = format!(
        "/devices/{}/modules",
        encode_segment(&target.device_id, false)
    );
    if let Some(module_id) = module_id {
        path.push('/');
        path.push_str(&encode_segment(module_id, true));
    }
    path.push_str("?api-version=");
    path.push_str(API_VERSION);
    path
}

fn request(
    target: &HubTarget,
    method: Method,
    module_id: Option<&str>,
    if_match: bool,
    body: Option<Vec<u8>>,
) -> CloudRequest {
    CloudRequest {
        service: Service::Hub,
        method,
        authority: target.gateway_host.clone(),
        path_and_query: module_path(target, module_id),
        auth: target.auth.clone(),
        headers: if if_match {
            vec![("if-match", "*".to_owned())]
        } else {
            Vec::new()
        },
        body,
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, IdentityError> {
    serde_json::from_slice(body).map_err(|error| {
        super::CloudError::Protocol {
            service: "IoT Hub",
            reason: error.to_string(),
        }
        .into()
    })
}

/// One module; `None` when Hub answers 404 `ModuleNotFound`.
pub async fn get_module(
    cloud: &CloudClient,
    target: &HubTarget,
    module_id: &str,
) -> Result<Option<HubModule>, IdentityError> {
    let response = cloud
        .send(&request(target, Method::GET, Some(module_id), false, None))
        .await?;
    match response.status {
        StatusCode::OK => parse(&response.body).map(Some),
        StatusCode::NOT_FOUND if !is_device_not_found(&response.body) => Ok(None),
        _ => Err(response.into_error(Service::Hub).into()),
    }
}

fn is_device_not_found(body: &[u8]) -> bool {
    String::from_utf8_lossy(body).contains("DeviceNotFound")
}

/// Every module of the device.
pub async fn list_modules(
    cloud: &CloudClient,
    target: &HubTarget,
) -> Result<Vec<HubModule>, IdentityError> {
    let response = cloud
        .send(&request(target, Method::GET, None, false, None))
        .await?;
    match response.status {
        StatusCode::OK => parse(&response.body),
        _ => Err(response.into_error(Service::Hub).into()),
    }
}

/// Creates a module without authentication; `Err(ModuleExists)` on 409.
pub async fn create_module(
    cloud: &CloudClient,
    target: &HubTarget,
    module_id: &str,
) -> Result<HubModule, IdentityError> {
    let body = ModuleBody {
        module_id,
        device_id: &target.device_id,
        authentication: None,
    };
    let response = cloud
        .send(&request(
            target,
            Method::PUT,
            Some(module_id),
            false,
            Some(serde_json::to_vec(&body).unwrap_or_default()),
        ))
        .await?;
    match response.status {
        StatusCode::OK | StatusCode::CREATED => parse(&response.body),
        StatusCode::CONFLICT => Err(IdentityError::ModuleExists(module_id.to_owned())),
        _ => Err(response.into_error(Service::Hub).into()),
    }
}

/// Sets the module's SAS keys (`If-Match: *`); `Err(ModuleNotFound)` on 404.
pub async fn set_module_keys(
    cloud: &CloudClient,
    target: &HubTarget,
    module_id: &str,
    primary_key: String,
    secondary_key: String,
) -> Result<HubModule, IdentityError> {
    let body = ModuleBody {
        module_id,
        device_id: &target.device_id,
        authentication: Some(Authentication {
            auth_type: "sas",
            symmetric_key: SymmetricKey {
                primary_key,
                secondary_key,
            },
        }),
    };
    let response = cloud
        .send(&request(
            target,
            Method::PUT,
            Some(module_id),
            true,
            Some(serde_json::to_vec(&body).unwrap_or_default()),
        ))
        .await?;
    match response.status {
        StatusCode::OK | StatusCode::CREATED => parse(&response.body),
        StatusCode::NOT_FOUND if !is_device_not_found(&response.body) => {
            Err(IdentityError::ModuleNotFound(module_id.to_owned()))
        }
        _ => Err(response.into_error(Service::Hub).into()),
    }
}

/// Deletes a module (`If-Match: *`); `Err(ModuleNotFound)` on 404.
pub async fn delete_module(
    cloud: &CloudClient,
    target: &HubTarget,
    module_id: &str,
) -> Result<(), IdentityError> {
    let response = cloud
        .send(&request(
            target,
            Method::DELETE,
            Some(module_id),
            true,
            None,
        ))
        .await?;
    match response.status {
        StatusCode::OK | StatusCode::NO_CONTENT => Ok(()),
        StatusCode::NOT_FOUND if !is_device_not_found(&response.body) => {
            Err(IdentityError::ModuleNotFound(module_id.to_owned()))
        }
        _ => Err(response.into_error(Service::Hub).into()),
    }
}
