//! DPS X.509 provisioning with the device key in a SoftHSM2 token, used through keyd's
//! PKCS#11 support: the TLS handshake signatures are made by the token.
//!
//! SoftHSM2 and OpenSC (`pkcs11-tool`) are required (`tools/test.sh` installs them); a missing
//! one fails the test.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use std::time::Duration;

use common::{emulator, eventually, Stack};
use identity_api::{AuthInfo, Identity};
use system_tests::softhsm::{SoftHsm, MODULE, PIN};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dps_x509_with_the_key_in_a_softhsm_token() {
    let hsm = SoftHsm::new("identity");
    let label = hsm.label.clone();
    hsm.tool_ok(&[
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "hsm-device",
        "--id",
        "01",
    ]);
    let public_path = hsm.path("public.der");
    hsm.tool_ok(&[
        "--read-object",
        "--type",
        "pubkey",
        "--label",
        "hsm-device",
        "-o",
        public_path.to_str().unwrap(),
    ]);
    let public_key =
        openssl::pkey::PKey::public_key_from_der(&std::fs::read(&public_path).unwrap()).unwrap();

    let ca = cloud_emulator::pki::TestCa::new("HSM Group CA").unwrap();
    let leaf_pem = ca.client_cert_for("hsm-device", &public_key).unwrap();
    let emu = emulator(|config| {
        config
            .group_enrollments
            .push(cloud_emulator::GroupEnrollment {
                group_id: "hsm-group".into(),
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
    stack.keyd.env = hsm.env();
    stack.add_keyd_config(
        "device-id",
        &format!("pkcs11:token={label};object=hsm-device?pin-value={PIN}"),
        &format!("pkcs11_lib_path = \"{MODULE}\"\n"),
    );
    stack.start_keyd_certd();
    stack
        .certd_client()
        .import_cert("device-id", &format!("{leaf_pem}{}", ca.cert_pem()))
        .await
        .unwrap();
    stack.write_identityd_config(&format!(
        "[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{}\"\nscope_id = \"{}\"\n\
         [provisioning.attestation]\nmethod = \"x509\"\nregistration_id = \"hsm-device\"\n\
         identity_cert = \"device-id\"\nidentity_pk = \"device-id\"\n\
         [[principal]]\nuid = 4321\nname = \"hostmodule1\"\nidtype = [\"module\"]\n",
        emu.dps_endpoint(),
        emu.id_scope()
    ));
    stack.start_identityd(emu.ca_cert_path());

    let device = stack.client().get_device_identity().await.unwrap();
    let Identity::Aziot(spec) = &device else {
        panic!("not aziot: {device:?}");
    };
    assert_eq!(spec.device_id, "hsm-device");
    assert!(matches!(spec.auth, Some(AuthInfo::X509 { .. })));
    assert!(emu
        .control()
        .requests()
        .iter()
        .any(|entry| entry.service == "dps"
            && entry.auth == "x509"
            && entry.auth_ok == Some(true)));
    // Hub calls (module reconciliation) authenticate with the token key too.
    eventually("reconciliation", Duration::from_secs(30), || {
        emu.control()
            .modules(None, "hsm-device")
            .filter(|modules| modules.iter().any(|m| m["moduleId"] == "hostmodule1"))
    })
    .await;
    assert!(emu
        .control()
        .requests()
        .iter()
        .any(|entry| entry.service == "hub"
            && entry.auth == "x509"
            && entry.auth_ok == Some(true)));
}
