//! The systemd units in contrib/systemd: parsed and checked against the socket table of the
//! spec, verified with `systemd-analyze verify`, the sysusers file run through
//! `systemd-sysusers --root`, and every daemon that is built started the way its units start it
//! (ExecStart, Environment, the socket unit's ListenStream and fd name) under systemd's own
//! `systemd-socket-activate`, answering on the inherited socket and telling `NOTIFY_SOCKET`
//! it is ready (Type=notify).

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{daemon_binary, describe};

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd")
}

/// A parsed unit file: section → key → values (in order; keys may repeat).
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(name: &str) -> Unit {
    let text = std::fs::read_to_string(units_dir().join(name))
        .unwrap_or_else(|error| panic!("{name}: {error}"));
    let mut unit = Unit::new();
    let mut section = None;
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
        {
            section = Some(name.to_owned());
            unit.entry(name.to_owned()).or_default();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{name}:{}: not key=value: {line}", number + 1));
        let section = section
            .clone()
            .unwrap_or_else(|| panic!("{name}:{}: key outside a section", number + 1));
        unit.get_mut(&section)
            .unwrap()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    unit
}

fn value<'a>(unit: &'a Unit, section: &str, key: &str) -> Option<&'a str> {
    unit.get(section)?.get(key)?.last().map(String::as_str)
}

/// (socket unit, path, mode, user, group, fd name or None for single-fd daemons, service)
const SOCKETS: [(&str, &str, &str, &str, &str, &str); 6] = [
    (
        "aziot-keyd.socket",
        "/run/aziot/keyd.sock",
        "0660",
        "aziotks",
        "aziotks",
        "aziot-keyd.service",
    ),
    // keyd serves the TPM service on the reference's aziot-tpmd socket (same owner and mode).
    (
        "aziot-tpmd.socket",
        "/run/aziot/tpmd.sock",
        "0660",
        "aziottpm",
        "aziottpm",
        "aziot-keyd.service",
    ),
    (
        "aziot-certd.socket",
        "/run/aziot/certd.sock",
        "0660",
        "aziotcs",
        "aziotcs",
        "aziot-certd.service",
    ),
    (
        "aziot-identityd.socket",
        "/run/aziot/identityd.sock",
        "0660",
        "aziotid",
        "aziotid",
        "aziot-identityd.service",
    ),
    (
        "aziot-edged.mgmt.socket",
        "/var/run/iotedge/mgmt.sock",
        "0660",
        "edgeagentuser",
        "iotedge",
        "aziot-edged.service",
    ),
    (
        "aziot-edged.workload.socket",
        "/var/run/iotedge/workload.sock",
        "0666",
        "iotedge",
        "iotedge",
        "aziot-edged.service",
    ),
];

/// (service, binary, user)
const SERVICES: [(&str, &str, &str); 4] = [
    ("aziot-keyd.service", "keyd", "aziotks"),
    ("aziot-certd.service", "certd", "aziotcs"),
    ("aziot-identityd.service", "identityd", "aziotid"),
    ("aziot-edged.service", "edged", "iotedge"),
];

