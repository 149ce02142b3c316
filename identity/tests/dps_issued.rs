//! DPS-issued operational certificates (spec 9.6): identityd sends a CSR for a key in keyd with
//! its registration, stores the chain DPS issues in certd, authenticates to the emulator's hub
//! over mutual TLS with it, and renews it by registering again before it expires, without the
//! device losing its hub connection.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{emulator, random_key_b64, Stack};
use http::{Method, StatusCode};

fn enrollment(registration_id: &str, key: &str) -> cloud_emulator::IndividualEnrollment {
    common::individual(
        registration_id,
        cloud_emulator::Attestation::SymmetricKey {
            primary_key: key.into(),
            secondary_key: None,
        },
    )
}

fn config(emu: &cloud_emulator::RunningEmulator, registration_id: &str, renew: &str) -> String {
    format!(
        "[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{}\"\nid_scope = \"{}\"\n\
         [provisioning.attestation]\nmethod = \"symmetric_key\"\nregistration_id = \"{registration_id}\"\n\
         symmetric_key = \"key://device-id\"\n\
         [provisioning.operational_cert]\ncert = \"op-cert\"\npk = \"op-key\"\n{renew}\n\
         [[principal]]\nuid = 4321\nname = \"hostmodule1\"\nidtype = [\"module\"]\n",
        emu.dps_endpoint(),
        emu.id_scope()
    )
}

fn leaf(pem: &str) -> openssl::x509::X509 {
    openssl::x509::X509::from_pem(pem.as_bytes()).unwrap()
}

fn serial(pem: &str) -> String {
    leaf(pem)
        .serial_number()
        .to_bn()
        .unwrap()
        .to_hex_str()
        .unwrap()
        .to_string()
}

