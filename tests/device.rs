//! The device test: the Debian packages (`tools/build-packages.sh`) installed on a Debian
//! container that boots systemd as PID 1, configured with `iotedge config apply` against the
//! cloud emulator, and checked the way an operator would: sockets listening with the owners and
//! modes of the units, socket activation of keyd, certd, identityd and edged, provisioning,
//! `iotedge check` (IoT Edge checks included), `iotedge system status`, edged running the
//! agent, a host module principal allowed and another uid refused, restarts and `apt remove` +
//! `apt install` losing nothing, `apt purge` deleting the device. A second device is laid out as the reference's packages leave one and taken over
//! (issue 14, part 4).
//!
//! The image is a `mmdebstrap --variant=minbase` Debian 12 root file system (nothing comes from
//! an image registry) imported with `docker import`, and kept under a tag named for its recipe so
//! a second local run reuses it. The packages hold the debug binaries `cargo test` built (debug
//! info stripped); the release packages of `tools/build-packages.sh` differ only in the binaries.
//!
//! systemd in the container: `--cap-add SYS_ADMIN` (mounts for the units' sandboxes), seccomp
//! and AppArmor unconfined, tmpfs `/run` and `/run/lock`, a private cgroup namespace, and
//! SIGRTMIN+3 as stop signal. `--privileged` is not needed (and is refused on the CI machine).
//!
//! The new device is an IoT Edge device: the host's Docker socket is bind-mounted into it, and
//! edged runs an agent built here (`FROM scratch`, Debian's static busybox, a command that only
//! sleeps) on the host's engine under names unique to the run, removed afterwards. Its connect
//! URIs are TCP, so edged gives the agent no socket bind mounts (their sources would be paths in
//! the container that Docker resolves, and creates, on the host). edged's part takes the lock
//! edged's own Docker tests take. See docs/install.md "Testing the packages".

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Debian suite and the packages of the image, on top of minbase. Changing either names a new
/// image tag.
const SUITE: &str = "bookworm";
/// The TPM Software Stack libraries are the packages' own dependencies (keyd links them); apt
/// installs the local packages without package lists, so they come with the image.
const IMAGE_PACKAGES: &str = "systemd,systemd-sysv,dbus,ca-certificates,curl,libtss2-esys-3.0.2-0,\
                              libtss2-mu0,libtss2-sys1,libtss2-tctildr0,libtss2-tcti-device0";
const MIRROR: &str = "http://deb.debian.org/debian";