#[test]
fn units_match_the_socket_table_and_harden_the_services() {
    for (name, path, mode, user, group, service) in SOCKETS {
        let unit = parse_unit(name);
        assert_eq!(value(&unit, "Socket", "ListenStream"), Some(path), "{name}");
        assert_eq!(value(&unit, "Socket", "SocketMode"), Some(mode), "{name}");
        assert_eq!(value(&unit, "Socket", "SocketUser"), Some(user), "{name}");
        assert_eq!(value(&unit, "Socket", "SocketGroup"), Some(group), "{name}");
        assert_eq!(value(&unit, "Socket", "Service"), Some(service), "{name}");
        if name.starts_with("aziot-edged.") {
            assert_eq!(
                value(&unit, "Socket", "FileDescriptorName"),
                Some(name),
                "edged finds {name} by name"
            );
        }
        assert_eq!(
            value(&unit, "Install", "WantedBy"),
            Some("sockets.target"),
            "{name}"
        );
    }
    for (name, binary, user) in SERVICES {
        let unit = parse_unit(name);
        for (key, expected) in [
            ("Type", "notify"),
            ("Restart", "on-failure"),
            ("RestartPreventExitStatus", "153"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("User", user),
            ("Group", user),
            ("StateDirectory", &format!("aziot/{binary}")),
        ] {
            assert_eq!(
                value(&unit, "Service", key),
                Some(expected),
                "{name}: {key}"
            );
        }
        assert_eq!(
            value(&unit, "Service", "ExecStart"),
            Some(format!("/usr/libexec/aziot/{binary}").as_str()),
            "{name}"
        );
        let started_at_boot = value(&unit, "Install", "WantedBy") == Some("multi-user.target");
        assert_eq!(
            started_at_boot,
            matches!(binary, "identityd" | "edged"),
            "{name}: identityd and edged start at boot, keyd and certd on demand"
        );
    }
    let edged = parse_unit("aziot-edged.service");
    assert_eq!(
        value(&edged, "Service", "Sockets"),
        Some("aziot-edged.mgmt.socket aziot-edged.workload.socket")
    );
    // keyd gets both of its sockets (it tells them apart by fd name) and may open the TPM
    // (/dev/tpmrm0 is group tss): no device restriction, /dev writable.
    let keyd = parse_unit("aziot-keyd.service");
    assert_eq!(
        value(&keyd, "Service", "Sockets"),
        Some("aziot-keyd.socket aziot-tpmd.socket")
    );
    assert_eq!(value(&keyd, "Service", "SupplementaryGroups"), Some("tss"));
    for key in ["PrivateDevices", "DevicePolicy", "DeviceAllow"] {
        assert_eq!(value(&keyd, "Service", key), None, "keyd: {key}");
    }
    assert_eq!(
        value(&keyd, "Unit", "Wants"),
        Some("aziot-tpmd.socket"),
        "keyd's TPM socket comes with it"
    );
}

/// Copies the units with ExecStart pointing at the built binaries (or /bin/true), since verify
/// checks that the program exists.
fn units_for_verify(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(units_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if !(name.ends_with(".service") || name.ends_with(".socket")) {
            continue;
        }
        let mut text = std::fs::read_to_string(&path).unwrap();
        for (_, binary, _) in SERVICES {
            let replacement = daemon_binary(binary);
            text = text.replace(
                &format!("/usr/libexec/aziot/{binary}"),
                &replacement.display().to_string(),
            );
        }
        let copy = dir.join(&name);
        std::fs::write(&copy, text).unwrap();
        files.push(copy);
    }
    files.sort();
    files
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let files = units_for_verify(dir.path());
    assert_eq!(files.len(), 10, "{files:?}");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .args(&files)
        .output()
        .expect("systemd-analyze is installed (package systemd, tools/install-deps.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "systemd-analyze verify failed:\n{text}"
    );
    // verify reports unknown keys and bad values as warnings with exit status 0.
    let problems: Vec<&str> = text
        .lines()
        .filter(|line| {
            files
                .iter()
                .any(|file| line.contains(file.to_str().unwrap()))
                || line.contains("ignoring")
        })
        .collect();
    assert!(
        problems.is_empty(),
        "systemd-analyze verify complained:\n{text}"
    );
}

#[test]
fn sysusers_file_creates_the_service_users() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();
    let output = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(units_dir().join("aziot-sysusers.conf"))
        .output()
        .expect("systemd-sysusers is installed (package systemd, tools/install-deps.sh)");
    assert!(output.status.success(), "{}", describe(&output));
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    for user in [
        "aziotks",
        "aziotcs",
        "aziotid",
        "aziottpm",
        "iotedge",
        "edgeagentuser:x:13622",
        "edgehubuser:x:13623",
    ] {
        assert!(passwd.contains(user), "{user} missing:\n{passwd}");
    }
    let members = |name: &str| {
        group
            .lines()
            .find(|line| line.starts_with(&format!("{name}:")))
            .and_then(|line| line.rsplit(':').next())
            .unwrap_or_default()
            .split(',')
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(
        members("aziotks").contains(&"aziotcs".to_owned()),
        "{group}"
    );
    assert!(
        members("aziotks").contains(&"aziotid".to_owned()),
        "{group}"
    );
    assert!(
        members("aziotcs").contains(&"aziotid".to_owned()),
        "{group}"
    );
    // identityd reaches the TPM service's socket (aziottpm's, as the reference's), and the
    // group keyd's unit opens the TPM with exists.
    assert!(
        members("aziottpm").contains(&"aziotid".to_owned()),
        "{group}"
    );
    assert!(
        group.lines().any(|line| line.starts_with("tss:")),
        "{group}"
    );
    assert!(
        members("iotedge").contains(&"edgeagentuser".to_owned()),
        "{group}"
    );
    for group_name in ["docker", "aziotks", "aziotcs", "aziotid"] {
        assert!(
            members(group_name).contains(&"iotedge".to_owned()),
            "iotedge not in {group_name}:\n{group}"
        );
    }

    // The tmpfiles.d file creates the private folders for those users.
    let output = Command::new("systemd-tmpfiles")
        .arg("--create")
        .arg(format!("--root={}", root.path().display()))
        .arg(units_dir().join("aziot-tmpfiles.conf"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    use std::os::unix::fs::MetadataExt as _;
    let uid_of = |user: &str| -> u32 {
        passwd
            .lines()
            .find(|line| line.starts_with(&format!("{user}:")))
            .and_then(|line| line.split(':').nth(2))
            .unwrap()
            .parse()
            .unwrap()
    };
    for (folder, user) in [
        ("etc/aziot/keyd/config.d", "aziotks"),
        ("etc/aziot/certd/config.d", "aziotcs"),
        ("etc/aziot/identityd/config.d", "aziotid"),
        ("etc/aziot/edged/config.d", "iotedge"),
        // keyd reads the TPM service's configuration.
        ("etc/aziot/tpmd/config.d", "aziotks"),
        ("var/secrets/aziot/keyd", "aziotks"),
    ] {
        let metadata = std::fs::metadata(root.path().join(folder)).unwrap();
        assert_eq!(metadata.mode() & 0o777, 0o700, "{folder}");
        assert_eq!(metadata.uid(), uid_of(user), "{folder}");
    }
}

/// A daemon run by `systemd-socket-activate` as its units describe it; killed on drop.
struct Activated {
    activator: Child,
    notify: UnixDatagram,
    log: PathBuf,
    /// The sockets systemd-socket-activate listens on, by socket unit.
    sockets: BTreeMap<&'static str, PathBuf>,
}

impl Activated {
    /// Runs `service` with the socket units `socket_units`, bound in `dir` instead of their real
    /// paths, with `environment` added (config locations). `None` when the binary is not built.
    fn start(
        dir: &Path,
        service: &str,
        socket_units: &[&'static str],
        environment: &[(&str, String)],
    ) -> Activated {
        let unit = parse_unit(service);
        let exec_start = value(&unit, "Service", "ExecStart").unwrap();
        let mut words = exec_start.split_whitespace();
        let program = words.next().unwrap();
        let binary = daemon_binary(program.rsplit('/').next().unwrap());
        let mut command = Command::new("systemd-socket-activate");
        let mut sockets = BTreeMap::new();
        let mut names = Vec::new();
        for socket_unit in socket_units {
            let socket = parse_unit(socket_unit);
            let listen = value(&socket, "Socket", "ListenStream").unwrap();
            let path = dir.join(Path::new(listen).file_name().unwrap());
            command.arg("-l").arg(&path);
            names.push(
                value(&socket, "Socket", "FileDescriptorName")
                    .unwrap_or(socket_unit)
                    .to_owned(),
            );
            sockets.insert(*socket_unit, path);
        }
        command.arg(format!("--fdname={}", names.join(":")));
        for setting in unit["Service"].get("Environment").into_iter().flatten() {
            command.arg(format!("--setenv={setting}"));
        }
        let notify_path = dir.join(format!("{service}.notify"));
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        command.arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()));
        for (name, value) in environment {
            command.arg(format!("--setenv={name}={value}"));
        }
        command.arg(&binary).args(words);
        let log = dir.join(format!("{service}.log"));
        let activator = command
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("systemd-socket-activate (from the systemd package) is needed");
        let activated = Activated {
            activator,
            notify,
            log,
            sockets,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !activated.sockets.values().all(|path| path.exists()) {
            assert!(
                Instant::now() < deadline,
                "systemd-socket-activate did not listen: {}",
                activated.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        activated
    }

    fn socket(&self, unit: &str) -> &Path {
        &self.sockets[unit]
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `READY=1` on the notify socket.
    fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut buffer = [0u8; 256];
        while Instant::now() < deadline {
            if let Ok(length) = self.notify.recv(&mut buffer) {
                if buffer[..length]
                    .split(|byte| *byte == b'\n')
                    .any(|line| line == b"READY=1")
                {
                    return;
                }
            }
        }
        panic!("no READY=1 on NOTIFY_SOCKET (Type=notify): {}", self.log());
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.activator.kill();
        let _ = self.activator.wait();
    }
}

/// An exclusive `flock` on `<temp>/edged-docker-tests.lock`, the lock edged's own Docker tests
/// take: a fresh edged stops and removes every edge-owned container, so only one test at a time
/// may drive the machine's Docker Engine through edged, across processes.
fn docker_lock() -> std::fs::File {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::env::temp_dir().join("edged-docker-tests.lock"))
        .unwrap();
    // SAFETY: flock on a valid, open file descriptor; the lock is released when `file` closes.
    let status = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(status, 0, "flock: {}", std::io::Error::last_os_error());
    file
}

fn environment(pairs: &[(String, String)]) -> Vec<(&str, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.as_str(), value.clone()))
        .collect()
}

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.display().to_string()
}

/// keyd, certd and identityd on their units' sockets, each reached through the inherited fd.
#[test]
fn daemons_serve_on_the_sockets_their_units_pass() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let runtime = common::runtime();
    let none = dir.join("no-config.d").display().to_string();

    // keyd: a configured path that must stay unbound, since the unit passes a socket.
    let keyd_config = write(
        &dir.join("keyd.toml"),
        &format!(
            "[aziot_keys]\nhomedir_path = \"{}\"\n[preloaded_keys]\ndevice-id = \"file://{}\"\n[endpoints]\naziot_keyd = \"unix://{}\"\n",
            dir.join("keyd-home").display(),
            write(&dir.join("device-id.key"), "device key bytes"),
            dir.join("keyd-configured.sock").display()
        ),
    );
    // The TPM service: a TCTI that reaches no TPM (a simulator port nobody listens on), so the
    // machine's own TPM, if it has one, is never touched; configured path unbound as above.
    let tpmd_config = write(
        &dir.join("tpmd.toml"),
        &format!(
            "tcti = \"swtpm:host=127.0.0.1,port=1\"\n[endpoints]\naziot_tpmd = \"unix://{}\"\n",
            dir.join("tpmd-configured.sock").display()
        ),
    );
    let keyd = Activated::start(
        dir,
        "aziot-keyd.service",
        &["aziot-keyd.socket", "aziot-tpmd.socket"],
        &[
            ("AZIOT_KEYD_CONFIG", keyd_config),
            ("AZIOT_KEYD_CONFIG_DIR", none.clone()),
            ("AZIOT_TPMD_CONFIG", tpmd_config),
            ("AZIOT_TPMD_CONFIG_DIR", none.clone()),
        ],
    );
    let keys = key_api::Client::new(http_common::UdsClient::new(
        keyd.socket("aziot-keyd.socket"),
    ));
    runtime
        .block_on(keys.create_key_if_not_exists("activated", "sign"))
        .unwrap_or_else(|error| {
            panic!(
                "keyd does not answer on the passed socket: {error}\n{}",
                keyd.log()
            )
        });
    keyd.wait_ready(Duration::from_secs(10));
    assert!(
        !dir.join("keyd-configured.sock").exists(),
        "keyd bound its configured path"
    );
    // keyd serves the tpmd API on the other passed socket: the TPM cannot be opened, a 503
    // saying so.
    let answer = runtime
        .block_on(
            http_common::UdsClient::new(keyd.socket("aziot-tpmd.socket")).send(
                http::Method::GET,
                "/get_tpm_keys?api-version=2020-09-01",
                &[],
                bytes::Bytes::new(),
            ),
        )
        .unwrap_or_else(|error| {
            panic!(
                "keyd does not answer on the passed tpmd socket: {error}\n{}",
                keyd.log()
            )
        });
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    assert_eq!(
        answer.status,
        http::StatusCode::SERVICE_UNAVAILABLE,
        "{body}\n{}",
        keyd.log()
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|message| message.starts_with("the TPM could not be opened")),
        "{body}"
    );
    assert!(
        !dir.join("tpmd-configured.sock").exists(),
        "keyd bound the configured tpmd path"
    );
    let keyd_uri = format!("unix://{}", keyd.socket("aziot-keyd.socket").display());

    // certd.
    let certd_config = write(
        &dir.join("certd.toml"),
        &format!(
            "homedir_path = \"{}\"\n[cert_issuance.activated-ca]\nmethod = \"self_signed\"\ncommon_name = \"activated\"\n\
             [endpoints]\naziot_certd = \"unix://{}\"\naziot_keyd = \"{keyd_uri}\"\n",
            dir.join("certd-home").display(),
            dir.join("certd-configured.sock").display()
        ),
    );
    let certd = Activated::start(
        dir,
        "aziot-certd.service",
        &["aziot-certd.socket"],
        &[
            ("AZIOT_CERTD_CONFIG", certd_config),
            ("AZIOT_CERTD_CONFIG_DIR", none.clone()),
        ],
    );
    let certs = cert_api::Client::new(http_common::UdsClient::new(
        certd.socket("aziot-certd.socket"),
    ));
    let (pem, _) = runtime
        .block_on(certs.draft_create_cert("activated-ca"))
        .unwrap_or_else(|error| {
            panic!(
                "certd does not answer on the passed socket: {error}\n{}",
                certd.log()
            )
        });
    assert!(pem.contains("BEGIN CERTIFICATE"), "{pem}");
    certd.wait_ready(Duration::from_secs(10));
    assert!(
        !dir.join("certd-configured.sock").exists(),
        "certd bound its configured path"
    );
    let certd_uri = format!("unix://{}", certd.socket("aziot-certd.socket").display());

    // identityd, provisioned manually (no cloud call needed to answer).
    let identityd_config = write(
        &dir.join("identityd.toml"),
        &format!(
            "hostname = \"activated\"\nhomedir = \"{}\"\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"hub.invalid\"\n\
             device_id = \"activated\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n\
             [endpoints]\naziot_identityd = \"unix://{}\"\naziot_keyd = \"{keyd_uri}\"\naziot_certd = \"{certd_uri}\"\n",
            dir.join("identityd-home").display(),
            dir.join("identityd-configured.sock").display()
        ),
    );
    let identityd = Activated::start(
        dir,
        "aziot-identityd.service",
        &["aziot-identityd.socket"],
        &[
            ("AZIOT_IDENTITYD_CONFIG", identityd_config),
            ("AZIOT_IDENTITYD_CONFIG_DIR", none),
        ],
    );
    let client = http_common::UdsClient::new(identityd.socket("aziot-identityd.socket"));
    let info: serde_json::Value = runtime
        .block_on(client.json(
            http::Method::GET,
            "/identities/provisioning?api-version=2021-12-01",
            None::<&()>,
            http::StatusCode::OK,
        ))
        .unwrap_or_else(|error| {
            panic!(
                "identityd does not answer on the passed socket: {error}\n{}",
                identityd.log()
            )
        });
    assert_eq!(info["source"], "manual", "{info}");
    identityd.wait_ready(Duration::from_secs(10));
    assert!(
        !dir.join("identityd-configured.sock").exists(),
        "identityd bound its configured path"
    );
}

