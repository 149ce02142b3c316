//! Black-box tests: the real keyd, certd and identityd binaries with the cloud emulator
//! in-process. Every cloud check reads the emulator's own state and request log.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use std::time::{Duration, Instant};

use common::{emulator, eventually, random_key_b64, rsa_self_signed, Stack};
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
    if let Err(error) = module_token_check(stack, emu, hub, device_id, module_id, handle).await {
        panic!("{error}");
    }
}

async fn module_token_check(
    stack: &Stack,
    emu: &cloud_emulator::RunningEmulator,
    hub: &str,
    device_id: &str,
    module_id: &str,
    handle: &key_api::KeyHandle,
) -> Result<(), String> {
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
    let modules = emu
        .control()
        .modules(Some(hub), device_id)
        .ok_or_else(|| format!("device {device_id} not in hub {hub}"))?;
    let module = modules
        .iter()
        .find(|module| module["moduleId"] == module_id)
        .ok_or_else(|| format!("module {module_id} not in hub: {modules:?}"))?;
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
        .map_err(|error| format!("the emulator rejects the module token: {error}"))
}

async fn futures_join4<T>(
    a: impl std::future::Future<Output = T>,
    b: impl std::future::Future<Output = T>,
    c: impl std::future::Future<Output = T>,
    d: impl std::future::Future<Output = T>,
) -> Vec<T> {
    let (a, b, c, d) = tokio::join!(a, b, c, d);
    vec![a, b, c, d]
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

    // Concurrent creates of one module: exactly one wins, the others get 409.
    let client = stack.client();
    let results = futures_join4(
        client.create_module("racer"),
        client.create_module("racer"),
        client.create_module("racer"),
        client.create_module("racer"),
    )
    .await;
    let created = results.iter().filter(|result| result.is_ok()).count();
    let conflicts = results
        .iter()
        .filter(
            |result| matches!(result, Err(error) if error.status() == Some(StatusCode::CONFLICT)),
        )
        .count();
    assert_eq!((created, conflicts), (1, 3), "{results:?}");

    // Draft routes.
    let draft = stack.client().draft_device_identity().await.unwrap();
    assert_eq!(draft.id, format!("aziot://{hub}/device/manual1"));
    assert_eq!(draft.auth.auth_type, "sas");
    assert!(draft.auth.keystorehandle.is_some());
}

fn individual_sas(registration_id: &str, key: &str) -> cloud_emulator::IndividualEnrollment {
    cloud_emulator::IndividualEnrollment {
        registration_id: registration_id.into(),
        device_id: None,
        assigned_hub: None,
        payload: None,
        iot_edge: false,
        attestation: cloud_emulator::Attestation::SymmetricKey {
            primary_key: key.into(),
            secondary_key: None,
        },
    }
}

fn dps_symmetric_config(emu: &cloud_emulator::RunningEmulator, registration_id: &str) -> String {
    format!(
        "[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{}\"\nid_scope = \"{}\"\n\
         [provisioning.attestation]\nmethod = \"symmetric_key\"\nregistration_id = \"{registration_id}\"\n\
         symmetric_key = \"key://device-id\"\n{MODULE_PRINCIPAL}",
        emu.dps_endpoint(),
        emu.id_scope()
    )
}

fn dps_x509_config(emu: &cloud_emulator::RunningEmulator, registration_id: Option<&str>) -> String {
    let registration_id = registration_id
        .map(|id| format!("registration_id = \"{id}\"\n"))
        .unwrap_or_default();
    format!(
        "[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{}\"\nscope_id = \"{}\"\n\
         [provisioning.attestation]\nmethod = \"x509\"\n{registration_id}\
         identity_cert = \"cert://device-id\"\nidentity_pk = \"key://device-id\"\n{MODULE_PRINCIPAL}",
        emu.dps_endpoint(),
        emu.id_scope()
    )
}

