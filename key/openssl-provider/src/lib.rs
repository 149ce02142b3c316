//! `keyd.so`, an OpenSSL 3 provider whose private keys stay in keyd.
//!
//! Any OpenSSL 3 program that loads it (`-provider keyd`, or `openssl.cnf`) can open a key pair
//! by the URI `keyd:<key-id>` or `keyd:?handle=<handle>` ([`store`]), gets a key whose only
//! material is the public half ([`keymgmt`]), and signs with it: ECDSA P-256, RSA PKCS#1 v1.5
//! and RSA-PSS, each signature made by keyd over its Unix socket with the caller's own uid
//! ([`signature`]), so keyd's `[[principal]]` rules apply unchanged.
//!
//! What this crate must not do:
//! - link OpenSSL: the host program's libcrypto is the only one in the process; we declare the
//!   few C types we need ([`ffi`]) and talk to the core only through its upcalls;
//! - let a panic cross into C: every `extern "C"` entry point runs inside [`guard`];
//! - hold or export private key bytes: there are none here, only handles and public values.
//!
//! Errors go to OpenSSL's error queue through `core_new_error`, `core_set_error_debug` and
//! `core_vset_error`, with a message naming the cause (keyd's refusal, an unknown key, a bad
//! URI).

pub mod error;
pub mod ffi;
pub mod keyd;
pub mod keymgmt;
pub mod params;
pub mod signature;
pub mod store;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, LazyLock, OnceLock};

use error::ProviderError;
use ffi::{
    CoreGetParams, CoreNewError, CoreSetErrorDebug, CoreVsetError, OsslAlgorithm, OsslDispatch,
    OsslItem, OsslParam,
};

/// The endpoint used when neither `AZIOT_KEYD_URI` nor the `keyd_uri` config parameter is set.
pub const DEFAULT_KEYD_URI: &str = "unix:///run/aziot/keyd.sock";
/// The environment variable naming keyd's endpoint; it wins over `openssl.cnf`.
pub const KEYD_URI_VARIABLE: &str = "AZIOT_KEYD_URI";

/// One loaded instance of the provider (one per library context that loads it).
#[derive(Debug)]
pub struct Provider {
    handle: CoreHandle,
    new_error: Option<CoreNewError>,
    set_error_debug: Option<CoreSetErrorDebug>,
    vset_error: Option<CoreVsetError>,
    keyd_uri: String,
    keyd: OnceLock<Result<keyd::Keyd, String>>,
}

/// The core's opaque handle for this provider instance.
#[derive(Debug, Clone, Copy)]
struct CoreHandle(*const c_void);

// SAFETY: the handle is an opaque token the core accepts from any thread; we never dereference it.
unsafe impl Send for CoreHandle {}
// SAFETY: as above.
unsafe impl Sync for CoreHandle {}

impl Provider {
    /// The keyd endpoint this instance uses.
    pub fn keyd_uri(&self) -> &str {
        &self.keyd_uri
    }

    /// The keyd client thread, started on first use.
    pub fn keyd(&self) -> Result<&keyd::Keyd, ProviderError> {
        self.keyd
            .get_or_init(|| keyd::Keyd::start(&self.keyd_uri).map_err(|error| error.to_string()))
            .as_ref()
            .map_err(|error| ProviderError::Endpoint(error.clone()))
    }

    /// Puts `error` on OpenSSL's error queue, naming `function`.
    pub fn report(&self, error: &ProviderError, function: &CStr) {
        let (Some(new_error), Some(vset_error)) = (self.new_error, self.vset_error) else {
            return;
        };
        let message = CString::new(error.to_string().replace('\0', " "))
            .unwrap_or_else(|_| c"keyd provider error".to_owned());
        // SAFETY: the upcalls and the handle come from the core for this provider instance and
        // stay valid until teardown; the strings are NUL-terminated and outlive the calls.
        unsafe {
            new_error(self.handle.0);
            if let Some(set_error_debug) = self.set_error_debug {
                set_error_debug(
                    self.handle.0,
                    c"key/openssl-provider".as_ptr(),
                    0,
                    function.as_ptr(),
                );
            }
            ffi::keyd_provider_vset_error(
                vset_error,
                self.handle.0,
                error.reason(),
                message.as_ptr(),
            );
        }
    }
}

/// The provider behind a `provctx` pointer, as a new reference.
///
/// # Safety
/// `provctx` is null or the pointer `OSSL_provider_init` returned, and teardown has not run.
pub unsafe fn provider_from(provctx: *mut c_void) -> Option<Arc<Provider>> {
    if provctx.is_null() {
        return None;
    }
    let provider = provctx.cast_const().cast::<Provider>();
    // SAFETY: `provctx` came from `Arc::into_raw` in `OSSL_provider_init` and that reference
    // is alive until teardown, so adding one and taking it is sound.
    unsafe {
        Arc::increment_strong_count(provider);
        Some(Arc::from_raw(provider))
    }
}

