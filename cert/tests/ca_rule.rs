//! The CA rule, black box (real keyd and certd binaries): an implicit issuer (the local CA,
//! self-signed) never issues a CA certificate for a cert ID that may not be one, whoever asks; the
//! local CA's own cert ID, the Edge CA IDs and IDs with `ca = true` may be; a caller that names an
//! issuer (and so holds its key) is not restricted. Whether a certificate is a CA is judged by
//! OpenSSL: a certificate signed with its key must (or must not) verify through it.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use common::{csr_pem, ec_key, openssl_ca, parse_chain, request_as_nobody, verify, Pair, Profile};
use http::Method;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage};
use openssl::x509::{X509Extension, X509ReqBuilder, X509};

const V: &str = "api-version=2020-09-01";

/// A CSR for `common_name` signed by `key`, requesting exactly `extensions`.
fn csr_with(key: &PKey<Private>, common_name: &str, extensions: Vec<X509Extension>) -> String {
    let mut builder = X509ReqBuilder::new().unwrap();
    builder.set_pubkey(key).unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", common_name).unwrap();
    builder.set_subject_name(&name.build()).unwrap();
    let mut stack = openssl::stack::Stack::new().unwrap();
    for extension in extensions {
        stack.push(extension).unwrap();
    }
    builder.add_extensions(&stack).unwrap();
    builder.sign(key, MessageDigest::sha256()).unwrap();
    String::from_utf8(builder.build().to_pem().unwrap()).unwrap()
}

/// keyUsage keyCertSign (with digitalSignature) and nothing else: no basicConstraints.
fn key_cert_sign_only_csr(key: &PKey<Private>) -> String {
    csr_with(
        key,
        "sneaky",
        vec![KeyUsage::new()
            .critical()
            .digital_signature()
            .key_cert_sign()
            .build()
            .unwrap()],
    )
}

/// A leaf request as identityd makes them: basicConstraints CA:FALSE, keyUsage, EKU.
fn leaf_csr(key: &PKey<Private>) -> String {
    csr_with(
        key,
        "module leaf",
        vec![
            BasicConstraints::new().critical().build().unwrap(),
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_encipherment()
                .build()
                .unwrap(),
            ExtendedKeyUsage::new()
                .client_auth()
                .server_auth()
                .build()
                .unwrap(),
        ],
    )
}

/// A certificate made locally by OpenSSL, issued by `issuer` with `issuer_key`.
fn signed_by(issuer: &X509, issuer_key: &PKey<Private>) -> X509 {
    let key = ec_key();
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    let serial = openssl::bn::BigNum::from_u32(99)
        .unwrap()
        .to_asn1_integer()
        .unwrap();
    builder.set_serial_number(&serial).unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "grandchild").unwrap();
    builder.set_subject_name(&name.build()).unwrap();
    builder.set_issuer_name(issuer.subject_name()).unwrap();
    builder.set_pubkey(&key).unwrap();
    builder
        .set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    builder
        .set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    builder.sign(issuer_key, MessageDigest::sha256()).unwrap();
    builder.build()
}

/// Whether OpenSSL accepts `chain[0]` as a CA under `anchor`: a certificate signed with
/// `key` (chain[0]'s key) verifies with `chain` as its intermediates.
fn acts_as_ca(chain: &[X509], key: &PKey<Private>, anchor: &X509) -> Result<(), String> {
    let mut with_child = vec![signed_by(&chain[0], key)];
    with_child.extend(chain.iter().cloned());
    verify(&with_child, anchor)
}

fn text(certificate: &X509) -> String {
    String::from_utf8(certificate.to_text().unwrap()).unwrap()
}

fn expected_refusal(id: &str, extension: &str) -> String {
    format!(
        "cert \"{id}\" may not be issued as a CA certificate without an issuer: the CSR requests \
         {extension} (allow it with `ca = true` in [cert_issuance.\"{id}\"], or name an issuer)"
    )
}

