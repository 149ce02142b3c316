//! Key management (`OSSL_OP_KEYMGMT`) for `EC` (P-256 only) and `RSA`: a key object holds the
//! public half and, for keys opened through the store, the keyd handle that signs with the
//! private half. Public values can be exported (so `EVP_PKEY_eq` with a certificate's key
//! works, either way round) and imported (a public key only: importing private material is
//! refused); nothing private ever exists here.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Arc, LazyLock};

use base64::Engine as _;

use crate::error::ProviderError;
use crate::ffi::{self, OsslAlgorithm, OsslCallback, OsslDispatch, OsslParam};
use crate::params::{self, OutgoingParams, ParamList};
use crate::{end_of_algorithms, end_of_table, function, guard, provider_from, Provider, Table};

/// The DER of the P-256 curve OID, as keyd's `ec-curve-oid` carries it.
const P256_OID_DER: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The algorithm of a key object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// EC on P-256.
    Ec,
    /// RSA.
    Rsa,
}

/// A public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKey {
    /// A P-256 point, SEC1 compressed (33 bytes).
    Ec {
        /// The point.
        point: Vec<u8>,
    },
    /// An RSA modulus and exponent, big-endian without leading zeros.
    Rsa {
        /// The modulus.
        modulus: Vec<u8>,
        /// The public exponent.
        exponent: Vec<u8>,
    },
}

impl PublicKey {
    /// The key's algorithm.
    pub fn kind(&self) -> Kind {
        match self {
            PublicKey::Ec { .. } => Kind::Ec,
            PublicKey::Rsa { .. } => Kind::Rsa,
        }
    }

    /// The size in bits (the curve's or the modulus').
    pub fn bits(&self) -> usize {
        match self {
            PublicKey::Ec { .. } => 256,
            PublicKey::Rsa { modulus, .. } => {
                let leading = modulus
                    .first()
                    .map_or(8, |byte| byte.leading_zeros() as usize);
                modulus.len() * 8 - leading
            }
        }
    }

    /// The largest signature in bytes (a DER ECDSA-Sig-Value on P-256 is at most 72).
    pub fn max_signature_size(&self) -> usize {
        match self {
            PublicKey::Ec { .. } => 72,
            PublicKey::Rsa { .. } => self.bits().div_ceil(8),
        }
    }

    /// The security strength in bits (NIST SP 800-57 for RSA).
    pub fn security_bits(&self) -> usize {
        match self {
            PublicKey::Ec { .. } => 128,
            PublicKey::Rsa { .. } => match self.bits() {
                bits if bits >= 15360 => 256,
                bits if bits >= 7680 => 192,
                bits if bits >= 3072 => 128,
                bits if bits >= 2048 => 112,
                bits if bits >= 1024 => 80,
                _ => 0,
            },
        }
    }
}

/// A SEC1 P-256 point (compressed or uncompressed) in compressed form.
pub fn compress_point(point: &[u8]) -> Option<Vec<u8>> {
    match point {
        [0x02 | 0x03, rest @ ..] if rest.len() == 32 => Some(point.to_vec()),
        [0x04, rest @ ..] if rest.len() == 64 => {
            let (x, y) = rest.split_at(32);
            let prefix = if y[31] & 1 == 1 { 0x03 } else { 0x02 };
            let mut compressed = vec![prefix];
            compressed.extend_from_slice(x);
            Some(compressed)
        }
        _ => None,
    }
}

/// A key known to keyd, or a public key imported from elsewhere.
#[derive(Debug)]
pub struct KeyMaterial {
    /// The public half.
    pub public: PublicKey,
    /// The keyd handle that signs with the private half (none for an imported public key).
    pub handle: Option<key_api::KeyHandle>,
    /// What the key is called in messages (`key pair "device-id"`; never the handle).
    pub label: String,
}

