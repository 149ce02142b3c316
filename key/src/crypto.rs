//! In-memory keys backed by OpenSSL, and the byte formats that do not depend on where a key
//! lives: the AEAD ciphertext layout, public-key parameters and HMAC.
//!
//! File keys, preloaded file keys and derived keys all use these types; a PKCS#11 store
//! implements the same traits over token objects.

use openssl::bn::BigNumContext;
use openssl::ec::{EcKey, PointConversionForm};
use openssl::pkey::{Id, PKey, Private, Public};
use openssl::rsa::{Padding, Rsa};
use openssl::symm::Cipher;

use crate::store::{KeyAlgorithm, KeyPair, RsaPadding, StoreError, SymmetricKey};

/// Fills `bytes` from the operating system's CSPRNG (`getrandom(2)`). Used instead of OpenSSL's
/// generator so that a keyd that only serves file symmetric keys never initializes OpenSSL, which
/// costs about 2 MB of resident memory.
pub fn random_bytes(bytes: &mut [u8]) -> Result<(), StoreError> {
    getrandom::fill(bytes).map_err(|error| StoreError::Io {
        path: "getrandom".to_owned(),
        source: std::io::Error::other(error.to_string()),
    })
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    left.len() == right.len() && bool::from(left.ct_eq(right))
}

/// A symmetric key whose bytes are in memory (file, preloaded file, or derived).
pub struct MemoryKey {
    bytes: Vec<u8>,
    /// HMAC state with the key already absorbed, cloned per message.
    hmac: hmac::Hmac<sha2::Sha256>,
}

impl std::fmt::Debug for MemoryKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("MemoryKey(<secret>)")
    }
}

impl MemoryKey {
    /// Wraps key bytes.
    pub fn new(bytes: Vec<u8>) -> Result<Self, StoreError> {
        let hmac = <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(&bytes)
            .map_err(|_| StoreError::InvalidInput("invalid HMAC key".to_owned()))?;
        Ok(MemoryKey { bytes, hmac })
    }

    /// The key bytes (for export of derived keys).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn cipher(&self) -> Result<Cipher, StoreError> {
        if self.bytes.len() == 32 {
            Ok(Cipher::aes_256_gcm())
        } else {
            Err(StoreError::InvalidInput(
                "AEAD needs a 32-byte key; this key has another length".to_owned(),
            ))
        }
    }
}

impl SymmetricKey for MemoryKey {
    fn hmac_sha256(&self, message: &[u8]) -> Result<Vec<u8>, StoreError> {
        use hmac::Mac as _;
        let mut mac = self.hmac.clone();
        mac.update(message);
        Ok(mac.finalize().into_bytes().to_vec())
    }

    fn aes_gcm_encrypt(
        &self,
        iv: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, [u8; 16]), StoreError> {
        let mut tag = [0_u8; 16];
        let ciphertext = openssl::symm::encrypt_aead(
            self.cipher()?,
            &self.bytes,
            Some(iv),
            aad,
            plaintext,
            &mut tag,
        )?;
        Ok((ciphertext, tag))
    }

    fn aes_gcm_decrypt(
        &self,
        iv: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8; 16],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        // OpenSSL reports a tag mismatch as an error stack; every other failure was ruled out by
        // the checks before (key and tag lengths), so an error here means "not authentic".
        Ok(
            openssl::symm::decrypt_aead(
                self.cipher()?,
                &self.bytes,
                Some(iv),
                aad,
                ciphertext,
                tag,
            )
            .ok(),
        )
    }

    fn accepts_legacy_ciphertext(&self) -> bool {
        true
    }

    fn runs_inline(&self) -> bool {
        true
    }
}

/// A key pair whose private key is in memory.
pub struct MemoryKeyPair {
    private: PKey<Private>,
    public: PKey<Public>,
    ec: Option<EcKey<Private>>,
    rsa: Option<Rsa<Private>>,
}

impl std::fmt::Debug for MemoryKeyPair {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "MemoryKeyPair({:?})", self.private.id())
    }
}

impl MemoryKeyPair {
    /// Wraps a private key (EC or RSA; other types are refused).
    pub fn new(private: PKey<Private>) -> Result<Self, StoreError> {
        let public = PKey::public_key_from_der(&private.public_key_to_der()?)?;
        let (ec, rsa) = match private.id() {
            Id::EC => (Some(private.ec_key()?), None),
            Id::RSA => (None, Some(private.rsa()?)),
            _ => {
                return Err(StoreError::InvalidInput(
                    "only EC and RSA private keys are supported".to_owned(),
                ))
            }
        };
        Ok(MemoryKeyPair {
            private,
            public,
            ec,
            rsa,
        })
    }

