//! Black-box tests: the real certd binary signing through the real keyd binary, each on a
//! temporary socket with a temporary config. Issued certificates are checked with OpenSSL (the
//! library's X509 store and the `openssl verify` tool), never with certd's own code.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{
    csr_pem, ec_key, now_seconds, openssl_ca, parse_chain, request_as_nobody, rsa_key,
    unix_seconds, verify, verify_with_cli, Pair, Profile,
};
use http::{Method, StatusCode};
use openssl::x509::X509;

const V: &str = "api-version=2020-09-01";

/// Extensions of a DER certificate or CSR, parsed independently of certd with OpenSSL's text
/// dump: (name line, critical) pairs.
fn extension_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|line| line.starts_with("X509v3 "))
        .map(str::to_owned)
        .collect()
}

fn openssl_text(certificate: &X509) -> String {
    String::from_utf8(certificate.to_text().unwrap()).unwrap()
}

fn serial_bytes(certificate: &X509) -> Vec<u8> {
    certificate.serial_number().to_bn().unwrap().to_vec()
}

/// A self-signed cert from a CSR (method `self_signed`, key pair `<certId>` in keyd) verifies
/// against itself, carries every CSR extension with its criticality, SKID = AKID, a positive
/// 16-byte serial, notBefore now − 60 s and notAfter now + expiry_days.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_cert_verifies_and_keeps_csr_extensions() {
    let mut pair = Pair::new();
    let key = ec_key();
    pair.add_key("aziot-edged-ca", &key);
    pair.start("[cert_issuance.aziot-edged-ca]\nmethod = \"self_signed\"\nexpiry_days = 90\n");
    let client = pair.certd_client();

    let request = common::csr(&key, "Test Edge CA", Profile::Ca);
    let pem = client
        .create_cert(
            "aziot-edged-ca",
            &String::from_utf8(request.to_pem().unwrap()).unwrap(),
            None,
        )
        .await
        .unwrap();
    let chain = parse_chain(&pem);
    assert_eq!(chain.len(), 1, "a self-signed cert has no chain");
    let certificate = &chain[0];
    verify(&chain, certificate).unwrap();
    verify_with_cli(pair.root.path(), &pem, certificate);

    // Subject and issuer are the CSR's subject.
    let text = openssl_text(certificate);
    assert!(text.contains("Subject: CN=Test Edge CA"), "{text}");
    assert!(text.contains("Issuer: CN=Test Edge CA"), "{text}");
    assert!(text.contains("Version: 3 (0x2)"), "{text}");
    assert!(text.contains("ecdsa-with-SHA256"), "{text}");
    // The requested extensions are there, critical as requested.
    let lines = extension_lines(&text);
    assert!(
        lines.contains(&"X509v3 Basic Constraints: critical".to_owned()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"X509v3 Key Usage: critical".to_owned()),
        "{lines:?}"
    );
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(
        text.contains("Digital Signature, Certificate Sign"),
        "{text}"
    );
    // SKID added (SHA-1 of the public key) and AKID = SKID.
    let skid = certificate.subject_key_id().unwrap().as_slice().to_vec();
    let public_der = key.public_key_to_der().unwrap();
    let spki = x509_cert::spki::SubjectPublicKeyInfoOwned::try_from(public_der.as_slice()).unwrap();
    assert_eq!(
        skid,
        openssl::sha::sha1(spki.subject_public_key.raw_bytes()).to_vec()
    );
    assert_eq!(certificate.authority_key_id().unwrap().as_slice(), skid);
    // Serial: positive, 16 bytes.
    let serial = serial_bytes(certificate);
    assert_eq!(serial.len(), 16, "{serial:?}");
    assert!(!certificate.serial_number().to_bn().unwrap().is_negative());
    // Validity.
    let now = now_seconds();
    let not_before = unix_seconds(certificate.not_before());
    let not_after = unix_seconds(certificate.not_after());
    assert!(
        (now - 60 - not_before).abs() <= 5,
        "notBefore {not_before}, now {now}"
    );
    assert!(
        (now + 90 * 86_400 - not_after).abs() <= 5,
        "notAfter {not_after}"
    );
    // The signature key is keyd's key pair "aziot-edged-ca".
    assert!(certificate.public_key().unwrap().public_eq(&key));
    // Stored as issued.
    assert_eq!(client.get_cert("aziot-edged-ca").await.unwrap(), pem);
}

