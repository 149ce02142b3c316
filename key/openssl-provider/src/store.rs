//! The store loader (`OSSL_OP_STORE`) for the `keyd:` URI scheme:
//!
//! - `keyd:<key-id>`: the key pair with that ID, loaded with keyd's `GET /keypair/{id}` as the
//!   calling process's own uid (percent-encoding allowed, e.g. `keyd:my%20key`);
//! - `keyd:?handle=<handle>`: the key pair behind a handle the caller already holds
//!   (percent-encoded as a query value).
//!
//! Loading yields one object, a private key of our key management whose signatures keyd makes;
//! its private half cannot be exported to another provider (`export_object` refuses), so the
//! key stays with this provider.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, LazyLock};

use crate::error::ProviderError;
use crate::ffi::{self, OsslAlgorithm, OsslCallback, OsslDispatch, OsslParam};
use crate::keymgmt::{self, KeyData};
use crate::params::{OutgoingParams, ParamList};
use crate::{end_of_algorithms, end_of_table, function, guard, provider_from, Provider, Table};

/// What a `keyd:` URI names.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// A key pair ID.
    KeyId(String),
    /// A key handle.
    Handle(key_api::KeyHandle),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::KeyId(id) => write!(formatter, "KeyId({id:?})"),
            Target::Handle(_) => formatter.write_str("Handle(..)"),
        }
    }
}

/// Parses a `keyd:` URI.
pub fn parse_uri(uri: &str) -> Result<Target, ProviderError> {
    let invalid = |reason| ProviderError::Uri {
        // A handle is a credential: never echo it.
        uri: if uri.contains("handle=") {
            "keyd:?handle=…".to_owned()
        } else {
            uri.to_owned()
        },
        reason,
    };
    let rest = uri
        .strip_prefix("keyd:")
        .ok_or_else(|| invalid("the scheme is not keyd:"))?;
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .map(|decoded| decoded.into_owned())
            .map_err(|_| invalid("percent-encoding is not UTF-8"))
    };
    if let Some(query) = rest.strip_prefix('?') {
        let handle = query
            .strip_prefix("handle=")
            .ok_or_else(|| invalid("the only query is ?handle=<handle>"))?;
        if handle.is_empty() || handle.contains('&') {
            return Err(invalid("?handle= needs exactly one handle"));
        }
        return Ok(Target::Handle(key_api::KeyHandle(decode(handle)?)));
    }
    if rest.is_empty() {
        return Err(invalid("no key ID"));
    }
    if rest.starts_with('/') || rest.contains('?') || rest.contains('#') {
        return Err(invalid("expected keyd:<key-id> or keyd:?handle=<handle>"));
    }
    Ok(Target::KeyId(decode(rest)?))
}

/// A `keyd:` URI being loaded.
#[derive(Debug)]
struct StoreContext {
    provider: Arc<Provider>,
    target: Target,
    done: bool,
    /// The loaded key, kept while libcrypto may still read its reference.
    key: Option<Box<KeyData>>,
}

static TABLE: LazyLock<Table<OsslDispatch>> = LazyLock::new(|| {
    Table(vec![
        function!(ffi::FUNC_STORE_OPEN, open),
        function!(ffi::FUNC_STORE_SETTABLE_CTX_PARAMS, settable_ctx_params),
        function!(ffi::FUNC_STORE_SET_CTX_PARAMS, set_ctx_params),
        function!(ffi::FUNC_STORE_LOAD, load),
        function!(ffi::FUNC_STORE_EOF, eof),
        function!(ffi::FUNC_STORE_CLOSE, close),
        function!(ffi::FUNC_STORE_EXPORT_OBJECT, export_object),
        end_of_table(),
    ])
});

/// The store loader for the `keyd` scheme.
pub static ALGORITHMS: LazyLock<Table<OsslAlgorithm>> = LazyLock::new(|| {
    Table(vec![
        OsslAlgorithm {
            algorithm_names: c"keyd".as_ptr(),
            property_definition: c"provider=keyd".as_ptr(),
            implementation: TABLE.0.as_ptr(),
            algorithm_description: c"key pairs held by keyd".as_ptr(),
        },
        end_of_algorithms(),
    ])
});

static SETTABLE: LazyLock<ParamList> =
    LazyLock::new(|| ParamList::new(&[(c"expect", ffi::PARAM_INTEGER)]));

