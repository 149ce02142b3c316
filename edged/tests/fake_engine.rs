//! edged's service over a fake Docker engine served in-process on a temporary Unix socket: the
//! faults a real engine cannot be made to produce on demand (a pull that hangs, a 500, a pull
//! whose progress stream ends in an error), the "no global lock" rule (while one module's image
//! pull hangs, list, get, logs and another module's operations still answer at once), and image
//! garbage collection.

#![allow(clippy::unwrap_used)]

mod fake_peers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edged::identity::IdentityClient as _;
use edged::model::ModuleSpec;
use edged::runtime::docker::DockerRuntime;
use edged::runtime::LogOptions;
use edged::Edged;
use fake_peers::{serve_engine, FakeIdentity};
use http::{Method, StatusCode};
use http_body_util::BodyExt as _;
use http_common::{ApiError as _, Caller, Request, Response};

const OWNER: &str = "net.azure-devices.edge.owner";

struct FakeEngine {
    created_networks: std::sync::Mutex<Vec<serde_json::Value>>,
    removed_images: std::sync::Mutex<Vec<String>>,
    pull_started: AtomicBool,
    release_pull: tokio::sync::Notify,
    test_pid: u32,
}

fn json(status: StatusCode, value: serde_json::Value) -> Response {
    http_common::json_response(status, &value)
}

fn container(id: &str, name: &str) -> serde_json::Value {
    serde_json::json!({
        "Id": id, "Name": format!("/{name}"), "Image": "sha256:img",
        "State": {"Status": "running", "Pid": 42, "ExitCode": 0,
                  "StartedAt": "2024-05-01T10:00:00.123Z", "FinishedAt": "0001-01-01T00:00:00Z"},
        "Config": {"Image": "img", "Labels": {OWNER: "Microsoft.Azure.Devices.Edge.Agent",
                   "net.azure-devices.edge.original-image": "registry.example/m:1"}}
    })
}

struct EngineRouter(Arc<FakeEngine>);

impl http_common::Handler for EngineRouter {
    async fn handle(&self, request: Request) -> Response {
        let path = request.path.strip_prefix("/v1.41").unwrap_or("").to_owned();
        match (request.method.clone(), path.as_str()) {
            (Method::GET, "/containers/json") => json(
                StatusCode::OK,
                serde_json::json!([{"Id": "c1", "Names": ["/m1"], "ImageID": "sha256:img",
                    "State": "running", "Status": "Up 1 minute",
                    "Labels": {OWNER: "Microsoft.Azure.Devices.Edge.Agent"}}]),
            ),
            (Method::GET, "/containers/c1/json" | "/containers/m1/json") => {
                json(StatusCode::OK, container("c1", "m1"))
            }
            (Method::GET, "/containers/broken/json") => json(
                StatusCode::INTERNAL_SERVER_ERROR,
                serde_json::json!({"message": "engine exploded"}),
            ),
            (Method::GET, "/containers/m1/logs") => {
                let mut frame = vec![1u8, 0, 0, 0, 0, 0, 0, 3];
                frame.extend_from_slice(b"hi\n");
                let mut response = hyper::Response::new(http_common::full_body(frame));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/vnd.docker.raw-stream"),
                );
                response
            }
            (Method::GET, "/containers/edgeAgent/top") => json(
                StatusCode::OK,
                serde_json::json!({"Titles": ["UID", "PID", "CMD"],
                    "Processes": [["root", self.0.test_pid.to_string(), "agent"]]}),
            ),
            (Method::POST, "/images/create") => {
                let query = request.query.clone().unwrap_or_default();
                if query.contains("missing") {
                    return json(
                        StatusCode::OK,
                        serde_json::json!({"errorDetail": {"message": "manifest for missing:1 not found"},
                                           "error": "manifest for missing:1 not found"}),
                    );
                }
                if query.contains("slow") {
                    self.0.pull_started.store(true, Ordering::SeqCst);
                    self.0.release_pull.notified().await;
                }
                json(
                    StatusCode::OK,
                    serde_json::json!({"status": "Downloaded newer image"}),
                )
            }
            (Method::DELETE, path) if path.starts_with("/images/") => {
                self.0
                    .removed_images
                    .lock()
                    .unwrap()
                    .push(path["/images/".len()..].to_owned());
                json(StatusCode::OK, serde_json::json!([]))
            }
            (Method::GET, "/images/agent%3A1/json") => {
                json(StatusCode::OK, serde_json::json!({"Id": "sha256:agent"}))
            }
            (Method::GET, path) if path.starts_with("/images/") => {
                json(StatusCode::OK, serde_json::json!({"Id": "sha256:img"}))
            }
            (Method::GET, "/networks") => json(StatusCode::OK, serde_json::json!([])),
            (Method::POST, "/networks/create") => {
                let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
                self.0.created_networks.lock().unwrap().push(body);
                json(StatusCode::CREATED, serde_json::json!({"Id": "net"}))
            }
            (Method::POST, "/containers/create") => json(
                StatusCode::CREATED,
                serde_json::json!({"Id": "new-container"}),
            ),
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"message": format!("No such container: {path}")}),
            ),
        }
    }
}