    /// Generates a new key pair.
    pub fn generate(algorithm: KeyAlgorithm) -> Result<PKey<Private>, StoreError> {
        Ok(match algorithm {
            KeyAlgorithm::EcP256 => {
                let group =
                    openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)?;
                PKey::from_ec_key(EcKey::generate(&group)?)?
            }
            KeyAlgorithm::Rsa2048 => PKey::from_rsa(Rsa::generate(2048)?)?,
            KeyAlgorithm::Rsa4096 => PKey::from_rsa(Rsa::generate(4096)?)?,
        })
    }
}

impl KeyPair for MemoryKeyPair {
    fn public_key(&self) -> &PKey<Public> {
        &self.public
    }

    fn ecdsa_sign(&self, digest: &[u8]) -> Result<Vec<u8>, StoreError> {
        let ec = self.ec.as_ref().ok_or_else(|| {
            StoreError::InvalidInput("mechanism cannot be used with this key type".to_owned())
        })?;
        Ok(openssl::ecdsa::EcdsaSig::sign(digest, ec)?.to_der()?)
    }

    fn rsa_private_encrypt(
        &self,
        padding: RsaPadding,
        input: &[u8],
    ) -> Result<Vec<u8>, StoreError> {
        let rsa = self.rsa.as_ref().ok_or_else(|| {
            StoreError::InvalidInput("mechanism cannot be used with this key type".to_owned())
        })?;
        let mut output = vec![0_u8; usize::try_from(rsa.size()).unwrap_or(0)];
        let padding = match padding {
            RsaPadding::Pkcs1 => Padding::PKCS1,
            RsaPadding::None => Padding::NONE,
        };
        let length = rsa.private_encrypt(input, &mut output, padding)?;
        output.truncate(length);
        Ok(output)
    }

    fn runs_inline(&self) -> bool {
        // P-256 signing takes tens of microseconds; RSA private operations take milliseconds.
        self.rsa.is_none()
    }
}

/// A public-key parameter (`/parameters/{name}`), or why it does not apply.
pub fn public_parameter(public: &PKey<Public>, name: &str) -> Result<String, ParameterError> {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    match (name, public.id()) {
        ("algorithm", Id::EC) => Ok("ECDSA".to_owned()),
        ("algorithm", Id::RSA) => Ok("RSA".to_owned()),
        ("ec-curve-oid", Id::EC) => {
            let ec = public.ec_key()?;
            let nid = ec
                .group()
                .curve_name()
                .ok_or(ParameterError::NotApplicable)?;
            let object = openssl::asn1::Asn1Object::from_str(nid.short_name()?)?;
            let content = object.as_slice();
            let mut der = vec![
                0x06,
                u8::try_from(content.len()).map_err(|_| ParameterError::NotApplicable)?,
            ];
            der.extend_from_slice(content);
            Ok(b64(&der))
        }
        ("ec-point", Id::EC) => {
            let ec = public.ec_key()?;
            let mut context = BigNumContext::new()?;
            let point = ec.public_key().to_bytes(
                ec.group(),
                PointConversionForm::COMPRESSED,
                &mut context,
            )?;
            Ok(b64(&point))
        }
        ("rsa-modulus", Id::RSA) => Ok(b64(&public.rsa()?.n().to_vec())),
        ("rsa-exponent", Id::RSA) => Ok(b64(&public.rsa()?.e().to_vec())),
        ("algorithm" | "ec-curve-oid" | "ec-point" | "rsa-modulus" | "rsa-exponent", _) => {
            Err(ParameterError::NotApplicable)
        }
        _ => Err(ParameterError::Unknown),
    }
}

/// Why a public parameter could not be given.
#[derive(Debug, thiserror::Error)]
pub enum ParameterError {
    /// The parameter name is not one keyd knows.
    #[error("unknown parameter")]
    Unknown,
    /// The parameter does not apply to this key type.
    #[error("parameter does not apply to this key type")]
    NotApplicable,
    /// OpenSSL failed.
    #[error("cryptographic operation failed")]
    Crypto(#[from] openssl::error::ErrorStack),
}

/// The current AEAD ciphertext version: `0x02 ‖ ciphertext ‖ tag`.
pub const AEAD_VERSION_CURRENT: u8 = 0x02;
/// The IoT Edge 1.1 legacy version: `0x01 ‖ tag ‖ ciphertext`.
pub const AEAD_VERSION_LEGACY: u8 = 0x01;
const TAG_LENGTH: usize = 16;

/// Encodes a GCM result in the current format.
pub fn aead_seal(ciphertext: &[u8], tag: &[u8; 16]) -> Vec<u8> {
    let mut output = Vec::with_capacity(1 + ciphertext.len() + TAG_LENGTH);
    output.push(AEAD_VERSION_CURRENT);
    output.extend_from_slice(ciphertext);
    output.extend_from_slice(tag);
    output
}

/// A parsed AEAD ciphertext.
#[derive(Debug, PartialEq, Eq)]
pub struct AeadParts<'a> {
    /// The version byte.
    pub version: u8,
    /// The GCM ciphertext.
    pub ciphertext: &'a [u8],
    /// The GCM tag.
    pub tag: [u8; 16],
}

