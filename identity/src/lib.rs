//! identityd, the identity service: provisions the device with Azure IoT Hub (manually
//! configured, or through the Device Provisioning Service), keeps it working offline from a
//! local backup, creates and reconciles IoT Hub module identities for host processes, and tells
//! callers (identified by uid) who they are. Keys stay in keyd and certificates in certd:
//! identityd hands out keyd handles and certd IDs, never key bytes.
//!
//! Request flow: `http-common` server → [`routes::Router`] (the one route table) →
//! `handlers` (parse, shape answers) → [`service::IdentityService`] (authorization,
//! provisioning state, modules, reconciliation) → [`cloud`] (DPS and Hub over HTTPS with
//! rustls, signatures through keyd) and [`state`] (backup files). Nothing below `handlers`
//! sees HTTP server types.

pub mod cloud;
pub mod config;
pub mod error;
mod handlers;
pub mod local;
pub mod renewal;
pub mod routes;
pub mod service;
pub mod state;
pub mod util;

use std::future::Future;
use std::sync::Arc;

use http_common::daemon::ConfigFiles;

pub use config::Config;
pub use error::IdentityError;
pub use service::IdentityService;

/// Builds the service from a validated configuration (opens the state folder, loads the trust
/// store). Provisioning has not started yet.
pub fn build_service(config: &Config) -> Result<IdentityService, IdentityError> {
    let store = state::StateStore::open(&config.homedir)?;
    let keyd = key_api::Client::from_uri(&config.keyd_endpoint)
        .map_err(IdentityError::keyd("connecting"))?;
    let certd = cert_api::Client::from_uri(&config.certd_endpoint)
        .map_err(IdentityError::certd("connecting"))?;
    let roots = cloud::tls::load_roots(&config.cloud_trusted_certs)
        .map_err(|reason| IdentityError::Credentials(format!("cloud_trusted_certs: {reason}")))?;
    let cloud = cloud::CloudClient::new(
        roots,
        config.cloud_timeout,
        config.cloud_retries,
        keyd.clone(),
    );
    Ok(IdentityService::new(
        service::Settings {
            principals: config.principals.clone(),
            provisioning: config.provisioning.clone(),
        },
        service::Fixed {
            hostname: config.hostname.clone(),
            prefer_module_identity_cache: config.prefer_module_identity_cache,
            trust_bundle_cert: config.trust_bundle_cert.clone(),
            localid_domain: config.localid_domain.clone(),
            keyd_uri: config.keyd_endpoint.clone(),
            tpm: key_api::tpm::TpmClient::from_uri(&config.tpmd_endpoint)
                .map_err(IdentityError::tpm("connecting"))?,
        },
        keyd,
        certd,
        cloud,
        store,
    ))
}

/// Serves identityd on `listener` until `shutdown` resolves. The socket answers at once;
/// provisioning runs in the background. When `config_files` is given, principal and
/// provisioning changes are picked up without a restart.
pub async fn run(
    config: Config,
    config_files: Option<ConfigFiles>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), IdentityError> {
    let service = Arc::new(build_service(&config)?);
    service.start();
    if let Some(files) = config_files {
        tokio::spawn(watch_config(files, Arc::clone(&service)));
    }
    let router = Arc::new(routes::Router::new(service));
    http_common::daemon::serve_socket("identityd", listener, router, config.max_requests, shutdown)
        .await;
    Ok(())
}

async fn watch_config(files: ConfigFiles, service: Arc<IdentityService>) {
    http_common::daemon::watch_config(files, Config::from_loaded, |config| {
        log::info!("{} principal entries in force", config.principals.len());
        let service = Arc::clone(&service);
        async move {
            service
                .reload(service::Settings {
                    principals: config.principals,
                    provisioning: config.provisioning,
                })
                .await;
        }
    })
    .await;
}