/// `openssl verify` of the stored chain against the emulator's DPS issuing CA.
fn openssl_verify(stack: &Stack, ca_pem: &str, chain_pem: &str) {
    let ca = stack.path("dps-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let chain = stack.path("op-cert.pem");
    std::fs::write(&chain, chain_pem).unwrap();
    let output = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&ca)
        .arg(&chain)
        .output()
        .expect("openssl is needed (tools/install-deps.sh)");
    assert!(
        output.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_issues_the_operational_cert_and_it_is_renewed_by_registering_again() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config
            .individual_enrollments
            .push(enrollment("op-device", &key));
        // 60 s certificates (70 s lifetime with the 10 s backdating): renewed at 50 %.
        config
            .certificate_issuance
            .push(cloud_emulator::config::CertificateIssuance {
                enrollment: "op-device".into(),
                validity_secs: 60,
            });
    })
    .await;
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&key))
        .await
        .unwrap();
    stack.write_identityd_config(&config(
        &emu,
        "op-device",
        "auto_renew = { rotate_key = true, threshold = \"50%\", retry = \"10%\" }",
    ));
    stack.start_identityd(emu.ca_cert_path());

    let device = stack.wait_for_device(Duration::from_secs(60)).await;
    assert_eq!(device["spec"]["auth"]["type"], "x509", "{device}");
    assert_eq!(device["spec"]["auth"]["certId"], "op-cert", "{device}");
    let first = stack.certd_client().get_cert("op-cert").await.unwrap();
    openssl_verify(&stack, &emu.control().dps_issuing_ca_pem(), &first);
    let cn = leaf(&first)
        .subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .unwrap()
        .data()
        .to_string()
        .unwrap();
    assert_eq!(cn, "op-device");
    // DPS got the CSR on the certificate-issuing api-version.
    assert!(emu
        .control()
        .requests()
        .iter()
        .any(|entry| entry.service == "dps"
            && entry
                .query
                .as_deref()
                .is_some_and(|q| q.contains("2025-07-01-preview"))));
    // The hub authenticates the device by the issued certificate (module reconciliation).
    let seen = common::hub_accepted(&emu, "x509", 0).await;

    // DPS is down for the first two renewal attempts: each is retried after `retry` (10 % of
    // the 70 s lifetime, raised to the 10 s floor), and the renewal then goes through.
    emu.control()
        .add_fault(cloud_emulator::FaultSpec {
            target: cloud_emulator::Target::Dps,
            status: 503,
            count: 2,
            retry_after_secs: None,
        })
        .unwrap();

    // Renewal: a new serial and, with rotate_key, a new key; the device keeps working.
    let first_serial = serial(&first);
    let first_key = leaf(&first)
        .public_key()
        .unwrap()
        .public_key_to_der()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let renewed = loop {
        let pem = stack.certd_client().get_cert("op-cert").await.unwrap();
        if serial(&pem) != first_serial {
            break pem;
        }
        // The hub keeps accepting the device meanwhile.
        let (status, body, _) = stack
            .request(
                Method::GET,
                "/identities/modules/hostmodule1?api-version=2020-09-01&type=aziot",
                "",
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            Instant::now() < deadline,
            "the operational certificate was not renewed\n{}",
            stack.identityd.log()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    openssl_verify(&stack, &emu.control().dps_issuing_ca_pem(), &renewed);
    let log = stack.identityd.log();
    assert_eq!(
        log.matches("renewing operational certificate \"op-cert\" failed, retrying in 10 s")
            .count(),
        2,
        "{log}"
    );
    assert!(emu.control().faults().is_empty(), "both faults were hit");
    let renewed_key = leaf(&renewed)
        .public_key()
        .unwrap()
        .public_key_to_der()
        .unwrap();
    assert_ne!(
        renewed_key, first_key,
        "rotate_key gives the renewal a new key"
    );
    // The hub now accepts the renewed certificate: a module created after the renewal.
    let (status, body, _) = stack
        .request(
            Method::POST,
            "/identities/modules?api-version=2020-09-01",
            r#"{"type":"aziot","moduleId":"after-renewal"}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    common::hub_accepted(&emu, "x509", seen).await;
    // No hub request of this device was ever refused.
    let refused: Vec<_> = emu
        .control()
        .requests()
        .into_iter()
        .filter(|entry| entry.service == "hub" && entry.auth_ok == Some(false))
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    // The temporary key was moved over the operational key.
    let error = stack
        .keyd_client()
        .load_key_pair("op-key-temp")
        .await
        .unwrap_err();
    assert!(error.to_string().contains("not found"), "{error}");

    // A restart works from the backup and the stored operational certificate.
    let last = emu.control().requests().last().map_or(0, |entry| entry.seq);
    stack.identityd.stop();
    stack.start_identityd(emu.ca_cert_path());
    stack.wait_for_device(Duration::from_secs(60)).await;
    common::hub_accepted(&emu, "x509", last).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_without_an_issuance_policy_is_a_clear_provisioning_error() {
    let key = random_key_b64();
    let emu = emulator(|config| {
        config
            .individual_enrollments
            .push(enrollment("no-policy", &key));
    })
    .await;
    let mut stack = Stack::new();
    stack.start_keyd_certd();
    stack
        .keyd_client()
        .import_key("device-id", "sign", &common::unb64(&key))
        .await
        .unwrap();
    stack.write_identityd_config(&config(&emu, "no-policy", ""));
    stack.start_identityd(emu.ca_cert_path());
    let info = common::provisioning_status(&stack, "failed").await;
    let error = info["error"].as_str().unwrap();
    assert!(error.contains("400000"), "{info}");
    assert!(error.contains("no certificate issuance policy"), "{info}");
    // Nothing was stored.
    let error = stack.certd_client().get_cert("op-cert").await.unwrap_err();
    assert!(error.is_not_found(), "{error}");
}

/// The hub device's thumbprint is the stored operational leaf's (not the attestation cert's).
fn assert_hub_uses_operational_cert(
    emu: &cloud_emulator::RunningEmulator,
    device: &str,
    pem: &str,
) {
    let thumbprint = cloud_emulator::pki::thumbprints(&leaf(pem)).1;
    let hub_device = emu.control().device(None, device).unwrap();
    assert_eq!(
        hub_device["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        serde_json::json!(thumbprint),
        "{hub_device}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_attestation_with_a_dps_issued_operational_cert() {
    let attestation = cloud_emulator::pki::self_signed_client("x509-op").unwrap();
    let enrolled = attestation.cert_pem();
    let emu = emulator(move |config| {
        config.individual_enrollments.push(common::individual(
            "x509-op",
            cloud_emulator::Attestation::X509 {
                cert_pem: Some(enrolled),
                cert_file: None,
                thumbprints: Vec::new(),
            },
        ));
        config
            .certificate_issuance
            .push(cloud_emulator::config::CertificateIssuance {
                enrollment: "x509-op".into(),
                validity_secs: 3600,
            });
    })
    .await;
    let mut stack = Stack::new();
    stack.add_key_pair("device-id", &attestation.key);
    stack.start_keyd_certd();
    stack
        .certd_client()
        .import_cert("device-id", &attestation.cert_pem())
        .await
        .unwrap();
    stack.write_identityd_config(&format!(
        "[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{}\"\nid_scope = \"{}\"\n\
         [provisioning.attestation]\nmethod = \"x509\"\nregistration_id = \"x509-op\"\n\
         identity_cert = \"device-id\"\nidentity_pk = \"device-id\"\n\
         [provisioning.operational_cert]\ncert = \"op-cert\"\npk = \"op-key\"\n\
         [[principal]]\nuid = 4321\nname = \"hostmodule1\"\nidtype = [\"module\"]\n",
        emu.dps_endpoint(),
        emu.id_scope()
    ));
    stack.start_identityd(emu.ca_cert_path());
    let device = stack.wait_for_device(Duration::from_secs(60)).await;
    assert_eq!(device["spec"]["auth"]["certId"], "op-cert", "{device}");
    let pem = stack.certd_client().get_cert("op-cert").await.unwrap();
    openssl_verify(&stack, &emu.control().dps_issuing_ca_pem(), &pem);
    assert_hub_uses_operational_cert(&emu, "x509-op", &pem);
    common::hub_accepted(&emu, "x509", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_attestation_with_a_dps_issued_operational_cert() {
    use base64::Engine as _;
    let tpm = system_tests::Swtpm::start();
    let emu = emulator(|config| {
        config
            .certificate_issuance
            .push(cloud_emulator::config::CertificateIssuance {
                enrollment: "tpm-op".into(),
                validity_secs: 3600,
            });
    })
    .await;
    let mut stack = Stack::new();
    stack.enable_tpm(&tpm.tcti());
    stack.start_keyd_certd();
    let keys = stack.tpm_client().get_tpm_keys().await.unwrap();
    emu.control()
        .add_individual_enrollment(common::individual(
            "tpm-op",
            cloud_emulator::Attestation::Tpm {
                endorsement_key: base64::engine::general_purpose::STANDARD
                    .encode(&keys.endorsement_key),
            },
        ))
        .unwrap();
    stack.write_identityd_config(&format!(
        "[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{}\"\nid_scope = \"{}\"\n\
         [provisioning.attestation]\nmethod = \"tpm\"\nregistration_id = \"tpm-op\"\n\
         [provisioning.operational_cert]\n\
         [[principal]]\nuid = 4321\nname = \"hostmodule1\"\nidtype = [\"module\"]\n",
        emu.dps_endpoint(),
        emu.id_scope()
    ));
    stack.start_identityd(emu.ca_cert_path());
    let device = stack.wait_for_device(Duration::from_secs(90)).await;
    // The default IDs.
    assert_eq!(
        device["spec"]["auth"]["certId"], "aziot-dps-operational",
        "{device}"
    );
    let pem = stack
        .certd_client()
        .get_cert("aziot-dps-operational")
        .await
        .unwrap();
    openssl_verify(&stack, &emu.control().dps_issuing_ca_pem(), &pem);
    assert_hub_uses_operational_cert(&emu, "tpm-op", &pem);
    common::hub_accepted(&emu, "x509", 0).await;
}
