//! The commands that talk to daemons, against small fake edged / identityd servers built on
//! `http_common::serve` (faults on demand), and `check` on broken and good configurations.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};

use std::process::Command;

use common::{describe, fixtures, iotedge};
use http_common::{Request, Response};

/// A fake edged management API + identityd reprovision route that records what it was asked.
#[derive(Default)]
struct Fake {
    requests: Mutex<Vec<String>>,
}

fn frame(stream: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![stream, 0, 0, 0];
    bytes.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

impl http_common::Handler for Fake {
    async fn handle(&self, request: Request) -> Response {
        let target = match &request.query {
            Some(query) => format!("{} {}?{query}", request.method, request.path),
            None => format!("{} {}", request.method, request.path),
        };
        self.requests.lock().unwrap().push(target);
        let not_found = || {
            http_common::json_response(
                http::StatusCode::NOT_FOUND,
                &serde_json::json!({ "message": "No such container: missing" }),
            )
        };
        match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/modules") => http_common::json_response(
                http::StatusCode::OK,
                &serde_json::json!({ "modules": [
                    { "id": "c2", "name": "tempSensor", "type": "docker",
                      "config": { "settings": { "image": "example/temp:1.0", "imageHash": "sha256:1" }, "env": [] },
                      "status": { "runtimeStatus": { "status": "failed", "description": "Exited (1) 2 minutes ago" },
                                  "exitStatus": { "exitTime": "2024-01-01T00:00:00Z", "statusCode": "1" } } },
                    { "id": "c1", "name": "edgeAgent", "type": "docker",
                      "config": { "settings": { "image": "mcr.microsoft.com/azureiotedge-agent:1.6" }, "env": [] },
                      "status": { "startTime": "2024-01-01T00:00:00Z",
                                  "runtimeStatus": { "status": "running", "description": "Up 3 hours" } } }
                ] }),
            ),
            ("POST", "/modules/tempSensor/restart") => {
                http_common::empty_response(http::StatusCode::NO_CONTENT)
            }
            ("GET", "/modules/tempSensor/logs") => {
                let mut body = frame(1, b"line one\n");
                body.extend(frame(2, b"an error line\n"));
                body.extend(frame(1, b"line two\n"));
                let mut response = hyper::Response::new(http_common::full_body(body));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain"),
                );
                response
            }
            ("GET", "/containers/json") => http_common::json_response(
                http::StatusCode::OK,
                &serde_json::json!([{ "Id": "c1", "Names": ["/edgeAgent"] }]),
            ),
            ("POST", "/identities/device/reprovision") => {
                http_common::empty_response(http::StatusCode::NO_CONTENT)
            }
            _ => not_found(),
        }
    }
}

/// Serves `Fake` on `socket` from a background thread until dropped.
struct FakeServer {
    fake: Arc<Fake>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    uri: String,
}

