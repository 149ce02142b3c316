//! IoT Hub module identity REST over real HTTPS: CRUD with generation IDs and etags, device
//! authentication by SAS and X.509, api-version checks; plus the admin API and the binary.

mod common;

use cloud_emulator::{
    pki::{self_signed_client, TestCa},
    DeviceAuthSpec, DeviceSpec, RunningEmulator,
};
use common::{admin, https, now, sas, test_config, Answer, ClientIdentity, Req};
use http::{Method, StatusCode};
use serde_json::json;

const API: &str = "api-version=2017-11-08-preview";

struct Dev<'a> {
    emu: &'a RunningEmulator,
    token: String,
}

impl Dev<'_> {
    async fn call(
        &self,
        method: Method,
        path: &str,
        if_match: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> Answer {
        let mut r = Req::new(method, format!("{path}?{API}")).auth(self.token.clone());
        if let Some(m) = if_match {
            r = r.header("if-match", m);
        }
        if let Some(b) = body {
            r = r.json(b);
        }
        https(self.emu.https_addr(), self.emu.ca_cert_path(), None, r).await
    }
}

fn hub_code(a: &Answer) -> String {
    let msg = a.json["Message"].as_str().unwrap_or_default();
    assert!(
        a.json["ExceptionMessage"]
            .as_str()
            .is_some_and(|s| s.starts_with("Tracking ID:")),
        "{:?}",
        a.json
    );
    msg.strip_prefix("ErrorCode:")
        .and_then(|s| s.split(';').next())
        .unwrap_or_default()
        .to_string()
}

async fn sas_device(emu: &RunningEmulator, id: &str) -> String {
    let key = common::random_key();
    emu.control()
        .add_device(DeviceSpec {
            hub: None,
            device_id: id.into(),
            iot_edge: true,
            authentication: DeviceAuthSpec::Sas {
                primary_key: Some(key.clone()),
                secondary_key: None,
            },
        })
        .expect("add device");
    key
}

fn device_token(emu: &RunningEmulator, id: &str, key: &str) -> String {
    sas(
        &format!("{}/devices/{id}", emu.hub_hostname()),
        key,
        now() + 300,
        None,
    )
}