unsafe extern "C" fn open(provctx: *mut c_void, uri: *const c_char) -> *mut c_void {
    // SAFETY: the core passes the provctx `OSSL_provider_init` returned.
    let Some(provider) = (unsafe { provider_from(provctx) }) else {
        return std::ptr::null_mut();
    };
    guard(Some(&provider), c"store_open", std::ptr::null_mut(), || {
        if uri.is_null() {
            return std::ptr::null_mut();
        }
        // SAFETY: the core passes a NUL-terminated URI.
        let uri = unsafe { CStr::from_ptr(uri) }
            .to_string_lossy()
            .into_owned();
        match parse_uri(&uri) {
            Ok(target) => Box::into_raw(Box::new(StoreContext {
                provider: Arc::clone(&provider),
                target,
                done: false,
                key: None,
            }))
            .cast::<c_void>(),
            Err(error) => {
                provider.report(&error, c"store_open");
                std::ptr::null_mut()
            }
        }
    })
}

unsafe extern "C" fn settable_ctx_params(_provctx: *mut c_void) -> *const OsslParam {
    guard(None, c"store_settable_ctx_params", std::ptr::null(), || {
        SETTABLE.as_ptr()
    })
}

unsafe extern "C" fn set_ctx_params(_context: *mut c_void, _params: *const OsslParam) -> c_int {
    // `expect` and the other hints change nothing: a keyd: URI names one private key.
    1
}

unsafe extern "C" fn load(
    context: *mut c_void,
    object_callback: Option<OsslCallback>,
    object_argument: *mut c_void,
    _passphrase_callback: *const c_void,
    _passphrase_argument: *mut c_void,
) -> c_int {
    // SAFETY: the core passes a live context of ours, used by one thread at a time.
    let Some(context) = (unsafe { context.cast::<StoreContext>().as_mut() }) else {
        return 0;
    };
    let provider = Arc::clone(&context.provider);
    guard(Some(&provider), c"store_load", 0, || {
        let Some(object_callback) = object_callback else {
            return 0;
        };
        if context.done {
            return 0;
        }
        context.done = true;
        let (key_id, handle) = match &context.target {
            Target::KeyId(id) => (Some(id.clone()), None),
            Target::Handle(handle) => (None, Some(handle.clone())),
        };
        let material = match keymgmt::load_from_keyd(&provider, key_id, handle) {
            Ok(material) => material,
            Err(error) => {
                provider.report(&error, c"store_load");
                return 0;
            }
        };
        let kind = material.public.kind();
        let description = material.label.clone();
        let key = Box::new(KeyData {
            provider: Arc::clone(&provider),
            kind,
            material: Some(Arc::new(material)),
        });
        let reference = keymgmt::reference_of(&key);
        context.key = Some(key);
        let mut outgoing = OutgoingParams::default();
        outgoing.int(c"type", ffi::OBJECT_PKEY);
        outgoing.utf8(c"data-type", &keymgmt::kind_name(kind).to_string_lossy());
        outgoing.octets(c"reference", &reference);
        outgoing.utf8(c"desc", &description);
        let array = outgoing.array();
        // SAFETY: the callback is the core's; the array is ended by a null entry, its buffers
        // live in `outgoing`, and the key the reference names lives in `context`.
        unsafe { object_callback(array.as_ptr(), object_argument) }
    })
}

unsafe extern "C" fn eof(context: *mut c_void) -> c_int {
    guard(None, c"store_eof", 1, || {
        // SAFETY: the core passes a live context of ours.
        match unsafe { context.cast::<StoreContext>().as_ref() } {
            Some(context) => c_int::from(context.done),
            None => 1,
        }
    })
}

unsafe extern "C" fn close(context: *mut c_void) -> c_int {
    guard(None, c"store_close", 0, || {
        if !context.is_null() {
            // SAFETY: the core closes each context once; it is a `Box<StoreContext>` of ours.
            drop(unsafe { Box::from_raw(context.cast::<StoreContext>()) });
        }
        1
    })
}

unsafe extern "C" fn export_object(
    _context: *mut c_void,
    _reference: *const c_void,
    _reference_size: usize,
    _callback: Option<OsslCallback>,
    _argument: *mut c_void,
) -> c_int {
    // A keyd key cannot become another provider's key: its private half is in keyd. Refusing
    // here makes libcrypto use this provider's key management for it.
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("keyd:device-id").unwrap(),
            Target::KeyId("device-id".into())
        );
        assert_eq!(
            parse_uri("keyd:my%20key").unwrap(),
            Target::KeyId("my key".into())
        );
        assert_eq!(
            parse_uri("keyd:?handle=abc%3D%3D").unwrap(),
            Target::Handle(key_api::KeyHandle("abc==".into()))
        );
        for bad in [
            "keyd:",
            "file:x",
            "keyd://x",
            "keyd:?handle=",
            "keyd:?id=x",
            "keyd:a?b",
            "keyd:?handle=a&b=c",
        ] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
        let message = parse_uri("keyd:?handle=secret&x").unwrap_err().to_string();
        assert!(!message.contains("secret"), "{message}");
    }
}
