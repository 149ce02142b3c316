//! Property-based fuzzing of both edged route tables against the real edged binary (with the
//! real keyd, certd, Docker and the harness's fake identityd): no body, path or query gets a 5xx
//! or a non-JSON error, from a host process and from inside the agent's container (the caller
//! that may mutate), edged keeps answering, and a module created before the run still runs.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{docker, parse_http, Harness, LOOP_COMMAND, V};
use http::{Method, StatusCode};
use system_tests::fuzz::proptest::{self, strategy::Strategy as _};
use system_tests::fuzz::{self, Field, Route, Target};

const TEXT: Field = Field::Text(&[]);
const NO_FIELDS: &[(&str, Field)] = &[];
const MODULE_SPEC: &[(&str, Field)] = &[
    ("name", Field::Id),
    ("type", Field::Text(&["docker"])),
    ("imagePullPolicy", Field::Text(&["never", "on-create"])),
    (
        "config",
        Field::Nested(&[
            (
                "settings",
                Field::Nested(&[("image", TEXT), ("createOptions", Field::Object)]),
            ),
            ("env", Field::Array),
        ]),
    ),
];

const fn route(
    method: &'static str,
    path: &'static str,
    fields: &'static [(&'static str, Field)],
    query: &'static [&'static str],
) -> Route {
    Route {
        method,
        path,
        fields,
        query,
    }
}

/// edged's management table (edged/src/routes.rs) with each route's body fields.
const MANAGEMENT: &[Route] = &[
    route("GET", "/modules", NO_FIELDS, &[]),
    route("POST", "/modules", MODULE_SPEC, &[]),
    route("GET", "/modules/{name}", NO_FIELDS, &[]),
    route("PUT", "/modules/{name}", MODULE_SPEC, &["start"]),
    route("DELETE", "/modules/{name}", NO_FIELDS, &[]),
    route("POST", "/modules/{name}/start", NO_FIELDS, &[]),
    route("POST", "/modules/{name}/stop", NO_FIELDS, &[]),
    route("POST", "/modules/{name}/restart", NO_FIELDS, &[]),
    route("POST", "/modules/{name}/prepareupdate", MODULE_SPEC, &[]),
    route(
        "GET",
        "/modules/{name}/logs",
        NO_FIELDS,
        &["follow", "tail", "since", "until", "timestamps"],
    ),
    route("GET", "/identities", NO_FIELDS, &[]),
    route(
        "POST",
        "/identities",
        &[("moduleId", Field::Id), ("managedBy", TEXT)],
        &[],
    ),
    route("PUT", "/identities/{name}", &[("managedBy", TEXT)], &[]),
    route("DELETE", "/identities/{name}", NO_FIELDS, &[]),
    route("GET", "/systeminfo", NO_FIELDS, &[]),
    route("GET", "/systeminfo/resources", NO_FIELDS, &[]),
    route(
        "GET",
        "/systeminfo/supportbundle",
        NO_FIELDS,
        &["since", "until", "iothub_hostname", "edge_runtime_only"],
    ),
    route("POST", "/device/reprovision", NO_FIELDS, &[]),
];

/// edged's workload table.
const WORKLOAD: &[Route] = &[
    route("GET", "/modules", NO_FIELDS, &[]),
    route(
        "POST",
        "/modules/{name}/genid/{genid}/sign",
        &[
            ("keyId", Field::Text(&["primary", "secondary"])),
            ("algo", Field::Text(&["HMACSHA256"])),
            ("data", Field::Base64),
        ],
        &[],
    ),
    route(
        "POST",
        "/modules/{name}/genid/{genid}/encrypt",
        &[
            ("plaintext", Field::Base64),
            ("initializationVector", Field::Base64),
        ],
        &[],
    ),
    route(
        "POST",
        "/modules/{name}/genid/{genid}/decrypt",
        &[
            ("ciphertext", Field::Base64),
            ("initializationVector", Field::Base64),
        ],
        &[],
    ),
    route(
        "POST",
        "/modules/{name}/certificate/identity",
        NO_FIELDS,
        &[],
    ),
    route(
        "POST",
        "/modules/{name}/genid/{genid}/certificate/server",
        &[("commonName", TEXT), ("expiration", TEXT)],
        &[],
    ),
    route("GET", "/trust-bundle", NO_FIELDS, &[]),
    route("GET", "/manifest-trust-bundle", NO_FIELDS, &[]),
];

