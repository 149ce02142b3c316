//! [`ModuleRuntime`] on the Moby Engine API: the container contract of spec section 6.
//!
//! Create passes `createOptions` through with the image, merged environment (createOptions wins,
//! sorted by key), the owner and original-image labels, and the privilege policy. Module details
//! are rebuilt from `docker inspect`. Process membership reads `/proc/<pid>/cgroup` and compares
//! the container ID found there with the module's container ID, falling back to `docker top`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use http_body_util::BodyExt as _;
use serde_json::{json, Map, Value};

use crate::config::{Network, RegistryAuth};
use crate::docker::{ContainerInspect, ContainerSummary, DockerClient, DockerError};
use crate::error::EdgedError;
use crate::model::{
    ExitStatus, ModuleDetails, ModuleSpec, ModuleStatus, RuntimeStatus, Settings,
    ORIGINAL_IMAGE_LABEL, OWNER_LABEL, OWNER_VALUE,
};
use crate::runtime::{LogOptions, ModuleRuntime};

/// How long a module name → container ID answer is reused by the caller check.
const CONTAINER_ID_TTL: Duration = Duration::from_secs(5);

/// The Docker implementation of [`ModuleRuntime`].
#[derive(Debug)]
pub struct DockerRuntime {
    client: DockerClient,
    allow_elevated: bool,
    network: Network,
    container_ids: Mutex<HashMap<String, (String, Instant)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Maps Docker's state to `runtimeStatus.status`.
pub fn map_status(state: &str, exit_code: Option<i64>) -> &'static str {
    match state {
        "running" => "running",
        "created" | "paused" | "restarting" => "stopped",
        "exited" | "removing" => {
            if exit_code.unwrap_or(0) == 0 {
                "stopped"
            } else {
                "failed"
            }
        }
        "dead" => "dead",
        _ => "unknown",
    }
}

/// The `X-Registry-Auth` header value: base64url of the credentials JSON.
pub fn registry_auth_header(auth: &RegistryAuth) -> Result<String, EdgedError> {
    let json = serde_json::to_vec(auth)
        .map_err(|error| EdgedError::Internal(format!("could not encode credentials: {error}")))?;
    Ok(base64::engine::general_purpose::URL_SAFE.encode(json))
}

fn invalid_config(message: impl std::fmt::Display) -> EdgedError {
    EdgedError::BadRequest(format!("invalid Docker config: {message}"))
}

