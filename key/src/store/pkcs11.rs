//! The PKCS#11 key store: keys as objects in a token, labelled with their key ID.
//!
//! [`Pkcs11Store`] keeps dynamic keys in the base-slot token; [`Pkcs11Preloaded`] loads
//! preloaded keys named by a `pkcs11:` URI. Both hand out [`TokenSecretKey`] and [`TokenKeyPair`],
//! which perform every operation in the token on a pooled session (see `pkcs11-sys`). On a
//! hardware slot they answer `runs_inline() == false`, so the service calls them on blocking
//! threads. On a software slot (`CKF_HW_SLOT` clear, e.g. SoftHSM2) the module computes in this
//! process like the file store does, so HMAC, AES and EC operations run on the async thread
//! that received the request (two thread hand-offs per request cost more than the operation;
//! docs/pkcs11.md has the figures); RSA stays on blocking threads. On SoftHSM2 the operations
//! go to in-token session copies of each object (one per pooled session), re-checked against the
//! token object every second (`pkcs11_sys::TokenKey`), because SoftHSM2 re-reads a token
//! object's file on every use.
//!
//! Generated objects are `CKA_TOKEN`, `CKA_PRIVATE`, `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`,
//! with `CKA_LABEL` = key ID; both halves of a key pair share a random 16-byte `CKA_ID`.
//! `derive`/`sign` keys are 32-byte generic secrets used with `CKM_SHA256_HMAC`; `encrypt` keys
//! are AES keys used with `CKM_AES_GCM`; key pairs are EC P-256 (`CKM_ECDSA`, raw `r‖s`
//! converted to DER here) or RSA (`CKM_RSA_PKCS`, `CKM_RSA_X509`).
//!
//! [`StoreError::NotSupported`] is returned exactly where the service may fall back to the file
//! store (symmetric generation or import the token cannot do) or try the next key pair algorithm.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Public};
use openssl::rsa::Rsa;
use pkcs11_sys::cryptoki::context::Function;
use pkcs11_sys::cryptoki::error::{Error as CryptokiError, RvError};
use pkcs11_sys::cryptoki::mechanism::aead::GcmParams;
use pkcs11_sys::cryptoki::mechanism::Mechanism;
use pkcs11_sys::cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use pkcs11_sys::cryptoki::session::Session;
use pkcs11_sys::cryptoki::types::Ulong;
use pkcs11_sys::{Module, Pkcs11Error, Pkcs11Uri, Token, TokenKey};

use crate::service::PreloadedLoader;
use crate::store::{
    KeyAlgorithm, KeyKind, KeyPair, KeyStore, RsaPadding, StoreError, StoredKey, SymmetricKey,
    Usage,
};

/// DER of the P-256 curve OID (`CKA_EC_PARAMS` of generated EC keys).
const P256_OID_DER: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
const P384_OID_DER: &[u8] = &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22];
const P521_OID_DER: &[u8] = &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x23];
const GCM_TAG_LENGTH: usize = 16;

fn token_error(error: Pkcs11Error) -> StoreError {
    StoreError::Token(error.to_string())
}

/// Maps a failed key operation: key/mechanism mismatches and bad input are the caller's fault.
fn operation_error(error: Pkcs11Error) -> StoreError {
    match error.rv() {
        Some(
            RvError::KeyTypeInconsistent
            | RvError::KeyFunctionNotPermitted
            | RvError::MechanismInvalid
            | RvError::MechanismParamInvalid,
        ) => StoreError::InvalidInput("mechanism cannot be used with this key type".to_owned()),
        Some(RvError::DataInvalid | RvError::DataLenRange) => {
            StoreError::InvalidInput("the input is not acceptable for this key".to_owned())
        }
        _ => token_error(error),
    }
}

/// Whether a generation failure means "this token cannot make this kind of key".
fn generation_unsupported(error: &Pkcs11Error) -> bool {
    matches!(
        error.rv(),
        Some(
            RvError::FunctionNotSupported
                | RvError::MechanismInvalid
                | RvError::MechanismParamInvalid
                | RvError::KeySizeRange
                | RvError::CurveNotSupported
                | RvError::DomainParamsInvalid
                | RvError::TemplateInconsistent
                | RvError::AttributeValueInvalid
                | RvError::AttributeTypeInvalid
        )
    )
}