fn spec(name: &str, image: &str) -> ModuleSpec {
    serde_json::from_value(serde_json::json!({
        "name": name, "type": "docker", "imagePullPolicy": "on-create",
        "config": {"settings": {"image": image, "createOptions": {},
                   "auth": {"username": "u", "password": "p", "serveraddress": "registry.example"}},
                   "env": []}
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_pull_blocks_nothing_else_and_docker_errors_keep_their_status() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine {
        created_networks: std::sync::Mutex::new(Vec::new()),
        removed_images: std::sync::Mutex::new(Vec::new()),
        pull_started: AtomicBool::new(false),
        release_pull: tokio::sync::Notify::new(),
        test_pid: std::process::id(),
    });
    let socket = dir.path().join("docker.sock");
    serve_engine(&socket, Arc::new(EngineRouter(Arc::clone(&engine))));

    let homedir = dir.path().join("home");
    std::fs::create_dir_all(homedir.join("gc")).unwrap();
    // An image ledger with old entries: one unused, one used by module m1, the agent's image,
    // and a recent one.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::fs::write(
        homedir.join("gc/image_use"),
        format!("sha256:old 1000\nsha256:img 1000\nsha256:agent 1000\nsha256:recent {now}\n"),
    )
    .unwrap();
    let config = edged::Config::from_toml(&format!(
        "hostname = \"h\"\nhomedir = \"{}\"\n[agent.config]\nimage = \"agent:1\"\n",
        homedir.display()
    ))
    .unwrap();
    let runtime = DockerRuntime::new(
        edged::docker::DockerClient::new(&socket),
        true,
        config.moby.network.clone(),
    );
    let (exit, _exit_receiver) = tokio::sync::mpsc::unbounded_channel();
    let edged = Arc::new(Edged::new(
        config,
        runtime,
        FakeIdentity,
        key_api::Client::from_uri("unix:///nonexistent/keyd.sock").unwrap(),
        cert_api::Client::from_uri("unix:///nonexistent/certd.sock").unwrap(),
        homedir,
        FakeIdentity.get_device().await.unwrap(),
        exit,
    ));
    // The test process plays the agent: the fake engine's `top` lists its pid.
    let caller = Caller {
        uid: 0,
        gid: 0,
        pid: i32::try_from(std::process::id()).unwrap(),
    };

    // Module "slow" pulls an image that never arrives (until released).
    let pulling = {
        let edged = Arc::clone(&edged);
        tokio::spawn(async move { edged.create_module(&caller, spec("slow", "slow:1")).await })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !engine.pull_started.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the pull never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Meanwhile everything else answers at once.
    let started = Instant::now();
    let modules = edged.list_modules().await.unwrap();
    assert_eq!(modules.len(), 1);
    assert_eq!(
        modules[0].status.runtime_status.description.as_deref(),
        Some("Up 1 minute")
    );
    assert_eq!(
        modules[0].config["settings"]["image"],
        "registry.example/m:1"
    );
    let module = edged.get_module("m1").await.unwrap();
    assert_eq!(
        module.status.start_time.as_deref(),
        Some("2024-05-01T10:00:00.123Z")
    );
    let logs = edged
        .module_logs("m1", &LogOptions::default())
        .await
        .unwrap();
    let bytes = logs.collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], b"\x01\x00\x00\x00\x00\x00\x00\x03hi\n");
    let other = edged
        .create_module(&caller, spec("other", "fast:1"))
        .await
        .unwrap();
    assert_eq!(other.status.runtime_status.status, "stopped");
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "blocked for {elapsed:?}");
    assert!(!pulling.is_finished(), "the slow pull finished early");

    // Release the pull: the slow create completes.
    engine.release_pull.notify_one();
    let created = tokio::time::timeout(Duration::from_secs(5), pulling)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(created.id, "new-container");
    assert!(serde_json::to_string(&created)
        .unwrap()
        .find("\"password\"")
        .is_none());

    // Image garbage collection removes only the old, unused, non-agent ledger image.
    edged::watchdog::sweep_images(&edged).await.unwrap();
    assert_eq!(
        *engine.removed_images.lock().unwrap(),
        vec!["sha256%3Aold".to_owned()]
    );
    let ledger = std::fs::read_to_string(dir.path().join("home/gc/image_use")).unwrap();
    assert!(
        !ledger.contains("sha256:old") && ledger.contains("sha256:recent"),
        "{ledger}"
    );

    // Docker errors keep Docker's status and message; a failed pull is a 404.
    let error = edged.get_module("broken").await.unwrap_err();
    assert_eq!(error.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(error.server_message(), "engine exploded");
    let error = edged.get_module("nothing").await.unwrap_err();
    assert_eq!(error.status(), StatusCode::NOT_FOUND);
    let error = edged
        .create_module(&caller, spec("missing", "missing:1"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), StatusCode::NOT_FOUND, "{error}");
    assert!(error.to_string().contains("not found"), "{error}");

    // A caller that is not in the agent container is refused before any Docker work.
    let stranger = Caller { pid: 1, ..caller };
    let error = edged
        .create_module(&stranger, spec("x", "fast:1"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), StatusCode::FORBIDDEN);
    let error = edged
        .create_module(&Caller { pid: 0, ..caller }, spec("x", "fast:1"))
        .await
        .unwrap_err();
    assert_eq!(error.status(), StatusCode::FORBIDDEN);
}

