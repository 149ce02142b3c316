//! Black-box tests: the real keyd, certd and identityd binaries with the cloud emulator
//! in-process. Every cloud check reads the emulator's own state and request log.

mod common;

use std::time::{Duration, Instant};

use common::{emulator, eventually, random_key_b64, Stack};
use http::{Method, StatusCode};
use identity_api::{AuthInfo, Identity};

const MODULE_PRINCIPAL: &str =
    "[[principal]]\nuid = 4321\nname = \"hostmodule1\"\nidtype = [\"module\"]\n";

fn aziot(identity: &Identity) -> &identity_api::AziotSpec {
    match identity {
        Identity::Aziot(spec) => spec,
        other => panic!("not an aziot identity: {other:?}"),
    }
}

/// Signs a module SAS token through keyd with `handle` and checks it with the emulator's SAS
/// verifier against the keys the emulated hub stores for that module.
async fn assert_module_token_accepted(
    stack: &Stack,
    emu: &cloud_emulator::RunningEmulator,
    hub: &str,
    device_id: &str,
    module_id: &str,
    handle: &key_api::KeyHandle,
) {
    let resource = format!("{hub}/devices/{device_id}/modules/{module_id}");
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    let encoded = identityd::cloud::sas::encode_resource(&resource);
    let signature = stack
        .keyd_client()
        .sign(
            handle,
            key_api::SignMechanism::HmacSha256 {
                message: identityd::cloud::sas::string_to_sign(&encoded, expiry).as_bytes(),
            },
        )
        .await
        .unwrap();
    let token = identityd::cloud::sas::assemble(&encoded, &signature, expiry, None);
    let modules = emu.control().modules(Some(hub), device_id).unwrap();
    let module = modules
        .iter()
        .find(|module| module["moduleId"] == module_id)
        .unwrap_or_else(|| panic!("module {module_id} not in hub: {modules:?}"));
    let keys = &module["authentication"]["symmetricKey"];
    let primary = keys["primaryKey"].as_str().unwrap();
    let secondary = keys["secondaryKey"].as_str().unwrap();
    assert_ne!(primary, secondary);
    let parsed = cloud_emulator::sas::SasToken::parse(&token).unwrap();
    parsed
        .verify(
            expiry - 10,
            |token| token.check_prefix_audience(&resource, &resource),
            None,
            [primary, secondary],
        )
        .expect("the emulator rejects the module token");
}

fn hub_requests_ok(emu: &cloud_emulator::RunningEmulator, auth: &str) -> usize {
    emu.control()
        .requests()
        .iter()
        .filter(|entry| entry.service == "hub" && entry.auth == auth && entry.auth_ok == Some(true))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_connection_string_provisions_and_manages_modules() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config.devices.push(cloud_emulator::DeviceSpec {
            device_id: "manual1".into(),
            hub: None,
            iot_edge: false,
            authentication: cloud_emulator::DeviceAuthSpec::Sas {
                primary_key: Some(key.clone()),
                secondary_key: None,
            },
        });
    })
    .await;
    let hub = emu.hub_hostname().to_owned();
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack.write_identityd_config(&format!(
        "[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName={hub};DeviceId=manual1;SharedAccessKey={key}\"\n{MODULE_PRINCIPAL}"
    ));
    stack.start_identityd(emu.ca_cert_path());

    let device = stack.client().get_device_identity().await.unwrap();
    let spec = aziot(&device);
    assert_eq!(spec.hub_name, hub);
    assert_eq!(spec.gateway_host, hub);
    assert_eq!(spec.device_id, "manual1");
    let Some(AuthInfo::Sas { key_handle }) = &spec.auth else {
        panic!("expected SAS auth: {spec:?}");
    };
    // The handle is keyd's, for the imported connection-string key.
    let own = stack.keyd_client().load_key("device-id").await.unwrap();
    let message = b"probe";
    assert_eq!(
        stack
            .keyd_client()
            .sign(key_handle, key_api::SignMechanism::HmacSha256 { message })
            .await
            .unwrap(),
        stack
            .keyd_client()
            .sign(&own, key_api::SignMechanism::HmacSha256 { message })
            .await
            .unwrap()
    );
    let info = stack.client().get_provisioning_info().await.unwrap();
    assert_eq!(info.source, "manual");
    assert_eq!(info.auth.as_deref(), Some("sas"));
    // The connection string never reaches the log.
    assert!(!stack.identityd.log().contains(&key), "the key was logged");

    // Reconciliation created the principal's module with keys derived in keyd.
    eventually("reconciliation", Duration::from_secs(20), || {
        emu.control()
            .modules(None, "manual1")
            .filter(|modules| modules.iter().any(|m| m["moduleId"] == "hostmodule1"))
    })
    .await;
    let module = stack
        .client()
        .get_module("hostmodule1", "aziot")
        .await
        .unwrap();
    let module_spec = aziot(&module);
    assert_eq!(module_spec.module_id.as_deref(), Some("hostmodule1"));
    assert!(module_spec.gen_id.is_some());
    let Some(AuthInfo::Sas { key_handle }) = &module_spec.auth else {
        panic!("expected SAS auth: {module_spec:?}");
    };
    assert_module_token_accepted(&stack, &emu, &hub, "manual1", "hostmodule1", key_handle).await;
    assert!(
        hub_requests_ok(&emu, "sas") > 0,
        "no authenticated hub request"
    );

    // Module CRUD through the API.
    let created = stack.client().create_module("$edgeAgent").await.unwrap();
    assert_eq!(aziot(&created).module_id.as_deref(), Some("$edgeAgent"));
    let Some(AuthInfo::Sas { key_handle }) = &aziot(&created).auth else {
        panic!("no auth");
    };
    assert_module_token_accepted(&stack, &emu, &hub, "manual1", "$edgeAgent", key_handle).await;
    let (status, body, _) = stack
        .request(
            Method::POST,
            "/identities/modules?api-version=2020-09-01",
            r#"{"type":"aziot","moduleId":"$edgeAgent"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let listed = stack.client().list_modules().await.unwrap();
    let names: Vec<_> = listed
        .iter()
        .map(|identity| aziot(identity).module_id.clone().unwrap())
        .collect();
    assert!(names.contains(&"$edgeAgent".to_owned()), "{names:?}");
    assert!(names.contains(&"hostmodule1".to_owned()), "{names:?}");
    assert!(listed.iter().all(|identity| aziot(identity).auth.is_none()));
    let updated = stack.client().update_module("$edgeAgent").await.unwrap();
    assert_eq!(aziot(&updated).gen_id, aziot(&created).gen_id);
    stack.client().delete_module("$edgeAgent").await.unwrap();
    let (status, body, _) = stack
        .request(
            Method::GET,
            "/identities/modules/$edgeAgent?api-version=2020-09-01&type=aziot",
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Draft routes.
    let draft = stack.client().draft_device_identity().await.unwrap();
    assert_eq!(draft.id, format!("aziot://{hub}/device/manual1"));
    assert_eq!(draft.auth.auth_type, "sas");
    assert!(draft.auth.keystorehandle.is_some());
}
