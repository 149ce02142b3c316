//! `iotedge config apply` end to end: one fixture of our own per set of the reference's
//! `config apply` tests (aziotctl's and edgelet's, in `fixtures/aziotctl/` and
//! `fixtures/edgelet/`, named after the set) and a few more, each with golden files; every
//! golden file is then fed unchanged to the real daemon it is for (keyd, certd and identityd
//! always; edged when the set configures it), in a mount namespace of the set's device, until
//! each serves. Also secrets, modes, grants and refusals. A DPS set the emulator can enroll gets
//! its device identity from it.
//!
//! Regenerate the golden files with `UPDATE_GOLDEN=1 cargo test -p iotedge --test config_apply`
//! and review the diff (docs/install.md lists how they differ from the reference's outputs).

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;

use common::device_root::DeviceRoot;
use common::{
    apply_fixture, daemon_binary, describe, fixtures, iotedge, Daemon, SoftHsm, UID_ARGS,
};

/// The folders under `/etc/aziot/` `config apply` writes a drop-in into (tpmd's is read by keyd).
const DAEMONS: [&str; 5] = ["keyd", "certd", "identityd", "edged", "tpmd"];

fn generated(root: &Path, daemon: &str) -> PathBuf {
    root.join("etc/aziot")
        .join(daemon)
        .join("config.d/00-super.toml")
}

/// The key `fixtures/edgelet/imported-master-encryption-key.toml` imports, from this file.
const MASTER_ENCRYPTION_KEY_FILE: &str = "/tmp/iotedge-config-apply-tests/master-encryption-key";
const MASTER_ENCRYPTION_KEY: &[u8] =
    b"an imported master encryption key for the config apply tests";

/// Applies `name.toml` and compares every generated drop-in with `golden/<name>/<daemon>.toml`.
fn golden(name: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    // Written whole under a new name, then renamed: tests run in parallel.
    let key_file = Path::new(MASTER_ENCRYPTION_KEY_FILE);
    std::fs::create_dir_all(key_file.parent().unwrap()).unwrap();
    let partial = key_file.with_extension(format!(
        "{}-{:?}.partial",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&partial, MASTER_ENCRYPTION_KEY).unwrap();
    std::fs::rename(&partial, key_file).unwrap();
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

// The daemons on the golden files.
//
// Each daemon reads its golden file unchanged, from its default place, in a mount namespace of
// the set's device (common/device_root.rs): the paths inside the files resolve to the test's
// temporary folder. The test writes what the files refer to there: the secrets `config apply`
// wrote, key and certificate files made with openssl, PKCS#11 keys in a SoftHSM2 token (its
// `SOFTHSM2_CONF` in keyd's environment), `/etc/hosts` pointing the DPS host at the cloud
// emulator (or at nothing) and a fake Docker engine at `/var/run/docker.sock`.

/// The host names the fixtures give DPS and the hub that DPS assigns (the emulator's).
const HUB_HOST: &str = "hub.config-apply.test";

/// How a set's daemons take its golden files, beyond serving on them.
#[derive(Clone, Copy, Default)]
struct Expect {
    /// keyd: HMAC with `device-id` must equal HMAC with these key bytes (what `config apply`
    /// decoded from the super-config).
    device_key: Option<&'static [u8]>,
    /// Daemons that refuse their golden file, each with words its error must contain: a
    /// feature of another issue. When it lands, the entry goes and the daemon must serve.
    refuses: &'static [(&'static str, &'static str)],
    /// TPM attestation with a TCTI that reaches no TPM (the fixture's `[tpm] tcti`): keyd's
    /// tpmd API answers 503 "the TPM could not be opened", identityd serves and reports its
    /// provisioning failed naming the TPM service, edged waits for the device identity.
    tpm_absent: bool,
}

/// The golden files of a set, parsed.
struct GoldenFiles {
    dir: PathBuf,
    tables: std::collections::BTreeMap<&'static str, toml::Table>,
}

impl GoldenFiles {
    fn read(name: &str) -> GoldenFiles {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        let mut tables = std::collections::BTreeMap::new();
        for daemon in DAEMONS {
            if let Ok(text) = std::fs::read_to_string(dir.join(format!("{daemon}.toml"))) {
                tables.insert(daemon, text.parse::<toml::Table>().unwrap());
            }
        }
        GoldenFiles { dir, tables }
    }

    fn get(&self, daemon: &str, path: &[&str]) -> Option<&toml::Value> {
        let mut value = self.tables.get(daemon)?.get(path[0])?;
        for key in &path[1..] {
            value = value.get(key)?;
        }
        Some(value)
    }

    fn str(&self, daemon: &str, path: &[&str]) -> Option<&str> {
        self.get(daemon, path).and_then(toml::Value::as_str)
    }

    /// `[preloaded_keys]` or `[preloaded_certs]` entries whose value is a URI.
    fn uris(&self, daemon: &str, table: &str) -> Vec<(String, String)> {
        self.get(daemon, &[table])
            .and_then(toml::Value::as_table)
            .into_iter()
            .flatten()
            .filter_map(|(id, uri)| Some((id.clone(), uri.as_str()?.to_owned())))
            .collect()
    }

    /// identityd's device ID, registration ID (as a string) or else the host name: the CN of
    /// a device cert the test makes.
    fn device_name(&self) -> String {
        [
            &["provisioning", "device_id"][..],
            &["provisioning", "attestation", "registration_id"],
            &["hostname"],
        ]
        .iter()
        .find_map(|path| self.str("identityd", path))
        .unwrap_or("device")
        .to_owned()
    }
}

fn openssl(arguments: &[&str], paths: &[&Path]) {
    let output = Command::new("openssl")
        .args(arguments)
        .args(paths)
        .output()
        .expect("openssl is installed (tools/install-deps.sh)");
    assert!(
        output.status.success(),
        "openssl {arguments:?}: {}",
        describe(&output)
    );
}

/// An EC P-256 key (PKCS#8 PEM) at `path`.
fn make_key(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    openssl(
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ],
        &[path],
    );
}

/// A self-signed certificate for `key` at `path`: a CA (keyCertSign) or a TLS client leaf.
fn make_cert(key: &Path, path: &Path, common_name: &str, ca: bool) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let subject = format!("/CN={common_name}");
    let (constraints, usage) = if ca {
        (
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign,digitalSignature",
        )
    } else {
        (
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature",
        )
    };
    let output = Command::new("openssl")
        .args(["req", "-x509", "-new", "-days", "30", "-subj", &subject])
        .args(["-addext", constraints, "-addext", usage])
        .arg("-key")
        .arg(key)
        .arg("-out")
        .arg(path)
        .output()
        .expect("openssl is installed (tools/install-deps.sh)");
    assert!(output.status.success(), "{}", describe(&output));
}

