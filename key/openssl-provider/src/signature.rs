//! Signatures (`OSSL_OP_SIGNATURE`) made by keyd: `ECDSA` for EC keys and `RSA` (PKCS#1 v1.5,
//! PSS, or no padding) for RSA keys, both as a plain `sign` over a digest the caller computed
//! and as digest-and-sign (`EVP_DigestSign*`, what libssl uses for TLS 1.2 and 1.3), where
//! the message is hashed here with SHA-256/384/512 and only the digest goes to keyd. Requests
//! are built by `key_api::signing`; PSS salts are random and as long as the hash unless the
//! caller sets `saltlen`. Verification is left to the default provider (public keys export).

use std::ffi::{c_char, c_int, c_uchar, c_void, CStr};
use std::sync::{Arc, LazyLock};

use key_api::signing::{pss_max_salt_length, Hash, Operation};
use sha2::Digest as _;

use crate::error::ProviderError;
use crate::ffi::{self, OsslAlgorithm, OsslDispatch, OsslParam};
use crate::keymgmt::{key_data, KeyMaterial, PublicKey};
use crate::params::{self, ParamList};
use crate::{end_of_algorithms, end_of_table, function, guard, provider_from, Provider, Table};

/// RSA padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Padding {
    Pkcs1,
    Pss,
    None,
}

/// PSS salt length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SaltLength {
    Digest,
    Max,
    Bytes(usize),
}

/// An incremental hash.
#[derive(Clone, Debug)]
enum Hasher {
    Sha256(sha2::Sha256),
    Sha384(sha2::Sha384),
    Sha512(sha2::Sha512),
}

impl Hasher {
    fn new(hash: Hash) -> Hasher {
        match hash {
            Hash::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Hash::Sha384 => Hasher::Sha384(sha2::Sha384::new()),
            Hash::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(hasher) => hasher.update(data),
            Hasher::Sha384(hasher) => hasher.update(data),
            Hasher::Sha512(hasher) => hasher.update(data),
        }
    }

    fn finish(&self) -> Vec<u8> {
        match self.clone() {
            Hasher::Sha256(hasher) => hasher.finalize().to_vec(),
            Hasher::Sha384(hasher) => hasher.finalize().to_vec(),
            Hasher::Sha512(hasher) => hasher.finalize().to_vec(),
        }
    }
}

/// One signature operation in progress.
#[derive(Clone, Debug)]
struct SignatureContext {
    provider: Arc<Provider>,
    key: Option<Arc<KeyMaterial>>,
    hash: Option<Hash>,
    hasher: Option<Hasher>,
    padding: Padding,
    salt_length: SaltLength,
}

impl SignatureContext {
    fn key(&self) -> Result<&Arc<KeyMaterial>, ProviderError> {
        self.key
            .as_ref()
            .ok_or_else(|| ProviderError::Internal("signature not initialized".into()))
    }

    fn start(&mut self, provkey: *mut c_void) -> Result<(), ProviderError> {
        // SAFETY: the core passes a keydata of our key management.
        let key = unsafe { key_data(provkey) }
            .and_then(|key| key.material.clone())
            .ok_or_else(|| ProviderError::Internal("no key".into()))?;
        if key.handle.is_none() {
            return Err(ProviderError::Unsupported(format!(
                "{} is a public key only; open the key with a keyd: URI to sign",
                key.label
            )));
        }
        self.key = Some(key);
        self.hash = None;
        self.hasher = None;
        self.padding = Padding::Pkcs1;
        self.salt_length = SaltLength::Digest;
        Ok(())
    }

