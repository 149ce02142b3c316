//! Test harness: runs the real `keyd`, `certd` and `identityd` binaries on temporary sockets
//! with temporary configs (killed on drop), next to the cloud emulator running in-process.
//! identityd trusts the emulator's CA through `SSL_CERT_FILE`.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use openssl::pkey::{PKey, Private};

/// A sibling binary of identityd (built by `cargo build -p keyd -p certd`).
pub fn sibling_binary(name: &str) -> PathBuf {
    system_tests::sibling_binary(env!("CARGO_BIN_EXE_identityd"), name)
}

pub use system_tests::Daemon;

/// keyd, certd and identityd configured for each other in one temporary folder.
pub struct Stack {
    pub root: tempfile::TempDir,
    pub keyd: Daemon,
    pub certd: Daemon,
    pub identityd: Daemon,
    preloaded_keys: Vec<(String, PathBuf)>,
    keyd_extra: String,
    certd_extra: String,
}

impl Stack {
    /// Prepares the folders; nothing runs yet.
    pub fn new() -> Stack {
        let root = tempfile::tempdir().unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let keyd = Daemon::new(
            "keyd",
            sibling_binary("keyd"),
            root.path(),
            "AZIOT_KEYD_CONFIG",
            "AZIOT_KEYD_CONFIG_DIR",
        );
        let certd = Daemon::new(
            "certd",
            sibling_binary("certd"),
            root.path(),
            "AZIOT_CERTD_CONFIG",
            "AZIOT_CERTD_CONFIG_DIR",
        );
        let identityd = Daemon::new(
            "identityd",
            PathBuf::from(env!("CARGO_BIN_EXE_identityd")),
            root.path(),
            "AZIOT_IDENTITYD_CONFIG",
            "AZIOT_IDENTITYD_CONFIG_DIR",
        );
        Stack {
            root,
            keyd,
            certd,
            identityd,
            preloaded_keys: Vec::new(),
            keyd_extra: String::new(),
            certd_extra: String::new(),
        }
    }