/// Writes what the golden files refer to and does not exist yet: key files (raw bytes for a
/// symmetric key, EC keys otherwise), certificate files (for the key of the same ID when that
/// is a file, self-signed), the DPS payload; PKCS#11 keys go into a new SoftHSM2 token.
fn write_referenced_files(device: &DeviceRoot, files: &GoldenFiles) -> Option<SoftHsm> {
    let symmetric: Vec<&str> = [
        &["provisioning", "authentication", "device_id_pk"][..],
        &["provisioning", "attestation", "symmetric_key"],
    ]
    .iter()
    .filter_map(|path| files.str("identityd", path))
    .chain(["iotedge_master_encryption_id"])
    .collect();
    let mut labels = Vec::new();
    let mut key_files = std::collections::BTreeMap::new();
    for (id, uri) in files.uris("keyd", "preloaded_keys") {
        if let Some(path) = uri.strip_prefix("file://") {
            let host_path = device.path(path);
            if !host_path.exists() {
                if symmetric.contains(&id.as_str()) {
                    device.write(path, format!("test key bytes for {id}"));
                } else {
                    make_key(&host_path);
                }
            }
            key_files.insert(id, host_path);
        } else if let Some(object) = uri
            .split(['?', ';'])
            .find_map(|attribute| attribute.strip_prefix("object="))
        {
            labels.push(percent_decoded(object));
        }
    }
    for (id, uri) in files.uris("certd", "preloaded_certs") {
        let path = uri.strip_prefix("file://").expect("a file:// cert");
        let host_path = device.path(path);
        if host_path.exists() {
            continue;
        }
        let ca = id != "device-id" && !id.starts_with("est-");
        let common_name = if id == "device-id" {
            files.device_name()
        } else {
            format!("{id} test cert")
        };
        let key = key_files.get(&id).cloned().unwrap_or_else(|| {
            let key = device.scratch(&format!("{id}.unrelated.key.pem"));
            make_key(&key);
            key
        });
        make_cert(&key, &host_path, &common_name, ca);
    }
    if let Some(uri) = files.str("identityd", &["provisioning", "payload", "uri"]) {
        device.write(
            uri.strip_prefix("file://").unwrap(),
            "{\"modelId\":\"dtmi:test:configApply;1\"}",
        );
    }
    files
        .get("keyd", &["aziot_keys", "pkcs11_lib_path"])
        .map(|_| {
            let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
            SoftHsm::with_key_pairs(&labels)
        })
}

/// An RFC 7512 attribute value with its `%XX` escapes decoded.
fn percent_decoded(value: &str) -> String {
    let mut bytes = Vec::new();
    let mut rest = value.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        match (byte, tail.get(..2)) {
            (b'%', Some(hex)) => {
                let hex = std::str::from_utf8(hex).unwrap();
                bytes.push(u8::from_str_radix(hex, 16).unwrap());
                rest = &tail[2..];
            }
            _ => {
                bytes.push(byte);
                rest = tail;
            }
        }
    }
    String::from_utf8(bytes).unwrap()
}

/// The DPS host the set's identityd names, if it provisions through DPS.
fn dps_host(files: &GoldenFiles) -> Option<String> {
    let endpoint = files.str("identityd", &["provisioning", "global_endpoint"])?;
    let authority = endpoint.strip_prefix("https://")?.split('/').next()?;
    Some(authority.split(':').next()?.to_owned())
}

/// The DPS / IoT Hub emulator for a DPS set the test can enroll: symmetric key (the key file
/// keyd reads) or X.509 with a device cert the test made for a key file. It listens on port
/// 443 of a loopback address of its own; the device's `/etc/hosts` names it.
struct Cloud {
    emulator: cloud_emulator::RunningEmulator,
    address: std::net::Ipv4Addr,
    // Serves the emulator until the test ends.
    _runtime: tokio::runtime::Runtime,
}

