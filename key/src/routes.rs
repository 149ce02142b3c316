//! keyd's one route table: (path, method) → handler, with 404 for unknown paths, 405 + `Allow`
//! for known paths with another method, and the `api-version` rule of each route.

use std::sync::Arc;

use http::Method;
use http_common::{
    check_api_version, error_response, request::decode_path, HttpError, Request, Response,
    VersionRule,
};

use crate::error::KeyError;
use crate::handlers;
use crate::service::KeyService;

/// Every route keyd serves, for documentation checks: (methods, path pattern).
pub const ROUTES: &[(&str, &str)] = &[
    ("POST, DELETE", "/key"),
    ("GET", "/key/{keyId}"),
    ("POST, DELETE", "/keypair"),
    ("GET, POST", "/keypair/{keyId}"),
    ("POST", "/parameters/{parameterName}"),
    ("POST", "/sign"),
    ("POST", "/encrypt"),
    ("POST", "/decrypt"),
    ("POST", "/derivedkey"),
    ("POST", "/derivedkey/export"),
    ("GET, POST", "/keystore/key"),
    ("GET, POST", "/keystore/keypair"),
    ("POST", "/keystore/sign"),
];

enum Route {
    Key,
    KeyById(String),
    KeyPair,
    KeyPairById(String),
    Parameter(String),
    Sign,
    Encrypt,
    Decrypt,
    DerivedKey,
    DerivedKeyExport,
    DraftKey,
    DraftKeyPair,
    DraftSign,
}

impl Route {
    fn find(path: &str) -> Result<Option<Route>, HttpError> {
        Ok(Some(match path {
            "/key" => Route::Key,
            "/keypair" => Route::KeyPair,
            "/sign" => Route::Sign,
            "/encrypt" => Route::Encrypt,
            "/decrypt" => Route::Decrypt,
            "/derivedkey" => Route::DerivedKey,
            "/derivedkey/export" => Route::DerivedKeyExport,
            "/keystore/key" => Route::DraftKey,
            "/keystore/keypair" => Route::DraftKeyPair,
            "/keystore/sign" => Route::DraftSign,
            _ => {
                // The key ID is the rest of the path, so IDs containing `/` work unencoded.
                if let Some(rest) = path.strip_prefix("/key/") {
                    Route::KeyById(decode_path(rest)?)
                } else if let Some(rest) = path.strip_prefix("/keypair/") {
                    Route::KeyPairById(decode_path(rest)?)
                } else if let Some(name) = path
                    .strip_prefix("/parameters/")
                    .filter(|name| !name.contains('/'))
                {
                    Route::Parameter(decode_path(name)?)
                } else {
                    return Ok(None);
                }
            }
        }))
    }

    fn allow(&self) -> &'static str {
        match self {
            Route::Key | Route::KeyPair => "POST, DELETE",
            Route::KeyById(_) => "GET",
            Route::KeyPairById(_) | Route::DraftKey | Route::DraftKeyPair => "GET, POST",
            _ => "POST",
        }
    }

    fn is_draft(&self) -> bool {
        matches!(
            self,
            Route::DraftKey | Route::DraftKeyPair | Route::DraftSign
        )
    }
}

/// keyd's request handler.
#[derive(Debug)]
pub struct Router {
    service: Arc<KeyService>,
}

impl Router {
    /// A router over the service.
    pub fn new(service: Arc<KeyService>) -> Self {
        Router { service }
    }

    async fn dispatch(&self, request: &Request) -> Result<Response, KeyError> {
        let route = Route::find(&request.path)?.ok_or_else(HttpError::not_found)?;
        let rule = if route.is_draft() {
            VersionRule::Optional
        } else {
            VersionRule::Required { since: 0 }
        };
        check_api_version(request.query.as_deref(), key_api::API_VERSIONS, rule)?;
        let service = self.service.as_ref();
        match (route, &request.method) {
            (Route::Key, &Method::POST) => handlers::create_key(service, request).await,
            (Route::Key, &Method::DELETE) => handlers::delete_key(service, request).await,
            (Route::KeyById(id), &Method::GET) => handlers::load_key(service, request, &id).await,
            (Route::KeyPair, &Method::POST) => handlers::create_key_pair(service, request).await,
            (Route::KeyPair, &Method::DELETE) => handlers::delete_key_pair(service, request).await,
            (Route::KeyPairById(id), &Method::GET) => {
                handlers::load_key_pair(service, request, &id).await
            }
            (Route::KeyPairById(id), &Method::POST) => {
                handlers::move_key_pair(service, request, &id).await
            }
            (Route::Parameter(name), &Method::POST) => {
                handlers::get_parameter(service, request, &name).await
            }
            (Route::Sign, &Method::POST) => handlers::sign(service, request).await,
            (Route::Encrypt, &Method::POST) => handlers::encrypt(service, request).await,
            (Route::Decrypt, &Method::POST) => handlers::decrypt(service, request).await,
            (Route::DerivedKey, &Method::POST) => {
                handlers::create_derived_key(service, request).await
            }
            (Route::DerivedKeyExport, &Method::POST) => {
                handlers::export_derived_key(service, request).await
            }
            (Route::DraftKey, &Method::POST) => handlers::draft_create_key(service, request).await,
            (Route::DraftKey, &Method::GET) => handlers::draft_load_key(service, request).await,
            (Route::DraftKeyPair, &Method::POST) => {
                handlers::draft_create_key_pair(service, request).await
            }
            (Route::DraftKeyPair, &Method::GET) => {
                handlers::draft_load_key_pair(service, request).await
            }
            (Route::DraftSign, &Method::POST) => handlers::draft_sign(service, request).await,
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
    /// Every route in the table is documented in docs/keyd.md.
    #[test]
    fn every_route_is_documented() {
        let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/keyd.md"))
            .expect("docs/keyd.md");
        for (methods, path) in super::ROUTES.iter().chain(crate::tpm::routes::ROUTES) {
            for method in methods.split(", ") {
                let documented = docs.lines().any(|line| {
                    line.contains(path)
                        && (line.contains(&format!("`{method} "))
                            || line.contains(&format!("{method}`"))
                            || line.contains(&format!("{method},")))
                });
                assert!(documented, "{method} {path} is not in docs/keyd.md");
            }
        }
    }
}
