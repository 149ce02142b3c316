//! The start-up every daemon binary shares: command line, logging, configuration (exit 153 when
//! invalid), systemd socket activation, the async runtime, and the exit code.
//!
//! A daemon's `main` names itself in a [`DaemonInfo`], passes its config validator and its
//! async `serve` function to [`main`], and returns what it returns.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask};

use config_common::{ConfigError, ConfigPaths, Loaded, EXIT_CODE_INVALID_CONFIG};

use crate::listener::{listen, ListenError, ListenerUri, SystemdFds};
use crate::server::DaemonLimits;

/// How a daemon is named and where its configuration lives by default.
#[derive(Clone, Copy, Debug)]
pub struct DaemonInfo {
    /// The binary's name (`keyd`).
    pub name: &'static str,
    /// Its version (`env!("CARGO_PKG_VERSION")`).
    pub version: &'static str,
    /// The environment variable naming the base config file (`AZIOT_KEYD_CONFIG`).
    pub config_env: &'static str,
    /// The environment variable naming the drop-in folder (`AZIOT_KEYD_CONFIG_DIR`).
    pub config_dir_env: &'static str,
    /// The default base config file.
    pub default_config: &'static str,
    /// The default drop-in folder.
    pub default_config_dir: &'static str,
    /// Builds the async runtime: [`multi_thread_runtime`] for daemons that serve load (keyd,
    /// certd, edged), [`current_thread_runtime`] for one that mostly waits (identityd: one
    /// thread fewer and less resident memory, docs/identityd.md "Memory").
    pub runtime: fn() -> std::io::Result<tokio::runtime::Runtime>,
}

/// A multi-thread runtime (one worker per CPU) with at most 32 blocking threads.
pub fn multi_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(32)
        .build()
}

/// A runtime on the daemon's main thread, with at most 32 blocking threads. A daemon on it
/// must not block a task on work that needs another task to progress.
pub fn current_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(32)
        .build()
}

/// The configuration files a daemon read, with a fingerprint of what they held just before it
/// read them: [`watch_config`] starts from that, so a change made while the daemon was still
/// starting (before the watch existed) is applied too.
#[derive(Clone, Debug)]
pub struct ConfigFiles {
    paths: ConfigPaths,
    read: Vec<(PathBuf, Option<u64>)>,
}

impl ConfigFiles {
    /// Takes the fingerprint now; call it before reading the configuration.
    pub fn new(paths: ConfigPaths) -> Self {
        let read = paths.fingerprint();
        ConfigFiles { paths, read }
    }
}

/// What a daemon's `serve` function gets.
#[derive(Debug)]
pub struct Startup {
    /// Where the configuration came from (for reloading).
    pub config_files: ConfigFiles,
    /// The sockets systemd passed, if any.
    pub systemd: SystemdFds,
}

/// A failure after the configuration was accepted: logged with its cause chain, exit code 1.
pub type ServeError = Box<dyn std::error::Error + Send + Sync>;

