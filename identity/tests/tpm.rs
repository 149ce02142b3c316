//! DPS TPM attestation end to end: the real keyd (TPM service on a private swtpm), certd and
//! identityd, with the cloud emulator's DPS doing the TPM protocol's server side.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{emulator, eventually, Stack};
use http::{Method, StatusCode};
use system_tests::Swtpm;

const MODULE_PRINCIPAL: &str =
    "[[principal]]\nuid = 4321\nname = \"hostmodule1\"\nidtype = [\"module\"]\n";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn tpm_enrollment(
    registration_id: &str,
    endorsement_key: &[u8],
) -> cloud_emulator::IndividualEnrollment {
    let mut enrollment = common::individual(
        registration_id,
        cloud_emulator::Attestation::Tpm {
            endorsement_key: b64(endorsement_key),
        },
    );
    enrollment.device_id = Some(format!("{registration_id}-device"));
    enrollment
}

fn dps_tpm_config(emu: &cloud_emulator::RunningEmulator, registration_id: &str) -> String {
    format!(
        "[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{}\"\nid_scope = \"{}\"\n\
         [provisioning.attestation]\nmethod = \"tpm\"\nregistration_id = \"{registration_id}\"\n\
         {MODULE_PRINCIPAL}",
        emu.dps_endpoint(),
        emu.id_scope()
    )
}

async fn provisioning_info(stack: &Stack) -> serde_json::Value {
    let (status, body, _) = stack
        .request(
            Method::GET,
            "/identities/provisioning?api-version=2021-12-01",
            "",
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_tpm_attestation_provisions_signs_and_survives_restarts() {
    let tpm = Swtpm::start();
    let emu = emulator(|_| {}).await;
    let mut stack = Stack::new();
    stack.enable_tpm(&tpm.tcti());
    stack.start_keyd_certd();
    // keyd creates the EK on first use; the factory enrollment is made from it.
    let keys = stack.tpm_client().get_tpm_keys().await.unwrap();
    emu.control()
        .add_individual_enrollment(tpm_enrollment("tpm-kiosk", &keys.endorsement_key))
        .unwrap();
    stack.write_identityd_config(&dps_tpm_config(&emu, "tpm-kiosk"));
    stack.start_identityd(emu.ca_cert_path());

    let device = stack.wait_for_device(Duration::from_secs(90)).await;
    assert_eq!(device["spec"]["deviceId"], "tpm-kiosk-device", "{device}");
    assert_eq!(device["spec"]["auth"]["type"], "tpm", "{device}");
    let info = provisioning_info(&stack).await;
    assert_eq!(info["auth"], "tpm", "{info}");
    assert_eq!(info["registration_id"], "tpm-kiosk", "{info}");
    assert_eq!(info["status"], "provisioned", "{info}");

    // DPS got the EK and SRK, and a registration SAS signed in the TPM.
    let registrations = emu.control().registrations();
    assert_eq!(registrations.len(), 1, "{registrations:?}");
    let seen_ek = registrations[0]["tpm"]["endorsement_key"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(seen_ek, b64(&keys.endorsement_key));
    assert_eq!(
        registrations[0]["tpm"]["storage_root_key"],
        b64(&keys.storage_root_key)
    );
    assert!(emu
        .control()
        .requests()
        .iter()
        .any(|entry| entry.service == "dps" && entry.auth == "sas" && entry.auth_ok == Some(true)));
    // The hub accepted the device's TPM-signed SAS (module reconciliation).
    common::hub_accepted(&emu, "sas", 0).await;
    eventually("hostmodule1 in the hub", Duration::from_secs(60), || {
        emu.control()
            .modules(Some(emu.hub_hostname()), "tpm-kiosk-device")
            .filter(|modules| modules.iter().any(|m| m["moduleId"] == "hostmodule1"))
    })
    .await;

    // Both daemons stop; swtpm is free for tpm2-tools: the EK DPS saw is the TPM's own, and the
    // authentication key is persisted.
    stack.identityd.stop();
    stack.keyd.stop();
    assert_eq!(b64(&tpm.read_public("0x81010001", "tss")), seen_ek);
    tpm.read_public("0x81000100", "tss");

    // A restart works from the backup and the TPM-held key: no DPS request, the hub accepts.
    let last = emu.control().requests().last().map_or(0, |entry| entry.seq);
    stack.keyd.spawn();
    stack.start_identityd(emu.ca_cert_path());
    let device = stack.wait_for_device(Duration::from_secs(60)).await;
    assert_eq!(device["spec"]["deviceId"], "tpm-kiosk-device");
    common::hub_accepted(&emu, "sas", last).await;
    assert!(
        !emu.control()
            .requests()
            .iter()
            .any(|entry| entry.seq > last && entry.service == "dps"),
        "the restart registered again instead of using the backup"
    );

    // Reprovisioning registers again through the TPM flow and gets a fresh key.
    let (status, body, _) = stack
        .request(
            Method::POST,
            "/identities/device/reprovision?api-version=2020-09-01",
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let challenges = emu
        .control()
        .requests()
        .iter()
        .filter(|entry| entry.service == "dps" && entry.auth == "none" && entry.status == 401)
        .count();
    assert_eq!(challenges, 2, "one TPM challenge per registration");
    let last = emu.control().requests().last().map_or(0, |entry| entry.seq);
    let (status, body, _) = stack
        .request(
            Method::POST,
            "/identities/modules?api-version=2020-09-01",
            r#"{"type":"aziot","moduleId":"after-reprovision"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    common::hub_accepted(&emu, "sas", last).await;
    assert!(!stack.identityd.log().contains("SharedAccessSignature sr="));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_endorsement_key_is_a_clear_provisioning_error() {
    let tpm = Swtpm::start();
    let emu = emulator(|_| {}).await;
    let mut stack = Stack::new();
    stack.enable_tpm(&tpm.tcti());
    stack.start_keyd_certd();
    let keys = stack.tpm_client().get_tpm_keys().await.unwrap();
    // Another TPM's EK: the same template with one modulus byte changed.
    let mut other_ek = keys.endorsement_key.clone();
    let last = other_ek.len() - 10;
    other_ek[last] ^= 0x40;
    emu.control()
        .add_individual_enrollment(tpm_enrollment("tpm-wrong", &other_ek))
        .unwrap();
    stack.write_identityd_config(&dps_tpm_config(&emu, "tpm-wrong"));
    stack.start_identityd(emu.ca_cert_path());

    let info = common::provisioning_status(&stack, "failed").await;
    let error = info["error"].as_str().unwrap();
    assert!(error.contains("401"), "{info}");
    assert!(error.contains("endorsement key does not match"), "{info}");
    let log = stack.identityd.log();
    assert!(log.contains("endorsement key does not match"), "{log}");
    // identityd keeps serving: the device request answers at once with the same reason.
    let (status, body, _) = stack
        .request(
            Method::POST,
            "/identities/device?api-version=2020-09-01",
            "{\"type\":\"aziot\"}",
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("endorsement key does not match"),
        "{body}"
    );
    // No key was ever imported.
    let error = stack
        .tpm_client()
        .sign_with_auth_key(b"x")
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("no TPM authentication key"),
        "{error}"
    );
}
