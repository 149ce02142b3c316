//! The module runtime boundary: [`ModuleRuntime`] is everything edged asks of the thing that runs
//! modules. [`docker::DockerRuntime`] implements it on the Moby Engine API (the default);
//! [`process::ProcessRuntime`] runs modules as supervised host processes (spec section 10,
//! `agent.type = "process"`).
//!
//! The service layer (per-module ordering, workload listeners, identities, image ledger) sits
//! above this trait and never sees Docker types.

pub mod docker;
pub mod process;

use std::future::Future;
use std::time::Duration;

use crate::error::EdgedError;
use crate::model::{ModuleDetails, ModuleSpec, Settings};

/// The `GET /modules/{name}/logs` query, validated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep streaming.
    pub follow: bool,
    /// `all` or a line count.
    pub tail: Option<String>,
    /// Unix seconds.
    pub since: Option<i64>,
    /// Unix seconds.
    pub until: Option<i64>,
    /// Prefix lines with timestamps.
    pub timestamps: bool,
}

/// A module's state as the watchdog needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleState {
    /// Running.
    Running,
    /// Created, exited, paused, restarting.
    Stopped,
    /// Exited with a non-zero code.
    Failed,
    /// Dead.
    Dead,
    /// Anything else.
    Unknown,
}

impl ModuleState {
    /// Parses the `runtimeStatus.status` text.
    pub fn from_status(status: &str) -> Self {
        match status {
            "running" => ModuleState::Running,
            "stopped" => ModuleState::Stopped,
            "failed" => ModuleState::Failed,
            "dead" => ModuleState::Dead,
            _ => ModuleState::Unknown,
        }
    }
}

/// What edged needs from a module runtime. Every method is safe to call concurrently; the
/// runtime holds no lock across its own I/O.
pub trait ModuleRuntime: Send + Sync + 'static {
    /// Checks a spec without side effects (400 for invalid settings).
    fn validate(&self, spec: &ModuleSpec) -> Result<(), EdgedError>;

    /// Fetches the module's image (with its registry credentials); returns the image ID when known.
    fn pull(
        &self,
        settings: &Settings,
    ) -> impl Future<Output = Result<Option<String>, EdgedError>> + Send;

    /// Creates the module (not started); returns its runtime ID.
    fn create(&self, spec: &ModuleSpec) -> impl Future<Output = Result<String, EdgedError>> + Send;

    /// One module.
    fn get(&self, name: &str) -> impl Future<Output = Result<ModuleDetails, EdgedError>> + Send;

    /// Every module.
    fn list(&self) -> impl Future<Output = Result<Vec<ModuleDetails>, EdgedError>> + Send;

    /// Starts a module (success when it already runs).
    fn start(&self, name: &str) -> impl Future<Output = Result<(), EdgedError>> + Send;

    /// Stops a module (success when already stopped); `None` = the runtime's default grace.
    fn stop(
        &self,
        name: &str,
        grace: Option<Duration>,
    ) -> impl Future<Output = Result<(), EdgedError>> + Send;

    /// Restarts a module.
    fn restart(&self, name: &str) -> impl Future<Output = Result<(), EdgedError>> + Send;

    /// Removes a module (forcefully, keeping volumes); returns its image ID.
    fn remove(&self, name: &str) -> impl Future<Output = Result<String, EdgedError>> + Send;

    /// The module's log stream in Docker's 8-byte framed format.
    fn logs(
        &self,
        name: &str,
        options: &LogOptions,
    ) -> impl Future<Output = Result<http_common::Body, EdgedError>> + Send;

    /// Whether host process `pid` belongs to module `name`.
    fn contains_process(
        &self,
        name: &str,
        pid: i32,
    ) -> impl Future<Output = Result<bool, EdgedError>> + Send;

    /// Resource statistics of one module (Docker's stats object).
    fn stats(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<serde_json::Value, EdgedError>> + Send;

    /// The runtime's version text.
    fn version(&self) -> impl Future<Output = Result<String, EdgedError>> + Send;

    /// One-time setup at startup (the module network).
    fn prepare(&self) -> impl Future<Output = Result<(), EdgedError>> + Send;

    /// The ID of a local image, `None` when absent.
    fn image_id(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<String>, EdgedError>> + Send;

    /// Removes an image.
    fn remove_image(&self, id: &str) -> impl Future<Output = Result<(), EdgedError>> + Send;

    /// The runtime's full description of a module (`docker inspect`), for support bundles.
    fn inspect(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<serde_json::Value, EdgedError>> + Send;

    /// The module network's name and description, for support bundles.
    fn network_info(
        &self,
    ) -> impl Future<Output = Result<Option<(String, serde_json::Value)>, EdgedError>> + Send;

    /// Resolves when module `name` is removed from the runtime (by anyone). Errors when the
    /// runtime cannot report removals (the caller retries later).
    fn wait_removed(&self, name: &str) -> impl Future<Output = Result<(), EdgedError>> + Send;

    /// Whether running modules stay valid when edged restarts, so edged neither stops them at
    /// shutdown nor at startup (host processes reach their workload socket by path; a
    /// container's bind mount pins the old socket, which only systemd's fd store keeps).
    fn keeps_modules_across_restarts(&self) -> bool {
        false
    }
}