fn label(id: &str) -> Attribute {
    Attribute::Label(id.as_bytes().to_vec())
}

/// Attributes every secret-bearing generated or imported object gets.
fn secret_attributes(id: &str) -> Vec<Attribute> {
    vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        label(id),
    ]
}

/// Usage flags of a secret key: HMAC (sign/verify) or AES (encrypt/decrypt), nothing else.
fn secret_key_usage(hmac: bool) -> [Attribute; 7] {
    [
        Attribute::Sign(hmac),
        Attribute::Verify(hmac),
        Attribute::Encrypt(!hmac),
        Attribute::Decrypt(!hmac),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
    ]
}

fn random_bytes<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut bytes = [0_u8; N];
    openssl::rand::rand_bytes(&mut bytes)?;
    Ok(bytes)
}

/// Strips a DER OCTET STRING header when `bytes` is exactly one OCTET STRING.
fn der_octet_string(bytes: &[u8]) -> Option<&[u8]> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != 0x04 {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (length, content) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => (usize::from(*rest.first()?), rest.get(1..)?),
        0x82 => (
            usize::from(*rest.first()?) << 8 | usize::from(*rest.get(1)?),
            rest.get(2..)?,
        ),
        _ => return None,
    };
    (content.len() == length).then_some(content)
}

/// An EC public key from `CKA_EC_PARAMS` (named curve OID) and `CKA_EC_POINT` (DER OCTET STRING
/// of the SEC1 point, or the raw point as some tokens return it).
fn ec_public_key(params: &[u8], point: &[u8]) -> Result<PKey<Public>, StoreError> {
    let nid = match params {
        P256_OID_DER => Nid::X9_62_PRIME256V1,
        P384_OID_DER => Nid::SECP384R1,
        P521_OID_DER => Nid::SECP521R1,
        _ => {
            return Err(StoreError::Token(
                "EC key on an unsupported curve".to_owned(),
            ))
        }
    };
    let group = EcGroup::from_curve_name(nid)?;
    let mut context = BigNumContext::new()?;
    let parsed = der_octet_string(point)
        .and_then(|inner| EcPoint::from_bytes(&group, inner, &mut context).ok());
    let parsed = match parsed {
        Some(parsed) => parsed,
        None => EcPoint::from_bytes(&group, point, &mut context)?,
    };
    Ok(PKey::from_ec_key(EcKey::from_public_key(&group, &parsed)?)?)
}

fn rsa_public_key(modulus: &[u8], exponent: &[u8]) -> Result<PKey<Public>, StoreError> {
    let rsa =
        Rsa::from_public_components(BigNum::from_slice(modulus)?, BigNum::from_slice(exponent)?)?;
    Ok(PKey::from_rsa(rsa)?)
}

fn bytes_attribute(attributes: &[Attribute], wanted: AttributeType) -> Option<&[u8]> {
    attributes
        .iter()
        .find_map(|attribute| match (attribute, wanted) {
            (Attribute::EcParams(bytes), AttributeType::EcParams)
            | (Attribute::EcPoint(bytes), AttributeType::EcPoint)
            | (Attribute::Modulus(bytes), AttributeType::Modulus)
            | (Attribute::PublicExponent(bytes), AttributeType::PublicExponent)
            | (Attribute::Id(bytes), AttributeType::Id) => Some(bytes.as_slice()),
            _ => None,
        })
}

fn key_type_of(attributes: &[Attribute]) -> Option<KeyType> {
    attributes.iter().find_map(|attribute| match attribute {
        Attribute::KeyType(key_type) => Some(*key_type),
        _ => None,
    })
}

