//! The PKCS#11 limit benchmark: how fast the token itself signs, with no HTTP and no keyd in
//! between, so keyd's HSM figures can be given as a share of it (`tools/bench-keyd.sh`).
//!
//! It generates one HMAC key (`CKK_GENERIC_SECRET`, 32 bytes, `CKM_SHA256_HMAC`) and one EC P-256
//! key pair (`CKM_ECDSA` over a 32-byte digest) as token objects, with the attributes keyd gives
//! its own keys, then signs with each for `SECONDS` on 1 thread and on each thread count given,
//! one logged-in read/write session per thread, and prints one line per run:
//! `<mechanism> <objects> threads=<n> <signatures per second>`. `<objects>` is `token` for the
//! token objects themselves and `copy` for session-object copies of them (`C_CopyObject` with
//! `CKA_TOKEN` false), each thread making its own in its session, which is what keyd signs with
//! on SoftHSM2 (`pkcs11_sys::TokenKey`): SoftHSM2 re-reads a token object's file on every use, a
//! session object's never. The objects are destroyed at the end.
//!
//! Usage: `token_limit MODULE TOKEN-LABEL PIN SECONDS THREADS...`
//! (e.g. `token_limit /usr/lib/softhsm/libsofthsm2.so bench 1234 10 16`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use pkcs11_sys::cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use pkcs11_sys::cryptoki::mechanism::Mechanism;
use pkcs11_sys::cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use pkcs11_sys::cryptoki::session::{Session, UserType};
use pkcs11_sys::cryptoki::slot::Slot;
use pkcs11_sys::cryptoki::types::{AuthPin, Ulong};

/// DER of the P-256 curve OID, as keyd sends it.
const P256_OID_DER: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [module, label, pin, seconds, threads @ ..] = args.as_slice() else {
        return Err(anyhow!(
            "usage: token_limit MODULE TOKEN-LABEL PIN SECONDS THREADS..."
        ));
    };
    let duration = Duration::from_secs(seconds.parse().context("SECONDS")?);
    let mut counts = vec![1_usize];
    for threads in threads {
        counts.push(threads.parse().context("THREADS")?);
    }

    let pkcs11 = Arc::new(Pkcs11::new(module).context("loading the module")?);
    pkcs11.initialize(CInitializeArgs::new(
        CInitializeFlags::OS_LOCKING_OK | CInitializeFlags::LIBRARY_CANT_CREATE_OS_THREADS,
    ))?;
    let slot = pkcs11
        .get_slots_with_token()?
        .into_iter()
        .find(|slot| {
            pkcs11
                .get_token_info(*slot)
                .is_ok_and(|info| info.label() == label)
        })
        .ok_or_else(|| anyhow!("no token labelled {label:?}"))?;
    let pin = AuthPin::new(pin.clone().into());

    let setup = pkcs11.open_rw_session(slot)?;
    setup.login(UserType::User, Some(&pin))?;
    let (hmac, ec_public, ec_private) = generate(&setup)?;

    let message = b"hello world".to_vec();
    let digest = vec![0x5a; 32];
    let runs = [
        ("HMAC-SHA256", Kind::Hmac, hmac, &message),
        ("ECDSA-P256", Kind::Ecdsa, ec_private, &digest),
    ];
    for (name, kind, key, input) in runs {
        for copy in [false, true] {
            let objects = if copy { "copy" } else { "token" };
            for &threads in &counts {
                let rate = run(&pkcs11, slot, threads, duration, kind, (key, copy), input)?;
                println!("{name} {objects} threads={threads} {rate}");
            }
        }
    }

    for object in [hmac, ec_public, ec_private] {
        setup.destroy_object(object)?;
    }
    Ok(())
}

/// The mechanisms measured (a `Mechanism` cannot cross threads, so each thread makes its own).
#[derive(Clone, Copy)]
enum Kind {
    Hmac,
    Ecdsa,
}

impl Kind {
    fn mechanism(self) -> Mechanism<'static> {
        match self {
            Kind::Hmac => Mechanism::Sha256Hmac,
            Kind::Ecdsa => Mechanism::Ecdsa,
        }
    }
}

/// The benchmark's keys, made as keyd makes its own: token, private, sensitive objects.
fn generate(session: &Session) -> anyhow::Result<(ObjectHandle, ObjectHandle, ObjectHandle)> {
    let secret = |label: &str| {
        vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Label(label.as_bytes().to_vec()),
        ]
    };
    let mut hmac_template = secret("token-limit-hmac");
    hmac_template.extend([
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::GENERIC_SECRET),
        Attribute::ValueLen(Ulong::from(32_u64)),
        Attribute::Sign(true),
        Attribute::Verify(true),
    ]);
    let hmac = session.generate_key(&Mechanism::GenericSecretKeyGen, &hmac_template)?;
    let mut private_template = secret("token-limit-ec");
    private_template.extend([
        Attribute::Class(ObjectClass::PRIVATE_KEY),
        Attribute::Id(vec![0x7e; 16]),
        Attribute::Sign(true),
    ]);
    let public_template = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Class(ObjectClass::PUBLIC_KEY),
        Attribute::Label(b"token-limit-ec".to_vec()),
        Attribute::Id(vec![0x7e; 16]),
        Attribute::Verify(true),
        Attribute::EcParams(P256_OID_DER.to_vec()),
    ];
    let (public, private) = session.generate_key_pair(
        &Mechanism::EccKeyPairGen,
        &public_template,
        &private_template,
    )?;
    Ok((hmac, public, private))
}

/// Signs on `threads` threads, each with its own session (and, with `copy`, its own session copy
/// of the key), and returns signatures per second.
fn run(
    pkcs11: &Arc<Pkcs11>,
    slot: Slot,
    threads: usize,
    duration: Duration,
    kind: Kind,
    (key, copy): (ObjectHandle, bool),
    input: &[u8],
) -> anyhow::Result<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let sessions = (0..threads)
        .map(|_| pkcs11.open_rw_session(slot))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = sessions
            .into_iter()
            .map(|session| {
                let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
                scope.spawn(move || -> anyhow::Result<()> {
                    let mechanism = kind.mechanism();
                    let key = if copy {
                        session.copy_object(key, &[Attribute::Token(false)])?
                    } else {
                        key
                    };
                    while !stop.load(Ordering::Relaxed) {
                        session.sign(&mechanism, key, input)?;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    // The session's end would destroy the copy too; this checks it is there.
                    if copy {
                        session.destroy_object(key)?;
                    }
                    Ok(())
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow!("a signing thread panicked"))??;
        }
        Ok(())
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    // Whole signatures per second; the fraction is noise at these rates.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rate = (done.load(Ordering::Relaxed) as f64 / elapsed) as u64;
    Ok(rate)
}
