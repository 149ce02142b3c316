//! keyd, the key service: stores keys in files or a PKCS#11 token and performs sign, encrypt,
//! decrypt and derive for callers holding an opaque, unforgeable key handle.
//!
//! Request flow: `http-common` server → [`routes::Router`] (the one route table) →
//! [`handlers`] (parse, decode) → [`service::KeyService`] (authorization, resolution, cache,
//! handles) → [`store::KeyStore`] implementations. Only `service` and below touch keys; nothing
//! below `handlers` sees HTTP types.

pub mod config;
pub mod crypto;
pub mod error;
pub mod handle;
mod handlers;
pub mod routes;
pub mod service;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use config_common::ConfigPaths;

pub use config::Config;
pub use error::KeyError;
pub use service::KeyService;

/// Builds the service from a validated configuration (opens storage, loads or creates the handle
/// validation key).
pub async fn build_service(config: &Config) -> Result<KeyService, KeyError> {
    let file = match &config.homedir {
        Some(homedir) => {
            let homedir = homedir.clone();
            let store = tokio::task::spawn_blocking(move || store::file::FileStore::open(&homedir))
                .await
                .map_err(KeyError::Task)??;
            Some(Arc::new(store))
        }
        None => None,
    };
    if config.pkcs11.is_some() {
        return Err(KeyError::Store(store::StoreError::NotSupported(
            "PKCS#11 key storage is not available in this build".to_owned(),
        )));
    }
    let storage = service::Storage {
        file,
        token: None,
        preloaded: config.preloaded_keys.clone(),
        preloaded_pkcs11: None,
    };
    KeyService::new(storage, config.principals.clone()).await
}

/// Serves keyd on `listener` until `shutdown` resolves. When `config_paths` is given, principal
/// changes in the configuration files are picked up without a restart.
pub async fn run(
    config: Config,
    config_paths: Option<ConfigPaths>,
    listener: tokio::net::UnixListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), KeyError> {
    let service = Arc::new(build_service(&config).await?);
    if let Some(paths) = config_paths {
        tokio::spawn(watch_principals(paths, Arc::clone(&service)));
    }
    let options = http_common::ServerOptions {
        max_connections_per_uid: config.max_requests,
        ..http_common::ServerOptions::default()
    };
    http_common::server::notify_ready();
    log::info!("keyd is serving");
    http_common::serve(
        listener,
        Arc::new(routes::Router::new(service)),
        options,
        shutdown,
    )
    .await;
    Ok(())
}

/// How often the configuration files are checked for changes.
const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(5);

async fn watch_principals(paths: ConfigPaths, service: Arc<KeyService>) {
    let mut fingerprint = paths.fingerprint();
    loop {
        tokio::time::sleep(CONFIG_POLL_INTERVAL).await;
        let current = paths.fingerprint();
        if current == fingerprint {
            continue;
        }
        fingerprint = current;
        let reloaded =
            config_common::load_table(&paths).and_then(|loaded| Config::from_loaded(&loaded));
        match reloaded {
            Ok(config) => {
                log::info!(
                    "configuration changed; {} principal entries in force",
                    config.principals.len()
                );
                service.set_principals(config.principals);
            }
            Err(error) => {
                log::warn!("configuration changed but is invalid, keeping the old one: {error}")
            }
        }
    }
}