/// An invalid configuration exits with 153 and names the file and key.
#[test]
fn an_invalid_configuration_exits_153() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let cases = [
        ("hostname = \"h\"\nhomedir = \"/h\"\nbogus = 1\n[agent.config]\nimage = \"i\"\n", "bogus"),
        (
            "hostname = \"h\"\nhomedir = \"/h\"\n[agent.config]\nimage = \"i\"\n[edge_ca]\ncert = \"a\"\n[certificates]\ndevice_ca_cert = \"b\"\ndevice_ca_pk = \"b\"\n",
            "certificates",
        ),
        ("homedir = \"/h\"\n[agent.config]\nimage = \"i\"\n", "hostname"),
    ];
    for (text, key) in cases {
        std::fs::write(&config, text).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_edged"))
            .env("AZIOT_EDGED_CONFIG", &config)
            .env("AZIOT_EDGED_CONFIG_DIR", dir.path().join("none"))
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(153), "{log}");
        assert!(log.contains(key) && log.contains("config.toml"), "{log}");
    }
}

/// The HTTP conventions on both route tables (no socket: the routers are called directly):
/// api-version rules per route, 404 / 405 + `Allow`, aliases, path decoding, body rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_rules_of_both_apis() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine {
        created_networks: std::sync::Mutex::new(Vec::new()),
        removed_images: std::sync::Mutex::new(Vec::new()),
        pull_started: AtomicBool::new(false),
        release_pull: tokio::sync::Notify::new(),
        test_pid: std::process::id(),
    });
    let socket = dir.path().join("docker.sock");
    serve_engine(&socket, Arc::new(EngineRouter(Arc::clone(&engine))));
    let homedir = dir.path().join("home");
    std::fs::create_dir_all(homedir.join("gc")).unwrap();
    let config = edged::Config::from_toml(&format!(
        "hostname = \"h\"\nhomedir = \"{}\"\n[agent.config]\nimage = \"agent:1\"\n",
        homedir.display()
    ))
    .unwrap();
    let runtime = DockerRuntime::new(
        edged::docker::DockerClient::new(&socket),
        true,
        config.moby.network.clone(),
    );
    let (exit, _exit_receiver) = tokio::sync::mpsc::unbounded_channel();
    let edged = Arc::new(Edged::new(
        config,
        runtime,
        FakeIdentity,
        key_api::Client::from_uri("unix:///nonexistent/keyd.sock").unwrap(),
        cert_api::Client::from_uri("unix:///nonexistent/certd.sock").unwrap(),
        homedir,
        FakeIdentity.get_device().await.unwrap(),
        exit,
    ));
    let management = edged::routes::ManagementRouter::new(Arc::clone(&edged));
    let workload = edged::routes::WorkloadRouter::new(Arc::clone(&edged));
    let host = Caller {
        uid: 0,
        gid: 0,
        pid: 1,
    };
    async fn call(
        handler: &impl http_common::Handler,
        method: Method,
        path: &str,
        body: &str,
        content_type: Option<&str>,
        caller: Caller,
    ) -> (u16, String, http::HeaderMap) {
        let mut request = Request::new(method, path, body.to_owned(), caller);
        if let Some(content_type) = content_type {
            request.headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_str(content_type).unwrap(),
            );
        }
        let response = handler.handle(request).await;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|value| value["message"].as_str().map(str::to_owned))
            .unwrap_or_default();
        (status, message, headers)
    }
    let v = "api-version=2022-08-03";
    let cases: Vec<(Method, String, &str, u16, &str)> = vec![
        (Method::GET, "/nope".into(), "", 404, "not found"),
        (
            Method::GET,
            "/modules".into(),
            "",
            400,
            "api-version not specified",
        ),
        (
            Method::GET,
            "/modules?api-version=2020-01-01".into(),
            "",
            400,
            "invalid api-version \"2020-01-01\"",
        ),
        (
            Method::GET,
            format!("/modules?{v}&{v}"),
            "",
            400,
            "api-version specified more than once",
        ),
        (
            Method::GET,
            "/modules?api-version=2021-05-11".into(),
            "",
            200,
            "",
        ),
        (Method::GET, format!("/modules/?{v}"), "", 200, ""),
        (Method::GET, format!("/modules/m1?{v}"), "", 200, ""),
        (Method::GET, format!("/modules/%2Fm1?{v}"), "", 200, ""),
        (Method::GET, format!("/modules/nothing?{v}"), "", 404, ""),
        (
            Method::PATCH,
            format!("/modules/m1?{v}"),
            "",
            405,
            "method not allowed",
        ),
        (
            Method::GET,
            format!("/modules/m1/start?{v}"),
            "",
            405,
            "method not allowed",
        ),
        (
            Method::POST,
            format!("/modules/m1/unknown?{v}"),
            "",
            404,
            "not found",
        ),
        (
            Method::POST,
            "/modules/m1/prepareupdate?api-version=2018-06-28".into(),
            "{}",
            404,
            "not found",
        ),
        (
            Method::POST,
            "/device/reprovision?api-version=2019-01-30".into(),
            "",
            404,
            "not found",
        ),
        (
            Method::GET,
            "/systeminfo/resources?api-version=2019-10-22".into(),
            "",
            404,
            "not found",
        ),
        (
            Method::GET,
            "/systeminfo/supportbundle?api-version=2019-11-05".into(),
            "",
            404,
            "not found",
        ),
        (Method::POST, format!("/modules?{v}"), "", 403, "forbidden"),
        (
            Method::POST,
            format!("/identities?{v}"),
            "{}",
            403,
            "forbidden",
        ),
        (
            Method::DELETE,
            format!("/identities/x?{v}"),
            "",
            403,
            "forbidden",
        ),
        (
            Method::GET,
            format!("/identities/x?{v}"),
            "",
            405,
            "method not allowed",
        ),
        (
            Method::GET,
            format!("/modules/m1/logs?{v}&follow=maybe"),
            "",
            400,
            "invalid parameter: follow",
        ),
    ];
    for (method, path, body, status, message) in cases {
        let (actual, text, _) = call(&management, method.clone(), &path, body, None, host).await;
        assert_eq!(actual, status, "management {method} {path}: {text}");
        if !message.is_empty() {
            assert_eq!(
                text.lines().next().unwrap_or(""),
                message,
                "management {method} {path}"
            );
        }
    }
    let (_, _, headers) = call(
        &management,
        Method::PATCH,
        &format!("/modules/m1?{v}"),
        "",
        None,
        host,
    )
    .await;
    assert_eq!(headers[http::header::ALLOW], "GET, PUT, DELETE");

    // Body rules, from the agent (the test process): 415, 400 missing, 422 shape, 400 settings.
    let agent = Caller {
        pid: i32::try_from(std::process::id()).unwrap(),
        ..host
    };
    let body_cases: Vec<(&str, Option<&str>, u16)> = vec![
        ("{}", Some("text/plain"), 415),
        ("", None, 400),
        ("{\"name\": 5}", None, 422),
        (
            r#"{"name":"x","type":"docker","imagePullPolicy":"sometimes","config":{"settings":{"image":"i"}}}"#,
            Some("application/json; charset=utf-8"),
            400,
        ),
        (
            r#"{"name":"x","type":"docker","config":{"settings":{"image":"i","createOptions":{"Env":"A=1"}}}}"#,
            None,
            400,
        ),
        (
            r#"{"name":"x","type":"docker","config":{"settings":{"image":"i"},"env":[{"key":"A","value":"1"},{"key":"A","value":"2"}]}}"#,
            None,
            400,
        ),
    ];
    for (body, content_type, status) in body_cases {
        let (actual, text, _) = call(
            &management,
            Method::POST,
            &format!("/modules?{v}"),
            body,
            content_type,
            agent,
        )
        .await;
        assert_eq!(actual, status, "{body}: {text}");
    }

    let workload_cases: Vec<(Method, String, &str, u16, &str)> = vec![
        (Method::GET, format!("/modules?{v}"), "", 200, ""),
        (
            Method::GET,
            "/modules".into(),
            "",
            400,
            "api-version not specified",
        ),
        (
            Method::GET,
            format!("/modules/m1/genid/1/sign?{v}"),
            "",
            405,
            "method not allowed",
        ),
        (
            Method::POST,
            format!("/modules/m1/genid/1/sign?{v}"),
            r#"{"data":"aGk="}"#,
            403,
            "forbidden",
        ),
        (
            Method::POST,
            format!("/modules/m1/genid/1/certificate/server?{v}"),
            r#"{"commonName":"x"}"#,
            403,
            "forbidden",
        ),
        (
            Method::POST,
            format!("/modules/m1/certificate/identity?{v}"),
            "",
            403,
            "forbidden",
        ),
        (
            Method::POST,
            format!("/modules/m1/genid/1/other?{v}"),
            "{}",
            404,
            "not found",
        ),
        (
            Method::POST,
            format!("/trust-bundle?{v}"),
            "",
            405,
            "method not allowed",
        ),
    ];
    for (method, path, body, status, message) in workload_cases {
        let (actual, text, _) = call(&workload, method.clone(), &path, body, None, host).await;
        assert_eq!(actual, status, "workload {method} {path}: {text}");
        if !message.is_empty() {
            assert_eq!(text, message, "workload {method} {path}");
        }
    }
    // The module itself (here: the test process plays a process of container `edgeAgent`) gets
    // past the caller check; bad base64 is then a 400 naming the parameter.
    let (status, text, _) = call(
        &workload,
        Method::POST,
        &format!("/modules/$edgeAgent/genid/1/sign?{v}"),
        r#"{"data":"***"}"#,
        None,
        agent,
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.starts_with("invalid parameter: data"), "{text}");
}

