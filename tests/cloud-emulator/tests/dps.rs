//! DPS over real HTTPS: SAS and X.509 attestation, the register → poll → assigned flow,
//! failures, hub reassignment and fault injection.

mod common;

use std::time::Instant;

use cloud_emulator::{
    pki::{self_signed_client, TestCa},
    Attestation, Config, FailSpec, FaultSpec, GroupAttestation, GroupEnrollment,
    IndividualEnrollment, RunningEmulator, SettingsPatch, Target,
};
use common::{admin, https, now, sas, test_config, Answer, ClientIdentity, Req};
use http::{Method, StatusCode};
use serde_json::{json, Value};

const API: &str = "api-version=2021-06-01";

fn register_path(emu: &RunningEmulator, reg: &str) -> String {
    format!("/{}/registrations/{reg}/register?{API}", emu.id_scope())
}

fn poll_path(emu: &RunningEmulator, reg: &str, op: &str) -> String {
    format!(
        "/{}/registrations/{reg}/operations/{op}?{API}",
        emu.id_scope()
    )
}

fn dps_token(emu: &RunningEmulator, reg: &str, key: &str) -> String {
    sas(
        &format!("{}/registrations/{reg}", emu.id_scope()),
        key,
        now() + 300,
        Some("registration"),
    )
}

async fn register(
    emu: &RunningEmulator,
    reg: &str,
    token: Option<&str>,
    id: Option<&ClientIdentity>,
) -> Answer {
    let mut req = Req::new(Method::PUT, register_path(emu, reg))
        .json(json!({ "registrationId": reg, "payload": { "modelId": "dtmi:test;1" } }));
    if let Some(t) = token {
        req = req.auth(t);
    }
    https(emu.https_addr(), emu.ca_cert_path(), id, req).await
}

async fn poll(
    emu: &RunningEmulator,
    reg: &str,
    op: &str,
    token: Option<&str>,
    id: Option<&ClientIdentity>,
) -> Answer {
    let mut req = Req::new(Method::GET, poll_path(emu, reg, op));
    if let Some(t) = token {
        req = req.auth(t);
    }
    https(emu.https_addr(), emu.ca_cert_path(), id, req).await
}

/// Registers and polls until the final answer; returns the final answer.
async fn provision(
    emu: &RunningEmulator,
    reg: &str,
    token: Option<&str>,
    id: Option<&ClientIdentity>,
) -> Answer {
    let a = register(emu, reg, token, id).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "register: {:?}", a.json);
    let op = a.json["operationId"]
        .as_str()
        .expect("operationId")
        .to_string();
    for _ in 0..10 {
        let p = poll(emu, reg, &op, token, id).await;
        if p.status != StatusCode::ACCEPTED {
            return p;
        }
    }
    panic!("operation never finished");
}