/// The object a keymgmt `keydata` pointer points to.
#[derive(Debug, Clone)]
pub struct KeyData {
    /// The provider instance.
    pub provider: Arc<Provider>,
    /// The algorithm of the keymgmt that made it.
    pub kind: Kind,
    /// The key, once loaded or imported.
    pub material: Option<Arc<KeyMaterial>>,
}

/// Opens a key pair in keyd: its handle (loaded as the caller's own uid, or given) and public
/// parameters.
pub fn load_from_keyd(
    provider: &Provider,
    key_id: Option<String>,
    handle: Option<key_api::KeyHandle>,
) -> Result<KeyMaterial, ProviderError> {
    let label = match &key_id {
        Some(id) => format!("key pair {id:?}"),
        None => "the key pair of the given handle".to_owned(),
    };
    let task_label = label.clone();
    provider
        .keyd()?
        .call(move |client| async move {
            let handle = match (key_id, handle) {
                (Some(id), _) => client
                    .load_key_pair(&id)
                    .await
                    .map_err(|error| ProviderError::keyd(format!("load {task_label}"), &error))?,
                (None, Some(handle)) => handle,
                (None, None) => return Err(ProviderError::Internal("no key named".into())),
            };
            let parameter = |name: &'static str| {
                let client = client.clone();
                let handle = handle.clone();
                let task_label = task_label.clone();
                async move {
                    client
                        .get_key_pair_public_parameter(&handle, name)
                        .await
                        .map_err(|error| {
                            ProviderError::keyd(format!("read {name} of {task_label}"), &error)
                        })
                }
            };
            let bytes = |name: &'static str, text: String| {
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(|_| {
                        ProviderError::Internal(format!("keyd sent a {name} that is not base64"))
                    })
            };
            let public = match parameter("algorithm").await?.as_str() {
                "ECDSA" => {
                    let curve = bytes("ec-curve-oid", parameter("ec-curve-oid").await?)?;
                    if curve != P256_OID_DER {
                        return Err(ProviderError::Unsupported(format!(
                            "{task_label} is on an EC curve other than P-256"
                        )));
                    }
                    let point = bytes("ec-point", parameter("ec-point").await?)?;
                    let point = compress_point(&point).ok_or_else(|| {
                        ProviderError::Internal("keyd sent an unusable EC point".into())
                    })?;
                    PublicKey::Ec { point }
                }
                "RSA" => PublicKey::Rsa {
                    modulus: params::strip_leading_zeros(&bytes(
                        "rsa-modulus",
                        parameter("rsa-modulus").await?,
                    )?)
                    .to_vec(),
                    exponent: params::strip_leading_zeros(&bytes(
                        "rsa-exponent",
                        parameter("rsa-exponent").await?,
                    )?)
                    .to_vec(),
                },
                other => {
                    return Err(ProviderError::Unsupported(format!(
                        "{task_label} has algorithm {other:?}, not ECDSA or RSA"
                    )))
                }
            };
            Ok(KeyMaterial {
                public,
                handle: Some(handle),
                label: task_label,
            })
        })
        .map(|material| KeyMaterial { label, ..material })
}

fn ec_algorithm_table() -> Vec<OsslDispatch> {
    let mut table = common_functions();
    table.push(function!(ffi::FUNC_KEYMGMT_NEW, ec_new));
    table.push(function!(
        ffi::FUNC_KEYMGMT_QUERY_OPERATION_NAME,
        ec_operation_name
    ));
    table.push(end_of_table());
    table
}

fn rsa_algorithm_table() -> Vec<OsslDispatch> {
    let mut table = common_functions();
    table.push(function!(ffi::FUNC_KEYMGMT_NEW, rsa_new));
    table.push(function!(
        ffi::FUNC_KEYMGMT_QUERY_OPERATION_NAME,
        rsa_operation_name
    ));
    table.push(end_of_table());
    table
}

