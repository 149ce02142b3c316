//! The `iotedge` binary: argument parsing and output. The work is in the library.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use iotedge::{apply, check, edge, super_config, system, users, DEFAULT_SUPER_CONFIG};

/// Operate an Azure IoT Edge compatible device: configuration, checks, services and modules.
#[derive(Debug, Parser)]
#[command(name = "iotedge", version)]
struct Cli {
    /// edged's management socket.
    #[arg(short = 'H', long, global = true, env = "IOTEDGE_HOST", default_value = iotedge::DEFAULT_MGMT_URI)]
    host: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Manage the super-config and the daemons' configs generated from it.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check the configuration and the daemons.
    Check(CheckArgs),
    /// Manage the system services.
    #[command(subcommand)]
    System(SystemCommand),
    /// List the modules.
    List,
    /// Show a module's logs.
    Logs(LogsArgs),
    /// Restart a module.
    Restart {
        /// The module.
        module: String,
    },
    /// Show the version.
    Version,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Write every daemon's config.d/00-super.toml from the super-config and restart them.
    Apply(ApplyArgs),
    /// Write a minimal super-config for manual provisioning with a connection string.
    Mp(MpArgs),
}

#[derive(Debug, clap::Args)]
struct ApplyArgs {
    /// The super-config.
    #[arg(short = 'c', long = "config-file", default_value = DEFAULT_SUPER_CONFIG)]
    config_file: PathBuf,
    /// Write under this folder instead of / (DIR/etc/aziot/..., DIR/var/secrets/...); no root
    /// needed, no restart.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Use this uid for a service user in principals (NAME=UID, repeatable), e.g. when the
    /// user does not exist on the machine building an image.
    #[arg(long = "uid", value_name = "NAME=UID", value_parser = parse_uid)]
    uids: Vec<(String, u32)>,
    /// Do not restart the services after writing.
    #[arg(long)]
    no_restart: bool,
}