/// Waits until reconciliation created `hostmodule1` in `hub` for `device_id`, then checks the
/// module identity's token against the hub's keys.
async fn assert_module_principal_works(
    stack: &Stack,
    emu: &cloud_emulator::RunningEmulator,
    hub: &str,
    device_id: &str,
) {
    eventually("reconciliation", Duration::from_secs(30), || {
        emu.control()
            .modules(Some(hub), device_id)
            .filter(|modules| modules.iter().any(|m| m["moduleId"] == "hostmodule1"))
    })
    .await;
    // Reconciliation may still be between creating the module and setting its keys.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let module = stack.client().get_module("hostmodule1", "aziot").await;
        let outcome = match &module {
            Ok(module) => {
                assert_eq!(aziot(module).hub_name, hub);
                let Some(AuthInfo::Sas { key_handle }) = &aziot(module).auth else {
                    panic!("expected SAS auth");
                };
                module_token_check(stack, emu, hub, device_id, "hostmodule1", key_handle).await
            }
            Err(error) => Err(error.to_string()),
        };
        match outcome {
            Ok(()) => break,
            Err(error) if Instant::now() > deadline => panic!("{error}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_symmetric_key_individual_enrollment() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        let mut enrollment = individual_sas("sas-device", &key);
        enrollment.device_id = Some("assigned-device".into());
        enrollment.payload = Some(serde_json::json!({"answer": 42}));
        config.individual_enrollments.push(enrollment);
    })
    .await;
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&key))
        .await
        .unwrap();
    let payload_path = stack.path("payload.json");
    std::fs::write(&payload_path, r#"{"modelId":"dtmi:test;1"}"#).unwrap();
    let config = dps_symmetric_config(&emu, "sas-device").replace(
        "[provisioning.attestation]",
        &format!(
            "payload = {{ uri = \"file://{}\" }}\n[provisioning.attestation]",
            payload_path.display()
        ),
    );
    stack.write_identityd_config(&config);
    stack.start_identityd(emu.ca_cert_path());

    let device = stack.client().get_device_identity().await.unwrap();
    assert_eq!(aziot(&device).device_id, "assigned-device");
    assert_eq!(aziot(&device).hub_name, emu.hub_hostname());
    let info = stack.client().get_provisioning_info().await.unwrap();
    assert_eq!(info.source, "dps");
    assert_eq!(info.auth.as_deref(), Some("symmetric_key"));
    assert_eq!(info.registration_id.as_deref(), Some("sas-device"));
    assert_eq!(info.scope_id.as_deref(), Some(emu.id_scope()));
    assert_eq!(
        info.payload,
        Some(serde_json::json!({"modelId": "dtmi:test;1"}))
    );
    // DPS saw the payload and a valid SAS token.
    let registrations = emu.control().registrations();
    assert_eq!(registrations.len(), 1, "{registrations:?}");
    assert_eq!(
        registrations[0]["last_request_payload"],
        serde_json::json!({"modelId": "dtmi:test;1"})
    );
    assert!(emu
        .control()
        .requests()
        .iter()
        .any(|entry| entry.service == "dps" && entry.auth == "sas" && entry.auth_ok == Some(true)));
    assert_module_principal_works(&stack, &emu, emu.hub_hostname(), "assigned-device").await;
    // The backup files exist.
    let home = stack.identityd.home();
    let device_info = std::fs::read_to_string(home.join("device_info")).unwrap();
    assert!(device_info.contains("assigned-device"), "{device_info}");
    assert!(home.join("provisioning_digest").exists());
    eventually("prev_state", Duration::from_secs(10), || {
        std::fs::read_to_string(home.join("prev_state"))
            .ok()
            .filter(|text| text.contains("hostmodule1"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_symmetric_key_group_enrollment_uses_the_derived_key() {
    let group_key = random_key_b64();
    let emu = emulator(|config| {
        config
            .group_enrollments
            .push(cloud_emulator::GroupEnrollment {
                group_id: "sas-group".into(),
                assigned_hub: None,
                payload: None,
                iot_edge: false,
                attestation: cloud_emulator::GroupAttestation::SymmetricKey {
                    primary_key: group_key.clone(),
                    secondary_key: None,
                },
            });
    })
    .await;
    let device_key = cloud_emulator::sas::derive_device_key(&group_key, "group-member-7").unwrap();
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&device_key))
        .await
        .unwrap();
    stack.write_identityd_config(&dps_symmetric_config(&emu, "group-member-7"));
    stack.start_identityd(emu.ca_cert_path());
    let device = stack.client().get_device_identity().await.unwrap();
    assert_eq!(aziot(&device).device_id, "group-member-7");
    assert_module_principal_works(&stack, &emu, emu.hub_hostname(), "group-member-7").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_x509_group_enrollment_with_the_key_in_keyd() {
    let ca = cloud_emulator::pki::TestCa::new("Test Group CA").unwrap();
    let leaf = ca.issue_client("x509-member").unwrap();
    let emu = emulator(|config| {
        config
            .group_enrollments
            .push(cloud_emulator::GroupEnrollment {
                group_id: "x509-group".into(),
                assigned_hub: None,
                payload: None,
                iot_edge: false,
                attestation: cloud_emulator::GroupAttestation::X509 {
                    ca_pem: Some(ca.cert_pem()),
                    ca_file: None,
                },
            });
    })
    .await;
    let mut stack = Stack::new();
    stack.add_key_pair("device-id", &leaf.key);
    stack.start_keyd_certd();
    stack
        .certd_client()
        .import_cert(
            "device-id",
            &format!("{}{}", leaf.cert_pem(), ca.cert_pem()),
        )
        .await
        .unwrap();
    // No registration_id: the certificate's CN is used.
    stack.write_identityd_config(&dps_x509_config(&emu, None));
    stack.start_identityd(emu.ca_cert_path());
    let device = stack.client().get_device_identity().await.unwrap();
    assert_eq!(aziot(&device).device_id, "x509-member");
    let Some(AuthInfo::X509 { cert_id, .. }) = &aziot(&device).auth else {
        panic!("expected X.509 auth: {device:?}");
    };
    assert_eq!(cert_id, "device-id");
    let info = stack.client().get_provisioning_info().await.unwrap();
    assert_eq!(info.auth.as_deref(), Some("x509"));
    assert_eq!(info.registration_id.as_deref(), Some("x509-member"));
    assert!(emu
        .control()
        .requests()
        .iter()
        .any(|entry| entry.service == "dps"
            && entry.auth == "x509"
            && entry.auth_ok == Some(true)));
    assert_module_principal_works(&stack, &emu, emu.hub_hostname(), "x509-member").await;
    assert!(hub_requests_ok(&emu, "x509") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_x509_individual_enrollment_with_an_rsa_key_in_keyd() {
    let (key, pem) = rsa_self_signed("rsa-device");
    let enrolled = pem.clone();
    let emu = emulator(move |config| {
        config
            .individual_enrollments
            .push(cloud_emulator::IndividualEnrollment {
                registration_id: "rsa-device".into(),
                device_id: None,
                assigned_hub: None,
                payload: None,
                iot_edge: false,
                attestation: cloud_emulator::Attestation::X509 {
                    cert_pem: Some(enrolled),
                    cert_file: None,
                    thumbprints: Vec::new(),
                },
            });
    })
    .await;
    let mut stack = Stack::new();
    stack.add_key_pair("device-id", &key);
    stack.start_keyd_certd();
    stack
        .certd_client()
        .import_cert("device-id", &pem)
        .await
        .unwrap();
    stack.write_identityd_config(&dps_x509_config(&emu, Some("rsa-device")));
    stack.start_identityd(emu.ca_cert_path());
    let device = stack.client().get_device_identity().await.unwrap();
    assert_eq!(aziot(&device).device_id, "rsa-device");
    // The hub device is selfSigned with the leaf's thumbprint: module calls authenticate by
    // TLS with the RSA key in keyd.
    assert_module_principal_works(&stack, &emu, emu.hub_hostname(), "rsa-device").await;
    assert!(hub_requests_ok(&emu, "x509") > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_x509_with_the_key_in_keyd() {
    let device_cert = cloud_emulator::pki::self_signed_client("manual-x509").unwrap();
    let device_pem = device_cert.cert_pem();
    let emu = emulator(|config| {
        config.devices.push(cloud_emulator::DeviceSpec {
            device_id: "manual-x509".into(),
            hub: None,
            iot_edge: false,
            authentication: cloud_emulator::DeviceAuthSpec::SelfSigned {
                primary_thumbprint: None,
                secondary_thumbprint: None,
                cert_pem: Some(device_pem.clone()),
            },
        });
    })
    .await;
    let hub = emu.hub_hostname().to_owned();
    let mut stack = Stack::new();
    stack.add_key_pair("device-id", &device_cert.key);
    stack.start_keyd_certd();
    stack
        .certd_client()
        .import_cert("device-id", &device_pem)
        .await
        .unwrap();
    stack.write_identityd_config(&format!(
        "[provisioning]\nsource = \"manual\"\niothub_hostname = \"{hub}\"\ndevice_id = \"manual-x509\"\n\
         [provisioning.authentication]\nmethod = \"x509\"\nidentity_cert = \"device-id\"\nidentity_pk = \"device-id\"\n",
    ).replace(
        "[provisioning]",
        &format!(
            "cloud_trusted_certs = [\"file://{}\"]\n[provisioning]",
            emu.ca_cert_path().display()
        ),
    ));
    // The emulator's CA comes from cloud_trusted_certs here, not SSL_CERT_FILE.
    stack.identityd.env.clear();
    stack.identityd.spawn();
    let device = stack.client().get_device_identity().await.unwrap();
    assert_eq!(aziot(&device).device_id, "manual-x509");
    let info = stack.client().get_provisioning_info().await.unwrap();
    assert_eq!(info.auth.as_deref(), Some("x509"));
    let created = stack.client().create_module("m1").await.unwrap();
    assert_eq!(aziot(&created).module_id.as_deref(), Some("m1"));
    assert!(hub_requests_ok(&emu, "x509") > 0);
    let draft = stack.client().draft_device_identity().await.unwrap();
    assert_eq!(draft.auth.auth_type, "x509");
    assert_eq!(draft.auth.certstorehandle.as_deref(), Some("device-id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_dps_key_is_reported_as_a_cloud_error_without_hanging() {
    let emu = emulator(|config| {
        config
            .individual_enrollments
            .push(individual_sas("wrong-key-device", &random_key_b64()));
    })
    .await;
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&random_key_b64()))
        .await
        .unwrap();
    stack.write_identityd_config(&dps_symmetric_config(&emu, "wrong-key-device"));
    stack.start_identityd(emu.ca_cert_path());
    let started = Instant::now();
    let (status, body, _) = stack
        .request(
            Method::POST,
            "/identities/device?api-version=2020-09-01",
            r#"{"type":"aziot"}"#,
        )
        .await;
    let elapsed = started.elapsed();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("cloud error: 401"), "{message}");
    assert!(message.contains("DPS"), "{message}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(emu
        .control()
        .requests()
        .iter()
        .any(|entry| entry.service == "dps" && entry.auth_ok == Some(false)));
    // Still serving, and retrying in the background rather than exiting.
    assert!(stack.identityd.is_running());
    let (status, _, _) = stack
        .request(
            Method::GET,
            "/identities/provisioning?api-version=2021-12-01",
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_manual_key_is_reported_when_hub_refuses() {
    let emu = emulator(|config| {
        config.devices.push(cloud_emulator::DeviceSpec {
            device_id: "manual-wrong".into(),
            hub: None,
            iot_edge: false,
            authentication: cloud_emulator::DeviceAuthSpec::Sas {
                primary_key: Some(random_key_b64()),
                secondary_key: None,
            },
        });
    })
    .await;
    let hub = emu.hub_hostname().to_owned();
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack.write_identityd_config(&format!(
        "[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName={hub};DeviceId=manual-wrong;SharedAccessKey={}\"\n",
        random_key_b64()
    ));
    stack.start_identityd(emu.ca_cert_path());
    let (status, body, _) = stack
        .request(
            Method::POST,
            "/identities/modules?api-version=2020-09-01",
            r#"{"type":"aziot","moduleId":"m1"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("cloud error: 401"), "{message}");
    assert!(
        message.contains("IotHubUnauthorizedAccess") || message.contains("Unauthorized"),
        "{message}"
    );
}

/// Polls the device identity route from the moment identityd is launched and returns the
/// delay until the first 200.
async fn first_device_answer(stack: &mut Stack, ca_cert: &std::path::Path) -> Duration {
    stack.identityd.env = vec![("SSL_CERT_FILE".to_owned(), ca_cert.display().to_string())];
    let launched = Instant::now();
    stack.identityd.launch();
    let socket = stack.identityd.socket.clone();
    loop {
        if launched.elapsed() > Duration::from_secs(30) {
            panic!("no answer within 30 s:\n{}", stack.identityd.log());
        }
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            let response = http_common::UdsClient::new(&socket)
                .send(
                    Method::POST,
                    "/identities/device?api-version=2020-09-01",
                    &[("content-type", "application/json")],
                    r#"{"type":"aziot"}"#.into(),
                )
                .await;
            if let Ok(response) = response {
                if response.status == StatusCode::OK {
                    return launched.elapsed();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_cloud_down_serves_the_backup_quickly() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config
            .individual_enrollments
            .push(individual_sas("offline-device", &key));
    })
    .await;
    let hub = emu.hub_hostname().to_owned();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_cert = ca_dir.path().join("ca.pem");
    std::fs::copy(emu.ca_cert_path(), &ca_cert).unwrap();
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&key))
        .await
        .unwrap();
    stack.write_identityd_config(&dps_symmetric_config(&emu, "offline-device"));
    stack.start_identityd(&ca_cert);
    stack.wait_for_device(Duration::from_secs(30)).await;
    assert_module_principal_works(&stack, &emu, &hub, "offline-device").await;
    let online_module = stack
        .client()
        .get_module("hostmodule1", "aziot")
        .await
        .unwrap();
    eventually("prev_state", Duration::from_secs(10), || {
        std::fs::read_to_string(stack.identityd.home().join("prev_state"))
            .ok()
            .filter(|text| text.contains("hostmodule1"))
    })
    .await;
    stack.identityd.stop();
    emu.shutdown().await;

    let elapsed = first_device_answer(&mut stack, &ca_cert).await;
    println!("offline restart: first successful device identity answer after {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(2),
        "first answer after {elapsed:?}"
    );
    let device = stack.client().get_device_identity().await.unwrap();
    assert_eq!(aziot(&device).device_id, "offline-device");
    assert_eq!(aziot(&device).hub_name, hub);
    // Module identities come from the cache while the hub is unreachable (after the retry).
    let module = stack
        .client()
        .get_module("hostmodule1", "aziot")
        .await
        .unwrap();
    assert_eq!(aziot(&module).gen_id, aziot(&online_module).gen_id);
    assert!(matches!(aziot(&module).auth, Some(AuthInfo::Sas { .. })));
    // A listing with Hub down falls back to the cache too.
    let listed = stack.client().list_modules().await.unwrap();
    assert!(listed
        .iter()
        .any(|identity| aziot(identity).module_id.as_deref() == Some("hostmodule1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_backup_the_cloud_being_down_is_a_503_not_a_crash() {
    // An emulator started and stopped only to get a port nobody listens on.
    let emu = emulator(|_| {}).await;
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_cert = ca_dir.path().join("ca.pem");
    std::fs::copy(emu.ca_cert_path(), &ca_cert).unwrap();
    let config = dps_symmetric_config(&emu, "never-seen");
    emu.shutdown().await;
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&random_key_b64()))
        .await
        .unwrap();
    stack.write_identityd_config(&config);
    stack.start_identityd(&ca_cert);
    let started = Instant::now();
    let (status, body, headers) = stack
        .request(
            Method::POST,
            "/identities/device?api-version=2020-09-01",
            r#"{"type":"aziot"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.contains_key(http::header::RETRY_AFTER));
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("unreachable"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(26));
    assert!(stack.identityd.is_running(), "identityd exited");
    // Trust bundle and provisioning info do not need the device.
    let info = stack.client().get_provisioning_info().await.unwrap();
    assert_eq!(info.registration_id.as_deref(), Some("never-seen"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprovision_moves_the_device_to_the_newly_assigned_hub() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config
            .individual_enrollments
            .push(individual_sas("moving-device", &key));
    })
    .await;
    let first_hub = emu.hub_hostname().to_owned();
    let second_hub = format!("127.0.0.1:{}", emu.https_addr().port());
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&key))
        .await
        .unwrap();
    stack.write_identityd_config(&dps_symmetric_config(&emu, "moving-device"));
    stack.start_identityd(emu.ca_cert_path());
    let device = stack.client().get_device_identity().await.unwrap();
    assert_eq!(aziot(&device).hub_name, first_hub);
    assert_module_principal_works(&stack, &emu, &first_hub, "moving-device").await;

    emu.control()
        .patch_settings(cloud_emulator::SettingsPatch {
            assigned_hub: Some(second_hub.clone()),
            ..Default::default()
        })
        .unwrap();
    let registers = || {
        emu.control()
            .requests()
            .iter()
            .filter(|entry| entry.service == "dps" && entry.method == "PUT")
            .count()
    };
    let before = registers();
    // Three concurrent requests join one reprovisioning.
    let client = stack.client();
    let (a, b, c) = tokio::join!(
        client.reprovision(),
        client.reprovision(),
        client.reprovision()
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    assert_eq!(
        registers(),
        before + 1,
        "concurrent reprovisions did not join"
    );
    let device = stack.client().get_device_identity().await.unwrap();
    assert_eq!(aziot(&device).hub_name, second_hub);
    assert_module_principal_works(&stack, &emu, &second_hub, "moving-device").await;
    let device_info = std::fs::read_to_string(stack.identityd.home().join("device_info")).unwrap();
    assert!(device_info.contains(&second_hub), "{device_info}");

    // The draft route reprovisions too (200 {}).
    let (status, body, _) = stack
        .request(Method::GET, "/identities/aziot/device/reprovision", "")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, serde_json::json!({}));
    assert_eq!(registers(), before + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_throttling_honours_retry_after() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config
            .individual_enrollments
            .push(individual_sas("throttled-device", &key));
    })
    .await;
    for (status, retry_after) in [(429, 2), (503, 1)] {
        emu.control()
            .add_fault(cloud_emulator::FaultSpec {
                target: cloud_emulator::Target::Dps,
                status,
                count: 1,
                retry_after_secs: Some(retry_after),
            })
            .unwrap();
    }
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&key))
        .await
        .unwrap();
    stack.write_identityd_config(&dps_symmetric_config(&emu, "throttled-device"));
    stack.start_identityd(emu.ca_cert_path());
    stack.wait_for_device(Duration::from_secs(30)).await;
    let dps: Vec<_> = emu
        .control()
        .requests()
        .into_iter()
        .filter(|entry| entry.service == "dps")
        .collect();
    assert!(dps.len() >= 4, "{dps:?}");
    assert_eq!((dps[0].status, dps[0].retry_after), (429, Some(2)));
    assert_eq!((dps[1].status, dps[1].retry_after), (503, Some(1)));
    assert_eq!(dps[2].status, 202);
    let first_wait = dps[1].time_ms - dps[0].time_ms;
    let second_wait = dps[2].time_ms - dps[1].time_ms;
    println!("waited {first_wait} ms after the 429 and {second_wait} ms after the 503");
    assert!(
        first_wait >= 1900,
        "retried {first_wait} ms after a 429 with Retry-After: 2"
    );
    assert!(
        second_wait >= 900,
        "retried {second_wait} ms after a 503 with Retry-After: 1"
    );
    // The poll waited for the Retry-After of the 202 (1 s).
    let poll_wait = dps[3].time_ms - dps[2].time_ms;
    assert!(poll_wait >= 900, "polled after {poll_wait} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_rejecting_the_backup_device_triggers_one_new_registration() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config
            .individual_enrollments
            .push(individual_sas("vanished-device", &key));
    })
    .await;
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&key))
        .await
        .unwrap();
    stack.write_identityd_config(&dps_symmetric_config(&emu, "vanished-device"));
    stack.start_identityd(emu.ca_cert_path());
    assert_module_principal_works(&stack, &emu, emu.hub_hostname(), "vanished-device").await;
    stack.identityd.stop();
    assert!(emu.control().remove_device(None, "vanished-device"));
    let registers = || {
        emu.control()
            .requests()
            .iter()
            .filter(|entry| entry.service == "dps" && entry.method == "PUT")
            .count()
    };
    assert_eq!(registers(), 1);
    stack.start_identityd(emu.ca_cert_path());
    // The backup is used, the hub says DeviceNotFound, identityd registers again and the
    // module comes back in the re-created device.
    assert_module_principal_works(&stack, &emu, emu.hub_hostname(), "vanished-device").await;
    assert_eq!(registers(), 2);
}

/// Sends one request to the socket as `uid` (python3 drops privileges) and returns the status
/// and JSON body.
fn request_as(
    uid: u32,
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use std::os::unix::process::CommandExt;
    let script = r#"
import socket, sys
path, method, route, body = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].encode()
s = socket.socket(socket.AF_UNIX); s.connect(path)
s.sendall(method.encode() + b" " + route.encode() + b" HTTP/1.1\r\nHost: identityd.sock\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk: break
    data += chunk
head, _, rest = data.partition(b"\r\n\r\n")
print(head.split(b" ")[1].decode()); print(rest.decode())
"#;
    let output = std::process::Command::new("python3")
        .uid(uid)
        .gid(uid)
        .args(["-c", script, socket.to_str().unwrap(), method, path, body])
        .output()
        .expect("python3 is needed to act as another uid");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let (status, body) = text.split_once('\n').unwrap();
    let body = body.trim();
    let value = if body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"))
    };
    (status.parse().unwrap(), value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principals_decide_what_each_uid_gets() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config.devices.push(cloud_emulator::DeviceSpec {
            device_id: "authz-device".into(),
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
        "[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName={hub};DeviceId=authz-device;SharedAccessKey={key}\"\n\
         [[principal]]\nuid = 65534\nname = \"hostmodule1\"\nidtype = [\"module\"]\n\
         [[principal]]\nuid = 65532\nname = \"aziot-edge\"\n\
         [[principal]]\nuid = 65531\nname = \"device-reader\"\nidtype = \"device\"\n"
    ));
    stack.start_identityd(emu.ca_cert_path());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        &stack.identityd.socket,
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    stack.wait_for_device(Duration::from_secs(20)).await;
    eventually("reconciliation", Duration::from_secs(20), || {
        emu.control()
            .modules(None, "authz-device")
            .filter(|modules| modules.iter().any(|m| m["moduleId"] == "hostmodule1"))
    })
    .await;
    let socket = stack.identityd.socket.clone();
    let v = "api-version=2020-09-01";
    let socket_ref = &socket;
    let call = move |uid: u32, method: &str, path: &str, body: &str| {
        let socket = socket_ref.clone();
        let (method, path, body) = (method.to_owned(), path.to_owned(), body.to_owned());
        async move {
            tokio::task::spawn_blocking(move || request_as(uid, &socket, &method, &path, &body))
                .await
                .unwrap()
        }
    };

    // The module principal gets its own module, nothing else.
    let (status, body) = call(65534, "GET", &format!("/identities/identity?{v}"), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["type"], "aziot");
    assert_eq!(body["spec"]["moduleId"], "hostmodule1");
    assert_eq!(body["spec"]["auth"]["type"], "sas");
    let (status, _) = call(
        65534,
        "GET",
        &format!("/identities/modules/hostmodule1?{v}&type=aziot"),
        "",
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = call(
        65534,
        "POST",
        &format!("/identities/device?{v}"),
        r#"{"type":"aziot"}"#,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["message"], "user 65534 is not authorized");
    let (status, _) = call(
        65534,
        "GET",
        &format!("/identities/modules/other?{v}&type=aziot"),
        "",
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(
        65534,
        "POST",
        &format!("/identities/device/reprovision?{v}"),
        "",
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call(65534, "GET", &format!("/trust-bundle?{v}"), "").await;
    assert_eq!(status, 200);

    // The daemon may list and manage modules.
    let (status, body) = call(
        65532,
        "GET",
        &format!("/identities/modules?{v}&type=aziot"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["identities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["spec"]["moduleId"] == "hostmodule1"));
    let (status, body) = call(65532, "GET", &format!("/identities/identity?{v}"), "").await;
    assert_eq!(status, 200);
    assert!(body["spec"].get("moduleId").is_none(), "{body}");

    // A device principal gets the device only.
    let (status, body) = call(65531, "POST", &format!("/identities/device?{v}"), "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["spec"]["deviceId"], "authz-device");
    let (status, _) = call(
        65531,
        "GET",
        &format!("/identities/modules?{v}&type=aziot"),
        "",
    )
    .await;
    assert_eq!(status, 403);

    // Anyone else: trust bundle and provisioning info only.
    let (status, _) = call(65533, "GET", &format!("/identities/identity?{v}"), "").await;
    assert_eq!(status, 403);
    let (status, _) = call(65533, "GET", "/identities/aziot/device", "").await;
    assert_eq!(status, 403);
    let (status, body) = call(
        65533,
        "GET",
        "/identities/provisioning?api-version=2021-12-01",
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        serde_json::json!({"source": "manual", "auth": "sas", "status": "provisioned"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_conventions_and_source_none() {
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack.write_identityd_config("[provisioning]\nsource = \"none\"\n");
    let ca = stack.path("no-ca.pem");
    stack.start_identityd(&ca);
    let cases: &[(Method, &str, &str, StatusCode, &str)] = &[
        (
            Method::POST,
            "/identities/device?api-version=2020-09-01",
            "",
            StatusCode::NOT_FOUND,
            "not provisioned",
        ),
        (
            Method::GET,
            "/identities/aziot/device",
            "",
            StatusCode::NOT_FOUND,
            "not provisioned",
        ),
        (
            Method::GET,
            "/identities/provisioning?api-version=2020-09-01",
            "",
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            Method::GET,
            "/identities/identity",
            "",
            StatusCode::BAD_REQUEST,
            "api-version not specified",
        ),
        (
            Method::GET,
            "/identities/identity?api-version=2020-09-01-preview",
            "",
            StatusCode::BAD_REQUEST,
            "invalid api-version",
        ),
        (
            Method::GET,
            "/identities/aziot/device?api-version=bogus",
            "",
            StatusCode::BAD_REQUEST,
            "invalid api-version",
        ),
        (
            Method::GET,
            "/identities/device?api-version=2020-09-01",
            "",
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed",
        ),
        (Method::GET, "/nope", "", StatusCode::NOT_FOUND, "not found"),
        (
            Method::GET,
            "/identities/modules/a/b?api-version=2020-09-01&type=aziot",
            "",
            StatusCode::NOT_FOUND,
            "not found",
        ),
        (
            Method::GET,
            "/identities/modules?api-version=2020-09-01",
            "",
            StatusCode::BAD_REQUEST,
            "missing parameter \"type\"",
        ),
        (
            Method::GET,
            "/identities/modules/m?api-version=2020-09-01&type=bogus",
            "",
            StatusCode::BAD_REQUEST,
            "invalid type",
        ),
        (
            Method::POST,
            "/identities/modules?api-version=2020-09-01",
            "{",
            StatusCode::UNPROCESSABLE_ENTITY,
            "not valid",
        ),
        (
            Method::POST,
            "/identities/modules?api-version=2020-09-01",
            "",
            StatusCode::BAD_REQUEST,
            "missing request body",
        ),
    ];
    for (method, path, body, status, message) in cases {
        let (actual, answer, headers) = stack.request(method.clone(), path, body).await;
        assert_eq!(actual, *status, "{method} {path}: {answer}");
        let text = answer["message"].as_str().unwrap_or_default();
        assert!(text.contains(message), "{method} {path}: {text}");
        if actual == StatusCode::METHOD_NOT_ALLOWED {
            assert_eq!(headers[http::header::ALLOW], "POST");
        }
    }
    let response = http_common::UdsClient::new(&stack.identityd.socket)
        .send(
            Method::POST,
            "/identities/device?api-version=2020-09-01",
            &[("content-type", "text/plain")],
            "x".into(),
        )
        .await
        .unwrap();
    assert_eq!(response.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let info = stack.client().get_provisioning_info().await.unwrap();
    assert_eq!(info.source, "none");
    assert_eq!(info.payload, None);

    // Trust bundle: empty until certd holds the configured cert.
    assert_eq!(stack.client().get_trust_bundle().await.unwrap(), "");
    let ca = cloud_emulator::pki::TestCa::new("Bundle CA").unwrap();
    stack
        .certd_client()
        .import_cert("aziot-trust-bundle", &ca.cert_pem())
        .await
        .unwrap();
    assert_eq!(
        stack.client().get_trust_bundle().await.unwrap(),
        ca.cert_pem()
    );
}

#[test]
fn invalid_configuration_exits_153_naming_file_and_key() {
    let stack = Stack::new();
    let cases = [
        (
            "cloud_timeout_sec = 5\n[provisioning]\nsource = \"none\"\n".to_owned(),
            "cloud_timeout_sec",
        ),
        (
            "[provisioning]\nsource = \"dps\"\nscope_id = \"s\"\n[provisioning.attestation]\nmethod = \"tpm\"\n".to_owned(),
            "provisioning.attestation.registration_id",
        ),
        (
            "[provisioning]\nsource = \"manual\"\niothub_hostname = \"h\"\ndevice_id = \"d\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"pkcs11:object=x\"\n".to_owned(),
            "provisioning.authentication.device_id_pk",
        ),
    ];
    for (config, expected) in cases {
        stack.write_identityd_config(&config);
        let (code, output) = stack.identityd.run_to_exit();
        assert_eq!(code, Some(153), "{output}");
        assert!(output.contains(expected), "{output}");
        assert!(output.contains("config.toml"), "{output}");
    }
    // A bad drop-in is named.
    stack.write_identityd_config("[provisioning]\nsource = \"none\"\n");
    let dropin = stack.identityd.config_dir().join("50-agent.toml");
    std::fs::write(&dropin, "[[principal]]\nuid = \"x\"\nname = \"a\"\n").unwrap();
    let (code, output) = stack.identityd.run_to_exit();
    assert_eq!(code, Some(153), "{output}");
    assert!(
        output.contains("50-agent.toml") && output.contains("principal[0].uid"),
        "{output}"
    );
    // A connection string in a world-readable file is refused.
    std::fs::remove_file(&dropin).unwrap();
    stack.write_identityd_config(
        "[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName=h;DeviceId=d;SharedAccessKey=AAAA\"\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        stack.identityd.config_file(),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (code, output) = stack.identityd.run_to_exit();
    assert_eq!(code, Some(153), "{output}");
    assert!(output.contains("0600"), "{output}");
    assert!(!output.contains("AAAA"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principal_added_by_a_dropin_is_reconciled() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config.devices.push(cloud_emulator::DeviceSpec {
            device_id: "reload-device".into(),
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
        "[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName={hub};DeviceId=reload-device;SharedAccessKey={key}\"\n"
    ));
    stack.start_identityd(emu.ca_cert_path());
    stack.wait_for_device(Duration::from_secs(20)).await;
    // Let the startup reconciliation finish (it records the empty principal list).
    eventually("prev_state", Duration::from_secs(10), || {
        stack
            .identityd
            .home()
            .join("prev_state")
            .exists()
            .then_some(())
    })
    .await;
    let has_module = |present: bool| {
        emu.control()
            .modules(None, "reload-device")
            .filter(|modules| modules.iter().any(|m| m["moduleId"] == "hostmodule1") == present)
    };
    assert!(has_module(false).is_some());
    let dropin = stack.identityd.config_dir().join("50-hostmodule1.toml");
    std::fs::write(&dropin, MODULE_PRINCIPAL).unwrap();
    eventually(
        "module created after the reload",
        Duration::from_secs(30),
        || has_module(true),
    )
    .await;
    let module = stack
        .client()
        .get_module("hostmodule1", "aziot")
        .await
        .unwrap();
    let Some(AuthInfo::Sas { key_handle }) = &aziot(&module).auth else {
        panic!("no auth");
    };
    assert_module_token_accepted(
        &stack,
        &emu,
        &hub,
        "reload-device",
        "hostmodule1",
        key_handle,
    )
    .await;
    std::fs::remove_file(&dropin).unwrap();
    eventually(
        "module deleted after the reload",
        Duration::from_secs(30),
        || has_module(false),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_identities_are_issued_by_certd() {
    let ca = cloud_emulator::pki::TestCa::new("Local CA").unwrap();
    let mut stack = Stack::new();
    stack.add_key_pair("local-ca", &ca.ca.key);
    stack.add_certd_config(
        "[cert_issuance.local_ca]\ncert = \"local-ca\"\npk = \"local-ca\"\n\
         [cert_issuance.localmod]\nmethod = \"local_ca\"\n\
         [cert_issuance.adhoc]\nmethod = \"local_ca\"\n",
    );
    stack.start_keyd_certd();
    stack
        .certd_client()
        .import_cert("local-ca", &ca.cert_pem())
        .await
        .unwrap();
    stack.write_identityd_config(
        "[provisioning]\nsource = \"none\"\n[localid]\ndomain = \"example.local\"\n\
         [[principal]]\nuid = 65530\nname = \"localmod\"\nidtype = [\"local\"]\n\
         localid = { type = \"x509\", attributes = \"server\" }\n",
    );
    let no_ca = stack.path("no-ca.pem");
    stack.start_identityd(&no_ca);

    let identity = stack
        .client()
        .get_module("localmod", "local")
        .await
        .unwrap();
    let Identity::Local(spec) = &identity else {
        panic!("not local: {identity:?}");
    };
    assert_eq!(spec.module_id, "localmod");
    let auth = spec.auth.as_ref().unwrap();
    let chain = openssl::x509::X509::stack_from_pem(auth.certificate.as_bytes()).unwrap();
    let leaf = &chain[0];
    let cn = leaf
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .unwrap()
        .data()
        .to_string()
        .unwrap();
    assert_eq!(cn, "localmod.testhost.example.local");
    let key = openssl::pkey::PKey::private_key_from_pem(auth.private_key.as_bytes()).unwrap();
    assert!(leaf.public_key().unwrap().public_eq(&key));
    assert!(leaf.verify(&ca.ca.key).unwrap());
    let text = String::from_utf8(leaf.to_text().unwrap()).unwrap();
    assert!(text.contains("TLS Web Server Authentication"), "{text}");
    assert!(
        auth.expiration.ends_with('Z') && auth.expiration.len() == 20,
        "{}",
        auth.expiration
    );
    // Each call makes a fresh key.
    let again = stack
        .client()
        .get_module("localmod", "local")
        .await
        .unwrap();
    let Identity::Local(again) = again else {
        panic!()
    };
    assert_ne!(again.auth.unwrap().private_key, auth.private_key);

    // Ad-hoc local identities for names that are not local principals.
    let (status, body, _) = stack
        .request(
            Method::POST,
            "/identities/modules?api-version=2020-09-01",
            r#"{"type":"local","moduleId":"adhoc","localIdOpts":{"type":"x509","attributes":"client"}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["type"], "local");
    assert!(body["spec"]["auth"]["certificate"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    let (status, _, _) = stack
        .request(
            Method::POST,
            "/identities/modules?api-version=2020-09-01",
            r#"{"type":"local","moduleId":"localmod"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = stack
        .request(
            Method::GET,
            "/identities/modules/adhoc?api-version=2020-09-01&type=local",
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The principal itself gets its local identity from GET /identities/identity.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        &stack.identityd.socket,
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let socket = stack.identityd.socket.clone();
    let (status, body) = tokio::task::spawn_blocking(move || {
        request_as(
            65530,
            &socket,
            "GET",
            "/identities/identity?api-version=2020-09-01",
            "",
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["type"], "local");
    assert_eq!(body["spec"]["moduleId"], "localmod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_rejecting_the_device_at_run_time_triggers_a_reprovision() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config
            .individual_enrollments
            .push(individual_sas("runtime-device", &key));
    })
    .await;
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&key))
        .await
        .unwrap();
    stack.write_identityd_config(&dps_symmetric_config(&emu, "runtime-device"));
    stack.start_identityd(emu.ca_cert_path());
    assert_module_principal_works(&stack, &emu, emu.hub_hostname(), "runtime-device").await;
    assert!(emu.control().remove_device(None, "runtime-device"));
    let (status, body, _) = stack
        .request(
            Method::GET,
            "/identities/modules/hostmodule1?api-version=2020-09-01&type=aziot",
            "",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("cloud error: 401"),
        "{body}"
    );
    // identityd registers again in the background and the module comes back.
    let registers = || {
        emu.control()
            .requests()
            .iter()
            .filter(|entry| entry.service == "dps" && entry.method == "PUT")
            .count()
    };
    eventually("a second registration", Duration::from_secs(30), || {
        (registers() == 2).then_some(())
    })
    .await;
    assert_module_principal_works(&stack, &emu, emu.hub_hostname(), "runtime-device").await;
}

/// A minimal HTTP CONNECT proxy on loopback: records each request head, then relays bytes.
async fn connect_proxy() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = std::sync::Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let recorded = std::sync::Arc::clone(&recorded);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                recorded.lock().unwrap().push(head);
                let Ok(mut upstream) = tokio::net::TcpStream::connect(target.as_str()).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (port, heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_requests_go_through_https_proxy() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config
            .individual_enrollments
            .push(individual_sas("proxied-device", &key));
    })
    .await;
    let (proxy_port, heads) = connect_proxy().await;
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&key))
        .await
        .unwrap();
    stack.write_identityd_config(&dps_symmetric_config(&emu, "proxied-device"));
    stack.identityd.env = vec![
        (
            "SSL_CERT_FILE".to_owned(),
            emu.ca_cert_path().display().to_string(),
        ),
        (
            "HTTPS_PROXY".to_owned(),
            format!("http://user:s3cret@127.0.0.1:{proxy_port}"),
        ),
        ("NO_PROXY".to_owned(), String::new()),
        ("no_proxy".to_owned(), String::new()),
    ];
    stack.identityd.spawn();
    let device = stack.client().get_device_identity().await.unwrap();
    assert_eq!(aziot(&device).device_id, "proxied-device");
    assert_module_principal_works(&stack, &emu, emu.hub_hostname(), "proxied-device").await;
    let heads = heads.lock().unwrap().clone();
    assert!(!heads.is_empty(), "nothing went through the proxy");
    let port = emu.https_addr().port();
    assert!(
        heads.iter().all(
            |head| head.starts_with(&format!("CONNECT localhost:{port} HTTP/1.1"))
                && head.contains("Proxy-Authorization: Basic dXNlcjpzM2NyZXQ=")
        ),
        "{heads:?}"
    );
    assert!(
        !stack.identityd.log().contains("s3cret"),
        "the proxy password was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_certificate_is_renewed_with_a_rotated_key() {
    identity_certificate_renewal(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_certificate_is_renewed_with_the_same_key() {
    identity_certificate_renewal(false).await;
}

/// A one-minute DPS X.509 identity cert renewed by identityd (spec 6.6): certd issues the new
/// cert as `device-id-temp`, DPS accepts it, it replaces `device-id`, and with `rotate_key` a new
/// key replaces the old one (else the same key is certified again); the hub accepts the result.
async fn identity_certificate_renewal(rotate_key: bool) {
    let ca = cloud_emulator::pki::TestCa::new("Renewal CA").unwrap();
    let ca_pem = ca.cert_pem();
    let emu = emulator(|config| {
        config
            .group_enrollments
            .push(cloud_emulator::GroupEnrollment {
                group_id: "renewal-group".into(),
                assigned_hub: None,
                payload: None,
                iot_edge: false,
                attestation: cloud_emulator::GroupAttestation::X509 {
                    ca_pem: Some(ca_pem.clone()),
                    ca_file: None,
                },
            });
    })
    .await;
    let mut stack = Stack::new();
    stack.add_key_pair("local-ca", &ca.ca.key);
    stack.add_certd_config(
        "[cert_issuance.local_ca]\ncert = \"local-ca\"\npk = \"local-ca\"\n\
         [cert_issuance.device-id-temp]\nmethod = \"local_ca\"\n",
    );
    stack.start_keyd_certd();
    let certd = stack.certd_client();
    certd.import_cert("local-ca", &ca_pem).await.unwrap();
    // The device key is a dynamic keyd key (rotation moves a new key over it).
    let keyd = stack.keyd_client();
    let handle = keyd
        .create_key_pair_if_not_exists("device-id", Some("ec-p256"))
        .await
        .unwrap();
    let point = common::unb64(
        &keyd
            .get_key_pair_public_parameter(&handle, "ec-point")
            .await
            .unwrap(),
    );
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    let mut context = openssl::bn::BigNumContext::new().unwrap();
    let point = openssl::ec::EcPoint::from_bytes(&group, &point, &mut context).unwrap();
    let public_key = openssl::pkey::PKey::from_ec_key(
        openssl::ec::EcKey::from_public_key(&group, &point).unwrap(),
    )
    .unwrap();
    // A one-minute certificate, so the 10% threshold comes after about 6 s.
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "renew-device").unwrap();
    let name = name.build();
    let mut builder = openssl::x509::X509::builder().unwrap();
    builder.set_version(2).unwrap();
    builder
        .set_serial_number(
            &openssl::bn::BigNum::from_u32(5)
                .unwrap()
                .to_asn1_integer()
                .unwrap(),
        )
        .unwrap();
    builder.set_subject_name(&name).unwrap();
    builder.set_issuer_name(ca.ca.cert.subject_name()).unwrap();
    builder.set_pubkey(&public_key).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    builder
        .set_not_before(&openssl::asn1::Asn1Time::from_unix(now - 1).unwrap())
        .unwrap();
    builder
        .set_not_after(&openssl::asn1::Asn1Time::from_unix(now + 60).unwrap())
        .unwrap();
    builder
        .sign(&ca.ca.key, openssl::hash::MessageDigest::sha256())
        .unwrap();
    let initial = String::from_utf8(builder.build().to_pem().unwrap()).unwrap();
    certd
        .import_cert("device-id", &format!("{initial}{ca_pem}"))
        .await
        .unwrap();

    stack.write_identityd_config(&dps_x509_config(&emu, None).replace(
        "identity_cert = ",
        &format!(
            "identity_auto_renew = {{ rotate_key = {rotate_key}, threshold = \"10%\", retry = \"10%\" }}\nidentity_cert = "
        ),
    ));
    stack.start_identityd(emu.ca_cert_path());
    let device = stack.client().get_device_identity().await.unwrap();
    assert_eq!(aziot(&device).device_id, "renew-device");

    let deadline = Instant::now() + Duration::from_secs(60);
    // Renewal ends with the temp cert's removal, after the new chain and the key swap (the
    // order of the spec's section 6.6): wait for that, not just for the new chain.
    let renewed = loop {
        let pem = certd.get_cert("device-id").await.unwrap();
        let temp_gone = certd
            .get_cert("device-id-temp")
            .await
            .is_err_and(|error| error.is_not_found());
        if !pem.starts_with(&initial) && temp_gone {
            break pem;
        }
        assert!(
            Instant::now() < deadline,
            "not renewed:\n{}",
            stack.identityd.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let leaf = openssl::x509::X509::from_pem(renewed.as_bytes()).unwrap();
    assert!(leaf.verify(&ca.ca.key).unwrap());
    if rotate_key {
        // The key was rotated: keyd's device-id is the new (RSA) key, matching the new cert.
        let rotated = keyd.load_key_pair("device-id").await.unwrap();
        assert_eq!(
            keyd.get_key_pair_public_parameter(&rotated, "algorithm")
                .await
                .unwrap(),
            "RSA"
        );
        let modulus = common::unb64(
            &keyd
                .get_key_pair_public_parameter(&rotated, "rsa-modulus")
                .await
                .unwrap(),
        );
        assert_eq!(
            leaf.public_key().unwrap().rsa().unwrap().n().to_vec(),
            modulus
        );
    } else {
        // The same EC key, certified again with a new serial.
        assert!(leaf.public_key().unwrap().public_eq(&public_key));
        let old = openssl::x509::X509::from_pem(initial.as_bytes()).unwrap();
        assert_ne!(
            leaf.serial_number().to_bn().unwrap(),
            old.serial_number().to_bn().unwrap()
        );
        let missing = keyd.load_key_pair("device-id-temp").await.unwrap_err();
        assert!(missing.is_not_found(), "{missing}");
    }
    // The temp cert is gone and DPS saw a second registration with the new certificate.
    let missing = certd.get_cert("device-id-temp").await.unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    let registrations = emu
        .control()
        .requests()
        .iter()
        .filter(|entry| {
            entry.service == "dps"
                && entry.method == "PUT"
                && entry.auth == "x509"
                && entry.auth_ok == Some(true)
        })
        .count();
    assert_eq!(registrations, 2);
    // The hub accepts the renewed certificate.
    let created = stack.client().create_module("after-renewal").await.unwrap();
    assert_eq!(aziot(&created).module_id.as_deref(), Some("after-renewal"));
}

/// A manual-SAS device `device_id` in the emulator and a stack whose identityd has the module
/// principal `hostmodule1` as uid 65534; identityd is started and its socket opened to all.
async fn module_principal_stack(
    emu: &cloud_emulator::RunningEmulator,
    device_id: &str,
    key: &str,
) -> Stack {
    let hub = emu.hub_hostname().to_owned();
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack.write_identityd_config(&format!(
        "[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName={hub};DeviceId={device_id};SharedAccessKey={key}\"\n\
         [[principal]]\nuid = 65534\nname = \"hostmodule1\"\nidtype = [\"module\"]\n"
    ));
    stack.start_identityd(emu.ca_cert_path());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        &stack.identityd.socket,
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    stack
}

fn manual_device(device_id: &str, key: &str) -> cloud_emulator::DeviceSpec {
    cloud_emulator::DeviceSpec {
        device_id: device_id.into(),
        hub: None,
        iot_edge: false,
        authentication: cloud_emulator::DeviceAuthSpec::Sas {
            primary_key: Some(key.to_owned()),
            secondary_key: None,
        },
    }
}

/// `GET /identities/identity` as the module principal (uid 65534), off the runtime's threads.
async fn identity_as_module_principal(stack: &Stack) -> (u16, serde_json::Value) {
    let socket = stack.identityd.socket.clone();
    tokio::task::spawn_blocking(move || {
        request_as(
            65534,
            &socket,
            "GET",
            "/identities/identity?api-version=2020-09-01",
            "",
        )
    })
    .await
    .unwrap()
}

/// Issue 11.4: the device is usable before the first module reconciliation has created the
/// principal's module. With every Hub answer slowed down, the principal asks the moment the
/// socket answers (no sleep, no retry) and must get its module — with keys Hub has — not a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_principal_asking_at_startup_waits_for_reconciliation() {
    let key = random_key_b64();
    let emu = emulator(|config| config.devices.push(manual_device("early-device", &key))).await;
    emu.control()
        .patch_settings(cloud_emulator::SettingsPatch {
            hub_delay_ms: Some(800),
            ..Default::default()
        })
        .unwrap();
    let hub = emu.hub_hostname().to_owned();
    let stack = module_principal_stack(&emu, "early-device", &key).await;

    let (status, body) = identity_as_module_principal(&stack).await;
    assert_eq!(status, 200, "{body}\n{}", stack.identityd.log());
    assert_eq!(body["spec"]["moduleId"], "hostmodule1");
    assert_eq!(body["spec"]["deviceId"], "early-device");
    let modules = emu.control().modules(None, "early-device").unwrap();
    let module = modules
        .iter()
        .find(|module| module["moduleId"] == "hostmodule1")
        .expect("reconciliation created the module");
    assert_eq!(body["spec"]["genId"], module["generationId"]);
    let handle: key_api::KeyHandle =
        serde_json::from_value(body["spec"]["auth"]["keyHandle"].clone()).unwrap();
    assert_module_token_accepted(&stack, &emu, &hub, "early-device", "hostmodule1", &handle).await;
}

/// A failed first reconciliation leaves the principal's module missing in Hub: its read is a
/// 503 naming the reconciliation failure (not a 404), and a reprovision (which reconciles
/// again) brings the module.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reconciliation_is_a_503_until_a_round_reconciles() {
    let key = random_key_b64();
    let emu = emulator(|config| config.devices.push(manual_device("unlucky-device", &key))).await;
    // The first Hub request is the reconciliation's module listing.
    emu.control()
        .add_fault(cloud_emulator::FaultSpec {
            target: cloud_emulator::Target::Hub,
            status: 403,
            count: 1,
            retry_after_secs: None,
        })
        .unwrap();
    let stack = module_principal_stack(&emu, "unlucky-device", &key).await;

    let (status, body) = identity_as_module_principal(&stack).await;
    assert_eq!(status, 503, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("module \"hostmodule1\" is not reconciled yet: module reconciliation failed: cloud error: 403"),
        "{message}"
    );
    assert!(emu.control().faults().is_empty());

    let (status, body, _) = stack
        .request(
            Method::POST,
            "/identities/device/reprovision?api-version=2020-09-01",
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = identity_as_module_principal(&stack).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["spec"]["moduleId"], "hostmodule1");
}

/// A module read that arrives while a reprovisioning is registering with DPS waits for that
/// round's reconciliation: it gets the module in the newly assigned hub, not the old hub's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_read_during_a_reprovision_gets_the_new_hubs_module() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config
            .individual_enrollments
            .push(individual_sas("hopping-device", &key));
    })
    .await;
    let first_hub = emu.hub_hostname().to_owned();
    let second_hub = format!("127.0.0.1:{}", emu.https_addr().port());
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&key))
        .await
        .unwrap();
    stack.write_identityd_config(&dps_symmetric_config(&emu, "hopping-device"));
    stack.start_identityd(emu.ca_cert_path());
    assert_module_principal_works(&stack, &emu, &first_hub, "hopping-device").await;

    // The registration takes a few seconds (every DPS answer delayed 500 ms); the read is sent
    // 200 ms after the reprovision request, so it arrives while the round is in flight.
    emu.control()
        .patch_settings(cloud_emulator::SettingsPatch {
            assigned_hub: Some(second_hub.clone()),
            dps_delay_ms: Some(500),
            ..Default::default()
        })
        .unwrap();
    let client = stack.client();
    let (reprovisioned, module) = tokio::join!(client.reprovision(), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.get_module("hostmodule1", "aziot").await
    });
    reprovisioned.unwrap();
    let module = module.unwrap();
    assert_eq!(aziot(&module).hub_name, second_hub);
    let in_second_hub = emu
        .control()
        .modules(Some(&second_hub), "hopping-device")
        .unwrap();
    let created = in_second_hub
        .iter()
        .find(|module| module["moduleId"] == "hostmodule1")
        .expect("the reprovision's reconciliation created the module in the new hub");
    assert_eq!(
        aziot(&module).gen_id.as_deref(),
        created["generationId"].as_str()
    );
}
