//! DPS TPM attestation against a real software TPM (swtpm) driven with tpm2-tools: the
//! emulator's `authenticationKey` blob is activated and imported by the TPM exactly as the
//! reference tpmd does (ActivateCredential with SRK + EK under a PolicySecret(endorsement)
//! session, then Import under the SRK), and the TPM-held HMAC key signs the SAS tokens DPS and
//! the hub accept. This proves the blob's byte layout and cryptography, not just its shape.

// Helpers outside #[test] fns are still test code: unwrap is the right failure mode here.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use cloud_emulator::{Attestation, IndividualEnrollment, RunningEmulator};
use common::{admin, https, now, pct, test_config, Answer, Req};
use http::{Method, StatusCode};
use serde_json::{json, Value};

const API: &str = "api-version=2021-06-01";
const EK_HANDLE: &str = "0x81010001";
const SRK_HANDLE: &str = "0x81000001";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// The shared harness's swtpm with what these tests do on it (provisioning as the reference
/// tpmd expects, the reference's import with tpm2-tools, HMAC in the TPM).
use system_tests::Swtpm;

trait TestTpm {
    fn start_provisioned() -> Swtpm;
    fn provision(&self);
    fn ek(&self) -> Vec<u8>;
    fn srk(&self) -> Vec<u8>;
    fn import_auth_key(&self, blob: &[u8], tag: &str) -> String;
    fn hmac(&self, key_ctx: &str, data: &[u8]) -> Vec<u8>;
    fn sas(&self, key_ctx: &str, resource: &str, skn: Option<&str>) -> String;
}

impl TestTpm for Swtpm {
    fn start_provisioned() -> Swtpm {
        let tpm = Swtpm::start();
        tpm.provision();
        tpm
    }

    /// EK (TCG RSA template) at 0x81010001 and an RSA-2048 / AES-128-CFB storage primary at
    /// 0x81000001, as the reference tpmd creates them.
    fn provision(&self) {
        self.tool(&[
            "tpm2_createek",
            "-c",
            EK_HANDLE,
            "-G",
            "rsa",
            "-u",
            "ek.pub",
        ]);
        self.flush_transient();
        self.tool(&[
            "tpm2_createprimary",
            "-C",
            "o",
            "-g",
            "sha256",
            "-G",
            "rsa2048:aes128cfb",
            "-a",
            "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt",
            "-c",
            "srk.ctx",
        ]);
        self.tool(&["tpm2_evictcontrol", "-C", "o", "-c", "srk.ctx", SRK_HANDLE]);
        self.flush_transient();
    }

    fn ek(&self) -> Vec<u8> {
        self.read_public(EK_HANDLE, "tss")
    }

    fn srk(&self) -> Vec<u8> {
        self.read_public(SRK_HANDLE, "tss")
    }

    /// Does what the reference tpmd's `import_auth_key` does with an `authenticationKey`,
    /// with tpm2-tools: ActivateCredential(SRK, EK) under PolicySecret(endorsement) gives the
    /// inner key, Import under the SRK with it, Load. Returns the loaded key's context file.
    fn import_auth_key(&self, blob: &[u8], tag: &str) -> String {
        self.flush_transient();
        let parts = split_tpm2b(blob);
        assert_eq!(parts.len(), 5, "authenticationKey is five TPM2B structures");
        // tpm2-tools' credential file: magic, version, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
        let mut cred = vec![0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1];
        cred.extend_from_slice(&parts[0]);
        cred.extend_from_slice(&parts[1]);
        let f = |n: &str| format!("{tag}.{n}");
        std::fs::write(self.path(&f("cred")), cred).unwrap();
        std::fs::write(self.path(&f("dup")), &parts[2]).unwrap();
        std::fs::write(self.path(&f("seed")), &parts[3]).unwrap();
        std::fs::write(self.path(&f("pub")), &parts[4]).unwrap();

        self.tool(&[
            "tpm2_startauthsession",
            "--policy-session",
            "-S",
            &f("session"),
        ]);
        self.tool(&["tpm2_policysecret", "-S", &f("session"), "-c", "e"]);
        self.tool(&[
            "tpm2_activatecredential",
            "-c",
            SRK_HANDLE,
            "-C",
            EK_HANDLE,
            "-P",
            &format!("session:{}", f("session")),
            "-i",
            &f("cred"),
            "-o",
            &f("k"),
        ]);
        self.tool(&["tpm2_flushcontext", &f("session")]);
        assert_eq!(
            std::fs::read(self.path(&f("k"))).unwrap().len(),
            16,
            "the credential is the AES-128 inner wrapping key"
        );
        self.tool(&[
            "tpm2_import",
            "-C",
            SRK_HANDLE,
            "-u",
            &f("pub"),
            "-i",
            &f("dup"),
            "-s",
            &f("seed"),
            "-k",
            &f("k"),
            "-r",
            &f("priv"),
        ]);
        self.tool(&[
            "tpm2_load",
            "-C",
            SRK_HANDLE,
            "-u",
            &f("pub"),
            "-r",
            &f("priv"),
            "-c",
            &f("ctx"),
        ]);
        f("ctx")
    }

