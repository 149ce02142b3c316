//! The process runtime's test stack (`agent.type = "process"`): the real edged, keyd and certd
//! and the fake identityd, no Docker; helpers to act from inside a module's cgroup (the
//! equivalent of `docker exec`: a helper process moves itself into the module's tracking cgroup
//! before it connects; the tests run as root), and the `azure-iot-device` venv.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};

use super::{log_frames, Daemon, V};

/// The SDK version the Python module runs on (pinned).
pub const SDK_VERSION: &str = "2.14.0";

pub const LOOP: &str = "trap 'exit 0' TERM; while true; do sleep 1; done";

/// Builds (once per machine and SDK version) a venv with `azure-iot-device`; returns its python.
pub fn sdk_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let venv = std::env::temp_dir()
                .join(format!("edged-test-venv-azure-iot-device-{SDK_VERSION}"));
            let python = venv.join("bin/python3");
            if venv.join(".complete").exists() {
                return python;
            }
            // Built under a unique name and renamed into place, so a half-built venv is never used.
            let building = std::env::temp_dir().join(format!(
                "edged-test-venv-building-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            // Debian's interpreter: module uids must be able to reach it (not under /root).
            let status = Command::new("/usr/bin/python3")
                .args(["-m", "venv"])
                .arg(&building)
                .status()
                .expect(
                    "/usr/bin/python3 must exist (tools/install-deps.sh installs python3-venv)",
                );
            assert!(
                status.success(),
                "python3 -m venv failed: install python3-venv"
            );
            let output = Command::new(building.join("bin/pip"))
                .args([
                    "install",
                    "--disable-pip-version-check",
                    "--no-input",
                    "-q",
                    &format!("azure-iot-device=={SDK_VERSION}"),
                ])
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "pip install azure-iot-device failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            // Only bin/python3 is used: a moved venv's interpreter still finds its packages
            // (pyvenv.cfg sits beside it), unlike its scripts' shebangs.
            std::fs::write(building.join(".complete"), SDK_VERSION).unwrap();
            if std::fs::rename(&building, &venv).is_err() {
                // Another test binary finished first: use its venv.
                let _ = std::fs::remove_dir_all(&building);
            }
            assert!(venv.join(".complete").exists());
            python
        })
        .clone()
}

/// keyd, certd, the fake identityd and edged with the process runtime.
pub struct Stack {
    root: tempfile::TempDir,
    pub base: PathBuf,
    pub runtime: tokio::runtime::Runtime,
    _keyd: Daemon,
    _certd: Daemon,
    pub edged: Daemon,
    pub identity: std::sync::Arc<super::FakeIdentityd>,
    identity_stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub homedir: PathBuf,
    pub mgmt: PathBuf,
    pub agent: String,
    pub cgroup_name: String,
}

impl Stack {
    pub fn new() -> Self {
        Stack::with_settings("")
    }

    /// A stack whose edged config has `top_level` (TOML keys before any table) added.
    pub fn with_settings(top_level: &str) -> Self {
        let suffix = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let root = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(root.path()).unwrap();
        // Modules run as their own uids: they must reach their socket and their program.
        std::fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (keyd, certd) = super::start_keyd_certd(
            &base,
            "",
            "[cert_issuance.aziot-edged-ca]\nmethod = \"self_signed\"\nexpiry_days = 90\n\
             [preloaded_certs]\naziot-edged-trust-bundle = [\"aziot-edged-ca\"]\n",
        );
        let identity_socket = base.join("identityd.sock");
        let (identity, identity_stop) =
            super::start_fake_identityd(&runtime, &keyd.socket, &identity_socket);
        let homedir = base.join("edged-home");
        let mgmt = base.join("mgmt.sock");
        let workload = base.join("workload.sock");
        let agent = "edgeAgent".to_owned();
        let cgroup_name = format!("edged-test-{suffix}");
        let edged = Daemon::new(
            "edged",
            PathBuf::from(env!("CARGO_BIN_EXE_edged")),
            &base,
            "AZIOT_EDGED_CONFIG",
            "AZIOT_EDGED_CONFIG_DIR",
        )
        .with_socket(mgmt.clone());
        let config = format!(
            r#"hostname = "edged-test-host"
homedir = "{homedir}"
{top_level}
[agent]
name = "{agent}"
type = "process"
imagePullPolicy = "never"
[agent.config]
image = "/bin/sh"
createOptions = {{ Cmd = ["-c", "{LOOP}"] }}
[connect]
workload_uri = "unix://{workload}"
management_uri = "unix://{mgmt}"
[listen]
workload_uri = "unix://{workload}"
management_uri = "unix://{mgmt}"
[process_runtime]
uid_start = 910000
uid_count = 100
cgroup_name = "{cgroup_name}"
log_max_bytes = 1048576
[image_garbage_collection]
enabled = false
[endpoints]
aziot_keyd_url = "unix://{keyd}"
aziot_certd_url = "unix://{certd}"
aziot_identityd_url = "unix://{identityd}"
"#,
            homedir = homedir.display(),
            workload = workload.display(),
            mgmt = mgmt.display(),
            keyd = keyd.socket.display(),
            certd = certd.socket.display(),
            identityd = identity_socket.display(),
        );
        std::fs::write(edged.config_file(), config).unwrap();
        let mut stack = Stack {
            root,
            base,
            runtime,
            _keyd: keyd,
            _certd: certd,
            edged,
            identity,
            identity_stop: Some(identity_stop),
            homedir,
            mgmt,
            agent,
            cgroup_name,
        };
        stack.start_edged();
        stack
    }

