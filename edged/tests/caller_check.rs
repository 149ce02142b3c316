//! A positive caller check is remembered for a few seconds, but only for the process it was
//! given to: when that process exits and the kernel hands its pid to a process of another
//! container, the new process is checked afresh and refused.
//!
//! The pid is really reused: the test asks the kernel for it through
//! `/proc/sys/kernel/ns_last_pid` (root in the initial pid namespace, as the tests run here).

#![allow(clippy::unwrap_used)]

mod fake_peers;

use std::collections::HashMap;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use edged::identity::IdentityClient as _;
use edged::runtime::docker::DockerRuntime;
use edged::Edged;
use fake_peers::{serve_engine, FakeIdentity};
use http::{Method, StatusCode};
use http_common::{Caller, Request, Response};

/// A Docker engine that only answers `GET /containers/<name>/top`, from a table the test sets.
#[derive(Default)]
struct TopEngine {
    pids: Mutex<HashMap<String, Vec<u32>>>,
}

struct TopRouter(Arc<TopEngine>);

impl http_common::Handler for TopRouter {
    async fn handle(&self, request: Request) -> Response {
        let path = request.path.strip_prefix("/v1.41").unwrap_or("");
        let name = path
            .strip_prefix("/containers/")
            .and_then(|rest| rest.strip_suffix("/top"));
        match (request.method.clone(), name) {
            (Method::GET, Some(name)) => {
                let processes: Vec<serde_json::Value> = self
                    .0
                    .pids
                    .lock()
                    .unwrap()
                    .get(name)
                    .into_iter()
                    .flatten()
                    .map(|pid| serde_json::json!(["root", pid.to_string(), "sleep"]))
                    .collect();
                http_common::json_response(
                    StatusCode::OK,
                    &serde_json::json!({"Titles": ["UID", "PID", "CMD"], "Processes": processes}),
                )
            }
            _ => http_common::json_response(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"message": format!("No such container: {path}")}),
            ),
        }
    }
}

fn sleeper() -> Child {
    Command::new("sleep").arg("60").spawn().unwrap()
}

fn end(mut child: Child) {
    let _ = child.kill();
    child.wait().unwrap();
}

/// A new process that gets `pid`, which must be free: the kernel gives the next fork
/// `ns_last_pid + 1`, unless another fork on the machine comes first, so this tries again.
fn sleeper_with_pid(pid: u32) -> Child {
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("writing /proc/sys/kernel/ns_last_pid needs root in the initial pid namespace");
        let child = sleeper();
        if child.id() == pid {
            return child;
        }
        end(child);
    }
    panic!("the kernel never handed out pid {pid} again");
}

fn caller(pid: u32) -> Caller {
    Caller {
        uid: 0,
        gid: 0,
        pid: i32::try_from(pid).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_pid_does_not_inherit_a_cached_answer() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(TopEngine::default());
    let socket = dir.path().join("docker.sock");
    serve_engine(&socket, Arc::new(TopRouter(Arc::clone(&engine))));
    let homedir = dir.path().join("home");
    std::fs::create_dir_all(&homedir).unwrap();
    let config = edged::Config::from_toml(&format!(
        "hostname = \"h\"\nhomedir = \"{}\"\n[agent.config]\nimage = \"agent:1\"\n",
        homedir.display()
    ))
    .unwrap();
    let runtime = DockerRuntime::new(
        edged::docker::DockerClient::new(&socket),
        true,
        config.moby.network.clone(),
    );
    let (exit, _exit_receiver) = tokio::sync::mpsc::unbounded_channel();
    let edged = Edged::new(
        config,
        runtime,
        FakeIdentity,
        key_api::Client::from_uri("unix:///nonexistent/keyd.sock").unwrap(),
        cert_api::Client::from_uri("unix:///nonexistent/certd.sock").unwrap(),
        homedir,
        FakeIdentity.get_device().await.unwrap(),
        exit,
    );

    // A process of module `trusted` is allowed, and the answer is now cached.
    let first = sleeper();
    let pid = first.id();
    engine
        .pids
        .lock()
        .unwrap()
        .insert("trusted".into(), vec![pid]);
    edged.authorize(&caller(pid), "trusted").await.unwrap();
    edged.authorize(&caller(pid), "other").await.unwrap_err();

    // It exits; its pid goes to a process of module `other`, well within the cache's lifetime.
    // Start times count clock ticks (10 ms): let one pass, as any real reuse of a pid takes far
    // longer than that (the kernel hands out every other pid first).
    std::thread::sleep(std::time::Duration::from_millis(30));
    engine.pids.lock().unwrap().remove("trusted");
    end(first);
    let second = sleeper_with_pid(pid);
    engine
        .pids
        .lock()
        .unwrap()
        .insert("other".into(), vec![pid]);

    let error = edged.authorize(&caller(pid), "trusted").await.unwrap_err();
    assert!(
        matches!(error, edged::EdgedError::Forbidden),
        "the new process is checked afresh and refused: {error:?}"
    );
    edged.authorize(&caller(pid), "other").await.unwrap();

    // A pid whose process is gone is refused without asking the engine.
    end(second);
    engine
        .pids
        .lock()
        .unwrap()
        .insert("other".into(), vec![pid]);
    edged
        .authorize(&caller(pid), "other")
        .await
        .expect_err("no process, no answer");
}
