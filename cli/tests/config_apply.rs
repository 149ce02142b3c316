//! `iotedge config apply` end to end: golden files for a set of super-configs, the generated
//! configs fed to the real daemons (keyd, certd and identityd always; edged too when the set
//! configures it, until its management API answers), secrets, modes and refusals. A set that
//! provisions through DPS gets its device identity from the cloud emulator.
//!
//! Regenerate the golden files with `UPDATE_GOLDEN=1 cargo test -p iotedge --test config_apply`
//! and review the diff.

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;

use common::{
    apply_fixture, daemon_binary, describe, fixtures, iotedge, Daemon, SoftHsm, UID_ARGS,
};

const DAEMONS: [&str; 4] = ["keyd", "certd", "identityd", "edged"];

fn generated(root: &Path, daemon: &str) -> PathBuf {
    root.join("etc/aziot")
        .join(daemon)
        .join("config.d/00-super.toml")
}

/// Applies `name.toml` and compares every generated drop-in with `golden/<name>/<daemon>.toml`.
fn golden(name: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let output = apply_fixture(&fixtures().join(format!("{name}.toml")), root.path());
    assert!(output.status.success(), "{}", describe(&output));
    let golden_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for daemon in DAEMONS {
        let path = generated(root.path(), daemon);
        let golden_path = golden_dir.join(format!("{daemon}.toml"));
        if update {
            std::fs::create_dir_all(&golden_dir).unwrap();
            match std::fs::read(&path) {
                Ok(bytes) => std::fs::write(&golden_path, bytes).unwrap(),
                Err(_) => {
                    let _ = std::fs::remove_file(&golden_path);
                }
            }
            continue;
        }
        match (
            std::fs::read_to_string(&path),
            std::fs::read_to_string(&golden_path),
        ) {
            (Ok(actual), Ok(expected)) => assert_eq!(
                actual,
                expected,
                "{name}: {daemon}'s drop-in differs from {} (UPDATE_GOLDEN=1 regenerates)",
                golden_path.display()
            ),
            (Err(_), Err(_)) => {}
            (Ok(_), Err(_)) => {
                panic!("{name}: {daemon}'s drop-in was written but there is no golden file")
            }
            (Err(_), Ok(_)) => panic!("{name}: {daemon}'s drop-in was not written"),
        }
        if path.exists() {
            let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            assert_eq!(mode(path.parent().unwrap()), 0o700, "{}", path.display());
        }
    }
    root
}

/// Copies a generated drop-in into a fresh config folder and adds `99-test.toml` (paths and
/// sockets inside the test folder). Returns (base file, drop-in folder).
fn test_config(work: &Path, root: &Path, daemon: &str, overrides: &str) -> (PathBuf, PathBuf) {
    let dir = work.join(daemon);
    let dropins = dir.join("config.d");
    std::fs::create_dir_all(&dropins).unwrap();
    std::fs::copy(generated(root, daemon), dropins.join("00-super.toml")).unwrap();
    std::fs::write(dropins.join("99-test.toml"), overrides).unwrap();
    (dir.join("config.toml"), dropins)
}

/// A preloaded key under `/var/secrets/aziot/keyd/` is redirected to the test root's copy
/// (`[preloaded_keys]` lines, without the table header).
fn secret_overrides(root: &Path, keyd: &toml::Table) -> String {
    let mut text = String::new();
    if let Some(toml::Value::Table(preloaded)) = keyd.get("preloaded_keys") {
        for (id, uri) in preloaded {
            if let Some(path) = uri
                .as_str()
                .and_then(|uri| uri.strip_prefix("file:///var/secrets/aziot/keyd/"))
            {
                text.push_str(&format!(
                    "{id:?} = \"file://{}\"\n",
                    root.join("var/secrets/aziot/keyd").join(path).display()
                ));
            }
        }
    }
    text
}

