//! Test harness: the real keyd and certd binaries, an in-process fake identityd (module keys are
//! real keyd derived keys, so signatures can be checked by exporting them), the real edged
//! binary, and the real Docker engine with a locally built `FROM scratch` image holding Debian's
//! static busybox and a static Unix-socket HTTP client (`tests/support/uds_client.rs`).
//!
//! Everything a test creates in Docker (image, containers, network) is named with a unique
//! suffix and removed on drop. Docker scenarios take [`docker_lock`]: edged treats every
//! container with the owner label as its module, so two edged instances must not run at once.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::{Method, StatusCode};
use http_common::{json_response, Request, Response};
use key_api::KeyHandle;

/// The hub and device the fake identityd reports.
pub const HUB: &str = "edged-test-hub.example.net";
/// The device ID the fake identityd reports.
pub const DEVICE: &str = "edged-test-device";
/// The api-version the tests send.
pub const V: &str = "api-version=2022-08-03";

/// Serializes Docker scenarios across threads and processes (two `cargo test` runs on one
/// machine): edged stops and removes every container with the owner label at startup.
pub struct DockerLock {
    _thread: std::sync::MutexGuard<'static, ()>,
    _file: std::fs::File,
}

/// Takes the Docker lock (an in-process mutex plus `flock` on a file in the temp folder).
pub fn docker_lock() -> DockerLock {
    static LOCK: Mutex<()> = Mutex::new(());
    let thread = LOCK.lock().unwrap_or_else(|poison| poison.into_inner());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("edged-docker-tests.lock"))
        .unwrap();
    // SAFETY: flock(2) on an fd we own; it blocks until the lock is ours and is released when
    // the file is closed.
    let result = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) };
    assert_eq!(result, 0, "flock failed");
    DockerLock {
        _thread: thread,
        _file: file,
    }
}

pub use system_tests::Daemon;

pub mod process;

/// A binary built next to edged's (keyd, certd, identityd).
pub fn sibling_binary(name: &str) -> PathBuf {
    system_tests::sibling_binary(env!("CARGO_BIN_EXE_edged"), name)
}

/// Starts keyd and certd under `base` (sockets `base/keyd.sock` and `base/certd.sock`, homes
/// `base/keyd-home` and `base/certd-home`); `keyd_tables` and `certd_tables` are extra TOML
/// tables for their configs.
pub fn start_keyd_certd(base: &Path, keyd_tables: &str, certd_tables: &str) -> (Daemon, Daemon) {
    let mut keyd = Daemon::new(
        "keyd",
        sibling_binary("keyd"),
        base,
        "AZIOT_KEYD_CONFIG",
        "AZIOT_KEYD_CONFIG_DIR",
    )
    .with_socket(base.join("keyd.sock"));
    std::fs::write(
        keyd.config_file(),
        format!(
            "[aziot_keys]\nhomedir_path = \"{}\"\n{keyd_tables}[endpoints]\naziot_keyd = \"unix://{}\"\n",
            base.join("keyd-home").display(),
            keyd.socket.display()
        ),
    )
    .unwrap();
    keyd.spawn_within(Duration::from_secs(30));
    let mut certd = Daemon::new(
        "certd",
        sibling_binary("certd"),
        base,
        "AZIOT_CERTD_CONFIG",
        "AZIOT_CERTD_CONFIG_DIR",
    )
    .with_socket(base.join("certd.sock"));
    std::fs::write(
        certd.config_file(),
        format!(
            "homedir_path = \"{}\"\n{certd_tables}\
             [endpoints]\naziot_certd = \"unix://{}\"\naziot_keyd = \"unix://{}\"\n",
            base.join("certd-home").display(),
            certd.socket.display(),
            keyd.socket.display()
        ),
    )
    .unwrap();
    certd.spawn_within(Duration::from_secs(30));
    (keyd, certd)
}

