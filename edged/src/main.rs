//! The edged binary: arguments, logging, configuration, socket activation, runtime, exit codes.
//! All logic is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use config_common::{ConfigPaths, EXIT_CODE_INVALID_CONFIG};
use http_common::listener::SystemdFds;

/// Exit code after a reprovision: "restart me".
const EXIT_CODE_REPROVISIONED: u8 = 154;

const USAGE: &str = "usage: edged [--config FILE] [--config-dir DIR]\n\
  Config defaults to /etc/aziot/edged/config.toml and /etc/aziot/edged/config.d,\n\
  or AZIOT_EDGED_CONFIG / AZIOT_EDGED_CONFIG_DIR.";

fn main() -> ExitCode {
    http_common::init_logging();
    let mut config_file: Option<PathBuf> = None;
    let mut config_dir: Option<PathBuf> = None;
    let mut arguments = std::env::args().skip(1);
    while let Some(argument) = arguments.next() {
        match argument.as_str() {
            "--config" | "-c" => config_file = arguments.next().map(PathBuf::from),
            "--config-dir" => config_dir = arguments.next().map(PathBuf::from),
            "--version" => {
                println!("edged {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let paths = ConfigPaths::resolve(
        config_file,
        config_dir,
        "AZIOT_EDGED_CONFIG",
        "AZIOT_EDGED_CONFIG_DIR",
        edged::config::DEFAULT_CONFIG_FILE,
        edged::config::DEFAULT_CONFIG_DIR,
    );
    let config = match config_common::load_table(&paths)
        .and_then(|loaded| edged::Config::from_loaded(&loaded))
    {
        Ok(config) => config,
        Err(error) => {
            log::error!("invalid configuration: {error}");
            return ExitCode::from(u8::try_from(EXIT_CODE_INVALID_CONFIG).unwrap_or(1));
        }
    };
    // Socket activation reads and clears the environment: before any thread starts.
    let passed_fd_names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|names| names.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let systemd = match SystemdFds::take() {
        Ok(fds) => fds,
        Err(error) => {
            log::error!("{error}");
            return ExitCode::from(u8::try_from(EXIT_CODE_INVALID_CONFIG).unwrap_or(1));
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            log::error!("could not start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let passed_fd_names = if systemd.is_empty() {
        Vec::new()
    } else {
        passed_fd_names
    };
    let result = runtime.block_on(edged::run(
        config,
        systemd,
        passed_fd_names,
        http_common::server::shutdown_signal(),
    ));
    // Background tasks (log streams, pending Docker calls) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(edged::ExitReason::Signal) => ExitCode::SUCCESS,
        Ok(edged::ExitReason::Reprovision) => ExitCode::from(EXIT_CODE_REPROVISIONED),
        Ok(edged::ExitReason::WatchdogFailed) => ExitCode::FAILURE,
        Err(error) => {
            log::error!("edged failed: {}", http_common::error::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
