//! [`TokenKey`]: a key object in a token that callers sign, encrypt and decrypt with, through an
//! in-token session copy where the token makes token objects slow.
//!
//! SoftHSM2 keeps every token object in a file and, on every use, opens, locks and re-reads that
//! file to see whether another process changed it. That file work costs more than the signature
//! itself: on 2 vCPUs an HMAC with a token object takes about three times as long as with a
//! session object. So on SoftHSM2 a `TokenKey` makes session-object copies of its token object
//! (`C_CopyObject` with `CKA_TOKEN` false), one per pooled session that uses it, so that no two
//! concurrent calls share an object (SoftHSM2 locks an object for each attribute it reads, and
//! a shared copy halved the ECDSA rate on two threads in some runs). A copy stays inside the
//! token, keeps the original's `CKA_SENSITIVE`, `CKA_EXTRACTABLE` and usage attributes (a copy
//! cannot loosen them) and lives only as long as the session that made it and this `TokenKey`.
//!
//! The copies are used only while the token object itself answered a call within the last
//! [`COPY_TRUSTED_FOR`]: after that, the next call goes to the token object again, so a key that
//! was deleted or changed in the token (by another process, say) stops being used within that
//! time, just as it would without copies. A copy the token no longer knows (its session was
//! closed) is dropped and the call goes to the token object; a new copy for a session is tried at
//! most once per [`COPY_TRUSTED_FOR`].
//!
//! An object with `CKA_COPYABLE` false gets no copy (the token refuses `C_CopyObject`); its
//! calls keep going to the token object. Other tokens get no copies: a hardware token keeps keys in the device (no file work, and
//! session objects take its scarce memory), and a module whose object handles might be reused
//! after a copy is lost could turn a stale copy handle into another key. SoftHSM2's handles come
//! from one counter that only goes up.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::object::{Attribute, ObjectHandle};
use cryptoki::session::Session;

use crate::{lock, Pkcs11Error, Token};

/// How long a session copy is used after the token object last answered a call.
pub const COPY_TRUSTED_FOR: Duration = Duration::from_secs(1);

/// A key object in `token`; see the module documentation.
pub struct TokenKey {
    token: Arc<Token>,
    object: ObjectHandle,
    state: Mutex<CopyState>,
}

#[derive(Default)]
struct CopyState {
    /// The session copies, by the index of the pooled session that made them.
    copies: Vec<SessionCopy>,
    /// When the token object itself last answered a call.
    verified: Option<Instant>,
}

#[derive(Default, Clone)]
struct SessionCopy {
    /// The copy, while the token knows it.
    object: Option<ObjectHandle>,
    /// When a copy was last made or tried on this session.
    attempted: Option<Instant>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "TokenKey({:?}, object {})",
            self.token,
            self.object.handle()
        )
    }
}

/// Return values that mean the object named in the call is gone.
fn object_gone(error: &CryptokiError) -> bool {
    matches!(
        error,
        CryptokiError::Pkcs11(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid, _)
    )
}

impl TokenKey {
    /// The key whose token object is `object`.
    pub fn new(token: Arc<Token>, object: ObjectHandle) -> Self {
        TokenKey {
            token,
            object,
            state: Mutex::default(),
        }
    }

