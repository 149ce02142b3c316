//! Black-box tests against the real Docker engine: the real edged binary with the real keyd and
//! certd binaries and an in-process fake identityd (module keys derived in keyd). Module
//! processes call their per-module workload socket through `docker exec` of a static client, so
//! edged sees caller pids inside the containers.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{b64, docker, hmac_sha256, log_frames, parse_json, unb64, Harness, LOOP_COMMAND, V};
use http::{Method, StatusCode};
use openssl::x509::X509;

/// A module spec for the test image: prints a greeting, then loops until SIGTERM.
fn module_spec(harness: &Harness, name: &str, greeting: &str) -> String {
    serde_json::json!({
        "name": name,
        "type": "docker",
        "imagePullPolicy": "never",
        "config": {
            "settings": {
                "image": harness.image.tag,
                "createOptions": {
                    "Cmd": ["/bin/sh", "-c", format!("echo hello from $GREETING; echo oops >&2; {LOOP_COMMAND}")],
                    "Env": ["FROM_OPTIONS=1"],
                    "Labels": {"test.label": "x"},
                    "HostConfig": {"Binds": [format!("{}/mnt/{name}.sock:/var/run/iotedge/workload.sock", harness.homedir.display())]}
                }
            },
            "env": [{"key": "GREETING", "value": greeting}]
        }
    })
    .to_string()
}

fn verify_chain(chain_pem: &str, bundle_pem: &str) -> Result<(), String> {
    let chain = X509::stack_from_pem(chain_pem.as_bytes()).unwrap();
    let mut store = openssl::x509::store::X509StoreBuilder::new().unwrap();
    for anchor in X509::stack_from_pem(bundle_pem.as_bytes()).unwrap() {
        store.add_cert(anchor).unwrap();
    }
    let store = store.build();
    let mut untrusted = openssl::stack::Stack::new().unwrap();
    for certificate in &chain[1..] {
        untrusted.push(certificate.clone()).unwrap();
    }
    let mut context = openssl::x509::X509StoreContext::new().unwrap();
    context
        .init(&store, &chain[0], &untrusted, |context| {
            Ok(if context.verify_cert()? {
                Ok(())
            } else {
                Err(context.error().to_string())
            })
        })
        .unwrap()
}