/// Reads the public key of `object` (a public key object, or an RSA private key, which carries
/// the modulus and exponent too).
fn read_public_key(
    session: &Session,
    object: ObjectHandle,
) -> Result<Option<PKey<Public>>, LoadError> {
    let attributes = session.get_attributes(
        object,
        &[
            AttributeType::KeyType,
            AttributeType::EcParams,
            AttributeType::EcPoint,
            AttributeType::Modulus,
            AttributeType::PublicExponent,
        ],
    )?;
    let key_type = key_type_of(&attributes);
    if key_type == Some(KeyType::EC) {
        if let (Some(params), Some(point)) = (
            bytes_attribute(&attributes, AttributeType::EcParams),
            bytes_attribute(&attributes, AttributeType::EcPoint),
        ) {
            return Ok(Some(ec_public_key(params, point)?));
        }
    } else if key_type == Some(KeyType::RSA) {
        if let (Some(modulus), Some(exponent)) = (
            bytes_attribute(&attributes, AttributeType::Modulus),
            bytes_attribute(&attributes, AttributeType::PublicExponent),
        ) {
            return Ok(Some(rsa_public_key(modulus, exponent)?));
        }
    } else {
        return Err(LoadError::Store(StoreError::Token(
            "the key pair is neither EC nor RSA".to_owned(),
        )));
    }
    Ok(None)
}

/// Failures inside a session closure: token errors keep their return value for the pool.
enum LoadError {
    Token(CryptokiError),
    Store(StoreError),
}

impl From<CryptokiError> for LoadError {
    fn from(error: CryptokiError) -> Self {
        LoadError::Token(error)
    }
}

impl From<StoreError> for LoadError {
    fn from(error: StoreError) -> Self {
        LoadError::Store(error)
    }
}

/// Runs `call` on a session of `token`, keeping non-token errors apart.
fn in_session<T>(
    token: &Token,
    mut call: impl FnMut(&Session) -> Result<T, LoadError>,
) -> Result<T, StoreError> {
    let mut store_error = None;
    let result = token.with_session(|session| match call(session) {
        Ok(value) => Ok(Some(value)),
        Err(LoadError::Token(error)) => Err(error),
        Err(LoadError::Store(error)) => {
            store_error = Some(error);
            Ok(None)
        }
    });
    match (result, store_error) {
        (Ok(Some(value)), _) => Ok(value),
        (Ok(None), Some(error)) => Err(error),
        (Ok(None), None) => Err(StoreError::Token("token call produced nothing".to_owned())),
        (Err(error), _) => Err(token_error(error)),
    }
}

/// Which objects a key is looked up by: label, `CKA_ID`, or both.
#[derive(Clone, Copy, Debug)]
struct Selector<'a> {
    label: Option<&'a str>,
    cka_id: Option<&'a [u8]>,
}

impl Selector<'_> {
    fn template(&self, class: ObjectClass) -> Vec<Attribute> {
        let mut template = vec![Attribute::Class(class)];
        if let Some(text) = self.label {
            template.push(label(text));
        }
        if let Some(cka_id) = self.cka_id {
            template.push(Attribute::Id(cka_id.to_vec()));
        }
        template
    }
}

/// Finds the key `selector` names: a secret key, else a private key with its public half.
fn find_key(
    token: &Arc<Token>,
    selector: Selector<'_>,
    id: &str,
) -> Result<Option<StoredKey>, StoreError> {
    in_session(token, |session| {
        let secrets = session.find_objects(&selector.template(ObjectClass::SECRET_KEY))?;
        if let Some(&object) = secrets.first() {
            if secrets.len() > 1 {
                log::warn!(
                    "key {id:?}: {} secret key objects match; using the first",
                    secrets.len()
                );
            }
            return Ok(Some(StoredKey::Symmetric(Arc::new(TokenSecretKey::new(
                Arc::clone(token),
                object,
            )))));
        }
        let privates = session.find_objects(&selector.template(ObjectClass::PRIVATE_KEY))?;
        let Some(&private) = privates.first() else {
            return Ok(None);
        };
        if privates.len() > 1 {
            log::warn!(
                "key {id:?}: {} private key objects match; using the first",
                privates.len()
            );
        }
        let private_attributes = session.get_attributes(private, &[AttributeType::Id])?;
        let pair_id = bytes_attribute(&private_attributes, AttributeType::Id)
            .filter(|bytes| !bytes.is_empty())
            .map(<[u8]>::to_vec);
        let mut publics = Vec::new();
        if let Some(pair_id) = &pair_id {
            let by_pair_id = Selector {
                label: selector.label,
                cka_id: Some(pair_id),
            };
            publics = session.find_objects(&by_pair_id.template(ObjectClass::PUBLIC_KEY))?;
        }
        if publics.is_empty() {
            publics = session.find_objects(&selector.template(ObjectClass::PUBLIC_KEY))?;
        }
        let mut public = None;
        for object in publics.into_iter().chain(std::iter::once(private)) {
            public = read_public_key(session, object)?;
            if public.is_some() {
                break;
            }
        }
        let public = public.ok_or_else(|| {
            StoreError::Token(format!(
                "key pair {id:?} has no readable public key in the token"
            ))
        })?;
        Ok(Some(StoredKey::Pair(Arc::new(TokenKeyPair::new(
            Arc::clone(token),
            private,
            public,
        )))))
    })
}