impl Cloud {
    fn for_set(device: &DeviceRoot, files: &GoldenFiles) -> Option<Cloud> {
        let host = dps_host(files)?;
        let attestation = files
            .get("identityd", &["provisioning", "attestation"])?
            .as_table()?;
        let file = |daemon: &str, table: &str, id: &str| {
            let uri = files.str(daemon, &[table, id])?.strip_prefix("file://")?;
            std::fs::read(device.path(uri)).ok()
        };
        let (registration_id, attestation) = match attestation.get("method")?.as_str()? {
            "symmetric_key" => {
                let key = file("keyd", "preloaded_keys", "device-id")?;
                // The emulator, as DPS, takes keys of 16 to 64 bytes.
                if !(16..=64).contains(&key.len()) {
                    return None;
                }
                (
                    attestation.get("registration_id")?.as_str()?.to_owned(),
                    cloud_emulator::Attestation::SymmetricKey {
                        primary_key: base64::engine::general_purpose::STANDARD.encode(key),
                        secondary_key: None,
                    },
                )
            }
            "x509" => {
                // Only a cert the test made for a key file can be presented in TLS.
                file("keyd", "preloaded_keys", "device-id")?;
                let cert =
                    String::from_utf8(file("certd", "preloaded_certs", "device-id")?).ok()?;
                let registration_id = match attestation.get("registration_id") {
                    Some(id) => id.as_str()?.to_owned(),
                    None => files.device_name(),
                };
                (
                    registration_id,
                    cloud_emulator::Attestation::X509 {
                        cert_pem: Some(cert),
                        cert_file: None,
                        thumbprints: Vec::new(),
                    },
                )
            }
            _ => return None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let scope = files
            .str("identityd", &["provisioning", "scope_id"])?
            .to_owned();
        // A free loopback address (127.0.0.0/8 is all loopback): port 443 is the URL's.
        for attempt in 0u32.. {
            let seed = std::process::id()
                ^ attempt.wrapping_mul(2_654_435_761)
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos();
            let address = std::net::Ipv4Addr::new(
                127,
                (seed >> 16) as u8 | 1,
                (seed >> 8) as u8,
                (seed as u8).max(2),
            );
            let config = cloud_emulator::Config {
                listen: (address, 443).into(),
                server_names: vec![host.clone()],
                hub_hostname: Some(HUB_HOST.to_owned()),
                id_scope: scope.clone(),
                individual_enrollments: vec![cloud_emulator::IndividualEnrollment {
                    registration_id: registration_id.clone(),
                    device_id: None,
                    assigned_hub: None,
                    payload: None,
                    iot_edge: files.tables.contains_key("edged"),
                    attestation: attestation.clone(),
                }],
                ..cloud_emulator::Config::default()
            };
            match runtime.block_on(cloud_emulator::start(config)) {
                Ok(emulator) => {
                    return Some(Cloud {
                        emulator,
                        address,
                        _runtime: runtime,
                    })
                }
                Err(error) if attempt >= 5 => panic!("the cloud emulator did not start: {error}"),
                Err(_) => {}
            }
        }
        unreachable!()
    }
}

/// A daemon in the device's namespace, logging to the scratch folder, serving on `socket` (a
/// device path).
fn start(
    device: &DeviceRoot,
    mut command: Command,
    daemon: &str,
    socket: &str,
) -> Result<Daemon, String> {
    command.env("AZIOT_LOG", "info");
    Daemon::spawn(
        command,
        &device.path(socket),
        &device.scratch(&format!("{daemon}.log")),
    )
}

/// The daemon exits at once with 153 and an error containing `words`.
fn refuses(name: &str, device: &DeviceRoot, daemon: &str, words: &str) {
    let output = device
        .command(daemon_binary(daemon))
        .env("AZIOT_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(153),
        "{name}: {daemon} did not refuse its golden file: {}",
        describe(&output)
    );
    assert!(
        stderr.contains(words),
        "{name}: {daemon}'s refusal does not say {words:?}: {stderr}"
    );
}

/// A daemon's socket (a device path) from its `unix://` URI in a golden file, or its default.
fn socket_of(files: &GoldenFiles, daemon: &str, path: &[&str], default: &'static str) -> String {
    files
        .str(daemon, path)
        .map(|uri| {
            uri.strip_prefix("unix://")
                .expect("a unix:// URI")
                .to_owned()
        })
        .unwrap_or_else(|| default.to_owned())
}

/// Applies the set's fixture (checked against its golden files), then runs keyd, certd,
/// identityd and (when configured) edged on the golden files, each in the device's mount
/// namespace, and checks that each serves: keyd, certd and identityd answer a request, edged's
/// management API lists modules. A daemon in `expect.refuses` must refuse instead; the daemons
/// after it are still checked to accept their files as far as they can without it.
fn check_set(name: &str, expect: Expect) {
    let root = golden(name);
    let files = GoldenFiles::read(name);
    let device = DeviceRoot::new();
    for daemon in files.tables.keys() {
        let golden = std::fs::read(files.dir.join(format!("{daemon}.toml"))).unwrap();
        device.write(
            format!("/etc/aziot/{daemon}/config.d/00-super.toml"),
            golden,
        );
    }
    // The secrets `config apply` wrote, where the files name them.
    let secrets = root.path().join("var/secrets/aziot/keyd");
    for entry in std::fs::read_dir(&secrets).into_iter().flatten() {
        let entry = entry.unwrap();
        device.write(
            Path::new("/var/secrets/aziot/keyd").join(entry.file_name()),
            std::fs::read(entry.path()).unwrap(),
        );
    }
    let hsm = write_referenced_files(&device, &files);
    let refused = |daemon: &str| expect.refuses.iter().find(|(name, _)| *name == daemon);
    let cloud = refused("identityd")
        .is_none()
        .then(|| Cloud::for_set(&device, &files))
        .flatten();
    // No name the files use leaves the machine: the DPS host is the emulator or nothing.
    let mut hosts = String::from("127.0.0.1 localhost\n");
    if let Some(host) = dps_host(&files) {
        let address = cloud
            .as_ref()
            .map_or(std::net::Ipv4Addr::LOCALHOST, |cloud| cloud.address);
        hosts.push_str(&format!("{address} {host} {HUB_HOST}\n"));
    }
    // The fixtures' EST servers are fictional: their names point at nothing.
    for host in est_hosts(&files) {
        hosts.push_str(&format!("127.0.0.1 {host}\n"));
    }
    device.write("/etc/hosts", hosts);
    let runtime = common::runtime();
    let mut running = Vec::new();

    // keyd: the device key is the one config apply decoded, token keys load.
    let keyd_socket = socket_of(
        &files,
        "keyd",
        &["endpoints", "aziot_keyd"],
        "/run/aziot/keyd.sock",
    );
    let mut keyd_command = device.command(daemon_binary("keyd"));
    if let Some(hsm) = &hsm {
        keyd_command.env("SOFTHSM2_CONF", &hsm.conf);
    }
    let keyd = start(&device, keyd_command, "keyd", &keyd_socket)
        .unwrap_or_else(|error| panic!("{name}: keyd refused its golden file: {error}"));
    let keys = key_api::Client::new(http_common::UdsClient::new(device.path(&keyd_socket)));
    let missing = runtime.block_on(keys.load_key_pair("no-such-key"));
    assert_eq!(
        missing
            .as_ref()
            .err()
            .and_then(http_common::ClientError::status),
        Some(http::StatusCode::NOT_FOUND),
        "{name}: keyd did not answer: {missing:?}\n{}",
        keyd.log()
    );
    if let Some(key_bytes) = expect.device_key {
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
            "{name}: the device key holds other bytes"
        );
    }
    // keyd: serves the tpmd API on the tpmd file (every set has one, as the reference's do).
    let tpmd_socket = socket_of(
        &files,
        "tpmd",
        &["endpoints", "aziot_tpmd"],
        "/run/aziot/tpmd.sock",
    );
    assert!(
        files.tables.contains_key("tpmd")
            && std::os::unix::net::UnixStream::connect(device.path(&tpmd_socket)).is_ok(),
        "{name}: keyd does not listen on {tpmd_socket}\n{}",
        keyd.log()
    );
    if expect.tpm_absent {
        tpm_cannot_be_opened(name, &runtime, &device.path(&tpmd_socket), &keyd);
    }
    for (id, uri) in files.uris("keyd", "preloaded_keys") {
        if uri.starts_with("pkcs11:") {
            runtime
                .block_on(keys.load_key_pair(&id))
                .unwrap_or_else(|error| {
                    panic!(
                        "{name}: keyd cannot load token key {id}: {error}\n{}",
                        keyd.log()
                    )
                });
        }
    }
    running.push(keyd);

