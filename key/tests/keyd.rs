//! Black-box tests of the real keyd binary over its Unix socket, through the real client.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use bytes::Bytes;
use common::{b64, unb64, Keyd};
use hmac::Mac;
use http::{Method, StatusCode};
use key_api::{EncryptMechanism, KeyHandle, SignMechanism};
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::pkey::{PKey, Public};

const FILE_CONFIG: &str = "[aziot_keys]\nhomedir_path = \"{home}\"\n";

fn independent_hmac(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

/// Rebuilds a public key from keyd's `/parameters` answers alone.
async fn public_key_from_parameters(client: &key_api::Client, handle: &KeyHandle) -> PKey<Public> {
    let algorithm = client
        .get_key_pair_public_parameter(handle, "algorithm")
        .await
        .unwrap();
    match algorithm.as_str() {
        "ECDSA" => {
            let oid = unb64(
                &client
                    .get_key_pair_public_parameter(handle, "ec-curve-oid")
                    .await
                    .unwrap(),
            );
            assert_eq!(
                oid,
                [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07]
            );
            let point = unb64(
                &client
                    .get_key_pair_public_parameter(handle, "ec-point")
                    .await
                    .unwrap(),
            );
            assert_eq!(point.len(), 33, "compressed P-256 point");
            let group = EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
            let mut context = BigNumContext::new().unwrap();
            let point = EcPoint::from_bytes(&group, &point, &mut context).unwrap();
            PKey::from_ec_key(EcKey::from_public_key(&group, &point).unwrap()).unwrap()
        }
        "RSA" => {
            let modulus = unb64(
                &client
                    .get_key_pair_public_parameter(handle, "rsa-modulus")
                    .await
                    .unwrap(),
            );
            let exponent = unb64(
                &client
                    .get_key_pair_public_parameter(handle, "rsa-exponent")
                    .await
                    .unwrap(),
            );
            assert_eq!(exponent, [1, 0, 1]);
            let rsa = openssl::rsa::Rsa::from_public_components(
                BigNum::from_slice(&modulus).unwrap(),
                BigNum::from_slice(&exponent).unwrap(),
            )
            .unwrap();
            PKey::from_rsa(rsa).unwrap()
        }
        other => panic!("unexpected algorithm {other}"),
    }
}

async fn raw(
    keyd: &Keyd,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> (StatusCode, serde_json::Value, http::HeaderMap) {
    let headers: Vec<(&str, &str)> = content_type
        .map(|value| ("content-type", value))
        .into_iter()
        .collect();
    let response = keyd
        .http()
        .send(method, path, &headers, body.into())
        .await
        .unwrap();
    let json = if response.body.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&response.body).unwrap_or_else(|_| {
            panic!(
                "body is not JSON: {:?}",
                String::from_utf8_lossy(&response.body)
            )
        })
    };
    (response.status, json, response.headers)
}

fn status_of(error: http_common::ClientError) -> (u16, String) {
    match error {
        http_common::ClientError::Status { status, message } => (status.as_u16(), message),
        other => panic!("expected an HTTP status, got {other:?}"),
    }
}

#[tokio::test]
async fn hmac_and_derived_keys_match_an_independent_implementation() {
    let keyd = Keyd::start(FILE_CONFIG);
    let client = keyd.client();
    let key_bytes = b"0123456789abcdef0123456789abcdef-longer-than-32".to_vec();
    let handle = client
        .import_key("device-id", "sign,derive", &key_bytes)
        .await
        .unwrap();
    for message in [&b""[..], b"hello", &[0_u8; 5000]] {
        let signature = client
            .sign(&handle, SignMechanism::HmacSha256 { message })
            .await
            .unwrap();
        assert_eq!(signature, independent_hmac(&key_bytes, message));
    }

    let data = b"edgeHub:637894758612345678:primary";
    let derived = client.create_derived_key(&handle, data).await.unwrap();
    let exported = client.export_derived_key(&derived).await.unwrap();
    assert_eq!(exported, independent_hmac(&key_bytes, data));
    let signature = client
        .sign(&derived, SignMechanism::HmacSha256 { message: b"m" })
        .await
        .unwrap();
    assert_eq!(signature, independent_hmac(&exported, b"m"));

    // Nested derivation is refused; exporting a non-derived key is refused.
    let (status, message) = status_of(client.create_derived_key(&derived, b"x").await.unwrap_err());
    assert_eq!(
        (status, message.as_str()),
        (
            400,
            "nested derived keys are not supported, import the outer derived key first"
        )
    );
    let (status, message) = status_of(client.export_derived_key(&handle).await.unwrap_err());
    assert_eq!(
        (status, message.as_str()),
        (400, "handle is not for a derived key")
    );

    // The draft route computes the same HMAC, and its handles are interchangeable.
    let (status, body, _) = raw(
        &keyd,
        Method::POST,
        "/keystore/sign",
        Some("application/json"),
        serde_json::to_vec(&serde_json::json!({"keystorehandle": handle.0, "algo": "HMACSHA256", "data": b64(b"hello")})).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        unb64(body["digest"].as_str().unwrap()),
        independent_hmac(&key_bytes, b"hello")
    );
}

