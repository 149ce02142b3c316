//! keyd's TPM service (the reference tpmd API on the tpmd socket) against a private swtpm: the
//! EK and SRK keyd creates are the ones tpm2-tools reads back, a key wrapped the way DPS wraps it
//! (the cloud emulator's builder) is activated and imported, the TPM's HMAC equals an
//! independent one with the key's bytes, the key survives a keyd restart, and bad requests and
//! other uids get clear errors.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{b64, Keyd};
use hmac::Mac;
use http::{Method, StatusCode};
use system_tests::Swtpm;

const FILE_CONFIG: &str = "[aziot_keys]\nhomedir_path = \"{home}\"\n";
const API: &str = "api-version=2020-09-01";

/// keyd with a tpmd configuration for TCTI `tcti` (socket `<tpmd dir>/tpmd.sock`), not started.
struct TpmKeyd {
    keyd: Keyd,
    tpmd_dir: tempfile::TempDir,
}

impl std::ops::Deref for TpmKeyd {
    type Target = Keyd;
    fn deref(&self) -> &Keyd {
        &self.keyd
    }
}

impl std::ops::DerefMut for TpmKeyd {
    fn deref_mut(&mut self) -> &mut Keyd {
        &mut self.keyd
    }
}

fn keyd_for(tcti: &str, extra: &str) -> TpmKeyd {
    let tpmd_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tpmd_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tpmd_config = tpmd_dir.path().join("tpmd.toml");
    std::fs::write(
        &tpmd_config,
        format!(
            "tcti = \"{tcti}\"\n{extra}\n[endpoints]\naziot_tpmd = \"unix://{}\"\n",
            tpmd_dir.path().join("tpmd.sock").display()
        ),
    )
    .unwrap();
    let env = vec![
        (
            "AZIOT_TPMD_CONFIG".into(),
            tpmd_config.display().to_string(),
        ),
        (
            "AZIOT_TPMD_CONFIG_DIR".into(),
            tpmd_dir.path().join("config.d").display().to_string(),
        ),
    ];
    TpmKeyd {
        keyd: Keyd::prepare(FILE_CONFIG, env),
        tpmd_dir,
    }
}

fn tpmd_socket(keyd: &TpmKeyd) -> std::path::PathBuf {
    keyd.tpmd_dir.path().join("tpmd.sock")
}

fn tpm_client(keyd: &TpmKeyd) -> key_api::tpm::TpmClient {
    key_api::tpm::TpmClient::from_uri(&format!("unix://{}", tpmd_socket(keyd).display())).unwrap()
}

