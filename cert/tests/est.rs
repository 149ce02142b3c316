//! EST (RFC 7030) end to end: the real certd and keyd binaries enrolling at the cloud emulator's
//! EST server (in-process). Issued chains are checked with OpenSSL and `openssl verify`; what
//! the server saw (operation, authentication, client certificate, timing) comes from its log.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant, SystemTime};

use cloud_emulator::est::{EstConfig, EstLogEntry, EstServer};
use cloud_emulator::pki::TestCa;
use common::{csr_pem, ec_key, parse_chain, verify, verify_with_cli, Pair, Profile};
use http::{Method, StatusCode};
use openssl::pkey::{PKey, PKeyRef, Public};
use openssl::x509::X509;
use system_tests::softhsm::{SoftHsm, MODULE, PIN};

const V: &str = "api-version=2020-09-01";
/// Generous deadline for conditions on a loaded machine.
const DEADLINE: Duration = Duration::from_secs(120);

async fn est_server(config: EstConfig) -> EstServer {
    EstServer::start(config).await.unwrap()
}

/// Writes the EST server's CA where certd preloads it as `est-server-ca`.
fn trust_est(pair: &Pair, est: &EstServer) -> String {
    std::fs::write(pair.path("est-ca.pem"), est.ca_cert_pem()).unwrap();
    "[preloaded_certs]\nest-server-ca = \"file://{dir}/est-ca.pem\"\n".to_owned()
}

fn est_ca(est: &EstServer) -> X509 {
    X509::from_pem(est.ca_cert_pem().as_bytes()).unwrap()
}