    // certd: answers (404 for a cert it does not have).
    let certd_socket = socket_of(
        &files,
        "certd",
        &["endpoints", "aziot_certd"],
        "/run/aziot/certd.sock",
    );
    let certs = cert_api::Client::new(http_common::UdsClient::new(device.path(&certd_socket)));
    if let Some((_, words)) = refused("certd") {
        refuses(name, &device, "certd", words);
    } else {
        let certd = start(
            &device,
            device.command(daemon_binary("certd")),
            "certd",
            &certd_socket,
        )
        .unwrap_or_else(|error| panic!("{name}: certd refused its golden file: {error}"));
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
        est_enrollment_fails_clearly(name, &device, &files, &runtime, &certs, &certd);
        running.push(certd);
    }

    // identityd: serves its provisioning settings; provisions through the emulator when there
    // is one; has the device cert issued when it makes the CSR (manual X.509 issued on the
    // device).
    let identityd_socket = socket_of(
        &files,
        "identityd",
        &["endpoints", "aziot_identityd"],
        "/run/aziot/identityd.sock",
    );
    let identity = http_common::UdsClient::new(device.path(&identityd_socket));
    let identityd = if let Some((_, words)) = refused("identityd") {
        refuses(name, &device, "identityd", words);
        None
    } else {
        let mut command = device.command(daemon_binary("identityd"));
        if let Some(cloud) = &cloud {
            command.env("SSL_CERT_FILE", cloud.emulator.ca_cert_path());
        }
        let identityd = start(&device, command, "identityd", &identityd_socket)
            .unwrap_or_else(|error| panic!("{name}: identityd refused its golden file: {error}"));
        let answer = runtime
            .block_on(identity.send(
                http::Method::GET,
                "/identities/provisioning?api-version=2021-12-01",
                &[],
                bytes::Bytes::new(),
            ))
            .unwrap_or_else(|error| {
                panic!(
                    "{name}: identityd did not answer: {error:?}\n{}",
                    identityd.log()
                )
            });
        let info: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
        assert_eq!(
            (answer.status, info["source"].as_str()),
            (
                http::StatusCode::OK,
                files.str("identityd", &["provisioning", "source"])
            ),
            "{name}: identityd's provisioning info: {info}\n{}",
            identityd.log()
        );
        if cloud.is_some() {
            device_is_provisioned(name, &runtime, &identity, &identityd);
        }
        if expect.tpm_absent {
            provisioning_failed_at_the_tpm(name, &runtime, &identity, &identityd);
        }
        // An EST-issued device cert cannot be issued: the fixture's EST server is fictional
        // (est_enrollment_fails_clearly checked the error).
        if let (None, false, Some(toml::Value::Table(subject))) = (
            refused("certd"),
            est_issued(&files, "device-id"),
            files.get(
                "identityd",
                &["provisioning", "authentication", "csr_subject"],
            ),
        ) {
            let work = device.scratch("device-cert");
            std::fs::create_dir(&work).unwrap();
            device_cert_is_issued(name, &work, &runtime, &certs, subject, &identityd);
        }
        Some(identityd)
    };

