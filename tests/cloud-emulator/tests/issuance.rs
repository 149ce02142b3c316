//! DPS certificate issuance (spec 9.6) over real HTTPS: a CSR in the registration gets a
//! certificate from the DPS issuing CA in the field generation it came in, the hub accepts that
//! certificate, and bad CSRs or enrollments without a policy get clear errors.

// Helpers outside #[test] fns are still test code: unwrap is the right failure mode here.
#![allow(clippy::unwrap_used)]

mod common;

use cloud_emulator::{
    config::CertificateIssuance, pki::CertAndKey, Attestation, IndividualEnrollment,
    RunningEmulator,
};
use common::{https, now, sas, test_config, Answer, ClientIdentity, Req};
use http::{Method, StatusCode};
use openssl::pkey::{PKey, Private};
use serde_json::{json, Value};

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn key() -> PKey<Private> {
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap()).unwrap()
}

fn csr(cn: &str, key: &PKey<Private>) -> openssl::x509::X509Req {
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let mut builder = openssl::x509::X509ReqBuilder::new().unwrap();
    builder.set_subject_name(&name.build()).unwrap();
    builder.set_pubkey(key).unwrap();
    builder
        .sign(key, openssl::hash::MessageDigest::sha256())
        .unwrap();
    builder.build()
}

