//! Asymmetric signatures made by keyd, for TLS stacks and other signers outside keyd (feature
//! `signing`).
//!
//! keyd signs with a key pair in three ways: ECDSA over a digest the caller computed (`/sign`),
//! RSA PKCS#1 v1.5 over a DER `DigestInfo` (`/encrypt` `RSA-PKCS1`), and the raw RSA private-key
//! operation (`/encrypt` `RSA-NO-PADDING`), over which RSA-PSS is built: the EMSA-PSS encoding
//! is made here and only the private-key operation runs in keyd. This module turns a digest
//! into one of those requests ([`Operation`]) and sends it ([`Client::sign_operation`]). It
//! holds no key material and links no OpenSSL (hashes come from RustCrypto's `sha2`, PSS salts
//! from the kernel), so it can be used inside an OpenSSL provider.

use sha2::Digest as _;

use crate::{Client, ClientError, EncryptMechanism, KeyHandle, SignMechanism};

/// Why a signature request could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigningError {
    /// The digest's length does not match its hash algorithm.
    #[error("a {hash} digest has {expected} bytes, not {actual}")]
    DigestLength {
        /// The hash algorithm.
        hash: Hash,
        /// Its output length.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// The RSA modulus is too small for PSS with this hash and salt.
    #[error("a {modulus_bits}-bit RSA key is too small for PSS with {hash} and a {salt_length}-byte salt")]
    KeyTooSmall {
        /// The modulus size.
        modulus_bits: usize,
        /// The hash algorithm.
        hash: Hash,
        /// The salt length.
        salt_length: usize,
    },
    /// The kernel gave no random bytes for the PSS salt.
    #[error("no random bytes for the PSS salt: {0}")]
    Random(String),
}

/// The hash algorithms TLS 1.2 and 1.3 sign with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    /// SHA-256.
    Sha256,
    /// SHA-384.
    Sha384,
    /// SHA-512.
    Sha512,
}

impl std::fmt::Display for Hash {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Hash::Sha256 => "SHA-256",
            Hash::Sha384 => "SHA-384",
            Hash::Sha512 => "SHA-512",
        })
    }
}

impl Hash {
    /// The algorithm for an OpenSSL digest name (`SHA256`, `SHA2-256`, `sha-256`, ...).
    pub fn from_name(name: &str) -> Option<Hash> {
        let normalized: String = name
            .chars()
            .filter(|character| *character != '-' && *character != '_')
            .collect::<String>()
            .to_ascii_uppercase();
        match normalized.as_str() {
            "SHA256" | "SHA2256" => Some(Hash::Sha256),
            "SHA384" | "SHA2384" => Some(Hash::Sha384),
            "SHA512" | "SHA2512" => Some(Hash::Sha512),
            _ => None,
        }
    }

    /// The output length in bytes.
    pub fn output_length(self) -> usize {
        match self {
            Hash::Sha256 => 32,
            Hash::Sha384 => 48,
            Hash::Sha512 => 64,
        }
    }

    /// The hash of `message`.
    pub fn digest(self, message: &[u8]) -> Vec<u8> {
        match self {
            Hash::Sha256 => sha2::Sha256::digest(message).to_vec(),
            Hash::Sha384 => sha2::Sha384::digest(message).to_vec(),
            Hash::Sha512 => sha2::Sha512::digest(message).to_vec(),
        }
    }

    /// The DER `DigestInfo` prefix of this hash (RFC 8017 section 9.2, note 1).
    fn digest_info_prefix(self) -> &'static [u8] {
        match self {
            Hash::Sha256 => &[
                0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x01, 0x05, 0x00, 0x04, 0x20,
            ],
            Hash::Sha384 => &[
                0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x02, 0x05, 0x00, 0x04, 0x30,
            ],
            Hash::Sha512 => &[
                0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                0x03, 0x05, 0x00, 0x04, 0x40,
            ],
        }
    }

    fn check(self, digest: &[u8]) -> Result<(), SigningError> {
        if digest.len() == self.output_length() {
            Ok(())
        } else {
            Err(SigningError::DigestLength {
                hash: self,
                expected: self.output_length(),
                actual: digest.len(),
            })
        }
    }
}