/// Certificates issued by a caller-named issuer (`issuer: {certId, privateKeyHandle}`) verify
/// against their chain, for EC P-256 and RSA-2048 issuers; serials differ; validity is capped at
/// the issuer's notAfter; the chain is leaf first, then the issuer's stored chain; AKID is the
/// issuer's SKID; IDs containing `/` work unencoded in the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_signed_certs_verify_for_ec_and_rsa_issuers() {
    let mut pair = Pair::new();
    let ec_issuer_key = ec_key();
    let rsa_issuer_key = rsa_key();
    pair.add_key("ca-ec", &ec_issuer_key);
    pair.add_key("ca-rsa", &rsa_issuer_key);
    pair.start(
        "[cert_issuance.ca-ec]\nmethod = \"self_signed\"\nexpiry_days = 10\nca = true\n\
         [cert_issuance.ca-rsa]\nmethod = \"self_signed\"\nexpiry_days = 10\nca = true\n",
    );
    let client = pair.certd_client();
    let keyd = pair.keyd_client();

    for (issuer_id, issuer_key, signature) in [
        ("ca-ec", &ec_issuer_key, "ecdsa-with-SHA256"),
        ("ca-rsa", &rsa_issuer_key, "sha256WithRSAEncryption"),
    ] {
        let issuer_pem = client
            .create_cert(
                issuer_id,
                &csr_pem(issuer_key, issuer_id, Profile::Ca),
                None,
            )
            .await
            .unwrap();
        let issuer = parse_chain(&issuer_pem).remove(0);
        let handle = keyd.load_key_pair(issuer_id).await.unwrap();

        let mut serials = Vec::new();
        for index in 0..2 {
            let leaf_key = if index == 0 { ec_key() } else { rsa_key() };
            let cert_id = format!("aziot-edged/module/m{index}:637:server");
            let pem = client
                .create_cert(
                    &cert_id,
                    &csr_pem(&leaf_key, "module.example", Profile::Server),
                    Some((issuer_id, &handle)),
                )
                .await
                .unwrap();
            let chain = parse_chain(&pem);
            assert_eq!(chain.len(), 2, "leaf then issuer");
            assert_eq!(chain[1].to_der().unwrap(), issuer.to_der().unwrap());
            assert!(
                pem.ends_with(&issuer_pem),
                "the issuer's stored chain is appended verbatim"
            );
            verify(&chain, &issuer).unwrap_or_else(|error| panic!("{issuer_id}: {error}"));
            verify_with_cli(pair.root.path(), &pem, &issuer);

            let leaf = &chain[0];
            let text = openssl_text(leaf);
            assert!(text.contains(signature), "{issuer_id}: {text}");
            assert!(
                text.contains("Issuer: CN=") && text.contains(issuer_id),
                "{text}"
            );
            assert!(
                text.contains("DNS:module.example, IP Address:127.0.0.1"),
                "{text}"
            );
            assert!(text.contains("TLS Web Server Authentication"), "{text}");
            assert!(
                extension_lines(&text).contains(&"X509v3 Key Usage: critical".to_owned()),
                "{text}"
            );
            assert!(leaf.public_key().unwrap().public_eq(&leaf_key));
            // Default 30 days, capped at the issuer's notAfter (10 days).
            assert_eq!(
                leaf.not_after().compare(issuer.not_after()).unwrap(),
                std::cmp::Ordering::Equal
            );
            assert_eq!(
                leaf.authority_key_id().unwrap().as_slice(),
                issuer.subject_key_id().unwrap().as_slice()
            );
            serials.push(serial_bytes(leaf));

            // Stored under the ID; reachable with the `/` unencoded and encoded.
            let (status, body, _) = pair
                .request(Method::GET, &format!("/certificates/{cert_id}?{V}"), "")
                .await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body["pem"], pem.as_str());
            assert_eq!(client.get_cert(&cert_id).await.unwrap(), pem);
        }
        serials.push(serial_bytes(&issuer));
        serials.sort();
        serials.dedup();
        assert_eq!(serials.len(), 3, "serials differ");
    }
}