/// Registers with `field: value` in the body on `api`, polls to the end, returns the last answer.
async fn register(emu: &RunningEmulator, reg: &str, key: &str, extra: Value, api: &str) -> Answer {
    let token = sas(
        &format!("{}/registrations/{reg}", emu.id_scope()),
        key,
        now() + 300,
        Some("registration"),
    );
    let mut body = json!({ "registrationId": reg });
    for (field, value) in extra.as_object().unwrap() {
        body[field] = value.clone();
    }
    let base = format!("/{}/registrations/{reg}", emu.id_scope());
    let answer = https(
        emu.https_addr(),
        emu.ca_cert_path(),
        None,
        Req::new(Method::PUT, format!("{base}/register?api-version={api}"))
            .json(body)
            .auth(&token),
    )
    .await;
    if answer.status != StatusCode::ACCEPTED {
        return answer;
    }
    let op = answer.json["operationId"].as_str().unwrap().to_owned();
    loop {
        let poll = https(
            emu.https_addr(),
            emu.ca_cert_path(),
            None,
            Req::new(
                Method::GET,
                format!("{base}/operations/{op}?api-version={api}"),
            )
            .auth(&token),
        )
        .await;
        if poll.status != StatusCode::ACCEPTED {
            return poll;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The hub's module list of `issued-1`, asked over mutual TLS as `identity`.
async fn modules_as(emu: &RunningEmulator, identity: &ClientIdentity) -> Answer {
    https(
        emu.https_addr(),
        emu.ca_cert_path(),
        Some(identity),
        Req::new(
            Method::GET,
            "/devices/issued-1/modules?api-version=2021-04-12".to_owned(),
        ),
    )
    .await
}

fn enrollment(reg: &str, key: &str) -> IndividualEnrollment {
    IndividualEnrollment {
        registration_id: reg.into(),
        device_id: None,
        assigned_hub: None,
        payload: None,
        iot_edge: false,
        attestation: Attestation::SymmetricKey {
            primary_key: key.into(),
            secondary_key: None,
        },
    }
}

fn verifies(leaf: &openssl::x509::X509, ca_pem: &str) -> bool {
    let ca = openssl::x509::X509::from_pem(ca_pem.as_bytes()).unwrap();
    let mut store = openssl::x509::store::X509StoreBuilder::new().unwrap();
    store.add_cert(ca).unwrap();
    let store = store.build();
    let mut context = openssl::x509::X509StoreContext::new().unwrap();
    let chain = openssl::stack::Stack::new().unwrap();
    context
        .init(&store, leaf, &chain, |c| c.verify_cert())
        .unwrap()
}

#[tokio::test]
async fn csr_registrations_get_certificates_in_both_generations() {
    let key_b64 = common::random_key();
    let mut config = test_config();
    config
        .individual_enrollments
        .push(enrollment("issued-1", &key_b64));
    config
        .individual_enrollments
        .push(enrollment("no-policy", &key_b64));
    config.certificate_issuance.push(CertificateIssuance {
        enrollment: "issued-1".into(),
        validity_secs: 120,
    });
    let emu = cloud_emulator::start(config).await.unwrap();
    let ca_pem = emu.control().dps_issuing_ca_pem();
    let device_key = key();

    // Current generation: `csr` (base64 DER) → `issuedCertificateChain` (base64 DER, leaf, CA).
    let request = csr("issued-1", &device_key);
    let answer = register(
        &emu,
        "issued-1",
        &key_b64,
        json!({ "csr": b64(&request.to_der().unwrap()) }),
        "2025-07-01-preview",
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json);
    let state = &answer.json["registrationState"];
    assert_eq!(state["status"], "assigned", "{state}");
    let chain = state["issuedCertificateChain"].as_array().unwrap();
    assert_eq!(chain.len(), 2);
    let der = |value: &Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap())
            .unwrap()
    };
    let leaf = openssl::x509::X509::from_der(&der(&chain[0])).unwrap();
    assert!(verifies(&leaf, &ca_pem));
    assert!(leaf.public_key().unwrap().public_eq(&device_key));
    let lifetime = leaf.not_before().diff(leaf.not_after()).unwrap();
    assert_eq!(
        i64::from(lifetime.days) * 86_400 + i64::from(lifetime.secs),
        130
    );
    // The hub accepts the issued certificate over mutual TLS.
    let identity = ClientIdentity {
        leaf: CertAndKey {
            cert: leaf.clone(),
            key: device_key.clone(),
        },
        chain: Vec::new(),
    };
    let twin = modules_as(&emu, &identity).await;
    assert_eq!(twin.status, StatusCode::OK, "{:?}", twin.json);
    // A certificate DPS did not issue is refused.
    let stranger = ClientIdentity {
        leaf: cloud_emulator::pki::self_signed_client("issued-1").unwrap(),
        chain: Vec::new(),
    };
    let refused = modules_as(&emu, &stranger).await;
    assert_eq!(
        refused.status,
        StatusCode::UNAUTHORIZED,
        "{:?}",
        refused.json
    );

    // Earlier generation: `clientCertificateCsr` (PEM here) → `issuedClientCertificate` (PEM)
    // and `trustBundle`.
    let second_key = key();
    let request = csr("issued-1", &second_key);
    let answer = register(
        &emu,
        "issued-1",
        &key_b64,
        json!({ "clientCertificateCsr": String::from_utf8(request.to_pem().unwrap()).unwrap() }),
        "2021-11-01-preview",
    )
    .await;
    let state = &answer.json["registrationState"];
    assert_eq!(state["status"], "assigned", "{state}");
    let leaf = openssl::x509::X509::from_pem(
        state["issuedClientCertificate"]
            .as_str()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    assert!(leaf.public_key().unwrap().public_eq(&second_key));
    assert_eq!(
        state["trustBundle"]["certificates"][0]["certificate"],
        json!(ca_pem)
    );
    // The previous certificate stays accepted until the device uses the new one.
    let twin = modules_as(&emu, &identity).await;
    assert_eq!(twin.status, StatusCode::OK, "{:?}", twin.json);

    // A CSR whose CN is not the registration ID, or whose signature is broken: 400 naming it.
    let wrong = csr("someone-else", &device_key);
    let answer = register(
        &emu,
        "issued-1",
        &key_b64,
        json!({ "csr": b64(&wrong.to_der().unwrap()) }),
        "2025-07-01-preview",
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{:?}", answer.json);
    assert!(answer.json["message"]
        .as_str()
        .unwrap()
        .contains("subject CN must be the registration ID"));
    let mut der = csr("issued-1", &device_key).to_der().unwrap();
    let last = der.len() - 1;
    der[last] ^= 1;
    let answer = register(
        &emu,
        "issued-1",
        &key_b64,
        json!({ "csr": b64(&der) }),
        "2025-07-01-preview",
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{:?}", answer.json);

    // An enrollment without an issuance policy: the registration fails with 400000.
    let request = csr("no-policy", &device_key);
    let answer = register(
        &emu,
        "no-policy",
        &key_b64,
        json!({ "csr": b64(&request.to_der().unwrap()) }),
        "2025-07-01-preview",
    )
    .await;
    let state = &answer.json["registrationState"];
    assert_eq!(answer.json["status"], "failed", "{:?}", answer.json);
    assert_eq!(state["errorCode"], 400_000);
    assert!(state["errorMessage"]
        .as_str()
        .unwrap()
        .contains("no certificate issuance policy"));
}
