//! edged's two route tables: the management API ([`ManagementRouter`]) and the workload API
//! ([`WorkloadRouter`]). Each is one `match` over (route, method) with 404 for unknown paths,
//! 405 + `Allow` for a known path with another method, and each route's first api-version.

use std::sync::Arc;

use http::Method;
use http_common::{
    check_api_version, error_response, request::decode_path, HttpError, Request, Response,
    VersionRule,
};

use crate::error::EdgedError;
use crate::handlers;
use crate::identity::IdentityClient;
use crate::runtime::ModuleRuntime;
use crate::service::Edged;

/// Every api-version edged knows (both APIs), oldest first.
pub const API_VERSIONS: &[&str] = &[
    "2018-06-28",
    "2019-01-30",
    "2019-10-22",
    "2019-11-05",
    "2020-07-07",
    "2021-05-11",
    "2021-12-07",
    "2022-08-03",
];

const V2018_06_28: usize = 0;
const V2019_01_30: usize = 1;
const V2019_10_22: usize = 2;
const V2019_11_05: usize = 3;
const V2020_07_07: usize = 4;

/// Every management route, for documentation checks: (methods, path pattern).
pub const MANAGEMENT_ROUTES: &[(&str, &str)] = &[
    ("GET, POST", "/modules"),
    ("GET, PUT, DELETE", "/modules/{name}"),
    ("POST", "/modules/{name}/start"),
    ("POST", "/modules/{name}/stop"),
    ("POST", "/modules/{name}/restart"),
    ("POST", "/modules/{name}/prepareupdate"),
    ("GET", "/modules/{name}/logs"),
    ("GET, POST", "/identities"),
    ("PUT, DELETE", "/identities/{name}"),
    ("GET", "/systeminfo"),
    ("GET", "/systeminfo/resources"),
    ("GET", "/systeminfo/supportbundle"),
    ("POST", "/device/reprovision"),
];

/// Every workload route, for documentation checks: (methods, path pattern).
pub const WORKLOAD_ROUTES: &[(&str, &str)] = &[
    ("GET", "/modules"),
    ("POST", "/modules/{name}/genid/{genid}/sign"),
    ("POST", "/modules/{name}/genid/{genid}/encrypt"),
    ("POST", "/modules/{name}/genid/{genid}/decrypt"),
    ("POST", "/modules/{name}/certificate/identity"),
    ("POST", "/modules/{name}/genid/{genid}/certificate/server"),
    ("GET", "/trust-bundle"),
    ("GET", "/manifest-trust-bundle"),
];

/// The decoded path segments (each percent-decoded once).
fn segments(path: &str) -> Result<Vec<String>, HttpError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(HttpError::not_found());
    };
    rest.split('/').map(decode_path).collect()
}

/// A `{name}` segment: a leading `/` left after decoding is stripped.
fn name(segment: &str) -> String {
    segment.strip_prefix('/').unwrap_or(segment).to_owned()
}

/// Module actions under `/modules/{name}/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleAction {
    /// `start`.
    Start,
    /// `stop`.
    Stop,
    /// `restart`.
    Restart,
    /// `prepareupdate`.
    PrepareUpdate,
    /// `logs`.
    Logs,
}

enum ManagementRoute {
    Modules,
    Module(String),
    Action(String, ModuleAction),
    Identities,
    Identity(String),
    SystemInfo,
    Resources,
    SupportBundle,
    Reprovision,
}

impl ManagementRoute {
    fn find(path: &str) -> Result<Option<Self>, HttpError> {
        let segments = segments(path)?;
        let parts: Vec<&str> = segments.iter().map(String::as_str).collect();
        Ok(Some(match parts.as_slice() {
            ["modules"] | ["modules", ""] => ManagementRoute::Modules,
            ["modules", module] if !module.is_empty() => ManagementRoute::Module(name(module)),
            ["modules", module, action] if !module.is_empty() => {
                let action = match *action {
                    "start" => ModuleAction::Start,
                    "stop" => ModuleAction::Stop,
                    "restart" => ModuleAction::Restart,
                    "prepareupdate" => ModuleAction::PrepareUpdate,
                    "logs" => ModuleAction::Logs,
                    _ => return Ok(None),
                };
                ManagementRoute::Action(name(module), action)
            }
            ["identities"] | ["identities", ""] => ManagementRoute::Identities,
            ["identities", identity] if !identity.is_empty() => {
                ManagementRoute::Identity(name(identity))
            }
            ["systeminfo"] => ManagementRoute::SystemInfo,
            ["systeminfo", "resources"] => ManagementRoute::Resources,
            ["systeminfo", "supportbundle"] => ManagementRoute::SupportBundle,
            ["device", "reprovision"] => ManagementRoute::Reprovision,
            _ => return Ok(None),
        }))
    }

