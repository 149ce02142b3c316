//! The reference config set `socket-activated-one-custom` with the real edged binary under
//! `systemd-socket-activate`: the management socket comes from systemd
//! (`fd://aziot-edged.mgmt.socket`) and the workload socket is a custom `unix://` path, which
//! edged must bind itself — whether systemd passes only the management socket or its workload
//! socket unit's fd too.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{parse_json, Harness, V};
use http::{Method, StatusCode};

const MGMT: &str = "aziot-edged.mgmt.socket";
const WORKLOAD: &str = "aziot-edged.workload.socket";

/// Points edged's `[listen]` at the systemd management fd and at `custom` for the workload.
fn listen_one_custom(harness: &Harness, custom: &Path) {
    let config = std::fs::read_to_string(harness.edged.config_file()).unwrap();
    let unix_listen = format!(
        "[listen]\nworkload_uri = \"unix://{}\"\nmanagement_uri = \"unix://{}\"\n",
        harness.workload.display(),
        harness.mgmt.display()
    );
    assert!(config.contains(&unix_listen));
    let config = config.replace(
        &unix_listen,
        &format!(
            "[listen]\nworkload_uri = \"unix://{}\"\nmanagement_uri = \"fd://{MGMT}\"\n",
            custom.display()
        ),
    );
    std::fs::write(harness.edged.config_file(), config).unwrap();
}

/// Starts edged activated with `sockets`, waits until the management API answers through the
/// passed socket, and checks that the custom workload path answers too.
fn serves_management_and_custom_workload(
    harness: &mut Harness,
    sockets: &[(&Path, &str)],
    custom: &Path,
) {
    let _ = std::fs::remove_file(custom);
    harness
        .edged
        .spawn_activated(sockets, Duration::from_secs(10));
    let mgmt = harness.mgmt.clone();
    harness.wait_for(
        "edged to answer on the passed management socket",
        Duration::from_secs(30),
        || {
            let client = http_common::UdsClient::new(&mgmt);
            harness
                .runtime
                .block_on(client.send(
                    Method::GET,
                    &format!("/modules?{V}"),
                    &[],
                    Vec::new().into(),
                ))
                .is_ok_and(|response| response.status == StatusCode::OK)
        },
    );
    let (status, bytes) = harness.call_raw(custom, Method::GET, &format!("/trust-bundle?{V}"), "");
    assert_eq!(status, StatusCode::OK, "{}", harness.edged.log());
    assert!(parse_json(&bytes)["certificate"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(harness.edged.is_running(), "{}", harness.edged.log());
    assert_eq!(harness.edged.stop(), Some(0), "{}", harness.edged.log());
}

#[test]
fn socket_activated_one_custom_binds_the_custom_workload_path() {
    let _docker = common::docker_lock();
    let mut harness = Harness::new();
    let custom: PathBuf = harness
        .mgmt
        .parent()
        .unwrap()
        .join("custom")
        .join("workload.sock");
    listen_one_custom(&harness, &custom);
    let (mgmt, workload) = (harness.mgmt.clone(), harness.workload.clone());

    // Only the management socket unit passes its fd (before: "could not listen on fd://3:
    // File exists", exit 1).
    serves_management_and_custom_workload(&mut harness, &[(mgmt.as_path(), MGMT)], &custom);

    // Both socket units pass their fds (before: the unit's workload socket was served and the
    // custom path never created).
    serves_management_and_custom_workload(
        &mut harness,
        &[(mgmt.as_path(), MGMT), (workload.as_path(), WORKLOAD)],
        &custom,
    );
}