fn subject_text(certificate: &X509) -> String {
    certificate
        .subject_name()
        .entries()
        .map(|entry| {
            format!(
                "{}={}",
                entry.object().nid().short_name().unwrap(),
                entry.data().to_string().unwrap()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn serial(certificate: &X509) -> String {
    certificate
        .serial_number()
        .to_bn()
        .unwrap()
        .to_hex_str()
        .unwrap()
        .to_string()
}

fn enrollments(est: &EstServer, operation: &str) -> Vec<EstLogEntry> {
    est.log()
        .into_iter()
        .filter(|entry| entry.operation == operation)
        .collect()
}

/// A client certificate for `public_key` with subject CN `common_name`, signed by `ca`.
fn client_cert(ca: &TestCa, public_key: &PKeyRef<Public>, common_name: &str) -> String {
    ca.client_cert_for(common_name, public_key).unwrap()
}

/// keyd's public key of key pair `id` (EC P-256), as OpenSSL sees it.
async fn keyd_public_key(pair: &Pair, id: &str) -> PKey<Public> {
    let keyd = pair.keyd_client();
    let handle = keyd.load_key_pair(id).await.unwrap();
    let point = keyd
        .get_key_pair_public_parameter(&handle, "ec-point")
        .await
        .unwrap();
    use base64::Engine as _;
    let point = base64::engine::general_purpose::STANDARD
        .decode(point)
        .unwrap();
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    let mut context = openssl::bn::BigNumContext::new().unwrap();
    let point = openssl::ec::EcPoint::from_bytes(&group, &point, &mut context).unwrap();
    PKey::from_ec_key(openssl::ec::EcKey::from_public_key(&group, &point).unwrap()).unwrap()
}

async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Enrolls `id` with a fresh key; returns the stored chain.
async fn enroll(pair: &Pair, id: &str, common_name: &str) -> String {
    pair.certd_client()
        .create_cert(id, &csr_pem(&ec_key(), common_name, Profile::Server), None)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_enrollment_stores_a_chain_that_verifies() {
    let est = est_server(EstConfig {
        basic: Some(("est-user".into(), "est-pass".into())),
        ..EstConfig::default()
    })
    .await;
    let mut pair = Pair::new();
    let preload = trust_est(&pair, &est);
    pair.start(&format!(
        "[cert_issuance.est]\ntrusted_certs = [\"est-server-ca\"]\nusername = \"est-user\"\n\
         password = \"est-pass\"\n[cert_issuance.est.urls]\ndefault = \"{}\"\n\
         [cert_issuance.device-id]\nmethod = \"est\"\n\
         [cert_issuance.wrong-password]\nmethod = \"est\"\nurl = \"{}\"\n\
         username = \"est-user\"\npassword = \"nope\"\n{preload}",
        est.url(None),
        est.url(Some("label1")),
    ));
    let pem = enroll(&pair, "device-id", "my-est-device").await;
    let chain = parse_chain(&pem);
    assert_eq!(chain.len(), 2, "the enrolled cert and the EST CA: {pem}");
    let ca = est_ca(&est);
    verify(&chain, &ca).unwrap();
    verify_with_cli(pair.root.path(), &pem, &ca);
    assert_eq!(subject_text(&chain[0]), "CN=my-est-device");
    assert_eq!(chain[1].to_der().unwrap(), ca.to_der().unwrap());
    assert_eq!(
        pair.certd_client().get_cert("device-id").await.unwrap(),
        pem
    );

    let enrolled = enrollments(&est, "simpleenroll");
    assert_eq!(enrolled.len(), 1, "{enrolled:?}");
    assert_eq!(enrolled[0].status, 200);
    assert_eq!(enrolled[0].auth, "basic");
    assert_eq!(enrolled[0].transfer_encoding.as_deref(), Some("base64"));
    assert_eq!(enrolled[0].csr_cn.as_deref(), Some("my-est-device"));
    assert_eq!(
        enrolled[0].issued_serial.as_deref(),
        Some(serial(&chain[0]).as_str())
    );
    assert_eq!(enrollments(&est, "cacerts").len(), 1);

    // Refused credentials are a clear 502 naming the server's answer; nothing is stored.
    let body = serde_json::json!({
        "certId": "wrong-password",
        "csr": csr_pem(&ec_key(), "x", Profile::Server),
    })
    .to_string();
    let (status, body, _) = pair
        .request(Method::POST, &format!("/certificates?{V}"), &body)
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("refused the request (401)"), "{message}");
    assert!(
        message.contains("/.well-known/est/label1/simpleenroll"),
        "{message}"
    );
    assert!(
        !message.contains("nope"),
        "the password is not echoed: {message}"
    );
    let last = est.log().pop().unwrap();
    assert_eq!(last.label.as_deref(), Some("label1"));
    assert_eq!(last.status, 401);
    let (status, _, _) = pair
        .request(
            Method::GET,
            &format!("/certificates/wrong-password?{V}"),
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The seed create route cannot make an EST cert (it has no CSR): a clear 400.
    let error = pair
        .certd_client()
        .draft_create_cert("wrong-password")
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(StatusCode::BAD_REQUEST), "{error}");
    assert!(error.to_string().contains("is issued by EST"), "{error}");
}

/// The TLS client identity is a cert in certd whose key is key pair `est-id` in keyd; it is
/// what authenticates the enrollment (the server has Basic credentials certd does not know).
async fn client_cert_enrollment(pair: &mut Pair, public_key: &PKeyRef<Public>) {
    let bootstrap_ca = TestCa::new("EST client CA").unwrap();
    let est = est_server(EstConfig {
        basic: Some(("someone".into(), "else".into())),
        client_ca_pems: vec![bootstrap_ca.cert_pem()],
        ..EstConfig::default()
    })
    .await;
    let preload = trust_est(pair, &est);
    pair.start(&format!(
        "[cert_issuance.est]\ntrusted_certs = [\"est-server-ca\"]\n\
         identity_cert = \"est-id\"\nidentity_pk = \"est-id\"\n\
         [cert_issuance.device-id]\nmethod = \"est\"\nurl = \"{}\"\n{preload}",
        est.url(None)
    ));
    let identity = client_cert(&bootstrap_ca, public_key, "est-client-identity");
    pair.certd_client()
        .import_cert("est-id", &identity)
        .await
        .unwrap();
    let pem = enroll(pair, "device-id", "cert-auth-device").await;
    let chain = parse_chain(&pem);
    verify_with_cli(pair.root.path(), &pem, &est_ca(&est));
    assert_eq!(subject_text(&chain[0]), "CN=cert-auth-device");
    let enrolled = enrollments(&est, "simpleenroll");
    assert_eq!(enrolled.len(), 1, "{enrolled:?}");
    assert_eq!(enrolled[0].status, 200);
    assert_eq!(enrolled[0].auth, "cert");
    assert_eq!(
        enrolled[0].client_cert_cn.as_deref(),
        Some("est-client-identity")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_enrollment_with_a_file_key_in_keyd() {
    let mut pair = Pair::new();
    let key = ec_key();
    pair.add_key("est-id", &key);
    let public_key = PKey::public_key_from_der(&key.public_key_to_der().unwrap()).unwrap();
    client_cert_enrollment(&mut pair, &public_key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_cert_enrollment_with_the_key_in_softhsm() {
    let hsm = SoftHsm::new("est");
    hsm.tool_ok(&[
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "est-identity",
        "--id",
        "01",
    ]);
    let public_path = hsm.path("public.der");
    hsm.tool_ok(&[
        "--read-object",
        "--type",
        "pubkey",
        "--label",
        "est-identity",
        "-o",
        public_path.to_str().unwrap(),
    ]);
    let public_key = PKey::public_key_from_der(&std::fs::read(&public_path).unwrap()).unwrap();
    let mut pair = Pair::new();
    pair.keyd.env = hsm.env();
    pair.keyd_extra = format!("pkcs11_lib_path = \"{MODULE}\"");
    pair.add_key_uri(
        "est-id",
        &format!(
            "pkcs11:token={};object=est-identity?pin-value={PIN}",
            hsm.label
        ),
    );
    client_cert_enrollment(&mut pair, &public_key).await;
}

/// The bootstrap config used by the bootstrap and renewal tests: identity `est-id` (missing at
/// first), bootstrap `est-bootstrap` (preloaded cert, key in keyd).
fn bootstrap_setup(pair: &mut Pair, est: &EstServer, bootstrap_ca: &TestCa, renew: &str) {
    let bootstrap_key = ec_key();
    pair.add_key("est-bootstrap", &bootstrap_key);
    let public_key =
        PKey::public_key_from_der(&bootstrap_key.public_key_to_der().unwrap()).unwrap();
    std::fs::write(
        pair.path("bootstrap.pem"),
        client_cert(bootstrap_ca, &public_key, "est-bootstrap-identity"),
    )
    .unwrap();
    let preload = trust_est(pair, est);
    pair.start(&format!(
        "[cert_issuance.est]\ntrusted_certs = [\"est-server-ca\"]\n\
         identity_cert = \"est-id\"\nidentity_pk = \"est-id\"\n\
         bootstrap_identity_cert = \"est-bootstrap\"\nbootstrap_identity_pk = \"est-bootstrap\"\n\
         [cert_issuance.est.urls]\ndefault = \"{}\"\n{renew}\n\
         [cert_issuance.device-id]\nmethod = \"est\"\n\
         {preload}est-bootstrap = \"file://{{dir}}/bootstrap.pem\"\n",
        est.url(None)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_enrolls_the_identity_then_the_cert() {
    let bootstrap_ca = TestCa::new("EST bootstrap CA").unwrap();
    let est = est_server(EstConfig {
        client_ca_pems: vec![bootstrap_ca.cert_pem()],
        ..EstConfig::default()
    })
    .await;
    let mut pair = Pair::new();
    bootstrap_setup(&mut pair, &est, &bootstrap_ca, "");
    let client = pair.certd_client();
    assert!(client.get_cert("est-id").await.is_err(), "no identity yet");

    let pem = enroll(&pair, "device-id", "bootstrapped-device").await;
    let ca = est_ca(&est);
    verify_with_cli(pair.root.path(), &pem, &ca);

    // The identity was enrolled with the bootstrap cert, for a key certd created in keyd, with
    // the requesting CSR's subject; then it authenticated the real enrollment.
    let identity_pem = client.get_cert("est-id").await.unwrap();
    let identity = parse_chain(&identity_pem);
    verify(&identity, &ca).unwrap();
    assert_eq!(subject_text(&identity[0]), "CN=bootstrapped-device");
    let keyd_key = keyd_public_key(&pair, "est-id").await;
    assert!(identity[0].public_key().unwrap().public_eq(&keyd_key));
    let text = String::from_utf8(identity[0].to_text().unwrap()).unwrap();
    assert!(text.contains("TLS Web Client Authentication"), "{text}");

    let enrolled = enrollments(&est, "simpleenroll");
    assert_eq!(enrolled.len(), 2, "{enrolled:?}");
    assert_eq!(
        enrolled[0].client_cert_cn.as_deref(),
        Some("est-bootstrap-identity")
    );
    assert_eq!(enrolled[0].auth, "cert");
    assert_eq!(
        enrolled[0].issued_serial.as_deref(),
        Some(serial(&identity[0]).as_str())
    );
    assert_eq!(
        enrolled[1].client_cert_serial.as_deref(),
        Some(serial(&identity[0]).as_str()),
        "the real enrollment used the new identity"
    );
    assert_eq!(enrolled[1].status, 200);

    // A second enrollment reuses the identity (no new bootstrap).
    enroll(&pair, "device-id", "bootstrapped-device").await;
    let enrolled = enrollments(&est, "simpleenroll");
    assert_eq!(enrolled.len(), 3);
    assert_eq!(
        enrolled[2].client_cert_serial.as_deref(),
        Some(serial(&identity[0]).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_202_is_retried_after_retry_after() {
    let est = est_server(EstConfig {
        basic: Some(("u".into(), "p".into())),
        ..EstConfig::default()
    })
    .await;
    est.set_pending(1, 2);
    let mut pair = Pair::new();
    let preload = trust_est(&pair, &est);
    pair.start(&format!(
        "[cert_issuance.est]\ntrusted_certs = [\"est-server-ca\"]\nusername = \"u\"\npassword = \"p\"\n\
         [cert_issuance.device-id]\nmethod = \"est\"\nurl = \"{}\"\n{preload}",
        est.url(None)
    ));
    let pem = enroll(&pair, "device-id", "patient-device").await;
    verify_with_cli(pair.root.path(), &pem, &est_ca(&est));
    let enrolled = enrollments(&est, "simpleenroll");
    assert_eq!(enrolled.len(), 2, "{enrolled:?}");
    assert_eq!(enrolled[0].status, 202);
    assert_eq!(enrolled[0].retry_after, Some(2));
    assert_eq!(enrolled[1].status, 200);
    let waited = enrolled[1]
        .time
        .duration_since(enrolled[0].time)
        .unwrap_or_default();
    assert!(
        waited >= Duration::from_secs(2),
        "asked again after {waited:?}"
    );
}

/// The stored identity's leaf.
async fn identity_leaf(pair: &Pair) -> X509 {
    parse_chain(&pair.certd_client().get_cert("est-id").await.unwrap()).remove(0)
}

async fn auto_renew(rotate_key: bool) {
    let bootstrap_ca = TestCa::new("EST bootstrap CA").unwrap();
    let est = est_server(EstConfig {
        client_ca_pems: vec![bootstrap_ca.cert_pem()],
        validity_secs: 40,
        ..EstConfig::default()
    })
    .await;
    let mut pair = Pair::new();
    bootstrap_setup(
        &mut pair,
        &est,
        &bootstrap_ca,
        &format!(
            "[cert_issuance.est.identity_auto_renew]\nrotate_key = {rotate_key}\n\
             threshold = \"50%\"\nretry = \"10%\"\n"
        ),
    );
    enroll(&pair, "device-id", "renewing-device").await;
    let first = identity_leaf(&pair).await;
    let first_key = keyd_public_key(&pair, "est-id").await;
    assert!(first.public_key().unwrap().public_eq(&first_key));

    let renewed = wait_for("the identity to be renewed", || async {
        let leaf = identity_leaf(&pair).await;
        (serial(&leaf) != serial(&first)).then_some(leaf)
    })
    .await;
    verify(std::slice::from_ref(&renewed), &est_ca(&est)).unwrap();
    assert_eq!(subject_text(&renewed), subject_text(&first));
    let reenrolled = enrollments(&est, "simplereenroll");
    assert!(!reenrolled.is_empty());
    assert_eq!(reenrolled[0].status, 200);
    assert_eq!(
        reenrolled[0].client_cert_serial.as_deref(),
        Some(serial(&first).as_str()),
        "renewed with the current identity as TLS client cert"
    );
    assert_eq!(
        reenrolled[0].issued_serial.as_deref(),
        Some(serial(&renewed).as_str())
    );
    let key_now = keyd_public_key(&pair, "est-id").await;
    assert!(renewed.public_key().unwrap().public_eq(&key_now));
    assert_eq!(
        first_key.public_eq(&key_now),
        !rotate_key,
        "rotate_key = {rotate_key}"
    );
    if rotate_key {
        assert!(
            pair.keyd_client()
                .load_key_pair("est-id-temp")
                .await
                .is_err(),
            "the temp key was moved over the identity key"
        );
    }
    // The renewed identity authenticates the next enrollment.
    enroll(&pair, "device-id", "renewing-device").await;
    let last = enrollments(&est, "simpleenroll").pop().unwrap();
    assert_eq!(last.status, 200);
    assert_ne!(
        last.client_cert_serial.as_deref(),
        Some(serial(&first).as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_auto_renew_with_key_rotation() {
    auto_renew(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_auto_renew_without_key_rotation() {
    auto_renew(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn est_down_renewal_retries_and_recovers_and_enrollment_is_503() {
    let bootstrap_ca = TestCa::new("EST bootstrap CA").unwrap();
    let est = est_server(EstConfig {
        client_ca_pems: vec![bootstrap_ca.cert_pem()],
        validity_secs: 60,
        ..EstConfig::default()
    })
    .await;
    let mut pair = Pair::new();
    bootstrap_setup(
        &mut pair,
        &est,
        &bootstrap_ca,
        "[cert_issuance.est.identity_auto_renew]\nrotate_key = false\nthreshold = \"50%\"\n\
         retry = \"5%\"\n",
    );
    enroll(&pair, "device-id", "sometimes-offline").await;
    let first = identity_leaf(&pair).await;
    est.stop();
    let down_since = SystemTime::now();

    // Enrollment while the server is down: a clear 503 with a JSON message; certd keeps serving.
    let body = serde_json::json!({
        "certId": "device-id",
        "csr": csr_pem(&ec_key(), "x", Profile::Server),
    })
    .to_string();
    let (status, body, _) = pair
        .request(Method::POST, &format!("/certificates?{V}"), &body)
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("is unreachable"), "{message}");
    assert!(message.contains("simpleenroll"), "{message}");
    let (status, _, _) = pair
        .request(Method::GET, &format!("/certificates/est-id?{V}"), "")
        .await;
    assert_eq!(status, StatusCode::OK);

    // Renewal is due 30 s in; it fails and is retried (every 5 s: 5% of 60 s is below the
    // minimum pause) while the old identity stays.
    wait_for("two failed renewal attempts", || async {
        let failures = pair
            .certd
            .log()
            .matches("renewing the EST identity cert \"est-id\" failed")
            .count();
        (failures >= 2).then_some(())
    })
    .await;
    assert_eq!(serial(&identity_leaf(&pair).await), serial(&first));
    assert!(
        pair.certd.log().contains("retrying in 5 s"),
        "{}",
        pair.certd.log()
    );
    est.resume().await.unwrap();
    let renewed = wait_for("the identity to be renewed", || async {
        let leaf = identity_leaf(&pair).await;
        (serial(&leaf) != serial(&first)).then_some(leaf)
    })
    .await;
    let reenrolled = enrollments(&est, "simplereenroll");
    assert_eq!(reenrolled[0].status, 200);
    assert!(reenrolled[0].time > down_since);
    assert_eq!(
        reenrolled[0].issued_serial.as_deref(),
        Some(serial(&renewed).as_str())
    );
}

#[test]
fn bad_est_config_values_exit_153_naming_the_key() {
    let pair = Pair::new();
    let cases = [
        (
            "[cert_issuance.est.identity_auto_renew]\nthreshold = \"120%\"\n",
            "cert_issuance.est.identity_auto_renew.threshold",
        ),
        (
            "[cert_issuance.est.identity_auto_renew]\nretry = \"soon\"\n",
            "cert_issuance.est.identity_auto_renew.retry",
        ),
        (
            "[cert_issuance.est.urls]\ndefault = \"est.example.com\"\n",
            "cert_issuance.est.urls.default",
        ),
        (
            "[cert_issuance.d]\nmethod = \"est\"\nurl = \"https://e/\"\nidentity_cert = \"i\"\n",
            "cert_issuance.d.identity_pk",
        ),
        (
            "[cert_issuance.d]\nmethod = \"self_signed\"\nurl = \"https://e/\"\n",
            "cert_issuance.d.url",
        ),
    ];
    for (config, expected) in cases {
        pair.write_configs(config);
        let (code, output) = pair.certd.run_to_exit();
        assert_eq!(code, Some(153), "{config}: {output}");
        assert!(output.contains(expected), "{config}: {output}");
    }
}