fn repository_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn binaries_dir() -> PathBuf {
    // target/debug/deps/device-<hash> → target/debug
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned()
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("cannot run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// FNV-1a, 64 bits: a stable name for the image recipe (not a security boundary).
fn fnv1a(data: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in data.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The device image, built once per test run (both tests wait for the first build).
fn device_image() -> String {
    static IMAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    IMAGE.get_or_init(build_device_image).clone()
}

/// Builds the image with mmdebstrap and `docker import` unless its tag exists.
fn build_device_image() -> String {
    let recipe = format!("{SUITE} {MIRROR} minbase {IMAGE_PACKAGES} init");
    let tag = format!("edge-runtime-device-test:{:016x}", fnv1a(&recipe));
    let exists = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", &tag])
        .output()
        .unwrap_or_else(|error| panic!("cannot run docker: {error}"));
    if exists.status.success() {
        return tag;
    }
    let work = tempfile::tempdir().unwrap();
    let tarball = work.path().join("rootfs.tar");
    run(Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={IMAGE_PACKAGES}"))
        .arg(SUITE)
        .arg(&tarball)
        .arg(MIRROR));
    run(Command::new("docker")
        .args(["import", "--change", "CMD [\"/sbin/init\"]"])
        .args(["--change", "ENV container=docker"])
        .arg(&tarball)
        .arg(&tag));
    tag
}

/// A running device container; removed on drop.
struct Device {
    name: String,
}

impl Device {
    /// Boots `image`; `extra` goes to `docker run` before the image (bind mounts).
    fn boot(image: &str, hostname: &str, extra: &[&str]) -> Device {
        let name = format!("edge-runtime-{hostname}-{}", std::process::id());
        let _ = Command::new("docker").args(["rm", "-f", &name]).output();
        run(Command::new("docker")
            .args([
                "run",
                "--detach",
                "--name",
                &name,
                "--hostname",
                hostname,
                "--stop-signal",
                "SIGRTMIN+3",
                "--cap-add",
                "SYS_ADMIN",
                "--security-opt",
                "seccomp=unconfined",
                "--security-opt",
                "apparmor=unconfined",
                "--tmpfs",
                "/run",
                "--tmpfs",
                "/run/lock",
                "--cgroupns",
                "private",
            ])
            .args(extra)
            .args([image, "/sbin/init"]));
        let device = Device { name };
        // PID 1 is systemd, and the boot ends "running" (no failed unit).
        // systemctl needs PID 1's private socket, which appears a moment after `docker run`.
        let state = device.sh_status(
            "for i in $(seq 300); do [ -S /run/systemd/private ] && break; sleep 0.1; done; \
             systemctl is-system-running --wait",
        );
        assert_eq!(
            text(&state),
            "running",
            "systemd did not boot cleanly ({}): {}",
            String::from_utf8_lossy(&state.stderr),
            text(
                &device.sh_status(
                    "systemctl --failed --no-pager; journalctl -b --no-pager | tail -40"
                )
            )
        );
        assert_eq!(device.sh("cat /proc/1/comm"), "systemd");
        device
    }

    /// Runs `script` with `sh -c` in the container; returns the output whatever the status.
    fn sh_status(&self, script: &str) -> Output {
        Command::new("docker")
            .args(["exec", &self.name, "sh", "-c", script])
            .output()
            .unwrap()
    }

    /// Runs `script` and asserts that it succeeds; returns its trimmed stdout.
    fn sh(&self, script: &str) -> String {
        let output = self.sh_status(script);
        assert!(
            output.status.success(),
            "`{script}` failed in the device ({}):\nstdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        text(&output)
    }

    fn copy_in(&self, source: &Path, destination: &str) {
        run(Command::new("docker")
            .arg("cp")
            .arg(source)
            .arg(format!("{}:{destination}", self.name)));
    }

    fn unit_state(&self, unit: &str) -> String {
        text(&self.sh_status(&format!("systemctl is-active {unit}")))
    }

    /// The HTTP status of a GET on a Unix socket, as `user` (curl in the device).
    fn http_status(&self, user: &str, socket: &str, path: &str) -> String {
        self.sh(&format!(
            "setpriv --reuid {user} --regid {user} --init-groups \
             curl -s -o /dev/null -w '%{{http_code}}' --unix-socket {socket} 'http://localhost{path}'"
        ))
    }

    fn get_json(&self, user: &str, socket: &str, path: &str) -> serde_json::Value {
        let body = self.sh(&format!(
            "setpriv --reuid {user} --regid {user} --init-groups \
             curl -sf --unix-socket {socket} 'http://localhost{path}'"
        ));
        serde_json::from_str(&body).unwrap_or_else(|error| panic!("{path}: {error}: {body}"))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs =
                self.sh_status("journalctl --no-pager -u 'aziot-*' -u cloud-emulator | tail -60");
            eprintln!("device journal:\n{}", String::from_utf8_lossy(&logs.stdout));
        }
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.name])
            .output();
    }
}

/// Serializes edged on the host's Docker Engine with edged's own tests (edged/tests/common's
/// `docker_lock`, same file): edged stops and removes every container with its owner label at
/// startup, so two edged instances must not share the engine at once. Held until the device is
/// gone (its edged stops the agent on the way down).
fn docker_lock() -> std::fs::File {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _thread = LOCK.lock().unwrap_or_else(|poison| poison.into_inner());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("edged-docker-tests.lock"))
        .unwrap();
    file.lock().unwrap();
    file
}

/// The agent's command: it sleeps, and exits on SIGTERM (as PID 1 it would otherwise ignore the
/// signal, and every stop of edged would wait out Docker's stop grace of 30 s).
const AGENT_COMMAND: &str =
    "trap 'exit 0' TERM; while true; do /bin/busybox sleep 3600 & wait $!; done";

/// What edged creates on the host's Docker Engine for the device, named for this test run: the
/// agent image (`FROM scratch`, Debian's static busybox, a command that only sleeps), the agent
/// container and the module network. Removed on drop.
struct AgentResources {
    image: String,
    container: String,
    network: String,
}

impl AgentResources {
    fn build() -> AgentResources {
        let suffix = std::process::id();
        let resources = AgentResources {
            image: format!("edge-runtime-device-agent:{suffix}"),
            container: format!("edgeAgent-device-{suffix}"),
            network: format!("edge-runtime-device-{suffix}"),
        };
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "/bin/busybox is missing: apt-get install busybox-static (tools/install-deps.sh)"
        );
        let context = tempfile::tempdir().unwrap();
        std::fs::copy(busybox, context.path().join("busybox")).unwrap();
        // A layer of its own, so no other run's image shares this one's ID.
        std::fs::write(context.path().join("run"), resources.image.as_bytes()).unwrap();
        std::fs::write(
            context.path().join("Dockerfile"),
            format!(
                "FROM scratch\nCOPY busybox /bin/busybox\nCOPY run /etc/device-test-run\n\
                 CMD [\"/bin/busybox\", \"sh\", \"-c\", \"{AGENT_COMMAND}\"]\n"
            ),
        )
        .unwrap();
        run(Command::new("docker")
            .args(["build", "-q", "-t", &resources.image])
            .arg(context.path()));
        resources
    }

    /// The super-config tables that run edged with this agent. The connect URIs are TCP, so
    /// edged gives the agent no socket bind mounts: their sources would be paths in the device
    /// that Docker resolves (and creates) on the host.
    fn super_config(&self) -> String {
        format!(
            r#"
[agent]
name = "{container}"
type = "docker"
imagePullPolicy = "never"
[agent.config]
image = "{image}"

[connect]
workload_uri = "http://127.0.0.1:15581"
management_uri = "http://127.0.0.1:15580"

[moby_runtime]
uri = "unix:///var/run/docker.sock"
network = "{network}"
"#,
            container = self.container,
            image = self.image,
            network = self.network
        )
    }
}

