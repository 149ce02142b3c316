//! What both SoftHSM2 test binaries set up: a private token folder with initialized tokens.

use std::process::Command;

/// SoftHSM2's module as Debian installs it.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Creates a token folder with one token per label (SO PIN 5678, user PIN 1234) and points
/// `SOFTHSM2_CONF` at it. Must run before the module is loaded (SoftHSM2 reads the variable once)
/// and while no other thread runs. Fails when SoftHSM2 is not installed.
pub fn softhsm_tokens(labels: &[&str]) -> tempfile::TempDir {
    assert!(
        std::path::Path::new(MODULE).is_file(),
        "SoftHSM2 is not installed ({MODULE} is missing)"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tokens")).unwrap();
    let conf = dir.path().join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}/tokens\nobjectstore.backend = file\n",
            dir.path().display()
        ),
    )
    .unwrap();
    for label in labels {
        let output = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &conf)
            .args(["--init-token", "--free", "--label", label])
            .args(["--so-pin", "5678", "--pin", "1234"])
            .output()
            .expect("softhsm2-util must be installed");
        assert!(output.status.success(), "{output:?}");
    }
    std::env::set_var("SOFTHSM2_CONF", &conf);
    dir
}