#[tokio::test]
async fn ecdsa_and_rsa_signatures_verify_with_the_public_parameters() {
    let keyd = Keyd::start(FILE_CONFIG);
    let client = keyd.client();

    let ec = client
        .create_key_pair_if_not_exists("ec", None)
        .await
        .unwrap();
    let public = public_key_from_parameters(&client, &ec).await;
    let digest = openssl::sha::sha256(b"to be signed");
    let signature = client
        .sign(&ec, SignMechanism::Ecdsa { digest: &digest })
        .await
        .unwrap();
    let parsed = openssl::ecdsa::EcdsaSig::from_der(&signature).expect("DER ECDSA-Sig-Value");
    assert!(parsed.verify(&digest, &public.ec_key().unwrap()).unwrap());
    assert!(!parsed
        .verify(&openssl::sha::sha256(b"other"), &public.ec_key().unwrap())
        .unwrap());

    let rsa = client
        .create_key_pair_if_not_exists("rsa", Some("rsa-2048:*"))
        .await
        .unwrap();
    let public = public_key_from_parameters(&client, &rsa).await;
    assert_eq!(public.bits(), 2048);
    // RSA-PKCS1 is a signature over a caller-supplied DigestInfo.
    let mut digest_info = vec![
        0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01,
        0x05, 0x00, 0x04, 0x20,
    ];
    digest_info.extend_from_slice(&openssl::sha::sha256(b"tbs"));
    let signature = client
        .encrypt(&rsa, EncryptMechanism::RsaPkcs1, &digest_info)
        .await
        .unwrap();
    let mut verifier =
        openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), &public).unwrap();
    verifier.update(b"tbs").unwrap();
    assert!(verifier.verify(&signature).unwrap());
    // RSA-NO-PADDING is the raw private-key operation.
    let mut block = vec![0_u8; 256];
    block[1..].fill(0x5a);
    let raw_signature = client
        .encrypt(&rsa, EncryptMechanism::RsaNoPadding, &block)
        .await
        .unwrap();
    let mut recovered = vec![0_u8; 256];
    let length = public
        .rsa()
        .unwrap()
        .public_decrypt(&raw_signature, &mut recovered, openssl::rsa::Padding::NONE)
        .unwrap();
    assert_eq!(&recovered[..length], &block[..]);
    let (status, _) = status_of(
        client
            .encrypt(&rsa, EncryptMechanism::RsaNoPadding, b"short")
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 400);

    let big = client
        .create_key_pair_if_not_exists("rsa4096", Some("rsa-4096"))
        .await
        .unwrap();
    assert_eq!(public_key_from_parameters(&client, &big).await.bits(), 4096);

    // Mechanism and key kind must fit.
    let (status, message) = status_of(
        client
            .sign(&rsa, SignMechanism::Ecdsa { digest: &digest })
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, message.as_str()),
        (400, "mechanism cannot be used with this key type")
    );
    let (status, _) = status_of(
        client
            .sign(&ec, SignMechanism::HmacSha256 { message: b"x" })
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 400);
    let (status, _) = status_of(
        client
            .get_key_pair_public_parameter(&ec, "rsa-modulus")
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 400);
}

