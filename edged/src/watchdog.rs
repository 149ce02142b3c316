//! The edgeAgent bootstrap and watchdog (spec sections 6.2 and 8.3), and the image garbage
//! collection loop.
//!
//! Every 60 s (first run at once), and right after the runtime reports that the agent's
//! container was removed, the agent is inspected: running → nothing; stopped or failed → start;
//! dead or unknown → remove and re-create; absent → create (pull per policy, fresh generation ID)
//! and start. The failure counter resets after a successful run; reaching `max_retries` ends the
//! daemon with exit code 1.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::config::{Config, PullPolicy, RuntimeKind};
use crate::error::EdgedError;
use crate::identity::{DeviceIdentity, IdentityClient};
use crate::model::{EnvVar, ModuleConfig, ModuleSpec, Settings, CREATE_OPTIONS_LABEL, ENV_LABEL};
use crate::runtime::{ModuleRuntime, ModuleState};
use crate::service::{Edged, ExitReason};

/// Time between watchdog runs.
pub const WATCHDOG_INTERVAL: Duration = Duration::from_secs(60);

/// The agent's module ID in IoT Hub.
pub const AGENT_MODULE_ID: &str = "$edgeAgent";

/// The api-version the agent is told to use.
pub const AGENT_API_VERSION: &str = "2022-08-03";

fn replace_upstream(value: &str, gateway_host: &str) -> String {
    match value.strip_prefix("$upstream") {
        Some(rest) => format!("{gateway_host}{rest}"),
        None => value.to_owned(),
    }
}