/// Keys in the base-slot token, labelled with their key ID.
#[derive(Debug)]
pub struct Pkcs11Store {
    token: Arc<Token>,
    cache: RwLock<HashMap<String, StoredKey>>,
}

impl Pkcs11Store {
    /// Opens the token `base_slot` selects (`object` is ignored) and logs in.
    pub fn open(module: &Module, base_slot: &str) -> Result<Self, Pkcs11Error> {
        let uri = Pkcs11Uri::parse(base_slot)?;
        let token = module.token(&uri)?;
        Ok(Pkcs11Store {
            token,
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// The token in use.
    pub fn token(&self) -> &Arc<Token> {
        &self.token
    }

    fn cached(&self, id: &str) -> Option<StoredKey> {
        self.cache
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .get(id)
            .cloned()
    }

    fn cache_put(&self, id: &str, key: Option<StoredKey>) {
        let mut cache = self
            .cache
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        match key {
            Some(key) => cache.insert(id.to_owned(), key),
            None => cache.remove(id),
        };
    }

    fn destroy_labelled(&self, id: &str, classes: &[ObjectClass]) -> Result<(), StoreError> {
        in_session(&self.token, |session| {
            for &class in classes {
                for object in session.find_objects(&[Attribute::Class(class), label(id)])? {
                    session.destroy_object(object)?;
                }
            }
            Ok(())
        })
    }

    /// Generates an AES key (32 bytes, else 16) and checks that AES-GCM with a long IV works.
    fn generate_aes(&self, id: &str) -> Result<TokenSecretKey, StoreError> {
        let mut last_error = None;
        for length in [32_u64, 16] {
            let mut template = secret_attributes(id);
            template.extend([
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::ValueLen(Ulong::from(length)),
            ]);
            template.extend(secret_key_usage(false));
            match self
                .token
                .with_session(|session| session.generate_key(&Mechanism::AesKeyGen, &template))
            {
                Ok(object) => {
                    let key = TokenSecretKey::new(Arc::clone(&self.token), object);
                    if let Err(reason) = key.probe_gcm() {
                        drop(key);
                        self.token
                            .with_session(|session| session.destroy_object(object))
                            .map_err(token_error)?;
                        return Err(StoreError::NotSupported(format!(
                            "the token's AES-GCM failed a test encryption: {reason}"
                        )));
                    }
                    return Ok(key);
                }
                Err(error)
                    if matches!(
                        error.rv(),
                        Some(RvError::FunctionNotSupported | RvError::MechanismInvalid)
                    ) =>
                {
                    return Err(StoreError::NotSupported(error.to_string()))
                }
                Err(error) if generation_unsupported(&error) => last_error = Some(error),
                Err(error) => return Err(token_error(error)),
            }
        }
        Err(StoreError::NotSupported(last_error.map_or_else(
            || "AES key generation failed".to_owned(),
            |error| error.to_string(),
        )))
    }
}

fn no_single_object_type() -> StoreError {
    StoreError::NotSupported(
        "no single token object type serves encrypt together with derive or sign".to_owned(),
    )
}

impl KeyStore for Pkcs11Store {
    fn name(&self) -> &'static str {
        "pkcs11"
    }

    fn load(&self, id: &str) -> Result<Option<StoredKey>, StoreError> {
        if let Some(key) = self.cached(id) {
            return Ok(Some(key));
        }
        let selector = Selector {
            label: Some(id),
            cka_id: None,
        };
        let key = find_key(&self.token, selector, id)?;
        if let Some(key) = &key {
            self.cache_put(id, Some(key.clone()));
        }
        Ok(key)
    }

    fn generate_key(&self, id: &str, usage: Usage) -> Result<StoredKey, StoreError> {
        if usage.encrypt && (usage.derive || usage.sign) {
            return Err(no_single_object_type());
        }
        let key = if usage.encrypt {
            self.generate_aes(id)?
        } else {
            let mut template = secret_attributes(id);
            template.extend([
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::ValueLen(Ulong::from(32_u64)),
            ]);
            template.extend(secret_key_usage(true));
            let object = self
                .token
                .with_session(|session| {
                    session.generate_key(&Mechanism::GenericSecretKeyGen, &template)
                })
                .map_err(|error| match error.rv() {
                    Some(RvError::FunctionNotSupported | RvError::MechanismInvalid) => {
                        StoreError::NotSupported(error.to_string())
                    }
                    _ => token_error(error),
                })?;
            TokenSecretKey::new(Arc::clone(&self.token), object)
        };
        let key = StoredKey::Symmetric(Arc::new(key));
        self.cache_put(id, Some(key.clone()));
        Ok(key)
    }

    fn import_key(&self, id: &str, usage: Usage, bytes: &[u8]) -> Result<StoredKey, StoreError> {
        // A refusal changes nothing here: the caller may put the key in the file store, and
        // then removes this token's old key of the ID itself, once that import has succeeded.
        let refuse = |error: StoreError| -> Result<StoredKey, StoreError> { Err(error) };
        if usage.encrypt && (usage.derive || usage.sign) {
            return refuse(no_single_object_type());
        }
        let mut template = secret_attributes(id);
        template.push(Attribute::Class(ObjectClass::SECRET_KEY));
        if usage.encrypt {
            if ![16, 24, 32].contains(&bytes.len()) {
                return refuse(StoreError::NotSupported(
                    "a token AES key must be 16, 24 or 32 bytes".to_owned(),
                ));
            }
            template.push(Attribute::KeyType(KeyType::AES));
        } else {
            template.push(Attribute::KeyType(KeyType::GENERIC_SECRET));
        }
        template.extend(secret_key_usage(!usage.encrypt));
        template.push(Attribute::Value(bytes.to_vec()));
        // Create first, then destroy what the label named before.
        let created: Result<Result<ObjectHandle, CryptokiError>, StoreError> =
            in_session(&self.token, |session| {
                let old = session
                    .find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), label(id)])?;
                let created = session.create_object(&template);
                if created.is_ok() {
                    for object in old {
                        session.destroy_object(object)?;
                    }
                }
                Ok(created)
            });
        self.cache_put(id, None);
        let object = match created? {
            Ok(object) => object,
            Err(error) => {
                return refuse(StoreError::NotSupported(format!(
                    "the token refused the key: {}",
                    pkcs11_sys::describe(&error)
                )))
            }
        };
        let key = StoredKey::Symmetric(Arc::new(TokenSecretKey::new(
            Arc::clone(&self.token),
            object,
        )));
        self.cache_put(id, Some(key.clone()));
        Ok(key)
    }

    fn generate_key_pair(
        &self,
        id: &str,
        algorithm: KeyAlgorithm,
    ) -> Result<StoredKey, StoreError> {
        let pair_id = random_bytes::<16>()?.to_vec();
        let mut private_template = secret_attributes(id);
        private_template.extend([
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Id(pair_id.clone()),
            Attribute::Sign(true),
        ]);
        let mut public_template = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            label(id),
            Attribute::Id(pair_id),
            Attribute::Verify(true),
        ];
        let mechanism = match algorithm {
            KeyAlgorithm::EcP256 => {
                public_template.push(Attribute::EcParams(P256_OID_DER.to_vec()));
                Mechanism::EccKeyPairGen
            }
            KeyAlgorithm::Rsa2048 | KeyAlgorithm::Rsa4096 => {
                let bits: u64 = if algorithm == KeyAlgorithm::Rsa2048 {
                    2048
                } else {
                    4096
                };
                public_template.extend([
                    Attribute::ModulusBits(Ulong::from(bits)),
                    Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                ]);
                Mechanism::RsaPkcsKeyPairGen
            }
        };
        // Leftover halves under this label (a lone public key) would confuse later loads.
        self.destroy_labelled(id, &[ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY])?;
        let (public, private) = self
            .token
            .with_session(|session| {
                session.generate_key_pair(&mechanism, &public_template, &private_template)
            })
            .map_err(|error| {
                if generation_unsupported(&error) {
                    StoreError::NotSupported(error.to_string())
                } else {
                    token_error(error)
                }
            })?;
        let public_key = in_session(&self.token, |session| {
            read_public_key(session, public)?.ok_or_else(|| {
                LoadError::Store(StoreError::Token(
                    "the generated public key has no readable key attributes".to_owned(),
                ))
            })
        })?;
        let key = StoredKey::Pair(Arc::new(TokenKeyPair::new(
            Arc::clone(&self.token),
            private,
            public_key,
        )));
        self.cache_put(id, Some(key.clone()));
        Ok(key)
    }

    fn delete(&self, id: &str, kind: KeyKind) -> Result<(), StoreError> {
        let classes: &[ObjectClass] = match kind {
            KeyKind::Symmetric => &[ObjectClass::SECRET_KEY],
            KeyKind::Pair => &[ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY],
        };
        let result = self.destroy_labelled(id, classes);
        self.cache_put(id, None);
        result
    }

    fn move_key_pair(&self, from: &str, to: &str) -> Result<(), StoreError> {
        let classes = [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY];
        let result = in_session(&self.token, |session| {
            let mut moving = Vec::new();
            for class in classes {
                moving.extend(session.find_objects(&[Attribute::Class(class), label(from)])?);
            }
            if moving.is_empty() {
                return Err(LoadError::Store(StoreError::Token(format!(
                    "key pair {from:?} is not in the token"
                ))));
            }
            for class in classes {
                for object in session.find_objects(&[Attribute::Class(class), label(to)])? {
                    session.destroy_object(object)?;
                }
            }
            for object in moving {
                session.update_attributes(object, &[label(to)])?;
            }
            Ok(())
        });
        let moved = {
            let mut cache = self
                .cache
                .write()
                .unwrap_or_else(|poison| poison.into_inner());
            cache.remove(to);
            cache.remove(from)
        };
        if result.is_ok() {
            if let Some(key) = moved {
                self.cache_put(to, Some(key));
            }
        }
        result
    }
}

