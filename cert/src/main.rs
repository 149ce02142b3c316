//! The certd binary: arguments, logging, configuration, listener, runtime. All logic is in the
//! library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use config_common::{ConfigPaths, EXIT_CODE_INVALID_CONFIG};
use http_common::listener::{listen, ListenerUri, SystemdFds};

const USAGE: &str = "usage: certd [--config FILE] [--config-dir DIR]\n\
  Config defaults to /etc/aziot/certd/config.toml and /etc/aziot/certd/config.d,\n\
  or AZIOT_CERTD_CONFIG / AZIOT_CERTD_CONFIG_DIR.";

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
                println!("certd {}", env!("CARGO_PKG_VERSION"));
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
        "AZIOT_CERTD_CONFIG",
        "AZIOT_CERTD_CONFIG_DIR",
        certd::config::DEFAULT_CONFIG_FILE,
        certd::config::DEFAULT_CONFIG_DIR,
    );
    let config = match config_common::load_table(&paths)
        .and_then(|loaded| certd::Config::from_loaded(&loaded))
    {
        Ok(config) => config,
        Err(error) => {
            log::error!("invalid configuration: {error}");
            return exit_code(EXIT_CODE_INVALID_CONFIG);
        }
    };
    if let Err(error) = ListenerUri::parse(&config.endpoint) {
        log::error!("invalid configuration: [endpoints] aziot_certd: {error}");
        return exit_code(EXIT_CODE_INVALID_CONFIG);
    }
    if let Err(error) = http_common::UdsClient::from_uri(&config.keyd_endpoint) {
        log::error!("invalid configuration: [endpoints] aziot_keyd: {error}");
        return exit_code(EXIT_CODE_INVALID_CONFIG);
    }
    // Socket activation reads and clears the environment: before any thread starts.
    let systemd = match SystemdFds::take() {
        Ok(fds) => fds,
        Err(error) => {
            log::error!("{error}");
            return exit_code(EXIT_CODE_INVALID_CONFIG);
        }
    };
    match serve(config, paths, systemd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            log::error!("certd failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn serve(config: certd::Config, paths: ConfigPaths, systemd: SystemdFds) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(32)
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(async {
        let uri =
            ListenerUri::parse(&config.endpoint).context("invalid [endpoints] aziot_certd")?;
        let listener =
            listen(&uri, &systemd, None, 0o660).context("could not open certd's socket")?;
        certd::run(
            config,
            Some(paths),
            listener,
            http_common::server::shutdown_signal(),
        )
        .await
        .map_err(|error| anyhow::anyhow!(http_common::error::error_chain(&error)))
    })
}
