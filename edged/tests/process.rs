//! The process runtime (`agent.type = "process"`) with the real edged, keyd and certd and real
//! host processes in real cgroups; no Docker. One module is a Python program on the real
//! `azure-iot-device` SDK, installed from PyPI into a virtual environment the first test builds
//! (cached across runs in the temp folder, keyed by the SDK version).
//!
//! A request "from inside a module" is made by a helper that moves itself into the module's
//! tracking cgroup before it connects (the equivalent of `docker exec`); the test runs as root.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;

use common::process::{alive, sdk_python, Stack, LOOP};
use common::{b64, hmac_sha256, sibling_binary, DEVICE, HUB, V};
use http::{Method, StatusCode};
use serde_json::{json, Value};

const PY_MODULE: &str = r#"
import json, os, sys, time
import requests
from azure.iot.device import IoTHubModuleClient
from azure.iot.device.iothub.edge_hsm import IoTEdgeHsm

client = IoTHubModuleClient.create_from_edge_environment()
print("client created", flush=True)
hsm = IoTEdgeHsm(os.environ["IOTEDGE_MODULEID"], os.environ["IOTEDGE_MODULEGENERATIONID"],
                 os.environ["IOTEDGE_WORKLOADURI"], os.environ["IOTEDGE_APIVERSION"])
print(json.dumps({"signed": hsm.sign("hello from a process module")}), flush=True)
print(json.dumps({"trust_bundle": hsm.get_certificate()}), flush=True)
answer = requests.post(
    hsm.workload_uri + "modules/{}/genid/{}/certificate/server".format(
        hsm.module_id, hsm.generation_id),
    params={"api-version": "2020-07-07"},
    data=json.dumps({"commonName": "pymodule.example", "expiration": "2099-01-01T00:00:00Z"}))
print(json.dumps({"server_status": answer.status_code, "server": answer.json()}), flush=True)
print(json.dumps({"workload_uri": os.environ["IOTEDGE_WORKLOADURI"], "uid": os.getuid()}), flush=True)
print("module ready", file=sys.stderr, flush=True)
while True:
    time.sleep(1)
"#;