/// A secret key object in a token (HMAC with generic secrets, AES-GCM with AES keys).
#[derive(Debug)]
pub struct TokenSecretKey {
    key: TokenKey,
}

impl TokenSecretKey {
    fn new(token: Arc<Token>, object: ObjectHandle) -> Self {
        TokenSecretKey {
            key: TokenKey::new(token, object),
        }
    }

    /// Encrypts and decrypts a block with a 32-byte IV (edgeAgent's IV length).
    fn probe_gcm(&self) -> Result<(), StoreError> {
        let iv = random_bytes::<32>()?;
        let plaintext = b"keyd AES-GCM probe";
        let (ciphertext, tag) = self.aes_gcm_encrypt(&iv, b"aad", plaintext)?;
        match self.aes_gcm_decrypt(&iv, b"aad", &ciphertext, &tag)? {
            Some(decrypted) if decrypted == plaintext => Ok(()),
            _ => Err(StoreError::Token(
                "AES-GCM round trip did not reproduce the plaintext".to_owned(),
            )),
        }
    }
}

impl SymmetricKey for TokenSecretKey {
    fn hmac_sha256(&self, message: &[u8]) -> Result<Vec<u8>, StoreError> {
        self.key
            .with_object(|session, object| session.sign(&Mechanism::Sha256Hmac, object, message))
            .map_err(operation_error)
    }

