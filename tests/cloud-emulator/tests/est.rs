//! The EST server with an independent client: OpenSSL TLS (trusting the EST CA, optionally with a
//! client certificate) and hyper, CSRs made with OpenSSL, answers parsed with OpenSSL's PKCS#7.

#![allow(clippy::unwrap_used)]

use std::{pin::Pin, time::Duration};

use base64::Engine as _;
use bytes::Bytes;
use cloud_emulator::{
    est::{EstConfig, EstServer},
    pki::{CertAndKey, TestCa},
};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use openssl::{
    hash::MessageDigest,
    pkey::{PKey, Private},
    ssl::{SslConnector, SslMethod, SslVerifyMode},
    x509::{X509NameBuilder, X509ReqBuilder, X509},
};
use tokio_openssl::SslStream;

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

async fn est_request(
    est: &EstServer,
    identity: Option<&CertAndKey>,
    method: Method,
    path: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> std::io::Result<Answer> {
    let mut builder = SslConnector::builder(SslMethod::tls_client()).unwrap();
    builder
        .cert_store_mut()
        .add_cert(est.ca().cert.clone())
        .unwrap();
    builder.set_verify(SslVerifyMode::PEER);
    if let Some(identity) = identity {
        builder.set_certificate(&identity.cert).unwrap();
        builder.set_private_key(&identity.key).unwrap();
    }
    let ssl = builder
        .build()
        .configure()
        .unwrap()
        .into_ssl("localhost")
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(est.addr()).await?;
    let mut stream = SslStream::new(ssl, tcp).unwrap();
    Pin::new(&mut stream).connect().await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("localhost:{}", est.addr().port()));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Ok(Answer {
        status,
        headers,
        body,
    })
}

fn ec_key() -> PKey<Private> {
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap()).unwrap()
}

/// base64 of a DER CSR for `cn`, as an EST client sends it.
fn csr_body(key: &PKey<Private>, cn: &str) -> Vec<u8> {
    let mut builder = X509ReqBuilder::new().unwrap();
    builder.set_pubkey(key).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    builder.set_subject_name(&name.build()).unwrap();
    builder.sign(key, MessageDigest::sha256()).unwrap();
    let der = builder.build().to_der().unwrap();
    base64::engine::general_purpose::STANDARD
        .encode(der)
        .into_bytes()
}

fn basic(user: &str, password: &str) -> (&'static str, String) {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    ("authorization", format!("Basic {token}"))
}

/// The certificates of a base64 certs-only PKCS#7 answer.
fn certificates(answer: &Answer) -> Vec<X509> {
    assert_eq!(
        answer.headers["content-type"],
        "application/pkcs7-mime; smime-type=certs-only"
    );
    assert_eq!(answer.headers["content-transfer-encoding"], "base64");
    let text: String = String::from_utf8(answer.body.to_vec())
        .unwrap()
        .split_ascii_whitespace()
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap();
    let pkcs7 = openssl::pkcs7::Pkcs7::from_der(&der).unwrap();
    pkcs7
        .signed()
        .unwrap()
        .certificates()
        .unwrap()
        .iter()
        .map(|certificate| certificate.to_owned())
        .collect()
}

fn common_name(certificate: &X509) -> String {
    cloud_emulator::pki::leaf_cn(certificate).unwrap()
}

