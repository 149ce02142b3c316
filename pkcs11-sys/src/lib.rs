//! The project's access to PKCS#11 tokens, on top of the `cryptoki` bindings.
//!
//! - [`Module::open`] loads a PKCS#11 module (`dlopen` + `C_Initialize` with OS locking) once
//!   per process and path.
//! - [`Pkcs11Uri`] parses the RFC 7512 URIs that name a token, an object and a PIN.
//! - [`Module::token`] selects the slot (`slot-id` wins over `token`; uninitialized tokens are
//!   skipped), logs in once (`CKR_USER_ALREADY_LOGGED_IN` counts as success) and returns a shared
//!   [`Token`] per slot.
//! - [`Token::with_session`] runs token calls on a pooled read/write session: one caller at a time
//!   per session, sessions reused, at most [`Token::max_sessions`] open. Callers block while all
//!   sessions are busy, so this must be used from blocking threads, never an async executor.
//! - [`TokenKey`] is a key object to call with: on SoftHSM2 through session copies of the token
//!   object (one per pooled session, [`Token::with_indexed_session`]), re-checked against the
//!   token object every [`COPY_TRUSTED_FOR`].
//!
//! Nothing here knows about keyd's key handles or HTTP. PINs are kept as zeroize-on-drop secrets
//! and never appear in errors, logs or `Debug` output.

mod key;
pub mod uri;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

pub use cryptoki;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CryptokiError, RvError};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

pub use key::{TokenKey, COPY_TRUSTED_FOR};
pub use uri::{PinSource, Pkcs11Uri, UriError};

/// Why a PKCS#11 step failed. Messages name the module path, slot and token label, never a PIN.
#[derive(Debug, thiserror::Error)]
pub enum Pkcs11Error {
    /// The module could not be loaded (wrong path, not a PKCS#11 library).
    #[error("cannot load the PKCS#11 module {path}: {reason}")]
    Load {
        /// The module path.
        path: PathBuf,
        /// What the loader said.
        reason: String,
    },
    /// `C_Initialize` failed.
    #[error("cannot initialize the PKCS#11 module {path}: {}", describe(.source))]
    Initialize {
        /// The module path.
        path: PathBuf,
        /// The call's error.
        source: CryptokiError,
    },
    /// The URI is malformed or its PIN file unreadable.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// `slot-id` names no slot.
    #[error("no PKCS#11 slot has ID {id} (slots with an initialized token: {available})")]
    NoSuchSlot {
        /// The requested slot ID.
        id: u64,
        /// What exists, for the operator.
        available: String,
    },
    /// The slot exists but holds no token, or an uninitialized one.
    #[error("PKCS#11 slot {id} has no initialized token")]
    SlotWithoutToken {
        /// The slot ID.
        id: u64,
    },
    /// `token` names no initialized token.
    #[error(
        "no initialized PKCS#11 token is labelled {label:?} (initialized tokens: {available})"
    )]
    NoSuchToken {
        /// The requested label.
        label: String,
        /// What exists, for the operator.
        available: String,
    },
    /// Neither `slot-id` nor `token` was given and there is no initialized token at all.
    #[error("the PKCS#11 module has no initialized token")]
    NoToken,
    /// `C_Login` refused the PIN.
    #[error("the PKCS#11 token {label:?} in slot {slot} rejected the PIN ({rv:?})")]
    PinRejected {
        /// The token label.
        label: String,
        /// The slot ID.
        slot: u64,
        /// The return value (`PinIncorrect`, `PinLocked`, ...).
        rv: RvError,
    },
    /// A token call failed.
    #[error("{}", describe(.0))]
    Call(CryptokiError),
}

impl Pkcs11Error {
    /// The PKCS#11 return value, when the error is a failed token call.
    pub fn rv(&self) -> Option<RvError> {
        match self {
            Pkcs11Error::Call(CryptokiError::Pkcs11(rv, _))
            | Pkcs11Error::Initialize {
                source: CryptokiError::Pkcs11(rv, _),
                ..
            } => Some(*rv),
            Pkcs11Error::PinRejected { rv, .. } => Some(*rv),
            _ => None,
        }
    }
}

impl From<CryptokiError> for Pkcs11Error {
    fn from(error: CryptokiError) -> Self {
        Pkcs11Error::Call(error)
    }
}

/// A short description of a cryptoki error: the function and the `CKR_` name, not the
/// specification's paragraph.
pub fn describe(error: &CryptokiError) -> String {
    match error {
        CryptokiError::Pkcs11(rv, function) => format!("C_{function:?} failed with {rv:?}"),
        other => other.to_string(),
    }
}