fn common_functions() -> Vec<OsslDispatch> {
    vec![
        function!(ffi::FUNC_KEYMGMT_LOAD, load),
        function!(ffi::FUNC_KEYMGMT_FREE, free),
        function!(ffi::FUNC_KEYMGMT_GET_PARAMS, get_params),
        function!(ffi::FUNC_KEYMGMT_GETTABLE_PARAMS, gettable_params),
        function!(ffi::FUNC_KEYMGMT_HAS, has),
        function!(ffi::FUNC_KEYMGMT_VALIDATE, validate),
        function!(ffi::FUNC_KEYMGMT_MATCH, key_match),
        function!(ffi::FUNC_KEYMGMT_IMPORT, import),
        function!(ffi::FUNC_KEYMGMT_IMPORT_TYPES, import_types),
        function!(ffi::FUNC_KEYMGMT_EXPORT, export),
        function!(ffi::FUNC_KEYMGMT_EXPORT_TYPES, import_types),
        function!(ffi::FUNC_KEYMGMT_DUP, dup),
    ]
}

static EC_TABLE: LazyLock<Table<OsslDispatch>> = LazyLock::new(|| Table(ec_algorithm_table()));
static RSA_TABLE: LazyLock<Table<OsslDispatch>> = LazyLock::new(|| Table(rsa_algorithm_table()));

/// The key management algorithms (names as OpenSSL's default provider spells them, so
/// `EVP_PKEY_is_a(key, "EC")` and libssl's checks hold).
pub static ALGORITHMS: LazyLock<Table<OsslAlgorithm>> = LazyLock::new(|| {
    Table(vec![
        OsslAlgorithm {
            algorithm_names: c"EC:id-ecPublicKey:1.2.840.10045.2.1".as_ptr(),
            property_definition: c"provider=keyd".as_ptr(),
            implementation: EC_TABLE.0.as_ptr(),
            algorithm_description: c"P-256 keys held by keyd".as_ptr(),
        },
        OsslAlgorithm {
            algorithm_names: c"RSA:rsaEncryption:1.2.840.113549.1.1.1".as_ptr(),
            property_definition: c"provider=keyd".as_ptr(),
            implementation: RSA_TABLE.0.as_ptr(),
            algorithm_description: c"RSA keys held by keyd".as_ptr(),
        },
        end_of_algorithms(),
    ])
});

static GETTABLE: LazyLock<ParamList> = LazyLock::new(|| {
    ParamList::new(&[
        (c"bits", ffi::PARAM_INTEGER),
        (c"security-bits", ffi::PARAM_INTEGER),
        (c"max-size", ffi::PARAM_INTEGER),
        (c"default-digest", ffi::PARAM_UTF8_STRING),
        (c"group", ffi::PARAM_UTF8_STRING),
        (c"point-format", ffi::PARAM_UTF8_STRING),
    ])
});

static IMPORT_TYPES: LazyLock<ParamList> = LazyLock::new(|| {
    ParamList::new(&[
        (c"group", ffi::PARAM_UTF8_STRING),
        (c"pub", ffi::PARAM_OCTET_STRING),
        (c"n", ffi::PARAM_UNSIGNED_INTEGER),
        (c"e", ffi::PARAM_UNSIGNED_INTEGER),
    ])
});

/// The key object behind a `keydata` pointer.
///
/// # Safety
/// `keydata` is null or a pointer this module returned and the core has not freed.
pub unsafe fn key_data<'a>(keydata: *const c_void) -> Option<&'a KeyData> {
    // SAFETY: per the contract, a non-null pointer is a live `Box<KeyData>` of ours.
    unsafe { keydata.cast::<KeyData>().as_ref() }
}

