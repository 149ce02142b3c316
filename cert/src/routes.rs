//! certd's one route table: (path, method) → handler, with 404 for unknown paths, 405 + `Allow`
//! for known paths with another method, and the `api-version` rule of each route.

use std::sync::Arc;

use http::Method;
use http_common::{
    check_api_version, error_response, request::decode_path, HttpError, Request, Response,
    VersionRule,
};

use crate::error::CertError;
use crate::handlers;
use crate::service::CertService;

/// Every route certd serves, for documentation checks: (methods, path pattern).
pub const ROUTES: &[(&str, &str)] = &[
    ("POST", "/certificates"),
    ("GET, PUT, DELETE", "/certificates/{certId}"),
    ("GET, POST, PUT", "/certstore/cert"),
];

enum Route {
    Certificates,
    CertById(String),
    DraftCert,
}

impl Route {
    fn find(path: &str) -> Result<Option<Route>, HttpError> {
        Ok(Some(match path {
            "/certificates" => Route::Certificates,
            "/certstore/cert" => Route::DraftCert,
            _ => match path.strip_prefix("/certificates/") {
                // The cert ID is the rest of the path, so IDs containing `/` work unencoded.
                Some(rest) if !rest.is_empty() => Route::CertById(decode_path(rest)?),
                _ => return Ok(None),
            },
        }))
    }

    fn allow(&self) -> &'static str {
        match self {
            Route::Certificates => "POST",
            Route::CertById(_) => "GET, PUT, DELETE",
            Route::DraftCert => "GET, POST, PUT",
        }
    }
}

/// certd's request handler.
#[derive(Debug)]
pub struct Router {
    service: Arc<CertService>,
}

impl Router {
    /// A router over the service.
    pub fn new(service: Arc<CertService>) -> Self {
        Router { service }
    }

    async fn dispatch(&self, request: &Request) -> Result<Response, CertError> {
        let route = Route::find(&request.path)?.ok_or_else(HttpError::not_found)?;
        let rule = match route {
            Route::DraftCert => VersionRule::Optional,
            _ => VersionRule::Required { since: 0 },
        };
        check_api_version(request.query.as_deref(), cert_api::API_VERSIONS, rule)?;
        let service = self.service.as_ref();
        match (route, &request.method) {
            (Route::Certificates, &Method::POST) => handlers::create_cert(service, request).await,
            (Route::CertById(id), &Method::GET) => handlers::get_cert(service, &id).await,
            (Route::CertById(id), &Method::PUT) => {
                handlers::import_cert(service, request, &id).await
            }
            (Route::CertById(id), &Method::DELETE) => {
                handlers::delete_cert(service, request, &id).await
            }
            (Route::DraftCert, &Method::GET | &Method::POST | &Method::PUT) => {
                handlers::draft_cert(service, request).await
            }
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
    use super::*;
    use http_body_util::BodyExt as _;
    use http_common::{Caller, Handler as _};

    use crate::config::Policy;
    use crate::store::memory::MemoryStore;

    fn router() -> Router {
        let keyd = key_api::Client::from_uri("unix:///nonexistent/keyd.sock").unwrap();
        Router::new(Arc::new(CertService::new(
            Arc::new(MemoryStore::default()),
            Policy::default(),
            keyd,
        )))
    }

    async fn call(
        router: &Router,
        method: Method,
        path: &str,
        body: &str,
    ) -> (u16, serde_json::Value, http::HeaderMap) {
        let caller = Caller {
            uid: 0,
            gid: 0,
            pid: 1,
        };
        let response = router
            .handle(Request::new(method, path, body.to_owned(), caller))
            .await;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let value = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, value, headers)
    }

    #[tokio::test]
    async fn routing_rules() {
        let router = router();
        let v = "api-version=2020-09-01";
        let cases: Vec<(Method, String, &str, u16, &str)> = vec![
            (Method::GET, "/nope".into(), "", 404, "not found"),
            (Method::GET, "/certificates/".into(), "", 404, "not found"),
            (
                Method::GET,
                "/certificates/x".into(),
                "",
                400,
                "api-version not specified",
            ),
            (
                Method::GET,
                "/certificates/x?api-version=2021-05-01".into(),
                "",
                400,
                "invalid api-version \"2021-05-01\"",
            ),
            (
                Method::GET,
                format!("/certificates/a/b?{v}"),
                "",
                404,
                "cert \"a/b\" not found",
            ),
            (
                Method::GET,
                format!("/certificates/a%2Fb?{v}"),
                "",
                404,
                "cert \"a/b\" not found",
            ),
            (
                Method::DELETE,
                format!("/certificates/gone?{v}"),
                "",
                204,
                "",
            ),
            (
                Method::POST,
                format!("/certificates/x?{v}"),
                "{}",
                405,
                "method not allowed",
            ),
            (
                Method::GET,
                format!("/certificates?{v}"),
                "",
                405,
                "method not allowed",
            ),
            (Method::PUT, format!("/certificates/x?{v}"), "{", 422, ""),
            (
                Method::PUT,
                format!("/certificates/x?{v}"),
                "",
                400,
                "missing request body",
            ),
            (
                Method::PUT,
                format!("/certificates/x?{v}"),
                r#"{"pem":"junk"}"#,
                400,
                "pem: contains no PEM CERTIFICATE block",
            ),
            (
                Method::POST,
                format!("/certificates?{v}"),
                r#"{"certId":"x","csr":"junk!"}"#,
                400,
                "csr: is neither PEM nor base64 of a DER certification request",
            ),
            (
                Method::GET,
                "/certstore/cert".into(),
                r#"{"certid":"x"}"#,
                404,
                "cert \"x\" not found",
            ),
            (
                Method::GET,
                "/certstore/cert?certid=x".into(),
                "",
                404,
                "cert \"x\" not found",
            ),
            (
                Method::GET,
                "/certstore/cert".into(),
                "",
                400,
                "certid: is required",
            ),
            (
                Method::PUT,
                "/certstore/cert".into(),
                r#"{"certid":"x"}"#,
                400,
                "pem: is required",
            ),
            (
                Method::DELETE,
                "/certstore/cert".into(),
                "",
                405,
                "method not allowed",
            ),
            (
                Method::GET,
                "/certstore/cert?api-version=bad".into(),
                "",
                400,
                "invalid api-version \"bad\"",
            ),
        ];
        for (method, path, body, status, message) in cases {
            let (actual_status, value, _) = call(&router, method.clone(), &path, body).await;
            assert_eq!(actual_status, status, "{method} {path}: {value}");
            if !message.is_empty() {
                assert_eq!(value["message"], message, "{method} {path}");
            }
        }
        let (_, _, headers) =
            call(&router, Method::PATCH, &format!("/certificates/x?{v}"), "").await;
        assert_eq!(headers[http::header::ALLOW], "GET, PUT, DELETE");
    }
}