    fn aes_gcm_encrypt(
        &self,
        iv: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, [u8; 16]), StoreError> {
        let mut output = self
            .key
            .with_object(|session, object| {
                let mut iv = iv.to_vec();
                let params = GcmParams::new(&mut iv, aad, Ulong::from(128_u64))?;
                session.encrypt(&Mechanism::AesGcm(params), object, plaintext)
            })
            .map_err(operation_error)?;
        if output.len() != plaintext.len() + GCM_TAG_LENGTH {
            return Err(StoreError::Token(
                "AES-GCM output has an unexpected length".to_owned(),
            ));
        }
        let mut tag = [0_u8; GCM_TAG_LENGTH];
        tag.copy_from_slice(&output[plaintext.len()..]);
        output.truncate(plaintext.len());
        Ok((output, tag))
    }

    fn aes_gcm_decrypt(
        &self,
        iv: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; 16],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut input = Vec::with_capacity(ciphertext.len() + GCM_TAG_LENGTH);
        input.extend_from_slice(ciphertext);
        input.extend_from_slice(tag);
        let result = self.key.with_object(|session, object| {
            let mut iv = iv.to_vec();
            let params = GcmParams::new(&mut iv, aad, Ulong::from(128_u64))?;
            session.decrypt(&Mechanism::AesGcm(params), object, &input)
        });
        match result {
            Ok(plaintext) => Ok(Some(plaintext)),
            // The standard answers for a wrong tag; SoftHSM2 answers CKR_GENERAL_ERROR from
            // C_Decrypt (not C_DecryptInit) when the tag does not verify.
            Err(Pkcs11Error::Call(CryptokiError::Pkcs11(
                RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::GeneralError,
                Function::Decrypt,
            ))) => Ok(None),
            Err(error) => Err(operation_error(error)),
        }
    }

    fn accepts_legacy_ciphertext(&self) -> bool {
        false
    }

    fn runs_inline(&self) -> bool {
        self.key.token().is_software()
    }
}

