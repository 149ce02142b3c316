//! The C types and numbers of OpenSSL 3's provider interface this provider uses, declared from
//! the facts in `openssl/core.h`, `core_dispatch.h`, `core_names.h` and `core_object.h`
//! (OpenSSL 3.0 ABI). Nothing here links libcrypto: the core reaches us through the function
//! tables below and we reach it only through the upcalls it hands to `OSSL_provider_init`.

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `OSSL_DISPATCH`: one function of a table, ended by an entry with id 0.
#[repr(C)]
#[derive(Debug)]
pub struct OsslDispatch {
    /// The function's number within its operation.
    pub function_id: c_int,
    /// The function, cast to a generic pointer.
    pub function: Option<unsafe extern "C" fn()>,
}

/// `OSSL_ALGORITHM`: one algorithm implementation, ended by an entry with null names.
#[repr(C)]
#[derive(Debug)]
pub struct OsslAlgorithm {
    /// Colon-separated names.
    pub algorithm_names: *const c_char,
    /// The property definition (`provider=keyd`).
    pub property_definition: *const c_char,
    /// The function table.
    pub implementation: *const OsslDispatch,
    /// A description.
    pub algorithm_description: *const c_char,
}

/// `OSSL_PARAM`: one typed parameter, ended by an entry with a null key.
#[repr(C)]
#[derive(Debug)]
pub struct OsslParam {
    /// The parameter's name.
    pub key: *const c_char,
    /// One of the `PARAM_*` types.
    pub data_type: c_uint,
    /// The value's buffer.
    pub data: *mut c_void,
    /// The buffer's size.
    pub data_size: usize,
    /// What a getter wrote (or would need).
    pub return_size: usize,
}

/// `OSSL_ITEM`: a number and a pointer (reason strings).
#[repr(C)]
#[derive(Debug)]
pub struct OsslItem {
    /// The number.
    pub id: c_uint,
    /// The pointer (a C string for reason strings).
    pub ptr: *const c_void,
}

/// `OSSL_CALLBACK`.
pub type OsslCallback = unsafe extern "C" fn(params: *const OsslParam, arg: *mut c_void) -> c_int;

/// `OSSL_FUNC_core_get_params_fn`.
pub type CoreGetParams =
    unsafe extern "C" fn(handle: *const c_void, params: *mut OsslParam) -> c_int;
/// `OSSL_FUNC_core_new_error_fn`.
pub type CoreNewError = unsafe extern "C" fn(handle: *const c_void);
/// `OSSL_FUNC_core_set_error_debug_fn`.
pub type CoreSetErrorDebug = unsafe extern "C" fn(
    handle: *const c_void,
    file: *const c_char,
    line: c_int,
    func: *const c_char,
);
/// `OSSL_FUNC_core_vset_error_fn` (its last argument is a `va_list`; only the C shim calls it).
pub type CoreVsetError = unsafe extern "C" fn();

unsafe extern "C" {
    /// src/vset_error.c: calls `upcall(handle, reason, "%s", message)` with a real `va_list`.
    pub fn keyd_provider_vset_error(
        upcall: CoreVsetError,
        handle: *const c_void,
        reason: u32,
        message: *const c_char,
    );
}

// OSSL_PARAM data types.
pub const PARAM_INTEGER: c_uint = 1;
pub const PARAM_UNSIGNED_INTEGER: c_uint = 2;
pub const PARAM_UTF8_STRING: c_uint = 4;
pub const PARAM_OCTET_STRING: c_uint = 5;
pub const PARAM_UTF8_PTR: c_uint = 6;

// Core upcalls.
pub const FUNC_CORE_GET_PARAMS: c_int = 2;
pub const FUNC_CORE_NEW_ERROR: c_int = 5;
pub const FUNC_CORE_SET_ERROR_DEBUG: c_int = 6;
pub const FUNC_CORE_VSET_ERROR: c_int = 7;

