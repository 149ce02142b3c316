//! The systemd units give every daemon an open-file limit that the daemon-wide connection cap
//! reaches first, with headroom for everything else the daemon opens.

use std::path::Path;

use http_common::daemon::DESCRIPTOR_HEADROOM;
use http_common::server::DaemonLimits;

#[test]
fn every_service_unit_allows_the_connection_cap_plus_headroom() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd");
    for name in [
        "aziot-keyd.service",
        "aziot-certd.service",
        "aziot-identityd.service",
        "aziot-edged.service",
    ] {
        let text = std::fs::read_to_string(units.join(name)).expect(name);
        let mut section = "";
        let limits: Vec<u64> = text
            .lines()
            .map(str::trim)
            .filter_map(|line| {
                if line.starts_with('[') {
                    section = line;
                }
                let value = line.strip_prefix("LimitNOFILE=")?;
                assert_eq!(section, "[Service]", "{name}: {line}");
                Some(value.parse().expect("a single number"))
            })
            .collect();
        assert_eq!(limits.len(), 1, "{name}: one LimitNOFILE= line");
        let needed = DaemonLimits::DEFAULT.max_connections as u64 + DESCRIPTOR_HEADROOM;
        assert!(
            limits[0] >= needed,
            "{name}: LimitNOFILE={} is below the cap plus headroom ({needed})",
            limits[0]
        );
    }
}