/// One private-key operation for keyd that yields a signature.
#[derive(Clone, PartialEq, Eq)]
pub enum Operation {
    /// `/sign` `ECDSA` over this digest; the answer is the DER `ECDSA-Sig-Value`.
    Ecdsa(Vec<u8>),
    /// `/encrypt` `RSA-PKCS1` over this `DigestInfo`.
    RsaPkcs1(Vec<u8>),
    /// `/encrypt` `RSA-NO-PADDING` over this encoded message (as long as the modulus).
    RsaRaw(Vec<u8>),
}

impl std::fmt::Debug for Operation {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (name, input) = match self {
            Operation::Ecdsa(input) => ("Ecdsa", input),
            Operation::RsaPkcs1(input) => ("RsaPkcs1", input),
            Operation::RsaRaw(input) => ("RsaRaw", input),
        };
        write!(formatter, "{name}({} bytes)", input.len())
    }
}

impl Operation {
    /// ECDSA over `digest` (any length keyd accepts; P-256 uses 32 bytes).
    pub fn ecdsa(digest: &[u8]) -> Operation {
        Operation::Ecdsa(digest.to_vec())
    }

    /// RSA PKCS#1 v1.5 over a `hash` digest.
    pub fn rsa_pkcs1(hash: Hash, digest: &[u8]) -> Result<Operation, SigningError> {
        hash.check(digest)?;
        let mut input = hash.digest_info_prefix().to_vec();
        input.extend_from_slice(digest);
        Ok(Operation::RsaPkcs1(input))
    }

    /// RSA-PSS (MGF1 with the same hash) over a `hash` digest, with a random salt of
    /// `salt_length` bytes (TLS uses the hash's length).
    pub fn rsa_pss(
        hash: Hash,
        digest: &[u8],
        modulus_bits: usize,
        salt_length: usize,
    ) -> Result<Operation, SigningError> {
        hash.check(digest)?;
        let mut salt = vec![0u8; salt_length];
        getrandom::fill(&mut salt).map_err(|error| SigningError::Random(error.to_string()))?;
        Ok(Operation::RsaRaw(pss_encode(
            hash,
            digest,
            modulus_bits,
            &salt,
        )?))
    }
}

/// The largest PSS salt a `modulus_bits` key can carry with `hash` (OpenSSL's "max").
pub fn pss_max_salt_length(hash: Hash, modulus_bits: usize) -> usize {
    let em_length = modulus_bits.saturating_sub(1).div_ceil(8);
    em_length.saturating_sub(hash.output_length() + 2)
}

/// MGF1 (RFC 8017 B.2.1).
fn mgf1(hash: Hash, seed: &[u8], length: usize) -> Vec<u8> {
    let mut output = Vec::with_capacity(length + hash.output_length());
    let mut counter: u32 = 0;
    while output.len() < length {
        let mut input = seed.to_vec();
        input.extend_from_slice(&counter.to_be_bytes());
        output.extend_from_slice(&hash.digest(&input));
        counter = counter.wrapping_add(1);
    }
    output.truncate(length);
    output
}

/// EMSA-PSS-ENCODE (RFC 8017 9.1.1) of a message hash with `salt`, left-padded with zeros to
/// the modulus length so keyd's raw RSA operation accepts it.
pub fn pss_encode(
    hash: Hash,
    message_hash: &[u8],
    modulus_bits: usize,
    salt: &[u8],
) -> Result<Vec<u8>, SigningError> {
    hash.check(message_hash)?;
    let hash_length = hash.output_length();
    let too_small = || SigningError::KeyTooSmall {
        modulus_bits,
        hash,
        salt_length: salt.len(),
    };
    let em_bits = modulus_bits.checked_sub(1).ok_or_else(too_small)?;
    let em_length = em_bits.div_ceil(8);
    if em_length < hash_length + salt.len() + 2 {
        return Err(too_small());
    }
    let mut m_prime = vec![0u8; 8];
    m_prime.extend_from_slice(message_hash);
    m_prime.extend_from_slice(salt);
    let h = hash.digest(&m_prime);
    let db_length = em_length - hash_length - 1;
    let mut db = vec![0u8; db_length - salt.len() - 1];
    db.push(0x01);
    db.extend_from_slice(salt);
    for (byte, mask_byte) in db.iter_mut().zip(mgf1(hash, &h, db_length)) {
        *byte ^= mask_byte;
    }
    let unused_bits = 8 * em_length - em_bits;
    if let Some(first) = db.first_mut() {
        *first &= 0xffu8 >> unused_bits;
    }
    let modulus_length = modulus_bits.div_ceil(8);
    let mut encoded = vec![0u8; modulus_length - em_length];
    encoded.extend_from_slice(&db);
    encoded.extend_from_slice(&h);
    encoded.push(0xbc);
    Ok(encoded)
}