    /// HMAC-SHA256 of `data` inside the TPM with a loaded key.
    fn hmac(&self, key_ctx: &str, data: &[u8]) -> Vec<u8> {
        // Each tool run leaves the object it loaded from a context file in the TPM.
        self.flush_transient();
        std::fs::write(self.path("hmac.in"), data).unwrap();
        self.tool(&[
            "tpm2_hmac",
            "-c",
            key_ctx,
            "-g",
            "sha256",
            "-o",
            "hmac.out",
            "hmac.in",
        ]);
        std::fs::read(self.path("hmac.out")).unwrap()
    }

    /// A SAS token for `resource` signed inside the TPM (spec 9.1).
    fn sas(&self, key_ctx: &str, resource: &str, skn: Option<&str>) -> String {
        let sr = pct(&resource.to_lowercase());
        let se = now() + 600;
        let sig = b64(&self.hmac(key_ctx, format!("{sr}\n{se}").as_bytes()));
        let mut t = format!("SharedAccessSignature sr={sr}&sig={}&se={se}", pct(&sig));
        if let Some(skn) = skn {
            t.push_str(&format!("&skn={skn}"));
        }
        t
    }
}

/// Splits concatenated TPM2B structures (each kept with its size field), independently of
/// the emulator's own code.
fn split_tpm2b(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= 2, "truncated TPM2B");
        let n = usize::from(u16::from_be_bytes([b[0], b[1]]));
        assert!(b.len() >= 2 + n, "truncated TPM2B");
        out.push(b[..2 + n].to_vec());
        b = &b[2 + n..];
    }
    out
}

fn register_path(emu: &RunningEmulator, reg: &str) -> String {
    format!("/{}/registrations/{reg}/register?{API}", emu.id_scope())
}

/// The first, unauthenticated TPM register (what the reference client sends).
async fn tpm_register(emu: &RunningEmulator, reg: &str, ek: &[u8], srk: &[u8]) -> Answer {
    let req = Req::new(Method::PUT, register_path(emu, reg)).json(json!({
        "registrationId": reg,
        "tpm": { "endorsementKey": b64(ek), "storageRootKey": b64(srk) },
    }));
    https(emu.https_addr(), emu.ca_cert_path(), None, req).await
}

async fn add_tpm_enrollment(emu: &RunningEmulator, reg: &str, ek: &[u8]) {
    let a = admin(
        emu.admin_addr(),
        Req::new(Method::POST, "/enrollments/individual").json(json!({
            "registration_id": reg,
            "device_id": format!("{reg}-device"),
            "attestation": { "type": "tpm", "endorsement_key": b64(ek) },
        })),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.json);
}

