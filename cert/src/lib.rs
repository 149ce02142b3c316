//! certd, the certificate service: stores PEM chains under caller-chosen IDs and issues X.509
//! certificates from CSRs, signing every certificate through keyd (it never holds a private
//! key).
//!
//! Request flow: `http-common` server → [`routes::Router`] (the one route table) →
//! [`handlers`] (parse, shape answers) → [`service::CertService`] (authorization, preloaded
//! certs, issuance rules, per-ID write ordering) → [`issuance`] (X.509 building, pure) and
//! [`keys`] (keyd through one shared `key_api::Client`) → [`store::CertStore`]
//! implementations. Nothing below `handlers` sees HTTP types.

pub mod config;
pub mod error;
pub mod est;
mod handlers;
pub mod issuance;
pub mod keys;
pub mod pem;
pub mod routes;
pub mod service;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use http_common::daemon::ConfigFiles;

pub use config::Config;
pub use error::CertError;
pub use service::CertService;

/// Builds the service from a validated configuration (opens the file store).
pub async fn build_service(config: &Config) -> Result<CertService, CertError> {
    let homedir = config.homedir.clone();
    let store = tokio::task::spawn_blocking(move || store::file::FileStore::open(&homedir))
        .await
        .map_err(CertError::Task)??;
    let keyd =
        key_api::Client::from_uri(&config.keyd_endpoint).map_err(|source| CertError::Keyd {
            step: "connecting",
            source,
        })?;
    Ok(
        CertService::new(Arc::new(store), config.policy.clone(), keyd)
            .with_keyd_uri(&config.keyd_endpoint),
    )
}

/// Serves certd on `listener` until `shutdown` resolves. When `config_files` is given, changes
/// to principals, `cert_issuance` and `preloaded_certs` are picked up without a restart.
pub async fn run(
    config: Config,
    config_files: Option<ConfigFiles>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CertError> {
    let service = Arc::new(build_service(&config).await?);
    tokio::spawn(Arc::clone(&service).run_est_renewal());
    if let Some(files) = config_files {
        tokio::spawn(watch_policy(files, Arc::clone(&service)));
    }
    let router = Arc::new(routes::Router::new(service));
    http_common::daemon::serve_socket("certd", listener, router, config.max_requests, shutdown)
        .await;
    Ok(())
}

async fn watch_policy(files: ConfigFiles, service: Arc<CertService>) {
    http_common::daemon::watch_config(files, Config::from_loaded, |config| {
        log::info!(
            "{} principal entries, {} issuance entries, {} preloaded certs in force",
            config.policy.principals.len(),
            config.policy.issuance.len(),
            config.policy.preloaded.len()
        );
        service.set_policy(config.policy);
        std::future::ready(())
    })
    .await;
}