    if files.tables.contains_key("edged") {
        edged_serves(name, &device, &files, &runtime, &expect, identityd.as_ref());
    }
    drop(identityd);
    drop(running);
    drop(cloud);
}

/// Whether certd's golden file issues cert `id` by EST.
fn est_issued(files: &GoldenFiles, id: &str) -> bool {
    files.str("certd", &["cert_issuance", id, "method"]) == Some("est")
}

/// The host names of the EST URLs in certd's golden file.
fn est_hosts(files: &GoldenFiles) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    if let Some(issuance) = files
        .get("certd", &["cert_issuance"])
        .and_then(toml::Value::as_table)
    {
        for (id, options) in issuance {
            if let Some(url) = options.get("url").and_then(toml::Value::as_str) {
                urls.push(url.to_owned());
            }
            if id == "est" {
                for url in options
                    .get("urls")
                    .and_then(toml::Value::as_table)
                    .into_iter()
                    .flatten()
                    .filter_map(|(_, url)| url.as_str())
                {
                    urls.push(url.to_owned());
                }
            }
        }
    }
    urls.iter()
        .filter_map(|url| {
            let rest = url.split_once("://")?.1;
            let authority = rest.split('/').next()?;
            Some(authority.split(':').next()?.to_owned())
        })
        .collect()
}

/// certd serves with the set's EST configuration; an enrollment of an EST-issued cert ID fails
/// clearly (the fixtures' EST servers do not exist): 502 or 503 naming the EST server, and
/// certd keeps serving.
fn est_enrollment_fails_clearly(
    name: &str,
    device: &DeviceRoot,
    files: &GoldenFiles,
    runtime: &tokio::runtime::Runtime,
    certs: &cert_api::Client,
    certd: &Daemon,
) {
    let Some(issuance) = files
        .get("certd", &["cert_issuance"])
        .and_then(toml::Value::as_table)
    else {
        return;
    };
    let est_ids: Vec<&String> = issuance
        .iter()
        .filter(|(_, options)| options.get("method").and_then(toml::Value::as_str) == Some("est"))
        .map(|(id, _)| id)
        .collect();
    let Some(id) = est_ids.first() else {
        return;
    };
    let work = device.scratch("est-csr");
    std::fs::create_dir_all(&work).unwrap();
    let key = work.join("key.pem");
    let csr = work.join("csr.pem");
    make_key(&key);
    openssl(
        &["req", "-new", "-subj", "/CN=est-enrollment", "-key"],
        &[&key, Path::new("-out"), &csr],
    );
    let csr = std::fs::read_to_string(&csr).unwrap();
    let answer = runtime.block_on(certs.create_cert(id, &csr, None));
    match answer {
        Err(http_common::ClientError::Status { status, message })
            if status == http::StatusCode::SERVICE_UNAVAILABLE
                || status == http::StatusCode::BAD_GATEWAY =>
        {
            assert!(
                message.contains("EST server"),
                "{name}: certd's EST error does not name the EST server: {message}"
            );
        }
        other => panic!(
            "{name}: enrolling {id} at a fictional EST server: {other:?}\n{}",
            certd.log()
        ),
    }
    let answer = runtime.block_on(certs.get_cert("no-such-cert"));
    assert_eq!(
        answer
            .as_ref()
            .err()
            .and_then(http_common::ClientError::status),
        Some(http::StatusCode::NOT_FOUND),
        "{name}: certd stopped serving after the EST error: {answer:?}"
    );
}

/// keyd's tpmd API, asked for the TPM's keys, answers 503 with the reason as its message.
fn tpm_cannot_be_opened(
    name: &str,
    runtime: &tokio::runtime::Runtime,
    socket: &Path,
    keyd: &Daemon,
) {
    let answer = runtime
        .block_on(http_common::UdsClient::new(socket).send(
            http::Method::GET,
            "/get_tpm_keys?api-version=2020-09-01",
            &[],
            bytes::Bytes::new(),
        ))
        .unwrap_or_else(|error| panic!("{name}: keyd's tpmd API did not answer: {error}"));
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    assert_eq!(
        answer.status,
        http::StatusCode::SERVICE_UNAVAILABLE,
        "{name}: {body}\n{}",
        keyd.log()
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("the TPM could not be opened")),
        "{name}: {body}"
    );
}