/// Runs a daemon: parses `--config FILE` / `--config-dir DIR` (else the environment, else the
/// defaults), sets up logging, validates the configuration with `load` (exit 153 on error),
/// reads the connection limits from the environment (exit 153 on a bad value) for every
/// listener's [`crate::ServerOptions::default`], takes
/// the systemd sockets, and runs `serve` on a multi-threaded runtime. `serve` returns the exit
/// code (0, or e.g. edged's 154).
pub fn main<C, Serve, Running>(
    info: &DaemonInfo,
    load: impl FnOnce(&Loaded) -> Result<C, ConfigError>,
    serve: Serve,
) -> ExitCode
where
    Serve: FnOnce(C, Startup) -> Running,
    Running: Future<Output = Result<ExitCode, ServeError>>,
{
    crate::init_logging();
    let paths = match parse_arguments(info) {
        Ok(paths) => paths,
        Err(code) => return code,
    };
    let config_files = ConfigFiles::new(paths.clone());
    let config = match config_common::load_table(&paths).and_then(|loaded| load(&loaded)) {
        Ok(config) => config,
        Err(error) => {
            log::error!("invalid configuration: {error}");
            return invalid_config();
        }
    };
    match connection_limits_from_env() {
        Ok(limits) => {
            if !crate::server::set_daemon_limits(limits) {
                log::warn!("the AZIOT_HTTP_* limits came too late and are not applied");
            }
            warn_if_over_descriptor_limit(&limits);
        }
        Err(error) => {
            log::error!("invalid environment: {error}");
            return invalid_config();
        }
    }
    // Socket activation reads and clears the environment: before any thread starts.
    let unit = format!("aziot-{}.socket", info.name);
    let systemd = match SystemdFds::take().map(|fds| fds.with_unit_name(unit)) {
        Ok(fds) => fds,
        Err(error) => {
            log::error!("{error}");
            return invalid_config();
        }
    };
    let runtime = match (info.runtime)() {
        Ok(runtime) => runtime,
        Err(error) => {
            log::error!(
                "{} failed: could not start the async runtime: {error}",
                info.name
            );
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(serve(
        config,
        Startup {
            config_files,
            systemd,
        },
    ));
    // Do not wait on blocking work still running (a followed log, a slow token call).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(error) => {
            log::error!(
                "{} failed: {}",
                info.name,
                crate::error::error_chain(error.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}

/// The environment variable for [`DaemonLimits::header_timeout`] (whole seconds).
pub const HEADER_TIMEOUT_ENV: &str = "AZIOT_HTTP_HEADER_TIMEOUT_SECS";
/// The environment variable for [`DaemonLimits::idle_timeout`] (whole seconds).
pub const IDLE_TIMEOUT_ENV: &str = "AZIOT_HTTP_IDLE_TIMEOUT_SECS";
/// The environment variable for [`DaemonLimits::max_connections`].
pub const MAX_CONNECTIONS_ENV: &str = "AZIOT_HTTP_MAX_CONNECTIONS";

/// A connection limit in the environment that is not a valid value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}={value:?} is invalid: expected {expected}")]
pub struct LimitsError {
    /// The variable.
    pub variable: &'static str,
    /// What it held.
    pub value: String,
    /// What it must hold.
    pub expected: &'static str,
}

/// Reads the daemon-wide connection limits from [`HEADER_TIMEOUT_ENV`], [`IDLE_TIMEOUT_ENV`]
/// and [`MAX_CONNECTIONS_ENV`]; an unset (or empty) variable keeps the built-in value.
pub fn connection_limits_from_env() -> Result<DaemonLimits, LimitsError> {
    connection_limits_from(|name| std::env::var_os(name))
}

/// [`connection_limits_from_env`] over any variable lookup.
pub fn connection_limits_from(
    lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<DaemonLimits, LimitsError> {
    let number = |variable: &'static str, range: std::ops::RangeInclusive<u64>, expected| {
        let Some(raw) = lookup(variable).filter(|raw| !raw.is_empty()) else {
            return Ok(None);
        };
        let invalid = || LimitsError {
            variable,
            value: raw.to_string_lossy().into_owned(),
            expected,
        };
        let value = raw
            .to_str()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .ok_or_else(invalid)?;
        if range.contains(&value) {
            Ok(Some(value))
        } else {
            Err(invalid())
        }
    };
    let defaults = DaemonLimits::DEFAULT;
    let header_timeout = number(HEADER_TIMEOUT_ENV, 1..=3600, "whole seconds from 1 to 3600")?;
    let idle_timeout = number(IDLE_TIMEOUT_ENV, 1..=86400, "whole seconds from 1 to 86400")?;
    let max_connections = number(
        MAX_CONNECTIONS_ENV,
        1..=1_000_000,
        "a count from 1 to 1000000",
    )?;
    Ok(DaemonLimits {
        header_timeout: header_timeout.map_or(defaults.header_timeout, Duration::from_secs),
        idle_timeout: idle_timeout.map_or(defaults.idle_timeout, Duration::from_secs),
        max_connections: max_connections
            .and_then(|count| usize::try_from(count).ok())
            .unwrap_or(defaults.max_connections),
    })
}

/// Descriptors a daemon needs besides its connections (listeners, files, peers, Docker).
pub const DESCRIPTOR_HEADROOM: u64 = 256;

/// The cap only protects the daemon if it is reached before the descriptor limit is: say so
/// when it is not.
fn warn_if_over_descriptor_limit(limits: &DaemonLimits) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let needed = limits.max_connections as u64 + DESCRIPTOR_HEADROOM;
    if limit.rlim_cur != libc::RLIM_INFINITY && needed > limit.rlim_cur {
        log::warn!(
            "{MAX_CONNECTIONS_ENV} ({}) plus {DESCRIPTOR_HEADROOM} descriptors of headroom exceeds \
             the open-file limit ({}); raise LimitNOFILE or lower the cap",
            limits.max_connections,
            limit.rlim_cur
        );
    }
}

fn invalid_config() -> ExitCode {
    ExitCode::from(u8::try_from(EXIT_CODE_INVALID_CONFIG).unwrap_or(1))
}

fn parse_arguments(info: &DaemonInfo) -> Result<ConfigPaths, ExitCode> {
    let usage = format!(
        "usage: {} [--config FILE] [--config-dir DIR]\n  \
         Config defaults to {} and {},\n  or {} / {}.",
        info.name,
        info.default_config,
        info.default_config_dir,
        info.config_env,
        info.config_dir_env
    );
    let mut config_file: Option<PathBuf> = None;
    let mut config_dir: Option<PathBuf> = None;
    let mut arguments = std::env::args().skip(1);
    while let Some(argument) = arguments.next() {
        match argument.as_str() {
            "--config" | "-c" => config_file = arguments.next().map(PathBuf::from),
            "--config-dir" => config_dir = arguments.next().map(PathBuf::from),
            "--version" => {
                println!("{} {}", info.name, info.version);
                return Err(ExitCode::SUCCESS);
            }
            "--help" | "-h" => {
                println!("{usage}");
                return Err(ExitCode::SUCCESS);
            }
            other => {
                eprintln!("unknown argument {other:?}\n{usage}");
                return Err(ExitCode::from(2));
            }
        }
    }
    Ok(ConfigPaths::resolve(
        config_file,
        config_dir,
        info.config_env,
        info.config_dir_env,
        info.default_config,
        info.default_config_dir,
    ))
}

/// The per-uid connection budget from `max_requests` (default 10, the reference's); 0 is a
/// configuration error naming the key.
pub fn max_requests(loaded: &Loaded, value: Option<usize>) -> Result<usize, ConfigError> {
    match value.unwrap_or(10) {
        0 => Err(ConfigError::invalid(
            loaded,
            "max_requests",
            "must be at least 1",
        )),
        budget => Ok(budget),
    }
}

/// Validates a daemon's own listener URI from `[endpoints] <key>` (default when absent); an
/// invalid URI is a configuration error naming `endpoints.<key>`.
pub fn listener_endpoint(
    loaded: &Loaded,
    key: &str,
    value: Option<String>,
    default: &str,
) -> Result<String, ConfigError> {
    let endpoint = value.unwrap_or_else(|| default.to_owned());
    ListenerUri::parse(&endpoint).map_err(|error| {
        ConfigError::invalid(loaded, format!("endpoints.{key}"), error.to_string())
    })?;
    Ok(endpoint)
}

/// Validates a peer daemon's URI (`unix:///path`) from `[endpoints] <key>`.
pub fn peer_endpoint(
    loaded: &Loaded,
    key: &str,
    value: Option<String>,
    default: &str,
) -> Result<String, ConfigError> {
    let endpoint = value.unwrap_or_else(|| default.to_owned());
    crate::UdsClient::from_uri(&endpoint).map_err(|error| {
        ConfigError::invalid(loaded, format!("endpoints.{key}"), error.to_string())
    })?;
    Ok(endpoint)
}

/// Opens a daemon's one listening socket from its `[endpoints]` URI (mode 0660 when bound here).
/// A `unix://` endpoint also takes the fd of the daemon's socket unit (`aziot-keyd.socket`).
pub fn open_listener(
    endpoint: &str,
    systemd: &SystemdFds,
) -> Result<tokio::net::UnixListener, ListenError> {
    let uri = ListenerUri::parse(endpoint)?;
    listen(&uri, systemd, systemd.unit_name(), 0o660)
}

/// Serves a daemon's one socket: the per-uid connection budget from its `max_requests` (the
/// daemon-wide limits from [`connection_limits_from_env`]), systemd
/// readiness, then requests until `shutdown` resolves and in-flight requests have drained.
pub async fn serve_socket<H: crate::Handler>(
    name: &str,
    listener: tokio::net::UnixListener,
    handler: std::sync::Arc<H>,
    max_requests: usize,
    shutdown: impl Future<Output = ()>,
) {
    let options = crate::ServerOptions {
        max_connections_per_uid: max_requests,
        ..crate::ServerOptions::default()
    };
    crate::server::notify_ready();
    log::info!("{name} is serving");
    // Start-up (config, stores, TLS roots) freed most of what it allocated (crate::memory).
    crate::memory::release_free_heap();
    crate::serve(listener, handler, options, shutdown).await;
}

/// How long the configuration files must stay quiet after a change before it is read (the
/// spec's debounce): a burst of writes (an editor, `iotedge config apply`) is read once, whole.
pub const CONFIG_DEBOUNCE: Duration = Duration::from_secs(10);

/// How often the files are compared when inotify cannot be used (no instances or watches left).
const CONFIG_POLL_FALLBACK: Duration = Duration::from_secs(5);

/// What counts as a change: writes, attribute changes, and files appearing, disappearing or
/// being renamed into place. Opening and reading (access-only events) do not.
fn change_mask() -> WatchMask {
    WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
}

/// Watches the configuration files and calls `apply` with each new valid configuration.
///
/// inotify watches the base file's folder and the drop-in folder (folders, so files replaced
/// by rename are seen); after an event the files must be quiet for [`CONFIG_DEBOUNCE`], then
/// their contents are compared with the last ones read and, if they differ, the merged
/// configuration is loaded. The first comparison is made as soon as the watch exists, against
/// what the daemon read at start ([`ConfigFiles`]). An invalid change is logged and ignored,
/// keeping the configuration in force. Without inotify the files are compared every few seconds
/// instead. Runs until the task is dropped.
pub async fn watch_config<C, Applied: Future<Output = ()>>(
    files: ConfigFiles,
    load: impl Fn(&Loaded) -> Result<C, ConfigError>,
    mut apply: impl FnMut(C) -> Applied,
) {
    let ConfigFiles {
        paths,
        read: mut fingerprint,
    } = files;
    let mut changes = ConfigChanges::new(&paths);
    let mut watching = false;
    loop {
        if watching {
            changes.next(&paths).await;
        }
        watching = true;
        let current = paths.fingerprint();
        if current == fingerprint {
            continue;
        }
        fingerprint = current;
        match config_common::load_table(&paths).and_then(|loaded| load(&loaded)) {
            Ok(config) => {
                log::info!("configuration changed; reloading");
                apply(config).await;
            }
            Err(error) => {
                log::warn!("configuration changed but is invalid, keeping the old one: {error}")
            }
        }
    }
}

/// The source of "the configuration may have changed" moments: inotify, or a timer.
enum ConfigChanges {
    Inotify {
        stream: EventStream<Vec<u8>>,
        /// The drop-in folder's watch, once the folder exists: every event in it counts.
        dropins: Option<WatchDescriptor>,
    },
    Poll,
}

impl ConfigChanges {
    fn new(paths: &ConfigPaths) -> Self {
        match Inotify::init().and_then(|inotify| inotify.into_event_stream(vec![0; 1024])) {
            Ok(stream) => {
                let dropins = add_watches(&stream, paths);
                ConfigChanges::Inotify { stream, dropins }
            }
            Err(error) => {
                log::warn!(
                    "cannot watch the configuration with inotify ({error}); checking it every {} s",
                    CONFIG_POLL_FALLBACK.as_secs()
                );
                ConfigChanges::Poll
            }
        }
    }

    /// Waits for a change to the configuration files, then until they have had no change for
    /// [`CONFIG_DEBOUNCE`]. Events for other files in the same folders are not changes (they
    /// must not postpone a reload forever).
    async fn next(&mut self, paths: &ConfigPaths) {
        let ConfigChanges::Inotify { stream, dropins } = self else {
            tokio::time::sleep(CONFIG_POLL_FALLBACK).await;
            return;
        };
        let mut quiet_at: Option<tokio::time::Instant> = None;
        loop {
            let event = match quiet_at {
                None => stream.next().await,
                Some(deadline) => match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(event) => event,
                    Err(_quiet) => return,
                },
            };
            let Some(Ok(event)) = event else {
                return self.fall_back();
            };
            // After every event, so a drop-in folder that just appeared is watched at once.
            *dropins = add_watches(stream, paths);
            let in_dropins = dropins.as_ref() == Some(&event.wd);
            let names_config = event.name.as_deref().is_some_and(|name| {
                Some(name) == paths.base_file.file_name()
                    || Some(name) == paths.dropin_dir.file_name()
            });
            if in_dropins || names_config || event.mask.contains(EventMask::Q_OVERFLOW) {
                quiet_at = Some(tokio::time::Instant::now() + CONFIG_DEBOUNCE);
            }
        }
    }

    fn fall_back(&mut self) {
        log::warn!(
            "the configuration watch failed; checking the configuration every {} s",
            CONFIG_POLL_FALLBACK.as_secs()
        );
        *self = ConfigChanges::Poll;
    }
}

/// (Re)adds the watches: the base file's folder, the drop-in folder and the drop-in folder's
/// parent (to see the drop-in folder appear). Adding an existing watch changes nothing, so this
/// runs after every event. Returns the drop-in folder's watch if the folder exists.
fn add_watches(stream: &EventStream<Vec<u8>>, paths: &ConfigPaths) -> Option<WatchDescriptor> {
    let parent_or_cwd = |path: &std::path::Path| match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut dropins = None;
    for (folder, is_dropins) in [
        (paths.dropin_dir.clone(), true),
        (parent_or_cwd(&paths.base_file), false),
        (parent_or_cwd(&paths.dropin_dir), false),
    ] {
        match stream.watches().add(&folder, change_mask()) {
            Ok(watch) if is_dropins => dropins = Some(watch),
            Ok(_) => {}
            // A folder that does not exist (yet) is fine: its parent's watch reports it.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => log::warn!("cannot watch {} for changes: {error}", folder.display()),
        }
    }
    dropins
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(pairs: &[(&str, &str)]) -> Result<DaemonLimits, LimitsError> {
        connection_limits_from(|name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.into())
        })
    }

    #[test]
    fn unset_variables_keep_the_defaults_set_ones_apply() {
        assert_eq!(limits(&[]), Ok(DaemonLimits::DEFAULT));
        assert_eq!(
            limits(&[(HEADER_TIMEOUT_ENV, "")]),
            Ok(DaemonLimits::DEFAULT)
        );
        assert_eq!(
            limits(&[
                (HEADER_TIMEOUT_ENV, "3"),
                (IDLE_TIMEOUT_ENV, " 120 "),
                (MAX_CONNECTIONS_ENV, "500"),
            ]),
            Ok(DaemonLimits {
                header_timeout: Duration::from_secs(3),
                idle_timeout: Duration::from_secs(120),
                max_connections: 500,
            })
        );
    }

    #[test]
    fn a_bad_value_is_an_error_naming_the_variable() {
        for (variable, value) in [
            (HEADER_TIMEOUT_ENV, "0"),
            (HEADER_TIMEOUT_ENV, "ten"),
            (HEADER_TIMEOUT_ENV, "1.5"),
            (IDLE_TIMEOUT_ENV, "-1"),
            (IDLE_TIMEOUT_ENV, "100000"),
            (MAX_CONNECTIONS_ENV, "0"),
            (MAX_CONNECTIONS_ENV, "lots"),
        ] {
            let error = limits(&[(variable, value)]).unwrap_err();
            assert_eq!(error.variable, variable);
            let text = error.to_string();
            assert!(
                text.starts_with(&format!("{variable}={value:?} is invalid: expected ")),
                "{text}"
            );
        }
    }
}