/// The whole stack from one super-config: `config apply` writes the drop-ins, keyd, certd,
/// identityd and edged run under systemd-socket-activate as their units describe, edged takes
/// its two sockets by fd name, and `iotedge list` / `iotedge check` talk to them.
#[test]
fn config_apply_output_runs_the_stack_and_edged_takes_its_sockets_by_name() {
    // A fresh edged stops and removes every edge-owned container on the engine at startup;
    // hold the machine-wide Docker test lock so that no other test's modules are running.
    let _docker = docker_lock();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let root = dir.join("root");
    let super_config = write(
        &dir.join("config.toml"),
        "hostname = \"activated-edge\"\n\
         [provisioning]\nsource = \"manual\"\niothub_hostname = \"hub.invalid\"\ndevice_id = \"activated-edge\"\n\
         [provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = { value = \"ZGV2aWNlIGtleQ==\" }\n\
         [agent]\nname = \"edgeAgent\"\ntype = \"docker\"\nimagePullPolicy = \"never\"\n\
         [agent.config]\nimage = \"iotedge-cli-test/agent-that-does-not-exist:1\"\n\
         [moby_runtime]\nnetwork = \"iotedge-cli-test\"\n",
    );
    let mut arguments = vec!["config", "apply", "-c", &super_config, "--root"];
    let root_text = root.display().to_string();
    arguments.push(&root_text);
    arguments.extend(common::UID_ARGS);
    let output = common::iotedge(&arguments);
    assert!(output.status.success(), "{}", describe(&output));

    let socket = |name: &str| dir.join(name).display().to_string();
    let (keyd_uri, certd_uri, identityd_uri) = (
        format!("unix://{}", socket("keyd.sock")),
        format!("unix://{}", socket("certd.sock")),
        format!("unix://{}", socket("identityd.sock")),
    );
    let overrides = |daemon: &str, text: String| {
        let dropins = root.join("etc/aziot").join(daemon).join("config.d");
        std::fs::write(dropins.join("99-test.toml"), text).unwrap();
        vec![
            (
                format!("AZIOT_{}_CONFIG", daemon.to_uppercase()),
                root.join("etc/aziot")
                    .join(daemon)
                    .join("config.toml")
                    .display()
                    .to_string(),
            ),
            (
                format!("AZIOT_{}_CONFIG_DIR", daemon.to_uppercase()),
                dropins.display().to_string(),
            ),
        ]
    };
    let mut keyd_env = overrides(
        "keyd",
        format!(
            "[aziot_keys]\nhomedir_path = \"{}\"\n[preloaded_keys]\ndevice-id = \"file://{}\"\n[endpoints]\naziot_keyd = \"{keyd_uri}\"\n",
            dir.join("keyd-home").display(),
            root.join("var/secrets/aziot/keyd/device-id").display()
        ),
    );
    // keyd also reads the TPM service's generated file (empty for this device).
    keyd_env.extend(overrides(
        "tpmd",
        format!(
            "[endpoints]\naziot_tpmd = \"unix://{}\"\n",
            socket("tpmd.sock")
        ),
    ));
    let certd_env = overrides(
        "certd",
        format!(
            "homedir_path = \"{}\"\n[endpoints]\naziot_certd = \"{certd_uri}\"\naziot_keyd = \"{keyd_uri}\"\n",
            dir.join("certd-home").display()
        ),
    );
    let identityd_env = overrides(
        "identityd",
        format!(
            "homedir = \"{}\"\n[endpoints]\naziot_identityd = \"{identityd_uri}\"\naziot_keyd = \"{keyd_uri}\"\naziot_certd = \"{certd_uri}\"\n",
            dir.join("identityd-home").display()
        ),
    );
    let edged_env = overrides(
        "edged",
        format!(
            "homedir = \"{}\"\n[connect]\nmanagement_uri = \"unix://{}\"\nworkload_uri = \"unix://{}\"\n\
             [endpoints]\naziot_keyd_url = \"{keyd_uri}\"\naziot_certd_url = \"{certd_uri}\"\naziot_identityd_url = \"{identityd_uri}\"\n",
            dir.join("edged-home").display(),
            socket("mgmt.sock"),
            socket("workload.sock")
        ),
    );
    let keyd = Activated::start(
        dir,
        "aziot-keyd.service",
        &["aziot-keyd.socket"],
        &environment(&keyd_env),
    );
    let certd = Activated::start(
        dir,
        "aziot-certd.service",
        &["aziot-certd.socket"],
        &environment(&certd_env),
    );
    let identityd = Activated::start(
        dir,
        "aziot-identityd.service",
        &["aziot-identityd.socket"],
        &environment(&identityd_env),
    );
    let edged = Activated::start(
        dir,
        "aziot-edged.service",
        &["aziot-edged.mgmt.socket", "aziot-edged.workload.socket"],
        &environment(&edged_env),
    );
    let mgmt_uri = format!(
        "unix://{}",
        edged.socket("aziot-edged.mgmt.socket").display()
    );

    // edged stops existing modules first (up to 30 s grace each).
    let deadline = Instant::now() + Duration::from_secs(120);
    let listed = loop {
        let output = common::iotedge(&["-H", &mgmt_uri, "list"]);
        if output.status.success() || Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        listed.status.success(),
        "iotedge list against edged failed: {}\nedged:\n{}\nidentityd:\n{}\nkeyd:\n{}\ncertd:\n{}",
        describe(&listed),
        edged.log(),
        identityd.log(),
        keyd.log(),
        certd.log()
    );
    assert!(
        String::from_utf8_lossy(&listed.stdout).starts_with("NAME"),
        "{}",
        describe(&listed)
    );
    edged.wait_ready(Duration::from_secs(10));

    // `check` sees the whole stack through the same configs.
    let check = Command::new(common::iotedge_binary())
        .args([
            "check",
            "-c",
            &super_config,
            "--root",
            &root_text,
            "-o",
            "json",
            "-H",
            &mgmt_uri,
        ])
        .args(common::UID_ARGS)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&check.stdout)
        .unwrap_or_else(|error| panic!("{error}: {}", describe(&check)));
    let result = |id: &str| {
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|check| check["id"] == id)
            .map(|check| check["result"].as_str().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no check {id}: {report}"))
    };
    for id in [
        "config-toml-well-formed",
        "config-valid",
        "edged-config-well-formed",
        "keyd-socket-reachable",
        "certd-socket-reachable",
        "identityd-socket-reachable",
        "identityd-provisioned",
        "edged-mgmt-reachable",
        "container-engine-installed",
    ] {
        assert_eq!(result(id), "ok", "{id}: {report}");
    }
    assert_eq!(
        result("config-up-to-date"),
        "ok",
        "99-test.toml leaves 00-super.toml as applied: {report}"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(dir.join("tpmd.sock")).is_ok(),
        "keyd does not serve the TPM service on the generated tpmd file: {}",
        keyd.log()
    );
    drop(edged);
    // edged created the test's Docker network; leave the engine as it was.
    let _ = Command::new("docker")
        .args(["network", "rm", "iotedge-cli-test"])
        .output();
}