/// Requests per run from the host (about 50 ms each with the liveness check, a Docker list) and
/// from the agent and a module (a `docker exec` each, about 0.1 s): about 30 s together.
const HOST_CASES: u32 = 300;
const AGENT_CASES: u32 = 60;
const MODULE_CASES: u32 = 60;

/// Where the kept module's workload socket is mounted.
const MODULE_SOCKET: &str = "/var/run/iotedge/workload.sock";

fn send(
    harness: &Harness,
    socket: &std::path::Path,
    case: &fuzz::Case,
) -> Result<(u16, Bytes), String> {
    harness
        .runtime
        .block_on(fuzz::send(socket, Duration::from_secs(30), case))
        .map(|(status, body)| (status.as_u16(), body))
}

/// The same request made by a process in `container` to `socket` (a path inside it).
fn send_from(container: &str, socket: &str, case: &fuzz::Case) -> Result<(u16, Bytes), String> {
    let body = String::from_utf8(case.body.clone()).unwrap();
    let (ok, stdout, stderr) = docker(&[
        "exec",
        container,
        "/bin/uds-client",
        socket,
        &case.method,
        &case.path_and_query,
        &body,
    ]);
    if !ok {
        return Err(format!("no answer inside {container}: {stderr}"));
    }
    let (status, body) = parse_http(stdout.as_bytes());
    Ok((status, Bytes::from(body)))
}

fn alive(harness: &Harness) -> Result<(), String> {
    harness.runtime.block_on(fuzz::still_answers(
        "edged",
        &harness.mgmt,
        &format!("/modules?{V}"),
    ))
}

