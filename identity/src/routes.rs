//! identityd's one route table: (path, method) → handler, with 404 for unknown paths, 405 +
//! `Allow` for known paths with another method, and the `api-version` rule of each route.

use std::sync::Arc;

use http::Method;
use http_common::{
    check_api_version, error_response, request::decode_path, HttpError, Request, Response,
    VersionRule,
};

use crate::error::IdentityError;
use crate::handlers;
use crate::service::IdentityService;

/// Every route identityd serves, for documentation checks: (methods, path pattern).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/identities/aziot/device"),
    ("GET", "/identities/aziot/device/reprovision"),
    ("GET", "/identities/identity"),
    ("POST", "/identities/device"),
    ("POST", "/identities/device/reprovision"),
    ("GET", "/identities/provisioning"),
    ("GET, POST", "/identities/modules"),
    ("GET, PUT, DELETE", "/identities/modules/{m}"),
    ("GET", "/trust-bundle"),
];

enum Route {
    DraftDevice,
    DraftReprovision,
    CallerIdentity,
    Device,
    Reprovision,
    Provisioning,
    Modules,
    Module(String),
    TrustBundle,
}

impl Route {
    fn find(path: &str) -> Result<Option<Route>, HttpError> {
        Ok(Some(match path {
            "/identities/aziot/device" => Route::DraftDevice,
            "/identities/aziot/device/reprovision" => Route::DraftReprovision,
            "/identities/identity" => Route::CallerIdentity,
            "/identities/device" => Route::Device,
            "/identities/device/reprovision" => Route::Reprovision,
            "/identities/provisioning" => Route::Provisioning,
            "/identities/modules" => Route::Modules,
            "/trust-bundle" => Route::TrustBundle,
            _ => match path.strip_prefix("/identities/modules/") {
                Some(segment) if !segment.is_empty() && !segment.contains('/') => {
                    Route::Module(decode_path(segment)?)
                }
                _ => return Ok(None),
            },
        }))
    }

    fn allow(&self) -> &'static str {
        match self {
            Route::Device | Route::Reprovision => "POST",
            Route::Modules => "GET, POST",
            Route::Module(_) => "GET, PUT, DELETE",
            _ => "GET",
        }
    }

    fn version_rule(&self) -> VersionRule {
        match self {
            Route::DraftDevice | Route::DraftReprovision => VersionRule::Optional,
            // 2021-12-01
            Route::Provisioning => VersionRule::Required { since: 1 },
            _ => VersionRule::Required { since: 0 },
        }
    }
}

/// identityd's request handler.
#[derive(Debug)]
pub struct Router {
    service: Arc<IdentityService>,
}

impl Router {
    /// A router over the service.
    pub fn new(service: Arc<IdentityService>) -> Self {
        Router { service }
    }

    async fn dispatch(&self, request: &Request) -> Result<Response, IdentityError> {
        let route = Route::find(&request.path)?.ok_or_else(HttpError::not_found)?;
        check_api_version(
            request.query.as_deref(),
            identity_api::API_VERSIONS,
            route.version_rule(),
        )?;
        let service = &self.service;
        match (route, &request.method) {
            (Route::DraftDevice, &Method::GET) => handlers::draft_device(service, request).await,
            (Route::DraftReprovision, &Method::GET) => {
                handlers::draft_reprovision(service, request).await
            }
            (Route::CallerIdentity, &Method::GET) => {
                handlers::caller_identity(service, request).await
            }
            (Route::Device, &Method::POST) => handlers::device_identity(service, request).await,
            (Route::Reprovision, &Method::POST) => handlers::reprovision(service, request).await,
            (Route::Provisioning, &Method::GET) => handlers::provisioning_info(service).await,
            (Route::Modules, &Method::GET) => handlers::list_modules(service, request).await,
            (Route::Modules, &Method::POST) => handlers::create_module(service, request).await,
            (Route::Module(id), &Method::GET) => handlers::get_module(service, request, &id).await,
            (Route::Module(id), &Method::PUT) => {
                handlers::update_module(service, request, &id).await
            }
            (Route::Module(id), &Method::DELETE) => {
                handlers::delete_module(service, request, &id).await
            }
            (Route::TrustBundle, &Method::GET) => handlers::trust_bundle(service).await,
            (route, _) => Err(HttpError::method_not_allowed(route.allow()).into()),
        }
    }
}

impl http_common::Handler for Router {
    async fn handle(&self, request: Request) -> Response {
        match self.dispatch(&request).await {
            Ok(response) => response,
            Err(error) => error_response(&error),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every route in the table is documented in docs/identityd.md.
    #[test]
    fn every_route_is_documented() {
        let docs =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/identityd.md"))
                .expect("docs/identityd.md");
        for (methods, path) in super::ROUTES {
            for method in methods.split(", ") {
                let documented = docs
                    .lines()
                    .any(|line| line.contains(&format!("`{method} {path}")));
                assert!(documented, "{method} {path} is not in docs/identityd.md");
            }
        }
    }
}