/// Builds the agent's module spec from `[agent]` (spec section 6.2).
pub fn agent_spec(
    config: &Config,
    device: &DeviceIdentity,
    gen_id: &str,
    homedir: &Path,
) -> ModuleSpec {
    let agent = &config.agent;
    let mut create_options = match &agent.create_options {
        Value::Object(object) => object.clone(),
        _ => Map::new(),
    };
    let docker = config.runtime == RuntimeKind::Docker;
    // Socket mounts (containers only), only for unix:// connect URIs.
    let mut binds: Vec<Value> = create_options
        .get("HostConfig")
        .and_then(|host| host.get("Binds"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if let Some(workload) = Config::unix_path(&config.connect.workload) {
        binds.push(Value::String(format!(
            "{}:{}",
            homedir
                .join("mnt")
                .join(format!("{}.sock", agent.name))
                .display(),
            workload.display()
        )));
    }
    if let Some(management) = Config::unix_path(&config.connect.management) {
        binds.push(Value::String(format!(
            "{}:{}",
            management.display(),
            management.display()
        )));
    }
    let network = config.moby.network.name.clone();
    if docker {
        let host_config = create_options
            .entry("HostConfig")
            .or_insert_with(|| json!({}));
        if let Value::Object(host_config) = host_config {
            host_config.insert("Binds".to_owned(), Value::Array(binds));
        }
        // The module network, unless createOptions already names it.
        let networking = create_options
            .entry("NetworkingConfig")
            .or_insert_with(|| json!({}));
        if let Value::Object(networking) = networking {
            let endpoints = networking
                .entry("EndpointsConfig")
                .or_insert_with(|| json!({}));
            if let Value::Object(endpoints) = endpoints {
                endpoints
                    .entry(network.clone())
                    .or_insert_with(|| json!({}));
            }
        }
    }
    let labels = create_options.entry("Labels").or_insert_with(|| json!({}));
    if let Value::Object(labels) = labels {
        labels.insert(
            CREATE_OPTIONS_LABEL.to_owned(),
            Value::String("{}".to_owned()),
        );
        labels.insert(ENV_LABEL.to_owned(), Value::String("{}".to_owned()));
    }
    // Environment: [agent.env], then ours, which win.
    let mut env: BTreeMap<String, String> = agent.env.clone();
    let mut fixed = vec![
        ("EdgeDeviceHostName", config.hostname.clone()),
        ("IOTEDGE_APIVERSION", AGENT_API_VERSION.to_owned()),
        ("IOTEDGE_AUTHSCHEME", "sasToken".to_owned()),
        ("IOTEDGE_DEVICEID", device.device_id.clone()),
        ("IOTEDGE_IOTHUBHOSTNAME", device.hub_name.clone()),
        ("IOTEDGE_MODULEID", AGENT_MODULE_ID.to_owned()),
        ("IOTEDGE_MODULEGENERATIONID", gen_id.to_owned()),
        ("IOTEDGE_WORKLOADURI", config.connect.workload.clone()),
        ("IOTEDGE_MANAGEMENTURI", config.connect.management.clone()),
        (
            "IOTEDGE_WORKLOADLISTEN_MNTURI",
            format!("unix://{}", homedir.join("mnt").display()),
        ),
        ("Mode", "iotedged".to_owned()),
    ];
    if docker {
        fixed.push(("NetworkId", network));
    }
    if device.gateway_host != device.hub_name {
        fixed.push(("IOTEDGE_GATEWAYHOSTNAME", device.gateway_host.clone()));
    }
    for (key, value) in fixed {
        env.insert(key.to_owned(), value);
    }
    let auth = agent.auth.clone().map(|mut auth| {
        auth.serveraddress = auth
            .serveraddress
            .map(|address| replace_upstream(&address, &device.gateway_host));
        auth
    });
    ModuleSpec {
        name: agent.name.clone(),
        module_type: if docker { "docker" } else { "process" }.to_owned(),
        image_pull_policy: Some(match agent.image_pull_policy {
            PullPolicy::OnCreate => "on-create".to_owned(),
            PullPolicy::Never => "never".to_owned(),
        }),
        config: ModuleConfig {
            settings: Settings {
                image: replace_upstream(&agent.image, &device.gateway_host),
                create_options: Some(Value::Object(create_options)),
                auth,
                digest: None,
                image_hash: None,
            },
            env: env
                .into_iter()
                .map(|(key, value)| EnvVar { key, value })
                .collect(),
        },
    }
}

async fn create_agent<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
) -> Result<(), EdgedError> {
    let device = edged.device();
    let step = "failed to get the agent's generation ID";
    let identity = match edged.identity.update_module(AGENT_MODULE_ID).await {
        Ok(identity) => identity,
        // IoT Hub creates $edgeAgent for Edge devices; a hub that did not gets it created here.
        Err(error) if error.is_not_found() => {
            log::info!("{AGENT_MODULE_ID} has no identity yet; creating it");
            edged
                .identity
                .create_module(AGENT_MODULE_ID)
                .await
                .map_err(|source| EdgedError::identity(step, source))?
        }
        Err(source) => return Err(EdgedError::identity(step, source)),
    };
    let spec = agent_spec(&edged.config, &device, &identity.gen_id, &edged.homedir);
    edged.runtime.validate(&spec)?;
    if edged.config.agent.image_pull_policy == PullPolicy::OnCreate {
        match edged.runtime.pull(&spec.config.settings).await {
            Ok(Some(id)) => edged.ledger.record(&id),
            Ok(None) => {}
            Err(error) => match edged.runtime.image_id(&spec.config.settings.image).await {
                // Offline with the image present: go on with what is there.
                Ok(Some(_)) => log::warn!(
                    "could not pull the agent image {} ({error}); using the local copy",
                    spec.config.settings.image
                ),
                _ => return Err(error),
            },
        }
    }
    edged.ensure_listener(&spec.name)?;
    edged.runtime.create(&spec).await?;
    if let Ok(Some(id)) = edged.runtime.image_id(&spec.config.settings.image).await {
        edged.ledger.record(&id);
    }
    log::info!("created the agent container {}", spec.name);
    Ok(())
}

/// One watchdog run.
pub async fn check_agent<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
) -> Result<(), EdgedError> {
    let name = edged.config.agent.name.clone();
    let module_lock = edged.module_lock(&name);
    let _ordered = module_lock.lock().await;
    let state = match edged.runtime.get(&name).await {
        Ok(details) => Some(ModuleState::from_status(
            &details.status.runtime_status.status,
        )),
        Err(EdgedError::ModuleNotFound(_)) => None,
        Err(EdgedError::Docker(error)) if error.is_not_found() => None,
        Err(error) => return Err(error),
    };
    match state {
        Some(ModuleState::Running) => return Ok(()),
        Some(ModuleState::Stopped | ModuleState::Failed) => {
            log::info!("the agent {name} is not running; starting it");
        }
        Some(ModuleState::Dead | ModuleState::Unknown) => {
            log::warn!("the agent {name} is dead or in an unknown state; re-creating it");
            let image = edged.runtime.remove(&name).await?;
            edged.ledger.record(&image);
            create_agent(edged).await?;
        }
        None => {
            log::info!("the agent {name} does not exist; creating it");
            create_agent(edged).await?;
        }
    }
    edged.ensure_listener(&name)?;
    edged.runtime.start(&name).await?;
    log::info!("started the agent {name}");
    Ok(())
}