impl Drop for AgentResources {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.container])
            .output();
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
        let _ = Command::new("docker")
            .args(["image", "rm", "-f", &self.image])
            .output();
    }
}

/// What a `.socket` unit of contrib/systemd says: path, owner, group, mode.
#[derive(Debug)]
struct SocketUnit {
    unit: String,
    path: String,
    user: String,
    group: String,
    mode: String,
}

fn socket_units() -> Vec<SocketUnit> {
    let mut units = Vec::new();
    let directory = repository_root().join("contrib/systemd");
    let mut names: Vec<String> = std::fs::read_dir(&directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".socket"))
        .collect();
    names.sort();
    for name in names {
        let contents = std::fs::read_to_string(directory.join(&name)).unwrap();
        let value = |key: &str| {
            contents
                .lines()
                .find_map(|line| line.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("{name} has no {key}="))
                .to_owned()
        };
        units.push(SocketUnit {
            unit: name.clone(),
            path: value("ListenStream"),
            user: value("SocketUser"),
            group: value("SocketGroup"),
            mode: value("SocketMode").trim_start_matches('0').to_owned(),
        });
    }
    assert_eq!(
        units.len(),
        6,
        "keyd, keyd's TPM service, certd, identityd and edged's two"
    );
    units
}

/// Every socket listens, with the owner, group and mode its unit names.
fn assert_sockets(device: &Device, units: &[SocketUnit]) {
    for unit in units {
        assert_eq!(device.unit_state(&unit.unit), "active", "{}", unit.unit);
        let stat = device.sh(&format!("stat -c '%F %U %G %a' {}", unit.path));
        assert_eq!(
            stat,
            format!("socket {} {} {}", unit.user, unit.group, unit.mode),
            "{}",
            unit.unit
        );
    }
}

/// Digests of keyd's and certd's state and keyd's secrets (names and contents).
fn key_and_cert_state(device: &Device) -> String {
    let state = device.sh(
        "cd / && find var/lib/aziot/keyd var/lib/aziot/certd var/secrets/aziot/keyd -type f \
         | sort | xargs sha256sum",
    );
    assert!(
        state.contains("var/lib/aziot/keyd/") && state.contains("var/lib/aziot/certd/"),
        "keyd and certd keep no state:\n{state}"
    );
    state
}

const API: &str = "api-version=2020-09-01";
const MANAGEMENT_SOCKET: &str = "/run/iotedge/mgmt.sock";

/// edged's module list (management socket, as root like the CLI).
fn modules(device: &Device) -> serde_json::Value {
    device.get_json("root", MANAGEMENT_SOCKET, "/modules?api-version=2020-07-07")
}