/// `method = "local_ca"` issues from `[cert_issuance.local_ca]` (a preloaded CA file and its key
/// in keyd): the subject comes from `common_name`, validity is capped at the CA's notAfter, and
/// the chain verifies. The draft create route issues through the local CA too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_ca_issuance_caps_validity_and_verifies() {
    let mut pair = Pair::new();
    let ca_key = rsa_key();
    pair.add_key("local-ca", &ca_key);
    let ca = openssl_ca(&ca_key, "Local CA", -1, 5);
    std::fs::write(pair.path("local-ca.pem"), ca.to_pem().unwrap()).unwrap();
    pair.start(
        "[cert_issuance.local_ca]\ncert = \"local-ca\"\npk = \"local-ca\"\n\
         [cert_issuance.device-id]\nmethod = \"local_ca\"\ncommon_name = \"my-device\"\nexpiry_days = 365\n\
         [cert_issuance.draft-device]\nmethod = \"local_ca\"\nsubject = { O = \"Contoso\", CN = \"draft device\" }\n\
         [preloaded_certs]\nlocal-ca = \"file://{dir}/local-ca.pem\"\n",
    );
    let client = pair.certd_client();
    let device_key = ec_key();
    let pem = client
        .create_cert(
            "device-id",
            &csr_pem(&device_key, "ignored subject", Profile::Server),
            None,
        )
        .await
        .unwrap();
    let chain = parse_chain(&pem);
    assert_eq!(chain.len(), 2);
    verify(&chain, &ca).unwrap();
    verify_with_cli(pair.root.path(), &pem, &ca);
    let leaf = &chain[0];
    let text = openssl_text(leaf);
    assert!(text.contains("Subject: CN=my-device\n"), "{text}");
    assert!(text.contains("Issuer: CN=Local CA"), "{text}");
    assert!(text.contains("sha256WithRSAEncryption"), "{text}");
    assert_eq!(
        leaf.not_after().compare(ca.not_after()).unwrap(),
        std::cmp::Ordering::Equal,
        "365 days capped at the CA's 5"
    );
    // The CA has no SKID; the AKID is computed from its public key.
    assert!(ca.subject_key_id().is_none());
    let ca_spki = x509_cert::spki::SubjectPublicKeyInfoOwned::try_from(
        ca_key.public_key_to_der().unwrap().as_slice(),
    )
    .unwrap();
    assert_eq!(
        leaf.authority_key_id().unwrap().as_slice(),
        openssl::sha::sha1(ca_spki.subject_public_key.raw_bytes()).as_slice()
    );

    let (draft_pem, created) = client.draft_create_cert("draft-device").await.unwrap();
    assert!(created);
    let chain = parse_chain(&draft_pem);
    verify(&chain, &ca).unwrap();
    let text = openssl_text(&chain[0]);
    assert!(
        text.contains("Subject: O=Contoso, CN=draft device"),
        "{text}"
    );
    // The key pair was created in keyd under the cert ID.
    let handle = pair
        .keyd_client()
        .load_key_pair("draft-device")
        .await
        .unwrap();
    let point = pair
        .keyd_client()
        .get_key_pair_public_parameter(&handle, "algorithm")
        .await
        .unwrap();
    assert_eq!(point, "ECDSA");
    // ... and it is that key pair the certificate certifies.
    assert_certifies_keyd_key(&pair, &chain[0], "draft-device").await;
}

/// Asserts that `cert`'s (EC) public key is keyd's key pair `id`.
async fn assert_certifies_keyd_key(pair: &Pair, cert: &X509, id: &str) {
    let keyd = pair.keyd_client();
    let handle = keyd.load_key_pair(id).await.unwrap();
    let point = keyd
        .get_key_pair_public_parameter(&handle, "ec-point")
        .await
        .unwrap();
    let ec = cert.public_key().unwrap().ec_key().unwrap();
    let mut context = openssl::bn::BigNumContext::new().unwrap();
    let compressed = ec
        .public_key()
        .to_bytes(
            ec.group(),
            openssl::ec::PointConversionForm::COMPRESSED,
            &mut context,
        )
        .unwrap();
    use base64::Engine as _;
    assert_eq!(
        base64::engine::general_purpose::STANDARD.encode(compressed),
        point
    );
}

