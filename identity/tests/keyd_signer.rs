//! key_api's rustls signer (the one identityd uses) on its own: a TLS client whose X.509 device
//! key is in keyd completes handshakes with the cloud emulator's hub, which authenticates the
//! device by the client certificate, for EC P-256 and RSA-2048 keys over TLS 1.3 and 1.2.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use std::sync::Arc;

use common::{emulator, rsa_self_signed, Stack};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn self_signed_device(device_id: &str, pem: &str) -> cloud_emulator::DeviceSpec {
    cloud_emulator::DeviceSpec {
        device_id: device_id.into(),
        hub: None,
        iot_edge: false,
        authentication: cloud_emulator::DeviceAuthSpec::SelfSigned {
            primary_thumbprint: None,
            secondary_thumbprint: None,
            cert_pem: Some(pem.to_owned()),
        },
    }
}

/// `GET /devices/{device_id}` over one TLS connection authenticated by `identity`; returns the
/// negotiated version and the HTTP answer.
async fn get_device(
    emu: &cloud_emulator::RunningEmulator,
    identity: Arc<rustls::sign::CertifiedKey>,
    version: &'static rustls::SupportedProtocolVersion,
    device_id: &str,
) -> (rustls::ProtocolVersion, String) {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in openssl::x509::X509::stack_from_pem(emu.ca_cert_pem().as_bytes()).unwrap() {
        roots
            .add(rustls::pki_types::CertificateDer::from(
                certificate.to_der().unwrap(),
            ))
            .unwrap();
    }
    let resolver = FixedIdentity(identity);
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_cert_resolver(Arc::new(resolver));
    let hub = emu.hub_hostname().to_owned();
    let tcp = tokio::net::TcpStream::connect(emu.https_addr())
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let negotiated = tls.get_ref().1.protocol_version().unwrap();
    let request = format!(
        "GET /devices/{device_id}?api-version=2021-04-12 HTTP/1.1\r\nHost: {hub}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // The emulator may end the connection without close_notify; what arrived is enough.
    let _ = tls.read_to_end(&mut answer).await;
    (negotiated, String::from_utf8_lossy(&answer).into_owned())
}

#[derive(Debug)]
struct FixedIdentity(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keyd_signer_authenticates_to_the_hub() {
    let ec_device = cloud_emulator::pki::self_signed_client("signer-ec").unwrap();
    let (rsa_key, rsa_pem) = rsa_self_signed("signer-rsa");
    let ec_pem = ec_device.cert_pem();
    let other_pem = cloud_emulator::pki::self_signed_client("signer-other")
        .unwrap()
        .cert_pem();
    let emu = emulator(|config| {
        config
            .devices
            .push(self_signed_device("signer-ec", &ec_pem));
        config
            .devices
            .push(self_signed_device("signer-rsa", &rsa_pem));
        // A device with another certificate: the hub must refuse the EC identity for it.
        config
            .devices
            .push(self_signed_device("signer-other", &other_pem));
    })
    .await;
    let mut stack = Stack::new();
    stack.add_key_pair("ec-device", &ec_device.key);
    stack.add_key_pair("rsa-device", &rsa_key);
    stack.start_keyd_certd();
    let keyd_uri = format!("unix://{}", stack.keyd.socket.display());
    for (key_id, device_id, pem) in [
        ("ec-device", "signer-ec", &ec_pem),
        ("rsa-device", "signer-rsa", &rsa_pem),
    ] {
        let handle = stack.keyd_client().load_key_pair(key_id).await.unwrap();
        let chain = vec![rustls::pki_types::CertificateDer::from(
            openssl::x509::X509::from_pem(pem.as_bytes())
                .unwrap()
                .to_der()
                .unwrap(),
        )];
        let identity = key_api::rustls::certified_key(chain, &keyd_uri, handle).unwrap();
        for (version, expected) in [
            (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
            (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        ] {
            let (negotiated, answer) =
                get_device(&emu, Arc::clone(&identity), version, device_id).await;
            assert_eq!(negotiated, expected, "{key_id}");
            assert!(
                answer.starts_with("HTTP/1.1 200"),
                "{key_id} {expected:?}: {answer}"
            );
            assert!(
                answer.contains(&format!("\"deviceId\":\"{device_id}\"")),
                "{answer}"
            );
        }
    }
    // The signature really is checked: the EC identity is not signer-other's.
    let handle = stack
        .keyd_client()
        .load_key_pair("ec-device")
        .await
        .unwrap();
    let chain = vec![rustls::pki_types::CertificateDer::from(
        openssl::x509::X509::from_pem(ec_pem.as_bytes())
            .unwrap()
            .to_der()
            .unwrap(),
    )];
    let identity = key_api::rustls::certified_key(chain, &keyd_uri, handle).unwrap();
    let (_, answer) = get_device(&emu, identity, &rustls::version::TLS13, "signer-other").await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}