async fn raw(keyd: &TpmKeyd, method: Method, path: &str, body: &str) -> (StatusCode, String) {
    let response = http_common::UdsClient::new(tpmd_socket(keyd))
        .send(
            method,
            path,
            &[("content-type", "application/json")],
            body.to_owned().into(),
        )
        .await
        .unwrap();
    (
        response.status,
        String::from_utf8_lossy(&response.body).into_owned(),
    )
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_keys_import_and_hmac_on_swtpm() {
    let tpm = Swtpm::start();
    let mut keyd = keyd_for(&tpm.tcti(), "");
    keyd.spawn();
    let client = tpm_client(&keyd);

    // Before any import: a clear 404.
    let error = client.sign_with_auth_key(b"x").await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("no TPM authentication key at 0x81000100"),
        "{error}"
    );

    // keyd created and persisted the EK and SRK.
    let keys = client.get_tpm_keys().await.unwrap();
    let again = client.get_tpm_keys().await.unwrap();
    assert_eq!(keys, again);

    // A key wrapped for this TPM the way DPS does it.
    let ek = cloud_emulator::tpm::Public::parse(&keys.endorsement_key, "ek").unwrap();
    let srk = cloud_emulator::tpm::Public::parse(&keys.storage_root_key, "srk").unwrap();
    let hmac_key: Vec<u8> = (0u8..32).map(|byte| byte.wrapping_mul(7)).collect();
    let blob = cloud_emulator::tpm::authentication_key_blob(&ek, &srk, &hmac_key).unwrap();
    client.import_auth_key(&blob).await.unwrap();
    let data = b"0ne00000001/registrations/tpm-device\n1767225600";
    let digest = client.sign_with_auth_key(data).await.unwrap();
    assert_eq!(digest, hmac_sha256(&hmac_key, data));

    // A second import replaces the key at the same handle.
    let second_key = vec![0x5a; 32];
    let blob = cloud_emulator::tpm::authentication_key_blob(&ek, &srk, &second_key).unwrap();
    client.import_auth_key(&blob).await.unwrap();
    assert_eq!(
        client.sign_with_auth_key(data).await.unwrap(),
        hmac_sha256(&second_key, data)
    );

    // A credential made for another TPM's EK is refused, and the current key stays.
    let other = Swtpm::start();
    let mut other_keyd = keyd_for(&other.tcti(), "");
    other_keyd.spawn();
    let other_keys = tpm_client(&other_keyd).get_tpm_keys().await.unwrap();
    other_keyd.stop();
    let other_ek = cloud_emulator::tpm::Public::parse(&other_keys.endorsement_key, "ek").unwrap();
    let foreign = cloud_emulator::tpm::authentication_key_blob(&other_ek, &srk, &hmac_key).unwrap();
    let (status, body) = raw(
        &keyd,
        Method::POST,
        &format!("/import_auth_key?{API}"),
        &format!("{{\"key\":\"{}\"}}", b64(&foreign)),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.contains("refused the authentication key's credential"),
        "{body}"
    );
    assert_eq!(
        client.sign_with_auth_key(data).await.unwrap(),
        hmac_sha256(&second_key, data)
    );

    // Malformed requests: clear 4xx JSON errors, keyd keeps serving.
    for (method, path, body, status, expected) in [
        (
            Method::POST,
            "/import_auth_key",
            r#"{"key":"AAEC"}"#,
            400,
            "ends before",
        ),
        (
            Method::POST,
            "/import_auth_key",
            r#"{"key":"%%%"}"#,
            400,
            "not valid base64",
        ),
        (
            Method::POST,
            "/import_auth_key",
            "",
            400,
            "missing request body",
        ),
        (
            Method::POST,
            "/sign_with_auth_key",
            r#"{"nope":1}"#,
            422,
            "data",
        ),
        (Method::GET, "/import_auth_key", "", 405, "method"),
        (Method::GET, "/nothing", "", 404, ""),
    ] {
        let (got, text) = raw(&keyd, method.clone(), &format!("{path}?{API}"), body).await;
        assert_eq!(got.as_u16(), status, "{method} {path}: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            json["message"].as_str().unwrap().contains(expected),
            "{method} {path}: {text}"
        );
    }
    let long = format!("{{\"data\":\"{}\"}}", b64(&[0u8; 1025]));
    let (status, text) = raw(
        &keyd,
        Method::POST,
        &format!("/sign_with_auth_key?{API}"),
        &long,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(text.contains("at most 1024"), "{text}");
    let (status, text) = raw(
        &keyd,
        Method::GET,
        "/get_tpm_keys?api-version=2099-01-01",
        "",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");

    // Restart: the imported key is found at its persistent handle.
    keyd.stop();
    // With keyd stopped, tpm2-tools may use the TPM: the EK and SRK keyd served are the TPM's.
    assert_eq!(tpm.read_public("0x81010001", "tss"), keys.endorsement_key);
    assert_eq!(tpm.read_public("0x81000001", "tss"), keys.storage_root_key);
    tpm.read_public("0x81000100", "tss");
    keyd.spawn();
    assert_eq!(
        tpm_client(&keyd).sign_with_auth_key(data).await.unwrap(),
        hmac_sha256(&second_key, data)
    );
    assert!(!keyd.log().contains(&b64(&second_key)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpmd_callers_other_uids_and_no_tpm() {
    // No TPM at the TCTI: keyd still serves keys, and the tpmd API answers 503 naming the TCTI.
    let tcti = Swtpm::start().tcti();
    let mut keyd = keyd_for(&tcti, "[[principal]]\nuid = 65533\n");
    keyd.spawn();
    keyd.client()
        .create_key_if_not_exists("k", "sign")
        .await
        .unwrap();
    let (status, text) = raw(&keyd, Method::GET, &format!("/get_tpm_keys?{API}"), "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(text.contains("the TPM could not be opened"), "{text}");

    // keyd binds the tpmd socket 0660 (the packaged socket unit sets owner and group).
    let mode = std::fs::metadata(tpmd_socket(&keyd))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
    // uid 65534 is neither root, keyd's uid, aziotid nor a [[principal]]: 403.
    std::fs::set_permissions(tpmd_socket(&keyd), std::fs::Permissions::from_mode(0o666)).unwrap();
    let as_uid = |uid: u32| -> (u16, String) {
        use std::os::unix::process::CommandExt;
        let output = std::process::Command::new("python3")
            .uid(uid)
            .gid(uid)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tools/uds-request.py"
            ))
            .args([
                tpmd_socket(&keyd).to_str().unwrap(),
                "GET",
                &format!("/get_tpm_keys?{API}"),
                "",
            ])
            .output()
            .expect("python3 is needed to act as another uid");
        let text = String::from_utf8(output.stdout).unwrap();
        let (status, body) = text.split_once('\n').unwrap();
        (status.parse().unwrap(), body.to_owned())
    };
    let (status, body) = as_uid(65534);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("user 65534 is not authorized to use the TPM service"),
        "{body}"
    );
    // A [[principal]] uid gets past the caller check (and then meets the missing TPM).
    let (status, body) = as_uid(65533);
    assert_eq!(status, 503, "{body}");
}