#[tokio::test]
async fn aead_matches_the_reference_format_and_rejects_tampering() {
    let keyd = Keyd::start(FILE_CONFIG);
    let client = keyd.client();
    let key_bytes = [7_u8; 32];
    let handle = client
        .import_key("iotedge_master_encryption_id", "encrypt", &key_bytes)
        .await
        .unwrap();
    // edgeAgent sends the 32-character text of a GUID as IV.
    let iv = b"0f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let aad = b"module-generation";
    let plaintext = b"the secret the agent stores";
    let ciphertext = client
        .encrypt(&handle, EncryptMechanism::Aead { iv, aad }, plaintext)
        .await
        .unwrap();
    assert_eq!(ciphertext.len(), 1 + plaintext.len() + 16);
    assert_eq!(ciphertext[0], 0x02);

    // An independent AES-256-GCM with a 32-byte nonce reads it: version ‖ ciphertext ‖ tag.
    type Aes256Gcm32 = aes_gcm::AesGcm<aes_gcm::aes::Aes256, aes_gcm::aead::consts::U32>;
    let cipher = Aes256Gcm32::new_from_slice(&key_bytes).unwrap();
    let nonce = aes_gcm::Nonce::<aes_gcm::aead::consts::U32>::from_slice(iv);
    let opened = cipher
        .decrypt(
            nonce,
            Payload {
                msg: &ciphertext[1..],
                aad,
            },
        )
        .unwrap();
    assert_eq!(opened, plaintext);

    assert_eq!(
        client.decrypt(&handle, iv, aad, &ciphertext).await.unwrap(),
        plaintext
    );
    let (status, message) = status_of(
        client
            .decrypt(&handle, iv, b"wrong aad", &ciphertext)
            .await
            .unwrap_err(),
    );
    assert_eq!((status, message.as_str()), (400, "decryption failed"));
    for index in [1, ciphertext.len() - 1] {
        let mut flipped = ciphertext.clone();
        flipped[index] ^= 1;
        let (status, message) = status_of(
            client
                .decrypt(&handle, iv, aad, &flipped)
                .await
                .unwrap_err(),
        );
        assert_eq!((status, message.as_str()), (400, "decryption failed"));
    }
    let (status, message) = status_of(
        client
            .decrypt(&handle, iv, aad, &ciphertext[..16])
            .await
            .unwrap_err(),
    );
    assert_eq!((status, message.as_str()), (400, "malformed ciphertext"));
    let mut unknown = ciphertext.clone();
    unknown[0] = 9;
    let (status, message) = status_of(
        client
            .decrypt(&handle, iv, aad, &unknown)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, message.as_str()),
        (400, "unknown ciphertext version 9")
    );

    // The IoT Edge 1.1 layout (0x01 ‖ tag ‖ ciphertext) still decrypts.
    let sealed = cipher
        .encrypt(
            nonce,
            Payload {
                msg: b"legacy secret",
                aad,
            },
        )
        .unwrap();
    let (body, tag) = sealed.split_at(sealed.len() - 16);
    let mut legacy = vec![0x01];
    legacy.extend_from_slice(tag);
    legacy.extend_from_slice(body);
    assert_eq!(
        client.decrypt(&handle, iv, aad, &legacy).await.unwrap(),
        b"legacy secret"
    );

    // A derived key encrypts with its own bytes.
    let derived = client.create_derived_key(&handle, b"derive").await.unwrap();
    let derived_ciphertext = client
        .encrypt(
            &derived,
            EncryptMechanism::Aead {
                iv: b"123456789012",
                aad: b"",
            },
            b"x",
        )
        .await
        .unwrap();
    assert_eq!(
        client
            .decrypt(&derived, b"123456789012", b"", &derived_ciphertext)
            .await
            .unwrap(),
        b"x"
    );
    assert!(client
        .decrypt(&handle, b"123456789012", b"", &derived_ciphertext)
        .await
        .is_err());
}

