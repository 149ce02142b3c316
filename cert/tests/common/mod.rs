//! Test harness: runs the real `keyd` and `certd` binaries side by side on temporary sockets with
//! temporary configs, kills them on drop, and checks certificates with OpenSSL (never with
//! certd's own code).

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use http::{Method, StatusCode};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509Req, X509ReqBuilder, X509};

/// The keyd binary, built next to certd's by `cargo build -p keyd` (or `cargo test --workspace`).
pub fn keyd_binary() -> PathBuf {
    system_tests::sibling_binary(env!("CARGO_BIN_EXE_certd"), "keyd")
}

pub use system_tests::Daemon;

/// keyd and certd configured for each other in one temporary folder. Keys that tests need on
/// both sides (to sign CSRs locally and to have keyd sign certificates) are generated here and
/// given to keyd as preloaded keys.
pub struct Pair {
    pub root: tempfile::TempDir,
    pub keyd: Daemon,
    pub certd: Daemon,
    preloaded_keys: Vec<(String, PathBuf)>,
    /// Preloaded keys given as URIs (`pkcs11:...`).
    preloaded_uris: Vec<(String, String)>,
    /// Lines added to keyd's `[aziot_keys]` (e.g. `pkcs11_lib_path`).
    pub keyd_extra: String,
}

impl Pair {
    /// Prepares the folders; nothing runs yet.
    pub fn new() -> Pair {
        let root = tempfile::tempdir().unwrap();
        // Group root may enter (the unprivileged-caller test runs with gid 0, uid 65534).
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
        let keyd = Daemon::new(
            "keyd",
            keyd_binary(),
            root.path(),
            "AZIOT_KEYD_CONFIG",
            "AZIOT_KEYD_CONFIG_DIR",
        );
        let certd = Daemon::new(
            "certd",
            PathBuf::from(env!("CARGO_BIN_EXE_certd")),
            root.path(),
            "AZIOT_CERTD_CONFIG",
            "AZIOT_CERTD_CONFIG_DIR",
        );
        Pair {
            root,
            keyd,
            certd,
            preloaded_keys: Vec::new(),
            preloaded_uris: Vec::new(),
            keyd_extra: String::new(),
        }
    }

    /// A path inside the temporary folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// Makes `key` available in keyd as key pair `id` (a preloaded key file).
    pub fn add_key(&mut self, id: &str, key: &PKey<Private>) {
        let path = self.path(&format!("key-{}.pem", id.replace('/', "_")));
        std::fs::write(&path, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        self.preloaded_keys.push((id.to_owned(), path));
    }

    /// Makes the key at `uri` (e.g. `pkcs11:token=...;object=...?pin-value=...`) available in keyd
    /// as key pair `id`.
    pub fn add_key_uri(&mut self, id: &str, uri: &str) {
        self.preloaded_uris.push((id.to_owned(), uri.to_owned()));
    }

    /// Writes both configs and starts keyd, then certd. `{dir}` in `certd_config` is replaced by
    /// the temporary folder.
    pub fn start(&mut self, certd_config: &str) {
        self.write_configs(certd_config);
        self.keyd.spawn();
        self.certd.spawn();
    }

    /// Writes both configs without starting anything.
    pub fn write_configs(&self, certd_config: &str) {
        let mut keyd_config = format!(
            "[aziot_keys]\nhomedir_path = \"{}\"\n{}\n[preloaded_keys]\n",
            self.keyd.home().display(),
            self.keyd_extra
        );
        for (id, path) in &self.preloaded_keys {
            keyd_config.push_str(&format!("\"{id}\" = \"file://{}\"\n", path.display()));
        }
        for (id, uri) in &self.preloaded_uris {
            keyd_config.push_str(&format!("\"{id}\" = \"{uri}\"\n"));
        }
        keyd_config.push_str(&format!(
            "[endpoints]\naziot_keyd = \"unix://{}\"\n",
            self.keyd.socket.display()
        ));
        std::fs::write(self.keyd.config_file(), keyd_config).unwrap();
        let certd_config = format!(
            "homedir_path = \"{}\"\n{}\n[endpoints]\naziot_certd = \"unix://{}\"\naziot_keyd = \"unix://{}\"\n",
            self.certd.home().display(),
            certd_config.replace("{dir}", self.root.path().to_str().unwrap()),
            self.certd.socket.display(),
            self.keyd.socket.display()
        );
        std::fs::write(self.certd.config_file(), certd_config).unwrap();
    }

    /// certd's typed client.
    pub fn certd_client(&self) -> cert_api::Client {
        cert_api::Client::new(http_common::UdsClient::new(&self.certd.socket))
    }

    /// keyd's typed client (the tests run as root, whom keyd always authorizes).
    pub fn keyd_client(&self) -> key_api::Client {
        key_api::Client::new(http_common::UdsClient::new(&self.keyd.socket))
    }

    /// Sends a raw request to certd: status, JSON body (Null when empty), headers.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value, http::HeaderMap) {
        request(
            &self.certd.socket,
            method,
            path,
            &[("content-type", "application/json")],
            body,
        )
        .await
    }
}