impl FakeServer {
    fn start(socket: &Path) -> FakeServer {
        let fake = Arc::new(Fake::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_sender, ready) = std::sync::mpsc::channel();
        let served = fake.clone();
        let path = socket.to_owned();
        let thread = std::thread::spawn(move || {
            let runtime = common::runtime();
            runtime.block_on(async move {
                let listener = tokio::net::UnixListener::bind(&path).unwrap();
                ready_sender.send(()).unwrap();
                http_common::serve(
                    listener,
                    served,
                    http_common::ServerOptions::default(),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await;
            });
        });
        ready.recv().unwrap();
        FakeServer {
            fake,
            stop: Some(stop),
            thread: Some(thread),
            uri: format!("unix://{}", socket.display()),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.fake.requests.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn list_restart_and_logs_use_the_management_api() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(&dir.path().join("mgmt.sock"));

    let output = iotedge(&["-H", &server.uri, "list"]);
    assert!(output.status.success(), "{}", describe(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("STATUS"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("edgeAgent")
            && lines[1].contains("running")
            && lines[1].contains("Up 3 hours"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("tempSensor")
            && lines[2].contains("failed")
            && lines[2].contains("example/temp:1.0"),
        "{text}"
    );

    // The socket can also come from the environment, as with the reference CLI.
    let output = std::process::Command::new(common::iotedge_binary())
        .args(["restart", "tempSensor"])
        .env("IOTEDGE_HOST", &server.uri)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));

    let output = iotedge(&["-H", &server.uri, "restart", "missing"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("No such container"),
        "{}",
        describe(&output)
    );

    let output = iotedge(&[
        "-H",
        &server.uri,
        "logs",
        "tempSensor",
        "--tail",
        "10",
        "--since",
        "1 day",
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "line one\nline two\n"
    );
    assert_eq!(String::from_utf8_lossy(&output.stderr), "an error line\n");

    let output = iotedge(&["-H", &server.uri, "logs", "tempSensor", "--follow"]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "line one\nline two\n"
    );

    assert_eq!(
        server.requests(),
        vec![
            "GET /modules?api-version=2020-07-07",
            "POST /modules/tempSensor/restart?api-version=2020-07-07",
            "POST /modules/missing/restart?api-version=2020-07-07",
            "GET /modules/tempSensor/logs?api-version=2020-07-07&follow=false&tail=10&since=1%20day",
            "GET /modules/tempSensor/logs?api-version=2020-07-07&follow=true",
        ]
    );
}

#[test]
fn unreachable_edged_is_a_clear_error() {
    let output = iotedge(&["-H", "unix:///nonexistent/mgmt.sock", "list"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("listing modules via unix:///nonexistent/mgmt.sock"),
        "{stderr}"
    );
    let output = iotedge(&["-H", "tcp://127.0.0.1:1", "list"]);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("invalid endpoint"),
        "{}",
        describe(&output)
    );
}

#[test]
fn reprovision_calls_identityd() {
    let dir = tempfile::tempdir().unwrap();
    let server = FakeServer::start(&dir.path().join("identityd.sock"));
    let output = iotedge(&["system", "reprovision", "--identityd-uri", &server.uri]);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(
        server.requests(),
        vec!["POST /identities/device/reprovision?api-version=2020-09-01"]
    );
}

#[test]
fn system_commands_explain_when_systemd_is_absent() {
    // Where systemd runs, the CLI is run in a mount namespace of its own in which a tmpfs hides
    // /run/systemd (needs root, as the tests run in CI).
    let systemd_runs = Path::new("/run/systemd/system").is_dir();
    let run = |arguments: &[&str]| {
        if !systemd_runs {
            return iotedge(arguments);
        }
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs none /run/systemd && exec \"$0\" \"$@\"")
            .arg(common::iotedge_binary())
            .args(arguments)
            .env_remove("IOTEDGE_HOST")
            .env_remove("AZIOT_IDENTITYD_URI")
            .output()
            .expect("unshare (util-linux) runs the CLI without /run/systemd")
    };
    for arguments in [
        &["system", "status"][..],
        &["system", "logs"],
        &["system", "restart"],
    ] {
        let output = run(arguments);
        assert!(!output.status.success(), "{arguments:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr)
                .contains("systemd is not running on this machine"),
            "{arguments:?}: {}",
            describe(&output)
        );
    }
}

#[test]
fn set_log_level_writes_service_dropins() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let output = iotedge(&["system", "set-log-level", "debug", "--root", &root]);
    assert!(output.status.success(), "{}", describe(&output));
    let dropin = dir
        .path()
        .join("etc/systemd/system/aziot-keyd.service.d/log-level.conf");
    assert!(std::fs::read_to_string(dropin)
        .unwrap()
        .contains("Environment=AZIOT_LOG=debug"));
    let output = iotedge(&["system", "set-log-level", "loud", "--root", &root]);
    assert!(!output.status.success());
}

fn check(config: &Path, root: &Path, extra: &[&str]) -> (std::process::Output, serde_json::Value) {
    let mut arguments = vec![
        "check".to_owned(),
        "-c".to_owned(),
        config.display().to_string(),
        "--root".to_owned(),
        root.display().to_string(),
        "-o".to_owned(),
        "json".to_owned(),
        "--timeout".to_owned(),
        "2".to_owned(),
    ];
    arguments.extend(
        common::UID_ARGS
            .iter()
            .map(|argument| (*argument).to_owned()),
    );
    arguments.extend(extra.iter().map(|argument| (*argument).to_owned()));
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    let output = iotedge(&arguments);
    let report = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("{error}: {}", describe(&output)));
    (output, report)
}

fn result(report: &serde_json::Value, id: &str) -> String {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["id"] == id)
        .map(|check| check["result"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no check {id}: {report}"))
}

#[test]
fn check_fails_on_a_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");

    std::fs::write(&config, "[provisioning\nsource = \"manual\"\n").unwrap();
    let (output, report) = check(&config, dir.path(), &[]);
    assert!(!output.status.success(), "{}", describe(&output));
    assert_eq!(result(&report, "config-toml-well-formed"), "error");
    assert_eq!(result(&report, "config-valid"), "skipped");

    std::fs::write(
        &config,
        "cloud_timeout_sec = 1\n[provisioning]\nsource = \"none\"\n",
    )
    .unwrap();
    let (output, report) = check(&config, dir.path(), &[]);
    assert!(!output.status.success());
    assert_eq!(result(&report, "config-toml-well-formed"), "ok");
    assert_eq!(result(&report, "config-valid"), "error");
    assert!(report.to_string().contains("cloud_timeout_sec"), "{report}");

    // Text output names the failing check too.
    let text = iotedge(&[
        "check",
        "-c",
        &config.display().to_string(),
        "--root",
        &dir.path().display().to_string(),
        "--timeout",
        "1",
    ]);
    assert!(!text.status.success());
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("[FAIL] config-valid"),
        "{}",
        describe(&text)
    );

    // A broken per-daemon drop-in is found as well.
    let applied = dir.path().join("applied");
    let fixture = fixtures().join("aziotctl/manual-symmetric-key.toml");
    assert!(common::apply_fixture(&fixture, &applied).status.success());
    std::fs::write(
        applied.join("etc/aziot/keyd/config.d/50-broken.toml"),
        "x = [\n",
    )
    .unwrap();
    let (output, report) = check(&fixture, &applied, &[]);
    assert!(!output.status.success());
    assert_eq!(result(&report, "config-up-to-date"), "ok");
    assert_eq!(result(&report, "keyd-config-well-formed"), "error");
}

#[test]
fn check_warns_about_stale_configs_and_warnings_can_fail_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixtures().join("aziotctl/manual-symmetric-key.toml");
    assert!(common::apply_fixture(&fixture, dir.path()).status.success());
    let edited = dir.path().join("edited.toml");
    std::fs::write(
        &edited,
        std::fs::read_to_string(&fixture)
            .unwrap()
            .replace("sas-device\"", "renamed\""),
    )
    .unwrap();
    let (_, report) = check(&edited, dir.path(), &[]);
    assert_eq!(result(&report, "config-up-to-date"), "warning", "{report}");
    // No daemon runs here, so the socket checks fail and the run fails either way; what
    // matters is that the stale config is reported and the secret is not.
    assert_eq!(result(&report, "keyd-socket-reachable"), "error");
    assert_eq!(result(&report, "identityd-provisioned"), "skipped");
    assert!(
        !report.to_string().contains("YWJjZGVm"),
        "the key never appears: {report}"
    );
    let (output, _) = check(&fixture, dir.path(), &["--warnings-as-errors"]);
    assert!(!output.status.success());

    // A new key alone changes no drop-in (the key file's name stays): the key file is compared.
    let rekeyed = dir.path().join("rekeyed.toml");
    std::fs::write(
        &rekeyed,
        std::fs::read_to_string(&fixture).unwrap().replace(
            "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY=",
            "bmV3IGtleSBieXRlcw==",
        ),
    )
    .unwrap();
    let (_, report) = check(&rekeyed, dir.path(), &[]);
    assert_eq!(result(&report, "config-up-to-date"), "warning", "{report}");
    assert!(report.to_string().contains("holds another key"), "{report}");
    assert!(
        !report.to_string().contains("bmV3IGtleSBieXRlcw"),
        "{report}"
    );
}

#[test]
fn apply_refuses_a_hostname_change_while_edge_modules_exist() {
    let dir = tempfile::tempdir().unwrap();
    let docker = FakeServer::start(&dir.path().join("docker.sock"));
    let root = dir.path().join("root");
    let config = dir.path().join("config.toml");
    let text = |hostname: &str| {
        format!(
            "hostname = \"{hostname}\"\n[provisioning]\nsource = \"none\"\n[moby_runtime]\nuri = \"{}\"\n",
            docker.uri
        )
    };
    std::fs::write(&config, text("first")).unwrap();
    let output = common::apply_fixture(&config, &root);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(
        docker.requests().is_empty(),
        "no hostname change, Docker is not asked"
    );

    std::fs::write(&config, text("second")).unwrap();
    let output = common::apply_fixture(&config, &root);
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"first\" to \"second\"") && stderr.contains("edgeAgent"),
        "{stderr}"
    );
    let identityd =
        std::fs::read_to_string(root.join("etc/aziot/identityd/config.d/00-super.toml")).unwrap();
    assert!(
        identityd.contains("hostname = \"first\""),
        "nothing was rewritten: {identityd}"
    );
    let requests = docker.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(
        requests[0].starts_with("GET /containers/json?all=true&filters="),
        "{requests:?}"
    );
    let decoded = percent_encoding::percent_decode_str(&requests[0])
        .decode_utf8()
        .unwrap();
    assert!(
        decoded.contains(
            r#"{"label":["net.azure-devices.edge.owner=Microsoft.Azure.Devices.Edge.Agent"]}"#
        ),
        "{decoded}"
    );
}