/// SAS-signed register, then polls until the final answer.
async fn register_and_poll(emu: &RunningEmulator, reg: &str, token: &str) -> Value {
    let req = Req::new(Method::PUT, register_path(emu, reg))
        .auth(token)
        .json(json!({ "registrationId": reg }));
    let a = https(emu.https_addr(), emu.ca_cert_path(), None, req).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.json);
    let op = a.json["operationId"].as_str().unwrap().to_string();
    let path = format!(
        "/{}/registrations/{reg}/operations/{op}?{API}",
        emu.id_scope()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let req = Req::new(Method::GET, path.as_str()).auth(token);
        let a = https(emu.https_addr(), emu.ca_cert_path(), None, req).await;
        match a.status {
            StatusCode::OK => return a.json,
            StatusCode::ACCEPTED => {}
            s => panic!("poll: {s} {:?}", a.json),
        }
        assert!(Instant::now() < deadline, "DPS operation did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn tpm_registration_end_to_end_on_swtpm() {
    let tpm = Swtpm::start_provisioned();
    let ek = tpm.ek();
    let srk = tpm.srk();
    assert_eq!(
        u16::from_be_bytes([ek[0], ek[1]]) as usize,
        ek.len() - 2,
        "tpm2_readpublic -f tss writes a TPM2B_PUBLIC"
    );
    // The emulator computes the SRK's name as the TPM does (MakeCredential binds to it).
    let parsed = cloud_emulator::tpm::Public::parse(&srk, "srk").unwrap();
    assert_eq!(parsed.name(), tpm.name(SRK_HANDLE));

    let emu = cloud_emulator::start(test_config()).await.unwrap();
    let reg = "tpm-dev1";
    add_tpm_enrollment(&emu, reg, &ek).await;

    // Step 1: no Authorization, EK + SRK → 401 with the authentication key.
    let a = tpm_register(&emu, reg, &ek, &srk).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{:?}", a.json);
    let blob = unb64(
        a.json["authenticationKey"]
            .as_str()
            .expect("authenticationKey"),
    );
    let key1 = tpm.import_auth_key(&blob, "first");

    // Step 2: SAS signed inside the TPM → assigned, with a fresh blob for the same key.
    let scope = emu.id_scope().to_string();
    let token = tpm.sas(
        &key1,
        &format!("{scope}/registrations/{reg}"),
        Some("registration"),
    );
    let done = register_and_poll(&emu, reg, &token).await;
    assert_eq!(done["status"], "assigned", "{done:?}");
    let rs = &done["registrationState"];
    assert_eq!(rs["deviceId"], format!("{reg}-device"));
    assert_eq!(rs["assignedHub"], emu.hub_hostname());
    let blob2 = unb64(
        rs["tpm"]["authenticationKey"]
            .as_str()
            .expect("registrationState.tpm.authenticationKey"),
    );
    assert_ne!(blob2, blob, "the assigned-state blob is freshly wrapped");
    let key2 = tpm.import_auth_key(&blob2, "assigned");
    let probe = b"same key?";
    let mac1 = tpm.hmac(&key1, probe);
    assert_eq!(
        tpm.hmac(&key2, probe),
        mac1,
        "the assigned-state blob carries the same HMAC key"
    );

    // The emulator recorded the EK and SRK it saw, byte-identical to what the TPM reports.
    let regs = admin(emu.admin_addr(), Req::new(Method::GET, "/registrations")).await;
    let rec = regs
        .json
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["registration_id"] == reg);
    let rec = rec.expect("registration record");
    assert_eq!(rec["tpm"]["endorsement_key"], b64(&tpm.ek()));
    assert_eq!(rec["tpm"]["storage_root_key"], b64(&tpm.srk()));
    let log = admin(emu.admin_addr(), Req::new(Method::GET, "/requests")).await;
    let first = &log.json.as_array().unwrap()[0];
    assert_eq!(first["status"], 401);
    assert_eq!(first["tpm"]["endorsement_key"], b64(&ek));

    // The hub device authenticates with the TPM key: a device SAS signed in the TPM works.
    let device = format!("{reg}-device");
    let hub_token = tpm.sas(
        &key2,
        &format!("{}/devices/{device}", emu.hub_hostname()),
        None,
    );
    let req = Req::new(
        Method::GET,
        format!("/devices/{device}/modules?api-version=2020-09-30"),
    )
    .auth(hub_token);
    let a = https(emu.https_addr(), emu.ca_cert_path(), None, req).await;
    assert_eq!(a.status, StatusCode::OK, "hub: {:?}", a.json);
    let dev = admin(
        emu.admin_addr(),
        Req::new(Method::GET, format!("/devices/{device}")),
    )
    .await;
    let primary = unb64(
        dev.json["authentication"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap(),
    );
    assert_eq!(
        common::hmac(&primary, probe),
        mac1,
        "the hub device's primary key is the TPM's HMAC key"
    );

    // A token signed with some other key is refused.
    let forged = common::sas(
        &format!("{scope}/registrations/{reg}"),
        &common::random_key(),
        now() + 600,
        Some("registration"),
    );
    let req = Req::new(Method::PUT, register_path(&emu, reg))
        .auth(forged)
        .json(json!({ "registrationId": reg }));
    let a = https(emu.https_addr(), emu.ca_cert_path(), None, req).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    // Reprovisioning starts over: a new challenge issues a new key; the old one stops working.
    let a = tpm_register(&emu, reg, &ek, &srk).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let blob3 = unb64(a.json["authenticationKey"].as_str().unwrap());
    let key3 = tpm.import_auth_key(&blob3, "third");
    assert_ne!(
        tpm.hmac(&key3, probe),
        mac1,
        "a new challenge issues a new key"
    );
    let req = Req::new(Method::PUT, register_path(&emu, reg))
        .auth(token)
        .json(json!({ "registrationId": reg }));
    let a = https(emu.https_addr(), emu.ca_cert_path(), None, req).await;
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "old key no longer accepted"
    );
    let token3 = tpm.sas(
        &key3,
        &format!("{scope}/registrations/{reg}"),
        Some("registration"),
    );
    let done = register_and_poll(&emu, reg, &token3).await;
    assert_eq!(
        done["registrationState"]["substatus"],
        "reprovisionedToInitialAssignment"
    );
    emu.shutdown().await;
}