/// Runs the watchdog until `stop` resolves.
pub async fn run<R: ModuleRuntime, I: IdentityClient>(
    edged: Arc<Edged<R, I>>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut failures: u32 = 0;
    loop {
        match check_agent(&edged).await {
            Ok(()) => failures = 0,
            Err(error) => {
                failures = failures.saturating_add(1);
                log::error!(
                    "watchdog: could not keep the agent running (failure {failures}): {}",
                    http_common::error::error_chain(&error)
                );
                if edged
                    .config
                    .watchdog_max_retries
                    .is_some_and(|max| failures >= max)
                {
                    log::error!("watchdog: giving up after {failures} failures");
                    edged.request_exit(ExitReason::WatchdogFailed);
                    return;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(WATCHDOG_INTERVAL) => {}
            () = edged.watchdog_wake.notified() => {}
            () = &mut stop => return,
        }
    }
}

/// Wakes the watchdog whenever the runtime reports the agent's container removed.
pub async fn watch_agent_removals<R: ModuleRuntime, I: IdentityClient>(edged: Arc<Edged<R, I>>) {
    let name = edged.config.agent.name.clone();
    loop {
        match edged.runtime.wait_removed(&name).await {
            Ok(()) => {
                log::info!("the agent container {name} was removed");
                // Let whoever removed it (an update) finish first.
                tokio::time::sleep(Duration::from_millis(500)).await;
                edged.watchdog_wake.notify_one();
            }
            Err(error) => {
                log::debug!("runtime events unavailable: {error}");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// Renews the Edge CA when `[edge_ca.auto_renew]` says so, then restarts the modules (every
/// non-agent module, the agent last) so they fetch certificates from the new CA.
pub async fn edge_ca_renewal<R: ModuleRuntime, I: IdentityClient>(edged: Arc<Edged<R, I>>) {
    let edge_ca = edged.config.edge_ca.clone();
    let Some(policy) = edge_ca.auto_renew.clone() else {
        return;
    };
    if edge_ca.preloaded {
        return;
    }
    loop {
        let (not_before, not_after) =
            match crate::certs::edge_ca_validity(&edge_ca, &edged.certd).await {
                Ok(window) => window,
                Err(error) => {
                    log::warn!(
                        "Edge CA renewal: {}",
                        http_common::error::error_chain(&error)
                    );
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    continue;
                }
            };
        let due = crate::certs::renewal_time(not_before, not_after, policy.threshold);
        let wait = due - crate::time::now_unix();
        if wait > 0 {
            // Re-check at least daily (the certificate may be replaced behind our back).
            let wait = u64::try_from(wait).unwrap_or(0).min(86_400);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        log::info!("renewing the Edge CA certificate {:?}", edge_ca.cert);
        match crate::certs::renew_edge_ca(&edge_ca, policy.rotate_key, &edged.keyd, &edged.certd)
            .await
        {
            Ok(handle) => {
                edged.set_edge_ca_key(handle);
                log::info!("renewed the Edge CA; restarting modules");
                restart_modules(&edged).await;
            }
            Err(error) => {
                let delay = crate::certs::retry_delay(not_before, not_after, policy.retry);
                log::error!(
                    "Edge CA renewal failed, retrying in {delay} s: {}",
                    http_common::error::error_chain(&error)
                );
                tokio::time::sleep(Duration::from_secs(delay)).await;
            }
        }
    }
}

/// Restarts every running module, the agent last.
pub async fn restart_modules<R: ModuleRuntime, I: IdentityClient>(edged: &Arc<Edged<R, I>>) {
    let modules = match edged.runtime.list().await {
        Ok(modules) => modules,
        Err(error) => {
            log::warn!("could not list modules to restart them: {error}");
            return;
        }
    };
    let agent = edged.config.agent.name.clone();
    let running: Vec<String> = modules
        .into_iter()
        .filter(|module| module.status.runtime_status.status == "running")
        .map(|module| module.name)
        .collect();
    for name in running.iter().filter(|name| **name != agent) {
        if let Err(error) = edged.runtime.restart(name).await {
            log::warn!("could not restart module {name}: {error}");
        }
    }
    if running.contains(&agent) {
        if let Err(error) = edged.runtime.restart(&agent).await {
            log::warn!("could not restart the agent {agent}: {error}");
        }
    }
}

/// Runs image garbage collection at `cleanup_time`, then every `cleanup_recurrence`.
pub async fn image_gc<R: ModuleRuntime, I: IdentityClient>(edged: Arc<Edged<R, I>>) {
    let settings = edged.config.image_gc.clone();
    if !settings.enabled {
        return;
    }
    tokio::time::sleep(Duration::from_secs(crate::gc::seconds_until_local(
        settings.cleanup_time_minutes,
    )))
    .await;
    loop {
        if let Err(error) = sweep_images(&edged).await {
            log::warn!("image garbage collection failed: {error}");
        }
        tokio::time::sleep(Duration::from_secs(
            settings.cleanup_recurrence_secs.max(60),
        ))
        .await;
    }
}

/// One garbage collection pass.
pub async fn sweep_images<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
) -> Result<(), EdgedError> {
    let modules = edged.runtime.list().await?;
    let in_use: Vec<String> = modules
        .iter()
        .filter_map(|module| {
            module.config["settings"]["imageHash"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let keep = edged
        .runtime
        .image_id(&edged.config.agent.image)
        .await
        .ok()
        .flatten();
    let candidates = crate::gc::sweep_candidates(
        &edged.ledger,
        edged.config.image_gc.image_age_cleanup_threshold_secs,
        &in_use,
        keep.as_deref(),
    );
    for id in candidates {
        match edged.runtime.remove_image(&id).await {
            Ok(()) => log::info!("removed unused image {id}"),
            Err(error) => log::warn!("could not remove unused image {id}: {error}"),
        }
        edged.ledger.forget(&id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_spec_follows_the_contract() {
        let config = Config::from_toml(
            r#"
hostname = "dev-host"
homedir = "/var/lib/aziot/edged"
[agent]
name = "edgeAgent"
[agent.config]
image = "$upstream:443/azureiotedge-agent:1.6"
createOptions = { HostConfig = { Binds = ["/a:/b"] }, Labels = { mine = "x" } }
[agent.config.auth]
serveraddress = "$upstream:443"
username = "u"
password = "p"
[agent.env]
RuntimeLogLevel = "debug"
IOTEDGE_MODULEID = "overridden-by-edged"
[connect]
workload_uri = "unix:///var/run/iotedge/workload.sock"
management_uri = "unix:///var/run/iotedge/mgmt.sock"
"#,
        )
        .unwrap();
        let device = DeviceIdentity {
            hub_name: "hub.example".into(),
            gateway_host: "parent".into(),
            device_id: "dev".into(),
        };
        let spec = agent_spec(&config, &device, "gen-1", Path::new("/var/lib/aziot/edged"));
        assert_eq!(
            spec.config.settings.image,
            "parent:443/azureiotedge-agent:1.6"
        );
        assert_eq!(
            spec.config
                .settings
                .auth
                .as_ref()
                .unwrap()
                .serveraddress
                .as_deref(),
            Some("parent:443")
        );
        let options = spec.config.settings.create_options.clone().unwrap();
        assert_eq!(
            options["HostConfig"]["Binds"],
            json!([
                "/a:/b",
                "/var/lib/aziot/edged/mnt/edgeAgent.sock:/var/run/iotedge/workload.sock",
                "/var/run/iotedge/mgmt.sock:/var/run/iotedge/mgmt.sock"
            ])
        );
        assert_eq!(
            options["NetworkingConfig"]["EndpointsConfig"]["azure-iot-edge"],
            json!({})
        );
        assert_eq!(options["Labels"]["mine"], "x");
        assert_eq!(options["Labels"][CREATE_OPTIONS_LABEL], "{}");
        let env: BTreeMap<&str, &str> = spec
            .config
            .env
            .iter()
            .map(|variable| (variable.key.as_str(), variable.value.as_str()))
            .collect();
        assert_eq!(env["IOTEDGE_MODULEID"], "$edgeAgent");
        assert_eq!(env["RuntimeLogLevel"], "debug");
        assert_eq!(env["IOTEDGE_MODULEGENERATIONID"], "gen-1");
        assert_eq!(env["IOTEDGE_GATEWAYHOSTNAME"], "parent");
        assert_eq!(env["EdgeDeviceHostName"], "dev-host");
        assert_eq!(
            env["IOTEDGE_WORKLOADLISTEN_MNTURI"],
            "unix:///var/lib/aziot/edged/mnt"
        );
        assert_eq!(env["Mode"], "iotedged");
        assert_eq!(env["NetworkId"], "azure-iot-edge");
        let same_hub = DeviceIdentity {
            gateway_host: "hub.example".into(),
            ..device
        };
        let spec = agent_spec(&config, &same_hub, "g", Path::new("/h"));
        assert!(!spec
            .config
            .env
            .iter()
            .any(|v| v.key == "IOTEDGE_GATEWAYHOSTNAME"));
    }
}