/// Runs the docker CLI; returns (success, stdout, stderr).
pub fn docker(args: &[&str]) -> (bool, String, String) {
    let output = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the docker CLI must be installed");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Builds (once per call) the static Unix-socket client with rustc.
fn build_uds_client(out: &Path) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/uds_client.rs");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let output = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
            "-o",
        ])
        .arg(out)
        .arg(&source)
        .output()
        .expect("rustc must be available to build the static test client");
    assert!(
        output.status.success(),
        "building the static test client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A test image: `FROM scratch`, busybox, the static client. Removed on drop.
pub struct TestImage {
    pub tag: String,
}

impl TestImage {
    pub fn build(suffix: &str, dir: &Path) -> Self {
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox is missing: apt-get install busybox-static (tools/test.sh does this)"
        );
        let context = dir.join("image");
        std::fs::create_dir_all(&context).unwrap();
        std::fs::copy(busybox, context.join("busybox")).unwrap();
        // A unique layer: images of concurrent test runs must not share an ID (Docker's
        // `ancestor` filter, used for clean-up, matches by ID).
        std::fs::write(context.join("test-run"), suffix).unwrap();
        build_uds_client(&context.join("uds-client"));
        std::fs::write(
            context.join("Dockerfile"),
            "FROM scratch\nCOPY busybox /bin/busybox\nCOPY uds-client /bin/uds-client\nCOPY test-run /etc/test-run\n\
             RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
        )
        .unwrap();
        let tag = format!("edged-test-image:{suffix}");
        let (ok, _, stderr) = docker(&["build", "-q", "-t", &tag, context.to_str().unwrap()]);
        assert!(ok, "docker build failed: {stderr}");
        TestImage { tag }
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = docker(&["rmi", "-f", &self.tag]);
    }
}

/// The fake identityd: device and module identities in memory, module keys derived in keyd.
pub struct FakeIdentityd {
    keyd: key_api::Client,
    master: KeyHandle,
    modules: Mutex<BTreeMap<String, String>>,
    counter: std::sync::atomic::AtomicU64,
    pub calls: Mutex<Vec<String>>,
}

impl FakeIdentityd {
    fn new_gen_id(&self) -> String {
        let count = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("gen-{count}-{}", std::process::id())
    }

    /// The generation ID of a module, if it exists.
    pub fn gen_id(&self, module: &str) -> Option<String> {
        self.modules.lock().unwrap().get(module).cloned()
    }

    async fn derived(&self, module: &str, gen_id: &str) -> KeyHandle {
        self.keyd
            .create_derived_key(&self.master, format!("{module}:{gen_id}").as_bytes())
            .await
            .unwrap()
    }

    /// The module's SAS key bytes (exported from keyd).
    pub async fn module_key(&self, module: &str) -> Vec<u8> {
        let gen_id = self.gen_id(module).expect("module identity exists");
        let handle = self.derived(module, &gen_id).await;
        self.keyd.export_derived_key(&handle).await.unwrap()
    }

    async fn identity(&self, module: &str, gen_id: &str) -> serde_json::Value {
        let handle = self.derived(module, gen_id).await;
        serde_json::json!({"type": "aziot", "spec": {"hubName": HUB, "gatewayHost": HUB,
            "deviceId": DEVICE, "moduleId": module, "genId": gen_id,
            "auth": {"type": "sas", "keyHandle": handle.0}}})
    }

    async fn answer(&self, request: &Request) -> Response {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{} {}", request.method, request.path));
        let not_found = || {
            json_response(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"message": "not found"}),
            )
        };
        match (&request.method, request.path.as_str()) {
            (&Method::POST, "/identities/device") => json_response(
                StatusCode::OK,
                &serde_json::json!({"type": "aziot", "spec": {"hubName": HUB, "gatewayHost": HUB,
                    "deviceId": DEVICE, "auth": {"type": "sas", "keyHandle": self.master.0}}}),
            ),
            (&Method::POST, "/identities/device/reprovision") => {
                http_common::empty_response(StatusCode::NO_CONTENT)
            }
            (&Method::GET, "/identities/modules") => {
                let modules = self.modules.lock().unwrap().clone();
                let identities: Vec<serde_json::Value> = modules
                    .iter()
                    .map(|(module, gen_id)| {
                        serde_json::json!({"type": "aziot", "spec": {"hubName": HUB,
                            "gatewayHost": HUB, "deviceId": DEVICE, "moduleId": module,
                            "genId": gen_id}})
                    })
                    .collect();
                json_response(
                    StatusCode::OK,
                    &serde_json::json!({ "identities": identities }),
                )
            }
            (&Method::POST, "/identities/modules") => {
                let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
                let module = body["moduleId"].as_str().unwrap().to_owned();
                let gen_id = self.new_gen_id();
                self.modules
                    .lock()
                    .unwrap()
                    .insert(module.clone(), gen_id.clone());
                json_response(StatusCode::OK, &self.identity(&module, &gen_id).await)
            }
            (method, path) if path.starts_with("/identities/modules/") => {
                let module =
                    percent_encoding::percent_decode_str(&path["/identities/modules/".len()..])
                        .decode_utf8()
                        .unwrap()
                        .into_owned();
                let existing = self.gen_id(&module);
                match *method {
                    Method::GET => match existing {
                        Some(gen_id) => {
                            json_response(StatusCode::OK, &self.identity(&module, &gen_id).await)
                        }
                        None => not_found(),
                    },
                    Method::PUT => {
                        let gen_id = existing.unwrap_or_else(|| {
                            let gen_id = self.new_gen_id();
                            self.modules
                                .lock()
                                .unwrap()
                                .insert(module.clone(), gen_id.clone());
                            gen_id
                        });
                        json_response(StatusCode::OK, &self.identity(&module, &gen_id).await)
                    }
                    Method::DELETE => {
                        self.modules.lock().unwrap().remove(&module);
                        http_common::empty_response(StatusCode::NO_CONTENT)
                    }
                    _ => not_found(),
                }
            }
            _ => not_found(),
        }
    }
}