/// Builds the Docker create body for a module spec (spec section 6.1).
pub fn create_body(spec: &ModuleSpec, allow_elevated: bool) -> Result<Value, EdgedError> {
    let mut body = match &spec.config.settings.create_options {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(object)) => object.clone(),
        Some(_) => return Err(invalid_config("createOptions must be a JSON object")),
    };
    // Environment: spec env, then createOptions.Env over it; sorted by key.
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for variable in &spec.config.env {
        if env
            .insert(variable.key.clone(), variable.value.clone())
            .is_some()
        {
            return Err(EdgedError::BadRequest(format!(
                "duplicate environment variable {:?}",
                variable.key
            )));
        }
    }
    match body.get("Env") {
        None | Some(Value::Null) => {}
        Some(Value::Array(entries)) => {
            for entry in entries {
                let text = entry
                    .as_str()
                    .ok_or_else(|| invalid_config("Env entries must be strings"))?;
                let (key, value) = text.split_once('=').unwrap_or((text, ""));
                env.insert(key.to_owned(), value.to_owned());
            }
        }
        Some(_) => return Err(invalid_config("Env must be an array of strings")),
    }
    body.insert(
        "Env".to_owned(),
        Value::Array(
            env.iter()
                .map(|(key, value)| Value::String(format!("{key}={value}")))
                .collect(),
        ),
    );
    // Labels: the user's, with ours always overwritten.
    let mut labels = match body.remove("Labels") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(labels)) => {
            if labels.values().any(|value| !value.is_string()) {
                return Err(invalid_config("Labels values must be strings"));
            }
            labels
        }
        Some(_) => return Err(invalid_config("Labels must be an object")),
    };
    labels.insert(
        OWNER_LABEL.to_owned(),
        Value::String(OWNER_VALUE.to_owned()),
    );
    labels.insert(
        ORIGINAL_IMAGE_LABEL.to_owned(),
        Value::String(spec.config.settings.image.clone()),
    );
    body.insert("Labels".to_owned(), Value::Object(labels));
    body.insert(
        "Image".to_owned(),
        Value::String(spec.config.settings.image.clone()),
    );
    for key in ["Cmd", "Entrypoint"] {
        if let Some(value) = body.get(key) {
            if !(value.is_null() || value.is_string() || value.is_array()) {
                return Err(invalid_config(format!(
                    "{key} must be a string or an array"
                )));
            }
        }
    }
    match body.get_mut("HostConfig") {
        None | Some(Value::Null) => {
            if !allow_elevated {
                body.insert("HostConfig".to_owned(), json!({}));
            }
        }
        Some(Value::Object(host_config)) => {
            if let Some(binds) = host_config.get("Binds") {
                let valid = binds.is_null()
                    || binds
                        .as_array()
                        .is_some_and(|binds| binds.iter().all(Value::is_string));
                if !valid {
                    return Err(invalid_config(
                        "HostConfig.Binds must be an array of strings",
                    ));
                }
            }
        }
        Some(_) => return Err(invalid_config("HostConfig must be an object")),
    }
    if !allow_elevated {
        if let Some(Value::Object(host_config)) = body.get_mut("HostConfig") {
            let elevated = host_config.get("Privileged") == Some(&Value::Bool(true))
                || host_config
                    .get("CapAdd")
                    .and_then(Value::as_array)
                    .is_some_and(|caps| !caps.is_empty());
            if elevated {
                log::warn!(
                    "module {}: privileged mode and added capabilities are removed \
                     (allow_elevated_docker_permissions = false)",
                    spec.name
                );
            }
            host_config.insert("Privileged".to_owned(), Value::Bool(false));
            host_config.remove("CapAdd");
            let mut drop: Vec<Value> = host_config
                .get("CapDrop")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for capability in ["CHOWN", "SETUID"] {
                if !drop
                    .iter()
                    .any(|existing| existing.as_str() == Some(capability))
                {
                    drop.push(Value::String(capability.to_owned()));
                }
            }
            host_config.insert("CapDrop".to_owned(), Value::Array(drop));
        }
    }
    Ok(Value::Object(body))
}

/// Rebuilds `ModuleDetails` from `docker inspect` (spec section 3.1).
pub fn details_from_inspect(
    inspect: &ContainerInspect,
    description: Option<String>,
) -> ModuleDetails {
    let name = inspect.name.trim_start_matches('/').to_owned();
    let labels = inspect.config.labels.clone().unwrap_or_default();
    let image = labels
        .get(ORIGINAL_IMAGE_LABEL)
        .cloned()
        .unwrap_or_else(|| name.clone());
    let state = &inspect.state;
    let exit_status = match (
        state.exit_code,
        crate::time::docker_time(&state.finished_at),
    ) {
        (Some(code), Some(time)) => Some(ExitStatus {
            exit_time: time,
            status_code: code.to_string(),
        }),
        _ => None,
    };
    ModuleDetails {
        id: inspect.id.clone(),
        name,
        module_type: "docker".to_owned(),
        config: json!({
            "settings": {
                "image": image,
                "imageHash": inspect.image,
                "createOptions": { "Labels": labels },
            },
            "env": [],
        }),
        status: ModuleStatus {
            start_time: crate::time::docker_time(&state.started_at),
            exit_status,
            runtime_status: RuntimeStatus {
                status: map_status(&state.status, state.exit_code).to_owned(),
                description: description.filter(|text| !text.is_empty()),
            },
        },
    }
}

/// The container IDs named in a `/proc/<pid>/cgroup` text (`/docker/<id>`,
/// `docker-<id>.scope`, ...).
pub fn container_ids_in_cgroup(text: &str) -> Vec<String> {
    let mut ids = Vec::new();
    for line in text.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or("");
        for component in path.split('/') {
            let component = component.strip_suffix(".scope").unwrap_or(component);
            let component = component.rsplit('-').next().unwrap_or(component);
            if component.len() == 64
                && component.bytes().all(|byte| byte.is_ascii_hexdigit())
                && !ids.iter().any(|id| id == component)
            {
                ids.push(component.to_owned());
            }
        }
    }
    ids
}

