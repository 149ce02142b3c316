//! `[tpm]` and `[aziot_max_requests] tpmd` onto the TPM service's drop-in
//! (`/etc/aziot/tpmd/config.d/00-super.toml`, read by keyd): top-level `tcti`, `auth_key_index`,
//! `max_requests` and `[hierarchy_authorization] endorsement / owner`, each written only when it
//! is not the default, as the reference's `config apply` writes them (so most devices get an
//! empty file). Values keyd would refuse are refused here, naming the key.

use toml::{Table, Value};

use super::raw::RawTpm;
use super::{is_rfc1123_hostname, string};
use crate::error::Problem;

/// The TCTI keyd uses when none is given.
const DEFAULT_TCTI: &str = "device";
/// The default `auth_key_index` (persistent handle 0x81000100).
const DEFAULT_AUTH_KEY_INDEX: i64 = 0x100;
/// The largest `auth_key_index`: persistent object handles end at 0x81FFFFFF (TPM 2.0 Part 3,
/// 28.5.1), and keyd and the reference take the same range.
const MAX_AUTH_KEY_INDEX: i64 = 0x7F_FFFF;
/// The `max_requests` the daemons use when none is given.
const DEFAULT_MAX_REQUESTS: i64 = 10;
/// TPM2B_AUTH holds at most a SHA-256 digest's worth of bytes.
const MAX_AUTH_LEN: usize = 32;

/// The tpmd drop-in's table.
pub(super) fn map_tpm(raw: Option<&RawTpm>, max_requests: Option<i64>) -> Result<Table, Problem> {
    let mut tpmd = Table::new();
    if let Some(limit) = max_requests.filter(|limit| *limit != DEFAULT_MAX_REQUESTS) {
        tpmd.insert("max_requests".into(), Value::Integer(limit));
    }
    let Some(raw) = raw else {
        return Ok(tpmd);
    };
    if let Some(tcti) = &raw.tcti {
        check_tcti(tcti).map_err(|reason| Problem::new("tpm.tcti", reason))?;
        if tcti != DEFAULT_TCTI {
            tpmd.insert("tcti".into(), string(tcti));
        }
    }
    if let Some(index) = raw.auth_key_index {
        if !(0..=MAX_AUTH_KEY_INDEX).contains(&index) {
            return Err(Problem::new(
                "tpm.auth_key_index",
                "must be an integer in 0x000000..=0x7FFFFF (an offset from 0x81000000)",
            ));
        }
        if index != DEFAULT_AUTH_KEY_INDEX {
            tpmd.insert("auth_key_index".into(), Value::Integer(index));
        }
    }
    if let Some(auth) = &raw.hierarchy_authorization {
        let mut table = Table::new();
        for (name, value) in [("endorsement", &auth.endorsement), ("owner", &auth.owner)] {
            let Some(value) = value else { continue };
            if value.len() > MAX_AUTH_LEN || value.contains('\0') {
                return Err(Problem::new(
                    format!("tpm.hierarchy_authorization.{name}"),
                    "must be at most 32 bytes without NUL",
                ));
            }
            if !value.is_empty() {
                table.insert(name.into(), string(value));
            }
        }
        if !table.is_empty() {
            tpmd.insert("hierarchy_authorization".into(), Value::Table(table));
        }
    }
    Ok(tpmd)
}