/// The agent's entry in edged's module list once it reports running. edged's watchdog creates
/// and starts the agent after edged is up, so this polls (at most 30 s; not a timing assertion).
fn wait_for_running_agent(device: &Device, name: &str) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..300 {
        last = modules(device);
        let agent = last["modules"].as_array().and_then(|modules| {
            modules
                .iter()
                .find(|module| module["name"] == name)
                .cloned()
        });
        if let Some(agent) = agent {
            if agent["status"]["runtimeStatus"]["status"] == "running" {
                return agent;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("edged does not list {name} running: {last}");
}
const IDENTITYD_SOCKET: &str = "/run/aziot/identityd.sock";

/// The identities a device keeps: the device line of `iotedge check` (run as root, which
/// `config apply` makes no identityd principal of), the host module's identity as the module
/// sees it (without its key handle, which is sealed with a fresh nonce each time), and the
/// hub's record of the device's modules (keys, generation IDs, etags: a module recreated or
/// rekeyed would show here).
fn identities(device: &Device, device_id: &str) -> (String, serde_json::Value, serde_json::Value) {
    let check = device.sh("iotedge check");
    let device_line = check
        .lines()
        .skip_while(|line| !line.contains("identityd-provisioned"))
        .nth(1)
        .unwrap_or_else(|| panic!("no provisioning line:\n{check}"))
        .trim()
        .to_owned();
    let mut module = device.get_json(
        "hostmodule",
        IDENTITYD_SOCKET,
        &format!("/identities/identity?{API}"),
    );
    let handle = module["spec"]["auth"]
        .as_object_mut()
        .unwrap()
        .remove("keyHandle");
    assert!(handle.is_some(), "{module}");
    let hub_modules: serde_json::Value = serde_json::from_str(&device.sh(&format!(
        "curl -sf http://127.0.0.1:8080/devices/{device_id}/modules"
    )))
    .unwrap();
    assert!(
        hub_modules.to_string().contains("hostmodule"),
        "{hub_modules}"
    );
    (device_line, module, hub_modules)
}

/// The packages, from the binaries this test run built, in cargo's temporary folder for
/// integration tests; built once per run.
fn built_packages() -> &'static Path {
    static PACKAGES: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PACKAGES.get_or_init(build_packages)
}

fn build_packages() -> PathBuf {
    let bin = binaries_dir();
    for name in [
        "keyd",
        "certd",
        "identityd",
        "edged",
        "iotedge",
        "cloud-emulator",
    ] {
        assert!(
            bin.join(name).exists(),
            "{name} is not built in {}; run cargo build --workspace",
            bin.display()
        );
    }
    let packages = Path::new(env!("CARGO_TARGET_TMPDIR")).join("device-test-packages");
    let _ = std::fs::remove_dir_all(&packages);
    let built = run(
        Command::new(repository_root().join("tools/build-packages.sh"))
            .arg("--binaries")
            .arg(&bin)
            .arg("--out")
            .arg(&packages),
    );
    let debs: Vec<String> = text(&built).lines().map(str::to_owned).collect();
    assert_eq!(debs.len(), 2, "{debs:?}");
    packages
}

const INSTALL: &str = "cd /tmp/packages && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
                       ./edge-runtime-identity_*.deb ./edge-runtime-edge_*.deb";

/// Starts the cloud emulator as a transient unit in the device, with `enrollments` (TOML) and
/// its TLS CA trusted through the system store, as an operator would trust a private CA.
fn start_emulator(device: &Device, enrollments: &str) {
    device.copy_in(
        &binaries_dir().join("cloud-emulator"),
        "/usr/local/bin/cloud-emulator",
    );
    device.sh(&format!(
        r#"mkdir -p /srv/emulator && cat > /srv/emulator/config.toml <<'EOF'
listen = "127.0.0.1:8443"
admin_listen = "127.0.0.1:8080"
ca_cert_path = "/srv/emulator/ca.pem"
id_scope = "0ne0000DEV1"
assigning_polls = 0
{enrollments}
EOF
systemd-run --unit=cloud-emulator -p StandardOutput=file:/srv/emulator/ready.json \
    /usr/local/bin/cloud-emulator --config /srv/emulator/config.toml >/dev/null 2>&1
for i in $(seq 100); do [ -s /srv/emulator/ready.json ] && break; sleep 0.1; done
test -s /srv/emulator/ready.json
cp /srv/emulator/ca.pem /usr/local/share/ca-certificates/cloud-emulator.crt
update-ca-certificates >/dev/null 2>&1"#
    ));
}

#[test]
fn packages_install_and_run_under_systemd() {
    const DEVICE_ID: &str = "device-test";
    let packages = built_packages();
    let image = device_image();
    let _docker_lock = docker_lock();
    let agent = AgentResources::build();
    let device = Device::boot(
        &image,
        DEVICE_ID,
        &["--volume", "/var/run/docker.sock:/var/run/docker.sock"],
    );
    // Docker's own package would make the `docker` group owning its socket; here the socket is
    // the host's, so the group takes the host's gid (the packages' sysusers adds iotedge to it).
    // A system group of the image that has that gid (tpm-udev's `tss`, say) moves aside first.
    device.sh(
        "gid=$(stat -c %g /var/run/docker.sock); taken=$(getent group \"$gid\" | cut -d: -f1); \
         if [ -n \"$taken\" ]; then \
           free=900; while getent group $free >/dev/null; do free=$((free + 1)); done; \
           groupmod -g $free \"$taken\"; \
         fi; \
         groupadd --system --gid \"$gid\" docker",
    );
    device.copy_in(packages, "/tmp/packages");
    device.sh(INSTALL);
    assert_eq!(
        device.sh("id -nG iotedge | tr ' ' '\\n' | grep -x docker"),
        "docker"
    );

    // 1. Installed: users, folders and sockets as the units say; nothing running yet.
    let units = socket_units();
    assert_sockets(&device, &units);
    for service in [
        "aziot-keyd",
        "aziot-certd",
        "aziot-identityd",
        "aziot-edged",
    ] {
        assert_eq!(device.unit_state(&format!("{service}.service")), "inactive");
    }
    assert_eq!(
        device.sh(
            "stat -c '%U %G %a' /etc/aziot/keyd/config.d /etc/aziot/identityd/config.d \
             /etc/aziot/tpmd/config.d"
        ),
        "aziotks aziotks 700\naziotid aziotid 700\naziotks aziotks 700"
    );
    assert_eq!(
        device.sh("id -nG aziotid | tr ' ' '\\n' | sort | tr '\\n' ' '"),
        "aziotcs aziotid aziotks aziottpm"
    );
    assert_eq!(
        device
            .sh("systemctl is-enabled aziot-keyd.socket aziot-tpmd.socket aziot-identityd.service"),
        "enabled\nenabled\nenabled"
    );

    // 2. A local CA (made here with OpenSSL), preloaded into keyd and certd: certd issues the
    //    device's X.509 identity certificate from it, and the emulator's group enrollment
    //    trusts it.
    let pki = tempfile::tempdir().unwrap();
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "30", "-subj", "/CN=Device Test CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(pki.path().join("local-ca.key.pem"))
        .arg("-out")
        .arg(pki.path().join("local-ca.pem")));
    device.sh("mkdir -p /srv/emulator");
    device.copy_in(
        &pki.path().join("local-ca.pem"),
        "/srv/emulator/group-ca.pem",
    );
    device.copy_in(&pki.path().join("local-ca.pem"), "/etc/aziot/local-ca.pem");
    device.copy_in(
        &pki.path().join("local-ca.key.pem"),
        "/var/secrets/aziot/keyd/local-ca.key.pem",
    );
    device.sh("chmod 0644 /etc/aziot/local-ca.pem && \
         chown aziotks:aziotks /var/secrets/aziot/keyd/local-ca.key.pem && \
         chmod 0600 /var/secrets/aziot/keyd/local-ca.key.pem");

    // 3. The cloud emulator, with that group enrollment.
    start_emulator(
        &device,
        r#"[[group_enrollment]]
group_id = "device-test-group"
attestation = { type = "x509", ca_file = "group-ca.pem" }"#,
    );

    // 4. The super-config, and a host module principal for identityd (a drop-in beside the
    //    generated one, as operators add them). Both users may open identityd's socket
    //    (group aziotid); only hostmodule is a principal.
    device.sh(r#"cat > /etc/aziot/config.toml <<'EOF'
hostname = "device-test"
[provisioning]
source = "dps"
global_endpoint = "https://localhost:8443/"
id_scope = "0ne0000DEV1"
[provisioning.attestation]
method = "x509"
identity_cert = { method = "local_ca", common_name = "device-test", expiry_days = 30 }
[cert_issuance.local_ca]
cert = "file:///etc/aziot/local-ca.pem"
pk = "file:///var/secrets/aziot/keyd/local-ca.key.pem"
EOF
chmod 0600 /etc/aziot/config.toml
useradd --system --groups aziotid hostmodule
useradd --system --groups aziotid stranger
cat > /etc/aziot/identityd/config.d/50-hostmodule.toml <<EOF
[[principal]]
uid = $(id -u hostmodule)
name = "hostmodule"
idtype = ["module"]
EOF
chown aziotid:aziotid /etc/aziot/identityd/config.d/50-hostmodule.toml
chmod 0600 /etc/aziot/identityd/config.d/50-hostmodule.toml"#);
    // edged's part: the agent on the host's Docker Engine.
    device.sh(&format!(
        "cat >> /etc/aziot/config.toml <<'EOF'\n{}\nEOF",
        agent.super_config()
    ));
    let applied = device.sh("iotedge config apply 2>&1");
    assert!(applied.contains("00-super.toml"), "{applied}");
    assert!(applied.contains("edged"), "{applied}");

    // 5. Provisioned; `iotedge check` passes and `system status` reports every unit running.
    let check = device.sh_status("iotedge check");
    assert!(
        check.status.success(),
        "iotedge check failed:\n{}",
        text(&check)
    );
    let check_text = text(&check);
    assert!(
        check_text.contains("[ OK ] identityd-provisioned")
            && check_text.contains("device device-test in localhost:8443")
            && check_text.contains("[ OK ] container-engine-installed")
            && check_text.contains("[ OK ] edged-mgmt-reachable"),
        "{check_text}"
    );
    let status = device.sh("iotedge system status");
    for unit in [
        "aziot-keyd.socket",
        "aziot-tpmd.socket",
        "aziot-certd.socket",
        "aziot-identityd.socket",
        "aziot-edged.mgmt.socket",
        "aziot-edged.workload.socket",
        "aziot-keyd.service",
        "aziot-certd.service",
        "aziot-identityd.service",
        "aziot-edged.service",
    ] {
        assert!(
            status
                .lines()
                .any(|line| line.starts_with(unit) && line.trim_end().ends_with(" active")),
            "{unit} not active:\n{status}"
        );
    }
    let registrations = device.sh("curl -sf http://127.0.0.1:8080/registrations");
    assert!(registrations.contains("\"device-test\""), "{registrations}");
    // edged started the agent on the host's engine, and lists it as a module.
    wait_for_running_agent(&device, &agent.container);
    assert_eq!(
        text(&run(Command::new("docker").args([
            "inspect",
            "--format",
            "{{.State.Running}} {{index .Config.Labels \"net.azure-devices.edge.owner\"}}",
            &agent.container
        ]))),
        "true Microsoft.Azure.Devices.Edge.Agent"
    );

    // 6. The module principal gets its identity; another uid with the same socket access is
    //    refused by identityd.
    let kept_identities = identities(&device, DEVICE_ID);
    assert_eq!(kept_identities.1["spec"]["moduleId"], "hostmodule");
    assert_eq!(
        device.http_status(
            "stranger",
            IDENTITYD_SOCKET,
            &format!("/identities/identity?{API}")
        ),
        "403"
    );

    // 7. Socket activation: with the services stopped (their sockets stop with them, PartOf=)
    //    and only the sockets started again, the first request starts each daemon.
    device.sh(
        "systemctl stop aziot-edged.service aziot-identityd.service aziot-certd.service \
           aziot-keyd.service && \
         systemctl start aziot-keyd.socket aziot-tpmd.socket aziot-certd.socket \
           aziot-identityd.socket aziot-edged.mgmt.socket aziot-edged.workload.socket",
    );
    // keyd: the first request on the TPM service's socket starts it (the tpmd API answers 404
    // for an unknown route; the container has no TPM, which is opened only when asked for),
    // and it then serves its own socket too.
    assert_eq!(device.unit_state("aziot-keyd.service"), "inactive");
    assert_eq!(
        device.http_status(
            "root",
            "/run/aziot/tpmd.sock",
            &format!("/nothing-here?{API}")
        ),
        "404"
    );
    assert_eq!(device.unit_state("aziot-keyd.service"), "active");
    assert_eq!(
        device.http_status(
            "root",
            "/run/aziot/keyd.sock",
            &format!("/nothing-here?{API}")
        ),
        "404"
    );
    for (daemon, socket) in [
        ("certd", "/run/aziot/certd.sock"),
        ("identityd", IDENTITYD_SOCKET),
    ] {
        let service = format!("aziot-{daemon}.service");
        assert_eq!(device.unit_state(&service), "inactive", "{service}");
        // Any HTTP answer proves the daemon serves on the socket systemd handed it.
        let answer = device.http_status("root", socket, &format!("/nothing-here?{API}"));
        assert_eq!(answer, "404", "{daemon}");
        assert_eq!(device.unit_state(&service), "active", "{service}");
    }
    // edged: the first request on its management socket starts it, and it answers with the
    // module list (the CLI's api-version).
    assert_eq!(device.unit_state("aziot-edged.service"), "inactive");
    assert_eq!(
        device.http_status("root", MANAGEMENT_SOCKET, "/modules?api-version=2020-07-07"),
        "200"
    );
    assert_eq!(device.unit_state("aziot-edged.service"), "active");
    wait_for_running_agent(&device, &agent.container);
    assert_sockets(&device, &units);

    // 8. Restarting each service loses nothing.
    let state_before = key_and_cert_state(&device);
    for service in [
        "aziot-keyd",
        "aziot-certd",
        "aziot-identityd",
        "aziot-edged",
    ] {
        device.sh(&format!("systemctl restart {service}.service"));
        assert_eq!(device.unit_state(&format!("{service}.service")), "active");
        assert_eq!(identities(&device, DEVICE_ID), kept_identities);
        assert_eq!(
            wait_for_running_agent(&device, &agent.container)["name"],
            agent.container.as_str(),
            "after restarting {service}"
        );
    }
    assert_eq!(key_and_cert_state(&device), state_before);
    assert_sockets(&device, &units);

    // 9. `apt remove` keeps the device; installing again takes it back unchanged.
    device.sh(
        "DEBIAN_FRONTEND=noninteractive apt-get remove -y -q edge-runtime-edge edge-runtime-identity",
    );
    assert_eq!(
        device.sh("test ! -e /usr/libexec/aziot/keyd && test ! -e /usr/bin/iotedge && echo gone"),
        "gone"
    );
    for unit in &units {
        assert_ne!(device.unit_state(&unit.unit), "active", "{}", unit.unit);
    }
    assert_eq!(
        device.sh("test -e /etc/aziot/config.toml && test -e /etc/aziot/identityd/config.d/00-super.toml && echo kept"),
        "kept"
    );
    assert_eq!(key_and_cert_state(&device), state_before);
    device.sh(INSTALL);
    assert_sockets(&device, &units);
    // The postinst starts a configured identityd again.
    assert_eq!(device.unit_state("aziot-identityd.service"), "active");
    assert_eq!(identities(&device, DEVICE_ID), kept_identities);
    assert_eq!(key_and_cert_state(&device), state_before);
    let check = device.sh_status("iotedge check");
    assert!(check.status.success(), "{}", text(&check));

    // 10. `apt purge` deletes what the packages and `config apply` made (config, state,
    //     secrets, the units' enablement) and keeps the operator's own files in /etc/aziot.
    device.sh(
        "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q edge-runtime-edge edge-runtime-identity",
    );
    assert_eq!(
        device.sh(
            "for path in /etc/aziot/config.toml /etc/aziot/config.toml.template /etc/aziot/keyd \
               /etc/aziot/certd /etc/aziot/identityd /etc/aziot/edged /var/lib/aziot \
               /var/secrets/aziot /etc/systemd/system/sockets.target.wants/aziot-keyd.socket; do \
               test -e $path && echo $path; done; ls /etc/aziot"
        ),
        "local-ca.pem"
    );
}

/// HMAC-SHA256 with the OpenSSL command line (independent of keyd), base64.
fn openssl_hmac(key: &[u8], message: &[u8]) -> String {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("message"), message).unwrap();
    let hex_key: String = key.iter().map(|byte| format!("{byte:02x}")).collect();
    let output = run(Command::new("sh").arg("-c").arg(format!(
        "openssl dgst -sha256 -mac HMAC -macopt hexkey:{hex_key} -binary {} | base64 -w0",
        work.path().join("message").display()
    )));
    text(&output)
}