/// identityd keeps serving and reports, in `GET /identities/provisioning`, that provisioning
/// failed at the TPM service.
fn provisioning_failed_at_the_tpm(
    name: &str,
    runtime: &tokio::runtime::Runtime,
    identity: &http_common::UdsClient,
    identityd: &Daemon,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let answer = runtime.block_on(identity.send(
            http::Method::GET,
            "/identities/provisioning?api-version=2021-12-01",
            &[],
            bytes::Bytes::new(),
        ));
        let info: serde_json::Value = match &answer {
            Ok(response) if response.status == http::StatusCode::OK => {
                serde_json::from_slice(&response.body).unwrap_or_default()
            }
            _ => serde_json::Value::Null,
        };
        if info["status"] == "failed" {
            let error = info["error"].as_str().unwrap_or_default();
            assert!(error.contains("TPM service"), "{name}: {info}");
            assert_eq!(info["source"], "dps", "{name}: {info}");
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name}: identityd did not report the TPM failure: {answer:?} {info}\n{}",
            identityd.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// identityd hands out the device identity the emulator assigned.
fn device_is_provisioned(
    name: &str,
    runtime: &tokio::runtime::Runtime,
    identity: &http_common::UdsClient,
    identityd: &Daemon,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let answer = runtime.block_on(identity.send(
            http::Method::POST,
            "/identities/device?api-version=2020-09-01",
            &[("content-type", "application/json")],
            bytes::Bytes::from_static(b"{\"type\":\"aziot\"}"),
        ));
        match answer {
            Ok(response) if response.status == http::StatusCode::OK => {
                let body = String::from_utf8_lossy(&response.body);
                assert!(body.contains(HUB_HOST), "{name}: {body}");
                return;
            }
            other if std::time::Instant::now() > deadline => panic!(
                "{name}: identityd was not provisioned by the emulator: {other:?}\n{}",
                identityd.log()
            ),
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// edged on its golden file: with systemd's sockets for `fd://` listen URIs (bound at the
/// `[connect]` paths, as the socket units do), a fake Docker engine at the moby URI. It
/// serves when its peers do; without identityd it waits for the device identity, and without
/// certd it stops at the Edge CA, both after accepting its file.
fn edged_serves(
    name: &str,
    device: &DeviceRoot,
    files: &GoldenFiles,
    runtime: &tokio::runtime::Runtime,
    expect: &Expect,
    identityd: Option<&Daemon>,
) {
    let engine = FakeEngine::start(&device.path(socket_of(
        files,
        "edged",
        &["moby_runtime", "uri"],
        "/var/run/docker.sock",
    )));
    let mut activated = Vec::new();
    let mut bound = Vec::new();
    for kind in ["management", "workload"] {
        let key = format!("{kind}_uri");
        let listen = files.str("edged", &["listen", &key]).unwrap();
        let connect = socket_of(files, "edged", &["connect", &key], "");
        match listen.strip_prefix("fd://") {
            Some(fd_name) => activated.push((connect, fd_name.to_owned())),
            None => bound.push(listen.strip_prefix("unix://").unwrap().to_owned()),
        }
    }
    let management = socket_of(files, "edged", &["connect", "management_uri"], "");
    let command = if activated.is_empty() {
        device.command(daemon_binary("edged"))
    } else {
        let mut command = device.command("systemd-socket-activate");
        for (path, _) in &activated {
            command.arg("-l").arg(path);
        }
        let names: Vec<&str> = activated
            .iter()
            .map(|(_, fd_name)| fd_name.as_str())
            .collect();
        command
            .arg(format!("--fdname={}", names.join(":")))
            .arg("--setenv=AZIOT_LOG=info")
            .arg(daemon_binary("edged"));
        command
    };
    let mut edged = start(device, command, "edged", &management)
        .unwrap_or_else(|error| panic!("{name}: edged refused its golden file: {error}"));
    // A socket-activated edged starts on the first connection.
    let _ = std::os::unix::net::UnixStream::connect(device.path(&management));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let refused = |daemon: &str| expect.refuses.iter().any(|(name, _)| *name == daemon);
    if refused("identityd") || expect.tpm_absent {
        while !edged
            .log()
            .contains("could not get the device identity from identityd")
        {
            assert!(
                std::time::Instant::now() < deadline && edged.exit_status().is_none(),
                "{name}: edged did not wait for identityd: {}",
                edged.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        return;
    }
    // Without certd, or with an Edge CA from a fictional EST server, edged stops at the Edge CA.
    if refused("certd") || est_issued(files, "aziot-edged-ca") {
        let status = loop {
            if let Some(status) = edged.exit_status() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: edged went on without certd: {}",
                edged.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_ne!(status.code(), Some(153), "{name}: {}", edged.log());
        assert!(
            edged.log().contains("preparing the Edge CA"),
            "{name}: edged did not stop at the Edge CA: {}",
            edged.log()
        );
        return;
    }
    let client = http_common::UdsClient::new(device.path(&management));
    loop {
        let answer = runtime.block_on(client.send(
            http::Method::GET,
            "/modules?api-version=2020-07-07",
            &[],
            bytes::Bytes::new(),
        ));
        match answer {
            Ok(response) if response.status == http::StatusCode::OK => break,
            other if std::time::Instant::now() > deadline || edged.exit_status().is_some() => {
                panic!(
                    "{name}: edged's management API did not list modules: {other:?}\n{}\nidentityd:\n{}",
                    edged.log(),
                    identityd.map(Daemon::log).unwrap_or_default()
                )
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
    for socket in bound {
        assert!(
            device.path(&socket).exists(),
            "{name}: edged did not bind {socket} itself"
        );
    }
    assert!(
        engine
            .requests()
            .iter()
            .any(|request| request.starts_with("POST /networks/create")),
        "{name}: edged did not create its module network: {:?}",
        engine.requests()
    );
}

/// A Docker engine of the test's own, enough for edged to start: no containers, and a module
/// network that does not exist until edged creates it. Records the requests it was sent.
struct FakeEngine {
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

/// One `#[test]` per set: `test_name: "folder/set" { Expect fields };` (fields optional).
macro_rules! sets {
    ($($test:ident: $set:literal $({ $($field:ident: $value:expr),* $(,)? })?;)*) => {
        $(
            #[test]
            #[allow(clippy::needless_update)] // A set may name every field.
            fn $test() {
                check_set($set, Expect { $($($field: $value,)*)? ..Expect::default() });
            }
        )*
    };
}

// The reference's aziotctl `config apply` sets (identity service only), as our own fixtures.
sets! {
    aziotctl_dps_symmetric_key: "aziotctl/dps-symmetric-key" { device_key: Some(b"pump station four: the dps key!") };
    aziotctl_dps_symmetric_key_no_pad: "aziotctl/dps-symmetric-key-no-pad" { device_key: Some(b"pump station five, no padding") };
    aziotctl_dps_tpm: "aziotctl/dps-tpm" { tpm_absent: true };
    aziotctl_dps_x509_est_bootstrap_auto_renew: "aziotctl/dps-x509-est-bootstrap-auto-renew";
    aziotctl_dps_x509_pkcs11_est_bootstrap: "aziotctl/dps-x509-pkcs11-est-bootstrap";
    aziotctl_dps_x509_pkcs11_est_custom_bootstrap: "aziotctl/dps-x509-pkcs11-est-custom-bootstrap";
    aziotctl_dps_x509_pkcs11_est_subject_dn_bootstrap: "aziotctl/dps-x509-pkcs11-est-subject-dn-bootstrap";
    aziotctl_dps_x509_pkcs11_est: "aziotctl/dps-x509-pkcs11-est";
    aziotctl_dps_x509_pkcs11_localca: "aziotctl/dps-x509-pkcs11-localca";
    aziotctl_dps_x509_pkcs11: "aziotctl/dps-x509-pkcs11";
    aziotctl_dps_x509: "aziotctl/dps-x509";
    aziotctl_local_gateway: "aziotctl/local-gateway" { device_key: Some(b"sensor hub three's key") };
    aziotctl_manual_connection_string: "aziotctl/manual-connection-string" { device_key: Some(b"lab bench one shared key") };
    aziotctl_manual_symmetric_key_no_pad: "aziotctl/manual-symmetric-key-no-pad" { device_key: Some(b"lab bench two key") };
    aziotctl_manual_symmetric_key: "aziotctl/manual-symmetric-key" { device_key: Some(b"abcdefghijklmnopqrstuvwxyz123456") };
    aziotctl_manual_x509_est_custom_http: "aziotctl/manual-x509-est-custom-http";
    aziotctl_manual_x509_est_custom: "aziotctl/manual-x509-est-custom";
    aziotctl_manual_x509_est_subject_dn: "aziotctl/manual-x509-est-subject-dn";
    aziotctl_manual_x509_pkcs11: "aziotctl/manual-x509-pkcs11";
    aziotctl_manual_x509: "aziotctl/manual-x509";
    aziotctl_throttle_limits: "aziotctl/throttle-limits" { device_key: Some(b"lab bench six key!") };
}

// The reference's edgelet `iotedge config apply` sets (IoT Edge devices), as our own fixtures.
sets! {
    edgelet_ca_certs_est: "edgelet/ca-certs-est" { device_key: Some(b"edge-est-1 edge device key") };
    edgelet_ca_certs_local_ca: "edgelet/ca-certs-local-ca" { device_key: Some(b"edge-local-1 edge device key") };
    edgelet_ca_certs: "edgelet/ca-certs" { device_key: Some(b"edge-device-key") };
    edgelet_ca_quickstart_custom: "edgelet/ca-quickstart-custom" { device_key: Some(b"edge-self-1 edge device key") };
    edgelet_ca_quickstart: "edgelet/ca-quickstart" { device_key: Some(b"edge-quick-1 edge device key") };
    edgelet_complex_agent_spec: "edgelet/complex-agent-spec" { device_key: Some(b"edge-agent-1 edge device key") };
    edgelet_dps_no_reprovisioning_flags: "edgelet/dps-no-reprovisioning-flags" { device_key: Some(b"edge dps one: symmetric key") };
    edgelet_dps_symmetric_key_no_pad: "edgelet/dps-symmetric-key-no-pad" { device_key: Some(b"edge dps two, unpadded") };
    edgelet_dps_symmetric_key: "edgelet/dps-symmetric-key" { device_key: Some(b"edge dps three symmetric key") };
    edgelet_dps_tpm: "edgelet/dps-tpm" { tpm_absent: true };
    edgelet_dps_x509: "edgelet/dps-x509";
    edgelet_imported_master_encryption_key: "edgelet/imported-master-encryption-key" { device_key: Some(b"edge-mek-1 edge device key") };
    edgelet_manual_connection_string_2: "edgelet/manual-connection-string-2" { device_key: Some(b"edge-manual-2 edge device key") };
    edgelet_manual_connection_string_no_pad: "edgelet/manual-connection-string-no-pad" { device_key: Some(b"edge manual three") };
    edgelet_manual_connection_string: "edgelet/manual-connection-string" { device_key: Some(b"edge manual one key") };
    edgelet_manual_x509: "edgelet/manual-x509";
    edgelet_moby_runtime_network_2: "edgelet/moby-runtime-network-2" { device_key: Some(b"edge-net-2 edge device key") };
    edgelet_moby_runtime_network: "edgelet/moby-runtime-network" { device_key: Some(b"edge-net-1 edge device key") };
    edgelet_nested_edge: "edgelet/nested-edge" { device_key: Some(b"edge-child-1 edge device key") };
    edgelet_not_socket_activated_both_custom: "edgelet/not-socket-activated-both-custom" { device_key: Some(b"edge-sock-1 edge device key") };
    edgelet_not_socket_activated_varlib: "edgelet/not-socket-activated-varlib" { device_key: Some(b"edge-sock-2 edge device key") };
    edgelet_not_socket_activated_varrun: "edgelet/not-socket-activated-varrun" { device_key: Some(b"edge-sock-3 edge device key") };
    edgelet_socket_activated_one_custom: "edgelet/socket-activated-one-custom" { device_key: Some(b"edge-sock-4 edge device key") };
}

// Our own sets, for what the reference's do not cover.
sets! {
    dps_symmetric_key_with_payload_and_limits: "dps-symmetric-key" { device_key: Some(b"device-key") };
    dps_x509_est_renewed_with_the_same_key: "dps-x509-est-renew-same-key";
    edge_quickstart_with_a_key_file: "edge-quickstart";
    manual_x509_from_est_with_the_global_bootstrap_identity: "est";
    every_cert_issued_on_the_device: "issued-by-local-ca";
    dps_x509_issued_by_a_preloaded_local_ca: "local-ca";
    manual_connection_string_unpadded: "manual-connection-string" { device_key: Some(b"secret-key-bytes-for-tests-0000") };
    manual_x509_behind_a_gateway: "manual-x509";
}

#[test]
fn imported_master_encryption_key_is_copied() {
    let root = golden("edgelet/imported-master-encryption-key");
    assert_eq!(
        secret(root.path(), "imported-master-encryption-key"),
        MASTER_ENCRYPTION_KEY
    );
}

#[test]
fn edge_ca_renewal_grants_follow_the_method_and_rotate_key() {
    // Local CA, renewed without a new key: certd signs with the local CA key; nobody needs the
    // temporary key, edged needs the temporary cert.
    let root = golden("edgelet/ca-certs-local-ca");
    assert_eq!(
        keyd_grants(root.path(), CERTD_UID),
        ["local-ca", "aziot-edged-ca"]
    );
    assert_eq!(
        keyd_grants(root.path(), EDGED_UID),
        ["aziot-edged-ca", "iotedge_master_encryption_id"]
    );
    assert!(certd_grants(root.path(), EDGED_UID).contains(&"aziot-edged-ca-temp".to_owned()));
    // Self-signed, renewed with a new key: certd self-signs with the temporary key edged makes.
    let root = golden("edgelet/ca-quickstart-custom");
    assert_eq!(
        keyd_grants(root.path(), CERTD_UID),
        ["aziot-edged-ca", "aziot-edged-ca-temp"]
    );
    assert!(keyd_grants(root.path(), EDGED_UID).contains(&"aziot-edged-ca-temp".to_owned()));
    // Preloaded: never renewed; certd only stores it (module certs are signed with the handle
    // edged passes).
    let root = golden("edgelet/ca-certs");
    assert!(keyd_grants(root.path(), CERTD_UID).is_empty());
    assert_eq!(
        certd_grants(root.path(), EDGED_UID),
        ["aziot-edged-ca", "aziot-edged/module/*"]
    );
    // Issued without an [edge_ca.auto_renew]: renewed by default, as the reference does.
    let root = golden("issued-by-local-ca");
    let edged: toml::Table = std::fs::read_to_string(generated(root.path(), "edged"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        edged["edge_ca"]["auto_renew"]["rotate_key"].as_bool(),
        Some(true)
    );
    assert!(keyd_grants(root.path(), EDGED_UID).contains(&"aziot-edged-ca-temp".to_owned()));
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

/// The certs a daemon's `[[principal]]` with `uid` may use, from a generated certd drop-in.
fn certd_grants(root: &Path, uid: i64) -> Vec<String> {
    let certd: toml::Table = std::fs::read_to_string(generated(root, "certd"))
        .unwrap()
        .parse()
        .unwrap();
    certd
        .get("principal")
        .and_then(toml::Value::as_array)
        .into_iter()
        .flatten()
        .filter(|principal| principal["uid"].as_integer() == Some(uid))
        .flat_map(|principal| principal["certs"].as_array().unwrap().clone())
        .map(|cert| cert.as_str().unwrap().to_owned())
        .collect()
}

const CERTD_UID: i64 = 5556;
const IDENTITYD_UID: i64 = 5557;
const EDGED_UID: i64 = 5558;

#[test]
fn est_subject_dn_stays_a_dn_and_certd_may_rotate_est_identities() {
    let root = golden("aziotctl/dps-x509-pkcs11-est-subject-dn-bootstrap");
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
    let root = golden("aziotctl/manual-x509-est-subject-dn");
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
        ("[provisioning]\nsource = \"none\"\n[tpm]\nauth_key_index = 0x800000\n", "tpm.auth_key_index", "0x7FFFFF"),
        ("[provisioning]\nsource = \"none\"\n[tpm]\ntcti = \"swtpm:port=twenty\"\n", "tpm.tcti", "not a port number"),
        ("[provisioning]\nsource = \"none\"\n[tpm.hierarchy_authorization]\nowner = \"0123456789abcdef0123456789abcdef!\"\n", "tpm.hierarchy_authorization.owner", "at most 32 bytes"),
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
    let config = fixtures().join("aziotctl/manual-symmetric-key.toml");
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