#[derive(Debug, clap::Args)]
struct MpArgs {
    /// The device connection string (HostName=...;DeviceId=...;SharedAccessKey=...).
    #[arg(short = 'c', long)]
    connection_string: String,
    /// Where to write the super-config.
    #[arg(short = 'o', long = "out-config", default_value = DEFAULT_SUPER_CONFIG)]
    out_config: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
    /// Also write IoT Edge's default [agent] so that `config apply` configures edged.
    #[arg(long)]
    edge: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// The super-config.
    #[arg(short = 'c', long = "config-file", default_value = DEFAULT_SUPER_CONFIG)]
    config_file: PathBuf,
    /// Where the daemons' configs live (as for `config apply --root`).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: OutputFormat,
    /// Exit non-zero on warnings too.
    #[arg(long)]
    warnings_as_errors: bool,
    /// Service-user uids (NAME=UID) for the up-to-date comparison.
    #[arg(long = "uid", value_name = "NAME=UID", value_parser = parse_uid)]
    uids: Vec<(String, u32)>,
    /// keyd's socket (default: keyd's configured endpoint).
    #[arg(long, env = "AZIOT_KEYD_URI")]
    keyd_uri: Option<String>,
    /// certd's socket (default: certd's configured endpoint).
    #[arg(long, env = "AZIOT_CERTD_URI")]
    certd_uri: Option<String>,
    /// identityd's socket (default: identityd's configured endpoint).
    #[arg(long, env = "AZIOT_IDENTITYD_URI")]
    identityd_uri: Option<String>,
    /// Seconds to wait for each daemon.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

#[derive(Debug, Subcommand)]
enum SystemCommand {
    /// Show the state of every unit.
    Status,
    /// Show the daemons' journal; arguments after `--` go to journalctl.
    Logs {
        /// Extra journalctl arguments.
        #[arg(last = true)]
        journalctl: Vec<String>,
    },
    /// Restart the services in dependency order.
    Restart,
    /// Stop the services and, with them, their sockets (`system restart` brings all back).
    Stop,
    /// Ask identityd to provision the device again.
    Reprovision {
        /// identityd's socket.
        #[arg(long, env = "AZIOT_IDENTITYD_URI", default_value = iotedge::DEFAULT_IDENTITYD_URI)]
        identityd_uri: String,
    },
    /// Set AZIOT_LOG for every service through a systemd drop-in (restart to apply).
    SetLogLevel {
        /// error, warn, info, debug or trace.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(system::LOG_LEVELS))]
        level: String,
        /// Write under this folder instead of /.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct LogsArgs {
    /// The module.
    module: String,
    /// Only the last N lines ("all" for every line).
    #[arg(long)]
    tail: Option<String>,
    /// Only lines since (RFC 3339, Unix seconds, or a duration such as 10m or "1 day").
    #[arg(long)]
    since: Option<String>,
    /// Only lines until (same forms as --since).
    #[arg(long)]
    until: Option<String>,
    /// Keep streaming new lines.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Show timestamps.
    #[arg(short = 't', long)]
    timestamps: bool,
}

fn parse_uid(text: &str) -> Result<(String, u32), String> {
    let (name, uid) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=UID, got {text:?}"))?;
    let uid = uid.parse().map_err(|_| format!("{uid:?} is not a uid"))?;
    Ok((name.to_owned(), uid))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Config(ConfigCommand::Apply(args)) => config_apply(args),
        Command::Config(ConfigCommand::Mp(args)) => {
            apply::write_minimal(
                &args.connection_string,
                &args.out_config,
                args.force,
                args.edge,
            )?;
            println!(
                "Wrote {}. Run `iotedge config apply -c {}` to configure the daemons.",
                args.out_config.display(),
                args.out_config.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => {
            let options = check::CheckOptions {
                super_config: args.config_file,
                root: args.root,
                uids: users::UidResolver::new(args.uids.into_iter().collect()),
                keyd_uri: args.keyd_uri,
                certd_uri: args.certd_uri,
                identityd_uri: args.identityd_uri,
                mgmt_uri: Some(cli.host),
                timeout: Duration::from_secs(args.timeout),
            };
            let report = check::run(&options);
            match args.output {
                OutputFormat::Text => print!("{}", report.text()),
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(if report.failed(args.warnings_as_errors) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::System(command) => system_command(command),
        Command::List => {
            let modules = edge::list(&cli.host, std::time::Duration::from_secs(30))?;
            print!("{}", edge::format_list(&modules));
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs(args) => {
            let options = edge::LogOptions {
                tail: args.tail,
                since: args.since,
                until: args.until,
                follow: args.follow,
                timestamps: args.timestamps,
            };
            edge::logs(&cli.host, &args.module, &options)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Restart { module } => {
            edge::restart(&cli.host, &module)?;
            println!("{module}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("iotedge {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn config_apply(args: ApplyArgs) -> anyhow::Result<ExitCode> {
    if args.root.is_none() && !users::is_root() {
        return Err(iotedge::ApplyError::NotRoot.into());
    }
    let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let text =
        std::fs::read_to_string(&args.config_file).map_err(|source| iotedge::ApplyError::Read {
            path: args.config_file.clone(),
            source,
        })?;
    let overrides: BTreeMap<String, u32> = args.uids.into_iter().collect();
    let plan = super_config::plan(
        &text,
        &args.config_file,
        &users::UidResolver::new(overrides),
    )?;
    for warning in &plan.warnings {
        eprintln!("warning: {warning}");
    }
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(metadata) = std::fs::metadata(&args.config_file) {
            if metadata.permissions().mode() & 0o077 != 0 {
                eprintln!(
                    "warning: {} is readable by other users; it may hold keys and passwords \
                     (chmod 0600 it)",
                    args.config_file.display()
                );
            }
        }
    }
    if let Some(note) = apply::guard_hostname_change(&plan, &root)? {
        eprintln!("warning: {note}");
    }
    for note in apply::write_plan(&plan, &root)? {
        println!("{note}");
    }
    let edge = plan.edged.is_some();
    if args.root.is_some() || args.no_restart {
        println!("Not restarting the services (--root or --no-restart).");
    } else if system::systemd_running() {
        system::restart(edge)
            .context("the configs were written, but restarting the services failed")?;
        println!("Restarted the services.");
    } else {
        println!(
            "systemd is not running here: restart keyd, certd, identityd{} yourself to apply.",
            if edge { " and edged" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn system_command(command: SystemCommand) -> anyhow::Result<ExitCode> {
    let edge = system::edge_installed(Path::new("/"));
    match command {
        SystemCommand::Status => {
            for (unit, state) in system::status(edge)? {
                println!("{unit:32} {state}");
            }
        }
        SystemCommand::Logs { journalctl } => system::logs(edge, &journalctl)?,
        SystemCommand::Restart => {
            system::restart(edge)?;
            println!("Restarted the services.");
        }
        SystemCommand::Stop => {
            system::stop(edge)?;
            println!("Stopped the services.");
        }
        SystemCommand::Reprovision { identityd_uri } => {
            system::reprovision(&identityd_uri)?;
            println!("Reprovisioned the device.");
        }
        SystemCommand::SetLogLevel { level, root } => {
            let edge = system::edge_installed(&root) || edge;
            for path in system::set_log_level(&root, &level, edge)? {
                println!("wrote {}", path.display());
            }
            println!("Restart the services to apply: iotedge system restart");
        }
    }
    Ok(ExitCode::SUCCESS)
}