/// Checks a TCTI the way keyd parses it (tss-esapi's `TctiNameConf`): `device[:PATH]`,
/// `swtpm[:host=H,port=P]`, `mssim[:host=H,port=P]` or
/// `tabrmd[:bus_name=N,bus_type=session|system]`; other `name=value` pairs are ignored there too.
fn check_tcti(tcti: &str) -> Result<(), String> {
    let unsupported = || {
        format!(
            "unsupported TCTI {tcti:?}: expected device[:PATH], swtpm[:host=H,port=P], \
             mssim[:host=H,port=P] or tabrmd[:bus_name=N,bus_type=session|system]"
        )
    };
    if tcti.contains('\0') {
        return Err(unsupported());
    }
    let (name, options) = tcti.split_once(':').unwrap_or((tcti, ""));
    // The first `key=` option wins, as in tss-esapi.
    let option = |key: &str| {
        options
            .split(',')
            .find_map(|part| part.strip_prefix(key)?.strip_prefix('='))
    };
    match name {
        "device" => Ok(()),
        "swtpm" | "mssim" => {
            if let Some(host) = option("host") {
                if host.parse::<std::net::IpAddr>().is_err() && !is_rfc1123_hostname(host) {
                    return Err(format!(
                        "{tcti:?}: host {host:?} is neither an IP address nor a host name"
                    ));
                }
            }
            if let Some(port) = option("port") {
                if port.parse::<u16>().is_err() {
                    return Err(format!("{tcti:?}: port {port:?} is not a port number"));
                }
            }
            Ok(())
        }
        "tabrmd" => {
            if let Some(bus_name) = option("bus_name") {
                let part_ok = |part: &str| {
                    !part.is_empty()
                        && part
                            .bytes()
                            .all(|byte| byte.is_ascii_alphanumeric() || b"-_".contains(&byte))
                };
                let parts: Vec<&str> = bus_name.split('.').collect();
                if parts.len() < 2 || !parts.iter().all(|part| part_ok(part)) {
                    return Err(format!(
                        "{tcti:?}: bus_name {bus_name:?} is not a D-Bus name"
                    ));
                }
            }
            match option("bus_type") {
                None | Some("session" | "system") => Ok(()),
                Some(other) => Err(format!(
                    "{tcti:?}: bus_type {other:?} is neither session nor system"
                )),
            }
        }
        _ => Err(unsupported()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::super_config::raw::RawHierarchyAuthorization;

    #[test]
    fn tctis_keyd_takes() {
        for good in [
            "device",
            "device:/dev/tpmrm0",
            "swtpm",
            "swtpm:port=2321",
            "swtpm:host=127.0.0.1,port=2321",
            "mssim:host=tpm.local",
            "swtpm:host=::1",
            "tabrmd",
            "tabrmd:bus_name=com.intel.tss2.Tabrmd,bus_type=session",
        ] {
            check_tcti(good).unwrap_or_else(|error| panic!("{good}: {error}"));
        }
        for bad in [
            "",
            "carrier-pigeon",
            "devicex",
            "swtpm:port=notanumber",
            "swtpm:port=70000",
            "mssim:host=bad_host!",
            "tabrmd:bus_type=user",
            "tabrmd:bus_name=nodots",
        ] {
            assert!(check_tcti(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_are_left_out() {
        let raw = RawTpm {
            tcti: Some("device".into()),
            auth_key_index: Some(0x100),
            hierarchy_authorization: Some(RawHierarchyAuthorization {
                endorsement: Some(String::new()),
                owner: None,
            }),
        };
        assert_eq!(map_tpm(Some(&raw), Some(10)).unwrap(), Table::new());
        assert_eq!(map_tpm(None, None).unwrap(), Table::new());
    }

    #[test]
    fn settings_map_onto_the_tpmd_keys() {
        let raw = RawTpm {
            tcti: Some("swtpm:host=127.0.0.1,port=2321".into()),
            auth_key_index: Some(0x7F_FFFF),
            hierarchy_authorization: Some(RawHierarchyAuthorization {
                endorsement: Some("hello".into()),
                owner: Some("world".into()),
            }),
        };
        let table = map_tpm(Some(&raw), Some(40)).unwrap();
        let expected: Table = "max_requests = 40\ntcti = \"swtpm:host=127.0.0.1,port=2321\"\n\
             auth_key_index = 8388607\n[hierarchy_authorization]\nendorsement = \"hello\"\n\
             owner = \"world\"\n"
            .parse()
            .unwrap();
        assert_eq!(table, expected);
    }

    #[test]
    fn refusals_name_the_key() {
        let with = |raw: RawTpm| map_tpm(Some(&raw), None).unwrap_err().key;
        assert_eq!(
            with(RawTpm {
                auth_key_index: Some(0x80_0000),
                ..RawTpm::default()
            }),
            "tpm.auth_key_index"
        );
        assert_eq!(
            with(RawTpm {
                auth_key_index: Some(-1),
                ..RawTpm::default()
            }),
            "tpm.auth_key_index"
        );
        assert_eq!(
            with(RawTpm {
                tcti: Some("carrier-pigeon".into()),
                ..RawTpm::default()
            }),
            "tpm.tcti"
        );
        let secret = "0123456789012345678901234567890123";
        let problem = map_tpm(
            Some(&RawTpm {
                hierarchy_authorization: Some(RawHierarchyAuthorization {
                    endorsement: None,
                    owner: Some(secret.into()),
                }),
                ..RawTpm::default()
            }),
            None,
        )
        .unwrap_err();
        assert_eq!(problem.key, "tpm.hierarchy_authorization.owner");
        assert!(!problem.message.contains(secret), "{}", problem.message);
    }
}