fn random_bytes(length: usize) -> Vec<u8> {
    let mut bytes = vec![0; length];
    use std::io::Read as _;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes
}

fn base64(bytes: &[u8]) -> String {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("bytes"), bytes).unwrap();
    text(&run(Command::new("base64")
        .arg("-w0")
        .arg(work.path().join("bytes"))))
}

/// A device as the reference's packages and `aziotctl config apply` leave it: the reference's
/// users (its preinst's `groupadd -r` / `useradd -r`, in its order, so their uids are not the
/// ones systemd-sysusers would pick), the super-config, each daemon's `config.d/00-super.toml`
/// in the reference's form (empty tables written, one file per daemon, 0600 and owned by the
/// service user), the enrollment key in `/var/secrets/aziot/keyd/device-id` and keyd's state in
/// the reference's file layout (`keys/<ID without non-alphanumerics>-<sha256(ID)>.key`, raw
/// bytes). Our packages take it over: same users, the device provisions with the same key, keyd
/// signs with the reference's keys, and module keys derive from the reference's master key.
#[test]
fn packages_take_over_a_reference_device() {
    const DEVICE_ID: &str = "ref-device";
    let packages = built_packages();
    let image = device_image();
    let device = Device::boot(&image, DEVICE_ID, &[]);

    // 1. The reference's users.
    device.sh(
        "for pair in aziotks:keyd aziottpm:tpmd aziotcs:certd aziotid:identityd; do \
           user=${pair%%:*}; home=/var/lib/aziot/${pair#*:}; \
           groupadd -r $user && useradd -r -g $user -s /sbin/nologin -d $home $user && mkdir -p $home; \
         done; \
         usermod -aG aziotks aziotcs; usermod -aG aziotcs,aziotks,aziottpm aziotid",
    );
    let uids_before = device.sh("for u in aziotks aziotcs aziotid aziottpm; do id $u; done");

    // 2. Keys in the reference layout: the enrollment key as config apply decodes it, keyd's
    //    handle validation key and identityd's master key for module identities.
    let enrollment_key = random_bytes(32);
    let master_key = random_bytes(32);
    let handle_validation_key = random_bytes(32);
    let secrets = tempfile::tempdir().unwrap();
    let keys = secrets.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::write(secrets.path().join("device-id"), &enrollment_key).unwrap();
    for (id, bytes) in [
        ("aziot_identityd_master_id", &master_key),
        ("handle-validation-key", &handle_validation_key),
    ] {
        let name = format!(
            "{}-{}.key",
            id.chars()
                .filter(char::is_ascii_alphanumeric)
                .collect::<String>(),
            text(&run(Command::new("sh").arg("-c").arg(format!(
                "printf %s '{id}' | sha256sum | cut -d' ' -f1"
            ))))
        );
        std::fs::write(keys.join(name), bytes).unwrap();
    }
    device.sh("mkdir -p /var/secrets/aziot/keyd /var/lib/aziot/keyd");
    device.copy_in(
        &secrets.path().join("device-id"),
        "/var/secrets/aziot/keyd/device-id",
    );
    device.copy_in(&keys, "/var/lib/aziot/keyd/keys");
    let enrollment_base64 = base64(&enrollment_key);

    // 3. The super-config and the reference's per-daemon files for it.
    device.sh(&format!(
        r#"set -e
mkdir -p /etc/aziot/keyd/config.d /etc/aziot/certd/config.d /etc/aziot/identityd/config.d
mkdir -p /etc/aziot/tpmd/config.d
cat > /etc/aziot/config.toml <<'EOF'
hostname = "ref-device"
[provisioning]
source = "dps"
global_endpoint = "https://localhost:8443/"
id_scope = "0ne0000DEV1"
[provisioning.attestation]
method = "symmetric_key"
registration_id = "ref-device"
symmetric_key = {{ value = "{enrollment_base64}" }}
EOF
chmod 0600 /etc/aziot/config.toml
cat > /etc/aziot/keyd/config.d/00-super.toml <<EOF
[aziot_keys]
homedir_path = "/var/lib/aziot/keyd"

[preloaded_keys]
device-id = "file:///var/secrets/aziot/keyd/device-id"

[[principal]]
uid = $(id -u aziotid)
keys = ["aziot_identityd_master_id", "device-id"]
EOF
cat > /etc/aziot/certd/config.d/00-super.toml <<'EOF'
homedir_path = "/var/lib/aziot/certd"

[cert_issuance]

[preloaded_certs]
EOF
cat > /etc/aziot/identityd/config.d/00-super.toml <<'EOF'
hostname = "ref-device"
homedir = "/var/lib/aziot/identityd"
prefer_module_identity_cache = false
principal = []

[provisioning]
source = "dps"
global_endpoint = "https://localhost:8443/"
scope_id = "0ne0000DEV1"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "ref-device"
symmetric_key = "device-id"
EOF
useradd --system --groups aziotid hostmodule
useradd --system --groups aziotks signer
cat > /etc/aziot/identityd/config.d/50-hostmodule.toml <<EOF
[[principal]]
uid = $(id -u hostmodule)
name = "hostmodule"
idtype = ["module"]
EOF
cat > /etc/aziot/keyd/config.d/50-signer.toml <<EOF
[[principal]]
uid = $(id -u signer)
keys = ["device-id"]
EOF
# The reference writes tpmd's drop-in for every device (empty here), owned by aziottpm.
printf '' > /etc/aziot/tpmd/config.d/00-super.toml
chown -R aziottpm:aziottpm /etc/aziot/tpmd
chmod 0700 /etc/aziot/tpmd/config.d
chmod 0600 /etc/aziot/tpmd/config.d/00-super.toml
for daemon in keyd:aziotks certd:aziotcs identityd:aziotid; do
  chown -R ${{daemon#*:}}:${{daemon#*:}} /etc/aziot/${{daemon%%:*}}/config.d /var/lib/aziot/${{daemon%%:*}}
  chmod 0700 /etc/aziot/${{daemon%%:*}}/config.d /var/lib/aziot/${{daemon%%:*}}
  chmod 0600 /etc/aziot/${{daemon%%:*}}/config.d/*.toml
done
chown -R aziotks:aziotks /var/secrets/aziot/keyd
chmod 0700 /var/secrets/aziot/keyd
chmod 0600 /var/secrets/aziot/keyd/device-id /var/lib/aziot/keyd/keys/*
chmod 0700 /var/lib/aziot/keyd/keys"#
    ));
    start_emulator(
        &device,
        &format!(
            r#"[[individual_enrollment]]
registration_id = "ref-device"
attestation = {{ type = "symmetric_key", primary_key = "{enrollment_base64}" }}"#
        ),
    );

    // 4. Our packages over it. The postinst starts the configured identityd.
    device.copy_in(packages, "/tmp/packages");
    device.sh(INSTALL);
    assert_eq!(
        device.sh("for u in aziotks aziotcs aziotid aziottpm; do id $u; done"),
        uids_before,
        "the reference's users keep their uids and groups"
    );
    assert_sockets(&device, &socket_units());
    assert_eq!(device.unit_state("aziot-identityd.service"), "active");
    // keyd reads the TPM service's configuration: the postinst hands it over from aziottpm.
    assert_eq!(
        device.sh(
            "stat -c '%U %G %a' /etc/aziot/tpmd /etc/aziot/tpmd/config.d \
             /etc/aziot/tpmd/config.d/00-super.toml"
        ),
        "root root 755\naziotks aziotks 700\naziotks aziotks 600"
    );

    // 5. The device provisions with the reference's enrollment key (keyd reads the preloaded
    //    file); `iotedge check` passes (the reference's drop-ins differ in form from ours, a
    //    warning until `config apply` rewrites them).
    let check = device.sh_status("iotedge check");
    let check_text = text(&check);
    assert!(check.status.success(), "{check_text}");
    assert!(
        check_text.contains("device ref-device in localhost:8443"),
        "{check_text}"
    );

    // 6. keyd signs with the reference's key: the same HMAC as OpenSSL with the file's bytes.
    let handle = device.get_json(
        "signer",
        "/run/aziot/keyd.sock",
        &format!("/key/device-id?{API}"),
    )["keyHandle"]
        .as_str()
        .unwrap()
        .to_owned();
    let message = b"the same key after the takeover";
    let sign = |device: &Device, handle: &str| {
        let body = serde_json::json!({
            "keyHandle": handle,
            "algorithm": "HMAC-SHA256",
            "parameters": { "message": base64(message) },
        });
        let answer = device.sh(&format!(
            "setpriv --reuid signer --regid signer --init-groups curl -sf --unix-socket \
             /run/aziot/keyd.sock -H 'content-type: application/json' -d '{body}' \
             'http://localhost/sign?{API}'"
        ));
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        answer["signature"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        sign(&device, &handle),
        openssl_hmac(&enrollment_key, message)
    );

    // 7. The module's keys in the hub derive from the reference's master key, as the reference
    //    derives them (HMAC-SHA256(master, "<module>:<generation>:primary")).
    let (_, module, hub_modules) = identities(&device, DEVICE_ID);
    assert_eq!(module["spec"]["moduleId"], "hostmodule");
    let generation = module["spec"]["genId"].as_str().unwrap().to_owned();
    let hub_text = hub_modules.to_string();
    let primary = openssl_hmac(
        &master_key,
        format!("hostmodule:{generation}:primary").as_bytes(),
    );
    assert!(
        hub_text.contains(&primary),
        "hub keys are not derived from the reference's master key: {hub_text}"
    );

    // 8. `iotedge config apply` rewrites the drop-ins in our form; nothing changes identity.
    let kept = identities(&device, DEVICE_ID);
    device.sh("iotedge config apply");
    assert_eq!(identities(&device, DEVICE_ID), kept);
    assert_eq!(
        sign(&device, &handle),
        openssl_hmac(&enrollment_key, message),
        "a handle from before config apply stays valid"
    );
    let check = device.sh_status("iotedge check");
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains("[ OK ] config-up-to-date"),
        "{}",
        text(&check)
    );
}