/// Runs an entry point's `body`, turning a panic into `failure` (and an error on the queue
/// when `provider` is known): no panic crosses into C.
pub fn guard<T>(
    provider: Option<&Provider>,
    function: &CStr,
    failure: T,
    body: impl FnOnce() -> T,
) -> T {
    match std::panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(_) => {
            if let Some(provider) = provider {
                provider.report(
                    &ProviderError::Internal("a panic was caught".into()),
                    function,
                );
            }
            failure
        }
    }
}

/// A static table the core reads from any thread.
#[derive(Debug)]
pub struct Table<T>(pub Vec<T>);

// SAFETY: the tables hold only function pointers and pointers to 'static strings and tables;
// they are built once and never changed.
unsafe impl<T> Sync for Table<T> {}
// SAFETY: as above.
unsafe impl<T> Send for Table<T> {}

/// A dispatch entry for function number `$id`.
#[macro_export]
macro_rules! function {
    ($id:expr, $function:expr) => {{
        let address = $function as *const ();
        $crate::ffi::OsslDispatch {
            function_id: $id,
            // SAFETY: the core casts this pointer back to the type OpenSSL documents for
            // function `$id`, which is the signature the function is declared with.
            function: Some(unsafe {
                std::mem::transmute::<*const (), unsafe extern "C" fn()>(address)
            }),
        }
    }};
}

/// The entry that ends a dispatch table.
pub const fn end_of_table() -> OsslDispatch {
    OsslDispatch {
        function_id: 0,
        function: None,
    }
}

/// The entry that ends an algorithm list.
pub const fn end_of_algorithms() -> OsslAlgorithm {
    OsslAlgorithm {
        algorithm_names: std::ptr::null(),
        property_definition: std::ptr::null(),
        implementation: std::ptr::null(),
        algorithm_description: std::ptr::null(),
    }
}

static PROVIDER_TABLE: LazyLock<Table<OsslDispatch>> = LazyLock::new(|| {
    Table(vec![
        function!(ffi::FUNC_PROVIDER_TEARDOWN, provider_teardown),
        function!(ffi::FUNC_PROVIDER_GETTABLE_PARAMS, provider_gettable_params),
        function!(ffi::FUNC_PROVIDER_GET_PARAMS, provider_get_params),
        function!(ffi::FUNC_PROVIDER_QUERY_OPERATION, provider_query_operation),
        function!(
            ffi::FUNC_PROVIDER_GET_REASON_STRINGS,
            provider_get_reason_strings
        ),
        end_of_table(),
    ])
});

static PROVIDER_PARAMS: LazyLock<params::ParamList> = LazyLock::new(|| {
    params::ParamList::new(&[
        (c"name", ffi::PARAM_UTF8_PTR),
        (c"version", ffi::PARAM_UTF8_PTR),
        (c"buildinfo", ffi::PARAM_UTF8_PTR),
        (c"status", ffi::PARAM_INTEGER),
    ])
});

static REASON_STRINGS: LazyLock<Table<OsslItem>> = LazyLock::new(|| {
    let mut items: Vec<OsslItem> = error::REASONS
        .iter()
        .map(|(id, text)| OsslItem {
            id: *id,
            ptr: text.as_ptr().cast::<c_void>(),
        })
        .collect();
    items.push(OsslItem {
        id: 0,
        ptr: std::ptr::null(),
    });
    Table(items)
});

/// The endpoint: `AZIOT_KEYD_URI`, else the `keyd_uri` parameter of the provider's
/// `openssl.cnf` section, else the default.
fn keyd_uri(handle: *const c_void, get_params: Option<CoreGetParams>) -> String {
    if let Some(uri) = std::env::var(KEYD_URI_VARIABLE)
        .ok()
        .filter(|uri| !uri.is_empty())
    {
        return uri;
    }
    if let Some(get_params) = get_params {
        let mut value: *const c_char = std::ptr::null();
        let mut request = [
            OsslParam {
                key: c"keyd_uri".as_ptr(),
                data_type: ffi::PARAM_UTF8_PTR,
                data: (&raw mut value).cast::<c_void>(),
                data_size: 0,
                return_size: usize::MAX,
            },
            params::end(),
        ];
        // SAFETY: `get_params` is the core's upcall for this handle; the array is ended by the
        // null entry and `value` outlives the call.
        let found = unsafe { get_params(handle, request.as_mut_ptr()) } == 1;
        if found && !value.is_null() {
            // SAFETY: the core set `value` to a NUL-terminated string it owns for the
            // provider's life; it is copied at once.
            let text = unsafe { CStr::from_ptr(value) }
                .to_string_lossy()
                .into_owned();
            if !text.is_empty() {
                return text;
            }
        }
    }
    DEFAULT_KEYD_URI.to_owned()
}