    /// The token the key is in.
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }

    /// The session copies calls can go to now (for tests and diagnostics).
    pub fn session_copies(&self) -> Vec<ObjectHandle> {
        lock(&self.state)
            .copies
            .iter()
            .filter_map(|copy| copy.object)
            .collect()
    }

    /// Runs `call` on a pooled session with the object to use: that session's copy while the
    /// copies are trusted, else the token object (see [`Token::with_session`] for the pool's
    /// rules).
    pub fn with_object<T>(
        &self,
        mut call: impl FnMut(&Session, ObjectHandle) -> Result<T, CryptokiError>,
    ) -> Result<T, Pkcs11Error> {
        if !self.token.session_copies {
            return self
                .token
                .with_session(|session| call(session, self.object));
        }
        let answer = self.token.with_indexed_session(|session, index| {
            let now = Instant::now();
            if let Some(copy) = self.trusted_copy(index, now) {
                match call(session, copy) {
                    Err(error) if object_gone(&error) => self.lost(index, copy),
                    answer => return answer,
                }
            }
            let answer = call(session, self.object)?;
            if self.verified(index, now) {
                self.copy_on(session, index);
            }
            Ok(answer)
        });
        if let Err(Pkcs11Error::Call(error)) = &answer {
            if object_gone(error) {
                self.forget_copies();
            }
        }
        answer
    }

    /// Session `index`'s copy, if it has one and the copies are trusted at `now`.
    fn trusted_copy(&self, index: usize, now: Instant) -> Option<ObjectHandle> {
        let state = lock(&self.state);
        let trusted = state
            .verified
            .is_some_and(|verified| now.duration_since(verified) < COPY_TRUSTED_FOR);
        state
            .copies
            .get(index)
            .and_then(|copy| copy.object)
            .filter(|_| trusted)
    }

    /// Records that the token object answered at `now`; says whether to make a copy on session
    /// `index` (it has none, and none was tried within [`COPY_TRUSTED_FOR`]).
    fn verified(&self, index: usize, now: Instant) -> bool {
        let mut state = lock(&self.state);
        state.verified = Some(now);
        if state.copies.len() <= index {
            state.copies.resize(index + 1, SessionCopy::default());
        }
        let slot = &mut state.copies[index];
        let recent = slot
            .attempted
            .is_some_and(|attempted| now.duration_since(attempted) < COPY_TRUSTED_FOR);
        let copy = slot.object.is_none() && !recent;
        if copy {
            slot.attempted = Some(now);
        }
        copy
    }

    /// Makes this session's copy. A token may refuse (`CKA_COPYABLE` false on the object): calls
    /// then keep going to the token object.
    fn copy_on(&self, session: &Session, index: usize) {
        match session.copy_object(self.object, &[Attribute::Token(false)]) {
            Ok(copy) => {
                let replaced = {
                    let mut state = lock(&self.state);
                    state.copies[index].object.replace(copy)
                };
                if let Some(old) = replaced {
                    destroy(session, old);
                }
            }
            Err(error) => log::debug!(
                "PKCS#11 token {:?}: no session copy of object {}: {}",
                self.token.label,
                self.object.handle(),
                crate::describe(&error)
            ),
        }
    }

    /// Forgets session `index`'s copy, which the token no longer knows.
    fn lost(&self, index: usize, copy: ObjectHandle) {
        log::debug!(
            "PKCS#11 token {:?}: a session copy of object {} is gone",
            self.token.label,
            self.object.handle()
        );
        let mut state = lock(&self.state);
        if let Some(slot) = state.copies.get_mut(index) {
            if slot.object == Some(copy) {
                slot.object = None;
            }
        }
    }

    /// Destroys every copy (the token object is gone, or this key is dropped).
    fn forget_copies(&self) {
        let copies: Vec<ObjectHandle> = {
            let mut state = lock(&self.state);
            state
                .copies
                .iter_mut()
                .filter_map(|copy| copy.object.take())
                .collect()
        };
        if copies.is_empty() {
            return;
        }
        let destroyed = self.token.with_session(|session| {
            for &copy in &copies {
                destroy(session, copy);
            }
            Ok(())
        });
        if let Err(error) = destroyed {
            log::debug!(
                "PKCS#11 token {:?}: destroying session copies: {error}",
                self.token.label
            );
        }
    }
}

/// Destroys a copy; one already gone (its session closed) is the usual reason for an error, and
/// the token frees a copy anyway when its session closes.
fn destroy(session: &Session, copy: ObjectHandle) {
    if let Err(error) = session.destroy_object(copy) {
        log::debug!("destroying a session copy: {}", crate::describe(&error));
    }
}

impl Drop for TokenKey {
    fn drop(&mut self) {
        self.forget_copies();
    }
}
