//! `TokenKey` against a real SoftHSM2 token: calls go to an in-token session copy of the token
//! object, the copy keeps the original's protection, a key deleted from the token stops working
//! once the copy's trust runs out, a lost copy is replaced, concurrent calls get one copy per
//! session, and dropping the key destroys its copies. SoftHSM2 is required; without it the test fails.
//!
//! One test function only: SoftHSM2 reads `SOFTHSM2_CONF` once, when the module is initialized,
//! and the module is loaded once per process.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use pkcs11_sys::cryptoki::error::RvError;
use pkcs11_sys::cryptoki::mechanism::Mechanism;
use pkcs11_sys::cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use pkcs11_sys::{Module, Pkcs11Uri, Token, TokenKey, COPY_TRUSTED_FOR};

mod common;

use common::MODULE;

/// A 32-byte HMAC key as keyd makes its own: a private, sensitive, non-extractable token object.
fn hmac_key(token: &Token, label: &str) -> ObjectHandle {
    hmac_key_with(token, label, &[])
}

/// [`hmac_key`] with `extra` attributes.
fn hmac_key_with(token: &Token, label: &str, extra: &[Attribute]) -> ObjectHandle {
    let mut template = vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
        Attribute::Label(label.as_bytes().to_vec()),
        Attribute::Value(vec![label.len() as u8; 32]),
    ];
    template.extend_from_slice(extra);
    token
        .with_session(|session| session.create_object(&template))
        .unwrap()
}

