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
pub mod tpm;

use std::future::Future;
use std::sync::Arc;

use http_common::daemon::ConfigFiles;

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
    let (token, preloaded_pkcs11) = match &config.pkcs11 {
        Some(pkcs11) => open_pkcs11(pkcs11, &config.preloaded_keys).await?,
        None => (None, None),
    };
    let storage = service::Storage {
        file,
        token,
        preloaded: config.preloaded_keys.clone(),
        preloaded_pkcs11,
    };
    KeyService::new(storage, config.principals.clone()).await
}

type TokenStorage = (
    Option<Arc<dyn store::KeyStore>>,
    Option<Arc<dyn service::PreloadedLoader>>,
);

/// Loads the PKCS#11 module, opens and logs in to the base-slot token (if configured) and checks
/// the preloaded `pkcs11:` URIs. Errors name the library, slot, token or key, never the PIN.
async fn open_pkcs11(
    pkcs11: &config::Pkcs11Config,
    preloaded: &std::collections::BTreeMap<String, String>,
) -> Result<TokenStorage, KeyError> {
    let startup_error = |message: String| KeyError::Store(store::StoreError::Token(message));
    for (id, uri) in preloaded {
        if uri.starts_with("pkcs11:") {
            store::pkcs11::Pkcs11Preloaded::check_uri(uri).map_err(|reason| {
                startup_error(format!(
                    "preloaded key {id:?} has an invalid pkcs11: URI: {reason}"
                ))
            })?;
        }
    }
    let pkcs11 = pkcs11.clone();
    tokio::task::spawn_blocking(move || -> Result<TokenStorage, KeyError> {
        let module = pkcs11_sys::Module::open(&pkcs11.lib_path)
            .map_err(|error| startup_error(format!("pkcs11_lib_path: {error}")))?;
        let token = match &pkcs11.base_slot {
            Some(base_slot) => {
                let store = store::pkcs11::Pkcs11Store::open(&module, base_slot)
                    .map_err(|error| startup_error(format!("pkcs11_base_slot: {error}")))?;
                log::info!(
                    "dynamic keys live in PKCS#11 token {:?} (slot {})",
                    store.token().label(),
                    store.token().slot_id()
                );
                Some(Arc::new(store) as Arc<dyn store::KeyStore>)
            }
            None => None,
        };
        let loader = store::pkcs11::Pkcs11Preloaded::new(module);
        Ok((
            token,
            Some(Arc::new(loader) as Arc<dyn service::PreloadedLoader>),
        ))
    })
    .await
    .map_err(KeyError::Task)?
}

/// The tpmd API's listener and configuration, when keyd serves it.
#[derive(Debug)]
pub struct TpmdListener {
    /// The tpmd configuration.
    pub config: tpm::TpmConfig,
    /// Its socket.
    pub listener: tokio::net::UnixListener,
}

/// Serves keyd on `listener` (and the tpmd API on `tpmd`'s) until `shutdown` resolves. When
/// `config_files` is given, principal changes in the configuration files are picked up without a
/// restart.
pub async fn run(
    config: Config,
    config_files: Option<ConfigFiles>,
    listener: tokio::net::UnixListener,
    tpmd: Option<TpmdListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), KeyError> {
    let service = Arc::new(build_service(&config).await?);
    if let Some(files) = config_files {
        tokio::spawn(watch_principals(files, Arc::clone(&service)));
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tpmd = match tpmd {
        Some(TpmdListener { config, listener }) => {
            let allowed = config.allowed_uids();
            log::info!(
                "serving the TPM service API (TCTI {:?}, authentication key at {:#x}) to uids {allowed:?}",
                config.tcti,
                config.auth_key_handle()
            );
            let options = http_common::ServerOptions {
                max_connections_per_uid: config.max_requests,
                ..http_common::ServerOptions::default()
            };
            let tpm = Arc::new(tpm::Tpm::start(config).map_err(KeyError::TpmThread)?);
            let router = Arc::new(tpm::routes::TpmRouter::new(tpm, allowed));
            let mut stopped = stopped.clone();
            Some(tokio::spawn(http_common::serve(
                listener,
                router,
                options,
                async move {
                    let _ = stopped.wait_for(|stop| *stop).await;
                },
            )))
        }
        None => None,
    };
    let router = Arc::new(routes::Router::new(service));
    http_common::daemon::serve_socket("keyd", listener, router, config.max_requests, async {
        shutdown.await;
        let _ = stop.send(true);
    })
    .await;
    if let Some(tpmd) = tpmd {
        let _ = tpmd.await;
    }
    drop(stopped);
    Ok(())
}

async fn watch_principals(files: ConfigFiles, service: Arc<KeyService>) {
    http_common::daemon::watch_config(files, Config::from_loaded, |config| {
        log::info!("{} principal entries in force", config.principals.len());
        service.set_principals(config.principals);
        std::future::ready(())
    })
    .await;
}