impl Client {
    /// Runs one signing [`Operation`] with the key pair behind `handle`; the answer is the
    /// signature (DER `ECDSA-Sig-Value` for ECDSA, the modulus-length RSA signature otherwise).
    pub async fn sign_operation(
        &self,
        handle: &KeyHandle,
        operation: &Operation,
    ) -> Result<Vec<u8>, ClientError> {
        match operation {
            Operation::Ecdsa(digest) => self.sign(handle, SignMechanism::Ecdsa { digest }).await,
            Operation::RsaPkcs1(input) => {
                self.encrypt(handle, EncryptMechanism::RsaPkcs1, input)
                    .await
            }
            Operation::RsaRaw(input) => {
                self.encrypt(handle, EncryptMechanism::RsaNoPadding, input)
                    .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_names() {
        for (name, expected) in [
            ("SHA256", Some(Hash::Sha256)),
            ("SHA2-256", Some(Hash::Sha256)),
            ("sha-384", Some(Hash::Sha384)),
            ("SHA2-512", Some(Hash::Sha512)),
            ("SHA1", None),
            ("SHA512-256", None),
        ] {
            assert_eq!(Hash::from_name(name), expected, "{name}");
        }
    }

    #[test]
    fn digest_info_is_prefix_and_digest() {
        let digest = Hash::Sha256.digest(b"abc");
        let Operation::RsaPkcs1(input) = Operation::rsa_pkcs1(Hash::Sha256, &digest).unwrap()
        else {
            panic!("not PKCS#1");
        };
        assert_eq!(input.len(), 19 + 32);
        assert_eq!(&input[19..], digest.as_slice());
        assert_eq!(
            Operation::rsa_pkcs1(Hash::Sha384, &digest),
            Err(SigningError::DigestLength {
                hash: Hash::Sha384,
                expected: 48,
                actual: 32
            })
        );
    }

    /// PSS encodings, signed with the raw RSA operation, verify with OpenSSL's PSS verifier.
    #[test]
    fn pss_encoding_verifies_with_openssl() {
        use openssl::hash::MessageDigest;
        let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
        let key = openssl::pkey::PKey::from_rsa(rsa.clone()).unwrap();
        let message = b"handshake transcript";
        for (hash, digest) in [
            (Hash::Sha256, MessageDigest::sha256()),
            (Hash::Sha384, MessageDigest::sha384()),
            (Hash::Sha512, MessageDigest::sha512()),
        ] {
            let message_hash = hash.digest(message);
            assert_eq!(
                message_hash,
                openssl::hash::hash(digest, message).unwrap().to_vec()
            );
            let Operation::RsaRaw(encoded) =
                Operation::rsa_pss(hash, &message_hash, 2048, hash.output_length()).unwrap()
            else {
                panic!("not raw RSA");
            };
            assert_eq!(encoded.len(), 256);
            let mut signature = vec![0u8; 256];
            rsa.private_encrypt(&encoded, &mut signature, openssl::rsa::Padding::NONE)
                .unwrap();
            let mut verifier = openssl::sign::Verifier::new(digest, &key).unwrap();
            verifier
                .set_rsa_padding(openssl::rsa::Padding::PKCS1_PSS)
                .unwrap();
            verifier
                .set_rsa_pss_saltlen(openssl::sign::RsaPssSaltlen::DIGEST_LENGTH)
                .unwrap();
            verifier.update(message).unwrap();
            assert!(verifier.verify(&signature).unwrap(), "{hash}");
        }
    }

    #[test]
    fn odd_modulus_sizes_are_padded() {
        let hash = Hash::Sha256.digest(b"m");
        let encoded = pss_encode(Hash::Sha256, &hash, 2049, &[7u8; 32]).unwrap();
        assert_eq!(encoded.len(), 257);
        assert_eq!(encoded[0], 0);
        assert_eq!(encoded.last(), Some(&0xbc));
    }

    #[test]
    fn small_keys_are_refused() {
        let hash = Hash::Sha512.digest(b"m");
        assert!(matches!(
            pss_encode(Hash::Sha512, &hash, 512, &[0u8; 64]),
            Err(SigningError::KeyTooSmall { .. })
        ));
        assert_eq!(pss_max_salt_length(Hash::Sha256, 2048), 256 - 34);
    }
}