    fn set_params(&mut self, request: *const OsslParam) -> Result<(), ProviderError> {
        // SAFETY: the core passes an array ended by a null key (or null); it is only read.
        for param in unsafe { params::entries(request.cast_mut()) } {
            match params::name(param) {
                b"digest" => {
                    let name = params::get_utf8(param).unwrap_or_default();
                    let hash = Hash::from_name(&name).ok_or_else(|| {
                        ProviderError::Unsupported(format!(
                            "digest {name:?} (keyd signatures use SHA-256, SHA-384 or SHA-512)"
                        ))
                    })?;
                    if self.hasher.is_some() {
                        self.hasher = Some(Hasher::new(hash));
                    }
                    self.hash = Some(hash);
                }
                b"mgf1-digest" => {
                    let name = params::get_utf8(param).unwrap_or_default();
                    if Hash::from_name(&name) != self.hash {
                        return Err(ProviderError::Unsupported(format!(
                            "MGF1 with {name:?}: keyd's PSS uses the signature's own digest"
                        )));
                    }
                }
                b"pad-mode" => {
                    let padding = match (
                        params::get_integer(param),
                        params::get_utf8(param).as_deref(),
                    ) {
                        (Some(ffi::RSA_PKCS1_PADDING), _) | (_, Some("pkcs1")) => Padding::Pkcs1,
                        (Some(ffi::RSA_PKCS1_PSS_PADDING), _) | (_, Some("pss")) => Padding::Pss,
                        (Some(ffi::RSA_NO_PADDING), _) | (_, Some("none")) => Padding::None,
                        _ => {
                            return Err(ProviderError::Unsupported(
                                "RSA padding other than pkcs1, pss or none".into(),
                            ))
                        }
                    };
                    self.padding = padding;
                }
                b"saltlen" => {
                    let salt_length = match (
                        params::get_integer(param),
                        params::get_utf8(param).as_deref(),
                    ) {
                        (Some(ffi::RSA_PSS_SALTLEN_DIGEST), _) | (_, Some("digest")) => {
                            SaltLength::Digest
                        }
                        (Some(ffi::RSA_PSS_SALTLEN_MAX | ffi::RSA_PSS_SALTLEN_AUTO), _)
                        | (_, Some("max" | "auto")) => SaltLength::Max,
                        (Some(bytes), _) if bytes >= 0 => {
                            SaltLength::Bytes(usize::try_from(bytes).unwrap_or(0))
                        }
                        (_, Some(text)) if text.parse::<usize>().is_ok() => {
                            SaltLength::Bytes(text.parse::<usize>().unwrap_or(0))
                        }
                        _ => return Err(ProviderError::Unsupported("this PSS salt length".into())),
                    };
                    self.salt_length = salt_length;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The keyd request that signs `input` (a digest, or for RSA without a digest set, the
    /// bytes to pad).
    fn operation(&self, input: &[u8]) -> Result<Operation, ProviderError> {
        let key = self.key()?;
        let unsupported =
            |error: key_api::signing::SigningError| ProviderError::Unsupported(error.to_string());
        match &key.public {
            PublicKey::Ec { .. } => Ok(Operation::ecdsa(input)),
            PublicKey::Rsa { .. } => {
                let modulus_bits = key.public.bits();
                match (self.padding, self.hash) {
                    (Padding::Pkcs1, Some(hash)) => {
                        Operation::rsa_pkcs1(hash, input).map_err(unsupported)
                    }
                    (Padding::Pkcs1, None) => Ok(Operation::RsaPkcs1(input.to_vec())),
                    (Padding::Pss, Some(hash)) => {
                        let salt_length = match self.salt_length {
                            SaltLength::Digest => hash.output_length(),
                            SaltLength::Max => pss_max_salt_length(hash, modulus_bits),
                            SaltLength::Bytes(bytes) => bytes,
                        };
                        Operation::rsa_pss(hash, input, modulus_bits, salt_length)
                            .map_err(unsupported)
                    }
                    (Padding::Pss, None) => Err(ProviderError::Unsupported(
                        "RSA-PSS needs a digest (set the signature's digest)".into(),
                    )),
                    (Padding::None, _) => {
                        if input.len() != modulus_bits.div_ceil(8) {
                            return Err(ProviderError::Unsupported(
                                "raw RSA input must be as long as the modulus".into(),
                            ));
                        }
                        Ok(Operation::RsaRaw(input.to_vec()))
                    }
                }
            }
        }
    }

    /// Signs `input` in keyd into the caller's buffer.
    fn sign_into(
        &self,
        input: &[u8],
        signature: *mut c_uchar,
        signature_length: *mut usize,
        signature_size: usize,
    ) -> Result<(), ProviderError> {
        let key = self.key()?;
        if signature.is_null() {
            // SAFETY: the core passes a writable length.
            unsafe { *signature_length = key.public.max_signature_size() };
            return Ok(());
        }
        let operation = self.operation(input)?;
        let handle = key
            .handle
            .clone()
            .ok_or_else(|| ProviderError::Internal("no keyd handle".into()))?;
        let label = key.label.clone();
        let bytes = self.provider.keyd()?.call(move |client| async move {
            client
                .sign_operation(&handle, &operation)
                .await
                .map_err(|error| ProviderError::keyd(format!("sign with {label}"), &error))
        })?;
        if bytes.len() > signature_size {
            return Err(ProviderError::BufferTooSmall {
                needed: bytes.len(),
                available: signature_size,
            });
        }
        // SAFETY: the caller's buffer holds `signature_size` >= `bytes.len()` bytes, and the
        // length pointer is writable.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), signature, bytes.len());
            *signature_length = bytes.len();
        }
        Ok(())
    }
}

static TABLE_FUNCTIONS: LazyLock<Table<OsslDispatch>> = LazyLock::new(|| {
    Table(vec![
        function!(ffi::FUNC_SIGNATURE_NEWCTX, newctx),
        function!(ffi::FUNC_SIGNATURE_FREECTX, freectx),
        function!(ffi::FUNC_SIGNATURE_DUPCTX, dupctx),
        function!(ffi::FUNC_SIGNATURE_SIGN_INIT, sign_init),
        function!(ffi::FUNC_SIGNATURE_SIGN, sign),
        function!(ffi::FUNC_SIGNATURE_DIGEST_SIGN_INIT, digest_sign_init),
        function!(ffi::FUNC_SIGNATURE_DIGEST_SIGN_UPDATE, digest_sign_update),
        function!(ffi::FUNC_SIGNATURE_DIGEST_SIGN_FINAL, digest_sign_final),
        function!(ffi::FUNC_SIGNATURE_GET_CTX_PARAMS, get_ctx_params),
        function!(ffi::FUNC_SIGNATURE_GETTABLE_CTX_PARAMS, gettable_ctx_params),
        function!(ffi::FUNC_SIGNATURE_SET_CTX_PARAMS, set_ctx_params),
        function!(ffi::FUNC_SIGNATURE_SETTABLE_CTX_PARAMS, settable_ctx_params),
        end_of_table(),
    ])
});

/// The signature algorithms: the names the key management's `query_operation_name` gives.
pub static ALGORITHMS: LazyLock<Table<OsslAlgorithm>> = LazyLock::new(|| {
    Table(vec![
        OsslAlgorithm {
            algorithm_names: c"KEYD-ECDSA".as_ptr(),
            property_definition: c"provider=keyd".as_ptr(),
            implementation: TABLE_FUNCTIONS.0.as_ptr(),
            algorithm_description: c"ECDSA P-256 signatures made by keyd".as_ptr(),
        },
        OsslAlgorithm {
            algorithm_names: c"KEYD-RSA".as_ptr(),
            property_definition: c"provider=keyd".as_ptr(),
            implementation: TABLE_FUNCTIONS.0.as_ptr(),
            algorithm_description: c"RSA PKCS#1 v1.5 and PSS signatures made by keyd".as_ptr(),
        },
        end_of_algorithms(),
    ])
});

static SETTABLE: LazyLock<ParamList> = LazyLock::new(|| {
    ParamList::new(&[
        (c"digest", ffi::PARAM_UTF8_STRING),
        (c"properties", ffi::PARAM_UTF8_STRING),
        (c"pad-mode", ffi::PARAM_UTF8_STRING),
        (c"saltlen", ffi::PARAM_UTF8_STRING),
        (c"mgf1-digest", ffi::PARAM_UTF8_STRING),
    ])
});

static GETTABLE: LazyLock<ParamList> =
    LazyLock::new(|| ParamList::new(&[(c"digest", ffi::PARAM_UTF8_STRING)]));

/// The context behind a pointer.
///
/// # Safety
/// `context` is null or a live context of ours that no one else uses during the call.
unsafe fn context_mut<'a>(context: *mut c_void) -> Option<&'a mut SignatureContext> {
    // SAFETY: per the contract.
    unsafe { context.cast::<SignatureContext>().as_mut() }
}

/// Runs `body` on a context, reporting its error.
fn with_context(
    context: *mut c_void,
    function: &CStr,
    body: impl FnOnce(&mut SignatureContext) -> Result<(), ProviderError>,
) -> c_int {
    // SAFETY: the core passes a live context of ours, used by one thread at a time.
    let Some(context) = (unsafe { context_mut(context) }) else {
        return 0;
    };
    let provider = Arc::clone(&context.provider);
    guard(Some(&provider), function, 0, || match body(context) {
        Ok(()) => 1,
        Err(error) => {
            provider.report(&error, function);
            0
        }
    })
}

unsafe extern "C" fn newctx(provctx: *mut c_void, _properties: *const c_char) -> *mut c_void {
    guard(None, c"signature_newctx", std::ptr::null_mut(), || {
        // SAFETY: the core passes the provctx `OSSL_provider_init` returned.
        match unsafe { provider_from(provctx) } {
            Some(provider) => Box::into_raw(Box::new(SignatureContext {
                provider,
                key: None,
                hash: None,
                hasher: None,
                padding: Padding::Pkcs1,
                salt_length: SaltLength::Digest,
            }))
            .cast::<c_void>(),
            None => std::ptr::null_mut(),
        }
    })
}

unsafe extern "C" fn freectx(context: *mut c_void) {
    guard(None, c"signature_freectx", (), || {
        if !context.is_null() {
            // SAFETY: the core frees each context once; it is a `Box<SignatureContext>`.
            drop(unsafe { Box::from_raw(context.cast::<SignatureContext>()) });
        }
    })
}

unsafe extern "C" fn dupctx(context: *mut c_void) -> *mut c_void {
    guard(None, c"signature_dupctx", std::ptr::null_mut(), || {
        // SAFETY: the core passes a live context of ours.
        match unsafe { context_mut(context) } {
            Some(context) => Box::into_raw(Box::new(context.clone())).cast::<c_void>(),
            None => std::ptr::null_mut(),
        }
    })
}

unsafe extern "C" fn sign_init(
    context: *mut c_void,
    provkey: *mut c_void,
    request: *const OsslParam,
) -> c_int {
    with_context(context, c"signature_sign_init", |context| {
        context.start(provkey)?;
        context.set_params(request)
    })
}

unsafe extern "C" fn sign(
    context: *mut c_void,
    signature: *mut c_uchar,
    signature_length: *mut usize,
    signature_size: usize,
    input: *const c_uchar,
    input_length: usize,
) -> c_int {
    with_context(context, c"signature_sign", |context| {
        let input = if input.is_null() {
            &[][..]
        } else {
            // SAFETY: the core passes `input_length` readable bytes.
            unsafe { std::slice::from_raw_parts(input, input_length) }
        };
        context.sign_into(input, signature, signature_length, signature_size)
    })
}

unsafe extern "C" fn digest_sign_init(
    context: *mut c_void,
    digest_name: *const c_char,
    provkey: *mut c_void,
    request: *const OsslParam,
) -> c_int {
    with_context(context, c"signature_digest_sign_init", |context| {
        context.start(provkey)?;
        let hash = if digest_name.is_null() {
            Hash::Sha256
        } else {
            // SAFETY: the core passes a NUL-terminated digest name.
            let name = unsafe { CStr::from_ptr(digest_name) }.to_string_lossy();
            Hash::from_name(&name).ok_or_else(|| {
                ProviderError::Unsupported(format!(
                    "digest {name:?} (keyd signatures use SHA-256, SHA-384 or SHA-512)"
                ))
            })?
        };
        context.hash = Some(hash);
        context.hasher = Some(Hasher::new(hash));
        context.set_params(request)
    })
}

unsafe extern "C" fn digest_sign_update(
    context: *mut c_void,
    data: *const c_uchar,
    length: usize,
) -> c_int {
    with_context(context, c"signature_digest_sign_update", |context| {
        let hasher = context
            .hasher
            .as_mut()
            .ok_or_else(|| ProviderError::Internal("digest-sign not initialized".into()))?;
        if !data.is_null() && length > 0 {
            // SAFETY: the core passes `length` readable bytes.
            hasher.update(unsafe { std::slice::from_raw_parts(data, length) });
        }
        Ok(())
    })
}

unsafe extern "C" fn digest_sign_final(
    context: *mut c_void,
    signature: *mut c_uchar,
    signature_length: *mut usize,
    signature_size: usize,
) -> c_int {
    with_context(context, c"signature_digest_sign_final", |context| {
        let digest = context
            .hasher
            .as_ref()
            .ok_or_else(|| ProviderError::Internal("digest-sign not initialized".into()))?
            .finish();
        context.sign_into(&digest, signature, signature_length, signature_size)
    })
}

unsafe extern "C" fn set_ctx_params(context: *mut c_void, request: *const OsslParam) -> c_int {
    with_context(context, c"signature_set_ctx_params", |context| {
        context.set_params(request)
    })
}

unsafe extern "C" fn settable_ctx_params(
    _context: *mut c_void,
    _provctx: *mut c_void,
) -> *const OsslParam {
    guard(
        None,
        c"signature_settable_ctx_params",
        std::ptr::null(),
        || SETTABLE.as_ptr(),
    )
}

unsafe extern "C" fn get_ctx_params(context: *mut c_void, request: *mut OsslParam) -> c_int {
    with_context(context, c"signature_get_ctx_params", |context| {
        // SAFETY: the core passes an array ended by a null key.
        for param in unsafe { params::entries(request) } {
            if params::name(param) == b"digest" {
                let name = match context.hash {
                    Some(Hash::Sha256) => "SHA2-256",
                    Some(Hash::Sha384) => "SHA2-384",
                    Some(Hash::Sha512) => "SHA2-512",
                    None => continue,
                };
                if !params::set_utf8(param, name) {
                    return Err(ProviderError::Internal(
                        "digest name buffer too small".into(),
                    ));
                }
            }
        }
        Ok(())
    })
}

unsafe extern "C" fn gettable_ctx_params(
    _context: *mut c_void,
    _provctx: *mut c_void,
) -> *const OsslParam {
    guard(
        None,
        c"signature_gettable_ctx_params",
        std::ptr::null(),
        || GETTABLE.as_ptr(),
    )
}
