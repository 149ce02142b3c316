//! pkcs11-sys against a real SoftHSM2 token: slot selection, PIN handling and the session pool
//! under concurrent use. SoftHSM2 is required; without it the test fails.
//!
//! One test function only: SoftHSM2 reads `SOFTHSM2_CONF` once, when the module is initialized,
//! and the module is loaded once per process.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use pkcs11_sys::cryptoki::mechanism::Mechanism;
use pkcs11_sys::cryptoki::object::{Attribute, KeyType, ObjectClass};
use pkcs11_sys::{Module, Pkcs11Error, Pkcs11Uri};

mod common;

use common::MODULE;

#[test]
fn tokens_pins_and_the_session_pool() {
    // Before the module is initialized; no other thread runs yet.
    let _tokens = common::softhsm_tokens(&["first", "second"]);

    let error = Module::open(std::path::Path::new("/nonexistent/module.so")).unwrap_err();
    assert!(
        error.to_string().contains("/nonexistent/module.so"),
        "{error}"
    );

    let module = Module::open(std::path::Path::new(MODULE)).unwrap();
    assert!(Arc::ptr_eq(
        &module,
        &Module::open(std::path::Path::new(MODULE)).unwrap()
    ));

    let parse = |text: &str| Pkcs11Uri::parse(text).unwrap();
    let message = |result: Result<_, Pkcs11Error>| result.map(drop).unwrap_err().to_string();
    let missing = message(module.token(&parse("pkcs11:token=missing")));
    assert!(missing.contains("\"missing\""), "{missing}");
    assert!(
        missing.contains("\"first\""),
        "lists what exists: {missing}"
    );
    assert!(message(module.token(&parse("pkcs11:slot-id=987654"))).contains("987654"));

    // A wrong PIN is reported (without the PIN) and forgotten; the right one then works.
    let wrong = message(module.token(&parse("pkcs11:token=second?pin-value=24680")));
    assert!(wrong.contains("rejected the PIN"), "{wrong}");
    assert!(!wrong.contains("24680"), "{wrong}");
    let token = module
        .token(&parse("pkcs11:token=second?pin-value=1234"))
        .unwrap();
    assert_eq!(token.label(), "second");
    // slot-id wins over token, and the same slot gives the same token (one pool, one login).
    let by_slot = module
        .token(&parse(&format!(
            "pkcs11:slot-id={};token=first",
            token.slot_id()
        )))
        .unwrap();
    assert!(Arc::ptr_eq(&token, &by_slot));

    // A private object needs the login; then many threads share the pool.
    let key = token
        .with_session(|session| {
            session.create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sign(true),
                Attribute::Value(vec![7; 32]),
            ])
        })
        .unwrap();
    let expected = token
        .with_session(|session| session.sign(&Mechanism::Sha256Hmac, key, b"m"))
        .unwrap();
    // Serial calls reuse one session rather than opening one each.
    assert_eq!(token.open_sessions(), 1);
    // SoftHSM2's slots are software slots (CKF_HW_SLOT clear): keyd uses them inline.
    assert!(token.is_software());
    let threads: Vec<_> = (0..32)
        .map(|_| {
            let token = Arc::clone(&token);
            let expected = expected.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    let mac = token
                        .with_session(|session| session.sign(&Mechanism::Sha256Hmac, key, b"m"))
                        .unwrap();
                    assert_eq!(mac, expected);
                    assert!(token.open_sessions() <= token.max_sessions());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert!(token.open_sessions() >= 1);
    assert!(token.open_sessions() <= token.max_sessions());
}