/// Seed routes: POST creates (201, then 200 with the same PEM), GET with a body or a query loads,
/// POST/PUT/GET with `pem` import; the created cert is self-signed by key pair `<certid>` in keyd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draft_routes_create_load_and_import() {
    let mut pair = Pair::new();
    pair.start("");
    let (status, body, _) = pair
        .request(Method::POST, "/certstore/cert", r#"{"certid":"draft-1"}"#)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let pem = body["pem"].as_str().unwrap().to_owned();
    let chain = parse_chain(&pem);
    verify(&chain, &chain[0]).unwrap();
    let text = openssl_text(&chain[0]);
    assert!(text.contains("Subject: CN=draft-1\n"), "{text}");

    let (status, body, _) = pair
        .request(Method::POST, "/certstore/cert?certid=draft-1", "")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["pem"], pem.as_str());
    let (status, body, _) = pair
        .request(Method::GET, "/certstore/cert", r#"{"certid":"draft-1"}"#)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["pem"], pem.as_str());
    let (status, body, _) = pair
        .request(Method::GET, &format!("/certificates/draft-1?{V}"), "")
        .await;
    assert_eq!(
        (status, body["pem"].as_str()),
        (StatusCode::OK, Some(pem.as_str()))
    );

    // The certificate's key is keyd's key pair "draft-1".
    assert_certifies_keyd_key(&pair, &chain[0], "draft-1").await;

    // Imports through each draft spelling answer 200 with the stored PEM.
    let imported = openssl_ca(&ec_key(), "imported", 0, 1);
    let imported_pem = String::from_utf8(imported.to_pem().unwrap()).unwrap();
    for (method, id) in [
        (Method::POST, "imp-1"),
        (Method::PUT, "imp-2"),
        (Method::GET, "imp-3"),
    ] {
        let body = serde_json::json!({ "certid": id, "pem": imported_pem }).to_string();
        let (status, answer, _) = pair.request(method.clone(), "/certstore/cert", &body).await;
        assert_eq!(status, StatusCode::OK, "{method}: {answer}");
        assert_eq!(answer["pem"], imported_pem.as_str());
        assert_eq!(
            pair.certd_client().get_cert(id).await.unwrap(),
            imported_pem
        );
    }
}

/// Dynamic certs are files in the reference layout (0600 in a 0700 folder) and survive a certd
/// restart; delete answers 204 even when the cert is absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_survive_a_restart_in_the_reference_layout() {
    let mut pair = Pair::new();
    let key = ec_key();
    pair.add_key("edge", &key);
    pair.start("[cert_issuance.edge]\nmethod = \"self_signed\"\nca = true\n");
    let client = pair.certd_client();
    let issued = client
        .create_cert("edge", &csr_pem(&key, "edge", Profile::Ca), None)
        .await
        .unwrap();
    let imported = String::from_utf8(openssl_ca(&ec_key(), "x", 0, 1).to_pem().unwrap()).unwrap();
    let module_id = "aziot-edged/module/edgeHub:1:server";
    assert_eq!(
        client.import_cert(module_id, &imported).await.unwrap(),
        imported
    );

    let certs = pair.certd.home().join("certs");
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&certs), 0o700);
    let hex = |id: &str| {
        openssl::sha::sha256(id.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    };
    let module_file = certs.join(format!(
        "aziotedgedmoduleedgeHub1server-{}.cer",
        hex(module_id)
    ));
    assert_eq!(std::fs::read_to_string(&module_file).unwrap(), imported);
    assert_eq!(mode(&module_file), 0o600);
    assert_eq!(
        std::fs::read_to_string(certs.join(format!("edge-{}.cer", hex("edge")))).unwrap(),
        issued
    );

    pair.certd.spawn();
    let client = pair.certd_client();
    assert_eq!(client.get_cert("edge").await.unwrap(), issued);
    assert_eq!(client.get_cert(module_id).await.unwrap(), imported);

    // A cert written in the reference layout by someone else is served too.
    std::fs::write(
        certs.join(format!("legacy-{}.cer", hex("legacy"))),
        &imported,
    )
    .unwrap();
    assert_eq!(client.get_cert("legacy").await.unwrap(), imported);

    client.delete_cert(module_id).await.unwrap();
    client.delete_cert(module_id).await.unwrap();
    assert!(!module_file.exists());
    let error = client.get_cert(module_id).await.unwrap_err();
    assert_eq!(error.status(), Some(StatusCode::NOT_FOUND));
    pair.certd.spawn();
    assert_eq!(
        pair.certd_client()
            .get_cert(module_id)
            .await
            .unwrap_err()
            .status(),
        Some(StatusCode::NOT_FOUND)
    );
}

