//! keyd.so, the OpenSSL 3 provider, in the real `openssl` programs of this machine (Debian's
//! OpenSSL 3.0) against the real keyd: `openssl s_server -Verify 1` with a CA made by `openssl
//! req`, and `openssl s_client -provider keyd -provider default -key keyd:<id> -cert ...`
//! complete mutual TLS 1.3 and 1.2 handshakes with EC P-256 and RSA-2048 keys held in the file
//! store and in a SoftHSM2 token (non-extractable); the server names the client certificate's
//! subject. A uid keyd does not authorize gets keyd's refusal in s_client's output.
//!
//! The provider library is this package's dev-dependency `keyd-openssl-provider`: cargo builds
//! its cdylib together with its rlib before these tests, into `target/<profile>/deps/`, next to
//! this test's executable. Each test copies it as `keyd.so` into a temporary folder passed with
//! `-provider-path` (OpenSSL loads provider `keyd` from `<path>/keyd.so`).

#![allow(clippy::unwrap_used)] // Test helpers outside #[test] functions unwrap too.

mod common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::Keyd;
use system_tests::softhsm::SoftHsm;

const FILE_CONFIG: &str = "[aziot_keys]\nhomedir_path = \"{home}\"\n";

/// The provider as cargo built it for this test run.
fn provider_library() -> PathBuf {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let library = deps.join("libkeyd_openssl_provider.so");
    assert!(
        library.exists(),
        "{} is missing: keyd-openssl-provider is a dev-dependency of keyd and should have been built",
        library.display()
    );
    library
}

/// A temporary folder with `keyd.so`, a CA (made by `openssl req -x509`) and a server
/// certificate it issued; readable by every uid.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::copy(provider_library(), dir.path().join("keyd.so")).unwrap();
        let pki = Pki { dir };
        pki.openssl_ok(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=Provider Test CA",
            "-days",
            "2",
        ]);
        pki.openssl_ok(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        pki.openssl_ok(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "server.pem",
        ]);
        pki
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn provider_path(&self) -> String {
        self.path().display().to_string()
    }

    fn openssl(&self, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
        let output = Command::new("openssl")
            .current_dir(self.path())
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("the openssl program must be installed (tools/install-deps.sh)");
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        (output.status.success(), text)
    }

    fn openssl_ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.openssl(args, &[]);
        assert!(ok, "openssl {args:?} failed: {text}");
        text
    }

    /// `<id>.pem`: a client certificate from the CA for the public key of keyd's key pair `id`,
    /// read through the provider (`openssl pkey -in keyd:<id> -pubout`).
    fn issue_client_certificate(&self, keyd_uri: &str, id: &str) {
        let public = format!("{id}-pub.pem");
        let uri = format!("keyd:{id}");
        let (ok, text) = self.openssl(
            &[
                "pkey",
                "-provider-path",
                &self.provider_path(),
                "-provider",
                "keyd",
                "-provider",
                "default",
                "-in",
                &uri,
                "-pubout",
                "-out",
                &public,
            ],
            &[("AZIOT_KEYD_URI", keyd_uri)],
        );
        assert!(ok, "the provider could not open {uri}: {text}");
        self.openssl_ok(&[
            "x509",
            "-new",
            "-force_pubkey",
            &public,
            "-subj",
            &format!("/CN={id}"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-days",
            "2",
            "-out",
            &format!("{id}.pem"),
        ]);
    }
}

/// A running `openssl s_server -Verify 1` for one connection.
struct Server {
    child: std::process::Child,
    port: u16,
    output: std::sync::mpsc::Receiver<String>,
}

