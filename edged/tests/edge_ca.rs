//! The Edge CA against the real keyd and certd binaries (no Docker): creation at startup
//! (keyd-held key, CSR signed by keyd, self-signed issuance configured in certd), renewal with and
//! without key rotation through the `aziot-edged-ca-temp` IDs, and module certificates issued by
//! the renewed CA. Certificates are checked with OpenSSL.

#![allow(clippy::unwrap_used)]

mod common;

use common::start_keyd_certd;
use edged::certs::{self, ModuleCertKind, EDGE_CA_TEMP_ID};
use edged::config::EdgeCa;
use http::StatusCode;
use openssl::x509::X509;

fn verify(chain_pem: &str, anchor_pem: &str) {
    let chain = X509::stack_from_pem(chain_pem.as_bytes()).unwrap();
    let mut store = openssl::x509::store::X509StoreBuilder::new().unwrap();
    store
        .add_cert(X509::from_pem(anchor_pem.as_bytes()).unwrap())
        .unwrap();
    let store = store.build();
    let mut untrusted = openssl::stack::Stack::new().unwrap();
    for certificate in &chain[1..] {
        untrusted.push(certificate.clone()).unwrap();
    }
    let mut context = openssl::x509::X509StoreContext::new().unwrap();
    let verified = context
        .init(&store, &chain[0], &untrusted, |context| {
            context.verify_cert()
        })
        .unwrap();
    assert!(verified, "the chain does not verify against the Edge CA");
}