/// edged bootstraps the agent; the agent (a process in the agent container) creates a module
/// through the management API; the module's own process signs (HMAC verified with the key
/// exported from keyd), gets a server certificate that verifies against the trust bundle, and
/// round-trips encrypt/decrypt over its per-module socket; other callers are refused; the
/// module is started, stopped, restarted, updated, listed, logged and removed.
#[test]
fn agent_bootstrap_module_lifecycle_and_workload() {
    let _docker = common::docker_lock();
    let mut harness = Harness::new();
    let started = Instant::now();
    harness.start_edged();
    let agent = harness.agent.clone();
    harness.wait_for("the agent to run", Duration::from_secs(30), || {
        harness.container_state(&agent).as_deref() == Some("running")
    });
    let bootstrap = started.elapsed();

    // The agent container follows the contract.
    let (ok, inspect, _) = docker(&["inspect", &agent]);
    assert!(ok);
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let env: Vec<String> = serde_json::from_value(inspect[0]["Config"]["Env"].clone()).unwrap();
    for expected in [
        "IOTEDGE_MODULEID=$edgeAgent".to_owned(),
        format!("IOTEDGE_DEVICEID={}", common::DEVICE),
        format!("IOTEDGE_IOTHUBHOSTNAME={}", common::HUB),
        "IOTEDGE_APIVERSION=2022-08-03".to_owned(),
        "EdgeDeviceHostName=edged-test-host".to_owned(),
        format!("NetworkId={}", harness.network),
        "RuntimeLogLevel=debug".to_owned(),
        "Mode=iotedged".to_owned(),
    ] {
        assert!(env.contains(&expected), "{expected} not in {env:?}");
    }
    let agent_gen_id = harness.identity.gen_id("$edgeAgent").unwrap();
    assert!(env.contains(&format!("IOTEDGE_MODULEGENERATIONID={agent_gen_id}")));
    let labels = &inspect[0]["Config"]["Labels"];
    assert_eq!(
        labels["net.azure-devices.edge.owner"],
        "Microsoft.Azure.Devices.Edge.Agent"
    );
    assert_eq!(labels["net.azure-devices.edge.create-options"], "{}");
    assert!(inspect[0]["NetworkSettings"]["Networks"][&harness.network].is_object());

    let mgmt = harness.mgmt.display().to_string();
    let module = harness.module_name("mod");

    // A host process may read but not mutate.
    let (status, body) = harness.mgmt(
        Method::POST,
        &format!("/modules?{V}"),
        &module_spec(&harness, &module, "x"),
    );
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["message"], "forbidden");
    let (status, _) = harness.mgmt(Method::GET, "/modules", "");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = harness.mgmt(Method::GET, "/modules?api-version=2018-06-28", "");
    assert_eq!(status, StatusCode::OK);
    let (status, _) = harness.mgmt(
        Method::GET,
        "/systeminfo/resources?api-version=2019-10-22",
        "",
    );
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The agent creates an identity and the module.
    let (status, identity) = harness.exec_call(
        &agent,
        &mgmt,
        "POST",
        &format!("/identities?{V}"),
        &serde_json::json!({"moduleId": module, "managedBy": "me"}).to_string(),
    );
    assert_eq!(status, 200, "{identity}");
    assert_eq!(identity["managedBy"], "me");
    assert_eq!(identity["authType"], "sas");
    let gen_id = identity["generationId"].as_str().unwrap().to_owned();
    let (status, identities) = harness.mgmt(Method::GET, &format!("/identities/?{V}"), "");
    assert_eq!(status, StatusCode::OK);
    assert!(identities["identities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|identity| identity["moduleId"] == module.as_str()
            && identity["managedBy"] == "iotedge"));

    let create_started = Instant::now();
    let (status, created) = harness.exec_call(
        &agent,
        &mgmt,
        "POST",
        &format!("/modules?{V}"),
        &module_spec(&harness, &module, "first"),
    );
    let create_time = create_started.elapsed();
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["status"]["runtimeStatus"]["status"], "stopped");
    assert_eq!(created["name"], module.as_str());
    let (status, duplicate) = harness.exec_call(
        &agent,
        &mgmt,
        "POST",
        &format!("/modules?{V}"),
        &module_spec(&harness, &module, "first"),
    );
    assert_eq!(status, 409, "{duplicate}");

    // The container follows the contract: env merged and sorted, labels overwritten.
    let (_, inspect, _) = docker(&["inspect", &module]);
    let inspect: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    let env: Vec<String> = serde_json::from_value(inspect[0]["Config"]["Env"].clone()).unwrap();
    assert!(
        env.starts_with(&["FROM_OPTIONS=1".to_owned(), "GREETING=first".to_owned()]),
        "{env:?}"
    );
    assert_eq!(
        inspect[0]["Config"]["Labels"]["net.azure-devices.edge.original-image"],
        harness.image.tag.as_str()
    );
    assert_eq!(inspect[0]["Config"]["Labels"]["test.label"], "x");

    // GET and list rebuild the details from Docker.
    let (status, details) = harness.mgmt(Method::GET, &format!("/modules/{module}?{V}"), "");
    assert_eq!(status, StatusCode::OK, "{details}");
    assert_eq!(details["status"]["runtimeStatus"]["status"], "stopped");
    assert_eq!(
        details["config"]["settings"]["image"],
        harness.image.tag.as_str()
    );
    assert_eq!(
        details["config"]["settings"]["createOptions"]["Labels"]["test.label"],
        "x"
    );
    assert_eq!(details["config"]["env"], serde_json::json!([]));
    assert_eq!(
        details["id"],
        harness.container_id(&module).unwrap().as_str()
    );

    // Start (open to any caller); starting twice is fine.
    for _ in 0..2 {
        let (status, body) =
            harness.mgmt(Method::POST, &format!("/modules/{module}/start?{V}"), "");
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    let (_, details) = harness.mgmt(Method::GET, &format!("/modules/{module}?{V}"), "");
    assert_eq!(details["status"]["runtimeStatus"]["status"], "running");
    assert!(details["status"]["startTime"]
        .as_str()
        .unwrap()
        .ends_with('Z'));
    assert!(details["status"]["runtimeStatus"]["description"]
        .as_str()
        .unwrap()
        .starts_with("Up"));
    let (_, list) = harness.mgmt(Method::GET, &format!("/modules?{V}"), "");
    let names: Vec<&str> = list["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|module| module["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&module.as_str()) && names.contains(&agent.as_str()),
        "{names:?}"
    );

    // The module's own process: sign through its per-module socket.
    let socket = "/var/run/iotedge/workload.sock";
    let data = b"edged-test-hub.example.net/devices/d/modules/m\n1700000000";
    let sign_path = format!("/modules/{module}/genid/{gen_id}/sign?api-version=2020-07-07");
    let sign_started = Instant::now();
    let (status, signed) = harness.exec_call(
        &module,
        socket,
        "POST",
        &sign_path,
        &serde_json::json!({"data": b64(data), "keyId": "primary", "algo": "HMACSHA256"})
            .to_string(),
    );
    let sign_time = sign_started.elapsed();
    assert_eq!(status, 200, "{signed}");
    let key = harness
        .runtime
        .block_on(harness.identity.module_key(&module));
    assert_eq!(
        unb64(signed["digest"].as_str().unwrap()),
        hmac_sha256(&key, data)
    );
    let (status, bad) =
        harness.exec_call(&module, socket, "POST", &sign_path, r#"{"data": "***"}"#);
    assert_eq!(status, 400, "{bad}");
    assert_eq!(
        bad["message"].as_str().unwrap().lines().next(),
        Some("invalid parameter: data")
    );

    // 100 sign calls from inside the module, 4 callers at a time (process start included).
    let body = serde_json::json!({"data": b64(data)}).to_string();
    let script = format!(
        "for j in 1 2 3 4; do (for i in $(seq 25); do /bin/uds-client {socket} POST '{sign_path}' '{body}' | head -n 1; done) & done; wait"
    );
    let burst_started = Instant::now();
    let (ok, stdout, stderr) = docker(&["exec", &module, "/bin/sh", "-c", &script]);
    let burst = burst_started.elapsed();
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout
            .lines()
            .filter(|line| line.starts_with("HTTP/1.1 200"))
            .count(),
        100,
        "{stdout}"
    );
    println!(
        "figures: 100 sign calls from inside the module, 4 concurrent callers: {} ms ({:.1} ms per call)",
        burst.as_millis(),
        burst.as_secs_f64() * 1000.0 / 100.0
    );

    // A server certificate that verifies against the trust bundle.
    let (status, certificate) = harness.exec_call(
        &module,
        socket,
        "POST",
        &format!("/modules/{module}/genid/{gen_id}/certificate/server?{V}"),
        r#"{"commonName": "edge.local", "expiration": "2099-01-01T00:00:00Z"}"#,
    );
    assert_eq!(status, 201, "{certificate}");
    assert_eq!(certificate["privateKey"]["type"], "key");
    assert!(certificate["privateKey"]["bytes"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PRIVATE KEY-----"));
    assert!(certificate["expiration"]
        .as_str()
        .unwrap()
        .ends_with("+00:00"));
    let chain = certificate["certificate"].as_str().unwrap();
    let (status, bundle) =
        harness.exec_call(&module, socket, "GET", &format!("/trust-bundle?{V}"), "");
    assert_eq!(status, 200);
    verify_chain(chain, bundle["certificate"].as_str().unwrap()).unwrap();
    let leaf = X509::from_pem(chain.as_bytes()).unwrap();
    let leaf_text = String::from_utf8(leaf.to_text().unwrap()).unwrap();
    assert!(leaf_text.contains("DNS:edge.local"), "{leaf_text}");
    assert!(leaf_text.contains(&format!("DNS:{module}")), "{leaf_text}");
    assert!(
        leaf_text.contains("TLS Web Server Authentication"),
        "{leaf_text}"
    );
    let private_key = openssl::pkey::PKey::private_key_from_pem(
        certificate["privateKey"]["bytes"]
            .as_str()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    assert!(leaf.public_key().unwrap().public_eq(&private_key));
    let (status, identity_cert) = harness.exec_call(
        &module,
        socket,
        "POST",
        &format!("/modules/{module}/certificate/identity?{V}"),
        "",
    );
    assert_eq!(status, 201, "{identity_cert}");
    verify_chain(
        identity_cert["certificate"].as_str().unwrap(),
        bundle["certificate"].as_str().unwrap(),
    )
    .unwrap();
    let (status, manifest) = harness.exec_call(
        &module,
        socket,
        "GET",
        &format!("/manifest-trust-bundle?{V}"),
        "",
    );
    assert_eq!((status, manifest["certificate"].as_str()), (200, Some("")));

    // Encrypt / decrypt round trip; the AAD binds the module name and generation ID.
    let iv = [7u8; 32];
    let (status, encrypted) = harness.exec_call(
        &module,
        socket,
        "POST",
        &format!("/modules/{module}/genid/{gen_id}/encrypt?{V}"),
        &serde_json::json!({"plaintext": b64(b"secret payload"), "initializationVector": b64(&iv)})
            .to_string(),
    );
    assert_eq!(status, 200, "{encrypted}");
    let ciphertext = encrypted["ciphertext"].as_str().unwrap().to_owned();
    assert_eq!(unb64(&ciphertext)[0], 0x02);
    let decrypt = |gen: &str| {
        harness.exec_call(
            &module,
            socket,
            "POST",
            &format!("/modules/{module}/genid/{gen}/decrypt?{V}"),
            &serde_json::json!({"ciphertext": ciphertext, "initializationVector": b64(&iv)})
                .to_string(),
        )
    };
    let (status, decrypted) = decrypt(&gen_id);
    assert_eq!(status, 200, "{decrypted}");
    assert_eq!(
        unb64(decrypted["plaintext"].as_str().unwrap()),
        b"secret payload"
    );
    let (status, _) = decrypt("another-generation");
    assert!(
        status == 400 || status == 500,
        "old ciphertext must not open under a new genid: {status}"
    );

    // Processes of another container (the agent) and of the host are refused.
    let agent_socket = harness.workload.display().to_string();
    let (status, refused) = harness.exec_call(
        &agent,
        &agent_socket,
        "POST",
        &sign_path,
        &serde_json::json!({"data": b64(data)}).to_string(),
    );
    assert_eq!(
        (status, refused["message"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, _) = harness.call_raw(
        &harness.homedir.join("mnt").join(format!("{module}.sock")),
        Method::POST,
        &sign_path,
        &serde_json::json!({"data": b64(data)}).to_string(),
    );
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, listed) =
        harness.call_raw(&harness.workload, Method::GET, &format!("/modules?{V}"), "");
    assert_eq!(status, StatusCode::OK);
    assert!(parse_json(&listed)["modules"].as_array().unwrap().len() >= 2);

    // Logs: Docker's framed stream, stdout and stderr.
    harness.wait_for("the module's output", Duration::from_secs(10), || {
        let (_, bytes) = harness.call_raw(
            &harness.mgmt,
            Method::GET,
            &format!("/modules/{module}/logs?{V}&tail=all"),
            "",
        );
        log_frames(&bytes)
            .iter()
            .any(|(_, text)| text.contains("hello from first"))
    });
    let (status, bytes) = harness.call_raw(
        &harness.mgmt,
        Method::GET,
        &format!("/modules/{module}/logs?{V}&tail=all&timestamps=true&since=1%20day&follow=false"),
        "",
    );
    assert_eq!(status, StatusCode::OK);
    let frames = log_frames(&bytes);
    assert!(
        frames
            .iter()
            .any(|(kind, text)| *kind == 1 && text.contains("Z hello from first")),
        "{frames:?}"
    );
    assert!(
        frames
            .iter()
            .any(|(kind, text)| *kind == 2 && text.contains("oops")),
        "{frames:?}"
    );
    let (status, body) = harness.mgmt(
        Method::GET,
        &format!("/modules/{module}/logs?{V}&tail=ten"),
        "",
    );
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["message"],
        "invalid parameter: tail\ncaused by: \"ten\" is not \"all\" or a number"
    );

    // follow=true streams until the container stops.
    let follower = {
        let socket = harness.mgmt.clone();
        let path = format!("/modules/{module}/logs?{V}&follow=true&tail=all");
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let started = Instant::now();
            let response = runtime
                .block_on(http_common::UdsClient::new(&socket).send(
                    Method::GET,
                    &path,
                    &[],
                    Vec::new().into(),
                ))
                .unwrap();
            (response.status, response.body.to_vec(), started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !follower.is_finished(),
        "a followed log ended while the module runs"
    );
    // Stop, restart.
    let (status, _) = harness.mgmt(Method::POST, &format!("/modules/{module}/stop?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, details) = harness.mgmt(Method::GET, &format!("/modules/{module}?{V}"), "");
    assert_eq!(details["status"]["runtimeStatus"]["status"], "stopped");
    assert!(
        details["status"]["exitStatus"]["statusCode"].is_string(),
        "{details}"
    );
    let (status, followed, followed_for) = follower.join().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(followed_for >= Duration::from_millis(1500));
    assert!(log_frames(&followed)
        .iter()
        .any(|(_, text)| text.contains("hello from first")));
    let (status, _) = harness.mgmt(Method::POST, &format!("/modules/{module}/stop?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = harness.mgmt(Method::POST, &format!("/modules/{module}/restart?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, details) = harness.mgmt(Method::GET, &format!("/modules/{module}?{V}"), "");
    assert_eq!(details["status"]["runtimeStatus"]["status"], "running");

    // prepareupdate and update (stop → remove → create → start).
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "POST",
        &format!("/modules/other-name/prepareupdate?{V}"),
        &module_spec(&harness, &module, "second"),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "POST",
        &format!("/modules/{module}/prepareupdate?{V}"),
        &module_spec(&harness, &module, "second"),
    );
    assert_eq!(status, 204, "{body}");
    let old_id = harness.container_id(&module).unwrap();
    let (status, updated) = harness.exec_call(
        &agent,
        &mgmt,
        "PUT",
        &format!("/modules/{module}?{V}&start=true"),
        &module_spec(&harness, &module, "second"),
    );
    assert_eq!(status, 201, "{updated}");
    assert_eq!(updated["status"]["runtimeStatus"]["status"], "running");
    assert_ne!(harness.container_id(&module).unwrap(), old_id);
    assert_eq!(harness.container_state(&module).as_deref(), Some("running"));
    harness.wait_for(
        "the updated module's output",
        Duration::from_secs(10),
        || {
            let (_, bytes) = harness.call_raw(
                &harness.mgmt,
                Method::GET,
                &format!("/modules/{module}/logs?{V}"),
                "",
            );
            log_frames(&bytes)
                .iter()
                .any(|(_, text)| text.contains("hello from second"))
        },
    );
    // The per-module socket survives the update: the new container can sign.
    let (status, signed_again) = harness.exec_call(
        &module,
        socket,
        "POST",
        &sign_path,
        &serde_json::json!({"data": b64(data)}).to_string(),
    );
    assert_eq!(status, 200, "{signed_again}");
    assert_eq!(signed_again["digest"], signed["digest"]);

    // System info.
    let (status, info) = harness.mgmt(Method::GET, &format!("/systeminfo?{V}"), "");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(info["osType"], "Linux");
    assert!(info["server_version"].is_string(), "{info}");
    let (status, resources) = harness.mgmt(Method::GET, &format!("/systeminfo/resources?{V}"), "");
    assert_eq!(status, StatusCode::OK);
    let stats: serde_json::Value =
        serde_json::from_str(resources["docker_stats"].as_str().unwrap()).unwrap();
    assert!(stats.as_array().unwrap().len() >= 2, "{stats}");

    // Support bundle: a valid zip (checked by Python's zipfile) with logs, inspect and network.
    let (status, bytes) = harness.call_raw(
        &harness.mgmt,
        Method::GET,
        "/systeminfo/supportbundle?api-version=2020-07-07&since=1%20day",
        "",
    );
    assert_eq!(status, StatusCode::OK);
    let bundle = harness.root.path().join("bundle.zip");
    std::fs::write(&bundle, &bytes).unwrap();
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zipfile\n\
             z = zipfile.ZipFile(sys.argv[1])\n\
             assert z.testzip() is None\n\
             print('\\n'.join(z.namelist()))\n\
             sys.stdout.write(z.read('logs/' + sys.argv[2] + '_log.txt').decode())\n",
        )
        .arg(&bundle)
        .arg(&module)
        .output()
        .expect("python3 is needed to check the support bundle");
    let listing = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{listing}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        format!("inspect/{module}.json"),
        format!("inspect/{agent}.json"),
        format!("network/{}.json", harness.network),
        "hello from second".to_owned(),
    ] {
        assert!(listing.contains(&expected), "{expected} not in {listing}");
    }
    let (status, _) = harness.mgmt(
        Method::GET,
        "/systeminfo/supportbundle?api-version=2019-11-05",
        "",
    );
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Delete: 204, then 404; the per-module socket is gone.
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "DELETE",
        &format!("/modules/{module}?{V}"),
        "",
    );
    assert_eq!(status, 204, "{body}");
    assert!(harness.container_state(&module).is_none());
    assert!(!harness
        .homedir
        .join("mnt")
        .join(format!("{module}.sock"))
        .exists());
    let (status, _) = harness.exec_call(
        &agent,
        &mgmt,
        "DELETE",
        &format!("/modules/{module}?{V}"),
        "",
    );
    assert_eq!(status, 404);
    let (status, _) = harness.mgmt(Method::GET, &format!("/modules/{module}?{V}"), "");
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = harness.exec_call(
        &agent,
        &mgmt,
        "DELETE",
        &format!("/identities/{module}?{V}"),
        "",
    );
    assert_eq!(status, 204);

    // A container without edged's owner label is not a module: it is neither deleted nor
    // stopped and replaced through the management API.
    let host = harness.module_name("host");
    let (ok, _, stderr) = docker(&[
        "run",
        "-d",
        "--name",
        &host,
        &harness.image.tag,
        "sh",
        "-c",
        LOOP_COMMAND,
    ]);
    assert!(ok, "{stderr}");
    let host_id = harness.container_id(&host).unwrap();
    let (status, _) =
        harness.exec_call(&agent, &mgmt, "DELETE", &format!("/modules/{host}?{V}"), "");
    assert_eq!(status, 404);
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "PUT",
        &format!("/modules/{host}?{V}&start=true"),
        &module_spec(&harness, &host, "intruder"),
    );
    assert!(!(200..300).contains(&status), "{status} {body}");
    assert_eq!(
        harness.container_id(&host).as_deref(),
        Some(host_id.as_str())
    );
    assert_eq!(harness.container_state(&host).as_deref(), Some("running"));
    docker(&["rm", "-f", &host]);

    println!(
        "figures: agent bootstrap {} ms, module create {} ms, sign (docker exec included) {} ms",
        bootstrap.as_millis(),
        create_time.as_millis(),
        sign_time.as_millis()
    );
    assert_eq!(harness.edged.stop(), Some(0));
}

/// The agent is re-created when it is removed behind edged's back (edged watches Docker's
/// events, so this takes well under the 60 s watchdog period), and an edged restart keeps the
/// module identities working: after the restart (which, as in the reference, stops modules
/// because their socket inodes change) the started module signs with the same key and decrypts
/// what it encrypted before.
#[test]
fn agent_recreated_and_identities_survive_restart() {
    let _docker = common::docker_lock();
    let mut harness = Harness::new();
    harness.start_edged();
    let agent = harness.agent.clone();
    harness.wait_for("the agent to run", Duration::from_secs(30), || {
        harness.container_state(&agent).as_deref() == Some("running")
    });
    let mgmt = harness.mgmt.display().to_string();
    let module = harness.module_name("survivor");
    let (status, identity) = harness.exec_call(
        &agent,
        &mgmt,
        "POST",
        &format!("/identities?{V}"),
        &serde_json::json!({"moduleId": module}).to_string(),
    );
    assert_eq!(status, 200, "{identity}");
    let gen_id = identity["generationId"].as_str().unwrap().to_owned();
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "PUT",
        &format!("/modules/{module}?{V}&start=true"),
        &module_spec(&harness, &module, "survivor"),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(harness.container_state(&module).as_deref(), Some("running"));

    let socket = "/var/run/iotedge/workload.sock";
    let data = b"sign me";
    let sign = |harness: &Harness| {
        harness.exec_call(
            &module,
            socket,
            "POST",
            &format!("/modules/{module}/genid/{gen_id}/sign?{V}"),
            &serde_json::json!({"data": b64(data)}).to_string(),
        )
    };
    let (status, before) = sign(&harness);
    assert_eq!(status, 200, "{before}");
    let iv = [9u8; 16];
    let (status, encrypted) = harness.exec_call(
        &module,
        socket,
        "POST",
        &format!("/modules/{module}/genid/{gen_id}/encrypt?{V}"),
        &serde_json::json!({"plaintext": b64(b"kept across restarts"), "initializationVector": b64(&iv)})
            .to_string(),
    );
    assert_eq!(status, 200, "{encrypted}");

    // Remove the agent behind edged's back: it comes back, with a fresh container.
    let old_agent = harness.container_id(&agent).unwrap();
    let removed = Instant::now();
    let (ok, _, stderr) = docker(&["rm", "-f", &agent]);
    assert!(ok, "{stderr}");
    harness.wait_for(
        "the agent to be re-created",
        Duration::from_secs(20),
        || {
            harness.container_state(&agent).as_deref() == Some("running")
                && harness.container_id(&agent).as_deref() != Some(old_agent.as_str())
        },
    );
    let recreate_time = removed.elapsed();
    // The re-created agent reaches the management API through its mounts.
    let (status, _) = harness.exec_call(&agent, &mgmt, "GET", &format!("/modules?{V}"), "");
    assert_eq!(status, 200);

    // The agent updates itself: 201 at once, then edged replaces it in the background.
    let current_agent = harness.container_id(&agent).unwrap();
    let agent_spec = serde_json::json!({
        "name": agent, "type": "docker", "imagePullPolicy": "never",
        "config": {"settings": {"image": harness.image.tag, "createOptions": {
            "Cmd": ["/bin/sh", "-c", LOOP_COMMAND],
            "Labels": {"updated": "yes"},
            "HostConfig": {"Binds": [
                format!("{}/mnt/{agent}.sock:{}", harness.homedir.display(), harness.workload.display()),
                format!("{mgmt}:{mgmt}"),
            ]}}}}
    });
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "PUT",
        &format!("/modules/{agent}?{V}&start=true"),
        &agent_spec.to_string(),
    );
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["status"]["runtimeStatus"]["status"], "running");
    harness.wait_for("the agent to be replaced", Duration::from_secs(30), || {
        harness.container_state(&agent).as_deref() == Some("running")
            && harness.container_id(&agent).as_deref() != Some(current_agent.as_str())
    });
    let (_, label, _) = docker(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"updated\"}}",
        &agent,
    ]);
    assert_eq!(label.trim(), "yes");
    let (status, _) = harness.exec_call(&agent, &mgmt, "GET", &format!("/modules?{V}"), "");
    assert_eq!(status, 200);

    // Restart edged.
    assert_eq!(harness.edged.stop(), Some(0), "{}", harness.edged.log());
    let restarted = Instant::now();
    harness.start_edged();
    harness.wait_for("the agent to run again", Duration::from_secs(30), || {
        harness.container_state(&agent).as_deref() == Some("running")
    });
    let restart_time = restarted.elapsed();
    // The module was stopped at startup (socket inodes change); the agent starts it again.
    let (status, body) = harness.mgmt(Method::POST, &format!("/modules/{module}/start?{V}"), "");
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, after) = sign(&harness);
    assert_eq!(status, 200, "{after}");
    assert_eq!(
        after["digest"], before["digest"],
        "the module's key must not change"
    );
    let key = harness
        .runtime
        .block_on(harness.identity.module_key(&module));
    assert_eq!(
        unb64(after["digest"].as_str().unwrap()),
        hmac_sha256(&key, data)
    );
    let (status, decrypted) = harness.exec_call(
        &module,
        socket,
        "POST",
        &format!("/modules/{module}/genid/{gen_id}/decrypt?{V}"),
        &serde_json::json!({"ciphertext": encrypted["ciphertext"], "initializationVector": b64(&iv)})
            .to_string(),
    );
    assert_eq!(status, 200, "{decrypted}");
    assert_eq!(
        unb64(decrypted["plaintext"].as_str().unwrap()),
        b"kept across restarts"
    );
    println!(
        "figures: agent re-created {} ms after removal; edged restart to agent running {} ms",
        recreate_time.as_millis(),
        restart_time.as_millis()
    );

    // Reprovision: only the agent may ask; 204, then modules stop, the cache goes, identityd is
    // asked to reprovision and edged exits 154.
    let (status, _) = harness.mgmt(Method::POST, &format!("/device/reprovision?{V}"), "");
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "POST",
        &format!("/device/reprovision?{V}"),
        "",
    );
    assert_eq!(status, 204, "{body}");
    assert_eq!(harness.edged.wait_exit(Duration::from_secs(60)), Some(154));
    assert!(!harness.homedir.join("cache").exists());
    assert!(harness
        .identity
        .calls
        .lock()
        .unwrap()
        .iter()
        .any(|call| call == "POST /identities/device/reprovision"));
    assert_ne!(harness.container_state(&module).as_deref(), Some("running"));
}