    /// A path inside the temporary folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Makes `key` available in keyd as key pair `id` (a preloaded key file).
    pub fn add_key_pair(&mut self, id: &str, key: &PKey<Private>) {
        let path = self.path(&format!("key-{id}.pem"));
        std::fs::write(&path, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        self.preloaded_keys.push((
            id.to_owned(),
            PathBuf::from(format!("file://{}", path.display())),
        ));
    }

    /// Adds a raw keyd preloaded entry (e.g. a `pkcs11:` URI) and extra `[aziot_keys]` lines.
    pub fn add_keyd_config(&mut self, id: &str, uri: &str, extra: &str) {
        self.preloaded_keys
            .push((id.to_owned(), PathBuf::from(uri)));
        self.keyd_extra.push_str(extra);
    }

    /// Adds lines to certd's config (e.g. `[cert_issuance.*]` tables).
    pub fn add_certd_config(&mut self, extra: &str) {
        self.certd_extra.push_str(extra);
    }

    /// Makes keyd serve the TPM service for the TPM at `tcti`, on [`Stack::tpmd_socket`].
    pub fn enable_tpm(&mut self, tcti: &str) {
        let config = self.path("tpmd.toml");
        std::fs::write(
            &config,
            format!(
                "tcti = \"{tcti}\"\n[endpoints]\naziot_tpmd = \"unix://{}\"\n",
                self.tpmd_socket().display()
            ),
        )
        .unwrap();
        self.keyd.env = vec![
            ("AZIOT_TPMD_CONFIG".to_owned(), config.display().to_string()),
            (
                "AZIOT_TPMD_CONFIG_DIR".to_owned(),
                self.path("tpmd.d").display().to_string(),
            ),
        ];
    }

    /// keyd's tpmd socket (when [`Stack::enable_tpm`] was called).
    pub fn tpmd_socket(&self) -> PathBuf {
        self.keyd.dir.join("tpmd.sock")
    }

    /// The TPM service's client.
    pub fn tpm_client(&self) -> key_api::tpm::TpmClient {
        key_api::tpm::TpmClient::from_uri(&format!("unix://{}", self.tpmd_socket().display()))
            .unwrap()
    }

    /// Writes the keyd and certd configs and starts both.
    pub fn start_keyd_certd(&mut self) {
        let mut keyd_config = format!(
            "[aziot_keys]\nhomedir_path = \"{}\"\n{}\n",
            self.keyd.home().display(),
            self.keyd_extra,
        );
        keyd_config.push_str("[preloaded_keys]\n");
        for (id, uri) in &self.preloaded_keys {
            keyd_config.push_str(&format!("\"{id}\" = \"{}\"\n", uri.display()));
        }
        keyd_config.push_str(&format!(
            "[endpoints]\naziot_keyd = \"unix://{}\"\n",
            self.keyd.socket.display()
        ));
        std::fs::write(self.keyd.config_file(), keyd_config).unwrap();
        let certd_config = format!(
            "homedir_path = \"{}\"\n{}\n[endpoints]\naziot_certd = \"unix://{}\"\naziot_keyd = \"unix://{}\"\n",
            self.certd.home().display(),
            self.certd_extra,
            self.certd.socket.display(),
            self.keyd.socket.display()
        );
        std::fs::write(self.certd.config_file(), certd_config).unwrap();
        self.keyd.spawn();
        self.certd.spawn();
    }

    /// Writes identityd's base config (0600): `body` plus hostname, homedir and endpoints.
    pub fn write_identityd_config(&self, body: &str) {
        let text = format!(
            "hostname = \"testhost\"\nhomedir = \"{}\"\n{body}\n[endpoints]\naziot_identityd = \"unix://{}\"\naziot_keyd = \"unix://{}\"\naziot_certd = \"unix://{}\"\naziot_tpmd = \"unix://{}\"\n",
            self.identityd.home().display(),
            self.identityd.socket.display(),
            self.keyd.socket.display(),
            self.certd.socket.display(),
            self.tpmd_socket().display()
        );
        let path = self.identityd.config_file();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    /// Starts identityd trusting the emulator's CA and waits for its socket.
    pub fn start_identityd(&mut self, ca_cert: &Path) {
        self.identityd.env = vec![("SSL_CERT_FILE".to_owned(), ca_cert.display().to_string())];
        self.identityd.spawn();
    }

    /// keyd's typed client (the tests run as root, whom keyd always authorizes).
    pub fn keyd_client(&self) -> key_api::Client {
        key_api::Client::new(http_common::UdsClient::new(&self.keyd.socket))
    }

    /// certd's typed client.
    pub fn certd_client(&self) -> cert_api::Client {
        cert_api::Client::new(http_common::UdsClient::new(&self.certd.socket))
    }

    /// identityd's typed client.
    pub fn client(&self) -> identity_api::Client {
        identity_api::Client::new(http_common::UdsClient::new(&self.identityd.socket))
    }

    /// Sends a raw request to identityd: status, JSON body (Null when empty), headers.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value, http::HeaderMap) {
        let headers: &[(&str, &str)] = if body.is_empty() {
            &[]
        } else {
            &[("content-type", "application/json")]
        };
        let response = http_common::UdsClient::new(&self.identityd.socket)
            .with_timeout(Duration::from_secs(120))
            .send(method, path, headers, body.to_owned().into())
            .await
            .unwrap();
        let value = if response.body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&response.body).unwrap_or_else(|_| {
                panic!(
                    "response body is not JSON: {:?}",
                    String::from_utf8_lossy(&response.body)
                )
            })
        };
        (response.status, value, response.headers)
    }

    /// Polls `GET /identities/identity`-like requests until `done` holds or `timeout` passes.
    pub async fn wait_for_device(&self, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body, _) = self
                .request(
                    Method::POST,
                    "/identities/device?api-version=2020-09-01",
                    "{\"type\":\"aziot\"}",
                )
                .await;
            if status == StatusCode::OK {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "device identity not available: {status} {body}\n{}",
                self.identityd.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A random base64 key of 32 bytes.
pub fn random_key_b64() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    openssl::rand::rand_bytes(&mut bytes).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes base64.
pub fn unb64(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

/// Starts the emulator with a config built by `configure`.
pub async fn emulator(
    configure: impl FnOnce(&mut cloud_emulator::Config),
) -> cloud_emulator::RunningEmulator {
    let mut config = cloud_emulator::Config {
        assigning_polls: 1,
        retry_after_secs: 1,
        ..cloud_emulator::Config::default()
    };
    configure(&mut config);
    cloud_emulator::start(config).await.unwrap()
}

/// Polls until `check` returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A self-signed RSA-2048 client certificate made with OpenSSL.
pub fn rsa_self_signed(common_name: &str) -> (openssl::pkey::PKey<openssl::pkey::Private>, String) {
    let key = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", common_name).unwrap();
    let name = name.build();
    let mut builder = openssl::x509::X509::builder().unwrap();
    builder.set_version(2).unwrap();
    builder
        .set_serial_number(
            &openssl::bn::BigNum::from_u32(9)
                .unwrap()
                .to_asn1_integer()
                .unwrap(),
        )
        .unwrap();
    builder.set_subject_name(&name).unwrap();
    builder.set_issuer_name(&name).unwrap();
    builder.set_pubkey(&key).unwrap();
    builder
        .set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    builder
        .set_not_after(&openssl::asn1::Asn1Time::days_from_now(30).unwrap())
        .unwrap();
    builder
        .append_extension(
            openssl::x509::extension::ExtendedKeyUsage::new()
                .client_auth()
                .build()
                .unwrap(),
        )
        .unwrap();
    builder
        .sign(&key, openssl::hash::MessageDigest::sha256())
        .unwrap();
    let pem = String::from_utf8(builder.build().to_pem().unwrap()).unwrap();
    (key, pem)
}

/// An individual enrollment for `registration_id` (device ID = registration ID).
pub fn individual(
    registration_id: &str,
    attestation: cloud_emulator::Attestation,
) -> cloud_emulator::IndividualEnrollment {
    cloud_emulator::IndividualEnrollment {
        registration_id: registration_id.into(),
        device_id: None,
        assigned_hub: None,
        payload: None,
        iot_edge: false,
        attestation,
    }
}

/// Polls `GET /identities/provisioning` until its `status` is `status`; returns the answer.
pub async fn provisioning_status(stack: &Stack, status: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, info, _) = stack
            .request(
                Method::GET,
                "/identities/provisioning?api-version=2021-12-01",
                "",
            )
            .await;
        assert_eq!(code, StatusCode::OK, "{info}");
        if info["status"] == status {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "provisioning status is not {status:?}: {info}\n{}",
            stack.identityd.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the emulator's hub accepted a request authenticated by `auth` (`sas`, `x509`)
/// after log sequence number `after`; returns that request's sequence number.
pub async fn hub_accepted(emu: &cloud_emulator::RunningEmulator, auth: &str, after: u64) -> u64 {
    eventually(
        &format!("a hub request with accepted {auth} authentication"),
        Duration::from_secs(60),
        || {
            emu.control()
                .requests()
                .into_iter()
                .find(|entry| {
                    entry.seq > after
                        && entry.service == "hub"
                        && entry.auth == auth
                        && entry.auth_ok == Some(true)
                })
                .map(|entry| entry.seq)
        },
    )
    .await
}