/// identityd's device cert `device-id` appears in certd with every attribute of `subject`, and
/// the openssl CLI verifies it against the rest of its chain (the local CA certd made).
fn device_cert_is_issued(
    name: &str,
    work: &Path,
    runtime: &tokio::runtime::Runtime,
    certs: &cert_api::Client,
    subject: &toml::Table,
    identityd: &Daemon,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let chain = loop {
        match runtime.block_on(certs.get_cert("device-id")) {
            Ok(chain) => break chain,
            Err(error) if std::time::Instant::now() > deadline => panic!(
                "{name}: identityd did not get its device cert issued: {error}\n{}",
                identityd.log()
            ),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    };
    let blocks: Vec<&str> = chain
        .split_inclusive("-----END CERTIFICATE-----")
        .filter(|block| block.contains("BEGIN CERTIFICATE"))
        .collect();
    assert!(
        blocks.len() >= 2,
        "{name}: leaf and issuer expected: {chain}"
    );
    let leaf = work.join("device-id.pem");
    let issuers = work.join("device-id-issuers.pem");
    std::fs::write(&leaf, blocks[0]).unwrap();
    std::fs::write(&issuers, blocks[1..].concat()).unwrap();
    let verified = Command::new("openssl")
        .args(["verify", "-x509_strict", "-CAfile"])
        .arg(&issuers)
        .arg(&leaf)
        .output()
        .unwrap();
    assert!(verified.status.success(), "{name}: {}", describe(&verified));
    let text = Command::new("openssl")
        .args([
            "x509",
            "-noout",
            "-subject",
            "-nameopt",
            "sep_multiline",
            "-in",
        ])
        .arg(&leaf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    for (attribute, value) in subject {
        let line = format!("{attribute}={}", value.as_str().unwrap());
        assert!(
            text.lines().any(|candidate| candidate.trim() == line),
            "{name}: the device cert's subject lacks {line}: {text}"
        );
    }
}

/// An operator's Edge CA (EC P-256, CA:TRUE, keyCertSign) made by the openssl CLI, for sets
/// whose super-config names the operator's own files: (key file, cert file).
fn operator_edge_ca(work: &Path) -> (PathBuf, PathBuf) {
    let key = work.join("edge-ca.key.pem");
    let cert = work.join("edge-ca.pem");
    let output = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "30", "-subj", "/CN=operator edge CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,digitalSignature"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed (tools/install-deps.sh)");
    assert!(output.status.success(), "{}", describe(&output));
    (key, cert)
}

/// What a fixture's daemons are checked for beyond starting.
#[derive(Default)]
struct Expect {
    /// keyd: HMAC with `device-id` must equal HMAC with these key bytes.
    device_key: Option<Vec<u8>>,
    /// keyd: `device-id` is a key pair in a SoftHSM token.
    device_key_pair_in_token: bool,
}

/// Starts keyd and certd (and identityd / edged when available) on the generated configs.
fn daemons_accept(name: &str, root: &Path, expect: Expect) {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let keyd_socket = work.join("keyd.sock");
    let certd_socket = work.join("certd.sock");
    let identityd_socket = work.join("identityd.sock");
    let keyd_table: toml::Table = std::fs::read_to_string(generated(root, "keyd"))
        .unwrap()
        .parse()
        .unwrap();

    let hsm = expect
        .device_key_pair_in_token
        .then(|| SoftHsm::with_key_pair("device-id"));
    let hsm_conf = hsm.as_ref().map(|hsm| hsm.conf.display().to_string());
    let mut environment: Vec<(&str, &str)> = Vec::new();
    if let Some(conf) = &hsm_conf {
        environment.push(("SOFTHSM2_CONF", conf));
    }

    // edged serves only once identityd hands out the device identity; a DPS set gets it from
    // the cloud emulator, enrolled with a key the test writes.
    let identityd_table: toml::Table = std::fs::read_to_string(generated(root, "identityd"))
        .unwrap()
        .parse()
        .unwrap();
    let cloud = generated(root, "edged")
        .exists()
        .then(|| Cloud::for_dps(work, &identityd_table))
        .flatten();
    let mut keyd_overrides = secret_overrides(root, &keyd_table);
    if let Some(cloud) = &cloud {
        keyd_overrides = format!("device-id = \"file://{}\"\n", cloud.key_file.display());
    }
    // The operator's own Edge CA files, when the set names them.
    let mut certd_overrides = String::new();
    if keyd_table
        .get("preloaded_keys")
        .and_then(|keys| keys.get("aziot-edged-ca"))
        .is_some()
    {
        let (key, cert) = operator_edge_ca(work);
        keyd_overrides.push_str(&format!("aziot-edged-ca = \"file://{}\"\n", key.display()));
        certd_overrides = format!(
            "[preloaded_certs]\naziot-edged-ca = \"file://{}\"\n",
            cert.display()
        );
    }
    if !keyd_overrides.is_empty() {
        keyd_overrides.insert_str(0, "[preloaded_keys]\n");
    }
    let (base, dropins) = test_config(
        work,
        root,
        "keyd",
        &format!(
            "[aziot_keys]\nhomedir_path = \"{}\"\n[endpoints]\naziot_keyd = \"unix://{}\"\n{}",
            work.join("keyd-home").display(),
            keyd_socket.display(),
            keyd_overrides
        ),
    );
    let keyd = Daemon::start(
        &daemon_binary("keyd"),
        &base,
        &dropins,
        &keyd_socket,
        &environment,
    )
    .unwrap_or_else(|error| panic!("{name}: keyd refused the generated config: {error}"));

    let runtime = common::runtime();
    let keys = key_api::Client::new(http_common::UdsClient::new(&keyd_socket));
    if let Some(key_bytes) = &expect.device_key {
        let message = b"config apply wrote the decoded key";
        let signature = runtime
            .block_on(async {
                let handle = keys.load_key("device-id").await?;
                keys.sign(&handle, key_api::SignMechanism::HmacSha256 { message })
                    .await
            })
            .unwrap_or_else(|error| {
                panic!("{name}: keyd cannot use device-id: {error}\n{}", keyd.log())
            });
        assert_eq!(
            signature,
            hmac_sha256(key_bytes, message),
            "{name}: the secret file holds other bytes"
        );
    }
    if expect.device_key_pair_in_token {
        runtime
            .block_on(keys.load_key_pair("device-id"))
            .unwrap_or_else(|error| {
                panic!(
                    "{name}: keyd cannot load the token key device-id: {error}\n{}",
                    keyd.log()
                )
            });
    }

    let (base, dropins) = test_config(
        work,
        root,
        "certd",
        &format!(
            "homedir_path = \"{}\"\n[endpoints]\naziot_certd = \"unix://{}\"\naziot_keyd = \"unix://{}\"\n{certd_overrides}",
            work.join("certd-home").display(),
            certd_socket.display(),
            keyd_socket.display()
        ),
    );
    let certd = Daemon::start(&daemon_binary("certd"), &base, &dropins, &certd_socket, &[])
        .unwrap_or_else(|error| panic!("{name}: certd refused the generated config: {error}"));
    let certs = cert_api::Client::new(http_common::UdsClient::new(&certd_socket));
    let answer = runtime.block_on(certs.get_cert("no-such-cert"));
    assert_eq!(
        answer
            .as_ref()
            .err()
            .and_then(http_common::ClientError::status),
        Some(http::StatusCode::NOT_FOUND),
        "{name}: certd did not answer: {answer:?}\n{}",
        certd.log()
    );

    let identityd = daemon_binary("identityd");
    let mut overrides = format!(
        "homedir = \"{}\"\n[endpoints]\naziot_identityd = \"unix://{}\"\naziot_keyd = \"unix://{}\"\naziot_certd = \"unix://{}\"\n",
        work.join("identityd-home").display(),
        identityd_socket.display(),
        keyd_socket.display(),
        certd_socket.display()
    );
    let mut identityd_environment = Vec::new();
    if let Some(cloud) = &cloud {
        overrides.push_str(&format!(
            "[provisioning]\nglobal_endpoint = \"{}\"\nscope_id = \"{}\"\n",
            cloud.emulator.dps_endpoint(),
            cloud.emulator.id_scope()
        ));
        identityd_environment.push((
            "SSL_CERT_FILE",
            cloud.emulator.ca_cert_path().display().to_string(),
        ));
    }
    if identityd_table
        .get("provisioning")
        .and_then(|table| table.get("payload"))
        .is_some()
    {
        // identityd reads the DPS payload file at startup; point it at a test copy.
        let payload = work.join("payload.json");
        std::fs::write(&payload, "{\"modelId\":\"dtmi:test;1\"}").unwrap();
        overrides.push_str(&format!(
            "[provisioning.payload]\nuri = \"file://{}\"\n",
            payload.display()
        ));
    }
    let (base, dropins) = test_config(work, root, "identityd", &overrides);
    let identityd_environment: Vec<(&str, &str)> = identityd_environment
        .iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect();
    let identityd_daemon = Daemon::start(
        &identityd,
        &base,
        &dropins,
        &identityd_socket,
        &identityd_environment,
    )
    .unwrap_or_else(|error| panic!("{name}: identityd refused the generated config: {error}"));
    // A device cert issued on the device: identityd makes the key and CSR, certd issues it.
    let csr_subject = identityd_table
        .get("provisioning")
        .and_then(|provisioning| provisioning.get("authentication"))
        .and_then(|authentication| authentication.get("csr_subject"));
    if let Some(toml::Value::Table(subject)) = csr_subject {
        device_cert_is_issued(name, work, &runtime, &certs, subject, &identityd_daemon);
    }
    if generated(root, "edged").exists() {
        let edged = daemon_binary("edged");
        // A Docker engine of the test's own: a fresh edged removes every edge-owned container on
        // its engine, and this test only proves that edged serves on the generated config.
        let engine = FakeEngine::start(&work.join("docker.sock"));
        let mgmt = work.join("mgmt.sock");
        let (base, dropins) = test_config(
            work,
            root,
            "edged",
            &format!(
                "homedir = \"{}\"\n[listen]\nmanagement_uri = \"unix://{}\"\nworkload_uri = \"unix://{}\"\n\
                 [moby_runtime]\nuri = \"unix://{}\"\n\
                 [endpoints]\naziot_keyd_url = \"unix://{}\"\naziot_certd_url = \"unix://{}\"\naziot_identityd_url = \"unix://{}\"\n",
                work.join("edged-home").display(),
                mgmt.display(),
                work.join("workload.sock").display(),
                engine.socket.display(),
                keyd_socket.display(),
                certd_socket.display(),
                identityd_socket.display()
            ),
        );
        // Serving: device identity from identityd, the module network, the Edge CA from certd
        // and keyd, then the management API answers a module list.
        let daemon = Daemon::start(&edged, &base, &dropins, &mgmt, &[])
            .unwrap_or_else(|error| panic!("{name}: edged refused the generated config: {error}"));
        let client = http_common::UdsClient::new(&mgmt);
        let answer = runtime.block_on(client.send(
            http::Method::GET,
            "/modules?api-version=2020-07-07",
            &[],
            bytes::Bytes::new(),
        ));
        match answer {
            Ok(response) if response.status == http::StatusCode::OK => {}
            other => panic!(
                "{name}: edged's management API did not list modules: {other:?}\n{}\nidentityd:\n{}",
                daemon.log(),
                identityd_daemon.log()
            ),
        }
        assert!(
            engine
                .requests()
                .iter()
                .any(|request| request.starts_with("POST /networks/create")),
            "{name}: edged did not create its module network: {:?}",
            engine.requests()
        );
        drop(daemon);
    }
    drop(identityd_daemon);
    drop(certd);
    drop(keyd);
}

/// The DPS / IoT Hub emulator for a set that provisions with a DPS symmetric key: an
/// individual enrollment for the set's registration ID, with a key the test writes for keyd.
struct Cloud {
    emulator: cloud_emulator::RunningEmulator,
    key_file: PathBuf,
    // Serves the emulator until the test ends.
    _runtime: tokio::runtime::Runtime,
}

impl Cloud {
    fn for_dps(work: &Path, identityd: &toml::Table) -> Option<Cloud> {
        let provisioning = identityd.get("provisioning")?;
        if provisioning.get("source")?.as_str()? != "dps" {
            return None;
        }
        let attestation = provisioning.get("attestation")?;
        assert_eq!(
            attestation.get("method").and_then(toml::Value::as_str),
            Some("symmetric_key"),
            "only DPS symmetric-key sets run edged here"
        );
        let registration_id = attestation.get("registration_id")?.as_str()?.to_owned();
        let key = b"config apply test device key 32B";
        let key_file = work.join("device-id.key");
        std::fs::write(&key_file, key).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let config = cloud_emulator::Config {
            individual_enrollments: vec![cloud_emulator::IndividualEnrollment {
                registration_id,
                device_id: None,
                assigned_hub: None,
                payload: None,
                iot_edge: true,
                attestation: cloud_emulator::Attestation::SymmetricKey {
                    primary_key: base64::engine::general_purpose::STANDARD.encode(key),
                    secondary_key: None,
                },
            }],
            ..cloud_emulator::Config::default()
        };
        let emulator = runtime.block_on(cloud_emulator::start(config)).unwrap();
        Some(Cloud {
            emulator,
            key_file,
            _runtime: runtime,
        })
    }
}

/// A Docker engine of the test's own, enough for edged to start: no containers, and a module
/// network that does not exist until edged creates it. Records the requests it was sent.
struct FakeEngine {
    socket: PathBuf,
    engine: std::sync::Arc<EngineRouter>,
    _runtime: tokio::runtime::Runtime,
}

#[derive(Default)]
struct EngineRouter {
    requests: std::sync::Mutex<Vec<String>>,
}

impl http_common::Handler for EngineRouter {
    async fn handle(&self, request: http_common::Request) -> http_common::Response {
        let path = request.path.strip_prefix("/v1.41").unwrap_or(&request.path);
        self.requests
            .lock()
            .unwrap()
            .push(format!("{} {path}", request.method));
        let (status, body) = match (&request.method, path) {
            (&http::Method::GET, "/containers/json" | "/networks") => {
                (http::StatusCode::OK, serde_json::json!([]))
            }
            (&http::Method::POST, "/networks/create") => {
                (http::StatusCode::CREATED, serde_json::json!({"Id": "net"}))
            }
            (&http::Method::GET, "/version") => (
                http::StatusCode::OK,
                serde_json::json!({"Version": "27.0.0", "ApiVersion": "1.41"}),
            ),
            _ => (
                http::StatusCode::NOT_FOUND,
                serde_json::json!({"message": format!("no such object: {path}")}),
            ),
        };
        http_common::json_response(status, &body)
    }
}

impl FakeEngine {
    fn start(socket: &Path) -> FakeEngine {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let engine = std::sync::Arc::new(EngineRouter::default());
        let listener = {
            let _entered = runtime.enter();
            tokio::net::UnixListener::bind(socket).unwrap()
        };
        runtime.spawn(http_common::serve(
            listener,
            std::sync::Arc::clone(&engine),
            http_common::ServerOptions::default(),
            std::future::pending(),
        ));
        FakeEngine {
            socket: socket.to_owned(),
            engine,
            _runtime: runtime,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.engine.requests.lock().unwrap().clone()
    }
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let hex: String = key.iter().map(|byte| format!("{byte:02x}")).collect();
    let mut child = Command::new("openssl")
        .args([
            "dgst",
            "-sha256",
            "-mac",
            "HMAC",
            "-macopt",
            &format!("hexkey:{hex}"),
            "-binary",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl is needed");
    child.stdin.take().unwrap().write_all(message).unwrap();
    child.wait_with_output().unwrap().stdout
}

fn secret(root: &Path, name: &str) -> Vec<u8> {
    let path = root.join("var/secrets/aziot/keyd").join(name);
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    std::fs::read(path).unwrap()
}

#[test]
fn manual_sas() {
    let root = golden("manual-sas");
    let key = secret(root.path(), "device-id");
    assert_eq!(key, b"abcdefghijklmnopqrstuvwxyz123456");
    daemons_accept(
        "manual-sas",
        root.path(),
        Expect {
            device_key: Some(key),
            ..Expect::default()
        },
    );
}

#[test]
fn manual_connection_string() {
    let root = golden("manual-connection-string");
    let key = secret(root.path(), "device-id");
    assert_eq!(
        key, b"secret-key-bytes-for-tests-0000",
        "unpadded base64 decodes"
    );
    daemons_accept(
        "manual-connection-string",
        root.path(),
        Expect {
            device_key: Some(key),
            ..Expect::default()
        },
    );
}

#[test]
fn manual_x509() {
    let root = golden("manual-x509");
    daemons_accept("manual-x509", root.path(), Expect::default());
}

#[test]
fn dps_symmetric_key() {
    let root = golden("dps-symmetric-key");
    let key = secret(root.path(), "device-id");
    assert_eq!(key, b"device-key");
    daemons_accept(
        "dps-symmetric-key",
        root.path(),
        Expect {
            device_key: Some(key),
            ..Expect::default()
        },
    );
}

#[test]
fn dps_x509_with_a_pkcs11_key() {
    let root = golden("dps-x509-pkcs11");
    daemons_accept(
        "dps-x509-pkcs11",
        root.path(),
        Expect {
            device_key_pair_in_token: true,
            ..Expect::default()
        },
    );
}

#[test]
fn local_ca() {
    let root = golden("local-ca");
    daemons_accept("local-ca", root.path(), Expect::default());
}

#[test]
fn edge_ca_preloaded() {
    let root = golden("edge-ca");
    let key = secret(root.path(), "device-id");
    daemons_accept(
        "edge-ca",
        root.path(),
        Expect {
            device_key: Some(key),
            ..Expect::default()
        },
    );
}

#[test]
fn edge_quickstart() {
    let root = golden("edge-quickstart");
    assert!(
        !root.path().join("var/secrets").exists(),
        "a key given by URI writes no secret"
    );
    daemons_accept("edge-quickstart", root.path(), Expect::default());
}

#[test]
fn est_is_mapped_to_per_cert_ids() {
    // certd does not implement EST yet (it refuses EST settings at startup), so this super-config
    // is checked against its golden files only.
    golden("est");
}

/// The keys a daemon's `[[principal]]` with `uid` may use, from a generated keyd drop-in.
fn keyd_grants(root: &Path, uid: i64) -> Vec<String> {
    let keyd: toml::Table = std::fs::read_to_string(generated(root, "keyd"))
        .unwrap()
        .parse()
        .unwrap();
    keyd["principal"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|principal| principal["uid"].as_integer() == Some(uid))
        .flat_map(|principal| principal["keys"].as_array().unwrap().clone())
        .map(|key| key.as_str().unwrap().to_owned())
        .collect()
}

fn identityd_value(root: &Path, path: &[&str]) -> toml::Value {
    let identityd: toml::Value = std::fs::read_to_string(generated(root, "identityd"))
        .unwrap()
        .parse::<toml::Table>()
        .unwrap()
        .into();
    path.iter().fold(identityd, |value, key| {
        value
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("identityd's drop-in has no {}", path.join(".")))
    })
}

fn dn(pairs: &[(&str, &str)]) -> toml::Value {
    toml::Value::Table(
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), toml::Value::String((*value).to_owned())))
            .collect(),
    )
}

const CERTD_UID: i64 = 5556;
const IDENTITYD_UID: i64 = 5557;

#[test]
fn est_subject_dn_stays_a_dn_and_certd_may_rotate_est_identities() {
    let root = golden("dps-x509-est-subject-dn");
    // The DN subject is identityd's registration ID table (CN is the registration ID), as in
    // the reference's output; it was flattened to the CN.
    assert_eq!(
        identityd_value(
            root.path(),
            &["provisioning", "attestation", "registration_id"]
        ),
        dn(&[
            ("CN", "dn-device"),
            ("L", "Reykjavik"),
            ("O", "Contoso"),
            ("ST", "Capital Region")
        ])
    );
    // Identities enrolled with a bootstrap identity are renewed by certd under `<id>-temp`.
    let certd = keyd_grants(root.path(), CERTD_UID);
    for key in [
        "est-id",
        "est-id-temp",
        "est-bootstrap-id",
        "est-id-device-id",
        "est-id-device-id-temp",
        "est-bootstrap-id-device-id",
    ] {
        assert!(
            certd.contains(&key.to_owned()),
            "certd may not use {key}: {certd:?}"
        );
    }
}

#[test]
fn manual_est_subject_dn_is_the_whole_csr_subject() {
    let root = golden("manual-x509-est-subject-dn");
    assert_eq!(
        identityd_value(
            root.path(),
            &["provisioning", "authentication", "csr_subject"]
        ),
        dn(&[("C", "IS"), ("CN", "manual-dn"), ("OU", "Gateways")])
    );
    // An existing EST identity (no bootstrap, no renewal policy) is not rotated.
    assert_eq!(keyd_grants(root.path(), CERTD_UID), ["est-id-device-id"]);
}

#[test]
fn est_renewal_without_a_new_key_grants_only_what_it_uses() {
    let root = golden("dps-x509-est-renew-same-key");
    let identityd = keyd_grants(root.path(), IDENTITYD_UID);
    assert!(
        !identityd.contains(&"device-id-temp".to_owned()),
        "rotate_key = false: identityd makes no temp key: {identityd:?}"
    );
    let certd = keyd_grants(root.path(), CERTD_UID);
    assert!(
        certd.contains(&"est-id-device-id-temp".to_owned()),
        "{certd:?}"
    );
}

#[test]
fn refuses_an_invalid_super_config_naming_the_key() {
    let cases = [
        ("[provisioning]\nsource = \"manual\"\nconnection_string = \"HostName=h;DeviceId=d;SharedAccessKey=%%%\"\n", "provisioning.connection_string", "%%%"),
        ("cloud_timeout_sec = 5\n[provisioning]\nsource = \"none\"\n", "cloud_timeout_sec", "cloud_timeout_sec must be at least 70"),
        ("[provisioning]\nsource = \"dps\"\nid_scope = \"s\"\n[provisioning.attestation]\nmethod = \"symmetric_key\"\nregistration_id = \"r\"\nsymmetric_key = { value = \"QUJD\" }\n[edge_ca]\nauto_generated_edge_ca_expiry_days = 0\n", "edge_ca.auto_generated_edge_ca_expiry_days", "greater than 0"),
        ("[provisioning]\nsource = \"cloud\"\n", "provisioning.source", "unknown source"),
        ("[provisioning]\nsource = \"none\"\n[agent]\nbogus = 1\n", "agent", "unknown field `bogus`"),
        ("[provisioning\n", "not valid TOML", ""),
    ];
    for (text, key, detail) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, text).unwrap();
        let root = dir.path().join("root");
        let output = apply_fixture(&config, &root);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text:?} was accepted");
        assert!(
            stderr.contains(key),
            "{text:?}: the error does not name {key}: {stderr}"
        );
        if key == "provisioning.connection_string" {
            assert!(
                !stderr.contains(detail),
                "the error echoes the secret: {stderr}"
            );
        } else {
            assert!(stderr.contains(detail), "{text:?}: {stderr}");
        }
        assert!(
            !root.join("etc").exists(),
            "nothing is written for an invalid super-config"
        );
    }
}

