//! Checks the dependency and layering invariants stated in ARCHITECTURE.md.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const DAEMONS: &[&str] = &["keyd", "certd", "identityd", "edged"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Package name → names of its direct dependencies (all kinds), for workspace members.
fn dependency_graph() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|package| {
            let dependencies = package["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|dependency| dependency["name"].as_str().unwrap().to_owned())
                .collect();
            (package["name"].as_str().unwrap().to_owned(), dependencies)
        })
        .collect()
}

#[test]
fn no_daemon_depends_on_another_daemon() {
    let graph = dependency_graph();
    assert!(
        graph.contains_key("keyd") && graph.contains_key("certd"),
        "{graph:?}"
    );
    for (package, dependencies) in &graph {
        for daemon in DAEMONS {
            assert!(
                !(dependencies.contains(*daemon) && package != daemon),
                "{package} depends on the daemon crate {daemon}; use its -api crate"
            );
        }
    }
}

#[test]
fn only_keyd_reaches_pkcs11() {
    for (package, dependencies) in dependency_graph() {
        for pkcs11 in ["pkcs11-sys", "cryptoki", "cryptoki-sys"] {
            if dependencies.contains(pkcs11) {
                assert!(
                    package == "keyd" || package == "pkcs11-sys",
                    "{package} depends on {pkcs11}; only keyd may touch PKCS#11"
                );
            }
        }
    }
}

#[test]
fn shared_crates_know_nothing_of_the_services() {
    let graph = dependency_graph();
    for shared in ["http-common", "config-common", "pkcs11-sys"] {
        let forbidden: Vec<&String> = graph[shared]
            .iter()
            .filter(|name| {
                name.ends_with("-api")
                    || DAEMONS.contains(&name.as_str())
                    || name.as_str() == "cloud-emulator"
            })
            .collect();
        assert!(forbidden.is_empty(), "{shared} depends on {forbidden:?}");
    }
    for (package, dependencies) in &graph {
        if package.ends_with("-api") {
            for daemon in DAEMONS {
                assert!(
                    !dependencies.contains(*daemon),
                    "{package} depends on {daemon}"
                );
            }
        }
    }
}

/// Service and store modules hold no HTTP types (files named service.rs, or under service/ or
/// store/).
#[test]
fn service_and_store_layers_have_no_http_types() {
    let mut checked = 0;
    for daemon_dir in ["key", "cert", "identity", "edged"] {
        let source = workspace_root().join(daemon_dir).join("src");
        let mut files = Vec::new();
        if source.join("service.rs").exists() {
            files.push(source.join("service.rs"));
        }
        for folder in ["service", "store"] {
            if let Ok(entries) = std::fs::read_dir(source.join(folder)) {
                files.extend(entries.map(|entry| entry.unwrap().path()));
            }
        }
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            // Peer clients' errors (`http_common::ClientError`) may be inspected; HTTP types may not.
            for forbidden in ["hyper::", "use hyper", "http::"] {
                let offending = text
                    .lines()
                    .any(|line| !line.trim_start().starts_with("//") && line.contains(forbidden));
                assert!(!offending, "{} uses {forbidden}", file.display());
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 4,
        "expected to check keyd's and certd's service and store files"
    );
}

/// keyd.so, the OpenSSL provider, runs inside the host program's libcrypto: nothing it links
/// (its normal dependencies, transitively) may bring an OpenSSL of its own (the workspace's
/// `openssl` is vendored and static).
#[test]
fn the_openssl_provider_carries_no_openssl() {
    // Only this machine's platform: other platforms' crates may not be in the offline cache.
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let version = std::process::Command::new(rustc)
        .arg("-vV")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let host = version
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .unwrap()
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline"])
        .args(["--filter-platform", &host])
        .current_dir(workspace_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let name_of: BTreeMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|package| {
            (
                package["id"].as_str().unwrap(),
                package["name"].as_str().unwrap(),
            )
        })
        .collect();
    let nodes: BTreeMap<&str, &serde_json::Value> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| (node["id"].as_str().unwrap(), node))
        .collect();
    let root = name_of
        .iter()
        .find(|(_, name)| **name == "keyd-openssl-provider")
        .map(|(id, _)| *id)
        .expect("the provider is a workspace member");
    let mut linked = BTreeSet::new();
    let mut pending = vec![root];
    while let Some(id) = pending.pop() {
        if !linked.insert(id) {
            continue;
        }
        for dependency in nodes[id]["deps"].as_array().unwrap() {
            let normal = dependency["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|kind| kind["kind"].is_null());
            if normal {
                pending.push(dependency["pkg"].as_str().unwrap());
            }
        }
    }
    let names: BTreeSet<&str> = linked.iter().map(|id| name_of[id]).collect();
    assert!(names.contains("key-api"), "{names:?}");
    for openssl in ["openssl", "openssl-sys", "openssl-src"] {
        assert!(
            !names.contains(openssl),
            "keyd-openssl-provider links {openssl}: {names:?}"
        );
    }
}