impl Server {
    fn start(pki: &Pki, version: &str) -> Server {
        let mut child = Command::new("openssl")
            .current_dir(pki.path())
            .args([
                "s_server",
                "-accept",
                "127.0.0.1:0",
                "-naccept",
                "1",
                "-Verify",
                "1",
                "-verify_return_error",
                "-CAfile",
                "ca.pem",
                "-cert",
                "server.pem",
                "-key",
                "server.key",
                version,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the openssl program must be installed (tools/install-deps.sh)");
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (lines, output) = std::sync::mpsc::channel();
        let stderr_lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            let _ = stderr_lines.send(text);
        });
        let mut seen = String::new();
        let port = loop {
            let line = output
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("s_server did not start: {seen}"));
            if let Some(address) = line.strip_prefix("ACCEPT ") {
                break address.rsplit(':').next().unwrap().parse().unwrap();
            }
            seen.push_str(&line);
            seen.push('\n');
        };
        Server {
            child,
            port,
            output,
        }
    }

    /// Everything the server printed, once it has ended: after its one connection, or at
    /// once when the client never connected (s_server would wait for one forever).
    fn finish(mut self, connected: bool) -> String {
        drop(self.child.stdin.take());
        if !connected {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let mut text = String::new();
        while let Ok(line) = self.output.recv_timeout(std::time::Duration::from_secs(5)) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }
}

/// The provider options of the `s_client` command line. keyd first, as the issue asks; the
/// property query makes libcrypto's unqualified fetches (libssl's TLS groups, ephemeral keys)
/// prefer the default provider, which docs/keyd.md explains.
fn provider_options(pki: &Pki) -> Vec<String> {
    [
        "-provider-path",
        &pki.provider_path(),
        "-provider",
        "keyd",
        "-provider",
        "default",
        "-propquery",
        "?provider=default",
    ]
    .iter()
    .map(|text| (*text).to_owned())
    .collect()
}

/// The documented order: the default provider first, keyd second, no property query.
fn default_first_options(pki: &Pki) -> Vec<String> {
    [
        "-provider-path",
        &pki.provider_path(),
        "-provider",
        "default",
        "-provider",
        "keyd",
    ]
    .iter()
    .map(|text| (*text).to_owned())
    .collect()
}

/// Runs `s_client` with key `keyd:<id>` and certificate `<id>.pem` against a fresh server;
/// returns the client's success and output, and the server's output.
fn handshake(
    pki: &Pki,
    keyd_uri: &str,
    id: &str,
    version: &str,
    providers: &[String],
    uid: Option<u32>,
) -> (bool, String, String) {
    let server = Server::start(pki, version);
    let mut command = Command::new("openssl");
    command
        .current_dir(pki.path())
        .env("AZIOT_KEYD_URI", keyd_uri)
        .arg("s_client")
        .args(["-connect", &format!("127.0.0.1:{}", server.port)])
        .args(providers)
        .args(["-key", &format!("keyd:{id}"), "-cert", &format!("{id}.pem")])
        .args(["-CAfile", "ca.pem", "-verify_return_error", version])
        .stdin(Stdio::null());
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    let output = command
        .output()
        .expect("the openssl program must be installed (tools/install-deps.sh)");
    let client = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    // s_client connects only once it has its key; a client that failed before that leaves
    // the server waiting.
    let connected = client.contains("CONNECTED(");
    let server_output = server.finish(connected);
    (output.status.success(), client, server_output)
}

/// Every combination of TLS version, for keys `ids`, completes with the client certificate
/// seen by the server.
fn assert_mutual_tls(pki: &Pki, keyd_uri: &str, ids: &[&str]) {
    for id in ids {
        pki.issue_client_certificate(keyd_uri, id);
        for (version, protocol) in [("-tls1_3", "TLSv1.3"), ("-tls1_2", "TLSv1.2")] {
            let (ok, client, server) =
                handshake(pki, keyd_uri, id, version, &provider_options(pki), None);
            assert!(
                ok,
                "{id} {protocol}: s_client failed:\n{client}\nserver:\n{server}"
            );
            assert!(
                client.contains(&format!("New, {protocol}, Cipher is")),
                "{id}: not {protocol}:\n{client}"
            );
            assert!(
                client.contains("Verification: OK"),
                "{id}: server certificate not verified:\n{client}"
            );
            assert!(
                server.contains(&format!("subject=CN = {id}")),
                "{id} {protocol}: the server did not see the client certificate:\n{server}\nclient:\n{client}"
            );
            assert!(
                !server.contains("error"),
                "{id} {protocol}: server error:\n{server}"
            );
        }
    }
}

fn keyd_uri(keyd: &Keyd) -> String {
    format!("unix://{}", keyd.socket.display())
}