/// Sends a raw request to a socket: status, JSON body (Null when empty), headers.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, serde_json::Value, http::HeaderMap) {
    let response = http_common::UdsClient::new(socket)
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

/// A fresh EC P-256 key.
pub fn ec_key() -> PKey<Private> {
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap()).unwrap()
}

/// A fresh RSA-2048 key.
pub fn rsa_key() -> PKey<Private> {
    PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap()
}

/// What a test CSR asks for.
#[derive(Clone, Copy, Debug)]
pub enum Profile {
    /// An Edge-CA-like request: basicConstraints CA:TRUE, pathlen:0 and keyUsage keyCertSign,
    /// both critical.
    Ca,
    /// A server-certificate-like request: SAN, EKU serverAuth, keyUsage digitalSignature.
    Server,
}

/// A CSR for `common_name`, signed by `key`, made by OpenSSL.
pub fn csr(key: &PKey<Private>, common_name: &str, profile: Profile) -> X509Req {
    let mut builder = X509ReqBuilder::new().unwrap();
    builder.set_pubkey(key).unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", common_name).unwrap();
    builder.set_subject_name(&name.build()).unwrap();
    let mut extensions = openssl::stack::Stack::new().unwrap();
    match profile {
        Profile::Ca => {
            extensions
                .push(
                    BasicConstraints::new()
                        .critical()
                        .ca()
                        .pathlen(0)
                        .build()
                        .unwrap(),
                )
                .unwrap();
            extensions
                .push(
                    KeyUsage::new()
                        .critical()
                        .key_cert_sign()
                        .digital_signature()
                        .build()
                        .unwrap(),
                )
                .unwrap();
        }
        Profile::Server => {
            let context = builder.x509v3_context(None);
            extensions
                .push(
                    SubjectAlternativeName::new()
                        .dns("module.example")
                        .ip("127.0.0.1")
                        .build(&context)
                        .unwrap(),
                )
                .unwrap();
            extensions
                .push(ExtendedKeyUsage::new().server_auth().build().unwrap())
                .unwrap();
            extensions
                .push(
                    KeyUsage::new()
                        .critical()
                        .digital_signature()
                        .build()
                        .unwrap(),
                )
                .unwrap();
        }
    }
    builder.add_extensions(&extensions).unwrap();
    builder.sign(key, MessageDigest::sha256()).unwrap();
    builder.build()
}

/// The CSR as PEM text.
pub fn csr_pem(key: &PKey<Private>, common_name: &str, profile: Profile) -> String {
    String::from_utf8(csr(key, common_name, profile).to_pem().unwrap()).unwrap()
}