/// A real unprivileged caller (uid 65534) may write only the IDs its `[[principal]]` globs name
/// (403 otherwise, for import, delete and issuance), and may read any cert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_writer_is_refused() {
    // SAFETY: geteuid(2) has no preconditions.
    let effective_uid = unsafe { libc::geteuid() };
    assert_eq!(
        effective_uid, 0,
        "this test switches uid and must run as root"
    );
    let mut pair = Pair::new();
    pair.start("[[principal]]\nuid = 65534\ncerts = [\"allowed/*\"]\n");
    let pem = String::from_utf8(openssl_ca(&ec_key(), "x", 0, 1).to_pem().unwrap()).unwrap();
    pair.certd_client()
        .import_cert("root-owned", &pem)
        .await
        .unwrap();
    let socket = pair.certd.socket.clone();
    let import = serde_json::json!({ "pem": pem }).to_string();

    let (status, body) = tokio::task::spawn_blocking({
        let (socket, import) = (socket.clone(), import.clone());
        move || {
            request_as_nobody(
                &socket,
                "PUT",
                &format!("/certificates/denied?{V}"),
                &import,
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["message"],
        "user 65534 is not authorized to modify the cert denied"
    );

    let socket_for = socket.clone();
    let results = tokio::task::spawn_blocking(move || {
        let csr = serde_json::json!({ "certId": "denied", "csr": csr_pem(&ec_key(), "x", Profile::Server) })
            .to_string();
        vec![
            request_as_nobody(&socket_for, "PUT", &format!("/certificates/allowed/x?{V}"), &import),
            request_as_nobody(&socket_for, "GET", &format!("/certificates/root-owned?{V}"), ""),
            request_as_nobody(&socket_for, "DELETE", &format!("/certificates/root-owned?{V}"), ""),
            request_as_nobody(&socket_for, "POST", &format!("/certificates?{V}"), &csr),
            request_as_nobody(&socket_for, "POST", "/certstore/cert", r#"{"certid":"denied2"}"#),
            request_as_nobody(&socket_for, "DELETE", &format!("/certificates/allowed/x?{V}"), ""),
        ]
    })
    .await
    .unwrap();
    let statuses: Vec<u16> = results.iter().map(|(status, _)| *status).collect();
    assert_eq!(statuses, vec![201, 200, 403, 403, 403, 204], "{results:?}");
    assert_eq!(results[1].1["pem"], pem.as_str());
    // Root's cert is untouched.
    assert_eq!(
        pair.certd_client().get_cert("root-owned").await.unwrap(),
        pem
    );
}

/// Bad inputs get 4xx with a JSON `message`: malformed CSR, tampered CSR signature, garbage
/// PEM, invalid JSON, wrong content type, unknown issuer, invalid handle, a handle for the wrong
/// key, an expired issuer, no issuer for an unconfigured ID, and a CSR whose key is not keyd's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_invalid_requests_get_json_4xx() {
    let mut pair = Pair::new();
    let ca_key = ec_key();
    let other_key = rsa_key();
    let self_key = ec_key();
    pair.add_key("ca", &ca_key);
    pair.add_key("other", &other_key);
    pair.add_key("self", &self_key);
    pair.start("[cert_issuance.self]\nmethod = \"self_signed\"\n");
    let client = pair.certd_client();
    let keyd = pair.keyd_client();
    let ca_pem = String::from_utf8(openssl_ca(&ca_key, "CA", -1, 30).to_pem().unwrap()).unwrap();
    client.import_cert("ca", &ca_pem).await.unwrap();
    let expired_pem =
        String::from_utf8(openssl_ca(&ca_key, "Old CA", -10, -1).to_pem().unwrap()).unwrap();
    client
        .import_cert("expired-ca", &expired_pem)
        .await
        .unwrap();
    let ca_handle = keyd.load_key_pair("ca").await.unwrap();
    let other_handle = keyd.load_key_pair("other").await.unwrap();

    let good_csr = csr_pem(&ec_key(), "leaf", Profile::Server);
    let mut tampered = common::csr(&ec_key(), "leaf", Profile::Server)
        .to_der()
        .unwrap();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x01;
    let tampered = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        openssl::base64::encode_block(&tampered)
    );
    let with_issuer = |csr: &str, issuer: &str, handle: &str| {
        serde_json::json!({
            "certId": "leaf",
            "csr": csr,
            "issuer": { "certId": issuer, "privateKeyHandle": handle },
        })
        .to_string()
    };
    let create = format!("/certificates?{V}");
    let cases: Vec<(Method, String, String, u16, &str)> = vec![
        (
            Method::POST,
            create.clone(),
            with_issuer("garbage!", "ca", &ca_handle.0),
            400,
            "csr: ",
        ),
        (
            Method::POST,
            create.clone(),
            with_issuer(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                "ca",
                &ca_handle.0,
            ),
            400,
            "csr: is not a valid PKCS#10 certification request",
        ),
        (
            Method::POST,
            create.clone(),
            with_issuer(&tampered, "ca", &ca_handle.0),
            400,
            "csr signature is invalid",
        ),
        (
            Method::POST,
            create.clone(),
            "{".into(),
            422,
            "request body is not valid",
        ),
        (
            Method::POST,
            create.clone(),
            r#"{"certId":"leaf"}"#.into(),
            422,
            "request body is not valid",
        ),
        (
            Method::POST,
            create.clone(),
            with_issuer(&good_csr, "nope", &ca_handle.0),
            404,
            "cert \"nope\" not found",
        ),
        (
            Method::POST,
            create.clone(),
            with_issuer(&good_csr, "ca", "not-a-handle"),
            400,
            "issuer.privateKeyHandle: ",
        ),
        (
            Method::POST,
            create.clone(),
            with_issuer(&good_csr, "ca", &other_handle.0),
            400,
            "issuer.privateKeyHandle: the key does not match the public key of cert \"ca\"",
        ),
        (
            Method::POST,
            create.clone(),
            with_issuer(&good_csr, "expired-ca", &ca_handle.0),
            400,
            "issuer certificate \"expired-ca\" has expired",
        ),
        (
            Method::POST,
            create.clone(),
            serde_json::json!({ "certId": "leaf", "csr": good_csr }).to_string(),
            400,
            "issuer is required for locally-issued certs",
        ),
        (
            Method::POST,
            create.clone(),
            serde_json::json!({ "certId": "self", "csr": good_csr }).to_string(),
            400,
            "csr: the public key does not match key pair \"self\" in keyd",
        ),
        (
            Method::PUT,
            format!("/certificates/x?{V}"),
            r#"{"pem":"garbage"}"#.into(),
            400,
            "pem: contains no PEM CERTIFICATE block",
        ),
        (
            Method::PUT,
            format!("/certificates/x?{V}"),
            r#"{"pem":"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}"#.into(),
            400,
            "pem: PEM block 0 is not a valid X.509 certificate",
        ),
        (
            Method::PUT,
            format!("/certificates/x?{V}"),
            "[]".into(),
            422,
            "request body is not valid",
        ),
        (
            Method::GET,
            "/certificates/x".into(),
            String::new(),
            400,
            "api-version not specified",
        ),
        (
            Method::PATCH,
            format!("/certificates/x?{V}"),
            String::new(),
            405,
            "method not allowed",
        ),
        (
            Method::GET,
            format!("/certificates/missing?{V}"),
            String::new(),
            404,
            "cert \"missing\" not found",
        ),
        (
            Method::GET,
            "/nowhere".into(),
            String::new(),
            404,
            "not found",
        ),
    ];
    for (method, path, body, status, message) in cases {
        let (actual, value, headers) = pair.request(method.clone(), &path, &body).await;
        assert_eq!(actual.as_u16(), status, "{method} {path} {body}: {value}");
        assert_eq!(headers[http::header::CONTENT_TYPE], "application/json");
        let text = value["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {value}"));
        assert!(
            text.starts_with(message),
            "{method} {path}: {text:?} does not start with {message:?}"
        );
        assert!(
            !text.contains(&ca_handle.0) && !text.contains(&other_handle.0),
            "handle leaked: {text}"
        );
    }
    // A non-JSON content type is 415.
    let (status, value, _) = common::request(
        &pair.certd.socket,
        Method::PUT,
        &format!("/certificates/x?{V}"),
        &[("content-type", "text/plain")],
        &serde_json::json!({ "pem": ca_pem }).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{value}");
    // Nothing was stored by the failed requests.
    for id in ["leaf", "x", "self"] {
        assert_eq!(
            client.get_cert(id).await.unwrap_err().status(),
            Some(StatusCode::NOT_FOUND)
        );
    }
    // Handles never reach certd's log.
    assert!(!pair.certd.log().contains(&ca_handle.0));
    assert!(!pair.certd.log().contains(&other_handle.0));
}

/// Preloaded certs (file URI, seed flat path, list) are served and read-only (409); list
/// members that are missing are skipped; a missing file is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preloaded_certs_are_served_and_read_only() {
    let mut pair = Pair::new();
    let first = String::from_utf8(openssl_ca(&ec_key(), "first", 0, 1).to_pem().unwrap()).unwrap();
    let second =
        String::from_utf8(openssl_ca(&ec_key(), "second", 0, 1).to_pem().unwrap()).unwrap();
    let dynamic =
        String::from_utf8(openssl_ca(&ec_key(), "dynamic", 0, 1).to_pem().unwrap()).unwrap();
    std::fs::write(pair.path("first.pem"), &first).unwrap();
    std::fs::write(pair.path("second.cer"), &second).unwrap();
    pair.start(
        "\"preloaded_cert:seed\" = \"{dir}/second.cer\"\n\
         [preloaded_certs]\n\
         trust-bundle-user = \"file://{dir}/first.pem\"\n\
         missing = \"file://{dir}/missing.pem\"\n\
         bundle = [\"trust-bundle-user\", \"absent\", \"dyn\", \"seed\"]\n",
    );
    let client = pair.certd_client();
    client.import_cert("dyn", &dynamic).await.unwrap();
    assert_eq!(client.get_cert("trust-bundle-user").await.unwrap(), first);
    assert_eq!(client.get_cert("seed").await.unwrap(), second);
    assert_eq!(
        client.get_cert("bundle").await.unwrap(),
        format!("{first}{dynamic}{second}")
    );
    assert_eq!(
        client.get_cert("missing").await.unwrap_err().status(),
        Some(StatusCode::NOT_FOUND)
    );
    // Read on every request, not copied.
    std::fs::write(pair.path("first.pem"), &second).unwrap();
    assert_eq!(client.get_cert("trust-bundle-user").await.unwrap(), second);

    for id in ["trust-bundle-user", "seed", "bundle", "missing"] {
        let (status, body, _) = pair
            .request(
                Method::PUT,
                &format!("/certificates/{id}?{V}"),
                &serde_json::json!({ "pem": dynamic }).to_string(),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(
            body["message"],
            format!("cert \"{id}\" is preloaded from configuration")
        );
        let (status, _, _) = pair
            .request(Method::DELETE, &format!("/certificates/{id}?{V}"), "")
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
    }
    let csr =
        serde_json::json!({ "certId": "seed", "csr": csr_pem(&ec_key(), "x", Profile::Server) })
            .to_string();
    let (status, _, _) = pair
        .request(Method::POST, &format!("/certificates?{V}"), &csr)
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        std::fs::read_to_string(pair.path("second.cer")).unwrap(),
        second,
        "user file untouched"
    );
}

