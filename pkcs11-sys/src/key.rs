//! [`TokenKey`]: a key object in a token that callers sign, encrypt and decrypt with, through an
//! in-token session copy where the token makes token objects slow.
//!
//! SoftHSM2 keeps every token object in a file and, on every use, opens, locks and re-reads that
//! file to see whether another process changed it. That file work costs more than the signature
//! itself: on 2 vCPUs an HMAC with a token object takes about three times as long as with a
//! session object. So on SoftHSM2 a `TokenKey` makes a session-object copy of its token object
//! (`C_CopyObject` with `CKA_TOKEN` false). The copy stays inside the token, keeps the original's
//! `CKA_SENSITIVE`, `CKA_EXTRACTABLE` and usage attributes (a copy cannot loosen them) and lives
//! only as long as the session that made it and this `TokenKey`.
//!
//! The copy is used only while the token object itself answered a call within the last
//! [`COPY_TRUSTED_FOR`]: after that, the next call goes to the token object again, so a key that
//! was deleted or changed in the token (by another process, say) stops being used within that
//! time, just as it would without the copy. A copy the token no longer knows (its session was
//! closed) is dropped and the call goes to the token object; a new copy is tried at most once per
//! [`COPY_TRUSTED_FOR`].
//!
//! Other tokens get no copies: a hardware token keeps keys in the device (no file work, and
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
    /// The session copy, while the token knows it.
    copy: Option<ObjectHandle>,
    /// When the token object itself last answered a call.
    verified: Option<Instant>,
    /// When a copy was last made or tried.
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
fn object_gone(error: &Pkcs11Error) -> bool {
    matches!(
        error.rv(),
        Some(RvError::ObjectHandleInvalid | RvError::KeyHandleInvalid)
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

    /// The token object.
    pub fn object(&self) -> ObjectHandle {
        self.object
    }

    /// The session copy calls go to now, if any (for tests and diagnostics).
    pub fn session_copy(&self) -> Option<ObjectHandle> {
        lock(&self.state).copy
    }

    /// Runs `call` on a pooled session with the object to use: the session copy while it is
    /// trusted, else the token object (see [`Token::with_session`] for the pool's rules).
    pub fn with_object<T>(
        &self,
        mut call: impl FnMut(&Session, ObjectHandle) -> Result<T, CryptokiError>,
    ) -> Result<T, Pkcs11Error> {
        if !self.token.session_copies {
            return self
                .token
                .with_session(|session| call(session, self.object));
        }
        let now = Instant::now();
        let trusted = {
            let state = lock(&self.state);
            state.copy.filter(|_| {
                state
                    .verified
                    .is_some_and(|verified| now.duration_since(verified) < COPY_TRUSTED_FOR)
            })
        };
        if let Some(copy) = trusted {
            match self.token.with_session(|session| call(session, copy)) {
                Err(error) if object_gone(&error) => {
                    log::debug!(
                        "PKCS#11 token {:?}: the session copy of object {} is gone",
                        self.token.label,
                        self.object.handle()
                    );
                    let mut state = lock(&self.state);
                    if state.copy == Some(copy) {
                        state.copy = None;
                    }
                }
                answer => return answer,
            }
        }
        let answer = self
            .token
            .with_session(|session| call(session, self.object));
        match &answer {
            Ok(_) => self.verified(now),
            Err(error) if object_gone(error) => self.forget_copy(),
            Err(_) => {}
        }
        answer
    }

    /// Records that the token object answered at `now`, and makes a copy if there is none and
    /// none was tried within [`COPY_TRUSTED_FOR`].
    fn verified(&self, now: Instant) {
        {
            let mut state = lock(&self.state);
            state.verified = Some(now);
            let recent = state
                .attempted
                .is_some_and(|attempted| now.duration_since(attempted) < COPY_TRUSTED_FOR);
            if state.copy.is_some() || recent {
                return;
            }
            state.attempted = Some(now);
        }
        let made = self
            .token
            .with_session(|session| session.copy_object(self.object, &[Attribute::Token(false)]));
        match made {
            Ok(copy) => {
                let mut state = lock(&self.state);
                if state.copy.is_none() {
                    state.copy = Some(copy);
                    return;
                }
                drop(state);
                self.destroy(copy);
            }
            Err(error) => log::debug!(
                "PKCS#11 token {:?}: no session copy of object {}: {error}",
                self.token.label,
                self.object.handle()
            ),
        }
    }

    fn forget_copy(&self) {
        let copy = lock(&self.state).copy.take();
        if let Some(copy) = copy {
            self.destroy(copy);
        }
    }

    fn destroy(&self, copy: ObjectHandle) {
        if let Err(error) = self
            .token
            .with_session(|session| session.destroy_object(copy))
        {
            // Gone already (its session closed) is the usual reason; the token frees it anyway
            // when the session closes.
            log::debug!(
                "PKCS#11 token {:?}: destroying a session copy: {error}",
                self.token.label
            );
        }
    }
}

impl Drop for TokenKey {
    fn drop(&mut self) {
        self.forget_copy();
    }
}