/// A loaded, initialized PKCS#11 module.
pub struct Module {
    path: PathBuf,
    pkcs11: Pkcs11,
    tokens: Mutex<HashMap<u64, Arc<Token>>>,
}

impl std::fmt::Debug for Module {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "Module({})", self.path.display())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();

impl Module {
    /// Loads and initializes the module at `path`, or returns the one this process already
    /// loaded from that path.
    pub fn open(path: &Path) -> Result<Arc<Module>, Pkcs11Error> {
        let mut modules = lock(MODULES.get_or_init(Mutex::default));
        if let Some(module) = modules.get(path) {
            return Ok(Arc::clone(module));
        }
        if !path.is_file() {
            return Err(Pkcs11Error::Load {
                path: path.to_owned(),
                reason: "no such file".to_owned(),
            });
        }
        let pkcs11 = Pkcs11::new(path).map_err(|error| Pkcs11Error::Load {
            path: path.to_owned(),
            reason: match error {
                CryptokiError::LibraryLoading(error) => error.to_string(),
                other => describe(&other),
            },
        })?;
        let flags =
            CInitializeFlags::OS_LOCKING_OK | CInitializeFlags::LIBRARY_CANT_CREATE_OS_THREADS;
        match pkcs11.initialize(CInitializeArgs::new(flags)) {
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(source) => {
                return Err(Pkcs11Error::Initialize {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        log::info!("loaded PKCS#11 module {}", path.display());
        let module = Arc::new(Module {
            path: path.to_owned(),
            pkcs11,
            tokens: Mutex::default(),
        });
        modules.insert(path.to_owned(), Arc::clone(&module));
        Ok(module)
    }

    /// The module's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The token `uri` selects, logged in with the URI's PIN (if any). Tokens are shared per
    /// slot: every URI naming the same slot gets the same session pool.
    pub fn token(&self, uri: &Pkcs11Uri) -> Result<Arc<Token>, Pkcs11Error> {
        let (slot, label) = self.select_slot(uri)?;
        let pin = uri.pin.as_ref().map(PinSource::resolve).transpose()?;
        let token = {
            let mut tokens = lock(&self.tokens);
            Arc::clone(
                tokens
                    .entry(slot.id())
                    .or_insert_with(|| Arc::new(Token::new(self.pkcs11.clone(), slot, label))),
            )
        };
        if let Some(pin) = pin {
            token.offer_pin(pin);
        }
        // Open (and log in) one session now, so a wrong PIN is reported at once.
        token.with_session(|_| Ok(()))?;
        Ok(token)
    }

    fn initialized_tokens(&self) -> Result<Vec<(Slot, String)>, Pkcs11Error> {
        let mut found = Vec::new();
        for slot in self.pkcs11.get_slots_with_token()? {
            match self.pkcs11.get_token_info(slot) {
                Ok(info) if info.token_initialized() => found.push((slot, info.label().to_owned())),
                Ok(_) => {}
                Err(error) => log::debug!("slot {}: {}", slot.id(), describe(&error)),
            }
        }
        Ok(found)
    }

    fn select_slot(&self, uri: &Pkcs11Uri) -> Result<(Slot, String), Pkcs11Error> {
        let tokens = self.initialized_tokens()?;
        let available = || {
            if tokens.is_empty() {
                return "none".to_owned();
            }
            tokens
                .iter()
                .map(|(slot, label)| format!("slot {} {label:?}", slot.id()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(id) = uri.slot_id {
            if let Some((slot, label)) = tokens.iter().find(|(slot, _)| slot.id() == id) {
                return Ok((*slot, label.clone()));
            }
            let exists = self
                .pkcs11
                .get_all_slots()?
                .iter()
                .any(|slot| slot.id() == id);
            return Err(if exists {
                Pkcs11Error::SlotWithoutToken { id }
            } else {
                Pkcs11Error::NoSuchSlot {
                    id,
                    available: available(),
                }
            });
        }
        if let Some(wanted) = &uri.token {
            return tokens
                .iter()
                .find(|(_, label)| label == wanted)
                .cloned()
                .ok_or_else(|| Pkcs11Error::NoSuchToken {
                    label: wanted.clone(),
                    available: available(),
                });
        }
        let first = tokens.first().cloned().ok_or(Pkcs11Error::NoToken)?;
        log::info!(
            "no slot-id or token in the PKCS#11 URI; using slot {} {:?}",
            first.0.id(),
            first.1
        );
        Ok(first)
    }
}

/// One token (slot) with its login state and session pool.
pub struct Token {
    pkcs11: Pkcs11,
    slot: Slot,
    label: String,
    pin: Mutex<Option<AuthPin>>,
    logged_in: AtomicBool,
    pool: Mutex<PoolState>,
    returned: Condvar,
    max_sessions: usize,
    software: bool,
    /// Whether [`TokenKey`]s use session copies of their token objects (SoftHSM2 only).
    session_copies: bool,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "Token(slot {}, {:?}, up to {} sessions)",
            self.slot.id(),
            self.label,
            self.max_sessions
        )
    }
}

#[derive(Default)]
struct PoolState {
    /// Idle sessions with their index.
    idle: Vec<(Session, usize)>,
    /// Indexes of closed sessions, for the next sessions opened.
    free_indexes: Vec<usize>,
    open: usize,
    /// Callers waiting for a session: a release wakes one only when there is one (std's
    /// `notify_one` is a system call even with nobody waiting).
    waiting: usize,
}

/// The default session pool size: twice the CPU count, at least 8.
fn default_pool_size() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    (2 * cores).clamp(8, 64)
}

/// Return values after which a session is not used again.
fn session_is_dead(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::OperationActive
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::DeviceError
    )
}

impl Token {
    fn new(pkcs11: Pkcs11, slot: Slot, label: String) -> Token {
        let mut max_sessions = default_pool_size();
        if let Ok(info) = pkcs11.get_token_info(slot) {
            let limit: Option<u64> = info.max_rw_session_count().into();
            if let Some(limit) = limit.and_then(|limit| usize::try_from(limit).ok()) {
                if limit > 0 {
                    max_sessions = max_sessions.min(limit);
                }
            }
        }
        // CKF_HW_SLOT clear: "a software slot implementing a soft token" (PKCS#11 2.40 §3.2).
        let software = pkcs11
            .get_slot_info(slot)
            .is_ok_and(|info| !info.hardware_slot());
        // SoftHSM2 re-reads a token object's file on every use, and never reuses an object
        // handle: the module `key` explains why that makes session copies both worth it and safe.
        let session_copies = software
            && pkcs11
                .get_library_info()
                .is_ok_and(|info| info.manufacturer_id().starts_with("SoftHSM"));
        log::info!(
            "PKCS#11 token {label:?} in slot {}: up to {max_sessions} sessions, {} slot{}",
            slot.id(),
            if software { "software" } else { "hardware" },
            if session_copies {
                ", keys used through session copies"
            } else {
                ""
            }
        );
        Token {
            pkcs11,
            slot,
            label,
            pin: Mutex::new(None),
            logged_in: AtomicBool::new(false),
            pool: Mutex::default(),
            returned: Condvar::new(),
            max_sessions,
            software,
            session_copies,
        }
    }

    /// The slot ID.
    pub fn slot_id(&self) -> u64 {
        self.slot.id()
    }

    /// Whether the slot is a software slot (`CKF_HW_SLOT` clear): the module does its work in
    /// this process, like keyd's own file store, rather than in a device.
    pub fn is_software(&self) -> bool {
        self.software
    }

    /// Whether [`TokenKey`]s in this token use session copies of their token objects.
    pub fn uses_session_copies(&self) -> bool {
        self.session_copies
    }

    /// The token label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// How many sessions the pool may open.
    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// How many sessions the pool has open right now (busy or idle).
    pub fn open_sessions(&self) -> usize {
        lock(&self.pool).open
    }

    /// Offers a PIN from a URI: used unless the token is already logged in.
    fn offer_pin(&self, pin: AuthPin) {
        if !self.logged_in.load(Ordering::Acquire) {
            *lock(&self.pin) = Some(pin);
        }
    }

    /// Logs the user in through `session` (once per token; already logged in is success).
    fn login(&self, session: &Session) -> Result<(), Pkcs11Error> {
        let mut pin_guard = lock(&self.pin);
        let Some(pin) = pin_guard.as_ref() else {
            return Ok(());
        };
        // The login state belongs to the application, not the session: skip the call when a
        // session already sees it.
        if let Ok(info) = session.get_session_info() {
            if matches!(
                info.session_state(),
                SessionState::RwUser | SessionState::RoUser
            ) {
                self.logged_in.store(true, Ordering::Release);
                return Ok(());
            }
        }
        match session.login(UserType::User, Some(pin)) {
            Ok(()) | Err(CryptokiError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {
                self.logged_in.store(true, Ordering::Release);
                Ok(())
            }
            Err(CryptokiError::Pkcs11(
                rv @ (RvError::PinIncorrect
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::PinLocked
                | RvError::PinExpired),
                Function::Login,
            )) => {
                // Forget a rejected PIN so it is not tried again (and a later URI may bring
                // the right one).
                *pin_guard = None;
                Err(Pkcs11Error::PinRejected {
                    label: self.label.clone(),
                    slot: self.slot.id(),
                    rv,
                })
            }
            Err(error) => Err(Pkcs11Error::Call(error)),
        }
    }

    fn open_session(&self) -> Result<Session, Pkcs11Error> {
        let session = self.pkcs11.open_rw_session(self.slot)?;
        if !self.logged_in.load(Ordering::Acquire) {
            self.login(&session)?;
        }
        Ok(session)
    }

    fn acquire(&self) -> Result<PooledSession<'_>, Pkcs11Error> {
        let mut state = lock(&self.pool);
        loop {
            if let Some((session, index)) = state.idle.pop() {
                return Ok(PooledSession {
                    token: self,
                    session: Some(session),
                    index,
                    dead: false,
                });
            }
            if state.open < self.max_sessions {
                let index = state.free_indexes.pop().unwrap_or(state.open);
                state.open += 1;
                drop(state);
                return match self.open_session() {
                    Ok(session) => Ok(PooledSession {
                        token: self,
                        session: Some(session),
                        index,
                        dead: false,
                    }),
                    Err(error) => {
                        let mut state = lock(&self.pool);
                        state.open -= 1;
                        state.free_indexes.push(index);
                        if state.waiting > 0 {
                            self.returned.notify_one();
                        }
                        Err(error)
                    }
                };
            }
            state.waiting += 1;
            state = self
                .returned
                .wait(state)
                .unwrap_or_else(|poison| poison.into_inner());
            state.waiting -= 1;
        }
    }

    fn release(&self, session: Session, index: usize, dead: bool) {
        let mut state = lock(&self.pool);
        let closing = if dead {
            state.open -= 1;
            state.free_indexes.push(index);
            Some(session)
        } else {
            state.idle.push((session, index));
            None
        };
        let wake = state.waiting > 0;
        drop(state);
        // A dead session is closed outside the lock.
        drop(closing);
        if wake {
            self.returned.notify_one();
        }
    }

    /// Runs `call` on a pooled, logged-in session; the session is used by nobody else meanwhile.
    ///
    /// Blocks while every session is busy. A session the token has closed is discarded and the
    /// call retried once on another; a lost login is restored and the call retried once.
    pub fn with_session<T>(
        &self,
        mut call: impl FnMut(&Session) -> Result<T, CryptokiError>,
    ) -> Result<T, Pkcs11Error> {
        self.with_indexed_session(|session, _| call(session))
    }

    /// [`Token::with_session`], also telling `call` which of the pool's sessions it runs on: an
    /// index below [`Token::max_sessions`], the same for as long as that session stays open
    /// (a later session may get the index of a closed one).
    pub fn with_indexed_session<T>(
        &self,
        mut call: impl FnMut(&Session, usize) -> Result<T, CryptokiError>,
    ) -> Result<T, Pkcs11Error> {
        let mut retried = false;
        loop {
            let mut pooled = self.acquire()?;
            let Some(session) = pooled.session.as_ref() else {
                return Err(Pkcs11Error::Call(CryptokiError::InvalidValue));
            };
            let error = match call(session, pooled.index) {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            match &error {
                CryptokiError::Pkcs11(rv, _) if session_is_dead(*rv) => {
                    log::warn!(
                        "PKCS#11 token {:?}: discarding a session ({rv:?})",
                        self.label
                    );
                    pooled.dead = true;
                    let retry =
                        matches!(rv, RvError::SessionHandleInvalid | RvError::SessionClosed);
                    if retry && !retried {
                        retried = true;
                        continue;
                    }
                }
                CryptokiError::Pkcs11(RvError::UserNotLoggedIn, _) if !retried => {
                    self.logged_in.store(false, Ordering::Release);
                    self.login(session)?;
                    retried = true;
                    continue;
                }
                _ => {}
            }
            return Err(Pkcs11Error::Call(error));
        }
    }
}

/// A session taken from the pool; goes back (or is closed, when dead) on drop.
struct PooledSession<'a> {
    token: &'a Token,
    session: Option<Session>,
    /// Its index in the pool.
    index: usize,
    dead: bool,
}

impl Drop for PooledSession<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.token.release(session, self.index, self.dead);
        }
    }
}