/// Every route of both tables is documented in docs/edged.md.
#[test]
fn every_route_is_documented() {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/edged.md")).unwrap();
    for (_, path) in edged::routes::MANAGEMENT_ROUTES
        .iter()
        .chain(edged::routes::WORKLOAD_ROUTES)
    {
        assert!(docs.contains(path), "{path} is not in docs/edged.md");
    }
}

/// At startup the module network is created with the configured IPv6 and IPAM settings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_network_is_created_with_its_ipam_settings() {
    use edged::runtime::ModuleRuntime as _;
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(FakeEngine {
        created_networks: std::sync::Mutex::new(Vec::new()),
        removed_images: std::sync::Mutex::new(Vec::new()),
        pull_started: AtomicBool::new(false),
        release_pull: tokio::sync::Notify::new(),
        test_pid: std::process::id(),
    });
    let socket = dir.path().join("docker.sock");
    serve_engine(&socket, Arc::new(EngineRouter(Arc::clone(&engine))));
    let config = edged::Config::from_toml(
        "hostname = \"h\"\nhomedir = \"/h\"\n[agent.config]\nimage = \"a\"\n\
         [moby_runtime.network]\nname = \"edge-net\"\nipv6 = true\n\
         [[moby_runtime.network.ipam.config]]\ngateway = \"172.30.0.1\"\nsubnet = \"172.30.0.0/16\"\nip_range = \"172.30.5.0/24\"\n",
    )
    .unwrap();
    let runtime = DockerRuntime::new(
        edged::docker::DockerClient::new(&socket),
        true,
        config.moby.network.clone(),
    );
    runtime.prepare().await.unwrap();
    let created = engine.created_networks.lock().unwrap().clone();
    assert_eq!(
        created,
        vec![
            serde_json::json!({"Name": "edge-net", "Driver": "bridge", "CheckDuplicate": true,
            "EnableIPv6": true, "IPAM": {"Driver": "default", "Config": [
                {"Gateway": "172.30.0.1", "Subnet": "172.30.0.0/16", "IPRange": "172.30.5.0/24"}]}})
        ]
    );
}