/// A self-signed CA certificate for `key` made by OpenSSL, valid from now for `days`.
pub fn openssl_ca(key: &PKey<Private>, common_name: &str, not_before_days: i64, days: i64) -> X509 {
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    let serial = openssl::bn::BigNum::from_u32(7)
        .unwrap()
        .to_asn1_integer()
        .unwrap();
    builder.set_serial_number(&serial).unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", common_name).unwrap();
    let name = name.build();
    builder.set_subject_name(&name).unwrap();
    builder.set_issuer_name(&name).unwrap();
    builder.set_pubkey(key).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    builder
        .set_not_before(
            &openssl::asn1::Asn1Time::from_unix(now + not_before_days * 86_400).unwrap(),
        )
        .unwrap();
    builder
        .set_not_after(&openssl::asn1::Asn1Time::from_unix(now + days * 86_400).unwrap())
        .unwrap();
    builder
        .append_extension(BasicConstraints::new().critical().ca().build().unwrap())
        .unwrap();
    builder
        .append_extension(KeyUsage::new().critical().key_cert_sign().build().unwrap())
        .unwrap();
    builder.sign(key, MessageDigest::sha256()).unwrap();
    builder.build()
}

/// Every certificate of a PEM chain, in order.
pub fn parse_chain(pem: &str) -> Vec<X509> {
    let chain = X509::stack_from_pem(pem.as_bytes()).unwrap();
    assert!(!chain.is_empty(), "no certificates in {pem}");
    chain
}

/// Verifies `chain[0]` with OpenSSL against the trust anchor, with the rest of the chain as
/// untrusted intermediates.
pub fn verify(chain: &[X509], anchor: &X509) -> Result<(), String> {
    let mut store = openssl::x509::store::X509StoreBuilder::new().unwrap();
    store.add_cert(anchor.clone()).unwrap();
    let store = store.build();
    let mut intermediates = openssl::stack::Stack::new().unwrap();
    for certificate in &chain[1..] {
        intermediates.push(certificate.clone()).unwrap();
    }
    let mut context = openssl::x509::X509StoreContext::new().unwrap();
    context
        .init(&store, &chain[0], &intermediates, |context| {
            Ok(if context.verify_cert()? {
                Ok(())
            } else {
                Err(format!(
                    "{} (depth {})",
                    context.error(),
                    context.error_depth()
                ))
            })
        })
        .unwrap()
}

/// Verifies with the `openssl verify` command line tool as well (a second, independent check).
pub fn verify_with_cli(dir: &Path, chain_pem: &str, anchor: &X509) {
    let anchor_path = dir.join("anchor.pem");
    let chain_path = dir.join("chain.pem");
    let leaf_path = dir.join("leaf.pem");
    let chain = parse_chain(chain_pem);
    std::fs::write(&anchor_path, anchor.to_pem().unwrap()).unwrap();
    std::fs::write(&leaf_path, chain[0].to_pem().unwrap()).unwrap();
    let mut untrusted = Vec::new();
    for certificate in &chain[1..] {
        untrusted.extend(certificate.to_pem().unwrap());
    }
    let mut command = Command::new("openssl");
    command.arg("verify").arg("-CAfile").arg(&anchor_path);
    if !untrusted.is_empty() {
        std::fs::write(&chain_path, untrusted).unwrap();
        command.arg("-untrusted").arg(&chain_path);
    }
    let output = command.arg(&leaf_path).output().unwrap();
    assert!(
        output.status.success(),
        "openssl verify failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Seconds since the epoch of an ASN.1 time.
pub fn unix_seconds(time: &openssl::asn1::Asn1TimeRef) -> i64 {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).unwrap();
    let difference = epoch.diff(time).unwrap();
    i64::from(difference.days) * 86_400 + i64::from(difference.secs)
}

/// Seconds since the epoch now.
pub fn now_seconds() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Runs one request against certd as uid 65534 (gid 0, so the 0750 test folder and the 0660
/// socket are reachable) with the repository's stand-alone client `tools/uds-request.py`;
/// returns (status, body).
pub fn request_as_nobody(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let output = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tools/uds-request.py"
        ))
        .arg(socket)
        .args([method, path, body])
        .uid(65534)
        .gid(0)
        .output()
        .expect("python3 is needed to act as another uid");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    let (status, body) = text.split_once('\n').unwrap();
    let value = if body.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(body).unwrap()
    };
    (status.parse().unwrap(), value)
}