#[tokio::test]
async fn wrong_or_missing_tpm_enrollment_is_a_clear_dps_error() {
    let tpm = Swtpm::start_provisioned();
    let ek = tpm.ek();
    let srk = tpm.srk();
    let emu = cloud_emulator::start(test_config()).await.unwrap();

    // Enrolled with another real TPM public key (the SRK) than the device's EK.
    add_tpm_enrollment(&emu, "wrong-ek", &srk).await;
    let a = tpm_register(&emu, "wrong-ek", &ek, &srk).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.json.get("authenticationKey").is_none(), "{:?}", a.json);
    assert_eq!(a.json["errorCode"], 401_003);
    let msg = a.json["message"].as_str().unwrap();
    assert!(msg.contains("endorsement key does not match"), "{msg}");

    // No enrollment at all.
    let a = tpm_register(&emu, "nobody", &ek, &srk).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.json.get("authenticationKey").is_none());
    assert_eq!(a.json["errorCode"], 401_002);
    assert!(a.json["message"]
        .as_str()
        .unwrap()
        .contains("no enrollment"));

    // An enrollment with another attestation type.
    emu.control()
        .add_individual_enrollment(IndividualEnrollment {
            registration_id: "sas-dev".into(),
            device_id: None,
            assigned_hub: None,
            payload: None,
            iot_edge: false,
            attestation: Attestation::SymmetricKey {
                primary_key: common::random_key(),
                secondary_key: None,
            },
        })
        .unwrap();
    let a = tpm_register(&emu, "sas-dev", &ek, &srk).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.json["message"]
        .as_str()
        .unwrap()
        .contains("does not use TPM"));

    // Keys that are not TPM public areas → 400 naming the field.
    let a = tpm_register(&emu, "wrong-ek", b"not a key", &srk).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.json["message"]
        .as_str()
        .unwrap()
        .contains("tpm.endorsementKey"));

    // A SAS token before any challenge has nothing to verify against.
    let token = common::sas(
        &format!("{}/registrations/wrong-ek", emu.id_scope()),
        &common::random_key(),
        now() + 600,
        Some("registration"),
    );
    let req = Req::new(Method::PUT, register_path(&emu, "wrong-ek"))
        .auth(token)
        .json(json!({ "registrationId": "wrong-ek" }));
    let a = https(emu.https_addr(), emu.ca_cert_path(), None, req).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    // The failures are in the request log with the EK the device sent.
    let log = admin(emu.admin_addr(), Req::new(Method::GET, "/requests")).await;
    let first = &log.json.as_array().unwrap()[0];
    assert_eq!(first["auth_ok"], false);
    assert_eq!(first["tpm"]["endorsement_key"], b64(&ek));

    // Enrolling the right EK, given as a bare TPMT_PUBLIC, fixes it (compared by key, not text).
    emu.control()
        .add_individual_enrollment(IndividualEnrollment {
            registration_id: "wrong-ek".into(),
            device_id: None,
            assigned_hub: None,
            payload: None,
            iot_edge: false,
            attestation: Attestation::Tpm {
                endorsement_key: b64(&tpm.read_public(EK_HANDLE, "tpmt")),
            },
        })
        .unwrap();
    let a = tpm_register(&emu, "wrong-ek", &ek, &srk).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let blob = unb64(a.json["authenticationKey"].as_str().expect("key issued"));
    let key = tpm.import_auth_key(&blob, "fixed");
    let token = tpm.sas(
        &key,
        &format!("{}/registrations/wrong-ek", emu.id_scope()),
        Some("registration"),
    );
    let done = register_and_poll(&emu, "wrong-ek", &token).await;
    assert_eq!(done["status"], "assigned");

    // A SAS-signed register may repeat the TPM keys (as the C SDK does): the EK must still be
    // the one the key was issued to.
    let signed = |ek: &[u8]| {
        Req::new(Method::PUT, register_path(&emu, "wrong-ek"))
            .auth(token.clone())
            .json(json!({
                "registrationId": "wrong-ek",
                "tpm": { "endorsementKey": b64(ek), "storageRootKey": b64(&srk) },
            }))
    };
    let a = https(emu.https_addr(), emu.ca_cert_path(), None, signed(&srk)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json["errorCode"], 401_003);
    let a = https(emu.https_addr(), emu.ca_cert_path(), None, signed(&ek)).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{:?}", a.json);
    emu.shutdown().await;
}

#[tokio::test]
async fn invalid_tpm_enrollment_is_refused() {
    let emu = cloud_emulator::start(test_config()).await.unwrap();
    for ek in ["%%%", "AAAA", ""] {
        let a = admin(
            emu.admin_addr(),
            Req::new(Method::POST, "/enrollments/individual").json(json!({
                "registration_id": "bad",
                "attestation": { "type": "tpm", "endorsement_key": ek },
            })),
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{ek:?}: {:?}", a.json);
        assert!(a.json["message"]
            .as_str()
            .unwrap()
            .contains("endorsement_key"));
    }
    emu.shutdown().await;
}