fn assert_dps_error(a: &Answer, status: StatusCode, code: u64) {
    assert_eq!(a.status, status, "{:?}", a.json);
    assert_eq!(a.json["errorCode"], json!(code), "{:?}", a.json);
    assert!(a.json["trackingId"].as_str().is_some_and(|s| s.len() == 36));
    assert!(a.json["message"].is_string());
    assert!(a.json["timestampUtc"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
}

fn sym_individual(reg: &str, key: &str) -> IndividualEnrollment {
    IndividualEnrollment {
        registration_id: reg.to_string(),
        device_id: None,
        assigned_hub: None,
        payload: None,
        iot_edge: false,
        attestation: Attestation::SymmetricKey {
            primary_key: key.to_string(),
            secondary_key: None,
        },
    }
}

#[tokio::test]
async fn sas_individual_full_flow_and_reprovision() {
    let key = common::random_key();
    let mut cfg = test_config();
    cfg.assigning_polls = 2;
    let mut e = sym_individual("dev-1", &key);
    e.device_id = Some("device-one".into());
    e.payload = Some(json!({ "answer": 42 }));
    cfg.individual_enrollments.push(e);
    let emu = cloud_emulator::start(cfg).await.unwrap();
    let token = dps_token(&emu, "dev-1", &key);

    let a = register(&emu, "dev-1", Some(&token), None).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    assert_eq!(a.json["status"], "assigning");
    assert_eq!(a.retry_after(), Some(1));
    let op = a.json["operationId"].as_str().unwrap().to_string();

    // Two polls answer "assigning", the third the result.
    for _ in 0..2 {
        let p = poll(&emu, "dev-1", &op, Some(&token), None).await;
        assert_eq!(p.status, StatusCode::ACCEPTED);
        assert_eq!(p.json["status"], "assigning");
        assert_eq!(p.retry_after(), Some(1));
    }
    let p = poll(&emu, "dev-1", &op, Some(&token), None).await;
    assert_eq!(p.status, StatusCode::OK, "{:?}", p.json);
    assert_eq!(p.json["status"], "assigned");
    let rs = &p.json["registrationState"];
    assert_eq!(rs["assignedHub"], json!(emu.hub_hostname()));
    assert!(emu.hub_hostname().starts_with("localhost:"));
    assert_eq!(rs["deviceId"], "device-one");
    assert_eq!(rs["registrationId"], "dev-1");
    assert_eq!(rs["substatus"], "initialAssignment");
    assert_eq!(rs["payload"], json!({ "answer": 42 }));
    assert!(rs["symmetricKey"].is_object());
    // Polling again returns the same finished answer.
    let again = poll(&emu, "dev-1", &op, Some(&token), None).await;
    assert_eq!(again.json["registrationState"]["etag"], rs["etag"]);

    // The hub now has the device with the enrollment key.
    let dev = emu
        .control()
        .device(None, "device-one")
        .expect("device created");
    assert_eq!(dev["authentication"]["type"], "sas");
    assert_eq!(
        dev["authentication"]["symmetricKey"]["primaryKey"],
        json!(key)
    );
    let gen = dev["generationId"].clone();
    // The device's request payload was recorded.
    let regs = emu.control().registrations();
    assert_eq!(
        regs[0]["last_request_payload"],
        json!({ "modelId": "dtmi:test;1" })
    );

    // Registering again: reprovisioned, same device (generation kept).
    let p = provision(&emu, "dev-1", Some(&token), None).await;
    assert_eq!(
        p.json["registrationState"]["substatus"],
        "reprovisionedToInitialAssignment"
    );
    assert_eq!(
        emu.control().device(None, "device-one").unwrap()["generationId"],
        gen
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn sas_group_enrollment_uses_derived_key() {
    let group_key = common::random_key();
    let mut cfg = test_config();
    cfg.assigning_polls = 0;
    cfg.group_enrollments.push(GroupEnrollment {
        group_id: "grp".into(),
        assigned_hub: None,
        payload: None,
        iot_edge: true,
        attestation: GroupAttestation::SymmetricKey {
            primary_key: group_key.clone(),
            secondary_key: None,
        },
    });
    let emu = cloud_emulator::start(cfg).await.unwrap();

    let derived = common::derive(&group_key, "member-7");
    let p = provision(
        &emu,
        "member-7",
        Some(&dps_token(&emu, "member-7", &derived)),
        None,
    )
    .await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(p.json["registrationState"]["deviceId"], "member-7");
    assert_eq!(
        p.json["registrationState"]["symmetricKey"]["enrollmentGroupId"],
        "grp"
    );
    let dev = emu.control().device(None, "member-7").unwrap();
    assert_eq!(
        dev["authentication"]["symmetricKey"]["primaryKey"],
        json!(derived)
    );
    assert_eq!(dev["capabilities"]["iotEdge"], true);

    // The group key itself is not a member's key, nor is another member's derived key.
    let a = register(
        &emu,
        "member-8",
        Some(&dps_token(&emu, "member-8", &group_key)),
        None,
    )
    .await;
    assert_dps_error(&a, StatusCode::UNAUTHORIZED, 401_002);
    let a = register(
        &emu,
        "member-8",
        Some(&dps_token(&emu, "member-8", &derived)),
        None,
    )
    .await;
    assert_dps_error(&a, StatusCode::UNAUTHORIZED, 401_002);
    emu.shutdown().await;
}

#[tokio::test]
async fn sas_rejections() {
    let key = common::random_key();
    let mut cfg = test_config();
    cfg.individual_enrollments
        .push(sym_individual("dev-r", &key));
    cfg.individual_enrollments
        .push(sym_individual("other", &key));
    let emu = cloud_emulator::start(cfg).await.unwrap();
    let scope = emu.id_scope().to_string();
    let resource = format!("{scope}/registrations/dev-r");

    // Control: the right token works.
    let ok = register(&emu, "dev-r", Some(&dps_token(&emu, "dev-r", &key)), None).await;
    assert_eq!(ok.status, StatusCode::ACCEPTED);

    let wrong_key = sas(
        &resource,
        &common::random_key(),
        now() + 300,
        Some("registration"),
    );
    let expired = sas(&resource, &key, now() - 1, Some("registration"));
    let wrong_audience = sas(
        &format!("{scope}/registrations/other"),
        &key,
        now() + 300,
        Some("registration"),
    );
    let no_skn = sas(&resource, &key, now() + 300, None);
    let garbage = "SharedAccessSignature sr=x&sig=%%%&se=1".to_string();
    for (what, token) in [
        ("wrong key", Some(wrong_key)),
        ("expired", Some(expired)),
        ("wrong audience", Some(wrong_audience)),
        ("missing skn", Some(no_skn)),
        ("garbage", Some(garbage)),
        ("no credential", None),
    ] {
        let a = register(&emu, "dev-r", token.as_deref(), None).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_dps_error(&a, StatusCode::UNAUTHORIZED, 401_002);
    }
    // Unknown registration ID (no enrollment) → 401 too.
    let a = register(&emu, "nobody", Some(&dps_token(&emu, "nobody", &key)), None).await;
    assert_dps_error(&a, StatusCode::UNAUTHORIZED, 401_002);

    // The request log shows the outcomes.
    let log = emu.control().requests();
    assert_eq!(log.len(), 8);
    assert_eq!(log[0].auth_ok, Some(true));
    assert!(log[1..]
        .iter()
        .all(|e| e.auth_ok == Some(false) && e.status == 401));
    assert_eq!(log[6].auth, "none");
    emu.shutdown().await;
}

#[tokio::test]
async fn sas_literal_unencoded_sr_is_accepted() {
    // The reference identity service does not encode '/', and the signature covers the
    // literal sr text.
    let key = common::random_key();
    let mut cfg = test_config();
    cfg.individual_enrollments
        .push(sym_individual("dev-lit", &key));
    let emu = cloud_emulator::start(cfg).await.unwrap();
    let sr = format!("{}/registrations/dev-lit", emu.id_scope().to_lowercase());
    let token = common::sas_with_literal_sr(&sr, &key, now() + 60, Some("registration"));
    let a = register(&emu, "dev-lit", Some(&token), None).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.json);
    // Tampering with the sr text (same decoded value, different encoding) breaks the signature.
    let tampered = token.replacen(
        &format!("sr={sr}"),
        &format!("sr={}", sr.replace('/', "%2F")),
        1,
    );
    let a = register(&emu, "dev-lit", Some(&tampered), None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    emu.shutdown().await;
}

#[tokio::test]
async fn x509_individual_enrollments() {
    let enrolled = self_signed_client("x509-dev").unwrap();
    let by_thumb = self_signed_client("thumb-dev").unwrap();
    let stranger = self_signed_client("x509-dev").unwrap();
    let expired = cloud_emulator::pki::issue(
        "old-dev",
        cloud_emulator::pki::CertKind::Client,
        None,
        &[],
        (-7200, -60),
    )
    .unwrap();
    let mut cfg = test_config();
    cfg.individual_enrollments.push(IndividualEnrollment {
        registration_id: "old-dev".into(),
        device_id: None,
        assigned_hub: None,
        payload: None,
        iot_edge: false,
        attestation: Attestation::X509 {
            cert_pem: Some(expired.cert_pem()),
            cert_file: None,
            thumbprints: vec![],
        },
    });
    cfg.assigning_polls = 0;
    cfg.individual_enrollments.push(IndividualEnrollment {
        registration_id: "x509-dev".into(),
        device_id: None,
        assigned_hub: None,
        payload: None,
        iot_edge: false,
        attestation: Attestation::X509 {
            cert_pem: Some(enrolled.cert_pem()),
            cert_file: None,
            thumbprints: vec![],
        },
    });
    cfg.individual_enrollments.push(IndividualEnrollment {
        registration_id: "thumb-dev".into(),
        device_id: None,
        assigned_hub: None,
        payload: None,
        iot_edge: false,
        attestation: Attestation::X509 {
            cert_pem: None,
            cert_file: None,
            thumbprints: vec![by_thumb.sha1_thumbprint().to_lowercase()],
        },
    });
    let emu = cloud_emulator::start(cfg).await.unwrap();
    let id = |c: &cloud_emulator::pki::CertAndKey| ClientIdentity {
        leaf: c.clone(),
        chain: vec![],
    };

    let p = provision(&emu, "x509-dev", None, Some(&id(&enrolled))).await;
    assert_eq!(p.status, StatusCode::OK, "{:?}", p.json);
    assert_eq!(p.json["status"], "assigned");
    assert!(p.json["registrationState"]["x509"].is_object());
    let dev = emu.control().device(None, "x509-dev").unwrap();
    assert_eq!(dev["authentication"]["type"], "selfSigned");
    assert_eq!(
        dev["authentication"]["x509Thumbprint"]["primaryThumbprint"],
        json!(enrolled.sha256_thumbprint())
    );

    let p = provision(&emu, "thumb-dev", None, Some(&id(&by_thumb))).await;
    assert_eq!(p.status, StatusCode::OK);

    // Same CN, different (unknown) certificate.
    let a = register(&emu, "x509-dev", None, Some(&id(&stranger))).await;
    assert_dps_error(&a, StatusCode::UNAUTHORIZED, 401_002);
    // Enrolled cert, but the URL names another registration ID (CN mismatch).
    let a = register(&emu, "thumb-dev", None, Some(&id(&enrolled))).await;
    assert_dps_error(&a, StatusCode::UNAUTHORIZED, 401_002);
    // The enrolled certificate has expired.
    let a = register(&emu, "old-dev", None, Some(&id(&expired))).await;
    assert_dps_error(&a, StatusCode::UNAUTHORIZED, 401_002);
    // An SAS token for an X.509 enrollment is refused.
    let a = register(
        &emu,
        "x509-dev",
        Some(&dps_token(&emu, "x509-dev", &common::random_key())),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let log = emu.control().requests();
    assert!(log
        .iter()
        .any(|e| e.auth == "x509" && e.auth_ok == Some(true)));
    assert!(log
        .iter()
        .any(|e| e.auth == "x509" && e.auth_ok == Some(false)));
    emu.shutdown().await;
}

#[tokio::test]
async fn x509_group_enrollment_with_intermediate() {
    let root = TestCa::new("group root").unwrap();
    let inter = root.intermediate("group intermediate").unwrap();
    let leaf = inter.issue_client("edge-42").unwrap();
    let other_ca = TestCa::new("other root").unwrap();
    let mut cfg = test_config();
    cfg.assigning_polls = 0;
    cfg.group_enrollments.push(GroupEnrollment {
        group_id: "x509-group".into(),
        assigned_hub: None,
        payload: None,
        iot_edge: false,
        attestation: GroupAttestation::X509 {
            ca_pem: Some(root.cert_pem()),
            ca_file: None,
        },
    });
    let emu = cloud_emulator::start(cfg).await.unwrap();
    let with_chain = ClientIdentity {
        leaf: leaf.clone(),
        chain: vec![inter.ca.cert.clone()],
    };

    let p = provision(&emu, "edge-42", None, Some(&with_chain)).await;
    assert_eq!(p.status, StatusCode::OK, "{:?}", p.json);
    assert_eq!(
        p.json["registrationState"]["x509"]["enrollmentGroupId"],
        "x509-group"
    );
    let dev = emu.control().device(None, "edge-42").unwrap();
    assert_eq!(dev["authentication"]["type"], "certificateAuthority");

    // Without the intermediate the chain does not reach the enrolled root.
    let bare = ClientIdentity {
        leaf: leaf.clone(),
        chain: vec![],
    };
    let a = register(&emu, "edge-42", None, Some(&bare)).await;
    assert_dps_error(&a, StatusCode::UNAUTHORIZED, 401_002);
    // CN mismatch: valid chain, but registering under another ID.
    let a = register(&emu, "edge-43", None, Some(&with_chain)).await;
    assert_dps_error(&a, StatusCode::UNAUTHORIZED, 401_002);
    // Leaf from an unknown CA.
    let foreign = ClientIdentity {
        leaf: other_ca.issue_client("edge-44").unwrap(),
        chain: vec![],
    };
    let a = register(&emu, "edge-44", None, Some(&foreign)).await;
    assert_dps_error(&a, StatusCode::UNAUTHORIZED, 401_002);
    // Expired leaf from the right CA.
    let expired = ClientIdentity {
        leaf: inter
            .issue_client_with_validity("edge-45", (-7200, -60))
            .unwrap(),
        chain: vec![inter.ca.cert.clone()],
    };
    let a = register(&emu, "edge-45", None, Some(&expired)).await;
    assert_dps_error(&a, StatusCode::UNAUTHORIZED, 401_002);
    emu.shutdown().await;
}

#[tokio::test]
async fn request_validation_errors() {
    let key = common::random_key();
    let mut cfg = test_config();
    cfg.individual_enrollments
        .push(sym_individual("dev-v", &key));
    let emu = cloud_emulator::start(cfg).await.unwrap();
    let token = dps_token(&emu, "dev-v", &key);
    let send = |path: String, body: Option<Value>| {
        let mut r = Req::new(Method::PUT, path).auth(token.clone());
        if let Some(b) = body {
            r = r.json(b);
        }
        https(emu.https_addr(), emu.ca_cert_path(), None, r)
    };
    // registrationId mismatch with the path.
    let a = send(
        register_path(&emu, "dev-v"),
        Some(json!({"registrationId": "x"})),
    )
    .await;
    assert_dps_error(&a, StatusCode::BAD_REQUEST, 400_005);
    // Missing body.
    let a = send(register_path(&emu, "dev-v"), None).await;
    assert_dps_error(&a, StatusCode::BAD_REQUEST, 400_004);
    // Missing / unknown api-version.
    let base = format!("/{}/registrations/dev-v/register", emu.id_scope());
    let a = send(base.clone(), Some(json!({"registrationId": "dev-v"}))).await;
    assert_dps_error(&a, StatusCode::BAD_REQUEST, 400_001);
    let a = send(
        format!("{base}?api-version=1999-01-01"),
        Some(json!({"registrationId": "dev-v"})),
    )
    .await;
    assert_dps_error(&a, StatusCode::BAD_REQUEST, 400_001);
    // Unknown scope.
    let a = send(
        format!("/0neFFFFFFFF/registrations/dev-v/register?{API}"),
        Some(json!({"registrationId": "dev-v"})),
    )
    .await;
    assert_dps_error(&a, StatusCode::NOT_FOUND, 404_001);
    // Unknown operation.
    let a = poll(&emu, "dev-v", "4.nope", Some(&token), None).await;
    assert_dps_error(&a, StatusCode::NOT_FOUND, 404_002);
    // Operation of another registration ID is not visible.
    let ok = register(&emu, "dev-v", Some(&token), None).await;
    let op = ok.json["operationId"].as_str().unwrap();
    let mut cfg_other = sym_individual("dev-w", &key);
    cfg_other.device_id = None;
    emu.control().add_individual_enrollment(cfg_other).unwrap();
    let a = poll(
        &emu,
        "dev-w",
        op,
        Some(&dps_token(&emu, "dev-w", &key)),
        None,
    )
    .await;
    assert_dps_error(&a, StatusCode::NOT_FOUND, 404_002);
    // Wrong method.
    let a = https(
        emu.https_addr(),
        emu.ca_cert_path(),
        None,
        Req::new(Method::GET, register_path(&emu, "dev-v")).auth(token.clone()),
    )
    .await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(a.headers["allow"], "PUT");
    emu.shutdown().await;
}

#[tokio::test]
async fn failed_registrations_and_hub_reassignment() {
    let key = common::random_key();
    let mut cfg = test_config();
    cfg.assigning_polls = 0;
    cfg.individual_enrollments
        .push(sym_individual("dev-f", &key));
    let emu = cloud_emulator::start(cfg).await.unwrap();
    let token = dps_token(&emu, "dev-f", &key);

    emu.control()
        .patch_settings(SettingsPatch {
            fail_registrations: Some(Some(FailSpec::default())),
            ..SettingsPatch::default()
        })
        .unwrap();
    let p = provision(&emu, "dev-f", Some(&token), None).await;
    assert_eq!(p.status, StatusCode::OK);
    assert_eq!(p.json["status"], "failed");
    assert_eq!(p.json["registrationState"]["status"], "failed");
    assert_eq!(p.json["registrationState"]["errorCode"], 400_209);
    assert!(emu.control().device(None, "dev-f").is_none());

    // Clear the failure (JSON null over the admin API) and move DPS to a second hub name.
    let new_hub = format!("127.0.0.1:{}", emu.https_addr().port());
    let a = admin(
        emu.admin_addr(),
        Req::new(Method::PATCH, "/settings")
            .json(json!({ "fail_registrations": null, "assigned_hub": new_hub })),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json["assigned_hub"], json!(new_hub));
    let p = provision(&emu, "dev-f", Some(&token), None).await;
    assert_eq!(p.json["status"], "assigned");
    assert_eq!(p.json["registrationState"]["assignedHub"], json!(new_hub));
    assert!(emu.control().device(Some(&new_hub), "dev-f").is_some());
    assert!(emu.control().device(None, "dev-f").is_none());

    // The device authenticates against the new hub by its host name.
    let hub_token = sas(&format!("{new_hub}/devices/dev-f"), &key, now() + 60, None);
    let a = https(
        emu.https_addr(),
        emu.ca_cert_path(),
        None,
        Req::new(Method::GET, "/devices/dev-f?api-version=2021-04-12")
            .host(new_hub.clone())
            .auth(hub_token),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.json);
    assert_eq!(a.json["deviceId"], "dev-f");
    emu.shutdown().await;
}

#[tokio::test]
async fn fault_injection_429_and_503_with_retry_after() {
    let key = common::random_key();
    let mut cfg = test_config();
    cfg.individual_enrollments
        .push(sym_individual("dev-t", &key));
    let emu = cloud_emulator::start(cfg).await.unwrap();
    let token = dps_token(&emu, "dev-t", &key);

    // Over the admin API: the next two DPS requests get 429 with Retry-After: 7.
    let a = admin(
        emu.admin_addr(),
        Req::new(Method::POST, "/faults").json(json!({
            "target": "dps", "status": 429, "count": 2, "retry_after_secs": 7
        })),
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    emu.control()
        .add_fault(FaultSpec {
            target: Target::Dps,
            status: 503,
            count: 1,
            retry_after_secs: Some(2),
        })
        .unwrap();
    for _ in 0..2 {
        let a = register(&emu, "dev-t", Some(&token), None).await;
        assert_dps_error(&a, StatusCode::TOO_MANY_REQUESTS, 429_001);
        assert_eq!(a.retry_after(), Some(7));
    }
    let a = register(&emu, "dev-t", Some(&token), None).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.retry_after(), Some(2));
    let a = register(&emu, "dev-t", Some(&token), None).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);

    // The log (read over the admin API) has timestamps and marks the faults.
    let log = admin(emu.admin_addr(), Req::new(Method::GET, "/requests")).await;
    let entries = log.json.as_array().unwrap();
    assert_eq!(entries.len(), 4);
    let faults: Vec<bool> = entries.iter().map(|e| e["fault"] == true).collect();
    assert_eq!(faults, [true, true, true, false]);
    assert_eq!(entries[0]["retry_after"], 7);
    assert_eq!(entries[0]["service"], "dps");
    assert!(entries[3]["time_ms"].as_u64().unwrap() >= entries[0]["time_ms"].as_u64().unwrap());
    let since = entries[2]["seq"].as_u64().unwrap();
    let tail = admin(
        emu.admin_addr(),
        Req::new(Method::GET, format!("/requests?since={since}")),
    )
    .await;
    assert_eq!(tail.json.as_array().unwrap().len(), 1);

    // Hub faults use the hub error shape.
    emu.control()
        .add_fault(FaultSpec {
            target: Target::Hub,
            status: 429,
            count: 1,
            retry_after_secs: Some(3),
        })
        .unwrap();
    let a = https(
        emu.https_addr(),
        emu.ca_cert_path(),
        None,
        Req::new(Method::GET, "/devices/x?api-version=2021-04-12"),
    )
    .await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.retry_after(), Some(3));
    assert!(a.json["Message"]
        .as_str()
        .unwrap()
        .starts_with("ErrorCode:ThrottlingException;"));
    emu.shutdown().await;
}

#[tokio::test]
async fn slow_replies() {
    let key = common::random_key();
    let mut cfg: Config = test_config();
    cfg.individual_enrollments
        .push(sym_individual("dev-s", &key));
    let emu = cloud_emulator::start(cfg).await.unwrap();
    emu.control()
        .patch_settings(SettingsPatch {
            dps_delay_ms: Some(400),
            ..SettingsPatch::default()
        })
        .unwrap();
    let start = Instant::now();
    let a = register(&emu, "dev-s", Some(&dps_token(&emu, "dev-s", &key)), None).await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    assert!(start.elapsed().as_millis() >= 400, "{:?}", start.elapsed());
    emu.shutdown().await;
}