#[tokio::test]
async fn mutual_tls_with_keys_in_the_file_store() {
    let keyd = Keyd::start(FILE_CONFIG);
    let client = keyd.client();
    client
        .create_key_pair_if_not_exists("client-ec", Some("ec-p256"))
        .await
        .unwrap();
    client
        .create_key_pair_if_not_exists("client-rsa", Some("rsa-2048"))
        .await
        .unwrap();
    let pki = Pki::new();
    assert_mutual_tls(&pki, &keyd_uri(&keyd), &["client-ec", "client-rsa"]);
    // keyd made the signatures: its log has one /sign (ECDSA) or /encrypt (RSA) per handshake.
    let log = keyd.log();
    assert!(log.contains("/sign"), "{log}");
    assert!(log.contains("/encrypt"), "{log}");
}

#[tokio::test]
async fn mutual_tls_with_non_extractable_keys_in_a_token() {
    let hsm = SoftHsm::new("provider");
    let keyd = Keyd::start_with_env(&hsm.keyd_config(), hsm.env());
    let client = keyd.client();
    client
        .create_key_pair_if_not_exists("token-ec", Some("ec-p256"))
        .await
        .unwrap();
    client
        .create_key_pair_if_not_exists("token-rsa", Some("rsa-2048"))
        .await
        .unwrap();
    for id in ["token-ec", "token-rsa"] {
        let objects = hsm.objects_labelled(id);
        let private = objects
            .iter()
            .find(|object| object.starts_with("Private Key Object"))
            .unwrap_or_else(|| panic!("no private key {id} in the token: {objects:?}"));
        assert!(
            private.contains("never extractable") && private.contains("sensitive"),
            "{id} must be sensitive and non-extractable: {private}"
        );
    }
    let keys = std::fs::read_dir(keyd.home().join("keys"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert_eq!(keys, 0, "the key pairs must be in the token, not in files");
    let pki = Pki::new();
    assert_mutual_tls(&pki, &keyd_uri(&keyd), &["token-ec", "token-rsa"]);
}

#[tokio::test]
async fn a_uid_keyd_does_not_authorize_gets_the_refusal() {
    let keyd = Keyd::start(FILE_CONFIG);
    keyd.client()
        .create_key_pair_if_not_exists("root-only", Some("ec-p256"))
        .await
        .unwrap();
    std::fs::set_permissions(keyd.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&keyd.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let pki = Pki::new();
    pki.issue_client_certificate(&keyd_uri(&keyd), "root-only");
    let (ok, client, _server) = handshake(
        &pki,
        &keyd_uri(&keyd),
        "root-only",
        "-tls1_3",
        &provider_options(&pki),
        Some(65534),
    );
    assert!(!ok, "uid 65534 must not use the key:\n{client}");
    assert!(
        client.contains(
            "keyd refused to load key pair \"root-only\": 403 Forbidden: user 65534 is not authorized to access the key root-only"
        ),
        "{client}"
    );
    // The same uid with the default provider first, as docs/keyd.md also shows.
    let providers = default_first_options(&pki);
    let (ok, client, _server) = handshake(
        &pki,
        &keyd_uri(&keyd),
        "root-only",
        "-tls1_2",
        &providers,
        Some(65534),
    );
    assert!(!ok);
    assert!(client.contains("user 65534 is not authorized"), "{client}");
}

#[tokio::test]
async fn default_provider_first_also_works() {
    let keyd = Keyd::start(FILE_CONFIG);
    keyd.client()
        .create_key_pair_if_not_exists("ordered", Some("ec-p256"))
        .await
        .unwrap();
    let pki = Pki::new();
    pki.issue_client_certificate(&keyd_uri(&keyd), "ordered");
    let providers = default_first_options(&pki);
    let (ok, client, server) = handshake(
        &pki,
        &keyd_uri(&keyd),
        "ordered",
        "-tls1_2",
        &providers,
        None,
    );
    assert!(ok, "{client}\n{server}");
    assert!(server.contains("subject=CN = ordered"), "{server}");
}

#[tokio::test]
async fn plain_sign_handles_and_bad_uris() {
    let keyd = Keyd::start(FILE_CONFIG);
    let handle = keyd
        .client()
        .create_key_pair_if_not_exists("plain", Some("rsa-2048"))
        .await
        .unwrap();
    let uri = keyd_uri(&keyd);
    let pki = Pki::new();
    let provider_path = pki.provider_path();
    let with_provider = |args: &[&str]| {
        let mut all = vec![
            "-provider-path",
            provider_path.as_str(),
            "-provider",
            "keyd",
            "-provider",
            "default",
        ];
        all.extend_from_slice(args);
        all.iter()
            .map(|text| (*text).to_owned())
            .collect::<Vec<String>>()
    };
    let run = |subcommand: &str, args: &[&str]| {
        let mut all = vec![subcommand.to_owned()];
        all.extend(with_provider(args));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        pki.openssl(&all, &[("AZIOT_KEYD_URI", uri.as_str())])
    };
    // The handle form opens the same key as the ID form.
    let handle_uri = format!(
        "keyd:?handle={}",
        percent_encoding::utf8_percent_encode(&handle.0, percent_encoding::NON_ALPHANUMERIC)
    );
    let (ok, by_id) = run("pkey", &["-in", "keyd:plain", "-pubout"]);
    assert!(ok, "{by_id}");
    let (ok, by_handle) = run("pkey", &["-in", &handle_uri, "-pubout"]);
    assert!(ok, "{by_handle}");
    assert_eq!(by_id, by_handle);
    assert!(by_id.contains("BEGIN PUBLIC KEY"));
    std::fs::write(pki.path().join("plain-pub.pem"), &by_id).unwrap();
    // pkeyutl -sign uses the provider's plain sign() over a digest; OpenSSL verifies it with
    // the exported public key, for PKCS#1 v1.5 and PSS.
    std::fs::write(pki.path().join("message"), b"signed through keyd").unwrap();
    for options in [
        &["-pkeyopt", "digest:sha256"][..],
        &[
            "-pkeyopt",
            "digest:sha384",
            "-pkeyopt",
            "rsa_padding_mode:pss",
            "-pkeyopt",
            "rsa_pss_saltlen:digest",
        ][..],
    ] {
        pki.openssl_ok(&["dgst", "-sha256", "-binary", "-out", "digest256", "message"]);
        pki.openssl_ok(&["dgst", "-sha384", "-binary", "-out", "digest384", "message"]);
        let digest = if options.contains(&"digest:sha384") {
            "digest384"
        } else {
            "digest256"
        };
        let mut sign = vec![
            "-sign",
            "-inkey",
            "keyd:plain",
            "-in",
            digest,
            "-out",
            "signature",
        ];
        sign.extend_from_slice(options);
        let (ok, text) = run("pkeyutl", &sign);
        assert!(ok, "{options:?}: {text}");
        let mut verify = vec![
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            "plain-pub.pem",
            "-in",
            digest,
            "-sigfile",
            "signature",
        ];
        verify.extend_from_slice(options);
        let text = pki.openssl_ok(&verify);
        assert!(
            text.contains("Signature Verified Successfully"),
            "{options:?}: {text}"
        );
    }
    // openssl dgst -sign is digest-and-sign (the path libssl takes).
    let (ok, text) = run(
        "dgst",
        &[
            "-sha512",
            "-sign",
            "keyd:plain",
            "-out",
            "dgst-signature",
            "message",
        ],
    );
    assert!(ok, "{text}");
    let text = pki.openssl_ok(&[
        "dgst",
        "-sha512",
        "-verify",
        "plain-pub.pem",
        "-signature",
        "dgst-signature",
        "message",
    ]);
    assert!(text.contains("Verified OK"), "{text}");
    // Errors name their cause and never echo a handle.
    let (ok, text) = run("pkey", &["-in", "keyd:missing", "-pubout"]);
    assert!(!ok);
    assert!(
        text.contains("keyd refused to load key pair \"missing\": 404 Not Found"),
        "{text}"
    );
    let (ok, text) = run("pkey", &["-in", "keyd:?handle=bogus", "-pubout"]);
    assert!(!ok);
    assert!(
        text.contains("keyd refused to read algorithm of the key pair of the given handle: 400"),
        "{text}"
    );
    // (openssl itself echoes the URI it was given; the provider's message does not.)
    let provider_line = text
        .lines()
        .find(|line| line.contains("keyd refused"))
        .unwrap();
    assert!(!provider_line.contains("bogus"), "{text}");
    let (ok, text) = run("pkey", &["-in", "keyd:?id=x", "-pubout"]);
    assert!(!ok);
    assert!(
        text.contains("the only query is ?handle=<handle>"),
        "{text}"
    );
    // A keyd that is not there is named.
    let (ok, text) = {
        let mut all = vec!["pkey".to_owned()];
        all.extend(with_provider(&["-in", "keyd:plain", "-pubout"]));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        pki.openssl(&all, &[("AZIOT_KEYD_URI", "unix:///nonexistent/keyd.sock")])
    };
    assert!(!ok);
    assert!(
        text.contains(
            "keyd could not load key pair \"plain\": could not reach /nonexistent/keyd.sock"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn openssl_cnf_loads_the_provider_and_names_the_endpoint() {
    let keyd = Keyd::start(FILE_CONFIG);
    keyd.client()
        .create_key_pair_if_not_exists("configured", Some("ec-p256"))
        .await
        .unwrap();
    let pki = Pki::new();
    // The docs/keyd.md snippet, with `module` and `keyd_uri` filled in.
    let config = pki.path().join("openssl.cnf");
    std::fs::write(
        &config,
        format!(
            "openssl_conf = openssl_init\n[openssl_init]\nproviders = provider_sect\n\
             [provider_sect]\ndefault = default_sect\nkeyd = keyd_sect\n\
             [default_sect]\nactivate = 1\n\
             [keyd_sect]\nactivate = 1\nmodule = {}/keyd.so\nkeyd_uri = {}\n",
            pki.provider_path(),
            keyd_uri(&keyd)
        ),
    )
    .unwrap();
    let run = |env: &[(&str, &str)]| {
        let mut command = Command::new("openssl");
        command
            .current_dir(pki.path())
            .env_remove("AZIOT_KEYD_URI")
            .env("OPENSSL_CONF", &config)
            .args(["pkey", "-in", "keyd:configured", "-pubout"])
            .envs(env.iter().copied());
        let output = command.output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (ok, text) = run(&[]);
    assert!(ok, "{text}");
    assert!(text.contains("BEGIN PUBLIC KEY"), "{text}");
    // AZIOT_KEYD_URI wins over the config parameter.
    let (ok, text) = run(&[("AZIOT_KEYD_URI", "unix:///nonexistent/keyd.sock")]);
    assert!(!ok);
    assert!(
        text.contains("could not reach /nonexistent/keyd.sock"),
        "{text}"
    );
}

/// keyd.so carries no OpenSSL: it defines only the provider entry point and uses no libcrypto
/// or libssl symbol (it reaches the core through the upcalls it is given).
#[test]
fn the_provider_links_no_openssl() {
    let nm = |flag: &str| {
        let output = Command::new("nm")
            .args(["-D", flag])
            .arg(provider_library())
            .output()
            .expect("nm (binutils) must be installed (tools/install-deps.sh)");
        assert!(output.status.success());
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let defined: Vec<String> = nm("--defined-only")
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2).map(str::to_owned))
        .collect();
    assert_eq!(defined, ["OSSL_provider_init"], "exported symbols");
    let undefined = nm("--undefined-only");
    for prefix in [
        "EVP_", "OSSL_", "SSL_", "ERR_", "BN_", "EC_", "RSA_", "OPENSSL_", "CRYPTO_",
    ] {
        assert!(
            !undefined
                .lines()
                .any(|line| line.contains(&format!(" {prefix}"))),
            "keyd.so needs an OpenSSL symbol ({prefix}…):\n{undefined}"
        );
    }
    let ldd = Command::new("ldd")
        .arg(provider_library())
        .output()
        .unwrap();
    let libraries = String::from_utf8_lossy(&ldd.stdout);
    assert!(
        !libraries.contains("libcrypto") && !libraries.contains("libssl"),
        "{libraries}"
    );
}