#[tokio::test]
async fn module_crud_generation_and_etag() {
    let emu = cloud_emulator::start(test_config()).await.unwrap();
    let key = sas_device(&emu, "d1").await;
    let dev = Dev {
        emu: &emu,
        token: device_token(&emu, "d1", &key),
    };
    let m1 = "/devices/d1/modules/m1";

    // Create without authentication: keys generated, 18-digit generation ID.
    let c = dev
        .call(
            Method::PUT,
            m1,
            None,
            Some(json!({"moduleId": "m1", "deviceId": "d1"})),
        )
        .await;
    assert_eq!(c.status, StatusCode::OK, "{:?}", c.json);
    let gen = c.json["generationId"].as_str().unwrap().to_string();
    assert_eq!(gen.len(), 18);
    assert!(gen.bytes().all(|b| b.is_ascii_digit()));
    let etag1 = c.json["etag"].as_str().unwrap().to_string();
    assert_eq!(c.json["authentication"]["type"], "sas");
    let generated = c.json["authentication"]["symmetricKey"]["primaryKey"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(common::unb64_len(&generated), 32);
    assert_eq!(c.json["connectionState"], "Disconnected");

    // Create again → 409.
    let c2 = dev
        .call(
            Method::PUT,
            m1,
            None,
            Some(json!({"moduleId": "m1", "deviceId": "d1"})),
        )
        .await;
    assert_eq!(c2.status, StatusCode::CONFLICT);
    assert_eq!(hub_code(&c2), "ModuleAlreadyExistsOnDevice");

    // Get and list.
    let g = dev.call(Method::GET, m1, None, None).await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.json["generationId"], json!(gen));
    let l = dev
        .call(Method::GET, "/devices/d1/modules", None, None)
        .await;
    assert_eq!(l.json.as_array().unwrap().len(), 1);

    // Update with If-Match: * and explicit keys: generation kept, etag changes, keys stored.
    let pk = common::random_key();
    let sk = common::random_key();
    let u = dev
        .call(
            Method::PUT,
            m1,
            Some("*"),
            Some(
                json!({"moduleId": "m1", "deviceId": "d1", "authentication": {
                "type": "sas", "symmetricKey": {"primaryKey": pk, "secondaryKey": sk}}}),
            ),
        )
        .await;
    assert_eq!(u.status, StatusCode::OK, "{:?}", u.json);
    assert_eq!(u.json["generationId"], json!(gen));
    let etag2 = u.json["etag"].as_str().unwrap().to_string();
    assert_ne!(etag2, etag1);
    assert_eq!(
        u.json["authentication"]["symmetricKey"]["primaryKey"],
        json!(pk)
    );
    assert_eq!(
        emu.control().modules(None, "d1").unwrap()[0]["authentication"]["symmetricKey"]
            ["secondaryKey"],
        json!(sk)
    );

    // Stale etag → 412; current etag (quoted) → 200.
    let stale = dev
        .call(
            Method::PUT,
            m1,
            Some(&format!("\"{etag1}\"")),
            Some(json!({"moduleId": "m1"})),
        )
        .await;
    assert_eq!(stale.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(hub_code(&stale), "PreconditionFailed");
    let fresh = dev
        .call(
            Method::PUT,
            m1,
            Some(&format!("\"{etag2}\"")),
            Some(json!({"moduleId": "m1", "managedBy": "iotedge"})),
        )
        .await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(fresh.json["managedBy"], "iotedge");
    // Update of a missing module → 404.
    let missing = dev
        .call(
            Method::PUT,
            "/devices/d1/modules/nope",
            Some("*"),
            Some(json!({})),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(hub_code(&missing), "ModuleNotFound");

    // Delete: stale etag → 412, no If-Match → 204, then 404.
    let d = dev.call(Method::DELETE, m1, Some("\"bogus\""), None).await;
    assert_eq!(d.status, StatusCode::PRECONDITION_FAILED);
    let d = dev.call(Method::DELETE, m1, None, None).await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    let g = dev.call(Method::GET, m1, None, None).await;
    assert_eq!(g.status, StatusCode::NOT_FOUND);
    assert_eq!(hub_code(&g), "ModuleNotFound");
    let d = dev.call(Method::DELETE, m1, Some("*"), None).await;
    assert_eq!(d.status, StatusCode::NOT_FOUND);

    // Re-create → new generation ID.
    let c3 = dev
        .call(
            Method::PUT,
            m1,
            None,
            Some(json!({"moduleId": "m1", "deviceId": "d1"})),
        )
        .await;
    assert_eq!(c3.status, StatusCode::OK);
    assert_ne!(c3.json["generationId"], json!(gen));

    // `$` module names: sent raw or as %24, same module.
    let e = dev
        .call(
            Method::PUT,
            "/devices/d1/modules/$edgeAgent",
            None,
            Some(json!({"moduleId": "$edgeAgent", "deviceId": "d1"})),
        )
        .await;
    assert_eq!(e.status, StatusCode::OK, "{:?}", e.json);
    let e2 = dev
        .call(Method::GET, "/devices/d1/modules/%24edgeAgent", None, None)
        .await;
    assert_eq!(e2.status, StatusCode::OK);
    assert_eq!(e2.json["moduleId"], "$edgeAgent");

    // Body must match the path.
    let bad = dev
        .call(
            Method::PUT,
            "/devices/d1/modules/m9",
            None,
            Some(json!({"moduleId": "other"})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(hub_code(&bad), "ArgumentInvalid");
    let bad = dev
        .call(
            Method::PUT,
            "/devices/d1/modules/m9",
            None,
            Some(json!({"moduleId": "m9", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "short"}}})),
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    emu.shutdown().await;
}

#[tokio::test]
async fn hub_sas_authorization_and_api_version() {
    let emu = cloud_emulator::start(test_config()).await.unwrap();
    let key = sas_device(&emu, "d2").await;
    let other_key = sas_device(&emu, "d3").await;
    let hub = emu.hub_hostname().to_string();
    let get = |token: Option<String>, path: &str| {
        let mut r = Req::new(Method::GET, path.to_string());
        if let Some(t) = token {
            r = r.auth(t);
        }
        https(emu.https_addr(), emu.ca_cert_path(), None, r)
    };
    let list = format!("/devices/d2/modules?{API}");

    // Device token (audience = device) covers the modules path; module-scoped also works.
    let a = get(Some(device_token(&emu, "d2", &key)), &list).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.json);
    let a = get(
        Some(sas(
            &format!("{hub}/devices/d2/modules"),
            &key,
            now() + 60,
            None,
        )),
        &list,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let a = get(
        Some(device_token(&emu, "d2", &key)),
        &format!("/devices/d2?{API}"),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json["deviceId"], "d2");
    assert_eq!(a.json["authentication"]["type"], "sas");
    assert_eq!(a.json["capabilities"]["iotEdge"], true);

    let rejected = [
        (
            "other device's key",
            Some(device_token(&emu, "d2", &other_key)),
        ),
        (
            "other device's token",
            Some(device_token(&emu, "d3", &other_key)),
        ),
        (
            "expired",
            Some(sas(&format!("{hub}/devices/d2"), &key, now() - 1, None)),
        ),
        ("hub-wide audience", Some(sas(&hub, &key, now() + 60, None))),
        (
            "other hub",
            Some(sas("elsewhere.example/devices/d2", &key, now() + 60, None)),
        ),
        (
            "skn present",
            Some(sas(
                &format!("{hub}/devices/d2"),
                &key,
                now() + 60,
                Some("registration"),
            )),
        ),
        ("no credential", None),
    ];
    for (what, token) in rejected {
        let a = get(token, &list).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(hub_code(&a), "IotHubUnauthorizedAccess", "{what}");
    }

    // api-version: missing / unknown → 400; each accepted version works.
    let tok = device_token(&emu, "d2", &key);
    let a = get(Some(tok.clone()), "/devices/d2/modules").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(hub_code(&a), "ArgumentInvalid");
    let a = get(
        Some(tok.clone()),
        "/devices/d2/modules?api-version=2016-01-01",
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    for v in cloud_emulator::hub::HUB_API_VERSIONS {
        let a = get(
            Some(tok.clone()),
            &format!("/devices/d2/modules?api-version={v}"),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{v}");
    }
    // Unknown route / wrong method.
    let a = get(Some(tok.clone()), &format!("/devices/d2/twin/x?{API}")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = https(
        emu.https_addr(),
        emu.ca_cert_path(),
        None,
        Req::new(Method::POST, format!("/devices/d2/modules?{API}")).auth(tok),
    )
    .await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
    emu.shutdown().await;
}

#[tokio::test]
async fn hub_x509_self_signed_and_ca_devices() {
    let emu = cloud_emulator::start(test_config()).await.unwrap();
    let cert = self_signed_client("ss-dev").unwrap();
    let other = self_signed_client("ss-dev").unwrap();
    emu.control()
        .add_device(DeviceSpec {
            hub: None,
            device_id: "ss-dev".into(),
            iot_edge: false,
            authentication: DeviceAuthSpec::SelfSigned {
                primary_thumbprint: Some(cert.sha1_thumbprint()),
                secondary_thumbprint: None,
                cert_pem: None,
            },
        })
        .unwrap();
    let ca = TestCa::new("hub device CA").unwrap();
    // Added over the admin API, with the CA to trust.
    let a = admin(
        emu.admin_addr(),
        Req::new(Method::POST, "/devices").json(json!({
            "device_id": "ca-dev",
            "authentication": { "type": "certificate_authority", "ca_pem": ca.cert_pem() }
        })),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.json);
    assert_eq!(a.json["authentication"]["type"], "certificateAuthority");

    let call = |id: Option<ClientIdentity>, device: &'static str| {
        let emu = &emu;
        async move {
            https(
                emu.https_addr(),
                emu.ca_cert_path(),
                id.as_ref(),
                Req::new(Method::GET, format!("/devices/{device}/modules?{API}")),
            )
            .await
        }
    };
    let ident = |c: &cloud_emulator::pki::CertAndKey| {
        Some(ClientIdentity {
            leaf: c.clone(),
            chain: vec![],
        })
    };
    assert_eq!(call(ident(&cert), "ss-dev").await.status, StatusCode::OK);
    assert_eq!(
        call(ident(&other), "ss-dev").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(call(None, "ss-dev").await.status, StatusCode::UNAUTHORIZED);

    let good = ca.issue_client("ca-dev").unwrap();
    let wrong_cn = ca.issue_client("ca-dev-2").unwrap();
    let foreign = TestCa::new("x").unwrap().issue_client("ca-dev").unwrap();
    assert_eq!(call(ident(&good), "ca-dev").await.status, StatusCode::OK);
    assert_eq!(
        call(ident(&wrong_cn), "ca-dev").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        call(ident(&foreign), "ca-dev").await.status,
        StatusCode::UNAUTHORIZED
    );
    // A valid CA-signed cert does not authenticate as a self-signed device.
    assert_eq!(
        call(ident(&good), "ss-dev").await.status,
        StatusCode::UNAUTHORIZED
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn admin_api_round_trip() {
    let emu = cloud_emulator::start(test_config()).await.unwrap();
    let addr = emu.admin_addr();

    let info = admin(addr, Req::new(Method::GET, "/info")).await;
    assert_eq!(info.json["https"], json!(emu.https_addr().to_string()));
    assert_eq!(
        info.json["ca_cert"],
        json!(emu.ca_cert_path().display().to_string())
    );
    let pem = std::fs::read_to_string(emu.ca_cert_path()).unwrap();
    assert_eq!(pem, emu.ca_cert_pem());

    // Enrollments: add, list (no keys), delete, 404 on second delete.
    let key = common::random_key();
    let a = admin(
        addr,
        Req::new(Method::POST, "/enrollments/individual").json(json!({
            "registration_id": "r1",
            "device_id": "dev-r1",
            "attestation": { "type": "symmetric_key", "primary_key": key }
        })),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED);
    let a = admin(
        addr,
        Req::new(Method::POST, "/enrollments/groups").json(json!({
            "group_id": "g1",
            "attestation": { "type": "symmetric_key", "primary_key": key }
        })),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED);
    let list = admin(addr, Req::new(Method::GET, "/enrollments")).await;
    assert_eq!(list.json["individual"][0]["registration_id"], "r1");
    assert_eq!(list.json["groups"][0]["group_id"], "g1");
    assert!(
        !list.json.to_string().contains(&key),
        "keys must not be listed"
    );
    let a = admin(addr, Req::new(Method::DELETE, "/enrollments/groups/g1")).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let a = admin(addr, Req::new(Method::DELETE, "/enrollments/groups/g1")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);

    // Invalid input: bad base64 key → 400; wrong shape → 422; unknown route → 404.
    let a = admin(
        addr,
        Req::new(Method::POST, "/enrollments/individual").json(json!({
            "registration_id": "r2",
            "attestation": { "type": "symmetric_key", "primary_key": "not base64!" }
        })),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = admin(
        addr,
        Req::new(Method::POST, "/devices").json(json!({"nope": 1})),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(a.json["message"].is_string());
    let a = admin(addr, Req::new(Method::GET, "/bogus")).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);

    // Devices and modules as identityd would leave them.
    let dkey = sas_device(&emu, "d9").await;
    let dev = Dev {
        emu: &emu,
        token: device_token(&emu, "d9", &dkey),
    };
    let c = dev
        .call(
            Method::PUT,
            "/devices/d9/modules/hostmod",
            None,
            Some(json!({"moduleId": "hostmod", "deviceId": "d9"})),
        )
        .await;
    assert_eq!(c.status, StatusCode::OK);
    let devs = admin(addr, Req::new(Method::GET, "/devices")).await;
    let d9 = devs
        .json
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["deviceId"] == "d9")
        .unwrap()
        .clone();
    assert_eq!(d9["hub"], json!(emu.hub_hostname()));
    assert_eq!(d9["modules"][0]["moduleId"], "hostmod");
    let mods = admin(addr, Req::new(Method::GET, "/devices/d9/modules")).await;
    assert_eq!(mods.json[0]["generationId"], c.json["generationId"]);
    let a = admin(addr, Req::new(Method::DELETE, "/devices/d9")).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    // The removed device can no longer authenticate.
    let g = dev
        .call(Method::GET, "/devices/d9/modules", None, None)
        .await;
    assert_eq!(g.status, StatusCode::UNAUTHORIZED);
    let hubs = admin(addr, Req::new(Method::GET, "/hubs")).await;
    assert!(hubs
        .json
        .as_array()
        .unwrap()
        .contains(&json!(emu.hub_hostname())));

    // Request log clearing.
    assert!(!emu.control().requests().is_empty());
    let a = admin(addr, Req::new(Method::DELETE, "/requests")).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert!(emu.control().requests().is_empty());
    emu.shutdown().await;
}

#[tokio::test]
async fn binary_prints_ready_line_and_stops_on_sigterm() {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("out/ca.pem");
    let key = common::random_key();
    let cfg = dir.path().join("emu.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
            id_scope = "0ne00BIN"
            ca_cert_path = "out/ca.pem"
            assigning_polls = 0

            [[individual_enrollment]]
            registration_id = "bin-dev"
            attestation = {{ type = "symmetric_key", primary_key = "{key}" }}
            "#
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cloud-emulator"))
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).expect("ready line is JSON");
    assert_eq!(ready["ca_cert"], json!(ca_path.display().to_string()));
    assert_eq!(ready["id_scope"], "0ne00BIN");
    assert!(ca_path.exists());
    let https_addr: std::net::SocketAddr = ready["https"].as_str().unwrap().parse().unwrap();
    let admin_addr: std::net::SocketAddr = ready["admin"].as_str().unwrap().parse().unwrap();

    // Register over HTTPS against the binary, trusting the CA it wrote.
    let token = sas(
        "0ne00BIN/registrations/bin-dev",
        &key,
        now() + 60,
        Some("registration"),
    );
    let a = https(
        https_addr,
        &ca_path,
        None,
        Req::new(
            Method::PUT,
            "/0ne00BIN/registrations/bin-dev/register?api-version=2021-06-01",
        )
        .auth(token)
        .json(json!({"registrationId": "bin-dev"})),
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.json);
    let info = admin(admin_addr, Req::new(Method::GET, "/info")).await;
    assert_eq!(info.json["https"], ready["https"]);

    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn persistent_ca_and_second_listener() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || cloud_emulator::Config {
        pki_dir: Some(dir.path().join("pki")),
        hub_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    };
    let first = cloud_emulator::start(cfg()).await.unwrap();
    let first_pem = first.ca_cert_pem().to_string();
    assert_eq!(first.ca_cert_path(), dir.path().join("pki/ca.pem"));
    first.shutdown().await;
    assert!(dir.path().join("pki/ca.key").exists());

    // A second start loads the same CA instead of making a new one.
    let emu = cloud_emulator::start(cfg()).await.unwrap();
    assert_eq!(emu.ca_cert_pem(), first_pem);
    let key = sas_device(&emu, "d-two").await;
    // The extra listener serves the same hub (trusted through the persisted CA file).
    let hub_addr = emu.hub_https_addr().expect("second listener");
    assert_ne!(hub_addr, emu.https_addr());
    let a = https(
        hub_addr,
        emu.ca_cert_path(),
        None,
        Req::new(Method::GET, format!("/devices/d-two?{API}"))
            .host(emu.hub_hostname())
            .auth(device_token(&emu, "d-two", &key)),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.json);
    emu.shutdown().await;
}