/// A key pair whose private half is a token object.
#[derive(Debug)]
pub struct TokenKeyPair {
    private: TokenKey,
    public: PKey<Public>,
    modulus_length: usize,
}

impl TokenKeyPair {
    fn new(token: Arc<Token>, private: ObjectHandle, public: PKey<Public>) -> Self {
        let modulus_length = public
            .rsa()
            .ok()
            .and_then(|rsa| usize::try_from(rsa.size()).ok())
            .unwrap_or(0);
        TokenKeyPair {
            private: TokenKey::new(token, private),
            public,
            modulus_length,
        }
    }
}

impl KeyPair for TokenKeyPair {
    fn public_key(&self) -> &PKey<Public> {
        &self.public
    }

    fn ecdsa_sign(&self, digest: &[u8]) -> Result<Vec<u8>, StoreError> {
        if self.public.id() != openssl::pkey::Id::EC {
            return Err(StoreError::InvalidInput(
                "mechanism cannot be used with this key type".to_owned(),
            ));
        }
        let raw = self
            .private
            .with_object(|session, object| session.sign(&Mechanism::Ecdsa, object, digest))
            .map_err(operation_error)?;
        if raw.is_empty() || raw.len() % 2 != 0 {
            return Err(StoreError::Token(
                "the token returned a malformed ECDSA signature".to_owned(),
            ));
        }
        let (r, s) = raw.split_at(raw.len() / 2);
        let signature = openssl::ecdsa::EcdsaSig::from_private_components(
            BigNum::from_slice(r)?,
            BigNum::from_slice(s)?,
        )?;
        Ok(signature.to_der()?)
    }

