//! The identityd binary: arguments, logging, configuration, listener, runtime. All logic is in
//! the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use config_common::{ConfigPaths, EXIT_CODE_INVALID_CONFIG};
use http_common::listener::{listen, ListenerUri, SystemdFds};

const USAGE: &str = "usage: identityd [--config FILE] [--config-dir DIR]\n\
  Config defaults to /etc/aziot/identityd/config.toml and /etc/aziot/identityd/config.d,\n\
  or AZIOT_IDENTITYD_CONFIG / AZIOT_IDENTITYD_CONFIG_DIR.";

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
                println!("identityd {}", env!("CARGO_PKG_VERSION"));
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
        "AZIOT_IDENTITYD_CONFIG",
        "AZIOT_IDENTITYD_CONFIG_DIR",
        identityd::config::DEFAULT_CONFIG_FILE,
        identityd::config::DEFAULT_CONFIG_DIR,
    );
    let config = match config_common::load_table(&paths)
        .and_then(|loaded| identityd::Config::from_loaded(&loaded))
    {
        Ok(config) => config,
        Err(error) => {
            log::error!("invalid configuration: {error}");
            return exit_code(EXIT_CODE_INVALID_CONFIG);
        }
    };
    if let Err(error) = ListenerUri::parse(&config.endpoint) {
        log::error!("invalid configuration: [endpoints] aziot_identityd: {error}");
        return exit_code(EXIT_CODE_INVALID_CONFIG);
    }
    for (key, uri) in [
        ("aziot_keyd", &config.keyd_endpoint),
        ("aziot_certd", &config.certd_endpoint),
    ] {
        if let Err(error) = http_common::UdsClient::from_uri(uri) {
            log::error!("invalid configuration: [endpoints] {key}: {error}");
            return exit_code(EXIT_CODE_INVALID_CONFIG);
        }
    }
    for path in &config.cloud_trusted_certs {
        if let Err(error) = std::fs::metadata(path) {
            log::error!(
                "invalid configuration: cloud_trusted_certs: cannot read {}: {error}",
                path.display()
            );
            return exit_code(EXIT_CODE_INVALID_CONFIG);
        }
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
            log::error!("identityd failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn serve(config: identityd::Config, paths: ConfigPaths, systemd: SystemdFds) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(async {
        let uri =
            ListenerUri::parse(&config.endpoint).context("invalid [endpoints] aziot_identityd")?;
        let listener =
            listen(&uri, &systemd, None, 0o660).context("could not open identityd's socket")?;
        identityd::run(
            config,
            Some(paths),
            listener,
            http_common::server::shutdown_signal(),
        )
        .await
        .map_err(|error| anyhow::anyhow!(http_common::error::error_chain(&error)))
    })
}