/// Invalid configurations stop certd with exit code 153 and a message naming file and key.
#[test]
fn invalid_config_exits_153_naming_file_and_key() {
    let pair = Pair::new();
    let cases = [
        (
            "[cert_issuance.device-id]\nmethod = \"est\"\n",
            "cert_issuance.device-id.url",
        ),
        (
            "[cert_issuance.est]\nusername = \"u\"\n",
            "cert_issuance.est.password",
        ),
        (
            "[cert_issuance.x]\nexpiry_days = 0\n",
            "cert_issuance.x.expiry_days",
        ),
        (
            "[cert_issuance.x]\ncommon_name = \"a\"\nsubject = { CN = \"b\" }\n",
            "common_name and subject cannot both be set",
        ),
        ("[preloaded_certs]\nx = [\"x\"]\n", "preloaded_certs.x"),
        ("bogus = true\n", "`bogus`: unknown field"),
    ];
    for (config, expected) in cases {
        pair.write_configs(config);
        let (code, output) = pair.certd.run_to_exit();
        assert_eq!(code, Some(153), "{config}: {output}");
        assert!(output.contains(expected), "{config}: {output}");
        assert!(
            output.contains(&pair.certd.config_file().display().to_string()),
            "{output}"
        );
    }
    // A drop-in is named when it holds the bad key.
    pair.write_configs("");
    let dropin = pair.certd.config_dir().join("50-bad.toml");
    std::fs::write(&dropin, "max_requests = 0\n").unwrap();
    let (code, output) = pair.certd.run_to_exit();
    assert_eq!(code, Some(153), "{output}");
    assert!(
        output.contains("50-bad.toml") && output.contains("max_requests"),
        "{output}"
    );
}