#[test]
fn no_request_gets_a_5xx_and_modules_survive() {
    let _docker = common::docker_lock();
    let mut harness = Harness::new();
    harness.start_edged();
    let agent = harness.agent.clone();
    harness.wait_for("the agent to run", Duration::from_secs(30), || {
        harness.container_state(&agent).as_deref() == Some("running")
    });
    let mgmt = harness.mgmt.display().to_string();

    // A module made before fuzzing; the fuzzer is never told its name.
    let kept = harness.module_name("kept");
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "POST",
        &format!("/identities?{V}"),
        &serde_json::json!({ "moduleId": kept }).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let spec = serde_json::json!({
        "name": kept, "type": "docker", "imagePullPolicy": "never",
        "config": {"settings": {"image": harness.image.tag, "createOptions": {
            "Cmd": ["/bin/sh", "-c", LOOP_COMMAND],
            "HostConfig": {"Binds": [format!(
                "{}/mnt/{kept}.sock:{MODULE_SOCKET}",
                harness.homedir.display()
            )]}}}}
    })
    .to_string();
    let (status, body) = harness.exec_call(&agent, &mgmt, "POST", &format!("/modules?{V}"), &spec);
    assert_eq!(status, 201, "{body}");
    let (status, body) = harness.exec_call(
        &agent,
        &mgmt,
        "POST",
        &format!("/modules/{kept}/start?{V}"),
        "",
    );
    assert_eq!(status, 204, "{body}");
    harness.wait_for("the kept module to run", Duration::from_secs(30), || {
        harness.container_state(&kept).as_deref() == Some("running")
    });

    let target = Target {
        api_versions: edged::routes::API_VERSIONS,
        known_ids: vec![
            harness.module_name("fuzz"),
            "edgeHub".to_owned(),
            "primary".to_owned(),
            "1".to_owned(),
        ],
        known_strings: vec![
            harness.image.tag.clone(),
            "me".to_owned(),
            "2099-01-01T00:00:00Z".to_owned(),
            "fuzz.example".to_owned(),
        ],
    };

    let started = std::time::Instant::now();
    let management = fuzz::table_cases(MANAGEMENT, &target);
    let workload = fuzz::table_cases(WORKLOAD, &target);
    let host = proptest::prop_oneof![
        (management.clone(), proptest::strategy::Just(true)),
        (workload, proptest::strategy::Just(false)),
    ]
    .boxed();
    fuzz::run(HOST_CASES, &host, |(case, management)| {
        let socket = if *management {
            &harness.mgmt
        } else {
            &harness.workload
        };
        let (status, body) = send(&harness, socket, case)?;
        fuzz::check_answer(case, status, &body, false)?;
        alive(&harness)
    });
    let host_time = started.elapsed();

    // From inside the agent: the caller whose mutations edged performs. Bodies go through argv
    // (UTF-8, no NUL, under the 128 KiB argument limit); the agent itself is not a target.
    let agent_cases = management
        .prop_filter("argv-safe body, not the agent itself", |case| {
            std::str::from_utf8(&case.body).is_ok_and(|body| !body.contains('\0'))
                && case.body.len() < 100_000
                && !case.path_and_query.contains("edgeAgent")
                && !case.path_and_query.contains("/device/reprovision")
        })
        .boxed();
    fuzz::run(AGENT_CASES, &agent_cases, |case| {
        let (status, body) = send_from(&harness.agent, &mgmt, case)?;
        fuzz::check_answer(case, status, &body, false)?;
        alive(&harness)
    });
    let agent_time = started.elapsed() - host_time;

    // From inside the kept module over its own workload socket: the caller whose sign,
    // encrypt, decrypt and certificate requests edged performs.
    let module_target = Target {
        known_ids: vec![kept.clone(), harness.identity.gen_id(&kept).unwrap()],
        ..target.clone()
    };
    let module_cases = fuzz::table_cases(WORKLOAD, &module_target)
        .prop_filter("argv-safe body", |case| {
            std::str::from_utf8(&case.body).is_ok_and(|body| !body.contains('\0'))
                && case.body.len() < 100_000
        })
        .boxed();
    fuzz::run(MODULE_CASES, &module_cases, |case| {
        let (status, body) = send_from(&kept, MODULE_SOCKET, case)?;
        fuzz::check_answer(case, status, &body, false)?;
        alive(&harness)
    });
    eprintln!(
        "{HOST_CASES} host cases in {host_time:?}, {AGENT_CASES} agent cases in {agent_time:?}, \
         {MODULE_CASES} module cases in {:?}",
        started.elapsed() - host_time - agent_time
    );

    // The module made before the run still runs and is listed.
    assert_eq!(harness.container_state(&kept).as_deref(), Some("running"));
    let (status, list) = harness.mgmt(Method::GET, &format!("/modules?{V}"), "");
    assert_eq!(status, StatusCode::OK);
    assert!(list.to_string().contains(&kept), "{list}");
}