/// A principal allowed to write `mod-*` (a real uid 65534 caller) asks the local CA and the
/// self-signed method for CA certificates: 403 naming the extension and the cert ID, nothing
/// stored (and an earlier cert under the ID is kept). Its plain leaf request is still issued, and
/// the leaf is no CA for OpenSSL. With an issuer it names (the key handle in hand) the same CA
/// request is issued as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_issuers_refuse_ca_requests_from_a_module_principal() {
    // SAFETY: geteuid(2) has no preconditions.
    let effective_uid = unsafe { libc::geteuid() };
    assert_eq!(
        effective_uid, 0,
        "this test switches uid and must run as root"
    );
    let mut pair = Pair::new();
    let ca_key = ec_key();
    let self_key = ec_key();
    pair.add_key("local-ca", &ca_key);
    pair.add_key("mod-self", &self_key);
    let ca = openssl_ca(&ca_key, "Device Local CA", -1, 30);
    std::fs::write(pair.path("local-ca.pem"), ca.to_pem().unwrap()).unwrap();
    pair.start(
        "[cert_issuance.local_ca]\ncert = \"local-ca\"\npk = \"local-ca\"\n\
         [cert_issuance.mod-local]\nmethod = \"local_ca\"\n\
         [cert_issuance.mod-self]\nmethod = \"self_signed\"\n\
         [preloaded_certs]\nlocal-ca = \"file://{dir}/local-ca.pem\"\n\
         [[principal]]\nuid = 65534\ncerts = [\"mod-*\"]\n",
    );
    let client = pair.certd_client();
    let handle = pair.keyd_client().load_key_pair("local-ca").await.unwrap();
    let socket = pair.certd.socket.clone();
    let post = move |body: serde_json::Value| {
        let socket = socket.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                request_as_nobody(
                    &socket,
                    "POST",
                    &format!("/certificates?{V}"),
                    &body.to_string(),
                )
            })
            .await
            .unwrap()
        }
    };

    // CA:TRUE (with pathlen:0 and keyCertSign) from the local CA.
    let (status, body) = post(serde_json::json!({
        "certId": "mod-local",
        "csr": csr_pem(&ec_key(), "rogue CA", Profile::Ca),
    }))
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["message"],
        expected_refusal("mod-local", "basicConstraints CA:TRUE")
    );
    let (status, _, _) = pair
        .request(Method::GET, &format!("/certificates/mod-local?{V}"), "")
        .await;
    assert_eq!(status, 404, "nothing was stored");

    // keyCertSign alone (OpenSSL would take such a certificate for a CA).
    let (status, body) = post(serde_json::json!({
        "certId": "mod-local",
        "csr": key_cert_sign_only_csr(&ec_key()),
    }))
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["message"],
        expected_refusal("mod-local", "keyUsage keyCertSign")
    );

    // Self-signed, with the key keyd holds for the ID.
    let (status, body) = post(serde_json::json!({
        "certId": "mod-self",
        "csr": csr_pem(&self_key, "rogue root", Profile::Ca),
    }))
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body["message"],
        expected_refusal("mod-self", "basicConstraints CA:TRUE")
    );
    assert!(client.get_cert("mod-self").await.is_err(), "nothing stored");

    // A plain leaf request is issued; OpenSSL refuses it as an issuer.
    let leaf_key = ec_key();
    let (status, body) = post(serde_json::json!({
        "certId": "mod-local",
        "csr": leaf_csr(&leaf_key),
    }))
    .await;
    assert_eq!(status, 201, "{body}");
    let leaf_pem = body["pem"].as_str().unwrap().to_owned();
    let chain = parse_chain(&leaf_pem);
    verify(&chain, &ca).unwrap();
    let leaf_text = text(&chain[0]);
    assert!(leaf_text.contains("CA:FALSE"), "{leaf_text}");
    assert!(!leaf_text.contains("CA:TRUE"), "{leaf_text}");
    assert!(!leaf_text.contains("Certificate Sign"), "{leaf_text}");
    let error = acts_as_ca(&chain, &leaf_key, &ca).unwrap_err();
    assert!(error.contains("invalid CA certificate"), "{error}");

    // A CA request over the stored leaf is refused and the leaf kept.
    let (status, body) = post(serde_json::json!({
        "certId": "mod-local",
        "csr": csr_pem(&ec_key(), "rogue CA", Profile::Ca),
    }))
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(client.get_cert("mod-local").await.unwrap(), leaf_pem);

    // Explicit issuer: the caller holds the issuer's key handle; unchanged, a CA is issued.
    let sub_key = ec_key();
    let (status, body) = post(serde_json::json!({
        "certId": "mod-explicit",
        "csr": csr_pem(&sub_key, "sub CA", Profile::Ca),
        "issuer": { "certId": "local-ca", "privateKeyHandle": handle.0 },
    }))
    .await;
    assert_eq!(status, 201, "{body}");
    let chain = parse_chain(body["pem"].as_str().unwrap());
    assert!(text(&chain[0]).contains("CA:TRUE, pathlen:0"));
    acts_as_ca(&chain, &sub_key, &ca).unwrap();
}