/// With keyd unreachable, issuance answers 503 `key service unavailable` with Retry-After, and
/// stored certs are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyd_unreachable_is_503_with_retry_after() {
    let mut pair = Pair::new();
    pair.write_configs("[cert_issuance.self]\nmethod = \"self_signed\"\n");
    pair.certd.spawn(); // keyd is not started
    let pem = String::from_utf8(openssl_ca(&ec_key(), "x", 0, 1).to_pem().unwrap()).unwrap();
    pair.certd_client()
        .import_cert("stored", &pem)
        .await
        .unwrap();
    let csr =
        serde_json::json!({ "certId": "self", "csr": csr_pem(&ec_key(), "x", Profile::Server) })
            .to_string();
    let (status, body, headers) = pair
        .request(Method::POST, &format!("/certificates?{V}"), &csr)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["message"], "key service unavailable");
    assert_eq!(headers[http::header::RETRY_AFTER], "1");
    assert_eq!(pair.certd_client().get_cert("stored").await.unwrap(), pem);
}

/// Concurrent issuance to the same and to different cert IDs all succeeds; each ID ends up
/// holding one of the certificates issued for it (merged writes lose no acknowledged request's
/// durability: the stored value is the newest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_issuance_to_shared_and_distinct_ids() {
    let mut pair = Pair::new();
    let ca_key = ec_key();
    pair.add_key("ca", &ca_key);
    let ca = openssl_ca(&ca_key, "CA", -1, 30);
    std::fs::write(pair.path("ca.pem"), ca.to_pem().unwrap()).unwrap();
    pair.start("max_requests = 64\n[preloaded_certs]\nca = \"file://{dir}/ca.pem\"\n");
    let handle = pair.keyd_client().load_key_pair("ca").await.unwrap();
    let csr = csr_pem(&ec_key(), "leaf", Profile::Server);
    let mut tasks = Vec::new();
    for index in 0..40 {
        let client = pair.certd_client();
        let (handle, csr) = (handle.clone(), csr.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("module/{}", index % 4);
            let pem = client
                .create_cert(&id, &csr, Some(("ca", &handle)))
                .await
                .unwrap();
            (id, pem)
        }));
    }
    let mut issued: std::collections::HashMap<String, Vec<String>> = Default::default();
    for task in tasks {
        let (id, pem) = task.await.unwrap();
        verify(&parse_chain(&pem), &ca).unwrap();
        issued.entry(id).or_default().push(pem);
    }
    assert_eq!(issued.len(), 4);
    let client = pair.certd_client();
    for (id, pems) in &issued {
        assert_eq!(pems.len(), 10);
        let stored = client.get_cert(id).await.unwrap();
        assert!(
            pems.contains(&stored),
            "{id} holds a certificate nobody was given"
        );
    }
    // The same after a restart (what is on disk is what was served).
    pair.certd.spawn();
    let client = pair.certd_client();
    for (id, pems) in &issued {
        assert!(pems.contains(&client.get_cert(id).await.unwrap()));
    }
}