#[tokio::test]
async fn a_restart_keeps_every_key_and_every_handle() {
    let mut keyd = Keyd::start(FILE_CONFIG);
    let client = keyd.client();
    let symmetric = client
        .create_key_if_not_exists("master", "derive,sign")
        .await
        .unwrap();
    let pair = client
        .create_key_pair_if_not_exists("ca", None)
        .await
        .unwrap();
    let rsa = client
        .create_key_pair_if_not_exists("rsa", Some("rsa-2048"))
        .await
        .unwrap();
    let mac_before = client
        .sign(&symmetric, SignMechanism::HmacSha256 { message: b"m" })
        .await
        .unwrap();
    let ec_before = client
        .get_key_pair_public_parameter(&pair, "ec-point")
        .await
        .unwrap();
    let rsa_before = client
        .get_key_pair_public_parameter(&rsa, "rsa-modulus")
        .await
        .unwrap();

    keyd.spawn();
    let client = keyd.client();
    // Old handles still work (the validation key persisted) and name the same keys.
    assert_eq!(
        client
            .sign(&symmetric, SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap(),
        mac_before
    );
    assert_eq!(
        client
            .get_key_pair_public_parameter(&pair, "ec-point")
            .await
            .unwrap(),
        ec_before
    );
    let reloaded = client.load_key_pair("rsa").await.unwrap();
    assert_eq!(
        client
            .get_key_pair_public_parameter(&reloaded, "rsa-modulus")
            .await
            .unwrap(),
        rsa_before
    );
    // Creating again returns the existing key.
    let again = client
        .create_key_if_not_exists("master", "derive,sign")
        .await
        .unwrap();
    assert_ne!(again, symmetric, "handles carry fresh randomness");
    assert_eq!(
        client
            .sign(&again, SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap(),
        mac_before
    );

    // Files are private and in the reference layout.
    use std::os::unix::fs::PermissionsExt;
    let keys = keyd.home().join("keys");
    assert_eq!(
        std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for entry in std::fs::read_dir(&keys).unwrap() {
        let entry = entry.unwrap();
        assert_eq!(
            entry.metadata().unwrap().permissions().mode() & 0o777,
            0o600,
            "{:?}",
            entry.file_name()
        );
    }
    assert!(keys.join(keyd::store::file::file_name("master")).exists());
}

#[tokio::test]
async fn tampered_and_foreign_handles_are_refused() {
    let keyd = Keyd::start(FILE_CONFIG);
    let other = Keyd::start(FILE_CONFIG);
    let client = keyd.client();
    let handle = client.create_key_if_not_exists("k", "sign").await.unwrap();
    let foreign = other
        .client()
        .create_key_if_not_exists("k", "sign")
        .await
        .unwrap();

    let mut tampered_payload = handle.0.clone();
    // Change one character inside the base64 payload.
    let position = 5;
    let replacement = if tampered_payload.as_bytes()[position] == b'A' {
        "B"
    } else {
        "A"
    };
    tampered_payload.replace_range(position..=position, replacement);
    let forged_id = format!(
        "sr={}&sig={}",
        b64(br#"{"key_id":{"Key":"k"},"nonce":"AAAA"}"#),
        handle.0.split_once("&sig=").unwrap().1
    );
    for bad in [
        tampered_payload,
        forged_id,
        foreign.0,
        "garbage".to_owned(),
        String::new(),
        "x".repeat(5000),
    ] {
        let error = client
            .sign(&KeyHandle(bad), SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap_err();
        assert_eq!(status_of(error), (400, "invalid handle".to_owned()));
    }
    // The log never contains handles.
    assert!(!keyd.log().contains(&handle.0[3..40]));
}

#[tokio::test]
async fn principals_decide_who_may_name_keys() {
    let keyd = Keyd::start(&format!(
        "{FILE_CONFIG}\n[[principal]]\nuid = 65534\nkeys = [\"allowed-*\", \"exact\"]\n"
    ));
    // Let the unprivileged uid reach the socket.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(keyd.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&keyd.socket, std::fs::Permissions::from_mode(0o666)).unwrap();

    let as_nobody = |method: &str, path: &str, body: &str| -> (u16, String) {
        use std::os::unix::process::CommandExt;
        let output = std::process::Command::new("python3")
            .uid(65534)
            .gid(65534)
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../tools/uds-request.py"
            ))
            .args([keyd.socket.to_str().unwrap(), method, path, body])
            .output()
            .expect("python3 is needed to act as another uid");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).unwrap();
        let (status, body) = text.split_once('\n').unwrap();
        (status.parse().unwrap(), body.to_owned())
    };

    let (status, body) = as_nobody(
        "POST",
        "/key?api-version=2020-09-01",
        r#"{"keyId":"allowed-1","usage":"sign"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = as_nobody(
        "POST",
        "/keypair?api-version=2020-09-01",
        r#"{"keyId":"exact"}"#,
    );
    assert_eq!(status, 200, "{body}");
    let (status, body) = as_nobody(
        "POST",
        "/key?api-version=2020-09-01",
        r#"{"keyId":"device-id","usage":"sign"}"#,
    );
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("user 65534 is not authorized to access the key device-id"),
        "{body}"
    );
    // Root may always, except for the reserved validation key.
    let client = keyd.client();
    client
        .create_key_if_not_exists("device-id", "sign")
        .await
        .unwrap();
    let (status, _) = status_of(client.load_key("handle-validation-key").await.unwrap_err());
    assert_eq!(status, 403);
    // Handles are bearer credentials: uid 65534 may sign with a handle root gave it.
    let handle = client.load_key("device-id").await.unwrap();
    let (status, body) = as_nobody(
        "POST",
        "/sign?api-version=2020-09-01",
        &serde_json::json!({"keyHandle": handle.0, "algorithm": "HMAC-SHA256", "parameters": {"message": "aGk="}}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    // ... but may not delete a key it has no principal rights on (ours: handle and principal).
    let body = serde_json::json!({"keyHandle": handle.0}).to_string();
    let (status, message) = as_nobody("DELETE", "/key?api-version=2020-09-01", &body);
    assert_eq!(status, 403, "{message}");
    client.load_key("device-id").await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors_and_the_daemon_keeps_serving() {
    let keyd = Keyd::start(FILE_CONFIG);
    let json = Some("application/json");
    // (method, path, content type, body, expected status, expected message part)
    type Case<'a> = (Method, &'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            Method::POST,
            "/key?api-version=2020-09-01",
            json,
            b"{not json".to_vec(),
            422,
            "request body is not valid",
        ),
        (
            Method::POST,
            "/key?api-version=2020-09-01",
            json,
            br#"{"keyId":"k"}"#.to_vec(),
            422,
            "missing field `usage`",
        ),
        (
            Method::POST,
            "/key?api-version=2020-09-01",
            json,
            br#"{"keyId":"k","usage":"fly"}"#.to_vec(),
            422,
            "invalid usage",
        ),
        (
            Method::POST,
            "/key?api-version=2020-09-01",
            json,
            Vec::new(),
            400,
            "missing request body",
        ),
        (
            Method::POST,
            "/key",
            json,
            br#"{"keyId":"k","usage":"sign"}"#.to_vec(),
            400,
            "api-version not specified",
        ),
        (
            Method::POST,
            "/key?api-version=2099-01-01",
            json,
            br#"{}"#.to_vec(),
            400,
            "invalid api-version \"2099-01-01\"",
        ),
        (
            Method::POST,
            "/key?api-version=2020-09-01&api-version=2020-09-01",
            json,
            br#"{}"#.to_vec(),
            400,
            "api-version specified more than once",
        ),
        (
            Method::POST,
            "/nothing-here?api-version=2020-09-01",
            json,
            br#"{}"#.to_vec(),
            404,
            "not found",
        ),
        (
            Method::PUT,
            "/sign?api-version=2020-09-01",
            json,
            br#"{}"#.to_vec(),
            405,
            "method not allowed",
        ),
        (
            Method::POST,
            "/key?api-version=2020-09-01",
            Some("text/plain"),
            br#"{"keyId":"k","usage":"sign"}"#.to_vec(),
            415,
            "unsupported content type",
        ),
        (
            Method::POST,
            "/key?api-version=2020-09-01",
            json,
            br#"{"keyId":"","usage":"sign"}"#.to_vec(),
            400,
            "keyId",
        ),
        (
            Method::POST,
            "/key?api-version=2020-09-01",
            json,
            br#"{"keyId":"k","usage":"sign","keyBytes":"!!"}"#.to_vec(),
            400,
            "keyBytes",
        ),
        (
            Method::GET,
            "/key/missing?api-version=2020-09-01",
            None,
            Vec::new(),
            404,
            "key \"missing\" not found",
        ),
        (
            Method::POST,
            "/keypair?api-version=2020-09-01",
            json,
            br#"{"keyId":"p","preferredAlgorithms":"dsa"}"#.to_vec(),
            400,
            "preferredAlgorithms",
        ),
        (
            Method::POST,
            "/sign?api-version=2020-09-01",
            json,
            br#"{"keyHandle":"x","algorithm":"MD5","parameters":{}}"#.to_vec(),
            400,
            "unsupported algorithm",
        ),
        (
            Method::POST,
            "/keystore/sign",
            json,
            br#"{"keystorehandle":"x","algo":"SHA1","data":""}"#.to_vec(),
            400,
            "unsupported algo \"SHA1\"",
        ),
        (
            Method::POST,
            "/keystore/key",
            json,
            br#"{}"#.to_vec(),
            400,
            "keyid",
        ),
    ];
    for (method, path, content_type, body, expected_status, expected_message) in cases {
        let (status, body, headers) = raw(&keyd, method.clone(), path, content_type, body).await;
        assert_eq!(status.as_u16(), expected_status, "{method} {path}: {body}");
        let message = body["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no message in {body}"));
        assert!(
            message.contains(expected_message),
            "{method} {path}: {message:?}"
        );
        assert_eq!(headers["content-type"], "application/json");
        if expected_status == 405 {
            assert_eq!(headers["allow"], "POST");
        }
    }

    // An oversized body is refused without killing the daemon.
    let oversized = vec![b' '; 2 * 1024 * 1024];
    let (status, body, _) = raw(
        &keyd,
        Method::POST,
        "/key?api-version=2020-09-01",
        json,
        oversized,
    )
    .await;
    assert_eq!(status, 413, "{body}");
    let handle = keyd
        .client()
        .create_key_if_not_exists("still-alive", "sign")
        .await
        .unwrap();
    assert!(handle.0.starts_with("sr="));
}

#[tokio::test]
async fn key_lifecycle_move_delete_and_kind_conflicts() {
    let keyd = Keyd::start(FILE_CONFIG);
    let client = keyd.client();

    // Rotation: a handle names the ID, so after a move it reaches the new key.
    let current = client
        .create_key_pair_if_not_exists("device-id", None)
        .await
        .unwrap();
    let temp = client
        .create_key_pair_if_not_exists("device-id-temp", None)
        .await
        .unwrap();
    let new_point = client
        .get_key_pair_public_parameter(&temp, "ec-point")
        .await
        .unwrap();
    assert_ne!(
        client
            .get_key_pair_public_parameter(&current, "ec-point")
            .await
            .unwrap(),
        new_point
    );
    client
        .move_key_pair("device-id-temp", "device-id")
        .await
        .unwrap();
    assert_eq!(
        client
            .get_key_pair_public_parameter(&current, "ec-point")
            .await
            .unwrap(),
        new_point
    );
    assert_eq!(
        status_of(client.load_key_pair("device-id-temp").await.unwrap_err()).0,
        404
    );
    assert_eq!(
        status_of(
            client
                .get_key_pair_public_parameter(&temp, "ec-point")
                .await
                .unwrap_err()
        )
        .0,
        404
    );
    assert_eq!(
        status_of(
            client
                .move_key_pair("device-id", "device-id")
                .await
                .unwrap_err()
        )
        .0,
        400
    );
    assert_eq!(
        status_of(
            client
                .move_key_pair("absent", "device-id")
                .await
                .unwrap_err()
        )
        .0,
        404
    );

    // Kind clashes are conflicts.
    let (status, message) = status_of(
        client
            .create_key_if_not_exists("device-id", "sign")
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, message.as_str()),
        (409, "a key pair with ID \"device-id\" already exists")
    );
    let master = client
        .create_key_if_not_exists("master", "derive")
        .await
        .unwrap();
    assert_eq!(
        status_of(
            client
                .create_key_pair_if_not_exists("master", None)
                .await
                .unwrap_err()
        )
        .0,
        409
    );

    // Delete: the handle's kind must fit; deleting twice is fine; derived keys lose their base.
    let derived = client.create_derived_key(&master, b"d").await.unwrap();
    assert_eq!(
        status_of(client.delete_key_pair(&master).await.unwrap_err()).0,
        400
    );
    assert_eq!(
        status_of(client.delete_key(&derived).await.unwrap_err()).0,
        400
    );
    client.delete_key(&master).await.unwrap();
    client.delete_key(&master).await.unwrap();
    assert_eq!(
        status_of(client.load_key("master").await.unwrap_err()).0,
        404
    );
    assert_eq!(
        status_of(client.export_derived_key(&derived).await.unwrap_err()).0,
        404
    );
    client.delete_key_pair(&current).await.unwrap();
    assert_eq!(
        status_of(client.load_key_pair("device-id").await.unwrap_err()).0,
        404
    );
    assert!(!keyd
        .home()
        .join("keys")
        .join(keyd::store::file::file_name("device-id"))
        .exists());
}