impl DockerRuntime {
    /// A runtime over `client`.
    pub fn new(client: DockerClient, allow_elevated: bool, network: Network) -> Self {
        DockerRuntime {
            client,
            allow_elevated,
            network,
            container_ids: Mutex::new(HashMap::new()),
        }
    }

    async fn container_id(&self, name: &str, fresh: bool) -> Result<Option<String>, EdgedError> {
        if !fresh {
            if let Some((id, at)) = lock(&self.container_ids).get(name) {
                if at.elapsed() < CONTAINER_ID_TTL {
                    return Ok(Some(id.clone()));
                }
            }
        }
        match self.client.inspect(name).await {
            Ok(inspect) => {
                let mut ids = lock(&self.container_ids);
                if ids.len() > 1024 {
                    ids.clear();
                }
                ids.insert(name.to_owned(), (inspect.id.clone(), Instant::now()));
                Ok(Some(inspect.id))
            }
            Err(error) if error.is_not_found() => {
                lock(&self.container_ids).remove(name);
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }

    fn summaries_by_id(summaries: &[ContainerSummary]) -> HashMap<String, String> {
        summaries
            .iter()
            .map(|summary| (summary.id.clone(), summary.status.clone()))
            .collect()
    }
}

impl ModuleRuntime for DockerRuntime {
    fn validate(&self, spec: &ModuleSpec) -> Result<(), EdgedError> {
        if spec.module_type != "docker" {
            return Err(EdgedError::BadRequest(format!(
                "module type {:?} is not supported (expected \"docker\")",
                spec.module_type
            )));
        }
        if spec.config.settings.image.trim().is_empty() {
            return Err(invalid_config("settings.image must not be empty"));
        }
        create_body(spec, self.allow_elevated).map(drop)
    }

    async fn pull(&self, settings: &Settings) -> Result<Option<String>, EdgedError> {
        let header = match &settings.auth {
            Some(auth) => Some(registry_auth_header(auth)?),
            None => None,
        };
        self.client.pull(&settings.image, header.as_deref()).await?;
        self.image_id(&settings.image).await
    }

    async fn create(&self, spec: &ModuleSpec) -> Result<String, EdgedError> {
        let body = create_body(spec, self.allow_elevated)?;
        let id = self.client.create(&spec.name, &body).await?;
        lock(&self.container_ids).insert(spec.name.clone(), (id.clone(), Instant::now()));
        Ok(id)
    }

    async fn get(&self, name: &str) -> Result<ModuleDetails, EdgedError> {
        let (inspect, summary) = tokio::join!(self.client.inspect(name), self.client.summary(name));
        let inspect = owned(inspect?, name)?;
        let description = summary.ok().flatten().map(|summary| summary.status);
        Ok(details_from_inspect(&inspect, description))
    }

    async fn list(&self) -> Result<Vec<ModuleDetails>, EdgedError> {
        let summaries = self
            .client
            .list(&format!("{OWNER_LABEL}={OWNER_VALUE}"))
            .await?;
        let descriptions = Self::summaries_by_id(&summaries);
        let mut tasks = tokio::task::JoinSet::new();
        for summary in &summaries {
            let client = self.client.clone();
            let id = summary.id.clone();
            tasks.spawn(async move { client.inspect(&id).await });
        }
        let mut modules = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(inspect)) => {
                    let description = descriptions.get(&inspect.id).cloned();
                    modules.push(details_from_inspect(&inspect, description));
                }
                // Removed between list and inspect: not a module any more.
                Ok(Err(error)) if error.is_not_found() => {}
                Ok(Err(error)) => return Err(error.into()),
                Err(error) => {
                    return Err(EdgedError::Internal(format!(
                        "inspect task failed: {error}"
                    )))
                }
            }
        }
        modules.sort_by(|left, right| left.name.cmp(&right.name));
        Ok(modules)
    }

    async fn start(&self, name: &str) -> Result<(), EdgedError> {
        self.client.start(name).await?;
        Ok(())
    }

    async fn stop(&self, name: &str, grace: Option<Duration>) -> Result<(), EdgedError> {
        // Also reached by an update naming any container: only a module is stopped.
        let inspect = owned(self.client.inspect(name).await?, name)?;
        self.client.stop(&inspect.id, grace).await?;
        Ok(())
    }

    async fn restart(&self, name: &str) -> Result<(), EdgedError> {
        Ok(self.client.restart(name).await?)
    }

    async fn remove(&self, name: &str) -> Result<String, EdgedError> {
        let inspect = owned(self.client.inspect(name).await?, name)?;
        self.client.remove(&inspect.id).await?;
        lock(&self.container_ids).remove(name);
        Ok(inspect.image)
    }

    async fn logs(
        &self,
        name: &str,
        options: &LogOptions,
    ) -> Result<http_common::Body, EdgedError> {
        let mut pairs = vec![
            ("stdout", "true".to_owned()),
            ("stderr", "true".to_owned()),
            ("follow", options.follow.to_string()),
            ("timestamps", options.timestamps.to_string()),
        ];
        if let Some(tail) = &options.tail {
            pairs.push(("tail", tail.clone()));
        }
        if let Some(since) = options.since {
            pairs.push(("since", since.to_string()));
        }
        if let Some(until) = options.until {
            pairs.push(("until", until.to_string()));
        }
        let response = self
            .client
            .logs(name, &crate::docker::query(&pairs))
            .await?;
        Ok(response
            .into_body()
            .map_err(|error| Box::new(error) as Box<dyn std::error::Error + Send + Sync>)
            .boxed())
    }

    async fn contains_process(&self, name: &str, pid: i32) -> Result<bool, EdgedError> {
        if pid <= 0 {
            return Ok(false);
        }
        let cgroup_ids = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map(|text| container_ids_in_cgroup(&text))
            .unwrap_or_default();
        if !cgroup_ids.is_empty() {
            let Some(id) = self.container_id(name, false).await? else {
                return Ok(false);
            };
            if cgroup_ids.contains(&id) {
                return Ok(true);
            }
            // The cached ID may be stale (container re-created): ask Docker once more.
            let fresh = self.container_id(name, true).await?;
            return Ok(fresh.is_some_and(|id| cgroup_ids.contains(&id)));
        }
        // Not readable or not in a container cgroup: the reference method.
        match self.client.top_pids(name).await {
            Ok(pids) => Ok(pids.contains(&pid)),
            Err(DockerError::Status { .. }) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    async fn stats(&self, name: &str) -> Result<Value, EdgedError> {
        Ok(self.client.stats(name).await?)
    }

    async fn version(&self) -> Result<String, EdgedError> {
        Ok(self.client.version().await?.version)
    }

    async fn prepare(&self) -> Result<(), EdgedError> {
        if self.client.network_exists(&self.network.name).await? {
            return Ok(());
        }
        let mut body = json!({
            "Name": self.network.name,
            "Driver": "bridge",
            "CheckDuplicate": true,
        });
        if self.network.ipv6 {
            body["EnableIPv6"] = Value::Bool(true);
        }
        if let Some(ipam) = &self.network.ipam {
            let pools: Vec<Value> = ipam
                .config
                .iter()
                .map(|pool| {
                    let mut entry = Map::new();
                    if let Some(gateway) = &pool.gateway {
                        entry.insert("Gateway".to_owned(), Value::String(gateway.clone()));
                    }
                    if let Some(subnet) = &pool.subnet {
                        entry.insert("Subnet".to_owned(), Value::String(subnet.clone()));
                    }
                    if let Some(range) = &pool.ip_range {
                        entry.insert("IPRange".to_owned(), Value::String(range.clone()));
                    }
                    Value::Object(entry)
                })
                .collect();
            body["IPAM"] = json!({ "Driver": "default", "Config": pools });
        }
        log::info!("creating Docker network {}", self.network.name);
        match self.client.create_network(&body).await {
            Ok(()) => Ok(()),
            // Created concurrently by someone else: fine.
            Err(DockerError::Status { status, .. }) if status == http::StatusCode::CONFLICT => {
                Ok(())
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn image_id(&self, image: &str) -> Result<Option<String>, EdgedError> {
        match self.client.image_id(image).await {
            Ok(id) => Ok(Some(id)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    async fn remove_image(&self, id: &str) -> Result<(), EdgedError> {
        Ok(self.client.remove_image(id).await?)
    }

    async fn inspect(&self, name: &str) -> Result<Value, EdgedError> {
        Ok(self.client.inspect_raw(name).await?)
    }

    async fn network_info(&self) -> Result<Option<(String, Value)>, EdgedError> {
        match self.client.network(&self.network.name).await {
            Ok(value) => Ok(Some((self.network.name.clone(), value))),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    async fn wait_removed(&self, name: &str) -> Result<(), EdgedError> {
        let filters = json!({"type": ["container"], "event": ["destroy"], "container": [name]});
        let mut events = self.client.events(&filters).await?;
        let mut pending = Vec::new();
        while let Some(frame) = events.frame().await {
            let frame = frame.map_err(|error| {
                EdgedError::Internal(format!("the runtime's event stream broke: {error}"))
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            let mut stream = serde_json::Deserializer::from_slice(&pending).into_iter::<Value>();
            while let Some(Ok(event)) = stream.next() {
                let actor = event["Actor"]["Attributes"]["name"].as_str().unwrap_or("");
                if actor == name || actor.is_empty() {
                    return Ok(());
                }
            }
            let consumed = stream.byte_offset();
            pending.drain(..consumed);
        }
        Err(EdgedError::Internal(
            "the runtime's event stream ended".to_owned(),
        ))
    }
}

/// `inspect` if the container carries edged's owner label; any other container is not a module
/// (the spec's ownership rule), so it is "not found" rather than something edged may touch.
fn owned(inspect: ContainerInspect, name: &str) -> Result<ContainerInspect, EdgedError> {
    let owner = inspect
        .config
        .labels
        .as_ref()
        .and_then(|labels| labels.get(OWNER_LABEL))
        .map(String::as_str);
    if owner == Some(OWNER_VALUE) {
        Ok(inspect)
    } else {
        Err(EdgedError::ModuleNotFound(name.to_owned()))
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EnvVar, ModuleConfig};

    fn spec(create_options: Value, env: Vec<(&str, &str)>) -> ModuleSpec {
        ModuleSpec {
            name: "m".into(),
            module_type: "docker".into(),
            image_pull_policy: None,
            config: ModuleConfig {
                settings: Settings {
                    image: "img:1".into(),
                    create_options: Some(create_options),
                    auth: None,
                    digest: None,
                    image_hash: None,
                },
                env: env
                    .into_iter()
                    .map(|(key, value)| EnvVar {
                        key: key.into(),
                        value: value.into(),
                    })
                    .collect(),
            },
        }
    }

    #[test]
    fn create_body_merges_env_and_overwrites_labels() {
        let body = create_body(
            &spec(
                json!({"Env": ["B=from-options", "C=c"], "Labels": {"x": "y", OWNER_LABEL: "me"},
                       "HostConfig": {"Binds": ["/a:/b"]}}),
                vec![("B", "from-spec"), ("A", "a")],
            ),
            true,
        )
        .unwrap();
        assert_eq!(body["Env"], json!(["A=a", "B=from-options", "C=c"]));
        assert_eq!(body["Labels"][OWNER_LABEL], OWNER_VALUE);
        assert_eq!(body["Labels"][ORIGINAL_IMAGE_LABEL], "img:1");
        assert_eq!(body["Labels"]["x"], "y");
        assert_eq!(body["Image"], "img:1");
        assert_eq!(body["HostConfig"]["Binds"], json!(["/a:/b"]));
    }

    #[test]
    fn create_body_enforces_the_privilege_policy() {
        let body = create_body(
            &spec(
                json!({"HostConfig": {"Privileged": true, "CapAdd": ["NET_ADMIN"], "CapDrop": ["MKNOD"]}}),
                vec![],
            ),
            false,
        )
        .unwrap();
        assert_eq!(body["HostConfig"]["Privileged"], false);
        assert!(body["HostConfig"].get("CapAdd").is_none());
        assert_eq!(
            body["HostConfig"]["CapDrop"],
            json!(["MKNOD", "CHOWN", "SETUID"])
        );
        let allowed = create_body(
            &spec(json!({"HostConfig": {"Privileged": true}}), vec![]),
            true,
        )
        .unwrap();
        assert_eq!(allowed["HostConfig"]["Privileged"], true);
    }

    #[test]
    fn create_body_rejects_bad_settings() {
        let cases = [
            (json!([1]), vec![], "createOptions must be a JSON object"),
            (json!({"Env": "A=1"}), vec![], "Env must be an array"),
            (json!({"Labels": {"a": 1}}), vec![], "Labels values"),
            (json!({"HostConfig": {"Binds": "/a:/b"}}), vec![], "Binds"),
            (
                json!({}),
                vec![("A", "1"), ("A", "2")],
                "duplicate environment variable",
            ),
        ];
        for (options, env, expected) in cases {
            let error = create_body(&spec(options, env), true)
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{expected:?} not in {error:?}");
        }
    }

    #[test]
    fn registry_auth_is_base64url_json() {
        let auth = RegistryAuth {
            username: Some("user".into()),
            password: Some("p@ss/word+?".into()),
            email: None,
            serveraddress: Some("example.azurecr.io".into()),
        };
        let header = registry_auth_header(&auth).unwrap();
        assert!(!header.contains('+') && !header.contains('/'), "{header}");
        let decoded = base64::engine::general_purpose::URL_SAFE
            .decode(&header)
            .unwrap();
        let value: Value = serde_json::from_slice(&decoded).unwrap();
        assert_eq!(
            value,
            json!({"username": "user", "password": "p@ss/word+?", "serveraddress": "example.azurecr.io"})
        );
    }

    #[test]
    fn status_mapping() {
        let cases = [
            ("running", Some(0), "running"),
            ("created", None, "stopped"),
            ("paused", Some(0), "stopped"),
            ("restarting", Some(1), "stopped"),
            ("exited", Some(0), "stopped"),
            ("exited", Some(137), "failed"),
            ("removing", Some(2), "failed"),
            ("dead", Some(0), "dead"),
            ("weird", None, "unknown"),
        ];
        for (state, code, expected) in cases {
            assert_eq!(map_status(state, code), expected, "{state} {code:?}");
        }
    }

    #[test]
    fn cgroup_container_ids() {
        let id = "c63bf7e29df0e0a6d737988f9477a20e03460b654c604006bc0c73cfdf368b14";
        let v1 = format!("9:name=systemd:/docker/{id}\n4:memory:/docker/{id}\n0::/docker/{id}\n");
        assert_eq!(container_ids_in_cgroup(&v1), vec![id.to_owned()]);
        let systemd = format!("0::/system.slice/docker-{id}.scope\n");
        assert_eq!(container_ids_in_cgroup(&systemd), vec![id.to_owned()]);
        assert!(container_ids_in_cgroup("0::/user.slice/session-3.scope\n").is_empty());
        assert!(container_ids_in_cgroup("4:memory:/process_api/7b9b18e6\n").is_empty());
    }

    #[test]
    fn details_from_docker_state() {
        let inspect: ContainerInspect = serde_json::from_value(json!({
            "Id": "abc", "Name": "/m", "Image": "sha256:1",
            "State": {"Status": "exited", "ExitCode": 3, "StartedAt": "2024-01-01T10:00:00Z",
                      "FinishedAt": "2024-01-01T11:00:00.5Z", "Pid": 0},
            "Config": {"Image": "img", "Labels": {ORIGINAL_IMAGE_LABEL: "img:1", OWNER_LABEL: OWNER_VALUE}}
        }))
        .unwrap();
        let details = details_from_inspect(&inspect, Some("Exited (3) 1 hour ago".into()));
        let json = serde_json::to_value(&details).unwrap();
        assert_eq!(
            json,
            json!({"id": "abc", "name": "m", "type": "docker",
                   "config": {"settings": {"image": "img:1", "imageHash": "sha256:1",
                              "createOptions": {"Labels": {ORIGINAL_IMAGE_LABEL: "img:1", OWNER_LABEL: OWNER_VALUE}}},
                              "env": []},
                   "status": {"startTime": "2024-01-01T10:00:00Z",
                              "exitStatus": {"exitTime": "2024-01-01T11:00:00.5Z", "statusCode": "3"},
                              "runtimeStatus": {"status": "failed", "description": "Exited (3) 1 hour ago"}}})
        );
        let never: ContainerInspect = serde_json::from_value(json!({
            "Id": "x", "Name": "/n", "State": {"Status": "created", "ExitCode": 0,
            "StartedAt": "0001-01-01T00:00:00Z", "FinishedAt": "0001-01-01T00:00:00Z"}
        }))
        .unwrap();
        let details = details_from_inspect(&never, None);
        assert_eq!(details.status.start_time, None);
        assert_eq!(details.status.exit_status, None);
        assert_eq!(details.config["settings"]["image"], "n");
    }
}