struct FakeRouter(Arc<FakeIdentityd>);

/// A raw request from the test process (a host pid) to `socket` on `runtime`: status and body
/// bytes (a JSON content type when there is a body).
pub fn call_raw(
    runtime: &tokio::runtime::Runtime,
    socket: &Path,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, Vec<u8>) {
    let client = http_common::UdsClient::new(socket);
    let headers: &[(&str, &str)] = if body.is_empty() {
        &[]
    } else {
        &[("content-type", "application/json")]
    };
    let response = runtime
        .block_on(client.send(method, path, headers, body.to_owned().into()))
        .unwrap();
    (response.status, response.body.to_vec())
}

/// Serves a fake identityd on `socket` (module keys derived in the keyd at `keyd_socket`) until
/// the returned sender is used or dropped.
pub fn start_fake_identityd(
    runtime: &tokio::runtime::Runtime,
    keyd_socket: &Path,
    socket: &Path,
) -> (Arc<FakeIdentityd>, tokio::sync::oneshot::Sender<()>) {
    let keyd_client = key_api::Client::new(http_common::UdsClient::new(keyd_socket));
    let master = runtime
        .block_on(keyd_client.create_key_if_not_exists("edged-test-identity-master", "derive,sign"))
        .unwrap();
    let identity = Arc::new(FakeIdentityd {
        keyd: keyd_client,
        master,
        modules: Mutex::new(BTreeMap::new()),
        counter: std::sync::atomic::AtomicU64::new(1),
        calls: Mutex::new(Vec::new()),
    });
    let listener = {
        let _guard = runtime.enter();
        http_common::listener::listen(
            &http_common::listener::ListenerUri::Unix(socket.to_owned()),
            &http_common::listener::SystemdFds::default(),
            None,
            0o660,
        )
        .unwrap()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(http_common::serve(
        listener,
        Arc::new(FakeRouter(Arc::clone(&identity))),
        http_common::ServerOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    (identity, stop)
}

impl http_common::Handler for FakeRouter {
    async fn handle(&self, request: Request) -> Response {
        self.0.answer(&request).await
    }
}

/// keyd + certd + fake identityd + edged, with a test image and unique names.
pub struct Harness {
    pub root: tempfile::TempDir,
    pub suffix: String,
    pub runtime: tokio::runtime::Runtime,
    pub keyd: Daemon,
    pub certd: Daemon,
    pub edged: Daemon,
    pub identity: Arc<FakeIdentityd>,
    pub image: TestImage,
    pub agent: String,
    pub network: String,
    pub homedir: PathBuf,
    pub mgmt: PathBuf,
    pub workload: PathBuf,
    identity_stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// The agent's command: exits promptly on SIGTERM.
pub const LOOP_COMMAND: &str = "trap 'exit 0' TERM; while true; do sleep 1; done";

impl Harness {
    /// Starts keyd, certd and the fake identityd, builds the image and writes edged's config;
    /// edged itself is started with [`Harness::start_edged`].
    pub fn new() -> Self {
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let image = TestImage::build(&suffix, &base);

        let (keyd, certd) = start_keyd_certd(
            &base,
            "",
            "[cert_issuance.aziot-edged-ca]\nmethod = \"self_signed\"\nexpiry_days = 90\n\
             [preloaded_certs]\naziot-edged-trust-bundle = [\"aziot-edged-ca\"]\n",
        );

        let identity_socket = base.join("identityd.sock");
        let (identity, identity_stop) =
            start_fake_identityd(&runtime, &keyd.socket, &identity_socket);

        let agent = format!("edged-test-agent-{suffix}");
        let network = format!("edged-test-net-{suffix}");
        let homedir = base.join("edged-home");
        let mgmt = base.join("mgmt.sock");
        let workload = base.join("workload.sock");
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
[agent]
name = "{agent}"
type = "docker"
imagePullPolicy = "never"
[agent.config]
image = "{image}"
createOptions = {{ Cmd = ["/bin/sh", "-c", "{command}"] }}
[agent.env]
RuntimeLogLevel = "debug"
[connect]
workload_uri = "unix://{workload}"
management_uri = "unix://{mgmt}"
[listen]
workload_uri = "unix://{workload}"
management_uri = "unix://{mgmt}"
[moby_runtime]
uri = "unix:///var/run/docker.sock"
network = "{network}"
[image_garbage_collection]
enabled = false
[endpoints]
aziot_keyd_url = "unix://{keyd}"
aziot_certd_url = "unix://{certd}"
aziot_identityd_url = "unix://{identityd}"
"#,
            homedir = homedir.display(),
            image = image.tag,
            command = LOOP_COMMAND,
            workload = workload.display(),
            mgmt = mgmt.display(),
            keyd = keyd.socket.display(),
            certd = certd.socket.display(),
            identityd = identity_socket.display(),
        );
        std::fs::write(edged.config_file(), config).unwrap();
        Harness {
            root,
            suffix,
            runtime,
            keyd,
            certd,
            edged,
            identity,
            image,
            agent,
            network,
            homedir,
            mgmt,
            workload,
            identity_stop: Some(identity_stop),
        }
    }

    /// Switches edged's `[listen]` URIs to the systemd fd names.
    pub fn listen_on_systemd_fds(&self) {
        let config = std::fs::read_to_string(self.edged.config_file()).unwrap();
        let unix_listen = format!(
            "[listen]\nworkload_uri = \"unix://{}\"\nmanagement_uri = \"unix://{}\"\n",
            self.workload.display(),
            self.mgmt.display()
        );
        assert!(config.contains(&unix_listen));
        let config = config.replace(
            &unix_listen,
            "[listen]\nworkload_uri = \"fd://aziot-edged.workload.socket\"\n\
             management_uri = \"fd://aziot-edged.mgmt.socket\"\n",
        );
        std::fs::write(self.edged.config_file(), config).unwrap();
    }

    /// Starts edged and waits for its management socket.
    pub fn start_edged(&mut self) {
        let _ = std::fs::remove_file(&self.mgmt);
        self.edged.spawn_within(Duration::from_secs(60));
    }

    /// A unique module name.
    pub fn module_name(&self, base: &str) -> String {
        format!("edged-test-{base}-{}", self.suffix)
    }

    /// A raw request from the test process (a host pid) to a socket: status and body bytes.
    pub fn call_raw(
        &self,
        socket: &Path,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, Vec<u8>) {
        call_raw(&self.runtime, socket, method, path, body)
    }

    /// A JSON request from the test process to the management socket.
    pub fn mgmt(&self, method: Method, path: &str, body: &str) -> (StatusCode, serde_json::Value) {
        let (status, bytes) = self.call_raw(&self.mgmt, method, path, body);
        (status, parse_json(&bytes))
    }

    /// A request made by a process inside `container` (docker exec of the static client).
    pub fn exec_call(
        &self,
        container: &str,
        socket: &str,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let (ok, stdout, stderr) = docker(&[
            "exec",
            container,
            "/bin/uds-client",
            socket,
            method,
            path,
            body,
        ]);
        assert!(
            ok,
            "docker exec in {container} failed: {stderr}\nedged log:\n{}",
            self.edged.log()
        );
        let (status, bytes) = parse_http(stdout.as_bytes());
        (status, parse_json(&bytes))
    }

    /// Docker's state of a container (`running`, `exited`, ...), `None` when absent.
    pub fn container_state(&self, name: &str) -> Option<String> {
        let (ok, stdout, _) = docker(&["inspect", "-f", "{{.State.Status}}", name]);
        ok.then(|| stdout.trim().to_owned())
    }

    /// The container ID.
    pub fn container_id(&self, name: &str) -> Option<String> {
        let (ok, stdout, _) = docker(&["inspect", "-f", "{{.Id}}", name]);
        ok.then(|| stdout.trim().to_owned())
    }

    /// Waits until `predicate` holds or panics with the edged log.
    pub fn wait_for(&self, what: &str, timeout: Duration, mut predicate: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !predicate() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nedged log:\n{}",
                self.edged.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// keyd's client.
    pub fn keyd_client(&self) -> key_api::Client {
        key_api::Client::new(http_common::UdsClient::new(&self.keyd.socket))
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.edged.stop();
        if let Some(stop) = self.identity_stop.take() {
            let _ = stop.send(());
        }
        // Every container made from the test image (agent and modules), then the network.
        let (_, ids, _) = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("ancestor={}", self.image.tag),
        ]);
        for id in ids.split_whitespace() {
            let _ = docker(&["rm", "-f", id]);
        }
        let _ = docker(&["rm", "-f", &self.agent]);
        let _ = docker(&["network", "rm", &self.network]);
    }
}

/// A stand-in for systemd's notify socket with a file-descriptor store (`FDSTORE=1`,
/// `FDSTOREREMOVE=1`, `FDNAME=`).
pub struct FakeSystemd {
    pub path: PathBuf,
    socket: std::os::unix::net::UnixDatagram,
    /// The stored fds, by name, in arrival order.
    pub store: Vec<(String, OwnedFd)>,
    /// Every message text received.
    pub messages: Vec<String>,
}

impl FakeSystemd {
    pub fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        FakeSystemd {
            path,
            socket,
            store: Vec::new(),
            messages: Vec::new(),
        }
    }

    /// Reads every pending notification and applies it to the store.
    pub fn drain(&mut self) {
        use std::os::fd::AsRawFd;
        loop {
            let mut buffer = [0u8; 4096];
            let mut iov = libc::iovec {
                iov_base: buffer.as_mut_ptr().cast(),
                iov_len: buffer.len(),
            };
            let mut control = [0u64; 32];
            // SAFETY: plain data, filled in below.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_iov = &mut iov;
            header.msg_iovlen = 1;
            header.msg_control = control.as_mut_ptr().cast();
            header.msg_controllen = std::mem::size_of_val(&control) as _;
            // SAFETY: the header's buffers are valid for the call.
            let received = unsafe {
                libc::recvmsg(
                    self.socket.as_raw_fd(),
                    &mut header,
                    libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
                )
            };
            if received < 0 {
                break;
            }
            let mut fds = Vec::new();
            // SAFETY: walking the control messages the kernel wrote into our buffer.
            unsafe {
                let mut cmsg = libc::CMSG_FIRSTHDR(&header);
                while !cmsg.is_null() {
                    if (*cmsg).cmsg_level == libc::SOL_SOCKET
                        && (*cmsg).cmsg_type == libc::SCM_RIGHTS
                    {
                        let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                            / std::mem::size_of::<libc::c_int>();
                        let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                        for index in 0..count {
                            fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(
                                data.add(index),
                            )));
                        }
                    }
                    cmsg = libc::CMSG_NXTHDR(&header, cmsg);
                }
            }
            let text = String::from_utf8_lossy(&buffer[..received as usize]).into_owned();
            let name = text
                .lines()
                .find_map(|line| line.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_owned();
            if text.lines().any(|line| line == "FDSTOREREMOVE=1") {
                self.store.retain(|(stored, _)| *stored != name);
            }
            if text.lines().any(|line| line == "FDSTORE=1") {
                for fd in fds {
                    self.store.push((name.clone(), fd));
                }
            }
            self.messages.push(text);
        }
    }

    /// The stored fds as (name, raw fd) pairs.
    pub fn passed(&self) -> Vec<(String, RawFd)> {
        use std::os::fd::AsRawFd;
        self.store
            .iter()
            .map(|(name, fd)| (name.clone(), fd.as_raw_fd()))
            .collect()
    }
}

