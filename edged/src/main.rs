//! The edged binary. All logic is in the library; start-up is `http_common::daemon::main`.
//! Exit codes: 0 after SIGTERM/SIGINT, 153 for an invalid configuration, 154 after a
//! reprovision ("restart me"), 1 when the watchdog gave up or anything else failed.

use std::process::ExitCode;

use http_common::daemon::{self, DaemonInfo, Startup};

/// Exit code after a reprovision: "restart me".
const EXIT_CODE_REPROVISIONED: u8 = 154;

const INFO: DaemonInfo = DaemonInfo {
    name: "edged",
    version: env!("CARGO_PKG_VERSION"),
    config_env: "AZIOT_EDGED_CONFIG",
    config_dir_env: "AZIOT_EDGED_CONFIG_DIR",
    default_config: edged::config::DEFAULT_CONFIG_FILE,
    default_config_dir: edged::config::DEFAULT_CONFIG_DIR,
    runtime: daemon::multi_thread_runtime,
};

fn main() -> ExitCode {
    // A process module's supervisor is this binary in another mode (runtime/process/shim.rs).
    let mut arguments = std::env::args_os().skip(1);
    if arguments.next().as_deref()
        == Some(std::ffi::OsStr::new(
            edged::runtime::process::shim::SHIM_ARGUMENT,
        ))
    {
        return match arguments.next() {
            Some(folder) => edged::runtime::process::shim::main(std::path::Path::new(&folder)),
            None => ExitCode::FAILURE,
        };
    }
    daemon::main(
        &INFO,
        edged::Config::from_loaded,
        |config, startup: Startup| async move {
            let passed_fd_names = startup.systemd.names();
            let shutdown = http_common::server::shutdown_signal();
            let reason = edged::run(config, startup.systemd, passed_fd_names, shutdown).await?;
            Ok(match reason {
                edged::ExitReason::Signal => ExitCode::SUCCESS,
                edged::ExitReason::Reprovision => ExitCode::from(EXIT_CODE_REPROVISIONED),
                edged::ExitReason::WatchdogFailed => ExitCode::FAILURE,
            })
        },
    )
}