/// The same tables against edged with the process runtime (no Docker): from a host process,
/// and from inside the agent's cgroup (the caller whose creates, updates and deletes edged
/// performs, here with real processes, uids and cgroups). Root is not allowed to modules
/// (`allow_elevated_docker_permissions = false`), so no generated spec runs anything as root.
#[test]
fn the_process_runtime_answers_no_request_with_a_5xx() {
    let stack = common::process::Stack::with_settings("allow_elevated_docker_permissions = false");
    let target = Target {
        api_versions: edged::routes::API_VERSIONS,
        known_ids: vec!["fuzzmod".to_owned(), "primary".to_owned(), "1".to_owned()],
        known_strings: vec![
            "/bin/sh".to_owned(),
            "/bin/true".to_owned(),
            "/no/such/file.tar.gz".to_owned(),
            "2099-01-01T00:00:00Z".to_owned(),
        ],
    };
    let alive = || {
        stack.runtime.block_on(fuzz::still_answers(
            "edged",
            &stack.mgmt,
            &format!("/modules?{V}"),
        ))
    };
    let management = fuzz::table_cases(MANAGEMENT, &target);
    let host = proptest::prop_oneof![
        (management.clone(), proptest::strategy::Just(true)),
        (
            fuzz::table_cases(WORKLOAD, &target),
            proptest::strategy::Just(false)
        ),
    ]
    .boxed();
    let workload = stack.base.join("workload.sock");
    fuzz::run(PROCESS_HOST_CASES, &host, |(case, management)| {
        let socket = if *management { &stack.mgmt } else { &workload };
        let (status, body) = stack
            .runtime
            .block_on(fuzz::send(socket, Duration::from_secs(30), case))
            .map(|(status, body)| (status.as_u16(), body))?;
        fuzz::check_answer(case, status, &body, false)?;
        alive()
    });
    let agent_cases = management
        .prop_filter("argv-safe body, not the agent itself", |case| {
            std::str::from_utf8(&case.body).is_ok_and(|body| !body.contains('\0'))
                && case.body.len() < 100_000
                && !case.path_and_query.contains("edgeAgent")
                && !case.path_and_query.contains("/device/reprovision")
        })
        .boxed();
    fuzz::run(PROCESS_AGENT_CASES, &agent_cases, |case| {
        let body = String::from_utf8(case.body.clone()).unwrap();
        let (status, body) = stack.call_from_raw(
            &stack.agent,
            &stack.mgmt,
            &case.method,
            &case.path_and_query,
            &body,
        )?;
        fuzz::check_answer(case, status, &body, false)?;
        alive()
    });
    assert_eq!(stack.status_of(&stack.agent).as_deref(), Some("running"));
}

/// Requests per run against the process runtime: from the host (fast), and from the agent's
/// cgroup (a helper process each, about 0.1 s).
const PROCESS_HOST_CASES: u32 = 200;
const PROCESS_AGENT_CASES: u32 = 60;

/// `.` and `..` as module names (even percent-encoded) are 404 on every route that looks a module
/// up and 400 as the module a PUT replaces, not the 500 "301 Moved Permanently" Docker's
/// redirect used to become (found by the fuzz test above); other names that no container can
/// have are 404 too.
#[test]
fn module_names_no_container_can_have_are_404_or_400() {
    let _docker = common::docker_lock();
    let mut harness = Harness::new();
    harness.start_edged();
    for name in [".", "%2E", "..", "%2E%2E", "a", "-x", "a%20b", "%C3%BC"] {
        for (method, path) in [
            (Method::GET, format!("/modules/{name}?{V}")),
            (Method::POST, format!("/modules/{name}/start?{V}")),
            (Method::POST, format!("/modules/{name}/stop?{V}")),
            (Method::POST, format!("/modules/{name}/restart?{V}")),
            (Method::GET, format!("/modules/{name}/logs?{V}")),
            (Method::DELETE, format!("/modules/{name}?{V}")),
        ] {
            let (status, bytes) = harness.call_raw(&harness.mgmt, method.clone(), &path, "");
            let message = http_common::client::error_message(&bytes);
            // DELETE is for the agent only; any other caller is refused before the lookup.
            if method == Method::DELETE {
                assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {message}");
            } else {
                assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {message}");
                assert!(message.contains("not found"), "{method} {path}: {message}");
            }
        }
    }

    // The agent replacing module "." (a name no container can have): 400, not 500.
    let agent = harness.agent.clone();
    harness.wait_for("the agent to run", Duration::from_secs(30), || {
        harness.container_state(&agent).as_deref() == Some("running")
    });
    let mgmt = harness.mgmt.display().to_string();
    let spec = serde_json::json!({
        "name": harness.module_name("dot"), "type": "docker", "imagePullPolicy": "never",
        "config": {"settings": {"image": harness.image.tag}}
    })
    .to_string();
    for name in [".", "%2E%2E"] {
        let (status, body) =
            harness.exec_call(&agent, &mgmt, "PUT", &format!("/modules/{name}?{V}"), &spec);
        assert_eq!(status, 400, "PUT /modules/{name}: {body}");
        assert!(body["message"].as_str().unwrap().contains("name"), "{body}");
    }
    alive(&harness).unwrap();
}