/// The watchdog gives up after `[watchdog] max_retries` failed runs: exit 1.
#[test]
fn the_watchdog_gives_up_after_max_retries() {
    let _docker = common::docker_lock();
    let mut harness = Harness::new();
    let config = std::fs::read_to_string(harness.edged.config_file()).unwrap();
    let config = config.replace(
        &format!("image = \"{}\"", harness.image.tag),
        "image = \"edged-test-image:does-not-exist\"",
    );
    std::fs::write(
        harness.edged.config_file(),
        format!("{config}[watchdog]\nmax_retries = 1\n"),
    )
    .unwrap();
    harness.edged.launch();
    assert_eq!(harness.edged.wait_exit(Duration::from_secs(60)), Some(1));
    let log = harness.edged.log();
    assert!(log.contains("giving up after 1 failures"), "{log}");
}

/// Under systemd socket activation edged takes its two sockets by name
/// (`aziot-edged.mgmt.socket`, `aziot-edged.workload.socket`) instead of binding paths, and the
/// agent reaches the management API through the inherited socket.
#[test]
fn serves_on_the_two_named_sockets_systemd_passes() {
    let _docker = common::docker_lock();
    let mut harness = Harness::new();
    harness.listen_on_systemd_fds();
    let (mgmt, workload) = (harness.mgmt.clone(), harness.workload.clone());
    harness.edged.spawn_activated(
        &[
            (mgmt.as_path(), "aziot-edged.mgmt.socket"),
            (workload.as_path(), "aziot-edged.workload.socket"),
        ],
        Duration::from_secs(10),
    );
    // The first connection makes the activator start edged; answers come once it is ready.
    harness.wait_for(
        "edged to answer on the passed socket",
        Duration::from_secs(30),
        || {
            let client = http_common::UdsClient::new(&mgmt);
            harness
                .runtime
                .block_on(client.send(
                    Method::GET,
                    &format!("/modules?{V}"),
                    &[],
                    Vec::new().into(),
                ))
                .is_ok_and(|response| response.status == StatusCode::OK)
        },
    );
    let agent = harness.agent.clone();
    harness.wait_for("the agent to run", Duration::from_secs(30), || {
        harness.container_state(&agent).as_deref() == Some("running")
    });
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt.display().to_string(),
        "POST",
        &format!("/identities?{V}"),
        r#"{"moduleId": "activated"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let (status, bytes) =
        harness.call_raw(&workload, Method::GET, &format!("/trust-bundle?{V}"), "");
    assert_eq!(status, StatusCode::OK);
    assert!(parse_json(&bytes)["certificate"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(harness.edged.log().contains("edged is serving"));
    assert_eq!(harness.edged.stop(), Some(0));
}

/// Under a service manager with a file-descriptor store, edged hands its sockets (management,
/// workload and every per-module socket) to the store and leaves modules running on SIGTERM;
/// restarted with those fds, it serves on the very same sockets, so running containers (whose
/// bind mounts pin the socket inodes) keep working without being restarted.
#[test]
fn modules_keep_running_across_a_restart_with_systemds_fd_store() {
    let _docker = common::docker_lock();
    let mut harness = Harness::new();
    let base = std::fs::canonicalize(harness.root.path()).unwrap();
    let mut systemd = common::FakeSystemd::new(&base);
    harness.edged.env.push((
        "NOTIFY_SOCKET".to_owned(),
        systemd.path.display().to_string(),
    ));
    // systemd 254+ tells a service its FileDescriptorStoreMax= this way.
    harness
        .edged
        .env
        .push(("FDSTORE".to_owned(), "64".to_owned()));
    harness.start_edged();
    let agent = harness.agent.clone();
    harness.wait_for("the agent to run", Duration::from_secs(30), || {
        harness.container_state(&agent).as_deref() == Some("running")
    });
    let mgmt = harness.mgmt.display().to_string();
    let module = harness.module_name("kept");
    let (status, identity) = harness.exec_call(
        &agent,
        &mgmt,
        "POST",
        &format!("/identities?{V}"),
        &serde_json::json!({"moduleId": module}).to_string(),
    );
    assert_eq!(status, 200, "{identity}");
    let gen_id = identity["generationId"].as_str().unwrap().to_owned();
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "PUT",
        &format!("/modules/{module}?{V}&start=true"),
        &module_spec(&harness, &module, "kept"),
    );
    assert_eq!(status, 201, "{body}");
    let sign = |harness: &Harness| {
        harness.exec_call(
            &module,
            "/var/run/iotedge/workload.sock",
            "POST",
            &format!("/modules/{module}/genid/{gen_id}/sign?{V}"),
            &serde_json::json!({"data": b64(b"kept")}).to_string(),
        )
    };
    let (status, before) = sign(&harness);
    assert_eq!(status, 200, "{before}");
    let started_at = |name: &str| {
        let (ok, stdout, _) = docker(&["inspect", "-f", "{{.State.StartedAt}}", name]);
        assert!(ok);
        stdout.trim().to_owned()
    };
    let (module_started, agent_started) = (started_at(&module), started_at(&agent));

    assert_eq!(harness.edged.stop(), Some(0), "{}", harness.edged.log());
    systemd.drain();
    let names: Vec<&str> = systemd
        .store
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    for expected in [
        "aziot-edged.mgmt.socket".to_owned(),
        "aziot-edged.workload.socket".to_owned(),
        format!("edged-module-{agent}"),
        format!("edged-module-{module}"),
    ] {
        assert!(
            names.contains(&expected.as_str()),
            "{expected} not stored: {names:?}\n{:?}\n{}",
            systemd.messages,
            harness.edged.log()
        );
    }
    // edged is down; the modules still run.
    assert_eq!(harness.container_state(&module).as_deref(), Some("running"));
    assert_eq!(harness.container_state(&agent).as_deref(), Some("running"));

    let restarted = Instant::now();
    harness
        .edged
        .spawn_with_fds(&systemd.passed(), Duration::from_secs(30));
    // The module was never restarted, and its mounted socket answers again.
    harness.wait_for(
        "the module's socket to answer",
        Duration::from_secs(30),
        || {
            let (ok, stdout, _) = docker(&[
                "exec",
                &module,
                "/bin/uds-client",
                "/var/run/iotedge/workload.sock",
                "GET",
                &format!("/modules?{V}"),
            ]);
            ok && stdout.starts_with("HTTP/1.1 200")
        },
    );
    let resumed = restarted.elapsed();
    let (status, after) = sign(&harness);
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["digest"], before["digest"]);
    assert_eq!(
        started_at(&module),
        module_started,
        "the module was restarted"
    );
    assert_eq!(started_at(&agent), agent_started, "the agent was restarted");
    // The agent's mounted management socket works too.
    let (status, _) = harness.exec_call(&agent, &mgmt, "GET", &format!("/modules?{V}"), "");
    assert_eq!(status, 200);
    assert!(harness
        .edged
        .log()
        .contains(&format!("kept the workload socket of module {module}")));
    println!(
        "figures: edged restart with the fd store to the module's socket answering {} ms",
        resumed.as_millis()
    );
}
