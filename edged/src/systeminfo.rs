//! `/systeminfo` and `/systeminfo/resources`: host facts read from `uname`, `/etc/os-release`,
//! `/proc` and DMI, the runtime's version, and per-module statistics fetched concurrently.
//! Keys whose value is unknown are omitted.

use std::collections::BTreeMap;
use std::ffi::CStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::EdgedError;
use crate::identity::IdentityClient;
use crate::model::SystemInfo;
use crate::runtime::ModuleRuntime;
use crate::service::Edged;

struct Uname {
    sysname: String,
    release: String,
    version: String,
    machine: String,
}

fn uname() -> Option<Uname> {
    // SAFETY: `utsname` is plain data; uname(2) fills it completely on success.
    let mut buffer: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid and writable for the duration of the call.
    if unsafe { libc::uname(&mut buffer) } != 0 {
        return None;
    }
    let text = |field: &[libc::c_char]| {
        // SAFETY: uname(2) NUL-terminates every field within its fixed-size array.
        unsafe { CStr::from_ptr(field.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    };
    Some(Uname {
        sysname: text(&buffer.sysname),
        release: text(&buffer.release),
        version: text(&buffer.version),
        machine: text(&buffer.machine),
    })
}

/// Parses `/etc/os-release` text into its key/value pairs (quotes removed).
pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.trim().split_once('=')?;
            let value = value.trim().trim_matches('"').trim_matches('\'');
            Some((key.to_owned(), value.to_owned()))
        })
        .collect()
}

fn meminfo() -> BTreeMap<String, u64> {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some((key.to_owned(), kib * 1024))
        })
        .collect()
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty())
}

/// `GET /systeminfo`.
pub async fn system_info<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
) -> SystemInfo {
    let mut info = SystemInfo::new();
    let uname = uname();
    info.insert(
        "osType".into(),
        json!(uname.as_ref().map_or("Linux", |u| u.sysname.as_str())),
    );
    info.insert(
        "architecture".into(),
        json!(uname
            .as_ref()
            .map_or(std::env::consts::ARCH, |u| u.machine.as_str())),
    );
    info.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    if let Some(uname) = &uname {
        info.insert("kernel_release".into(), json!(uname.release));
        info.insert("kernel_version".into(), json!(uname.version));
    }
    let os_release = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .map(|text| parse_os_release(&text))
        .unwrap_or_default();
    for (key, field) in [
        ("operating_system", "ID"),
        ("operating_system_version", "VERSION_ID"),
        ("operating_system_variant", "VARIANT_ID"),
        ("operating_system_build", "BUILD_ID"),
    ] {
        if let Some(value) = os_release.get(field) {
            info.insert(key.into(), json!(value));
        }
    }
    if let Ok(cpus) = std::thread::available_parallelism() {
        info.insert("cpus".into(), json!(cpus.get()));
    }
    if let Some(total) = meminfo().get("MemTotal") {
        info.insert("total_memory".into(), json!(total));
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virtualized = if cpuinfo.is_empty() {
        "unknown"
    } else if cpuinfo.lines().any(|line| {
        line.starts_with("flags") && line.split_whitespace().any(|flag| flag == "hypervisor")
    }) {
        "yes"
    } else {
        "no"
    };
    info.insert("virtualized".into(), json!(virtualized));
    if let Some(product) = read_trimmed("/sys/class/dmi/id/product_name") {
        info.insert("product_name".into(), json!(product));
    }
    if let Some(vendor) = read_trimmed("/sys/class/dmi/id/sys_vendor") {
        info.insert("system_vendor".into(), json!(vendor));
    }
    if let Ok(version) = edged.runtime.version().await {
        info.insert("server_version".into(), json!(version));
    }
    info.insert(
        "provisioning".into(),
        json!({"type": "ProvisioningType", "dynamicReprovisioning": false,
               "alwaysReprovisionOnStartup": false}),
    );
    for (key, value) in &edged.config.additional_info {
        info.insert(key.clone(), json!(value));
    }
    info
}

fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|value| value.parse().ok())
        .collect();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((values.iter().sum(), idle))
}

fn disks() -> Vec<Value> {
    const REAL: &[&str] = &[
        "ext2", "ext3", "ext4", "xfs", "btrfs", "vfat", "f2fs", "zfs", "overlay",
    ];
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [device, mount_point, file_type, ..] = fields.as_slice() else {
            continue;
        };
        if !REAL.contains(file_type) || seen.contains(device) {
            continue;
        }
        seen.push(*device);
        let Ok(path) = std::ffi::CString::new(*mount_point) else {
            continue;
        };
        // SAFETY: `statvfs` is plain data filled by the call on success.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a valid NUL-terminated string and `stat` is writable.
        if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
            continue;
        }
        let block = stat.f_frsize;
        out.push(json!({
            "name": device,
            "available_space": stat.f_bavail.saturating_mul(block),
            "total_space": stat.f_blocks.saturating_mul(block),
            "file_system": file_type,
            "file_type": file_type,
        }));
    }
    out
}

/// `GET /systeminfo/resources`.
pub async fn system_resources<R: ModuleRuntime, I: IdentityClient>(
    edged: &Arc<Edged<R, I>>,
) -> Result<Value, EdgedError> {
    let before = cpu_times();
    let modules = edged.runtime.list().await?;
    let mut tasks = tokio::task::JoinSet::new();
    for module in &modules {
        let edged = Arc::clone(edged);
        let name = module.name.clone();
        tasks.spawn(async move { edged.runtime.stats(&name).await });
    }
    let mut collected: Vec<Value> = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(value)) => collected.push(value),
            Ok(Err(error)) => log::debug!("module stats unavailable: {error}"),
            Err(error) => log::debug!("module stats task failed: {error}"),
        }
    }
    // A short second sample for CPU use if the stats calls were too quick.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = cpu_times();
    let used_cpu = match (before, after) {
        (Some((total_before, idle_before)), Some((total_after, idle_after)))
            if total_after > total_before =>
        {
            let total = (total_after - total_before) as f64;
            let idle = idle_after.saturating_sub(idle_before) as f64;
            ((total - idle) / total * 100.0).clamp(0.0, 100.0)
        }
        _ => 0.0,
    };
    let memory = meminfo();
    let total_ram = memory.get("MemTotal").copied().unwrap_or(0);
    let used_ram = total_ram.saturating_sub(memory.get("MemAvailable").copied().unwrap_or(0));
    let host_uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |seconds| seconds as u64);
    let docker_stats = serde_json::to_string(&collected).unwrap_or_else(|_| "[]".to_owned());
    Ok(json!({
        "host_uptime": host_uptime,
        "process_uptime": edged.started().elapsed().as_secs(),
        "used_cpu": used_cpu,
        "used_ram": used_ram,
        "total_ram": total_ram,
        "disks": disks(),
        "docker_stats": docker_stats,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_parsing() {
        let parsed = parse_os_release("ID=debian\nVERSION_ID=\"12\"\nPRETTY_NAME='Debian'\n# c\n");
        assert_eq!(parsed["ID"], "debian");
        assert_eq!(parsed["VERSION_ID"], "12");
        assert_eq!(parsed["PRETTY_NAME"], "Debian");
        assert!(uname().is_some());
        assert!(cpu_times().is_some());
    }
}
