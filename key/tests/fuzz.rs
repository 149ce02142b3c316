//! Property-based fuzzing of every keyd route against the real binary: no body, path or query
//! gets a 5xx or a non-JSON error, the daemon keeps answering, and keys stored before the run
//! still work after it. Also the key ID limits the file store imposes.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{b64, Keyd};
use http::{Method, StatusCode};
use key_api::SignMechanism;
use system_tests::fuzz::{self, Field, Route, Target};

const TEXT: Field = Field::Text(&[]);
const ALGORITHMS: Field = Field::Text(&[
    "ECDSA",
    "HMAC-SHA256",
    "AEAD",
    "RSA-PKCS1",
    "RSA-NO-PADDING",
]);
const AEAD: Field = Field::Nested(&[("iv", Field::Base64), ("aad", Field::Base64)]);
const SIGN_PARAMETERS: Field =
    Field::Nested(&[("digest", Field::Base64), ("message", Field::Base64)]);

/// keyd's route table (key/src/routes.rs) with each route's body fields.
const ROUTES: &[Route] = &[
    Route {
        method: "POST",
        path: "/key",
        fields: &[
            ("keyId", Field::Id),
            (
                "usage",
                Field::Text(&["sign", "derive,sign", "encrypt", "derive,encrypt,sign"]),
            ),
            ("keyBytes", Field::Base64),
        ],
        query: &[],
    },
    Route {
        method: "DELETE",
        path: "/key",
        fields: &[("keyHandle", TEXT)],
        query: &[],
    },
    Route {
        method: "GET",
        path: "/key/{keyId}",
        fields: &[],
        query: &[],
    },
    Route {
        method: "POST",
        path: "/keypair",
        fields: &[
            ("keyId", Field::Id),
            (
                "preferredAlgorithms",
                Field::Text(&["ec-p256", "*", "ec-p256:rsa-2048", "x:y"]),
            ),
        ],
        query: &[],
    },
    Route {
        method: "DELETE",
        path: "/keypair",
        fields: &[("keyHandle", TEXT)],
        query: &[],
    },
    Route {
        method: "GET",
        path: "/keypair/{keyId}",
        fields: &[],
        query: &[],
    },
    Route {
        method: "POST",
        path: "/keypair/{keyId}",
        fields: &[("from", Field::Id)],
        query: &[],
    },
    Route {
        method: "POST",
        path: "/parameters/{parameterName}",
        fields: &[("keyHandle", TEXT)],
        query: &[],
    },
    Route {
        method: "POST",
        path: "/sign",
        fields: &[
            ("keyHandle", TEXT),
            ("algorithm", ALGORITHMS),
            ("parameters", SIGN_PARAMETERS),
        ],
        query: &[],
    },
    Route {
        method: "POST",
        path: "/encrypt",
        fields: &[
            ("keyHandle", TEXT),
            ("algorithm", ALGORITHMS),
            ("parameters", AEAD),
            ("plaintext", Field::Base64),
        ],
        query: &[],
    },
    Route {
        method: "POST",
        path: "/decrypt",
        fields: &[
            ("keyHandle", TEXT),
            ("algorithm", ALGORITHMS),
            ("parameters", AEAD),
            ("ciphertext", Field::Base64),
        ],
        query: &[],
    },
    Route {
        method: "POST",
        path: "/derivedkey",
        fields: &[("baseKeyHandle", TEXT), ("derivationData", Field::Base64)],
        query: &[],
    },
    Route {
        method: "POST",
        path: "/derivedkey/export",
        fields: &[("keyHandle", TEXT)],
        query: &[],
    },
    Route {
        method: "POST",
        path: "/keystore/key",
        fields: &[("keyid", Field::Id)],
        query: &["keyid"],
    },
    Route {
        method: "GET",
        path: "/keystore/key",
        fields: &[("keyid", Field::Id)],
        query: &["keyid"],
    },
    Route {
        method: "POST",
        path: "/keystore/keypair",
        fields: &[("keypairid", Field::Id)],
        query: &["keypairid"],
    },
    Route {
        method: "GET",
        path: "/keystore/keypair",
        fields: &[("keypairid", Field::Id)],
        query: &["keypairid"],
    },
    Route {
        method: "POST",
        path: "/keystore/sign",
        fields: &[
            ("keystorehandle", TEXT),
            ("algo", Field::Text(&["HMACSHA256", "HMAC-SHA256"])),
            ("data", Field::Base64),
        ],
        query: &[],
    },
];

