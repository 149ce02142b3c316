//! keyd with a real SoftHSM2 token: keys are generated, imported and preloaded in the token,
//! every operation's output is checked with independent code (OpenSSL public-key operations,
//! the `hmac`/`aes-gcm` crates, `pkcs11-tool`), and startup fails clearly on a wrong PIN, slot
//! or library path.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use common::{run_to_exit, unb64, Keyd};
use hmac::Mac as _;
use key_api::{EncryptMechanism, KeyHandle, SignMechanism};
use openssl::bn::BigNumContext;
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::rsa::{Padding, Rsa};
use system_tests::softhsm::{SoftHsm, MODULE, PIN};

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn start(hsm: &SoftHsm) -> Keyd {
    Keyd::start_with_env(&hsm.keyd_config(), hsm.env())
}

/// The files in the file store (to prove a key did *not* land there).
fn key_files(keyd: &Keyd) -> Vec<String> {
    match std::fs::read_dir(keyd.home().join("keys")) {
        Ok(entries) => entries
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

async fn ec_public_key_from_parameters(
    client: &key_api::Client,
    handle: &KeyHandle,
) -> EcKey<openssl::pkey::Public> {
    assert_eq!(
        client
            .get_key_pair_public_parameter(handle, "algorithm")
            .await
            .unwrap(),
        "ECDSA"
    );
    assert_eq!(
        unb64(
            &client
                .get_key_pair_public_parameter(handle, "ec-curve-oid")
                .await
                .unwrap()
        ),
        [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07]
    );
    let point = unb64(
        &client
            .get_key_pair_public_parameter(handle, "ec-point")
            .await
            .unwrap(),
    );
    assert_eq!(point.len(), 33, "compressed P-256 point");
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let mut context = BigNumContext::new().unwrap();
    let point = EcPoint::from_bytes(&group, &point, &mut context).unwrap();
    EcKey::from_public_key(&group, &point).unwrap()
}

async fn rsa_public_key_from_parameters(
    client: &key_api::Client,
    handle: &KeyHandle,
) -> Rsa<openssl::pkey::Public> {
    assert_eq!(
        client
            .get_key_pair_public_parameter(handle, "algorithm")
            .await
            .unwrap(),
        "RSA"
    );
    let modulus = unb64(
        &client
            .get_key_pair_public_parameter(handle, "rsa-modulus")
            .await
            .unwrap(),
    );
    let exponent = client
        .get_key_pair_public_parameter(handle, "rsa-exponent")
        .await
        .unwrap();
    assert_eq!(exponent, "AQAB");
    Rsa::from_public_components(
        openssl::bn::BigNum::from_slice(&modulus).unwrap(),
        openssl::bn::BigNum::from_slice(&unb64(&exponent)).unwrap(),
    )
    .unwrap()
}

/// Exports a public key with pkcs11-tool (DER SubjectPublicKeyInfo).
fn public_key_from_pkcs11_tool(hsm: &SoftHsm, label: &str) -> PKey<openssl::pkey::Public> {
    let path = hsm.path(&format!("{label}.pub.der"));
    hsm.tool_ok(&[
        "--read-object",
        "--type",
        "pubkey",
        "--label",
        label,
        "-o",
        path.to_str().unwrap(),
    ]);
    PKey::public_key_from_der(&std::fs::read(path).unwrap()).unwrap()
}

fn ecdsa_verifies(public: &EcKey<openssl::pkey::Public>, digest: &[u8], signature: &[u8]) -> bool {
    EcdsaSig::from_der(signature)
        .unwrap()
        .verify(digest, public)
        .unwrap()
}

/// SHA-256 `DigestInfo` prefix (what an RSA-PKCS1 caller puts before the hash).
const SHA256_DIGEST_INFO: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

#[tokio::test]
async fn generated_keys_live_in_the_token_and_are_not_extractable() {
    let hsm = SoftHsm::new("generated");
    let keyd = start(&hsm);
    let client = keyd.client();
    client
        .create_key_pair_if_not_exists("gen-ec", Some("ec-p256"))
        .await
        .unwrap();
    client
        .create_key_pair_if_not_exists("gen-rsa", Some("rsa-2048:*"))
        .await
        .unwrap();
    client
        .create_key_if_not_exists("gen-hmac", "derive,sign")
        .await
        .unwrap();
    client
        .create_key_if_not_exists("gen-aes", "encrypt")
        .await
        .unwrap();

    // Nothing of these (nor the handle validation key) went to the file store.
    assert_eq!(key_files(&keyd), Vec::<String>::new());

    let validation = hsm.objects_labelled("handle-validation-key");
    assert_eq!(validation.len(), 1, "{validation:?}");
    assert!(validation[0].contains("Secret Key Object; Generic secret length 32"));

    let hmac = hsm.objects_labelled("gen-hmac");
    assert_eq!(hmac.len(), 1, "{hmac:?}");
    assert!(hmac[0].contains("Generic secret length 32"), "{}", hmac[0]);
    assert!(hmac[0].contains("never extractable"), "{}", hmac[0]);
    assert!(hmac[0].contains("sensitive"), "{}", hmac[0]);

    let aes = hsm.objects_labelled("gen-aes");
    assert_eq!(aes.len(), 1, "{aes:?}");
    assert!(aes[0].contains("AES length 32"), "{}", aes[0]);
    assert!(aes[0].contains("never extractable"), "{}", aes[0]);
    // Least privilege: neither secret key can wrap or unwrap other keys.
    for object in [&hmac[0], &aes[0]] {
        assert!(!object.contains("wrap"), "{object}");
    }

    for (label, kind) in [("gen-ec", "EC"), ("gen-rsa", "RSA")] {
        let objects = hsm.objects_labelled(label);
        assert_eq!(objects.len(), 2, "{label}: {objects:?}");
        let private = objects
            .iter()
            .find(|object| object.starts_with("Private Key Object"))
            .unwrap_or_else(|| panic!("{label}: no private key in {objects:?}"));
        let public = objects
            .iter()
            .find(|object| object.starts_with("Public Key Object"))
            .unwrap_or_else(|| panic!("{label}: no public key in {objects:?}"));
        assert!(private.contains(kind), "{private}");
        assert!(
            private.contains("sensitive, always sensitive, never extractable"),
            "{private}"
        );
        // Both halves share one random 16-byte CKA_ID.
        let id_of = |object: &str| {
            object
                .lines()
                .find_map(|line| line.trim().strip_prefix("ID:"))
                .map(|id| id.trim().to_owned())
                .unwrap_or_default()
        };
        assert_eq!(id_of(private).len(), 32, "{private}");
        assert_eq!(id_of(private), id_of(public));
    }

    // The token refuses to hand out secret key values.
    for label in ["gen-hmac", "gen-aes", "handle-validation-key"] {
        let out = hsm.path("value.bin");
        let (ok, text) = hsm.tool(&[
            "--read-object",
            "--type",
            "secrkey",
            "--label",
            label,
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(!ok, "{label} was readable: {text}");
        assert!(text.contains("CKR_ATTRIBUTE_SENSITIVE"), "{text}");
    }
}

#[tokio::test]
async fn ecdsa_signatures_verify_with_the_published_and_the_exported_public_key() {
    let hsm = SoftHsm::new("ecdsa");
    let keyd = start(&hsm);
    let client = keyd.client();
    let handle = client
        .create_key_pair_if_not_exists("device-ca", None)
        .await
        .unwrap();
    let from_parameters = ec_public_key_from_parameters(&client, &handle).await;
    let from_tool = public_key_from_pkcs11_tool(&hsm, "device-ca")
        .ec_key()
        .unwrap();
    let mut context = BigNumContext::new().unwrap();
    assert!(from_parameters
        .public_key()
        .eq(from_tool.group(), from_tool.public_key(), &mut context)
        .unwrap());

    for message in [&b"hello"[..], b"", &[0xAB; 1000]] {
        let digest = openssl::sha::sha256(message);
        let signature = client
            .sign(&handle, SignMechanism::Ecdsa { digest: &digest })
            .await
            .unwrap();
        assert!(ecdsa_verifies(&from_parameters, &digest, &signature));
        assert!(ecdsa_verifies(&from_tool, &digest, &signature));
        let mut other = digest;
        other[0] ^= 1;
        assert!(!ecdsa_verifies(&from_parameters, &other, &signature));
    }
    // A shorter "digest" is signed as given, too.
    let short = [7_u8; 20];
    let signature = client
        .sign(&handle, SignMechanism::Ecdsa { digest: &short })
        .await
        .unwrap();
    assert!(ecdsa_verifies(&from_tool, &short, &signature));
}

#[tokio::test]
async fn rsa_private_key_operations_verify_with_openssl() {
    let hsm = SoftHsm::new("rsa");
    let keyd = start(&hsm);
    let client = keyd.client();
    let handle = client
        .create_key_pair_if_not_exists("edge-ca", Some("rsa-2048:*"))
        .await
        .unwrap();
    let public = rsa_public_key_from_parameters(&client, &handle).await;
    assert_eq!(public.size(), 256);
    let exported = public_key_from_pkcs11_tool(&hsm, "edge-ca").rsa().unwrap();
    assert_eq!(exported.n().to_vec(), public.n().to_vec());

    // RSA-PKCS1: the caller supplies DigestInfo; the result is a PKCS#1 v1.5 signature.
    let message = b"certificate to be signed";
    let mut digest_info = SHA256_DIGEST_INFO.to_vec();
    digest_info.extend_from_slice(&openssl::sha::sha256(message));
    let signature = client
        .encrypt(&handle, EncryptMechanism::RsaPkcs1, &digest_info)
        .await
        .unwrap();
    assert_eq!(signature.len(), 256);
    let pkey = PKey::from_rsa(public.clone()).unwrap();
    let mut verifier =
        openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), &pkey).unwrap();
    verifier.update(message).unwrap();
    assert!(verifier.verify(&signature).unwrap());

    // RSA-NO-PADDING: raw private-key operation on exactly modulus-length input.
    let mut raw = vec![0_u8; 256];
    openssl::rand::rand_bytes(&mut raw[1..]).unwrap();
    let output = client
        .encrypt(&handle, EncryptMechanism::RsaNoPadding, &raw)
        .await
        .unwrap();
    assert_eq!(output.len(), 256);
    let mut recovered = vec![0_u8; 256];
    let length = public
        .public_decrypt(&output, &mut recovered, Padding::NONE)
        .unwrap();
    assert_eq!(&recovered[..length], &raw[..]);

    // Input of the wrong size is refused before it reaches the token.
    let error = client
        .encrypt(&handle, EncryptMechanism::RsaNoPadding, &raw[1..])
        .await
        .unwrap_err();
    assert_eq!(error.status().map(|status| status.as_u16()), Some(400));
    // ECDSA with an RSA key is the wrong mechanism.
    let error = client
        .sign(&handle, SignMechanism::Ecdsa { digest: &[1; 32] })
        .await
        .unwrap_err();
    assert_eq!(error.status().map(|status| status.as_u16()), Some(400));
}

#[tokio::test]
async fn hmac_and_derivation_with_an_imported_token_key_match_independent_hmac() {
    let hsm = SoftHsm::new("hmac");
    let keyd = start(&hsm);
    let client = keyd.client();
    let key_bytes: Vec<u8> = (0..32).map(|index| index * 7 + 3).collect();
    let handle = client
        .import_key("master", "derive,sign", &key_bytes)
        .await
        .unwrap();
    // The import went to the token (C_CreateObject), not to a file.
    let objects = hsm.objects_labelled("master");
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert!(
        objects[0].contains("Generic secret length 32"),
        "{}",
        objects[0]
    );
    assert!(objects[0].contains("sensitive"), "{}", objects[0]);
    assert_eq!(key_files(&keyd), Vec::<String>::new());

    for message in [&b""[..], b"hello", &[0x5A; 3000]] {
        let signature = client
            .sign(&handle, SignMechanism::HmacSha256 { message })
            .await
            .unwrap();
        assert_eq!(signature, hmac_sha256(&key_bytes, message));
    }

    // Derived keys: HMAC-SHA256(base, data), computed in the token, then used in memory.
    let data = b"module1:generation1:primary";
    let derived = client.create_derived_key(&handle, data).await.unwrap();
    let expected = hmac_sha256(&key_bytes, data);
    assert_eq!(client.export_derived_key(&derived).await.unwrap(), expected);
    let signature = client
        .sign(&derived, SignMechanism::HmacSha256 { message: b"sas" })
        .await
        .unwrap();
    assert_eq!(signature, hmac_sha256(&expected, b"sas"));

    // Re-import replaces the token object; the old handle reaches the new key.
    let new_bytes = [0x42_u8; 48];
    client
        .import_key("master", "derive,sign", &new_bytes)
        .await
        .unwrap();
    assert_eq!(hsm.objects_labelled("master").len(), 1);
    let signature = client
        .sign(&handle, SignMechanism::HmacSha256 { message: b"x" })
        .await
        .unwrap();
    assert_eq!(signature, hmac_sha256(&new_bytes, b"x"));

    // Many concurrent requests share the session pool.
    let mut tasks = Vec::new();
    for task in 0..16_u8 {
        let client = client.clone();
        let handle = handle.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..20_u8 {
                let message = [task, round];
                let signature = client
                    .sign(&handle, SignMechanism::HmacSha256 { message: &message })
                    .await
                    .unwrap();
                assert_eq!(signature, hmac_sha256(&[0x42; 48], &message));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn aead_with_token_aes_keys_matches_independent_aes_gcm() {
    use aes_gcm::aead::consts::{U12, U32};
    use aes_gcm::aead::{Aead, KeyInit, Payload};
    use aes_gcm::aes::Aes256;

    let hsm = SoftHsm::new("aead");
    let keyd = start(&hsm);
    let client = keyd.client();

    // An imported AES key (known bytes) lets the ciphertext be checked byte for byte.
    let key_bytes = [0x11_u8; 32];
    let imported = client
        .import_key("imported-aes", "encrypt", &key_bytes)
        .await
        .unwrap();
    let objects = hsm.objects_labelled("imported-aes");
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert!(objects[0].contains("AES length 32"), "{}", objects[0]);

    let plaintext = b"edge module secret";
    let aad = b"module identity";
    // edgeAgent's 32-byte IV (GHASH-derived counter) and the common 12-byte IV.
    let long_iv = *b"0123456789abcdef0123456789abcdef";
    let short_iv = *b"twelve bytes";
    let sealed_long = client
        .encrypt(
            &imported,
            EncryptMechanism::Aead { iv: &long_iv, aad },
            plaintext,
        )
        .await
        .unwrap();
    let expected_long = aes_gcm::AesGcm::<Aes256, U32>::new_from_slice(&key_bytes)
        .unwrap()
        .encrypt(
            aes_gcm::Nonce::<U32>::from_slice(&long_iv),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap();
    assert_eq!(sealed_long[0], 0x02);
    assert_eq!(sealed_long.len(), 1 + plaintext.len() + 16);
    assert_eq!(&sealed_long[1..], &expected_long[..]);

    let sealed_short = client
        .encrypt(
            &imported,
            EncryptMechanism::Aead { iv: &short_iv, aad },
            plaintext,
        )
        .await
        .unwrap();
    let expected_short = aes_gcm::AesGcm::<Aes256, U12>::new_from_slice(&key_bytes)
        .unwrap()
        .encrypt(
            aes_gcm::Nonce::<U12>::from_slice(&short_iv),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap();
    assert_eq!(&sealed_short[1..], &expected_short[..]);

    // keyd decrypts what the independent implementation sealed.
    let mut foreign = vec![0x02];
    foreign.extend_from_slice(&expected_long);
    assert_eq!(
        client
            .decrypt(&imported, &long_iv, aad, &foreign)
            .await
            .unwrap(),
        plaintext
    );

    // A generated token AES key round-trips and rejects a wrong AAD or a legacy ciphertext.
    let generated = client
        .create_key_if_not_exists("iotedge_master_encryption_id", "encrypt")
        .await
        .unwrap();
    assert_eq!(
        hsm.objects_labelled("iotedge_master_encryption_id").len(),
        1
    );
    let sealed = client
        .encrypt(
            &generated,
            EncryptMechanism::Aead { iv: &long_iv, aad },
            b"",
        )
        .await
        .unwrap();
    assert_eq!(sealed.len(), 17);
    assert_eq!(
        client
            .decrypt(&generated, &long_iv, aad, &sealed)
            .await
            .unwrap(),
        b""
    );
    let sealed = client
        .encrypt(
            &generated,
            EncryptMechanism::Aead { iv: &long_iv, aad },
            plaintext,
        )
        .await
        .unwrap();
    assert_eq!(
        client
            .decrypt(&generated, &long_iv, aad, &sealed)
            .await
            .unwrap(),
        plaintext
    );
    let error = client
        .decrypt(&generated, &long_iv, b"other aad", &sealed)
        .await
        .unwrap_err();
    assert_eq!(
        error.status().map(|status| status.as_u16()),
        Some(400),
        "{}",
        keyd.log()
    );
    assert!(error.to_string().contains("decryption failed"), "{error}");
    let mut tampered = sealed.clone();
    tampered[1] ^= 1;
    assert!(client
        .decrypt(&generated, &long_iv, aad, &tampered)
        .await
        .is_err());
    let mut legacy = vec![0x01];
    legacy.extend_from_slice(&sealed[sealed.len() - 16..]);
    legacy.extend_from_slice(&sealed[1..sealed.len() - 16]);
    let error = client
        .decrypt(&generated, &long_iv, aad, &legacy)
        .await
        .unwrap_err();
    assert_eq!(error.status().map(|status| status.as_u16()), Some(400));
}

#[tokio::test]
async fn preloaded_token_keys_created_with_pkcs11_tool() {
    let hsm = SoftHsm::new("preloaded");
    hsm.tool_ok(&[
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "tool-ec",
        "--id",
        "01",
    ]);
    hsm.tool_ok(&[
        "--keypairgen",
        "--key-type",
        "rsa:2048",
        "--label",
        "tool-rsa",
        "--id",
        "02",
    ]);
    hsm.tool_ok(&[
        "--keygen",
        "--key-type",
        "GENERIC:32",
        "--label",
        "tool-hmac",
        "--id",
        "03",
    ]);
    let pin_file = hsm.path("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).unwrap();
    // No base slot: dynamic keys (and the handle validation key) stay in files; only the
    // preloaded keys come from the token, named three different ways.
    let config = format!(
        r#"
[aziot_keys]
homedir_path = "{{home}}"
pkcs11_lib_path = "{MODULE}"
"preloaded_key:device-id" = "pkcs11:token={label};id=%03?pin-source=file:{pin}"

[preloaded_keys]
local-ca = "pkcs11:token={label};object=tool-ec?pin-value={PIN}"
edge-ca = "pkcs11:slot-id={slot};id=%02;type=private?pin-value={PIN}"
"#,
        label = hsm.label,
        slot = hsm.slot,
        pin = pin_file.display(),
    );
    let keyd = Keyd::start_with_env(&config, hsm.env());
    let client = keyd.client();

    let ec = client.load_key_pair("local-ca").await.unwrap();
    let ec_public = ec_public_key_from_parameters(&client, &ec).await;
    let tool_public = public_key_from_pkcs11_tool(&hsm, "tool-ec")
        .ec_key()
        .unwrap();
    let digest = openssl::sha::sha256(b"csr");
    let signature = client
        .sign(&ec, SignMechanism::Ecdsa { digest: &digest })
        .await
        .unwrap();
    assert!(ecdsa_verifies(&ec_public, &digest, &signature));
    assert!(ecdsa_verifies(&tool_public, &digest, &signature));

    let rsa = client.load_key_pair("edge-ca").await.unwrap();
    let rsa_public = rsa_public_key_from_parameters(&client, &rsa).await;
    let tool_rsa = public_key_from_pkcs11_tool(&hsm, "tool-rsa").rsa().unwrap();
    assert_eq!(rsa_public.n().to_vec(), tool_rsa.n().to_vec());
    let mut digest_info = SHA256_DIGEST_INFO.to_vec();
    digest_info.extend_from_slice(&openssl::sha::sha256(b"tbs"));
    let signature = client
        .encrypt(&rsa, EncryptMechanism::RsaPkcs1, &digest_info)
        .await
        .unwrap();
    let mut recovered = vec![0_u8; 256];
    let length = tool_rsa
        .public_decrypt(&signature, &mut recovered, Padding::PKCS1)
        .unwrap();
    assert_eq!(&recovered[..length], &digest_info[..]);

    // The generic secret's value cannot be read, so compare with the token's own HMAC as
    // computed by pkcs11-tool.
    let hmac = client.load_key("device-id").await.unwrap();
    let message_file = hsm.path("message");
    let signature_file = hsm.path("signature");
    std::fs::write(&message_file, b"sas token string").unwrap();
    hsm.tool_ok(&[
        "--sign",
        "-m",
        "SHA256-HMAC",
        "--id",
        "03",
        "-i",
        message_file.to_str().unwrap(),
        "-o",
        signature_file.to_str().unwrap(),
    ]);
    let signature = client
        .sign(
            &hmac,
            SignMechanism::HmacSha256 {
                message: b"sas token string",
            },
        )
        .await
        .unwrap();
    assert_eq!(signature, std::fs::read(&signature_file).unwrap());

    // Preloaded keys are read-only.
    let error = client.delete_key_pair(&ec).await.unwrap_err();
    assert_eq!(error.status().map(|status| status.as_u16()), Some(409));
    let error = client.delete_key(&hmac).await.unwrap_err();
    assert_eq!(error.status().map(|status| status.as_u16()), Some(409));
    // The PIN never shows up in the log.
    assert!(
        !keyd.log().contains(&format!("pin-value={PIN}")),
        "{}",
        keyd.log()
    );
}

#[tokio::test]
async fn restart_keeps_using_the_same_token_objects() {
    let hsm = SoftHsm::new("restart");
    let mut keyd = start(&hsm);
    let client = keyd.client();
    let pair = client
        .create_key_pair_if_not_exists("device-id", Some("ec-p256"))
        .await
        .unwrap();
    let key = client
        .create_key_if_not_exists("aziot_identityd_master_id", "derive,sign")
        .await
        .unwrap();
    let point = client
        .get_key_pair_public_parameter(&pair, "ec-point")
        .await
        .unwrap();
    let mac = client
        .sign(&key, SignMechanism::HmacSha256 { message: b"m" })
        .await
        .unwrap();
    let objects = hsm.objects().len();

    keyd.spawn();
    let client = keyd.client();
    // Old handles still verify (the validation key is the same token object) ...
    assert_eq!(
        client
            .get_key_pair_public_parameter(&pair, "ec-point")
            .await
            .unwrap(),
        point
    );
    assert_eq!(
        client
            .sign(&key, SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap(),
        mac
    );
    // ... creating again returns the existing keys, and nothing new was generated.
    let key = client
        .create_key_if_not_exists("aziot_identityd_master_id", "derive,sign")
        .await
        .unwrap();
    assert_eq!(
        client
            .sign(&key, SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap(),
        mac
    );
    let pair = client.load_key_pair("device-id").await.unwrap();
    let public = ec_public_key_from_parameters(&client, &pair).await;
    let digest = [9_u8; 32];
    let signature = client
        .sign(&pair, SignMechanism::Ecdsa { digest: &digest })
        .await
        .unwrap();
    assert!(ecdsa_verifies(&public, &digest, &signature));
    assert_eq!(hsm.objects().len(), objects);
}

#[tokio::test]
async fn move_delete_and_file_fallback() {
    let hsm = SoftHsm::new("lifecycle");
    let keyd = start(&hsm);
    let client = keyd.client();

    // Rotation: the temp key pair replaces the old one; both halves are relabelled.
    let old = client
        .create_key_pair_if_not_exists("edge-ca", Some("ec-p256"))
        .await
        .unwrap();
    let temp = client
        .create_key_pair_if_not_exists("edge-ca-temp", Some("ec-p256"))
        .await
        .unwrap();
    let temp_point = client
        .get_key_pair_public_parameter(&temp, "ec-point")
        .await
        .unwrap();
    client
        .move_key_pair("edge-ca-temp", "edge-ca")
        .await
        .unwrap();
    assert_eq!(hsm.objects_labelled("edge-ca").len(), 2);
    assert!(hsm.objects_labelled("edge-ca-temp").is_empty());
    // The old handle names the ID, so it now reaches the moved key.
    assert_eq!(
        client
            .get_key_pair_public_parameter(&old, "ec-point")
            .await
            .unwrap(),
        temp_point
    );
    let error = client.load_key_pair("edge-ca-temp").await.unwrap_err();
    assert_eq!(error.status().map(|status| status.as_u16()), Some(404));

    // Delete destroys both halves.
    client.delete_key_pair(&old).await.unwrap();
    assert!(hsm.objects_labelled("edge-ca").is_empty());
    let error = client
        .sign(&old, SignMechanism::Ecdsa { digest: &[1; 32] })
        .await
        .unwrap_err();
    assert_eq!(error.status().map(|status| status.as_u16()), Some(404));
    client.delete_key_pair(&old).await.unwrap();

    let key = client.create_key_if_not_exists("k", "sign").await.unwrap();
    assert_eq!(hsm.objects_labelled("k").len(), 1);
    client.delete_key(&key).await.unwrap();
    assert!(hsm.objects_labelled("k").is_empty());

    // `encrypt` together with `sign` has no single token object type: it goes to a file.
    let mixed = client
        .create_key_if_not_exists("mixed", "encrypt,sign")
        .await
        .unwrap();
    assert!(hsm.objects_labelled("mixed").is_empty());
    assert!(
        key_files(&keyd)
            .iter()
            .any(|name| name.starts_with("mixed-")),
        "{:?}",
        key_files(&keyd)
    );
    client
        .sign(&mixed, SignMechanism::HmacSha256 { message: b"x" })
        .await
        .unwrap();
    // So does an import the token refuses (an AES key of a length AES does not have).
    client
        .import_key("odd-aes", "encrypt", &[1; 20])
        .await
        .unwrap();
    assert!(hsm.objects_labelled("odd-aes").is_empty());
    assert!(key_files(&keyd)
        .iter()
        .any(|name| name.starts_with("oddaes-")));
    // An import that goes to a file replaces a token key of that ID (which would shadow it).
    let shadow = client.import_key("shadow", "sign", &[1; 32]).await.unwrap();
    assert_eq!(hsm.objects_labelled("shadow").len(), 1);
    client
        .import_key("shadow", "encrypt,sign", &[2; 32])
        .await
        .unwrap();
    assert!(hsm.objects_labelled("shadow").is_empty());
    assert_eq!(
        client
            .sign(&shadow, SignMechanism::HmacSha256 { message: b"x" })
            .await
            .unwrap(),
        hmac_sha256(&[2; 32], b"x")
    );
}

#[test]
fn startup_fails_clearly_for_a_wrong_pin_slot_token_or_library() {
    let hsm = SoftHsm::new("startup");
    let env = hsm.env();
    let conf = hsm.conf.display().to_string();
    let wrong_pin = "97531";
    let cases = [
        (
            format!("pkcs11:token=startup?pin-value={wrong_pin}"),
            MODULE.to_owned(),
            "rejected the PIN",
        ),
        (
            format!("pkcs11:slot-id=424242?pin-value={PIN}"),
            MODULE.to_owned(),
            "no PKCS#11 slot has ID 424242",
        ),
        (
            format!("pkcs11:token=nonexistent?pin-value={PIN}"),
            MODULE.to_owned(),
            "no initialized PKCS#11 token is labelled \"nonexistent\"",
        ),
        (
            format!("pkcs11:token=startup?pin-value={PIN}"),
            "/nonexistent/libpkcs11.so".to_owned(),
            "cannot load the PKCS#11 module /nonexistent/libpkcs11.so",
        ),
    ];
    for (base_slot, module, expected) in cases {
        let config = format!(
            "[aziot_keys]\nhomedir_path = \"{{home}}\"\npkcs11_lib_path = \"{module}\"\npkcs11_base_slot = \"{base_slot}\"\n"
        );
        let keyd = Keyd::prepare(&config, env.clone());
        let (code, output) = run_to_exit(
            &keyd.config_file,
            &keyd.config_dir,
            &[("SOFTHSM2_CONF", conf.as_str())],
        );
        assert!(
            code.is_some_and(|code| code != 0),
            "{base_slot}: exit {code:?}\n{output}"
        );
        assert!(output.contains(expected), "{base_slot}: {output}");
        assert!(!output.contains(wrong_pin), "the PIN was printed: {output}");
        assert!(!output.contains(&format!("pin-value={PIN}")), "{output}");
    }
    // The wrong-PIN attempt did not lock the token: the right PIN still works.
    let keyd = start(&hsm);
    assert!(keyd.socket.exists());
}

/// Without a file store, a re-import the token refuses (an AES key of 20 bytes) is an error and
/// leaves the key that was there in the token and usable.
#[tokio::test]
async fn a_refused_import_into_a_token_only_keyd_keeps_the_old_key() {
    let hsm = SoftHsm::new("tokenonly");
    let config = hsm.keyd_config().replace("homedir_path = \"{home}\"\n", "");
    assert!(!config.contains("homedir_path"), "{config}");
    let keyd = Keyd::start_with_env(&config, hsm.env());
    let client = keyd.client();
    let key_bytes = [0x11_u8; 32];
    let handle = client
        .import_key("refused", "sign", &key_bytes)
        .await
        .unwrap();
    let error = client
        .import_key("refused", "encrypt", &[0x22; 20])
        .await
        .unwrap_err();
    // A storage failure, as docs/keyd.md lists it (details only in the log).
    assert_eq!(error.status().map(|status| status.as_u16()), Some(500));
    assert_eq!(hsm.objects_labelled("refused").len(), 1, "{}", keyd.log());
    let signature = client
        .sign(
            &handle,
            SignMechanism::HmacSha256 {
                message: b"still here",
            },
        )
        .await
        .unwrap();
    assert_eq!(signature, hmac_sha256(&key_bytes, b"still here"));
}
