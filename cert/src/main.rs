//! The certd binary. All logic is in the library; start-up is `http_common::daemon::main`.

use std::process::ExitCode;

use http_common::daemon::{self, DaemonInfo, Startup};

const INFO: DaemonInfo = DaemonInfo {
    name: "certd",
    version: env!("CARGO_PKG_VERSION"),
    config_env: "AZIOT_CERTD_CONFIG",
    config_dir_env: "AZIOT_CERTD_CONFIG_DIR",
    default_config: certd::config::DEFAULT_CONFIG_FILE,
    default_config_dir: certd::config::DEFAULT_CONFIG_DIR,
    runtime: daemon::multi_thread_runtime,
};

fn main() -> ExitCode {
    daemon::main(
        &INFO,
        certd::Config::from_loaded,
        |config, startup: Startup| async move {
            let listener = daemon::open_listener(&config.endpoint, &startup.systemd)?;
            let shutdown = http_common::server::shutdown_signal();
            certd::run(config, Some(startup.config_files), listener, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        },
    )
}