    fn rsa_private_encrypt(
        &self,
        padding: RsaPadding,
        input: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        if self.modulus_length == 0 {
            return Err(StoreError::InvalidInput(
                "mechanism cannot be used with this key type".to_owned(),
            ));
        }
        let mechanism = match padding {
            RsaPadding::Pkcs1 => Mechanism::RsaPkcs,
            RsaPadding::None => Mechanism::RsaX509,
        };
        let output = self
            .private
            .with_object(|session, object| session.sign(&mechanism, object, input))
            .map_err(operation_error)?;
        if output.len() > self.modulus_length {
            return Err(StoreError::Token(
                "the token returned an RSA result longer than the modulus".to_owned(),
            ));
        }
        // Some tokens drop leading zero bytes; the API promises the modulus length.
        let mut padded = vec![0_u8; self.modulus_length - output.len()];
        padded.extend_from_slice(&output);
        Ok(padded)
    }

    fn runs_inline(&self) -> bool {
        // An RSA signature takes milliseconds even in software: blocking threads, as for files.
        self.private.token().is_software() && self.public.id() == openssl::pkey::Id::EC
    }
}

/// Loads preloaded keys named by `pkcs11:` URIs (`object` and/or `id` select the object;
/// `slot-id` or `token` the token; `pin-value` or `pin-source` the PIN).
#[derive(Debug)]
pub struct Pkcs11Preloaded {
    module: Arc<Module>,
}

impl Pkcs11Preloaded {
    /// A loader over the process's PKCS#11 module.
    pub fn new(module: Arc<Module>) -> Self {
        Pkcs11Preloaded { module }
    }

    /// Checks the syntax of a preloaded key URI (at startup, before any token is touched).
    pub fn check_uri(uri: &str) -> Result<(), String> {
        let parsed = Pkcs11Uri::parse(uri).map_err(|error| error.to_string())?;
        if parsed.object.is_none() && parsed.id.is_none() {
            return Err("the URI names no object (object= or id=)".to_owned());
        }
        Ok(())
    }
}

impl PreloadedLoader for Pkcs11Preloaded {
    fn load_uri(&self, id: &str, uri: &str) -> Result<Option<StoredKey>, StoreError> {
        let parsed = Pkcs11Uri::parse(uri).map_err(|error| {
            StoreError::Token(format!("preloaded key {id:?} has an invalid URI: {error}"))
        })?;
        if parsed.object.is_none() && parsed.id.is_none() {
            return Err(StoreError::Token(format!(
                "preloaded key {id:?}: the URI names no object (object= or id=)"
            )));
        }
        let token = self
            .module
            .token(&parsed)
            .map_err(|error| StoreError::Token(format!("preloaded key {id:?}: {error}")))?;
        let selector = Selector {
            label: parsed.object.as_deref(),
            cka_id: parsed.id.as_deref(),
        };
        find_key(&token, selector, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octet_string_unwrapping() {
        let mut wrapped = vec![0x04, 0x41];
        wrapped.extend([0x04; 65]);
        assert_eq!(der_octet_string(&wrapped).map(<[u8]>::len), Some(65));
        // A raw uncompressed point also starts with 0x04 but its length byte does not fit.
        let raw = [0x04; 65];
        assert_eq!(der_octet_string(&raw), None);
        assert_eq!(
            der_octet_string(&[0x04, 0x81, 0x01, 0xAA]),
            Some(&[0xAA][..])
        );
        assert_eq!(der_octet_string(&[]), None);
    }

    #[test]
    fn ec_point_in_both_encodings() {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
        let key = EcKey::generate(&group).unwrap();
        let mut context = BigNumContext::new().unwrap();
        let point = key
            .public_key()
            .to_bytes(
                &group,
                openssl::ec::PointConversionForm::UNCOMPRESSED,
                &mut context,
            )
            .unwrap();
        let mut wrapped = vec![0x04, u8::try_from(point.len()).unwrap()];
        wrapped.extend_from_slice(&point);
        for encoding in [&point, &wrapped] {
            let public = ec_public_key(P256_OID_DER, encoding).unwrap();
            assert!(public
                .ec_key()
                .unwrap()
                .public_key()
                .eq(&group, key.public_key(), &mut context)
                .unwrap());
        }
        assert!(ec_public_key(&[0x06, 0x01, 0x00], &point).is_err());
    }
}
