//! edged with the real identityd, provisioned against the DPS / IoT Hub emulator (manual
//! connection string): the agent is bootstrapped with the hub's device identity, the agent
//! creates a module identity in the (emulated) hub through edged, and the SAS token that the
//! module mints through its per-module workload socket is accepted by the emulator's verifier
//! with the keys the hub stores for that module.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{b64, docker, unb64, Daemon, Harness, LOOP_COMMAND, V};
use http::{Method, StatusCode};

#[test]
fn module_sas_tokens_signed_through_edged_are_accepted_by_the_hub() {
    let _docker = common::docker_lock();
    let mut harness = Harness::new();
    let device_id = format!("edged-cloud-{}", harness.suffix);
    let mut key_bytes = [0u8; 32];
    openssl::rand::rand_bytes(&mut key_bytes).unwrap();
    let device_key = b64(&key_bytes);
    let emulator = harness
        .runtime
        .block_on(cloud_emulator::start(cloud_emulator::Config {
            devices: vec![cloud_emulator::DeviceSpec {
                hub: None,
                device_id: device_id.clone(),
                iot_edge: true,
                authentication: cloud_emulator::DeviceAuthSpec::Sas {
                    primary_key: Some(device_key.clone()),
                    secondary_key: None,
                },
            }],
            ..cloud_emulator::Config::default()
        }))
        .unwrap();
    let hub = emulator.hub_hostname().to_owned();

    // The real identityd, provisioned manually with the device's connection string.
    let base = std::fs::canonicalize(harness.root.path()).unwrap();
    let mut identityd = Daemon::new(
        "identityd",
        common::sibling_binary("identityd"),
        &base,
        "AZIOT_IDENTITYD_CONFIG",
        "AZIOT_IDENTITYD_CONFIG_DIR",
    )
    .with_socket(base.join("real-identityd.sock"));
    std::fs::write(
        identityd.config_file(),
        format!(
            "hostname = \"edged-test-host\"\nhomedir = \"{}\"\n\
             [provisioning]\nsource = \"manual\"\n\
             connection_string = \"HostName={hub};DeviceId={device_id};SharedAccessKey={device_key}\"\n\
             [endpoints]\naziot_identityd = \"unix://{}\"\naziot_keyd = \"unix://{}\"\naziot_certd = \"unix://{}\"\n",
            base.join("identityd-home").display(),
            identityd.socket.display(),
            harness.keyd.socket.display(),
            harness.certd.socket.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        identityd.config_file(),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    identityd.env.push((
        "SSL_CERT_FILE".to_owned(),
        emulator.ca_cert_path().display().to_string(),
    ));
    identityd.spawn_within(Duration::from_secs(30));

    // edged talks to the real identityd.
    let config = std::fs::read_to_string(harness.edged.config_file()).unwrap();
    let fake = format!("unix://{}", base.join("identityd.sock").display());
    assert!(config.contains(&fake));
    let config = config.replace(&fake, &format!("unix://{}", identityd.socket.display()));
    std::fs::write(harness.edged.config_file(), config).unwrap();
    harness.start_edged();
    let agent = harness.agent.clone();
    harness.wait_for("the agent to run", Duration::from_secs(60), || {
        harness.container_state(&agent).as_deref() == Some("running")
    });
    let (_, env, _) = docker(&["inspect", "-f", "{{json .Config.Env}}", &agent]);
    assert!(
        env.contains(&format!("IOTEDGE_IOTHUBHOSTNAME={hub}")),
        "{env}"
    );
    assert!(
        env.contains(&format!("IOTEDGE_DEVICEID={device_id}")),
        "{env}"
    );
    // edged asked identityd for the agent's identity: it exists in the hub.
    let hub_modules = emulator.control().modules(None, &device_id).unwrap();
    assert!(
        hub_modules
            .iter()
            .any(|module| module["moduleId"] == "$edgeAgent"),
        "{hub_modules:?}"
    );

    // The agent creates a module identity and the module.
    let mgmt = harness.mgmt.display().to_string();
    let module = harness.module_name("cloud");
    let (status, identity) = harness.exec_call(
        &agent,
        &mgmt,
        "POST",
        &format!("/identities?{V}"),
        &serde_json::json!({"moduleId": module}).to_string(),
    );
    assert_eq!(status, 200, "{identity}");
    let gen_id = identity["generationId"].as_str().unwrap().to_owned();
    let spec = serde_json::json!({
        "name": module, "type": "docker", "imagePullPolicy": "never",
        "config": {"settings": {"image": harness.image.tag, "createOptions": {
            "Cmd": ["/bin/sh", "-c", LOOP_COMMAND],
            "HostConfig": {"Binds": [format!("{}/mnt/{module}.sock:/var/run/iotedge/workload.sock", harness.homedir.display())]}}}}
    });
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "PUT",
        &format!("/modules/{module}?{V}&start=true"),
        &spec.to_string(),
    );
    assert_eq!(status, 201, "{body}");

    // The module mints a SAS token the way the Azure IoT SDKs do.
    let resource = format!("{hub}/devices/{device_id}/modules/{module}");
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let encoded = cloud_emulator::sas::encode_component(&resource.to_lowercase());
    let to_sign = format!("{encoded}\n{expiry}");
    let started = Instant::now();
    let (status, signed) = harness.exec_call(
        &module,
        "/var/run/iotedge/workload.sock",
        "POST",
        &format!("/modules/{module}/genid/{gen_id}/sign?api-version=2022-08-03"),
        &serde_json::json!({"keyId": "primary", "algo": "HMACSHA256", "data": b64(to_sign.as_bytes())})
            .to_string(),
    );
    let sign_time = started.elapsed();
    assert_eq!(status, 200, "{signed}");
    let signature = unb64(signed["digest"].as_str().unwrap());
    let token = format!(
        "SharedAccessSignature sr={encoded}&sig={}&se={expiry}",
        cloud_emulator::sas::encode_component(&b64(&signature))
    );
    let modules = emulator.control().modules(None, &device_id).unwrap();
    let entry = modules
        .iter()
        .find(|entry| entry["moduleId"] == module.as_str())
        .unwrap_or_else(|| panic!("module {module} not in the hub: {modules:?}"));
    let keys = &entry["authentication"]["symmetricKey"];
    let parsed = cloud_emulator::sas::SasToken::parse(&token).unwrap();
    parsed
        .verify(
            expiry - 60,
            |token| token.check_prefix_audience(&resource, &resource),
            None,
            [
                keys["primaryKey"].as_str().unwrap(),
                keys["secondaryKey"].as_str().unwrap(),
            ],
        )
        .expect("the hub accepts the module's token");

    // Identities through edged mirror the hub; delete removes it there.
    let (status, list) = harness.mgmt(Method::GET, &format!("/identities?{V}"), "");
    assert_eq!(status, StatusCode::OK);
    assert!(list["identities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|identity| identity["moduleId"] == module.as_str()));
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "DELETE",
        &format!("/modules/{module}?{V}"),
        "",
    );
    assert_eq!(status, 204, "{body}");
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "DELETE",
        &format!("/identities/{module}?{V}"),
        "",
    );
    assert_eq!(status, 204, "{body}");
    let modules = emulator.control().modules(None, &device_id).unwrap();
    assert!(!modules
        .iter()
        .any(|entry| entry["moduleId"] == module.as_str()));
    println!(
        "figures: module sign through edged and identityd (docker exec included) {} ms",
        sign_time.as_millis()
    );
    assert_eq!(harness.edged.stop(), Some(0));
    identityd.stop();
}