#[test]
fn apply_without_root_option_needs_root_and_missing_users_need_uids() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixtures().join("manual-sas.toml");
    // Without --uid, users that do not exist cannot become principals.
    if iotedge::users::lookup("aziotid").is_none() {
        let output = iotedge(&[
            "config",
            "apply",
            "-c",
            &config.display().to_string(),
            "--root",
            &dir.path().display().to_string(),
        ]);
        assert!(!output.status.success());
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("user \"aziotid\" does not exist"),
            "{}",
            describe(&output)
        );
    }
    let mut arguments = vec![
        "config",
        "apply",
        "-c",
        "/nonexistent/config.toml",
        "--root",
        "/nonexistent-root",
    ];
    arguments.extend(UID_ARGS);
    let output = iotedge(&arguments);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("/nonexistent/config.toml"),
        "{}",
        describe(&output)
    );
}

#[test]
fn config_mp_writes_a_minimal_super_config_that_applies() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("config.toml");
    let out_text = out.display().to_string();
    let connection_string = "HostName=hub.example.org;DeviceId=mp-device;SharedAccessKey=bXAta2V5";
    let output = iotedge(&[
        "config",
        "mp",
        "--connection-string",
        connection_string,
        "-o",
        &out_text,
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("bXAta2V5"),
        "the key is not printed"
    );
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let again = iotedge(&[
        "config",
        "mp",
        "--connection-string",
        connection_string,
        "-o",
        &out_text,
    ]);
    assert!(
        !again.status.success(),
        "refuses to overwrite without --force"
    );
    let forced = iotedge(&[
        "config",
        "mp",
        "--connection-string",
        connection_string,
        "-o",
        &out_text,
        "--force",
        "--edge",
    ]);
    assert!(forced.status.success(), "{}", describe(&forced));
    let bad = iotedge(&[
        "config",
        "mp",
        "--connection-string",
        "HostName=h",
        "-o",
        &dir.path().join("x.toml").display().to_string(),
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("DeviceId"),
        "{}",
        describe(&bad)
    );

    let root = dir.path().join("root");
    let output = apply_fixture(&out, &root);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(secret(&root, "device-id"), b"mp-key");
    let identityd = std::fs::read_to_string(generated(&root, "identityd")).unwrap();
    assert!(
        identityd.contains("device_id = \"mp-device\""),
        "{identityd}"
    );
    assert!(
        generated(&root, "edged").exists(),
        "--edge adds [agent], so edged is configured"
    );
}

#[test]
fn applying_twice_gives_the_same_files() {
    let root = tempfile::tempdir().unwrap();
    let fixture = fixtures().join("edge-quickstart.toml");
    assert!(apply_fixture(&fixture, root.path()).status.success());
    let first = std::fs::read(generated(root.path(), "edged")).unwrap();
    assert!(apply_fixture(&fixture, root.path()).status.success());
    assert_eq!(
        first,
        std::fs::read(generated(root.path(), "edged")).unwrap()
    );
    let leftovers: Vec<_> = std::fs::read_dir(generated(root.path(), "edged").parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");
}

#[test]
fn certs_issued_on_the_device() {
    let root = golden("issued-by-local-ca");
    daemons_accept("issued-by-local-ca", root.path(), Expect::default());
}
