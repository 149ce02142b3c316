//! The library behind the `iotedge` command line.
//!
//! - [`super_config`]: the super-config `/etc/aziot/config.toml`, parsed strictly and validated
//!   (errors name the key), then mapped to one drop-in per daemon (keyd, certd, identityd and,
//!   with IoT Edge keys present, edged) plus the secret files it needs.
//! - [`apply`]: writes that plan atomically with least-privilege owners, and `config mp`.
//! - [`users`]: service-user lookup and ownership.
//! - [`check`]: configuration and connectivity checks with stable IDs (text and JSON).
//! - [`system`]: systemd wrappers (`status`, `logs`, `restart`, `set-log-level`) and reprovision.
//! - [`edge`]: the module commands against edged's management API.
//!
//! Every socket is reached through `http_common::UdsClient` on a small current-thread runtime.
//! Nothing in this library prints secrets: connection strings, keys, PINs and passwords only
//! ever go into 0600 files.

pub mod apply;
pub mod check;
pub mod edge;
pub mod error;
pub mod pkcs11_uri;
pub mod super_config;
pub mod system;
pub mod users;

pub use error::{ApplyError, DaemonError, Problem, SystemError};

/// The default super-config.
pub const DEFAULT_SUPER_CONFIG: &str = "/etc/aziot/config.toml";
/// The default management socket of edged.
pub const DEFAULT_MGMT_URI: &str = "unix:///var/run/iotedge/mgmt.sock";
/// identityd's default socket.
pub const DEFAULT_IDENTITYD_URI: &str = "unix:///run/aziot/identityd.sock";
/// keyd's default socket.
pub const DEFAULT_KEYD_URI: &str = "unix:///run/aziot/keyd.sock";
/// certd's default socket.
pub const DEFAULT_CERTD_URI: &str = "unix:///run/aziot/certd.sock";

/// Runs `future` to completion on a small current-thread runtime (the CLI is blocking).
pub fn block_on<F: std::future::Future>(future: F) -> Result<F::Output, DaemonError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    Ok(runtime.block_on(future))
}

/// A client for `uri` (`unix:///abs/path`).
pub fn client(
    uri: &str,
    timeout: std::time::Duration,
) -> Result<http_common::UdsClient, DaemonError> {
    http_common::UdsClient::from_uri(uri)
        .map(|client| client.with_timeout(timeout))
        .map_err(|_| DaemonError::Endpoint(uri.to_owned()))
}
