//! `cloud-emulator` binary: starts the DPS + IoT Hub emulator, prints one JSON line with its
//! addresses when ready, and serves until SIGTERM or SIGINT.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::{bail, Context as _};
use cloud_emulator::Config;

const USAGE: &str = "\
usage: cloud-emulator [--config FILE] [--listen ADDR] [--hub-listen ADDR] [--admin-listen ADDR]
                      [--ca-cert PATH] [--pki-dir DIR] [--hub-hostname NAME] [--id-scope SCOPE]
                      [--server-name NAME]... [--assigning-polls N] [--retry-after SECS]

Flags override the config file. Prints one JSON line when ready:
  {\"https\": \"127.0.0.1:PORT\", \"admin\": \"127.0.0.1:PORT\", \"ca_cert\": \"/path/ca.pem\", ...}
Log level via RUST_LOG (default info, to stderr).";

fn parse_args(args: impl Iterator<Item = String>) -> anyhow::Result<Option<Config>> {
    let mut args = args.peekable();
    let mut config_path: Option<PathBuf> = None;
    let mut overrides: Vec<(String, String)> = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if !flag.starts_with("--") {
            bail!("unexpected argument {arg:?}\n{USAGE}");
        }
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .with_context(|| format!("{flag} needs a value"))?,
        };
        if flag == "--config" {
            config_path = Some(PathBuf::from(value));
        } else {
            overrides.push((flag, value));
        }
    }
    let mut config = match &config_path {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    for (flag, value) in overrides {
        let addr = |v: &str| -> anyhow::Result<SocketAddr> {
            v.parse()
                .with_context(|| format!("{flag}: invalid address {v:?}"))
        };
        match flag.as_str() {
            "--listen" => config.listen = addr(&value)?,
            "--hub-listen" => config.hub_listen = Some(addr(&value)?),
            "--admin-listen" => config.admin_listen = addr(&value)?,
            "--ca-cert" => config.ca_cert_path = Some(PathBuf::from(value)),
            "--pki-dir" => config.pki_dir = Some(PathBuf::from(value)),
            "--hub-hostname" => config.hub_hostname = Some(value),
            "--id-scope" => config.id_scope = value,
            "--server-name" => config.server_names.push(value),
            "--assigning-polls" => {
                config.assigning_polls = value.parse().context("--assigning-polls")?;
            }
            "--retry-after" => {
                config.retry_after_secs = value.parse().context("--retry-after")?;
            }
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    Ok(Some(config))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Stderr)
        .init();
    let Some(config) = parse_args(std::env::args().skip(1))? else {
        println!("{USAGE}");
        return Ok(());
    };
    let emu = cloud_emulator::start(config)
        .await
        .context("starting the cloud emulator")?;
    println!("{}", emu.ready_info());

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received, shutting down"),
        r = tokio::signal::ctrl_c() => {
            r.context("waiting for SIGINT")?;
            log::info!("SIGINT received, shutting down");
        }
    }
    emu.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> impl Iterator<Item = String> {
        s.iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn flags_override_defaults() {
        let c = parse_args(args(&[
            "--listen",
            "127.0.0.1:8443",
            "--hub-hostname=localhost:8443",
            "--assigning-polls",
            "0",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.listen.port(), 8443);
        assert_eq!(c.hub_hostname.as_deref(), Some("localhost:8443"));
        assert_eq!(c.assigning_polls, 0);
        assert!(parse_args(args(&["--bogus", "x"])).is_err());
        assert!(parse_args(args(&["--listen"])).is_err());
        assert!(parse_args(args(&["--help"])).unwrap().is_none());
    }
}