/// Preloaded keys (read-only, so fuzzed deletes and moves cannot remove them) plus one dynamic
/// key whose ID the fuzzer is never told.
fn start() -> (Keyd, Vec<u8>) {
    let files = tempfile::tempdir().unwrap();
    let symmetric = files.path().join("sym");
    let sas_bytes = b"preloaded symmetric key bytes!!!".to_vec();
    std::fs::write(&symmetric, &sas_bytes).unwrap();
    let ec = files.path().join("ec.pem");
    let rsa = files.path().join("rsa.pem");
    let ec_key = openssl::ec::EcKey::generate(
        &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
    )
    .unwrap();
    let ec_key = openssl::pkey::PKey::from_ec_key(ec_key).unwrap();
    std::fs::write(&ec, ec_key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    let rsa_key =
        openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
    std::fs::write(&rsa, rsa_key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    let config = format!(
        "[aziot_keys]\nhomedir_path = \"{{home}}\"\n[preloaded_keys]\nsas = \"file://{}\"\nec = \"file://{}\"\nrsa = \"file://{}\"\n",
        symmetric.display(),
        ec.display(),
        rsa.display()
    );
    let keyd = Keyd::start(&config);
    // The preloaded files must outlive the run.
    std::mem::forget(files);
    (keyd, sas_bytes)
}

/// Requests per run: about 5 ms each, with the liveness check.
const CASES: u32 = 2000;

#[test]
fn no_request_gets_a_5xx_and_stored_keys_survive() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (keyd, sas_bytes) = start();
    let client = keyd.client();
    let (target, kept, kept_mac) = runtime.block_on(async {
        let sas = client.load_key("sas").await.unwrap();
        let ec = client.load_key_pair("ec").await.unwrap();
        let rsa = client.load_key_pair("rsa").await.unwrap();
        let derived = client
            .create_derived_key(&sas, b"module:1:primary")
            .await
            .unwrap();
        let aead = client
            .create_key_if_not_exists("aead", "encrypt")
            .await
            .unwrap();
        let kept = client
            .create_key_if_not_exists("kept-before-fuzzing-3f9c", "sign")
            .await
            .unwrap();
        let kept_mac = client
            .sign(&kept, SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap();
        let mut known_strings: Vec<String> = [&sas, &ec, &rsa, &derived, &aead]
            .into_iter()
            .map(|handle| handle.0.clone())
            .collect();
        known_strings.extend(
            [
                "algorithm",
                "ec-curve-oid",
                "ec-point",
                "rsa-modulus",
                "rsa-exponent",
            ]
            .map(str::to_owned),
        );
        known_strings.push(b64(&[0_u8; 12]));
        let target = Target {
            api_versions: key_api::API_VERSIONS,
            known_ids: [
                "sas",
                "ec",
                "rsa",
                "aead",
                "fuzz-id",
                "algorithm",
                "ec-point",
            ]
            .map(str::to_owned)
            .to_vec(),
            known_strings,
        };
        (target, kept, kept_mac)
    });

    let strategy = fuzz::table_cases(ROUTES, &target);
    let started = std::time::Instant::now();
    fuzz::run(CASES, &strategy, |case| {
        runtime.block_on(async {
            let (status, body) = fuzz::send(&keyd.socket, Duration::from_secs(15), case).await?;
            fuzz::check_answer(case, status.as_u16(), &body, false)?;
            fuzz::still_answers("keyd", &keyd.socket, "/key/sas?api-version=2020-09-01").await
        })
    });
    eprintln!("{CASES} cases in {:?}", started.elapsed());

    runtime.block_on(async {
        // Keys stored before the run still work and are unchanged.
        let sas = client.load_key("sas").await.unwrap();
        let mac = client
            .sign(&sas, SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap();
        let mut expected =
            <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&sas_bytes).unwrap();
        hmac::Mac::update(&mut expected, b"m");
        assert_eq!(mac, hmac::Mac::finalize(expected).into_bytes().to_vec());
        client.load_key("kept-before-fuzzing-3f9c").await.unwrap();
        let mac = client
            .sign(&kept, SignMechanism::HmacSha256 { message: b"m" })
            .await
            .unwrap();
        assert_eq!(mac, kept_mac);
        let ec = client.load_key_pair("ec").await.unwrap();
        client
            .sign(&ec, SignMechanism::Ecdsa { digest: &[1; 32] })
            .await
            .unwrap();
    });
}

async fn create(keyd: &Keyd, id: &str) -> (StatusCode, serde_json::Value) {
    let body = serde_json::json!({"keyId": id, "usage": "sign"}).to_string();
    let response = keyd
        .http()
        .send(
            Method::POST,
            "/key?api-version=2020-09-01",
            &[("content-type", "application/json")],
            Bytes::from(body),
        )
        .await
        .unwrap();
    let json = serde_json::from_slice(&response.body).unwrap_or(serde_json::Value::Null);
    (response.status, json)
}

/// A key ID whose file name would be too long for the file system is a 400 naming the limit, on
/// every route that names a key by ID (before: 500 "File name too long"); IDs within the limits
/// work and survive a restart.
#[tokio::test]
async fn key_ids_the_file_store_cannot_hold_are_400_naming_the_limit() {
    let mut keyd = Keyd::start("[aziot_keys]\nhomedir_path = \"{home}\"\n");
    let at_limit = "k".repeat(152);
    let over_limit = "k".repeat(153);
    // 512 bytes, few letters: the file name stays short, so it is a valid ID.
    let long_but_storable = format!("{}ab", "-".repeat(510));

    for id in [&at_limit, &long_but_storable] {
        let (status, body) = create(&keyd, id).await;
        assert_eq!(status, StatusCode::OK, "{id}: {body}");
    }
    for id in [
        over_limit.clone(),
        "x".repeat(300),
        format!("{}/{}", "a".repeat(100), "b".repeat(100)),
    ] {
        let (status, body) = create(&keyd, &id).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{id}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains("keyId") && message.contains("at most 152 ASCII letters and digits"),
            "{message}"
        );
    }
    // The same rule on the other ID routes.
    let encoded = fuzz::percent_encode(&over_limit, false);
    for (method, path, body) in [
        (
            Method::GET,
            format!("/key/{encoded}?api-version=2020-09-01"),
            String::new(),
        ),
        (
            Method::GET,
            format!("/keypair/{encoded}?api-version=2020-09-01"),
            String::new(),
        ),
        (
            Method::POST,
            "/keypair?api-version=2020-09-01".to_owned(),
            serde_json::json!({"keyId": over_limit}).to_string(),
        ),
        (
            Method::POST,
            format!("/keypair/{encoded}?api-version=2020-09-01"),
            serde_json::json!({"from": "x"}).to_string(),
        ),
        (
            Method::POST,
            "/keystore/key".to_owned(),
            serde_json::json!({"keyid": over_limit}).to_string(),
        ),
    ] {
        let response = keyd
            .http()
            .send(
                method.clone(),
                &path,
                &[("content-type", "application/json")],
                Bytes::from(body),
            )
            .await
            .unwrap();
        assert_eq!(response.status, StatusCode::BAD_REQUEST, "{method} {path}");
        assert!(http_common::client::error_message(&response.body).contains("at most 152"));
    }

    keyd.stop();
    keyd.spawn();
    let client = keyd.client();
    for id in [&at_limit, &long_but_storable] {
        client.load_key(id).await.unwrap();
    }
}