/// The provider's entry point, found by name when OpenSSL loads `keyd.so`.
///
/// # Safety
/// Called by OpenSSL's core with its handle, its function table (ended by id 0) and two out
/// pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn OSSL_provider_init(
    handle: *const c_void,
    core_functions: *const OsslDispatch,
    out: *mut *const OsslDispatch,
    provctx: *mut *mut c_void,
) -> c_int {
    guard(None, c"OSSL_provider_init", 0, || {
        if out.is_null() || provctx.is_null() {
            return 0;
        }
        let mut get_params = None;
        let mut new_error = None;
        let mut set_error_debug = None;
        let mut vset_error = None;
        let mut index = 0;
        while !core_functions.is_null() {
            // SAFETY: the core's table is ended by an entry with id 0, so every index up to it
            // is in bounds.
            let entry = unsafe { &*core_functions.add(index) };
            if entry.function_id == 0 {
                break;
            }
            if let Some(function) = entry.function {
                // SAFETY: each id's function has the documented type it is cast to here.
                unsafe {
                    match entry.function_id {
                        ffi::FUNC_CORE_GET_PARAMS => {
                            get_params = Some(std::mem::transmute::<
                                unsafe extern "C" fn(),
                                CoreGetParams,
                            >(function))
                        }
                        ffi::FUNC_CORE_NEW_ERROR => {
                            new_error = Some(std::mem::transmute::<
                                unsafe extern "C" fn(),
                                CoreNewError,
                            >(function))
                        }
                        ffi::FUNC_CORE_SET_ERROR_DEBUG => {
                            set_error_debug = Some(std::mem::transmute::<
                                unsafe extern "C" fn(),
                                CoreSetErrorDebug,
                            >(function))
                        }
                        ffi::FUNC_CORE_VSET_ERROR => vset_error = Some(function),
                        _ => {}
                    }
                }
            }
            index += 1;
        }
        let provider = Arc::new(Provider {
            handle: CoreHandle(handle),
            new_error,
            set_error_debug,
            vset_error,
            keyd_uri: keyd_uri(handle, get_params),
            keyd: OnceLock::new(),
        });
        // SAFETY: both out pointers were checked non-null; the core owns them for this call.
        unsafe {
            *out = PROVIDER_TABLE.0.as_ptr();
            *provctx = Arc::into_raw(provider).cast_mut().cast::<c_void>();
        }
        1
    })
}

unsafe extern "C" fn provider_teardown(provctx: *mut c_void) {
    guard(None, c"provider_teardown", (), || {
        if !provctx.is_null() {
            // SAFETY: `provctx` is the reference `OSSL_provider_init` leaked; teardown is the
            // core's last call with it. Objects still alive hold their own references.
            drop(unsafe { Arc::from_raw(provctx.cast_const().cast::<Provider>()) });
        }
    })
}

unsafe extern "C" fn provider_gettable_params(_provctx: *mut c_void) -> *const OsslParam {
    guard(None, c"provider_gettable_params", std::ptr::null(), || {
        PROVIDER_PARAMS.as_ptr()
    })
}

unsafe extern "C" fn provider_get_params(_provctx: *mut c_void, request: *mut OsslParam) -> c_int {
    guard(None, c"provider_get_params", 0, || {
        // SAFETY: the core passes an array ended by a null key.
        for param in unsafe { params::entries(request) } {
            let text: Option<&'static CStr> = match params::name(param) {
                b"name" => Some(c"keyd: keys held by the IoT Edge key service"),
                b"version" => Some(c"0.1.0"),
                b"buildinfo" => Some(c"keyd-openssl-provider 0.1.0"),
                b"status" => {
                    if !params::set_integer(param, 1) {
                        return 0;
                    }
                    None
                }
                _ => None,
            };
            if let Some(text) = text {
                if param.data_type != ffi::PARAM_UTF8_PTR || param.data.is_null() {
                    if !params::set_utf8(param, &text.to_string_lossy()) {
                        return 0;
                    }
                    continue;
                }
                // SAFETY: a UTF8_PTR entry's data is a `const char *` slot; the string is 'static.
                unsafe { *param.data.cast::<*const c_char>() = text.as_ptr() };
                param.return_size = text.to_bytes().len();
            }
        }
        1
    })
}

unsafe extern "C" fn provider_query_operation(
    _provctx: *mut c_void,
    operation_id: c_int,
    no_cache: *mut c_int,
) -> *const OsslAlgorithm {
    guard(None, c"provider_query_operation", std::ptr::null(), || {
        if !no_cache.is_null() {
            // SAFETY: the core passes a writable int.
            unsafe { *no_cache = 0 };
        }
        match operation_id {
            ffi::OP_KEYMGMT => keymgmt::ALGORITHMS.0.as_ptr(),
            ffi::OP_SIGNATURE => signature::ALGORITHMS.0.as_ptr(),
            ffi::OP_STORE => store::ALGORITHMS.0.as_ptr(),
            _ => std::ptr::null(),
        }
    })
}

unsafe extern "C" fn provider_get_reason_strings(_provctx: *mut c_void) -> *const OsslItem {
    guard(
        None,
        c"provider_get_reason_strings",
        std::ptr::null(),
        || REASON_STRINGS.0.as_ptr(),
    )
}