fn new_key(provctx: *mut c_void, kind: Kind) -> *mut c_void {
    // SAFETY: the core passes the provctx `OSSL_provider_init` returned.
    match unsafe { provider_from(provctx) } {
        Some(provider) => Box::into_raw(Box::new(KeyData {
            provider,
            kind,
            material: None,
        }))
        .cast::<c_void>(),
        None => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn ec_new(provctx: *mut c_void) -> *mut c_void {
    guard(None, c"keymgmt_new", std::ptr::null_mut(), || {
        new_key(provctx, Kind::Ec)
    })
}

unsafe extern "C" fn rsa_new(provctx: *mut c_void) -> *mut c_void {
    guard(None, c"keymgmt_new", std::ptr::null_mut(), || {
        new_key(provctx, Kind::Rsa)
    })
}

unsafe extern "C" fn ec_operation_name(operation_id: c_int) -> *const c_char {
    guard(
        None,
        c"keymgmt_query_operation_name",
        std::ptr::null(),
        || match operation_id {
            ffi::OP_SIGNATURE => c"KEYD-ECDSA".as_ptr(),
            _ => std::ptr::null(),
        },
    )
}

unsafe extern "C" fn rsa_operation_name(operation_id: c_int) -> *const c_char {
    guard(
        None,
        c"keymgmt_query_operation_name",
        std::ptr::null(),
        || match operation_id {
            ffi::OP_SIGNATURE => c"KEYD-RSA".as_ptr(),
            _ => std::ptr::null(),
        },
    )
}

/// The reference the store passes in its object callback: the address of a `KeyData` the
/// store context owns for at least the duration of that callback.
pub fn reference_of(key: &KeyData) -> [u8; std::mem::size_of::<usize>()] {
    (std::ptr::from_ref(key) as usize).to_ne_bytes()
}

unsafe extern "C" fn load(reference: *const c_void, reference_size: usize) -> *mut c_void {
    guard(None, c"keymgmt_load", std::ptr::null_mut(), || {
        if reference.is_null() || reference_size != std::mem::size_of::<usize>() {
            return std::ptr::null_mut();
        }
        // SAFETY: the reference is the `reference_of` bytes our store's object callback passed;
        // libcrypto hands them back unchanged while that callback runs, and the store context
        // keeps the `KeyData` alive meanwhile.
        let key = unsafe {
            let address = std::ptr::read_unaligned(reference.cast::<usize>());
            &*(address as *const KeyData)
        };
        Box::into_raw(Box::new(key.clone())).cast::<c_void>()
    })
}

unsafe extern "C" fn free(keydata: *mut c_void) {
    guard(None, c"keymgmt_free", (), || {
        if !keydata.is_null() {
            // SAFETY: the core frees each keydata once, and it is a `Box<KeyData>` of ours.
            drop(unsafe { Box::from_raw(keydata.cast::<KeyData>()) });
        }
    })
}

unsafe extern "C" fn dup(keydata: *const c_void, _selection: c_int) -> *mut c_void {
    guard(None, c"keymgmt_dup", std::ptr::null_mut(), || {
        // SAFETY: the core passes a live keydata of ours.
        match unsafe { key_data(keydata) } {
            Some(key) => Box::into_raw(Box::new(key.clone())).cast::<c_void>(),
            None => std::ptr::null_mut(),
        }
    })
}

unsafe extern "C" fn gettable_params(_provctx: *mut c_void) -> *const OsslParam {
    guard(None, c"keymgmt_gettable_params", std::ptr::null(), || {
        GETTABLE.as_ptr()
    })
}

unsafe extern "C" fn import_types(_selection: c_int) -> *const OsslParam {
    guard(None, c"keymgmt_import_types", std::ptr::null(), || {
        IMPORT_TYPES.as_ptr()
    })
}

unsafe extern "C" fn get_params(keydata: *mut c_void, request: *mut OsslParam) -> c_int {
    // SAFETY: the core passes a live keydata of ours.
    let Some(key) = (unsafe { key_data(keydata) }) else {
        return 0;
    };
    guard(Some(&key.provider), c"keymgmt_get_params", 0, || {
        let Some(material) = &key.material else {
            return 0;
        };
        let public = &material.public;
        // SAFETY: the core passes an array ended by a null key.
        for param in unsafe { params::entries(request) } {
            let ok = match (params::name(param), public) {
                (b"bits", _) => params::set_integer(param, public.bits() as i64),
                (b"security-bits", _) => params::set_integer(param, public.security_bits() as i64),
                (b"max-size", _) => params::set_integer(param, public.max_signature_size() as i64),
                (b"default-digest", _) => params::set_utf8(param, "SHA256"),
                (b"group", PublicKey::Ec { .. }) => params::set_utf8(param, "prime256v1"),
                (b"point-format", PublicKey::Ec { .. }) => params::set_utf8(param, "uncompressed"),
                _ => true,
            };
            if !ok {
                return 0;
            }
        }
        1
    })
}

unsafe extern "C" fn has(keydata: *const c_void, selection: c_int) -> c_int {
    guard(None, c"keymgmt_has", 0, || {
        // SAFETY: the core passes a live keydata of ours (or null).
        let Some(key) = (unsafe { key_data(keydata) }) else {
            return 0;
        };
        let Some(material) = &key.material else {
            return c_int::from(
                selection & (ffi::SELECT_PUBLIC_KEY | ffi::SELECT_PRIVATE_KEY) == 0,
            );
        };
        // The private half is "present" when keyd can sign with it.
        if selection & ffi::SELECT_PRIVATE_KEY != 0 && material.handle.is_none() {
            return 0;
        }
        1
    })
}

unsafe extern "C" fn validate(keydata: *const c_void, selection: c_int, _check: c_int) -> c_int {
    // SAFETY: forwarded with the core's own arguments.
    unsafe { has(keydata, selection) }
}

unsafe extern "C" fn key_match(
    first: *const c_void,
    second: *const c_void,
    selection: c_int,
) -> c_int {
    guard(None, c"keymgmt_match", 0, || {
        // SAFETY: the core passes two live keydata of ours.
        let (Some(first), Some(second)) = (unsafe { key_data(first) }, unsafe { key_data(second) })
        else {
            return 0;
        };
        let (Some(first), Some(second)) = (&first.material, &second.material) else {
            return 0;
        };
        if selection
            & (ffi::SELECT_PUBLIC_KEY | ffi::SELECT_PRIVATE_KEY | ffi::SELECT_DOMAIN_PARAMETERS)
            == 0
        {
            return 1;
        }
        // Domain parameters are P-256 for every EC key here; the public values decide.
        c_int::from(first.public == second.public)
    })
}

fn import_public(kind: Kind, request: &[&mut OsslParam]) -> Result<PublicKey, ProviderError> {
    let find = |name: &[u8]| request.iter().find(|param| params::name(param) == name);
    if find(b"priv").is_some() || find(b"d").is_some() {
        return Err(ProviderError::Unsupported(
            "the keyd provider holds no private key material; import the key into keyd".into(),
        ));
    }
    match kind {
        Kind::Ec => {
            if let Some(group) = find(b"group").and_then(|param| params::get_utf8(param)) {
                if !matches!(group.as_str(), "prime256v1" | "P-256" | "secp256r1") {
                    return Err(ProviderError::Unsupported(format!(
                        "EC group {group} (only P-256)"
                    )));
                }
            }
            let point = find(b"pub")
                .and_then(|param| params::get_octets(param))
                .and_then(|point| compress_point(&point))
                .ok_or_else(|| ProviderError::Unsupported("no usable P-256 public point".into()))?;
            Ok(PublicKey::Ec { point })
        }
        Kind::Rsa => {
            let modulus = find(b"n").and_then(|param| params::get_big_number(param));
            let exponent = find(b"e").and_then(|param| params::get_big_number(param));
            match (modulus, exponent) {
                (Some(modulus), Some(exponent)) => Ok(PublicKey::Rsa { modulus, exponent }),
                _ => Err(ProviderError::Unsupported(
                    "an RSA public key needs n and e".into(),
                )),
            }
        }
    }
}

unsafe extern "C" fn import(
    keydata: *mut c_void,
    selection: c_int,
    request: *const OsslParam,
) -> c_int {
    // SAFETY: the core passes a live keydata of ours, not used elsewhere during the call.
    let Some(key) = (unsafe { keydata.cast::<KeyData>().as_mut() }) else {
        return 0;
    };
    let provider = Arc::clone(&key.provider);
    guard(Some(&provider), c"keymgmt_import", 0, || {
        if selection & (ffi::SELECT_PUBLIC_KEY | ffi::SELECT_PRIVATE_KEY) == 0 {
            // Domain parameters alone: P-256 is implied.
            return 1;
        }
        // SAFETY: the core passes an array ended by a null key; it is only read.
        let entries = unsafe { params::entries(request.cast_mut()) };
        match import_public(key.kind, &entries) {
            Ok(public) => {
                key.material = Some(Arc::new(KeyMaterial {
                    public,
                    handle: None,
                    label: "an imported public key".to_owned(),
                }));
                1
            }
            Err(error) => {
                provider.report(&error, c"keymgmt_import");
                0
            }
        }
    })
}

unsafe extern "C" fn export(
    keydata: *mut c_void,
    selection: c_int,
    callback: Option<OsslCallback>,
    argument: *mut c_void,
) -> c_int {
    // SAFETY: the core passes a live keydata of ours.
    let Some(key) = (unsafe { key_data(keydata) }) else {
        return 0;
    };
    guard(Some(&key.provider), c"keymgmt_export", 0, || {
        let (Some(material), Some(callback)) = (&key.material, callback) else {
            return 0;
        };
        let mut outgoing = OutgoingParams::default();
        let wants_public = selection & (ffi::SELECT_PUBLIC_KEY | ffi::SELECT_PRIVATE_KEY) != 0;
        match &material.public {
            PublicKey::Ec { point } => {
                if selection & ffi::SELECT_DOMAIN_PARAMETERS != 0 || wants_public {
                    outgoing.utf8(c"group", "prime256v1");
                }
                if wants_public {
                    outgoing.octets(c"pub", point);
                }
            }
            PublicKey::Rsa { modulus, exponent } => {
                if wants_public {
                    outgoing.big_number(c"n", modulus);
                    outgoing.big_number(c"e", exponent);
                }
            }
        }
        let array = outgoing.array();
        // SAFETY: the callback is the core's; the array is ended by a null entry and its
        // buffers (in `outgoing`) outlive the call.
        unsafe { callback(array.as_ptr(), argument) }
    })
}

/// `CStr` of a static name, for messages.
pub fn kind_name(kind: Kind) -> &'static CStr {
    match kind {
        Kind::Ec => c"EC",
        Kind::Rsa => c"RSA",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_compress() {
        let mut uncompressed = vec![0x04];
        uncompressed.extend_from_slice(&[1u8; 32]);
        let mut y = [2u8; 32];
        y[31] = 3;
        uncompressed.extend_from_slice(&y);
        let compressed = compress_point(&uncompressed).unwrap();
        assert_eq!(compressed[0], 0x03);
        assert_eq!(&compressed[1..], &[1u8; 32]);
        assert_eq!(compress_point(&compressed), Some(compressed.clone()));
        assert_eq!(compress_point(&[0x04, 1, 2]), None);
    }

    #[test]
    fn sizes() {
        let rsa = PublicKey::Rsa {
            modulus: vec![0x80; 256],
            exponent: vec![1, 0, 1],
        };
        assert_eq!(rsa.bits(), 2048);
        assert_eq!(rsa.max_signature_size(), 256);
        assert_eq!(rsa.security_bits(), 112);
        let ec = PublicKey::Ec { point: vec![2; 33] };
        assert_eq!(
            (ec.bits(), ec.max_signature_size(), ec.security_bits()),
            (256, 72, 128)
        );
    }
}