/// Which IDs may be CAs without an issuer: the local CA's own cert ID and `aziot-edged-ca` with
/// no `ca` key (a reference config), any ID with `ca = true`; `ca = false` overrides the default
/// (here for `aziot-edged-ca-temp`), and an unmarked ID is refused. The CAs issued work as CAs
/// for OpenSSL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_allowed_to_be_cas_are_issued_as_cas() {
    let mut pair = Pair::new();
    let root_key = ec_key();
    let edge_key = ec_key();
    pair.add_key("root-ca", &root_key);
    pair.add_key("aziot-edged-ca", &edge_key);
    pair.start(
        "[cert_issuance.local_ca]\ncert = \"root-ca\"\npk = \"root-ca\"\n\
         [cert_issuance.root-ca]\nmethod = \"self_signed\"\nexpiry_days = 10\n\
         [cert_issuance.aziot-edged-ca]\nmethod = \"local_ca\"\n\
         [cert_issuance.aziot-edged-ca-temp]\nmethod = \"local_ca\"\nca = false\n\
         [cert_issuance.sub-ca]\nmethod = \"local_ca\"\nca = true\n\
         [cert_issuance.plain]\nmethod = \"local_ca\"\nca = false\n\
         [cert_issuance.unmarked]\nmethod = \"local_ca\"\n",
    );
    let client = pair.certd_client();

    // The local CA issues itself (no `ca` key: its own cert ID may be a CA).
    // No pathlen: the CAs below it may issue.
    let root_csr = csr_with(
        &root_key,
        "Root",
        vec![
            BasicConstraints::new().critical().ca().build().unwrap(),
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .unwrap(),
        ],
    );
    let root_pem = client
        .create_cert("root-ca", &root_csr, None)
        .await
        .unwrap();
    let root = parse_chain(&root_pem).remove(0);
    assert!(text(&root).contains("CA:TRUE"));

    // The Edge CA under its well-known ID, as edged requests it (no issuer).
    let edge_pem = client
        .create_cert(
            "aziot-edged-ca",
            &csr_pem(&edge_key, "Edge CA", Profile::Ca),
            None,
        )
        .await
        .unwrap();
    let edge = parse_chain(&edge_pem);
    verify(&edge, &root).unwrap();
    acts_as_ca(&edge, &edge_key, &root).unwrap();

    let sub_key = ec_key();
    let sub_pem = client
        .create_cert("sub-ca", &csr_pem(&sub_key, "Sub CA", Profile::Ca), None)
        .await
        .unwrap();
    acts_as_ca(&parse_chain(&sub_pem), &sub_key, &root).unwrap();

    for (id, csr) in [
        ("aziot-edged-ca-temp", csr_pem(&ec_key(), "x", Profile::Ca)),
        ("plain", csr_pem(&ec_key(), "x", Profile::Ca)),
        ("unmarked", csr_pem(&ec_key(), "x", Profile::Ca)),
        ("unmarked", key_cert_sign_only_csr(&ec_key())),
    ] {
        let body = serde_json::json!({ "certId": id, "csr": csr }).to_string();
        let (status, response, _) = pair
            .request(Method::POST, &format!("/certificates?{V}"), &body)
            .await;
        assert_eq!(status, 403, "{id}: {response}");
        let message = response["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!("cert \"{id}\" may not be issued as a CA")),
            "{message}"
        );
        assert!(client.get_cert(id).await.is_err(), "{id}: nothing stored");
    }
    // The same IDs still get leaf certificates.
    for id in ["aziot-edged-ca-temp", "plain", "unmarked"] {
        let pem = client
            .create_cert(id, &leaf_csr(&ec_key()), None)
            .await
            .unwrap();
        verify(&parse_chain(&pem), &root).unwrap();
    }
}

/// An issued local CA (its own `[cert_issuance.<cert>] method = "self_signed"`, as `iotedge
/// config apply` writes it) does not exist until the first local-CA issuance creates it: key pair
/// in keyd, self-signed CA certificate. A refused CA request creates nothing, not even the local
/// CA; the next leaf request creates it and is issued under it, and OpenSSL accepts the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_local_ca_is_created_by_its_first_issuance() {
    let mut pair = Pair::new();
    pair.start(
        "[cert_issuance.local_ca]\ncert = \"auto-ca\"\npk = \"auto-ca\"\n\
         [cert_issuance.auto-ca]\nmethod = \"self_signed\"\ncommon_name = \"Auto CA\"\nexpiry_days = 30\n\
         [cert_issuance.leaf]\nmethod = \"local_ca\"\n",
    );
    let client = pair.certd_client();

    let refused = client
        .create_cert("leaf", &csr_pem(&ec_key(), "rogue CA", Profile::Ca), None)
        .await
        .unwrap_err();
    assert_eq!(
        refused.status(),
        Some(http::StatusCode::FORBIDDEN),
        "{refused}"
    );
    let missing = client.get_cert("auto-ca").await.unwrap_err();
    assert!(
        missing.is_not_found(),
        "a refused request created the CA: {missing}"
    );

    let key = ec_key();
    let chain = parse_chain(
        &client
            .create_cert("leaf", &leaf_csr(&key), None)
            .await
            .unwrap(),
    );
    assert_eq!(chain.len(), 2, "leaf and the new local CA");
    let ca = parse_chain(&client.get_cert("auto-ca").await.unwrap());
    assert_eq!(ca.len(), 1);
    assert_eq!(ca[0].to_der().unwrap(), chain[1].to_der().unwrap());
    assert!(text(&ca[0]).contains("CN=Auto CA") || text(&ca[0]).contains("CN = Auto CA"));
    verify(&chain[..1], &ca[0]).unwrap();
    // The CA key lives in keyd under the configured pk.
    let handle = pair.keyd_client().load_key_pair("auto-ca").await.unwrap();
    assert_eq!(
        pair.keyd_client()
            .get_key_pair_public_parameter(&handle, "algorithm")
            .await
            .unwrap(),
        "ECDSA"
    );
}