/// Splits a raw HTTP/1.1 response into status and (de-chunked) body.
pub fn parse_http(raw: &[u8]) -> (u16, Vec<u8>) {
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = body.as_slice();
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..line_end]).trim(), 16)
                .unwrap();
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    (status, body)
}

/// Parses a JSON body (Null when empty).
pub fn parse_json(bytes: &[u8]) -> serde_json::Value {
    if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|_| panic!("body is not JSON: {:?}", String::from_utf8_lossy(bytes)))
    }
}

/// Demultiplexes Docker's framed log stream: (stream type, payload) pairs.
pub fn log_frames(mut bytes: &[u8]) -> Vec<(u8, String)> {
    let mut frames = Vec::new();
    while bytes.len() >= 8 {
        let kind = bytes[0];
        assert_eq!(&bytes[1..4], &[0, 0, 0], "bad frame header");
        let length = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        frames.push((
            kind,
            String::from_utf8_lossy(&bytes[8..8 + length]).into_owned(),
        ));
        bytes = &bytes[8 + length..];
    }
    assert!(bytes.is_empty(), "trailing bytes after the last frame");
    frames
}

/// Standard base64.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Standard base64 decoding.
pub fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

/// HMAC-SHA256 with OpenSSL (independent of keyd and edged).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = openssl::pkey::PKey::hmac(key).unwrap();
    let mut signer =
        openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key).unwrap();
    signer.update(data).unwrap();
    signer.sign_to_vec().unwrap()
}