    /// Starts edged and waits until the watchdog runs the agent.
    pub fn start_edged(&mut self) {
        self.edged.spawn_within(Duration::from_secs(60));
        let agent = self.agent.clone();
        self.wait_for("the agent to run", || {
            self.status_of(&agent).as_deref() == Some("running")
        });
    }

    pub fn wait_for(&self, what: &str, mut predicate: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !predicate() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nedged log:\n{}",
                self.edged.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn call_raw(
        &self,
        socket: &Path,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, Vec<u8>) {
        super::call_raw(&self.runtime, socket, method, path, body)
    }

    /// A management call from the test process (a host process, not a module).
    pub fn mgmt(&self, method: Method, path: &str, body: &str) -> (StatusCode, Value) {
        let (status, bytes) = self.call_raw(&self.mgmt, method, path, body);
        (status, super::parse_json(&bytes))
    }

    pub fn status_of(&self, module: &str) -> Option<String> {
        let (status, body) = self.mgmt(Method::GET, &format!("/modules/{module}?{V}"), "");
        (status == StatusCode::OK).then(|| {
            body["status"]["runtimeStatus"]["status"]
                .as_str()
                .unwrap()
                .to_owned()
        })
    }

    pub fn module_dir(&self, module: &str) -> PathBuf {
        self.homedir.join("process").join(module)
    }

    pub fn record(&self, module: &str) -> Value {
        let bytes = std::fs::read(self.module_dir(module).join("module.json")).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    pub fn supervisor_status(&self, module: &str) -> Value {
        std::fs::read(self.module_dir(module).join("status.json"))
            .map(|bytes| serde_json::from_slice(&bytes).unwrap())
            .unwrap_or(Value::Null)
    }

    pub fn tracking_dir(&self, module: &str) -> PathBuf {
        PathBuf::from(
            self.record(module)["cgroups"]["tracking_dir"]
                .as_str()
                .unwrap(),
        )
    }

    /// The pids in a module's tracking cgroup.
    pub fn module_pids(&self, module: &str) -> Vec<i32> {
        std::fs::read_to_string(self.tracking_dir(module).join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }

    /// A request made by a process inside `module`'s cgroup: status and raw body, or why there
    /// was no answer.
    pub fn call_from_raw(
        &self,
        module: &str,
        socket: &Path,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<(u16, Vec<u8>), String> {
        let procs = self.tracking_dir(module).join("cgroup.procs");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/uds-request.py");
        let output = Command::new("/bin/sh")
            .args(["-c", "echo $$ > \"$1\" && shift && exec \"$@\"", "sh"])
            .arg(&procs)
            .arg("/usr/bin/python3")
            .arg(&script)
            .arg(socket)
            .args([method, path, body])
            .stdin(Stdio::null())
            .output()
            .map_err(|error| error.to_string())?;
        if !output.status.success() {
            return Err(format!(
                "no answer inside {module}: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let text = output.stdout;
        let split = text
            .iter()
            .position(|byte| *byte == b'\n')
            .unwrap_or(text.len());
        let status = String::from_utf8_lossy(&text[..split])
            .trim()
            .parse()
            .map_err(|_| format!("no status line: {:?}", String::from_utf8_lossy(&text)))?;
        let mut body = text.get(split + 1..).unwrap_or_default().to_vec();
        // The helper ends the body with a newline of its own.
        if body.last() == Some(&b'\n') {
            body.pop();
        }
        Ok((status, body))
    }

    /// A request made by a process inside `module`'s cgroup: (status, body).
    pub fn call_from(
        &self,
        module: &str,
        socket: &Path,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, Value) {
        let (status, body) = self
            .call_from_raw(module, socket, method, path, body)
            .unwrap_or_else(|error| panic!("{error}\nedged log:\n{}", self.edged.log()));
        let text = String::from_utf8_lossy(&body);
        let text = text.trim();
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(text).unwrap_or(Value::String(text.to_owned()))
        };
        (status, json)
    }

    /// A management call made by the agent.
    pub fn agent_call(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        self.call_from(&self.agent, &self.mgmt, method, path, body)
    }

    pub fn socket_of(&self, module: &str) -> PathBuf {
        self.homedir.join("mnt").join(format!("{module}.sock"))
    }

    /// Creates a module through the agent (201 expected) and starts it.
    pub fn create_and_start(&self, name: &str, image: &str, create_options: Value, env: Value) {
        let spec = json!({"name": name, "type": "process", "imagePullPolicy": "on-create",
            "config": {"settings": {"image": image, "createOptions": create_options}, "env": env}});
        let (status, body) = self.agent_call("POST", &format!("/modules?{V}"), &spec.to_string());
        assert_eq!(status, 201, "create {name}: {body}\n{}", self.edged.log());
        let (status, body) = self.mgmt(Method::POST, &format!("/modules/{name}/start?{V}"), "");
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "start {name}: {body}\n{}",
            self.edged.log()
        );
    }

    /// The module's log, demultiplexed.
    pub fn logs(&self, module: &str, query: &str) -> Vec<(u8, String)> {
        let (status, bytes) = self.call_raw(
            &self.mgmt,
            Method::GET,
            &format!("/modules/{module}/logs?{V}{query}"),
            "",
        );
        assert_eq!(
            status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        log_frames(&bytes)
    }

    pub fn stdout_lines(&self, module: &str) -> Vec<String> {
        self.logs(module, "")
            .into_iter()
            .filter(|(stream, _)| *stream == 1)
            .map(|(_, line)| line.trim_end().to_owned())
            .collect()
    }
}

pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.edged.stop();
        if let Some(stop) = self.identity_stop.take() {
            let _ = stop.send(());
        }
        // Modules outlive edged by design: end them and their cgroups here.
        let layout = edged::runtime::process::cgroup::detect().unwrap();
        let probe = layout.module_cgroups(&self.cgroup_name, "probe");
        for parent in probe.dirs.iter().filter_map(|dir| dir.parent()) {
            let Ok(children) = std::fs::read_dir(parent) else {
                continue;
            };
            for child in children.flatten().filter(|entry| entry.path().is_dir()) {
                let module = edged::runtime::process::cgroup::ModuleCgroups {
                    tracking_dir: child.path(),
                    tracking_version: Some(edged::runtime::process::cgroup::Version::V1),
                    ..Default::default()
                };
                module.kill_all(Duration::from_secs(10));
                let _ = std::fs::remove_dir(child.path());
            }
            let _ = std::fs::remove_dir(parent);
        }
        if let Ok(modules) = std::fs::read_dir(self.homedir.join("process")) {
            for module in modules.flatten() {
                if let Ok(bytes) = std::fs::read(module.path().join("status.json")) {
                    let status: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    if let Some(pid) = status["shim_pid"].as_i64() {
                        let started = status["shim_started"].as_u64();
                        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                            .unwrap_or_default();
                        let current = stat
                            .rsplit_once(')')
                            .and_then(|(_, rest)| rest.split_whitespace().nth(19))
                            .and_then(|field| field.parse::<u64>().ok());
                        if current.is_some() && current == started {
                            // SAFETY: kill(2) on a supervisor pid checked against its start time.
                            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        }
                    }
                }
            }
        }
        let _ = &self.root;
        let _ = &self.base;
    }
}