    fn since(&self) -> usize {
        match self {
            ManagementRoute::Action(_, ModuleAction::PrepareUpdate) => V2019_01_30,
            ManagementRoute::Reprovision => V2019_10_22,
            ManagementRoute::Resources => V2019_11_05,
            ManagementRoute::SupportBundle => V2020_07_07,
            _ => V2018_06_28,
        }
    }

    fn allow(&self) -> &'static str {
        match self {
            ManagementRoute::Modules | ManagementRoute::Identities => "GET, POST",
            ManagementRoute::Module(_) => "GET, PUT, DELETE",
            ManagementRoute::Action(_, ModuleAction::Logs) => "GET",
            ManagementRoute::Action(..) | ManagementRoute::Reprovision => "POST",
            ManagementRoute::Identity(_) => "PUT, DELETE",
            ManagementRoute::SystemInfo
            | ManagementRoute::Resources
            | ManagementRoute::SupportBundle => "GET",
        }
    }
}

/// The management API's request handler.
pub struct ManagementRouter<R, I> {
    edged: Arc<Edged<R, I>>,
}

impl<R, I> std::fmt::Debug for ManagementRouter<R, I> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("ManagementRouter")
    }
}

impl<R: ModuleRuntime, I: IdentityClient> ManagementRouter<R, I> {
    /// A router over the daemon state.
    pub fn new(edged: Arc<Edged<R, I>>) -> Self {
        ManagementRouter { edged }
    }

    async fn dispatch(&self, request: &Request) -> Result<Response, EdgedError> {
        let route = ManagementRoute::find(&request.path)?.ok_or_else(HttpError::not_found)?;
        check_api_version(
            request.query.as_deref(),
            API_VERSIONS,
            VersionRule::Required {
                since: route.since(),
            },
        )?;
        let edged = &self.edged;
        match (route, &request.method) {
            (ManagementRoute::Modules, &Method::GET) => handlers::list_modules(edged).await,
            (ManagementRoute::Modules, &Method::POST) => {
                handlers::create_module(edged, request).await
            }
            (ManagementRoute::Module(name), &Method::GET) => {
                handlers::get_module(edged, &name).await
            }
            (ManagementRoute::Module(name), &Method::PUT) => {
                handlers::update_module(edged, request, &name).await
            }
            (ManagementRoute::Module(name), &Method::DELETE) => {
                handlers::delete_module(edged, request, &name).await
            }
            (ManagementRoute::Action(name, ModuleAction::Logs), &Method::GET) => {
                handlers::module_logs(edged, request, &name).await
            }
            (ManagementRoute::Action(name, ModuleAction::PrepareUpdate), &Method::POST) => {
                handlers::prepare_update(edged, request, &name).await
            }
            (ManagementRoute::Action(name, action), &Method::POST)
                if action != ModuleAction::Logs =>
            {
                handlers::module_action(edged, &name, action).await
            }
            (ManagementRoute::Identities, &Method::GET) => handlers::list_identities(edged).await,
            (ManagementRoute::Identities, &Method::POST) => {
                handlers::create_identity(edged, request).await
            }
            (ManagementRoute::Identity(name), &Method::PUT) => {
                handlers::update_identity(edged, request, &name).await
            }
            (ManagementRoute::Identity(name), &Method::DELETE) => {
                handlers::delete_identity(edged, request, &name).await
            }
            (ManagementRoute::SystemInfo, &Method::GET) => handlers::system_info(edged).await,
            (ManagementRoute::Resources, &Method::GET) => handlers::system_resources(edged).await,
            (ManagementRoute::SupportBundle, &Method::GET) => {
                handlers::support_bundle(edged, request).await
            }
            (ManagementRoute::Reprovision, &Method::POST) => {
                handlers::reprovision(edged, request).await
            }
            (route, _) => Err(HttpError::method_not_allowed(route.allow()).into()),
        }
    }
}