/// Why an AEAD ciphertext could not be parsed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AeadFormatError {
    /// Shorter than version byte plus tag.
    #[error("malformed ciphertext")]
    Malformed,
    /// Neither 0x01 nor 0x02.
    #[error("unknown ciphertext version {0}")]
    UnknownVersion(u8),
}

/// Splits an AEAD ciphertext into its parts.
pub fn aead_open(input: &[u8]) -> Result<AeadParts<'_>, AeadFormatError> {
    if input.len() < 1 + TAG_LENGTH {
        return Err(AeadFormatError::Malformed);
    }
    let (version, rest) = (input[0], &input[1..]);
    let mut tag = [0_u8; TAG_LENGTH];
    let ciphertext = match version {
        AEAD_VERSION_CURRENT => {
            let (ciphertext, tag_bytes) = rest.split_at(rest.len() - TAG_LENGTH);
            tag.copy_from_slice(tag_bytes);
            ciphertext
        }
        AEAD_VERSION_LEGACY => {
            let (tag_bytes, ciphertext) = rest.split_at(TAG_LENGTH);
            tag.copy_from_slice(tag_bytes);
            ciphertext
        }
        other => return Err(AeadFormatError::UnknownVersion(other)),
    };
    Ok(AeadParts {
        version,
        ciphertext,
        tag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aead_layouts() {
        let sealed = aead_seal(b"abc", &[7; 16]);
        assert_eq!(sealed.len(), 1 + 3 + 16);
        assert_eq!(
            aead_open(&sealed).unwrap(),
            AeadParts {
                version: 2,
                ciphertext: b"abc",
                tag: [7; 16]
            }
        );
        let mut legacy = vec![1_u8];
        legacy.extend_from_slice(&[9; 16]);
        legacy.extend_from_slice(b"xy");
        assert_eq!(
            aead_open(&legacy).unwrap(),
            AeadParts {
                version: 1,
                ciphertext: b"xy",
                tag: [9; 16]
            }
        );
        assert_eq!(aead_open(&[2; 16]), Err(AeadFormatError::Malformed));
        assert_eq!(aead_open(&[3; 17]), Err(AeadFormatError::UnknownVersion(3)));
    }

    #[test]
    fn gcm_with_long_iv_round_trips_and_detects_tampering() {
        let key = MemoryKey::new(vec![5; 32]).unwrap();
        let iv = b"0123456789abcdef0123456789abcdef";
        let (ciphertext, tag) = key.aes_gcm_encrypt(iv, b"aad", b"secret").unwrap();
        assert_eq!(
            key.aes_gcm_decrypt(iv, b"aad", &ciphertext, &tag)
                .unwrap()
                .unwrap(),
            b"secret"
        );
        assert!(key
            .aes_gcm_decrypt(iv, b"other", &ciphertext, &tag)
            .unwrap()
            .is_none());
        let short = MemoryKey::new(vec![5; 16]).unwrap();
        assert!(short.aes_gcm_encrypt(iv, b"", b"x").is_err());
    }

    #[test]
    fn ec_parameters() {
        let pair =
            MemoryKeyPair::new(MemoryKeyPair::generate(KeyAlgorithm::EcP256).unwrap()).unwrap();
        assert_eq!(
            public_parameter(pair.public_key(), "algorithm").unwrap(),
            "ECDSA"
        );
        // 06 08 2A 86 48 CE 3D 03 01 07
        assert_eq!(
            public_parameter(pair.public_key(), "ec-curve-oid").unwrap(),
            "BggqhkjOPQMBBw=="
        );
        assert!(matches!(
            public_parameter(pair.public_key(), "rsa-modulus"),
            Err(ParameterError::NotApplicable)
        ));
        assert!(matches!(
            public_parameter(pair.public_key(), "bogus"),
            Err(ParameterError::Unknown)
        ));
    }
}
