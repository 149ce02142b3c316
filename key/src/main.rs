//! The keyd binary. All logic is in the library; start-up is `http_common::daemon::main`.
//!
//! keyd also serves the TPM service API (the reference's aziot-tpmd) when a tpmd configuration
//! exists (`/etc/aziot/tpmd/config.toml`, its `config.d/`, or `AZIOT_TPMD_CONFIG` /
//! `AZIOT_TPMD_CONFIG_DIR`) or systemd passes the `aziot-tpmd.socket` fd.

use std::process::ExitCode;

use http_common::daemon::{self, DaemonInfo, Startup};
use http_common::listener::{listen, ListenerUri};
use keyd::tpm::{config::SOCKET_UNIT, TpmConfig};

const INFO: DaemonInfo = DaemonInfo {
    name: "keyd",
    version: env!("CARGO_PKG_VERSION"),
    config_env: "AZIOT_KEYD_CONFIG",
    config_dir_env: "AZIOT_KEYD_CONFIG_DIR",
    default_config: keyd::config::DEFAULT_CONFIG_FILE,
    default_config_dir: keyd::config::DEFAULT_CONFIG_DIR,
    runtime: daemon::multi_thread_runtime,
};

/// keyd's configuration and, when its files exist, tpmd's.
fn load(
    loaded: &config_common::Loaded,
) -> Result<(keyd::Config, Option<TpmConfig>), config_common::ConfigError> {
    let config = keyd::Config::from_loaded(loaded)?;
    Ok((config, tpmd_config()))
}

/// tpmd's configuration when its files exist. A tpmd configuration keyd cannot read or accept
/// disables the TPM service (logged), never keyd: devices without a TPM use keyd too.
fn tpmd_config() -> Option<TpmConfig> {
    let paths = TpmConfig::paths();
    let loaded = match paths.files() {
        Ok(files) if files.is_empty() => return None,
        Ok(_) => config_common::load_table(&paths),
        Err(error) => Err(error),
    };
    match loaded.and_then(|loaded| TpmConfig::from_loaded(&loaded)) {
        Ok(config) => Some(config),
        Err(error) => {
            log::error!("the TPM service is off: invalid tpmd configuration: {error}");
            None
        }
    }
}

fn main() -> ExitCode {
    // tpm2-tss writes its own error lines to stderr (an absent EK at first use, say, is an
    // "error" to it); keyd reports every TPM failure itself, with the TPM's response code.
    // An operator's own TSS2_LOG wins. Set before any thread exists.
    if std::env::var_os("TSS2_LOG").is_none() {
        std::env::set_var("TSS2_LOG", "all+none");
    }
    daemon::main(
        &INFO,
        load,
        |(config, tpmd): (keyd::Config, Option<TpmConfig>), startup: Startup| async move {
            let listener = daemon::open_listener(&config.endpoint, &startup.systemd)?;
            let passed = startup
                .systemd
                .names()
                .iter()
                .any(|name| name == SOCKET_UNIT);
            let tpmd = match tpmd {
                Some(tpmd) => Some(tpmd),
                None if passed => Some(TpmConfig::from_loaded(&config_common::Loaded::default())?),
                None => None,
            };
            let tpmd = match tpmd {
                Some(config) => {
                    let uri = ListenerUri::parse(&config.endpoint)?;
                    let listener = listen(&uri, &startup.systemd, Some(SOCKET_UNIT), 0o660)?;
                    Some(keyd::TpmdListener { config, listener })
                }
                None => None,
            };
            let shutdown = http_common::server::shutdown_signal();
            keyd::run(config, Some(startup.config_files), listener, tpmd, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        },
    )
}