impl<R: ModuleRuntime, I: IdentityClient> http_common::Handler for ManagementRouter<R, I> {
    async fn handle(&self, request: Request) -> Response {
        match self.dispatch(&request).await {
            Ok(response) => response,
            Err(error) => error_response(&error),
        }
    }
}

/// Workload operations under `/modules/{name}/genid/{genid}/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadAction {
    /// `sign`.
    Sign,
    /// `encrypt`.
    Encrypt,
    /// `decrypt`.
    Decrypt,
    /// `certificate/server`.
    ServerCertificate,
}

enum WorkloadRoute {
    Modules,
    GenId(String, String, WorkloadAction),
    IdentityCertificate(String),
    TrustBundle,
    ManifestTrustBundle,
}

impl WorkloadRoute {
    fn find(path: &str) -> Result<Option<Self>, HttpError> {
        let segments = segments(path)?;
        let parts: Vec<&str> = segments.iter().map(String::as_str).collect();
        Ok(Some(match parts.as_slice() {
            ["modules"] | ["modules", ""] => WorkloadRoute::Modules,
            ["modules", module, "genid", gen_id, action] if !module.is_empty() => {
                let action = match *action {
                    "sign" => WorkloadAction::Sign,
                    "encrypt" => WorkloadAction::Encrypt,
                    "decrypt" => WorkloadAction::Decrypt,
                    _ => return Ok(None),
                };
                WorkloadRoute::GenId(name(module), (*gen_id).to_owned(), action)
            }
            ["modules", module, "genid", gen_id, "certificate", "server"] if !module.is_empty() => {
                WorkloadRoute::GenId(
                    name(module),
                    (*gen_id).to_owned(),
                    WorkloadAction::ServerCertificate,
                )
            }
            ["modules", module, "certificate", "identity"] if !module.is_empty() => {
                WorkloadRoute::IdentityCertificate(name(module))
            }
            ["trust-bundle"] => WorkloadRoute::TrustBundle,
            ["manifest-trust-bundle"] => WorkloadRoute::ManifestTrustBundle,
            _ => return Ok(None),
        }))
    }

    fn allow(&self) -> &'static str {
        match self {
            WorkloadRoute::Modules
            | WorkloadRoute::TrustBundle
            | WorkloadRoute::ManifestTrustBundle => "GET",
            WorkloadRoute::GenId(..) | WorkloadRoute::IdentityCertificate(_) => "POST",
        }
    }
}

/// The workload API's request handler (shared socket and every per-module socket).
pub struct WorkloadRouter<R, I> {
    edged: Arc<Edged<R, I>>,
}

impl<R, I> std::fmt::Debug for WorkloadRouter<R, I> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("WorkloadRouter")
    }
}

impl<R: ModuleRuntime, I: IdentityClient> WorkloadRouter<R, I> {
    /// A router over the daemon state.
    pub fn new(edged: Arc<Edged<R, I>>) -> Self {
        WorkloadRouter { edged }
    }

    async fn dispatch(&self, request: &Request) -> Result<Response, EdgedError> {
        let route = WorkloadRoute::find(&request.path)?.ok_or_else(HttpError::not_found)?;
        check_api_version(
            request.query.as_deref(),
            API_VERSIONS,
            VersionRule::Required { since: V2018_06_28 },
        )?;
        let edged = &self.edged;
        match (route, &request.method) {
            (WorkloadRoute::Modules, &Method::GET) => handlers::list_modules(edged).await,
            (WorkloadRoute::GenId(name, gen_id, action), &Method::POST) => {
                handlers::workload_action(edged, request, &name, &gen_id, action).await
            }
            (WorkloadRoute::IdentityCertificate(name), &Method::POST) => {
                handlers::identity_certificate(edged, request, &name).await
            }
            (WorkloadRoute::TrustBundle, &Method::GET) => handlers::trust_bundle(edged).await,
            (WorkloadRoute::ManifestTrustBundle, &Method::GET) => {
                handlers::manifest_trust_bundle(edged).await
            }
            (route, _) => Err(HttpError::method_not_allowed(route.allow()).into()),
        }
    }
}

impl<R: ModuleRuntime, I: IdentityClient> http_common::Handler for WorkloadRouter<R, I> {
    async fn handle(&self, request: Request) -> Response {
        match self.dispatch(&request).await {
            Ok(response) => response,
            Err(error) => error_response(&error),
        }
    }
}