const ENROLL: &str = "/.well-known/est/simpleenroll";
const REENROLL: &str = "/.well-known/est/simplereenroll";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cacerts_and_enrollment_with_basic_auth() {
    let est = EstServer::start(EstConfig {
        basic: Some(("user".into(), "pass".into())),
        validity_secs: 120,
        ..EstConfig::default()
    })
    .await
    .unwrap();
    let answer = est_request(
        &est,
        None,
        Method::GET,
        "/.well-known/est/cacerts",
        &[],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let cas = certificates(&answer);
    assert_eq!(cas.len(), 1);
    assert_eq!(cas[0].to_der().unwrap(), est.ca().cert.to_der().unwrap());

    let key = ec_key();
    let answer = est_request(&est, None, Method::POST, ENROLL, &[], csr_body(&key, "a"))
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert!(answer.headers.contains_key("www-authenticate"));
    let answer = est_request(
        &est,
        None,
        Method::POST,
        ENROLL,
        &[basic("user", "wrong")],
        csr_body(&key, "a"),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);

    let answer = est_request(
        &est,
        None,
        Method::POST,
        "/.well-known/est/somelabel/simpleenroll",
        &[basic("user", "pass")],
        csr_body(&key, "enrolled-device"),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let issued = certificates(&answer);
    assert_eq!(issued.len(), 1);
    assert_eq!(common_name(&issued[0]), "enrolled-device");
    assert!(issued[0].public_key().unwrap().public_eq(&key));
    assert!(issued[0].verify(&est.ca().key).unwrap());
    let lifetime = issued[0].not_before().diff(issued[0].not_after()).unwrap();
    assert_eq!(
        i64::from(lifetime.days) * 86_400 + i64::from(lifetime.secs),
        121
    );

    let log = est.log();
    let last = log.last().unwrap();
    assert_eq!(last.operation, "simpleenroll");
    assert_eq!(last.label.as_deref(), Some("somelabel"));
    assert_eq!(last.auth, "basic");
    assert_eq!(last.csr_cn.as_deref(), Some("enrolled-device"));
    assert_eq!(log.len(), 4);

    // Garbage is a 400; unknown operations a 404; GET of an enrollment a 405.
    let answer = est_request(
        &est,
        None,
        Method::POST,
        ENROLL,
        &[basic("user", "pass")],
        b"not base64!".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    let answer = est_request(
        &est,
        None,
        Method::GET,
        "/.well-known/est/csrattrs",
        &[],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    let answer = est_request(&est, None, Method::GET, ENROLL, &[], vec![])
        .await
        .unwrap();
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_reenrollment_pending_and_down() {
    let bootstrap = TestCa::new("bootstrap CA").unwrap();
    let est = EstServer::start(EstConfig {
        client_ca_pems: vec![bootstrap.cert_pem()],
        ..EstConfig::default()
    })
    .await
    .unwrap();
    let bootstrap_identity = bootstrap.issue_client("bootstrap-identity").unwrap();
    let stranger = cloud_emulator::pki::self_signed_client("stranger").unwrap();

    let key = ec_key();
    let answer = est_request(
        &est,
        Some(&stranger),
        Method::POST,
        ENROLL,
        &[],
        csr_body(&key, "x"),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let answer = est_request(
        &est,
        Some(&bootstrap_identity),
        Method::POST,
        ENROLL,
        &[],
        csr_body(&key, "identity"),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let identity = CertAndKey {
        cert: certificates(&answer).remove(0),
        key: key.clone(),
    };
    let entry = est.log().pop().unwrap();
    assert_eq!(entry.auth, "cert");
    assert_eq!(entry.client_cert_cn.as_deref(), Some("bootstrap-identity"));

    // simplereenroll: only with a cert the EST CA issued, for the same subject.
    let new_key = ec_key();
    let answer = est_request(
        &est,
        Some(&bootstrap_identity),
        Method::POST,
        REENROLL,
        &[],
        csr_body(&new_key, "bootstrap-identity"),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let answer = est_request(
        &est,
        Some(&identity),
        Method::POST,
        REENROLL,
        &[],
        csr_body(&new_key, "someone-else"),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);

    // The next enrollment is pending: 202 + Retry-After, then issued.
    est.set_pending(1, 3);
    let answer = est_request(
        &est,
        Some(&identity),
        Method::POST,
        REENROLL,
        &[],
        csr_body(&new_key, "identity"),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::ACCEPTED);
    assert_eq!(answer.headers["retry-after"], "3");
    assert_eq!(est.log().pop().unwrap().retry_after, Some(3));
    let answer = est_request(
        &est,
        Some(&identity),
        Method::POST,
        REENROLL,
        &[],
        csr_body(&new_key, "identity"),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    let renewed = certificates(&answer).remove(0);
    assert!(renewed.public_key().unwrap().public_eq(&new_key));
    assert_ne!(
        renewed.serial_number().to_bn().unwrap(),
        identity.cert.serial_number().to_bn().unwrap()
    );

    // Down: connections are refused; resumed on the same port.
    est.stop();
    let mut refused = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(est.addr()).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "the stopped server still accepts connections");
    est.resume().await.unwrap();
    let answer = est_request(
        &est,
        None,
        Method::GET,
        "/.well-known/est/cacerts",
        &[],
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::OK);
}