#[tokio::test]
async fn preloaded_file_keys_are_usable_and_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let ec = PKey::from_ec_key(
        EcKey::generate(&EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap())
            .unwrap(),
    )
    .unwrap();
    let pem_path = dir.path().join("device-id.pem");
    // A traditional SEC1 "EC PRIVATE KEY" file, as operators often have.
    std::fs::write(
        &pem_path,
        ec.ec_key().unwrap().private_key_to_pem().unwrap(),
    )
    .unwrap();
    let sas_path = dir.path().join("sas-key");
    std::fs::write(&sas_path, b"sas key bytes").unwrap();
    let keyd = Keyd::start(&format!(
        "homedir_path = \"{{home}}\"\n\"preloaded_key:device-id\" = \"file://{}\"\n[preloaded_keys]\nsas = \"file://{}\"\nlater = \"file://{}/not-yet\"\n",
        pem_path.display(),
        sas_path.display(),
        dir.path().display()
    ));
    let client = keyd.client();
    let handle = client.load_key_pair("device-id").await.unwrap();
    let digest = openssl::sha::sha256(b"x");
    let signature = client
        .sign(&handle, SignMechanism::Ecdsa { digest: &digest })
        .await
        .unwrap();
    assert!(openssl::ecdsa::EcdsaSig::from_der(&signature)
        .unwrap()
        .verify(&digest, &ec.ec_key().unwrap())
        .unwrap());
    let sas = client.load_key("sas").await.unwrap();
    assert_eq!(
        client
            .sign(&sas, SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap(),
        independent_hmac(b"sas key bytes", b"m")
    );
    // Read-only, and a missing file is only a 404 when used.
    assert_eq!(
        status_of(client.delete_key_pair(&handle).await.unwrap_err()).0,
        409
    );
    assert_eq!(
        status_of(client.import_key("sas", "sign", b"new").await.unwrap_err()).0,
        409
    );
    assert_eq!(
        status_of(
            client
                .move_key_pair("device-id", "elsewhere")
                .await
                .unwrap_err()
        )
        .0,
        409
    );
    client
        .create_key_pair_if_not_exists("elsewhere", Some("ec-p256"))
        .await
        .unwrap();
    assert_eq!(
        status_of(
            client
                .move_key_pair("elsewhere", "device-id")
                .await
                .unwrap_err()
        )
        .0,
        409
    );
    assert_eq!(
        status_of(client.load_key("later").await.unwrap_err()).0,
        404
    );
    std::fs::write(dir.path().join("not-yet"), b"arrived").unwrap();
    let later = client.load_key("later").await.unwrap();
    assert_eq!(
        client
            .sign(&later, SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap(),
        independent_hmac(b"arrived", b"m")
    );
    assert!(pem_path.exists());
}

#[tokio::test]
async fn draft_routes_take_arguments_from_get_bodies_or_queries() {
    let keyd = Keyd::start(FILE_CONFIG);
    let json = Some("application/json");
    let (status, created, _) = raw(
        &keyd,
        Method::POST,
        "/keystore/key",
        json,
        r#"{"keyid":"draft"}"#,
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let (status, loaded, _) = raw(
        &keyd,
        Method::GET,
        "/keystore/key",
        json,
        r#"{"keyid":"draft"}"#,
    )
    .await;
    assert_eq!(status, 200, "{loaded}");
    let (status, by_query, _) =
        raw(&keyd, Method::GET, "/keystore/key?keyid=draft", None, "").await;
    assert_eq!(status, 200, "{by_query}");
    let (status, _, _) = raw(
        &keyd,
        Method::GET,
        "/keystore/key?keyid=other",
        json,
        r#"{"keyid":"draft"}"#,
    )
    .await;
    assert_eq!(status, 400);
    let (status, missing, _) = raw(
        &keyd,
        Method::GET,
        "/keystore/keypair",
        json,
        r#"{"keypairid":"none"}"#,
    )
    .await;
    assert_eq!(status, 404, "{missing}");
    let (status, pair, _) = raw(
        &keyd,
        Method::POST,
        "/keystore/keypair?api-version=2021-05-01",
        json,
        r#"{"keypairid":"p"}"#,
    )
    .await;
    assert_eq!(status, 200, "{pair}");

    // Draft handles work on compatible routes, and both draft handles name the same key.
    let client = keyd.client();
    let first = KeyHandle(created["keystorehandle"].as_str().unwrap().to_owned());
    let second = KeyHandle(by_query["keystorehandle"].as_str().unwrap().to_owned());
    assert_eq!(
        client
            .sign(&first, SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap(),
        client
            .sign(&second, SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap()
    );
    let pair = KeyHandle(pair["keystorehandle"].as_str().unwrap().to_owned());
    assert_eq!(
        client
            .get_key_pair_public_parameter(&pair, "algorithm")
            .await
            .unwrap(),
        "ECDSA"
    );
}

#[tokio::test]
async fn a_uid_over_its_connection_budget_gets_503_not_a_dropped_connection() {
    let keyd = Keyd::start(&format!("max_requests = 2\n{FILE_CONFIG}"));
    // Two keep-alive connections that have each been answered once hold this uid's budget
    // (answered, so the server has certainly accepted and counted them).
    // The harness's readiness probe may still hold a slot for a moment after it closed (the
    // server sees the close asynchronously): a connection refused for that is tried again.
    let held: Vec<_> = (0..2)
        .map(|_| {
            use std::io::{Read, Write};
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let mut stream = std::os::unix::net::UnixStream::connect(&keyd.socket).unwrap();
                stream
                    .write_all(b"GET /key/x?api-version=2020-09-01 HTTP/1.1\r\nHost: keyd\r\n\r\n")
                    .unwrap();
                let mut seen = Vec::new();
                let mut buffer = [0_u8; 1024];
                let mut refused = false;
                while !String::from_utf8_lossy(&seen).contains("not found\"}") {
                    let read = stream.read(&mut buffer).unwrap();
                    if read == 0 {
                        let text = String::from_utf8_lossy(&seen);
                        assert!(text.starts_with("HTTP/1.1 503"), "closed early: {text}");
                        refused = true;
                        break;
                    }
                    seen.extend_from_slice(&buffer[..read]);
                }
                if !refused {
                    break stream;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the budget never freed up"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        })
        .collect();
    let (status, body, headers) = raw(
        &keyd,
        Method::GET,
        "/key/x?api-version=2020-09-01",
        None,
        "",
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        body["message"],
        "too many concurrent connections for uid 0 (limit 2)"
    );
    // Once they close, the budget is free again (the server notices the close asynchronously).
    drop(held);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, _, _) = raw(
            &keyd,
            Method::GET,
            "/key/x?api-version=2020-09-01",
            None,
            "",
        )
        .await;
        if status == 404 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            std::time::Instant::now() < deadline,
            "the budget was never released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[test]
fn invalid_configuration_exits_153_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let dropins = dir.path().join("config.d");
    std::fs::create_dir(&dropins).unwrap();
    std::fs::write(&config, "homedir_path = \"/tmp/x\"\n").unwrap();
    std::fs::write(
        dropins.join("10-bad.toml"),
        "[aziot_keys]\nmystery = \"1\"\n",
    )
    .unwrap();
    let (code, output) = common::run_to_exit(&config, &dropins, &[]);
    assert_eq!(code, Some(153), "{output}");
    assert!(output.contains("10-bad.toml"), "{output}");
    assert!(
        output.contains("unrecognized storage parameter \"mystery\""),
        "{output}"
    );

    std::fs::write(dropins.join("10-bad.toml"), "").unwrap();
    std::fs::write(&config, "").unwrap();
    let (code, output) = common::run_to_exit(&config, &dropins, &[]);
    assert_eq!(code, Some(153), "{output}");
    assert!(output.contains("no key storage configured"), "{output}");
}

#[tokio::test]
async fn independent_requests_run_concurrently() {
    // One async worker: a generation running on it (instead of on a blocking thread) would stop
    // every other request, so the signing loop below would not get a turn.
    let keyd = Keyd::start_with_env(
        FILE_CONFIG,
        vec![("TOKIO_WORKER_THREADS".to_owned(), "1".to_owned())],
    );
    let client = keyd.client();
    let ec = client
        .create_key_pair_if_not_exists("ec", None)
        .await
        .unwrap();
    // An RSA-4096 generation (slow) must not hold up signing with another key.
    let slow_client = client.clone();
    let slow = tokio::spawn(async move {
        slow_client
            .create_key_pair_if_not_exists("slow", Some("rsa-4096"))
            .await
    });
    let mut signed_while_generating = 0;
    while !slow.is_finished() {
        client
            .sign(&ec, SignMechanism::Ecdsa { digest: &[1; 32] })
            .await
            .unwrap();
        signed_while_generating += 1;
    }
    slow.await.unwrap().unwrap();
    assert!(
        signed_while_generating > 1,
        "signing was blocked by key generation"
    );
}

/// Runs keyd under `systemd-socket-activate` (systemd's own socket-activation tool) and checks
/// that it answers on the inherited socket instead of binding the configured path.
fn socket_activated(endpoint_for: impl Fn(&std::path::Path) -> String, fdname: &str) {
    let dir = tempfile::tempdir().unwrap();
    let activation_socket = dir.path().join("activated.sock");
    let configured_socket = dir.path().join("configured.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[aziot_keys]\nhomedir_path = \"{}\"\n[endpoints]\naziot_keyd = \"{}\"\n",
            dir.path().join("home").display(),
            endpoint_for(&configured_socket)
        ),
    )
    .unwrap();
    let mut activator = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&activation_socket)
        .arg(format!("--fdname={fdname}"))
        .arg(format!("--setenv=AZIOT_KEYD_CONFIG={}", config.display()))
        .arg(format!(
            "--setenv=AZIOT_KEYD_CONFIG_DIR={}",
            dir.path().join("none").display()
        ))
        .arg(env!("CARGO_BIN_EXE_keyd"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (from the systemd package) is needed");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !activation_socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "systemd-socket-activate did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        let client = key_api::Client::new(http_common::UdsClient::new(&activation_socket));
        client.create_key_if_not_exists("activated", "sign").await
    });
    let _ = activator.kill();
    let _ = activator.wait();
    result.expect("keyd answers on the socket systemd passed");
    assert!(
        !configured_socket.exists(),
        "keyd bound the configured path instead of using the passed fd"
    );
}

#[test]
fn serves_on_a_socket_passed_by_systemd_by_name() {
    socket_activated(|_| "fd://keyd.socket".to_owned(), "keyd.socket");
}

/// The fd of keyd's own socket unit (named `aziot-keyd.socket` by systemd) is used for a
/// `unix://` endpoint even when the unit listens elsewhere.
#[test]
fn serves_on_its_socket_units_fd_for_a_unix_endpoint() {
    socket_activated(
        |path| format!("unix://{}", path.display()),
        "aziot-keyd.socket",
    );
}

#[test]
fn a_body_that_arrives_late_is_read_and_one_that_never_arrives_is_408() {
    use std::io::{Read, Write};
    let keyd = Keyd::start(FILE_CONFIG);
    let body = br#"{"keyId":"slow","usage":"sign"}"#;
    let head = format!(
        "POST /key?api-version=2020-09-01 HTTP/1.1\r\nHost: keyd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let read_all = |stream: &mut std::os::unix::net::UnixStream| {
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    };

    // Half the body with the headers, the rest a moment later: the server must wait for it.
    let mut stream = std::os::unix::net::UnixStream::connect(&keyd.socket).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body[..10]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    stream.write_all(&body[10..]).unwrap();
    let answer = read_all(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("keyHandle"), "{answer}");

    // A body that never completes gets 408 with a JSON message (after the 5 s deadline).
    let mut stream = std::os::unix::net::UnixStream::connect(&keyd.socket).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body[..10]).unwrap();
    let answer = read_all(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains(r#"{"message":"request body not received in time"}"#),
        "{answer}"
    );
}

#[tokio::test]
async fn an_unreadable_key_file_is_a_500_on_load_and_is_set_aside_on_create() {
    let keyd = Keyd::start(FILE_CONFIG);
    let keys = keyd.home().join("keys");
    let path = keys.join(keyd::store::file::file_name("broken"));
    std::fs::write(
        &path,
        b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();

    // Loading names the key, never the path, and the file is left alone.
    let (status, body, _) = raw(
        &keyd,
        Method::GET,
        "/keypair/broken?api-version=2020-09-01",
        None,
        "",
    )
    .await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["message"], "key \"broken\" is stored but unreadable");
    assert!(!body.to_string().contains(keys.to_str().unwrap()));
    assert!(path.exists());

    // Creating treats it as absent: it is kept aside and a new key pair takes its place.
    let client = keyd.client();
    let handle = client
        .create_key_pair_if_not_exists("broken", None)
        .await
        .unwrap();
    assert_eq!(
        client
            .get_key_pair_public_parameter(&handle, "algorithm")
            .await
            .unwrap(),
        "ECDSA"
    );
    let aside: Vec<String> = std::fs::read_dir(&keys)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        std::fs::read(keys.join(&aside[0])).unwrap(),
        b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    );
}
