//! Property-based fuzzing of every certd route against the real certd (and keyd) binaries: no
//! body, path or query gets a 5xx or a non-JSON error, certd keeps answering, and certificates
//! stored before the run are still served after it. Also the cert ID limit the file store needs.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{csr_pem, ec_key, openssl_ca, Pair, Profile};
use http::{Method, StatusCode};
use system_tests::fuzz::{self, Field, Route, Target};

const V: &str = "api-version=2020-09-01";
const TEXT: Field = Field::Text(&[]);

/// certd's route table (cert/src/routes.rs) with each route's body fields.
const ROUTES: &[Route] = &[
    Route {
        method: "POST",
        path: "/certificates",
        fields: &[
            ("certId", Field::Id),
            ("csr", TEXT),
            (
                "issuer",
                Field::Nested(&[("certId", Field::Id), ("privateKeyHandle", TEXT)]),
            ),
        ],
        query: &[],
    },
    Route {
        method: "GET",
        path: "/certificates/{certId}",
        fields: &[],
        query: &[],
    },
    Route {
        method: "PUT",
        path: "/certificates/{certId}",
        fields: &[("pem", TEXT)],
        query: &[],
    },
    Route {
        method: "DELETE",
        path: "/certificates/{certId}",
        fields: &[],
        query: &[],
    },
    Route {
        method: "GET",
        path: "/certstore/cert",
        fields: &[("certid", Field::Id), ("pem", TEXT)],
        query: &["certid"],
    },
    Route {
        method: "POST",
        path: "/certstore/cert",
        fields: &[("certid", Field::Id), ("pem", TEXT)],
        query: &["certid"],
    },
    Route {
        method: "PUT",
        path: "/certstore/cert",
        fields: &[("certid", Field::Id), ("pem", TEXT)],
        query: &["certid"],
    },
];

/// Requests per run (a few ms each with the liveness check; issuance is the slow part).
const CASES: u32 = 1500;

#[test]
fn no_request_gets_a_5xx_and_stored_certs_survive() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut pair = Pair::new();
    let ca_key = ec_key();
    pair.add_key("fuzz-ca", &ca_key);
    pair.add_key("leaf", &ec_key());
    let preloaded =
        String::from_utf8(openssl_ca(&ec_key(), "preloaded", 0, 1).to_pem().unwrap()).unwrap();
    std::fs::write(pair.path("preloaded.pem"), &preloaded).unwrap();
    pair.start(
        "[preloaded_certs]\npreloaded = \"file://{dir}/preloaded.pem\"\n\
         [cert_issuance.fuzz-ca]\nmethod = \"self_signed\"\nca = true\n",
    );
    let client = pair.certd_client();
    let keyd = pair.keyd_client();
    let kept = String::from_utf8(openssl_ca(&ec_key(), "kept", 0, 1).to_pem().unwrap()).unwrap();
    let target = runtime.block_on(async {
        let ca_csr = csr_pem(&ca_key, "fuzz CA", Profile::Ca);
        let ca = client.create_cert("fuzz-ca", &ca_csr, None).await.unwrap();
        client
            .import_cert("kept-before-fuzzing-7d1e", &kept)
            .await
            .unwrap();
        let ca_handle = keyd.load_key_pair("fuzz-ca").await.unwrap();
        let leaf_csr = csr_pem(&ec_key(), "leaf", Profile::Server);
        Target {
            api_versions: cert_api::API_VERSIONS,
            known_ids: ["preloaded", "fuzz-ca", "leaf", "a/b", "fuzz-id"]
                .map(str::to_owned)
                .to_vec(),
            known_strings: vec![ca_csr, leaf_csr, ca, preloaded.clone(), ca_handle.0],
        }
    });

    let strategy = fuzz::table_cases(ROUTES, &target);
    let started = std::time::Instant::now();
    fuzz::run(CASES, &strategy, |case| {
        runtime.block_on(async {
            let (status, body) =
                fuzz::send(&pair.certd.socket, Duration::from_secs(15), case).await?;
            fuzz::check_answer(case, status.as_u16(), &body, false)?;
            fuzz::still_answers(
                "certd",
                &pair.certd.socket,
                &format!("/certificates/preloaded?{V}"),
            )
            .await
        })
    });
    eprintln!("{CASES} cases in {:?}", started.elapsed());

    runtime.block_on(async {
        assert_eq!(client.get_cert("preloaded").await.unwrap(), preloaded);
        assert_eq!(
            client.get_cert("kept-before-fuzzing-7d1e").await.unwrap(),
            kept
        );
    });
}

/// A cert ID whose file name would be too long for the file system is a 400 naming the limit on
/// every route that names a cert (before: 500); IDs within the limit are stored and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cert_ids_the_file_store_cannot_hold_are_400_naming_the_limit() {
    let mut pair = Pair::new();
    pair.start("");
    let client = pair.certd_client();
    let pem = String::from_utf8(openssl_ca(&ec_key(), "x", 0, 1).to_pem().unwrap()).unwrap();
    let at_limit = "c".repeat(152);
    let long_but_storable = format!("{}cd", "/".repeat(510));
    for id in [&at_limit, &long_but_storable] {
        client.import_cert(id, &pem).await.unwrap();
        assert_eq!(client.get_cert(id).await.unwrap(), pem);
    }
    let over = "c".repeat(300);
    let encoded = fuzz::percent_encode(&over, false);
    let pem_body = serde_json::json!({ "pem": pem }).to_string();
    for (method, path, body) in [
        (
            Method::PUT,
            format!("/certificates/{encoded}?{V}"),
            pem_body.clone(),
        ),
        (
            Method::GET,
            format!("/certificates/{encoded}?{V}"),
            String::new(),
        ),
        (
            Method::DELETE,
            format!("/certificates/{encoded}?{V}"),
            String::new(),
        ),
        (
            Method::POST,
            format!("/certificates?{V}"),
            serde_json::json!({ "certId": over, "csr": csr_pem(&ec_key(), "x", Profile::Server) })
                .to_string(),
        ),
        (
            Method::PUT,
            "/certstore/cert".to_owned(),
            serde_json::json!({ "certid": over, "pem": pem }).to_string(),
        ),
    ] {
        let (status, body, _) = pair.request(method.clone(), &path, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("at most 152 ASCII letters and digits"),
            "{method} {path}: {message}"
        );
    }
}