fn text(certificate: &X509) -> String {
    String::from_utf8(certificate.to_text().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_ca_is_created_renewed_with_and_without_rotation_and_issues_module_certs() {
    let root = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(root.path()).unwrap();
    let (keyd, certd) = start_keyd_certd(
        &base,
        "",
        "[cert_issuance.aziot-edged-ca]\nmethod = \"self_signed\"\nexpiry_days = 90\n\
         [cert_issuance.aziot-edged-ca-temp]\nmethod = \"self_signed\"\nexpiry_days = 90\n",
    );
    let keyd_client = key_api::Client::new(http_common::UdsClient::new(&keyd.socket));
    let certd_client = cert_api::Client::new(http_common::UdsClient::new(&certd.socket));
    let edge_ca = EdgeCa {
        cert: "aziot-edged-ca".into(),
        key: "aziot-edged-ca".into(),
        subject: None,
        auto_renew: None,
        preloaded: false,
    };

    // Creation: a CA certificate for keyd's key, with the contract's subject and extensions.
    let started = std::time::Instant::now();
    let handle = certs::ensure_edge_ca(&edge_ca, "my-device", &keyd_client, &certd_client)
        .await
        .unwrap();
    let creation = started.elapsed();
    let first_pem = certd_client.get_cert("aziot-edged-ca").await.unwrap();
    let first = X509::from_pem(first_pem.as_bytes()).unwrap();
    let first_text = text(&first);
    assert!(
        first_text.contains("Subject: CN=aziot-edge CA my-device"),
        "{first_text}"
    );
    assert!(first_text.contains("CA:TRUE, pathlen:0"), "{first_text}");
    assert!(first_text.contains("Certificate Sign"), "{first_text}");
    assert!(first_text.contains("rsaEncryption"), "{first_text}");
    let key = certs::keyd_public_key(&keyd_client, &handle).await.unwrap();
    assert!(first.public_key().unwrap().public_eq(&key));
    verify(&first_pem, &first_pem);
    // A second start keeps the stored CA.
    certs::ensure_edge_ca(&edge_ca, "my-device", &keyd_client, &certd_client)
        .await
        .unwrap();
    assert_eq!(
        certd_client.get_cert("aziot-edged-ca").await.unwrap(),
        first_pem
    );
    let (not_before, not_after) = certs::edge_ca_validity(&edge_ca, &certd_client)
        .await
        .unwrap();
    assert!((not_after - not_before - 90 * 86_400).abs() < 3600);

    // Renewal with key rotation: a new key and certificate, the same subject, temp IDs cleaned.
    let renewed_handle = certs::renew_edge_ca(&edge_ca, true, &keyd_client, &certd_client)
        .await
        .unwrap();
    let second_pem = certd_client.get_cert("aziot-edged-ca").await.unwrap();
    let second = X509::from_pem(second_pem.as_bytes()).unwrap();
    assert_ne!(second_pem, first_pem);
    assert!(text(&second).contains("Subject: CN=aziot-edge CA my-device"));
    let new_key = certs::keyd_public_key(&keyd_client, &renewed_handle)
        .await
        .unwrap();
    assert!(second.public_key().unwrap().public_eq(&new_key));
    assert!(!new_key.public_eq(&key), "the key was not rotated");
    let reloaded = keyd_client.load_key_pair("aziot-edged-ca").await.unwrap();
    assert!(certs::keyd_public_key(&keyd_client, &reloaded)
        .await
        .unwrap()
        .public_eq(&new_key));
    assert_eq!(
        certd_client
            .get_cert(EDGE_CA_TEMP_ID)
            .await
            .unwrap_err()
            .status(),
        Some(StatusCode::NOT_FOUND)
    );
    assert_eq!(
        keyd_client
            .load_key_pair(EDGE_CA_TEMP_ID)
            .await
            .unwrap_err()
            .status(),
        Some(StatusCode::NOT_FOUND)
    );

    // Module certificates now chain to the renewed CA.
    let server = certs::issue_module_cert(
        &certd_client,
        "aziot-edged-ca",
        &renewed_handle,
        "$edgeHub",
        ModuleCertKind::Server {
            common_name: "my-device".into(),
            gen_id: "gen1".into(),
        },
    )
    .await
    .unwrap();
    verify(&server.certificate, &second_pem);
    let identity = certs::issue_module_cert(
        &certd_client,
        "aziot-edged-ca",
        &renewed_handle,
        "module-a",
        ModuleCertKind::Identity {
            hub_name: "hub.example".into(),
            device_id: "my-device".into(),
        },
    )
    .await
    .unwrap();
    verify(&identity.certificate, &second_pem);
    let identity_leaf = X509::from_pem(identity.certificate.as_bytes()).unwrap();
    let identity_text = text(&identity_leaf);
    assert!(
        identity_text.contains("URI:azureiot://hub.example/devices/my-device/modules/module-a"),
        "{identity_text}"
    );
    assert!(
        identity_text.contains("DNS:URI: azureiot://"),
        "{identity_text}"
    );

    // Renewal without rotation: same key, new certificate.
    let same_handle = certs::renew_edge_ca(&edge_ca, false, &keyd_client, &certd_client)
        .await
        .unwrap();
    let third_pem = certd_client.get_cert("aziot-edged-ca").await.unwrap();
    assert_ne!(third_pem, second_pem);
    let third = X509::from_pem(third_pem.as_bytes()).unwrap();
    assert!(third.public_key().unwrap().public_eq(&new_key));
    assert!(certs::keyd_public_key(&keyd_client, &same_handle)
        .await
        .unwrap()
        .public_eq(&new_key));

    // A preloaded (user-supplied) CA that is missing is a startup error, never issued.
    let preloaded = EdgeCa {
        cert: "user-ca".into(),
        key: "user-ca".into(),
        preloaded: true,
        ..edge_ca.clone()
    };
    assert!(
        certs::ensure_edge_ca(&preloaded, "my-device", &keyd_client, &certd_client)
            .await
            .is_err()
    );
    println!(
        "figures: Edge CA creation (RSA-2048 key in keyd, CSR, issuance) {} ms",
        creation.as_millis()
    );
}

fn self_signed_ca(common_name: &str) -> (openssl::pkey::PKey<openssl::pkey::Private>, X509) {
    use openssl::x509::extension::{BasicConstraints, KeyUsage};
    let key = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    let serial = openssl::bn::BigNum::from_u32(42)
        .unwrap()
        .to_asn1_integer()
        .unwrap();
    builder.set_serial_number(&serial).unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", common_name).unwrap();
    let name = name.build();
    builder.set_subject_name(&name).unwrap();
    builder.set_issuer_name(&name).unwrap();
    builder.set_pubkey(&key).unwrap();
    builder
        .set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    builder
        .set_not_after(&openssl::asn1::Asn1Time::days_from_now(365).unwrap())
        .unwrap();
    builder
        .append_extension(BasicConstraints::new().critical().ca().build().unwrap())
        .unwrap();
    builder
        .append_extension(KeyUsage::new().critical().key_cert_sign().build().unwrap())
        .unwrap();
    builder
        .sign(&key, openssl::hash::MessageDigest::sha256())
        .unwrap();
    (key, builder.build())
}

struct NoIdentity;

impl edged::identity::IdentityClient for NoIdentity {
    async fn get_device(
        &self,
    ) -> Result<edged::identity::DeviceIdentity, http_common::ClientError> {
        Ok(edged::identity::DeviceIdentity {
            hub_name: "hub".into(),
            gateway_host: "hub".into(),
            device_id: "device".into(),
        })
    }
    async fn reprovision(&self) -> Result<(), http_common::ClientError> {
        Ok(())
    }
    async fn list_modules(
        &self,
    ) -> Result<Vec<edged::identity::ModuleIdentity>, http_common::ClientError> {
        Ok(Vec::new())
    }
    async fn create_module(
        &self,
        _: &str,
    ) -> Result<edged::identity::ModuleIdentity, http_common::ClientError> {
        Err(http_common::ClientError::InvalidEndpoint("none".into()))
    }
    async fn get_module(
        &self,
        _: &str,
    ) -> Result<edged::identity::ModuleIdentity, http_common::ClientError> {
        Err(http_common::ClientError::InvalidEndpoint("none".into()))
    }
    async fn update_module(
        &self,
        _: &str,
    ) -> Result<edged::identity::ModuleIdentity, http_common::ClientError> {
        Err(http_common::ClientError::InvalidEndpoint("none".into()))
    }
    async fn delete_module(&self, _: &str) -> Result<(), http_common::ClientError> {
        Ok(())
    }
}

/// The seed form: a user-supplied device CA (key preloaded in keyd, cert imported in certd) is
/// used as the Edge CA as is, issues module certificates, and `/trust-bundle` is its chain
/// followed by `trusted_ca_certs`, duplicates removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preloaded_device_ca_issues_module_certs_and_the_seed_bundle_appends_trusted_cas() {
    let root = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(root.path()).unwrap();
    let (device_key, device_ca) = self_signed_ca("Device CA");
    let (_, trusted_ca) = self_signed_ca("Trusted Root");
    let key_file = base.join("device-ca.key.pem");
    std::fs::write(&key_file, device_key.private_key_to_pem_pkcs8().unwrap()).unwrap();

    let (keyd, certd) = start_keyd_certd(
        &base,
        &format!(
            "[preloaded_keys]\n\"device-ca\" = \"file://{}\"\n",
            key_file.display()
        ),
        "",
    );
    let keyd_client = key_api::Client::new(http_common::UdsClient::new(&keyd.socket));
    let certd_client = cert_api::Client::new(http_common::UdsClient::new(&certd.socket));
    let device_pem = String::from_utf8(device_ca.to_pem().unwrap()).unwrap();
    let trusted_pem = String::from_utf8(trusted_ca.to_pem().unwrap()).unwrap();
    certd_client
        .import_cert("device-ca", &device_pem)
        .await
        .unwrap();
    // The trusted bundle repeats the device CA: it must appear once in /trust-bundle.
    certd_client
        .import_cert("trusted-ca", &format!("{trusted_pem}{device_pem}"))
        .await
        .unwrap();

    let homedir = base.join("edged-home");
    std::fs::create_dir_all(homedir.join("gc")).unwrap();
    let config = edged::Config::from_toml(&format!(
        "hostname = \"h\"\nhomedir = \"{}\"\n[certificates]\ndevice_ca_cert = \"cert://device-ca\"\n\
         device_ca_pk = \"key://device-ca\"\ntrusted_ca_certs = \"cert://trusted-ca\"\n\
         [agent.config]\nimage = \"a\"\n",
        homedir.display()
    ))
    .unwrap();
    assert!(config.edge_ca.preloaded);
    let handle = certs::ensure_edge_ca(&config.edge_ca, "device", &keyd_client, &certd_client)
        .await
        .unwrap();
    // Used as is: nothing was issued over it.
    assert_eq!(
        certd_client.get_cert("device-ca").await.unwrap(),
        device_pem
    );
    let server = certs::issue_module_cert(
        &certd_client,
        "device-ca",
        &handle,
        "module-b",
        ModuleCertKind::Server {
            common_name: "10.1.2.3".into(),
            gen_id: "g".into(),
        },
    )
    .await
    .unwrap();
    verify(&server.certificate, &device_pem);
    assert!(
        text(&X509::from_pem(server.certificate.as_bytes()).unwrap())
            .contains("IP Address:10.1.2.3")
    );

    let runtime = edged::runtime::docker::DockerRuntime::new(
        edged::docker::DockerClient::new("/nonexistent/docker.sock"),
        true,
        config.moby.network.clone(),
    );
    let (exit, _exit_receiver) = tokio::sync::mpsc::unbounded_channel();
    let edged = edged::Edged::new(
        config,
        runtime,
        NoIdentity,
        keyd_client,
        certd_client,
        homedir,
        edged::identity::DeviceIdentity {
            hub_name: "hub".into(),
            gateway_host: "hub".into(),
            device_id: "device".into(),
        },
        exit,
    );
    let bundle = edged.trust_bundle().await.unwrap();
    let certificates = X509::stack_from_pem(bundle.as_bytes()).unwrap();
    assert_eq!(certificates.len(), 2, "{bundle}");
    assert_eq!(
        certificates[0].to_pem().unwrap(),
        device_ca.to_pem().unwrap()
    );
    assert_eq!(
        certificates[1].to_pem().unwrap(),
        trusted_ca.to_pem().unwrap()
    );
    assert_eq!(edged.manifest_trust_bundle().await.unwrap(), "");
}

/// The first certificate of a PEM chain.
fn leaf(pem: &str) -> X509 {
    X509::from_pem(pem.as_bytes()).unwrap()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_ca_issued_by_est_is_renewed_through_est_and_issues_module_certs() {
    use cloud_emulator::est::{EstConfig, EstServer};
    // The EST server's Edge CA profile is its `edge-ca` label.
    let est = EstServer::start(EstConfig {
        basic: Some(("edge".into(), "edge-pass".into())),
        ca_labels: vec!["edge-ca".into()],
        ..EstConfig::default()
    })
    .await
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let base = std::fs::canonicalize(root.path()).unwrap();
    std::fs::write(base.join("est-ca.pem"), est.ca_cert_pem()).unwrap();
    let (keyd, certd) = start_keyd_certd(
        &base,
        "",
        &format!(
            "[cert_issuance.est]\ntrusted_certs = [\"est-server-ca\"]\nusername = \"edge\"\n\
             password = \"edge-pass\"\n[cert_issuance.est.urls]\ndefault = \"{url}\"\n\
             [cert_issuance.aziot-edged-ca]\nmethod = \"est\"\n\
             [cert_issuance.aziot-edged-ca-temp]\nmethod = \"est\"\n\
             [preloaded_certs]\nest-server-ca = \"file://{}\"\n",
            base.join("est-ca.pem").display(),
            url = est.url(Some("edge-ca")),
        ),
    );
    let keyd_client = key_api::Client::new(http_common::UdsClient::new(&keyd.socket));
    let certd_client = cert_api::Client::new(http_common::UdsClient::new(&certd.socket));
    let edge_ca = EdgeCa {
        cert: "aziot-edged-ca".into(),
        key: "aziot-edged-ca".into(),
        subject: None,
        auto_renew: None,
        preloaded: false,
    };
    let est_root = est.ca_cert_pem();

    // Created through EST: a CA for keyd's key, chaining to the EST server's CA.
    let handle = certs::ensure_edge_ca(&edge_ca, "my-device", &keyd_client, &certd_client)
        .await
        .unwrap();
    let first_pem = certd_client.get_cert("aziot-edged-ca").await.unwrap();
    let first = leaf(&first_pem);
    assert!(
        text(&first).contains("CA:TRUE, pathlen:0"),
        "{}",
        text(&first)
    );
    assert!(first
        .public_key()
        .unwrap()
        .public_eq(&certs::keyd_public_key(&keyd_client, &handle).await.unwrap()));
    verify(&first_pem, &est_root);
    let enrolled: Vec<_> = est
        .log()
        .into_iter()
        .filter(|entry| entry.operation == "simpleenroll" && entry.status == 200)
        .collect();
    assert_eq!(enrolled.len(), 1, "{enrolled:?}");
    assert_eq!(enrolled[0].label.as_deref(), Some("edge-ca"));

    // Renewed through EST with a new key: a new serial and key, same subject, temp IDs gone.
    let renewed = certs::renew_edge_ca(&edge_ca, true, &keyd_client, &certd_client)
        .await
        .unwrap();
    let second_pem = certd_client.get_cert("aziot-edged-ca").await.unwrap();
    let second = leaf(&second_pem);
    assert_ne!(serial(&second), serial(&first));
    assert_eq!(
        second.subject_name().to_der().unwrap(),
        first.subject_name().to_der().unwrap()
    );
    assert!(!second
        .public_key()
        .unwrap()
        .public_eq(&first.public_key().unwrap()));
    verify(&second_pem, &est_root);
    assert_eq!(
        certd_client
            .get_cert(EDGE_CA_TEMP_ID)
            .await
            .unwrap_err()
            .status(),
        Some(StatusCode::NOT_FOUND)
    );
    assert_eq!(
        est.log()
            .into_iter()
            .filter(|entry| entry.operation == "simpleenroll" && entry.status == 200)
            .count(),
        2
    );

    // Module server certs from the renewed CA verify up to the EST server's root.
    let server = certs::issue_module_cert(
        &certd_client,
        "aziot-edged-ca",
        &renewed,
        "$edgeHub",
        ModuleCertKind::Server {
            common_name: "my-device".into(),
            gen_id: "gen1".into(),
        },
    )
    .await
    .unwrap();
    verify(&format!("{}{second_pem}", server.certificate), &est_root);
}