#[test]
fn a_python_sdk_module_signs_gets_a_verified_server_cert_and_serves_its_logs() {
    let python = sdk_python();
    let stack = Stack::new();
    let script = stack.base.join("pymodule.py");
    std::fs::write(&script, PY_MODULE).unwrap();
    let name = "pymodule";
    let (status, identity) = stack.agent_call(
        "POST",
        &format!("/identities?{V}"),
        &json!({"moduleId": name}).to_string(),
    );
    assert_eq!(status, 200, "{identity}");
    let gen_id = identity["generationId"].as_str().unwrap().to_owned();
    // The variables edgeAgent injects, with a container's socket path the runtime replaces.
    let env = json!([
        {"key": "IOTEDGE_WORKLOADURI", "value": "unix:///var/run/iotedge/workload.sock"},
        {"key": "IOTEDGE_DEVICEID", "value": DEVICE},
        {"key": "IOTEDGE_MODULEID", "value": name},
        {"key": "IOTEDGE_IOTHUBHOSTNAME", "value": HUB},
        {"key": "IOTEDGE_GATEWAYHOSTNAME", "value": "edged-test-host"},
        {"key": "IOTEDGE_APIVERSION", "value": "2022-08-03"},
        {"key": "IOTEDGE_AUTHSCHEME", "value": "sasToken"},
        {"key": "IOTEDGE_MODULEGENERATIONID", "value": gen_id},
    ]);
    stack.create_and_start(
        name,
        python.to_str().unwrap(),
        json!({"Cmd": [script.to_str().unwrap()], "HostConfig": {"PidsLimit": 64, "Memory": 268435456}}),
        env,
    );
    stack.wait_for("the module to report ready", || {
        stack
            .logs(name, "")
            .iter()
            .any(|(stream, line)| *stream == 2 && line.contains("module ready"))
            || stack.status_of(name).as_deref() != Some("running")
    });
    let lines = stack.stdout_lines(name);
    assert_eq!(
        stack.status_of(name).as_deref(),
        Some("running"),
        "the module ended: {lines:?}\n{:?}",
        stack.logs(name, "")
    );
    assert_eq!(lines[0], "client created");
    let find = |key: &str| -> Value {
        lines
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|value| value.get(key).is_some())
            .unwrap_or_else(|| panic!("no {key} line in {lines:?}"))
    };

    // The signature is HMAC-SHA256 under the module's own key.
    let key = stack.runtime.block_on(stack.identity.module_key(name));
    let signed = find("signed");
    assert_eq!(
        signed["signed"].as_str().unwrap(),
        b64(&hmac_sha256(&key, b"hello from a process module"))
    );

    // The trust bundle is edged's, and the server certificate verifies against it.
    let trust_bundle = find("trust_bundle")["trust_bundle"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, bytes) = stack.call_raw(
        &stack.base.join("workload.sock"),
        Method::GET,
        "/trust-bundle?api-version=2020-07-07",
        "",
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        common::parse_json(&bytes)["certificate"],
        trust_bundle.as_str()
    );
    let server = find("server_status");
    assert_eq!(server["server_status"], 201, "{server}");
    let chain = openssl::x509::X509::stack_from_pem(
        server["server"]["certificate"].as_str().unwrap().as_bytes(),
    )
    .unwrap();
    let mut store = openssl::x509::store::X509StoreBuilder::new().unwrap();
    for certificate in openssl::x509::X509::stack_from_pem(trust_bundle.as_bytes()).unwrap() {
        store.add_cert(certificate).unwrap();
    }
    let store = store.build();
    let mut untrusted = openssl::stack::Stack::new().unwrap();
    for certificate in chain.iter().skip(1) {
        untrusted.push(certificate.clone()).unwrap();
    }
    let mut context = openssl::x509::X509StoreContext::new().unwrap();
    let verified = context
        .init(&store, &chain[0], &untrusted, |context| {
            context.verify_cert()
        })
        .unwrap();
    assert!(
        verified,
        "the server certificate does not verify against the trust bundle"
    );
    let common_name = chain[0]
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .unwrap()
        .data()
        .to_string()
        .unwrap();
    assert_eq!(common_name, "pymodule.example");
    let private_key = server["server"]["privateKey"]["bytes"].as_str().unwrap();
    let private_key = openssl::pkey::PKey::private_key_from_pem(private_key.as_bytes()).unwrap();
    assert!(chain[0].public_key().unwrap().public_eq(&private_key));

    // It ran as its own uid, with its own socket as IOTEDGE_WORKLOADURI.
    let facts = find("uid");
    let uid = facts["uid"].as_u64().unwrap();
    assert!((910_000..910_100).contains(&uid), "uid {uid}");
    assert_ne!(Some(uid), stack.record(&stack.agent)["uid"].as_u64());
    assert_eq!(
        facts["workload_uri"].as_str().unwrap(),
        format!("unix://{}", stack.socket_of(name).display())
    );

    // The management API's logs: framed, with stderr apart, tail and timestamps.
    let frames = stack.logs(name, "&tail=1&timestamps=true");
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].0, 2);
    let (stamp, text) = frames[0].1.split_once(' ').unwrap();
    assert!(stamp.ends_with('Z') && stamp.contains('T'), "{stamp}");
    assert_eq!(text, "module ready\n");
    assert!(stack.logs(name, "&since=4102444800").is_empty());
    assert_eq!(stack.logs(name, "&until=1000000000").len(), 0);

    // `iotedge logs` shows the same lines.
    let output = Command::new(sibling_binary("iotedge"))
        .arg("-H")
        .arg(format!("unix://{}", stack.mgmt.display()))
        .args(["logs", name])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("client created"), "{stdout}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("module ready"));

    // The limits are in its cgroups.
    let record = stack.record(name);
    let memory = &record["cgroups"]["memory"];
    let memory_file = if memory[1] == "V2" {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    let limit =
        std::fs::read_to_string(Path::new(memory[0].as_str().unwrap()).join(memory_file)).unwrap();
    assert_eq!(limit.trim(), "268435456");
    let pids = std::fs::read_to_string(
        Path::new(record["cgroups"]["pids"].as_str().unwrap()).join("pids.max"),
    )
    .unwrap();
    assert_eq!(pids.trim(), "64");

    // The module's details as edgeAgent reads them.
    let (_, details) = stack.mgmt(Method::GET, &format!("/modules/{name}?{V}"), "");
    assert_eq!(
        details["config"]["settings"]["image"],
        python.to_str().unwrap()
    );
    assert!(details["config"]["settings"]["imageHash"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    assert_eq!(
        details["config"]["settings"]["createOptions"]["Labels"]["net.azure-devices.edge.owner"],
        "Microsoft.Azure.Devices.Edge.Agent"
    );
    assert!(details["status"]["startTime"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
}

#[test]
fn another_modules_process_and_host_processes_are_refused_on_a_module_socket() {
    let stack = Stack::new();
    for name in ["alpha", "beta"] {
        let (status, _) = stack.agent_call(
            "POST",
            &format!("/identities?{V}"),
            &json!({"moduleId": name}).to_string(),
        );
        assert_eq!(status, 200);
        stack.create_and_start(name, "/bin/sh", json!({"Cmd": ["-c", LOOP]}), json!([]));
    }
    let sign = format!("/modules/alpha/genid/1/sign?{V}");
    let body = json!({"keyId": "primary", "algo": "HMACSHA256", "data": b64(b"x")}).to_string();
    let alpha_socket = stack.socket_of("alpha");
    let (status, answer) = stack.call_from("alpha", &alpha_socket, "POST", &sign, &body);
    assert_eq!(status, 200, "{answer}");
    let key = stack.runtime.block_on(stack.identity.module_key("alpha"));
    assert_eq!(answer["digest"], b64(&hmac_sha256(&key, b"x")));
    let (status, answer) = stack.call_from("beta", &alpha_socket, "POST", &sign, &body);
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer, json!({"message": "forbidden"}));
    // Nor does beta's own socket help it.
    let (status, _) = stack.call_from("beta", &stack.socket_of("beta"), "POST", &sign, &body);
    assert_eq!(status, 403);
    // A host process (this test) is refused too.
    let (status, bytes) = stack.call_raw(&alpha_socket, Method::POST, &sign, &body);
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    // Management writes are the agent's alone.
    let spec = json!({"name": "gamma", "type": "process",
        "config": {"settings": {"image": "/bin/true"}}})
    .to_string();
    let (status, _) = stack.call_from("beta", &stack.mgmt, "POST", &format!("/modules?{V}"), &spec);
    assert_eq!(status, 403);
    // The two modules run as two different uids, neither of them root.
    let (alpha, beta) = (
        stack.record("alpha")["uid"].clone(),
        stack.record("beta")["uid"].clone(),
    );
    assert_ne!(alpha, beta);
    for pid in stack
        .module_pids("alpha")
        .into_iter()
        .chain(stack.module_pids("beta"))
    {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let uid_line = status
            .lines()
            .find(|line| line.starts_with("Uid:"))
            .unwrap_or("Uid: 0");
        assert!(
            !uid_line.split_whitespace().skip(1).any(|id| id == "0"),
            "{uid_line}"
        );
    }
}

#[test]
fn docker_only_create_options_are_a_400_naming_the_field() {
    let stack = Stack::new();
    let cases = [
        (
            json!({"HostConfig": {"Binds": ["/a:/b"]}}),
            "createOptions.HostConfig.Binds",
        ),
        (
            json!({"ExposedPorts": {"80/tcp": {}}}),
            "createOptions.ExposedPorts",
        ),
        (
            json!({"NetworkingConfig": {"EndpointsConfig": {}}}),
            "createOptions.NetworkingConfig",
        ),
        (json!({"User": "1000"}), "createOptions.User"),
    ];
    for (options, field) in &cases {
        let spec = json!({"name": "bad", "type": "process",
            "config": {"settings": {"image": "/bin/sh", "createOptions": options}}});
        let (status, body) = stack.agent_call("POST", &format!("/modules?{V}"), &spec.to_string());
        assert_eq!(status, 400, "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(field), "{field} not in {message}");
    }
    let missing = json!({"name": "missing", "type": "process",
        "config": {"settings": {"image": "/no/such/program"}}});
    let (status, body) = stack.agent_call("POST", &format!("/modules?{V}"), &missing.to_string());
    assert_eq!(status, 404, "{body}");
    let (status, body) = stack.mgmt(Method::GET, &format!("/modules/bad?{V}"), "");
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[test]
fn stop_restart_and_delete_work_and_leave_no_process_behind() {
    let stack = Stack::new();
    let name = "worker";
    // A main process with a child of its own.
    stack.create_and_start(
        name,
        "/bin/sh",
        json!({"Cmd": ["-c", "sleep 1000 & echo started; trap 'kill $!; exit 0' TERM; while true; do sleep 1; done"]}),
        json!([]),
    );
    stack.wait_for("two processes in the module", || {
        stack.module_pids(name).len() >= 2
    });
    let first = stack.module_pids(name);

    let (status, _) = stack.mgmt(Method::POST, &format!("/modules/{name}/stop?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(stack.module_pids(name).is_empty());
    assert!(
        first.iter().all(|pid| !alive(*pid)),
        "left behind: {first:?}"
    );
    assert_eq!(stack.status_of(name).as_deref(), Some("stopped"));
    let (_, details) = stack.mgmt(Method::GET, &format!("/modules/{name}?{V}"), "");
    assert_eq!(details["status"]["exitStatus"]["statusCode"], "0");
    // Stopping a stopped module is fine.
    let (status, _) = stack.mgmt(Method::POST, &format!("/modules/{name}/stop?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT);

    let (status, _) = stack.mgmt(Method::POST, &format!("/modules/{name}/start?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(stack.status_of(name).as_deref(), Some("running"));
    stack.wait_for("the module's processes", || {
        stack.module_pids(name).len() >= 2
    });
    let second = stack.module_pids(name);
    assert!(second.iter().all(|pid| !first.contains(pid)));

    let (status, _) = stack.mgmt(Method::POST, &format!("/modules/{name}/restart?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(stack.status_of(name).as_deref(), Some("running"));
    assert!(
        second.iter().all(|pid| !alive(*pid)),
        "left behind: {second:?}"
    );
    stack.wait_for("the module's processes", || {
        stack.module_pids(name).len() >= 2
    });
    let third = stack.module_pids(name);
    stack.wait_for("the third start's line", || {
        stack
            .stdout_lines(name)
            .iter()
            .filter(|line| *line == "started")
            .count()
            == 3
    });

    // prepareupdate checks the new spec; an update replaces the process and starts the new one.
    let update = |command: &str| {
        json!({"name": name, "type": "process",
            "config": {"settings": {"image": "/bin/sh", "createOptions": {"Cmd": ["-c", command]}}}})
        .to_string()
    };
    let updated = format!("echo updated; {LOOP}");
    let prepare = format!("/modules/{name}/prepareupdate?{V}");
    let (status, body) = stack.agent_call("POST", &prepare, &update(&updated));
    assert_eq!(status, 204, "{body}");
    let docker_only = json!({"name": name, "type": "process", "config": {"settings":
        {"image": "/bin/sh", "createOptions": {"HostConfig": {"Binds": ["/:/host"]}}}}});
    let (status, body) = stack.agent_call("POST", &prepare, &docker_only.to_string());
    assert_eq!(status, 400, "{body}");
    let (status, body) = stack.agent_call(
        "PUT",
        &format!("/modules/{name}?{V}&start=true"),
        &update(&updated),
    );
    assert_eq!(status, 201, "{body}");
    assert!(
        third.iter().all(|pid| !alive(*pid)),
        "left behind: {third:?}"
    );
    stack.wait_for("the updated module's line", || {
        stack.stdout_lines(name) == vec!["updated".to_owned()]
    });
    assert_eq!(stack.status_of(name).as_deref(), Some("running"));
    let third = stack.module_pids(name);

    let tracking = stack.tracking_dir(name);
    let (status, _) = stack.agent_call("DELETE", &format!("/modules/{name}?{V}"), "");
    assert_eq!(status, 204);
    assert!(
        third.iter().all(|pid| !alive(*pid)),
        "left behind: {third:?}"
    );
    assert!(
        !tracking.exists(),
        "the cgroup {} is still there",
        tracking.display()
    );
    assert!(!stack.module_dir(name).exists());
    assert!(!stack.socket_of(name).exists());
    let (status, _) = stack.mgmt(Method::GET, &format!("/modules/{name}?{V}"), "");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = stack.agent_call("DELETE", &format!("/modules/{name}?{V}"), "");
    assert_eq!(status, 404);
}

#[test]
fn a_crashing_module_is_restarted_per_its_restart_policy() {
    let stack = Stack::new();
    let crash = json!({"Cmd": ["-c", "echo run; exit 3"],
        "HostConfig": {"RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 2}}});
    stack.create_and_start("crasher", "/bin/sh", crash, json!([]));
    let never = json!({"Cmd": ["-c", "echo run; exit 3"]});
    stack.create_and_start("once", "/bin/sh", never, json!([]));
    // Both supervisors end once their policy says so; then nothing can restart them any more.
    for name in ["crasher", "once"] {
        stack.wait_for("the supervisor to give up", || {
            stack.supervisor_status(name)["state"] == "exited"
        });
        assert_eq!(stack.status_of(name).as_deref(), Some("failed"));
        let (_, details) = stack.mgmt(Method::GET, &format!("/modules/{name}?{V}"), "");
        assert_eq!(details["status"]["exitStatus"]["statusCode"], "3");
    }
    let runs = |name: &str| {
        stack
            .stdout_lines(name)
            .iter()
            .filter(|line| *line == "run")
            .count()
    };
    assert_eq!(runs("crasher"), 3, "one run and two restarts");
    assert_eq!(stack.supervisor_status("crasher")["restart_count"], 2);
    assert_eq!(runs("once"), 1);

    // `always` restarts even a clean exit, until the module is stopped.
    let always = json!({"Cmd": ["-c", "echo run; exit 0"],
        "HostConfig": {"RestartPolicy": {"Name": "always"}}});
    stack.create_and_start("looper", "/bin/sh", always, json!([]));
    stack.wait_for("three runs", || runs("looper") >= 3);
    let (status, _) = stack.mgmt(Method::POST, &format!("/modules/looper/stop?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(stack.supervisor_status("looper")["state"], "exited");
    assert!(stack.module_pids("looper").is_empty());
}

#[test]
fn an_archive_image_is_unpacked_into_the_modules_folder_and_run_as_its_uid() {
    let stack = Stack::new();
    let tree = stack.base.join("app");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::write(
        tree.join("bin/run"),
        "#!/bin/sh\necho \"archive $(id -u) $(pwd) $1\"\nexec sleep 1000\n",
    )
    .unwrap();
    std::fs::set_permissions(
        tree.join("bin/run"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let archive = stack.base.join("app.tar.gz");
    let status = Command::new("tar")
        .arg("-czf")
        .arg(&archive)
        .arg("-C")
        .arg(&tree)
        .arg("bin")
        .status()
        .unwrap();
    assert!(status.success());
    let name = "archived";
    stack.create_and_start(
        name,
        archive.to_str().unwrap(),
        json!({"Entrypoint": ["bin/run"], "Cmd": ["hello"]}),
        json!([]),
    );
    stack.wait_for("the archive's line", || {
        !stack.stdout_lines(name).is_empty()
    });
    let uid = stack.record(name)["uid"].as_u64().unwrap();
    let root = stack.module_dir(name).join("root");
    assert_eq!(
        stack.stdout_lines(name),
        vec![format!("archive {uid} {} hello", root.display())]
    );
    let owner =
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(root.join("bin/run")).unwrap());
    assert_eq!(u64::from(owner), uid);
    // A program the archive does not hold is refused at create, and nothing is left.
    let spec = json!({"name": "hollow", "type": "process", "config": {"settings": {
        "image": archive.to_str().unwrap(), "createOptions": {"Cmd": ["bin/missing"]}}}});
    let (status, body) = stack.agent_call("POST", &format!("/modules?{V}"), &spec.to_string());
    assert_eq!(status, 400, "{body}");
    assert!(!stack.module_dir("hollow").exists());
    let (status, _) = stack.agent_call("DELETE", &format!("/modules/{name}?{V}"), "");
    assert_eq!(status, 204);
    assert!(!root.exists());
}

#[test]
fn followed_logs_stream_until_the_module_ends() {
    let stack = Stack::new();
    let name = "ticker";
    let spec = json!({"name": name, "type": "process", "config": {"settings": {"image": "/bin/sh",
        "createOptions": {"Cmd": ["-c", "sleep 1; for i in 1 2 3 4 5; do echo tick $i; sleep 0.2; done; echo bye >&2"]}}}});
    let (status, body) = stack.agent_call("POST", &format!("/modules?{V}"), &spec.to_string());
    assert_eq!(status, 201, "{body}");
    let (status, _) = stack.mgmt(Method::POST, &format!("/modules/{name}/start?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT);
    // Asked while the module has printed nothing yet: the answer grows, and ends with the module.
    let frames = stack.logs(name, "&follow=true");
    let texts: Vec<(u8, String)> = frames
        .into_iter()
        .map(|(stream, line)| (stream, line.trim_end().to_owned()))
        .collect();
    let mut expected: Vec<(u8, String)> = (1..=5).map(|tick| (1, format!("tick {tick}"))).collect();
    expected.push((2, "bye".to_owned()));
    assert_eq!(texts, expected);
    assert_eq!(stack.status_of(name).as_deref(), Some("stopped"));
}

#[test]
fn modules_whose_supervisor_vanished_are_recovered_when_edged_starts() {
    let mut stack = Stack::new();
    let always = json!({"Cmd": ["-c", LOOP], "HostConfig": {"RestartPolicy": {"Name": "always"}}});
    stack.create_and_start("phoenix", "/bin/sh", always, json!([]));
    stack.create_and_start("ash", "/bin/sh", json!({"Cmd": ["-c", LOOP]}), json!([]));
    let agent = stack.agent.clone();
    let before: Vec<i64> = ["phoenix", "ash", agent.as_str()]
        .iter()
        .map(|module| stack.supervisor_status(module)["pid"].as_i64().unwrap())
        .collect();
    // What a power cut does: edged, every supervisor and every module process end at once.
    stack.edged.kill();
    for module in ["phoenix", "ash", agent.as_str()] {
        let shim = stack.supervisor_status(module)["shim_pid"]
            .as_i64()
            .unwrap() as i32;
        assert!(alive(shim));
        // SAFETY: kill(2) on the supervisor pid this test's edged recorded a moment ago.
        unsafe { libc::kill(shim, libc::SIGKILL) };
        for pid in stack.module_pids(module) {
            // SAFETY: kill(2) on a pid read from the module's cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        stack.wait_for("the module's cgroup to empty", || {
            stack.module_pids(module).is_empty() && !alive(shim)
        });
    }
    // The agent has no restart policy: the watchdog starts it.
    stack.start_edged();
    assert_eq!(stack.status_of("phoenix").as_deref(), Some("running"));
    let phoenix = stack.supervisor_status("phoenix")["pid"].as_i64().unwrap();
    assert_ne!(
        phoenix,
        before[0],
        "{}\n{}",
        stack.supervisor_status("phoenix"),
        stack.edged.log()
    );
    assert!(alive(phoenix as i32));
    assert_eq!(stack.status_of("ash").as_deref(), Some("failed"));
    assert!(stack.module_pids("ash").is_empty());
    let (_, details) = stack.mgmt(Method::GET, &format!("/modules/ash?{V}"), "");
    let description = details["status"]["runtimeStatus"]["description"]
        .as_str()
        .unwrap();
    assert!(
        description.contains("without recording an exit"),
        "{description}"
    );
    assert_ne!(
        stack.supervisor_status(&agent)["pid"].as_i64().unwrap(),
        before[2]
    );
    // And "ash" starts again when asked.
    let (status, _) = stack.mgmt(Method::POST, &format!("/modules/ash/start?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(stack.status_of("ash").as_deref(), Some("running"));
}

#[test]
fn killing_edged_leaves_modules_running_and_a_new_edged_adopts_them() {
    let mut stack = Stack::new();
    let name = "survivor";
    let (status, _) = stack.agent_call(
        "POST",
        &format!("/identities?{V}"),
        &json!({"moduleId": name}).to_string(),
    );
    assert_eq!(status, 200);
    stack.create_and_start(name, "/bin/sh", json!({"Cmd": ["-c", LOOP]}), json!([]));
    // The main processes (the loops' `sleep 1` children come and go).
    let main_pid = |stack: &Stack, module: &str| {
        stack.supervisor_status(module)["pid"].as_i64().unwrap() as i32
    };
    let pid = main_pid(&stack, name);
    let agent_pid = main_pid(&stack, &stack.agent);
    assert!(alive(pid) && alive(agent_pid));

    stack.edged.kill();
    assert!(alive(pid) && alive(agent_pid));

    stack.start_edged();
    assert_eq!(stack.status_of(name).as_deref(), Some("running"));
    assert_eq!(
        main_pid(&stack, name),
        pid,
        "the module was restarted, not adopted"
    );
    assert!(stack.module_pids(name).contains(&pid));
    assert_eq!(main_pid(&stack, &stack.agent), agent_pid);
    // The new edged serves the module on its socket, and manages it.
    let sign = format!("/modules/{name}/genid/1/sign?{V}");
    let body = json!({"data": b64(b"after the restart")}).to_string();
    let (status, answer) = stack.call_from(name, &stack.socket_of(name), "POST", &sign, &body);
    assert_eq!(status, 200, "{answer}\n{}", stack.edged.log());
    let (status, _) = stack.mgmt(Method::POST, &format!("/modules/{name}/stop?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(!alive(pid));
    assert!(stack.module_pids(name).is_empty());

    // A clean stop (SIGTERM) of edged leaves them running as well.
    stack.edged.stop();
    assert!(alive(agent_pid));
}