/// A drop-in added while certd runs is applied without a restart (preloaded certs here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_changes_are_reloaded() {
    let mut pair = Pair::new();
    pair.start("");
    let client = pair.certd_client();
    assert_eq!(
        client.get_cert("late").await.unwrap_err().status(),
        Some(StatusCode::NOT_FOUND)
    );
    let pem = String::from_utf8(openssl_ca(&ec_key(), "late", 0, 1).to_pem().unwrap()).unwrap();
    std::fs::write(pair.path("late.pem"), &pem).unwrap();
    std::fs::write(
        pair.certd.config_dir().join("50-late.toml"),
        format!(
            "[preloaded_certs]\nlate = \"{}\"\n",
            pair.path("late.pem").display()
        ),
    )
    .unwrap();
    // Applied once the files have been quiet for the debounce (10 s).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match client.get_cert("late").await {
            Ok(served) => {
                assert_eq!(served, pem);
                break;
            }
            Err(error) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "not reloaded: {error}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
    // An invalid change is ignored and the old configuration stays in force.
    std::fs::write(pair.certd.config_dir().join("60-bad.toml"), "bogus = 1\n").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !pair.certd.log().contains("keeping the old one") {
        assert!(
            std::time::Instant::now() < deadline,
            "the invalid change was not noticed: {}",
            pair.certd.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(client.get_cert("late").await.unwrap(), pem);
}