/// The session objects labelled `label` (the copies; token objects excluded).
fn session_objects(token: &Token, label: &str) -> Vec<ObjectHandle> {
    token
        .with_session(|session| {
            session.find_objects(&[
                Attribute::Token(false),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
        })
        .unwrap()
}

/// Signs `m` with `key`, returning the MAC and the object handle the call was given.
fn sign(key: &TokenKey) -> Result<(Vec<u8>, ObjectHandle), pkcs11_sys::Pkcs11Error> {
    let mut used = None;
    let mac = key.with_object(|session, object| {
        used = Some(object);
        session.sign(&Mechanism::Sha256Hmac, object, b"m")
    })?;
    Ok((mac, used.unwrap()))
}

/// The key's one copy (calls from one thread use one pooled session, so one copy).
fn single_copy(key: &TokenKey) -> Option<ObjectHandle> {
    let copies = key.session_copies();
    assert!(copies.len() <= 1, "{copies:?}");
    copies.first().copied()
}

fn wait_out_the_trust() {
    std::thread::sleep(COPY_TRUSTED_FOR + std::time::Duration::from_millis(100));
}

#[test]
fn session_copies_of_token_keys() {
    // Before the module is initialized; no other thread runs yet.
    let _tokens = common::softhsm_tokens(&["copies"]);
    let module = Module::open(std::path::Path::new(MODULE)).unwrap();
    let token = module
        .token(&Pkcs11Uri::parse("pkcs11:token=copies?pin-value=1234").unwrap())
        .unwrap();
    assert!(token.uses_session_copies(), "SoftHSM2 gets session copies");

    // The first call goes to the token object and makes the copy; later ones use the copy,
    // with the same key.
    let object = hmac_key(&token, "first");
    let key = TokenKey::new(Arc::clone(&token), object);
    assert!(key.session_copies().is_empty());
    let (expected, used) = sign(&key).unwrap();
    assert_eq!(used, object);
    let copy = single_copy(&key).expect("a session copy after the first call");
    assert_ne!(copy, object);
    assert_eq!(session_objects(&token, "first"), vec![copy]);
    for _ in 0..3 {
        assert_eq!(sign(&key).unwrap(), (expected.clone(), copy));
    }

    // The copy is as protected as the original: still sensitive, not extractable, and its
    // value cannot be read.
    let attributes = token
        .with_session(|session| {
            session.get_attributes(
                copy,
                &[
                    AttributeType::Token,
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Private,
                ],
            )
        })
        .unwrap();
    for attribute in &attributes {
        match attribute {
            Attribute::Token(value) | Attribute::Extractable(value) => assert!(!value),
            Attribute::Sensitive(value) | Attribute::Private(value) => assert!(value),
            other => panic!("unexpected attribute {other:?}"),
        }
    }
    let value = token.with_session(|session| session.get_attributes(copy, &[AttributeType::Value]));
    assert!(
        !matches!(&value, Ok(attributes) if attributes.iter().any(|a| matches!(a, Attribute::Value(_)))),
        "the copy's value is readable: {value:?}"
    );

    // Once the trust has run out, the next call goes to the token object again.
    wait_out_the_trust();
    assert_eq!(sign(&key).unwrap(), (expected.clone(), object));
    assert_eq!(sign(&key).unwrap(), (expected.clone(), copy));

    // Deleted from the token behind the key's back: within the trust the copy still answers;
    // after it, calls fail as they would without a copy, and the copy is destroyed.
    token
        .with_session(|session| session.destroy_object(object))
        .unwrap();
    wait_out_the_trust();
    let gone = sign(&key).unwrap_err();
    assert!(
        matches!(
            gone.rv(),
            Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid)
        ),
        "{gone}"
    );
    assert!(key.session_copies().is_empty());
    assert!(session_objects(&token, "first").is_empty());
    assert!(sign(&key).is_err(), "no copy comes back for a deleted key");
    drop(key);

    // A copy the token lost is dropped at once (the call still succeeds, on the token object)
    // and replaced on a later call.
    let object = hmac_key(&token, "second");
    let key = TokenKey::new(Arc::clone(&token), object);
    let (expected, _) = sign(&key).unwrap();
    let lost = single_copy(&key).unwrap();
    token
        .with_session(|session| session.destroy_object(lost))
        .unwrap();
    assert_eq!(sign(&key).unwrap(), (expected.clone(), object));
    assert!(key.session_copies().is_empty());
    wait_out_the_trust();
    assert_eq!(sign(&key).unwrap(), (expected.clone(), object));
    let replaced = single_copy(&key).expect("a new copy");
    assert_ne!(replaced, lost);
    assert_eq!(sign(&key).unwrap(), (expected.clone(), replaced));

    // Errors that are not about the object leave the copy in place.
    let refused = key.with_object(|session, object| session.sign(&Mechanism::Ecdsa, object, b"m"));
    assert!(refused.is_err(), "an HMAC key cannot sign ECDSA");
    assert_eq!(key.session_copies(), vec![replaced]);

    // Concurrent calls each get their session's own copy (no two calls share an object), all
    // the same key.
    let key = Arc::new(key);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let key = Arc::clone(&key);
            let expected = expected.clone();
            std::thread::spawn(move || {
                for _ in 0..200 {
                    assert_eq!(sign(&key).unwrap().0, expected);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let copies = key.session_copies();
    assert!(!copies.is_empty() && copies.len() <= token.max_sessions());
    let mut in_token = session_objects(&token, "second");
    in_token.sort_by_key(ObjectHandle::handle);
    let mut sorted = copies.clone();
    sorted.sort_by_key(ObjectHandle::handle);
    assert_eq!(
        in_token, sorted,
        "every copy the token holds is one the key knows"
    );

    // A key the token will not copy (CKA_COPYABLE false) keeps working on the token object,
    // with no copy, before and after the retry interval.
    let uncopyable = hmac_key_with(&token, "third", &[Attribute::Copyable(false)]);
    let stays = TokenKey::new(Arc::clone(&token), uncopyable);
    let (third, _) = sign(&stays).unwrap();
    assert_eq!(sign(&stays).unwrap(), (third.clone(), uncopyable));
    wait_out_the_trust();
    assert_eq!(sign(&stays).unwrap(), (third, uncopyable));
    assert!(stays.session_copies().is_empty());
    assert!(session_objects(&token, "third").is_empty());
    drop(stays);

    // Dropping the key destroys its copies, not the token object.
    let key = Arc::into_inner(key).unwrap();
    drop(key);
    assert!(session_objects(&token, "second").is_empty());
    let still_there = token
        .with_session(|session| {
            session.find_objects(&[Attribute::Token(true), Attribute::Label(b"second".to_vec())])
        })
        .unwrap();
    assert_eq!(still_there, vec![object]);
}