// Provider functions.
pub const FUNC_PROVIDER_TEARDOWN: c_int = 1024;
pub const FUNC_PROVIDER_GETTABLE_PARAMS: c_int = 1025;
pub const FUNC_PROVIDER_GET_PARAMS: c_int = 1026;
pub const FUNC_PROVIDER_QUERY_OPERATION: c_int = 1027;
pub const FUNC_PROVIDER_GET_REASON_STRINGS: c_int = 1029;

// Operations.
pub const OP_KEYMGMT: c_int = 10;
pub const OP_SIGNATURE: c_int = 12;
pub const OP_STORE: c_int = 22;

// Key management functions.
pub const FUNC_KEYMGMT_NEW: c_int = 1;
pub const FUNC_KEYMGMT_LOAD: c_int = 8;
pub const FUNC_KEYMGMT_FREE: c_int = 10;
pub const FUNC_KEYMGMT_GET_PARAMS: c_int = 11;
pub const FUNC_KEYMGMT_GETTABLE_PARAMS: c_int = 12;
pub const FUNC_KEYMGMT_QUERY_OPERATION_NAME: c_int = 20;
pub const FUNC_KEYMGMT_HAS: c_int = 21;
pub const FUNC_KEYMGMT_VALIDATE: c_int = 22;
pub const FUNC_KEYMGMT_MATCH: c_int = 23;
pub const FUNC_KEYMGMT_IMPORT: c_int = 40;
pub const FUNC_KEYMGMT_IMPORT_TYPES: c_int = 41;
pub const FUNC_KEYMGMT_EXPORT: c_int = 42;
pub const FUNC_KEYMGMT_EXPORT_TYPES: c_int = 43;
pub const FUNC_KEYMGMT_DUP: c_int = 44;

// Key selections.
pub const SELECT_PRIVATE_KEY: c_int = 0x01;
pub const SELECT_PUBLIC_KEY: c_int = 0x02;
pub const SELECT_DOMAIN_PARAMETERS: c_int = 0x04;

// Signature functions.
pub const FUNC_SIGNATURE_NEWCTX: c_int = 1;
pub const FUNC_SIGNATURE_SIGN_INIT: c_int = 2;
pub const FUNC_SIGNATURE_SIGN: c_int = 3;
pub const FUNC_SIGNATURE_DIGEST_SIGN_INIT: c_int = 8;
pub const FUNC_SIGNATURE_DIGEST_SIGN_UPDATE: c_int = 9;
pub const FUNC_SIGNATURE_DIGEST_SIGN_FINAL: c_int = 10;
pub const FUNC_SIGNATURE_FREECTX: c_int = 16;
pub const FUNC_SIGNATURE_DUPCTX: c_int = 17;
pub const FUNC_SIGNATURE_GET_CTX_PARAMS: c_int = 18;
pub const FUNC_SIGNATURE_GETTABLE_CTX_PARAMS: c_int = 19;
pub const FUNC_SIGNATURE_SET_CTX_PARAMS: c_int = 20;
pub const FUNC_SIGNATURE_SETTABLE_CTX_PARAMS: c_int = 21;

// Store functions.
pub const FUNC_STORE_OPEN: c_int = 1;
pub const FUNC_STORE_SETTABLE_CTX_PARAMS: c_int = 3;
pub const FUNC_STORE_SET_CTX_PARAMS: c_int = 4;
pub const FUNC_STORE_LOAD: c_int = 5;
pub const FUNC_STORE_EOF: c_int = 6;
pub const FUNC_STORE_CLOSE: c_int = 7;
pub const FUNC_STORE_EXPORT_OBJECT: c_int = 8;

/// `OSSL_OBJECT_PKEY` (core_object.h).
pub const OBJECT_PKEY: c_int = 2;

// rsa.h padding numbers, as the `pad-mode` integer form carries them.
pub const RSA_PKCS1_PADDING: i64 = 1;
pub const RSA_NO_PADDING: i64 = 3;
pub const RSA_PKCS1_PSS_PADDING: i64 = 6;
// rsa.h PSS salt-length codes, as the `saltlen` integer form carries them.
pub const RSA_PSS_SALTLEN_DIGEST: i64 = -1;
pub const RSA_PSS_SALTLEN_AUTO: i64 = -2;
pub const RSA_PSS_SALTLEN_MAX: i64 = -3;
