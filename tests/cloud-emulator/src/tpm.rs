//! The DPS side of TPM attestation (spec 9.7): parsing the TPM public areas a device sends,
//! and building the `authenticationKey` blob that hands the device an HMAC key only its TPM
//! can unwrap.
//!
//! The blob is what the reference tpmd's `import_auth_key` unmarshals, in this order:
//!
//! | Part | Structure | Built by |
//! |---|---|---|
//! | credentialBlob | `TPM2B_ID_OBJECT` | MakeCredential(EK, credential = inner key `k`, Name(SRK)) |
//! | secret | `TPM2B_ENCRYPTED_SECRET` | seed under the EK, RSA-OAEP label `IDENTITY\0` |
//! | duplicate | `TPM2B_PRIVATE` | the HMAC key's sensitive area, inner wrap with `k`, outer wrap for the SRK |
//! | inSymSeed | `TPM2B_ENCRYPTED_SECRET` | seed under the SRK, RSA-OAEP label `DUPLICATE\0` |
//! | objectPublic | `TPM2B_PUBLIC` | KEYEDHASH HMAC-SHA256 key, `userWithAuth` + `sign` |
//!
//! The device runs ActivateCredential (activateHandle = SRK, keyHandle = EK) to recover `k`,
//! then Import under the SRK with `k` as encryptionKey and AES-128-CFB as symmetricAlg.
//! Structures and algorithms follow TPM 2.0 Part 1 (§11.4.10 KDFa, §16 names, §23.3
//! duplication, §24 credential protection) and Part 2 (marshaling). Only what DPS needs is
//! implemented: RSA EK and SRK, SHA-256 name algorithm, AES-CFB symmetric definitions.

use openssl::{
    bn::BigNum,
    encrypt::Encrypter,
    hash::{hash, MessageDigest},
    pkey::PKey,
    rsa::{Padding, Rsa},
    symm::{encrypt, Cipher},
};

use crate::{sas::hmac_sha256, util};

/// `TPM_ALG_RSA`.
const ALG_RSA: u16 = 0x0001;
/// `TPM_ALG_KEYEDHASH`.
const ALG_KEYEDHASH: u16 = 0x0008;
/// `TPM_ALG_HMAC`.
const ALG_HMAC: u16 = 0x0005;
/// `TPM_ALG_SHA256`.
const ALG_SHA256: u16 = 0x000B;
/// `TPM_ALG_NULL`.
const ALG_NULL: u16 = 0x0010;
/// `TPM_ALG_AES`.
const ALG_AES: u16 = 0x0006;
/// `TPM_ALG_CFB`.
const ALG_CFB: u16 = 0x0043;
/// `TPM_ALG_ECC`.
const ALG_ECC: u16 = 0x0023;

/// `TPMA_OBJECT` bits used here.
const ATTR_USER_WITH_AUTH: u32 = 1 << 6;
const ATTR_SIGN: u32 = 1 << 18;

/// SHA-256 digest size (the name algorithm of everything handled here).
const DIGEST_SIZE: usize = 32;

/// Size of the HMAC key DPS hands out.
pub const HMAC_KEY_SIZE: usize = 32;

/// Size of the inner wrapping key `k` (AES-128, the symmetricAlg of the device's Import).
const INNER_KEY_SIZE: usize = 16;

/// Why a TPM structure could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The bytes end before the structure does.
    #[error("{0} is truncated")]
    Truncated(&'static str),
    /// Bytes are left over after the structure.
    #[error("{0} has trailing bytes")]
    Trailing(&'static str),
    /// A well-formed structure this emulator does not handle.
    #[error("{0}")]
    Unsupported(String),
    /// The value is not base64.
    #[error("{0} is not valid base64")]
    Base64(&'static str),
    /// OpenSSL failed.
    #[error("crypto error: {0}")]
    Crypto(#[from] openssl::error::ErrorStack),
}

/// Reads big-endian TPM marshaled data.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], TpmError> {
        if self.buf.len() < n {
            return Err(TpmError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, TpmError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, TpmError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A `TPM2B_*`: 16-bit size, then that many bytes.
    fn tpm2b(&mut self) -> Result<&'a [u8], TpmError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn finish(&self) -> Result<(), TpmError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(TpmError::Trailing(self.what))
        }
    }
}

/// Appends a `TPM2B_*` (16-bit size, then the bytes). Every buffer built here is far below
/// 64 KiB; a larger one would be a bug, reported as an error rather than truncated.
fn put_tpm2b(out: &mut Vec<u8>, data: &[u8]) -> Result<(), TpmError> {
    let n = u16::try_from(data.len())
        .map_err(|_| TpmError::Unsupported("TPM2B buffer over 64 KiB".to_string()))?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

fn tpm2b(data: &[u8]) -> Result<Vec<u8>, TpmError> {
    let mut out = Vec::with_capacity(data.len() + 2);
    put_tpm2b(&mut out, data)?;
    Ok(out)
}

/// An RSA key's public area (`TPMT_PUBLIC`), as far as DPS needs it.
#[derive(Clone, PartialEq, Eq)]
pub struct Public {
    /// The marshaled `TPMT_PUBLIC` (the bytes the name is computed over).
    tpmt: Vec<u8>,
    name_alg: u16,
    /// Key size of the AES-CFB symmetric definition (`TPMT_SYM_DEF_OBJECT`) in bits.
    sym_key_bits: u16,
    exponent: u32,
    modulus: Vec<u8>,
}

impl std::fmt::Debug for Public {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Public")
            .field("modulus_bits", &(self.modulus.len() * 8))
            .field("sym_key_bits", &self.sym_key_bits)
            .finish()
    }
}

impl Public {
    /// Parses a `TPM2B_PUBLIC` (what tpmd's `get_tpm_keys` and `tpm2_readpublic -f tss`
    /// give), or a bare `TPMT_PUBLIC` (`-f tpmt`). `what` names the value in errors.
    pub fn parse(bytes: &[u8], what: &'static str) -> Result<Self, TpmError> {
        let mut r = Reader { buf: bytes, what };
        let first = r.u16()?;
        if usize::from(first) == bytes.len() - 2 {
            Self::parse_tpmt(&bytes[2..], what)
        } else if matches!(first, ALG_RSA | ALG_ECC) {
            Self::parse_tpmt(bytes, what)
        } else {
            Err(TpmError::Unsupported(format!(
                "{what} is neither a TPM2B_PUBLIC (its size field says {first} bytes, {} follow) \
                 nor an RSA or ECC TPMT_PUBLIC",
                bytes.len() - 2
            )))
        }
    }

    /// Parses base64 of a `TPM2B_PUBLIC` or `TPMT_PUBLIC`.
    pub fn parse_b64(text: &str, what: &'static str) -> Result<Self, TpmError> {
        let bytes = util::b64_decode(text).ok_or(TpmError::Base64(what))?;
        Self::parse(&bytes, what)
    }

    fn parse_tpmt(bytes: &[u8], what: &'static str) -> Result<Self, TpmError> {
        let unsupported = |m: String| TpmError::Unsupported(format!("{what}: {m}"));
        let mut r = Reader { buf: bytes, what };
        let ty = r.u16()?;
        match ty {
            ALG_RSA => {}
            ALG_ECC => return Err(unsupported("ECC keys are not supported, only RSA".into())),
            other => return Err(unsupported(format!("unsupported key type {other:#06x}"))),
        }
        let name_alg = r.u16()?;
        if name_alg != ALG_SHA256 {
            return Err(unsupported(format!(
                "name algorithm {name_alg:#06x} is not SHA-256"
            )));
        }
        let _attributes = r.u32()?;
        let _auth_policy = r.tpm2b()?;
        // TPMS_RSA_PARMS: symmetric (TPMT_SYM_DEF_OBJECT), scheme, keyBits, exponent.
        let sym_alg = r.u16()?;
        let sym_key_bits = if sym_alg == ALG_NULL {
            0
        } else {
            let bits = r.u16()?;
            let mode = r.u16()?;
            if sym_alg != ALG_AES || mode != ALG_CFB || !matches!(bits, 128 | 192 | 256) {
                return Err(unsupported(format!(
                    "symmetric definition {sym_alg:#06x}/{bits}/{mode:#06x} is not AES-CFB"
                )));
            }
            bits
        };
        let scheme = r.u16()?;
        if scheme != ALG_NULL {
            // Every RSA scheme's details are a single hash algorithm.
            let _hash = r.u16()?;
        }
        let key_bits = r.u16()?;
        let exponent = match r.u32()? {
            0 => 65_537,
            e => e,
        };
        let modulus = r.tpm2b()?.to_vec();
        r.finish()?;
        if modulus.is_empty() || modulus.len() * 8 != usize::from(key_bits) {
            return Err(unsupported(format!(
                "modulus of {} bytes does not match keyBits {key_bits}",
                modulus.len()
            )));
        }
        Ok(Public {
            tpmt: bytes.to_vec(),
            name_alg,
            sym_key_bits,
            exponent,
            modulus,
        })
    }

    /// The TPM name: `nameAlg || SHA-256(TPMT_PUBLIC)`.
    pub fn name(&self) -> Vec<u8> {
        object_name(&self.tpmt)
    }

    /// The marshaled `TPMT_PUBLIC`.
    pub fn tpmt_bytes(&self) -> &[u8] {
        &self.tpmt
    }

    /// Whether both are the same key (type, modulus and exponent; attributes and policy may
    /// be spelled differently between an enrollment record and what the device sends).
    pub fn same_key(&self, other: &Public) -> bool {
        self.modulus == other.modulus && self.exponent == other.exponent
    }

    /// Checks the key can protect a seed (MakeCredential or Import parent): it needs an AES-CFB
    /// symmetric definition.
    fn require_symmetric(&self, what: &str) -> Result<usize, TpmError> {
        if self.sym_key_bits == 0 {
            return Err(TpmError::Unsupported(format!(
                "{what} has no symmetric algorithm (not a storage/endorsement key)"
            )));
        }
        Ok(usize::from(self.sym_key_bits))
    }

    /// RSA-OAEP (hash = MGF1 hash = nameAlg SHA-256) of `data` with `label` (NUL included).
    fn oaep_encrypt(&self, data: &[u8], label: &[u8]) -> Result<Vec<u8>, TpmError> {
        debug_assert_eq!(self.name_alg, ALG_SHA256);
        let rsa = Rsa::from_public_components(
            BigNum::from_slice(&self.modulus)?,
            BigNum::from_u32(self.exponent)?,
        )?;
        let pkey = PKey::from_rsa(rsa)?;
        let mut enc = Encrypter::new(&pkey)?;
        enc.set_rsa_padding(Padding::PKCS1_OAEP)?;
        enc.set_rsa_oaep_md(MessageDigest::sha256())?;
        enc.set_rsa_mgf1_md(MessageDigest::sha256())?;
        enc.set_rsa_oaep_label(label)?;
        let mut out = vec![0; enc.encrypt_len(data)?];
        let n = enc.encrypt(data, &mut out)?;
        out.truncate(n);
        Ok(out)
    }
}

/// `nameAlg (SHA-256) || SHA-256(public)` for a marshaled `TPMT_PUBLIC`.
fn object_name(tpmt: &[u8]) -> Vec<u8> {
    let mut name = ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&sha256(tpmt));
    name
}

fn sha256(data: &[u8]) -> Vec<u8> {
    // SHA-256 over a buffer in memory does not fail; an empty digest would never verify.
    hash(MessageDigest::sha256(), data)
        .map(|d| d.to_vec())
        .unwrap_or_default()
}

/// KDFa with SHA-256 (Part 1 §11.4.10.2, SP 800-108 counter mode over HMAC):
/// `HMAC(key, [i]₃₂ || label || 0x00 || contextU || contextV || [bits]₃₂)` for i = 1, 2, ...,
/// truncated to `bits` (a multiple of 8 here).
pub fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: usize) -> Vec<u8> {
    let bytes = bits.div_ceil(8);
    let bits32 = u32::try_from(bits).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(bytes + DIGEST_SIZE);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut msg = Vec::new();
        msg.extend_from_slice(&counter.to_be_bytes());
        msg.extend_from_slice(label.as_bytes());
        msg.push(0);
        msg.extend_from_slice(context_u);
        msg.extend_from_slice(context_v);
        msg.extend_from_slice(&bits32.to_be_bytes());
        out.extend_from_slice(&hmac_sha256(key, &msg));
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// AES-CFB (full-block feedback, as the TPM's CFB mode) with a zero IV.
fn aes_cfb(key: &[u8], data: &[u8]) -> Result<Vec<u8>, TpmError> {
    let cipher = match key.len() {
        16 => Cipher::aes_128_cfb128(),
        24 => Cipher::aes_192_cfb128(),
        32 => Cipher::aes_256_cfb128(),
        n => {
            return Err(TpmError::Unsupported(format!(
                "AES key of {n} bytes is not supported"
            )))
        }
    };
    Ok(encrypt(cipher, key, Some(&[0u8; 16]), data)?)
}

/// The outer protection shared by MakeCredential and duplication: a random seed encrypted
/// to `key` with OAEP label `label_oaep`; `plain` encrypted under
/// KDFa(seed, "STORAGE", name) and HMACed under KDFa(seed, "INTEGRITY") over
/// `encrypted || name`. Returns (`TPM2B_DIGEST(hmac) || encrypted`, encrypted seed).
fn protect(
    key: &Public,
    label_oaep: &[u8],
    name: &[u8],
    plain: &[u8],
    what: &str,
) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    let sym_bits = key.require_symmetric(what)?;
    let seed = util::random_bytes(DIGEST_SIZE);
    let enc_seed = key.oaep_encrypt(&seed, label_oaep)?;
    let sym_key = kdfa(&seed, "STORAGE", name, &[], sym_bits);
    let encrypted = aes_cfb(&sym_key, plain)?;
    let hmac_key = kdfa(&seed, "INTEGRITY", &[], &[], DIGEST_SIZE * 8);
    let mut mac_input = encrypted.clone();
    mac_input.extend_from_slice(name);
    let mac = hmac_sha256(&hmac_key, &mac_input);
    let mut out = tpm2b(&mac)?;
    out.extend_from_slice(&encrypted);
    Ok((out, enc_seed))
}

/// MakeCredential (Part 3 §12.6, Part 1 §24): returns the marshaled `TPM2B_ID_OBJECT` and
/// `TPM2B_ENCRYPTED_SECRET` that ActivateCredential with `ek` as keyHandle and the object named
/// `object_name` as activateHandle turns back into `credential`.
pub fn make_credential(
    ek: &Public,
    credential: &[u8],
    object_name: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    let (id_object, secret) = protect(
        ek,
        b"IDENTITY\0",
        object_name,
        &tpm2b(credential)?,
        "endorsement key",
    )?;
    Ok((tpm2b(&id_object)?, tpm2b(&secret)?))
}

/// The public area of an importable HMAC-SHA256 key (`TPMT_PUBLIC`, KEYEDHASH).
fn hmac_key_public(seed_value: &[u8], key: &[u8]) -> Result<Vec<u8>, TpmError> {
    let mut p = Vec::new();
    p.extend_from_slice(&ALG_KEYEDHASH.to_be_bytes());
    p.extend_from_slice(&ALG_SHA256.to_be_bytes());
    // Not fixedTPM / fixedParent: Import refuses those.
    p.extend_from_slice(&(ATTR_USER_WITH_AUTH | ATTR_SIGN).to_be_bytes());
    put_tpm2b(&mut p, &[])?; // authPolicy
    p.extend_from_slice(&ALG_HMAC.to_be_bytes()); // TPMT_KEYEDHASH_SCHEME
    p.extend_from_slice(&ALG_SHA256.to_be_bytes()); // TPMS_SCHEME_HMAC.hashAlg
    let mut unique_input = seed_value.to_vec();
    unique_input.extend_from_slice(key);
    put_tpm2b(&mut p, &sha256(&unique_input))?; // unique: H(seedValue || key)
    Ok(p)
}

/// `TPM2B_SENSITIVE` of a KEYEDHASH key: type, empty authValue, seedValue, bits = key.
fn hmac_key_sensitive(seed_value: &[u8], key: &[u8]) -> Result<Vec<u8>, TpmError> {
    let mut s = Vec::new();
    s.extend_from_slice(&ALG_KEYEDHASH.to_be_bytes());
    put_tpm2b(&mut s, &[])?; // authValue
    put_tpm2b(&mut s, seed_value)?;
    put_tpm2b(&mut s, key)?;
    tpm2b(&s)
}

/// Duplication for Import under `parent` (Part 1 §23.3): inner wrap with `inner_key`
/// (AES-CFB over `TPM2B_DIGEST(H(sensitive || name)) || sensitive`), then the outer wrap for
/// the parent. Returns the marshaled `TPM2B_PRIVATE` and `TPM2B_ENCRYPTED_SECRET`.
fn duplicate(
    parent: &Public,
    name: &[u8],
    sensitive: &[u8],
    inner_key: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    let mut integrity_input = sensitive.to_vec();
    integrity_input.extend_from_slice(name);
    let mut inner_plain = tpm2b(&sha256(&integrity_input))?;
    inner_plain.extend_from_slice(sensitive);
    let enc_sensitive = aes_cfb(inner_key, &inner_plain)?;
    let (private, seed) = protect(
        parent,
        b"DUPLICATE\0",
        name,
        &enc_sensitive,
        "storage root key",
    )?;
    Ok((tpm2b(&private)?, tpm2b(&seed)?))
}

/// Builds the `authenticationKey` blob (see the module docs) that gives `hmac_key` to the TPM
/// holding `ek` and `srk`.
pub fn authentication_key_blob(
    ek: &Public,
    srk: &Public,
    hmac_key: &[u8],
) -> Result<Vec<u8>, TpmError> {
    let inner_key = util::random_bytes(INNER_KEY_SIZE);
    let (credential_blob, secret) = make_credential(ek, &inner_key, &srk.name())?;
    let seed_value = util::random_bytes(DIGEST_SIZE);
    let public = hmac_key_public(&seed_value, hmac_key)?;
    let sensitive = hmac_key_sensitive(&seed_value, hmac_key)?;
    let (dup, in_sym_seed) = duplicate(srk, &object_name(&public), &sensitive, &inner_key)?;
    let mut blob = credential_blob;
    blob.extend_from_slice(&secret);
    blob.extend_from_slice(&dup);
    blob.extend_from_slice(&in_sym_seed);
    put_tpm2b(&mut blob, &public)?;
    Ok(blob)
}

/// The five parts of an `authenticationKey` blob, each still marshaled with its size
/// (for tests and tools that hand them to tpm2-tools).
#[derive(Debug, Clone)]
pub struct BlobParts {
    /// `TPM2B_ID_OBJECT`.
    pub credential_blob: Vec<u8>,
    /// `TPM2B_ENCRYPTED_SECRET` for ActivateCredential.
    pub secret: Vec<u8>,
    /// `TPM2B_PRIVATE` for Import.
    pub duplicate: Vec<u8>,
    /// `TPM2B_ENCRYPTED_SECRET` for Import.
    pub in_sym_seed: Vec<u8>,
    /// `TPM2B_PUBLIC` of the HMAC key.
    pub public: Vec<u8>,
}

/// Splits an `authenticationKey` blob in the order the reference tpmd reads it.
pub fn split_blob(blob: &[u8]) -> Result<BlobParts, TpmError> {
    let mut r = Reader {
        buf: blob,
        what: "authenticationKey",
    };
    let mut part = || -> Result<Vec<u8>, TpmError> { tpm2b(r.tpm2b()?) };
    let parts = BlobParts {
        credential_blob: part()?,
        secret: part()?,
        duplicate: part()?,
        in_sym_seed: part()?,
        public: part()?,
    };
    r.finish()?;
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::symm::decrypt;

    /// A TPM2B_PUBLIC in the shape of the TCG EK template (RSA 2048, AES-128-CFB).
    fn rsa_public(modulus: &[u8]) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&ALG_RSA.to_be_bytes());
        t.extend_from_slice(&ALG_SHA256.to_be_bytes());
        t.extend_from_slice(&0x0003_00b2u32.to_be_bytes());
        put_tpm2b(&mut t, &[7u8; 32]).unwrap();
        t.extend_from_slice(&ALG_AES.to_be_bytes());
        t.extend_from_slice(&128u16.to_be_bytes());
        t.extend_from_slice(&ALG_CFB.to_be_bytes());
        t.extend_from_slice(&ALG_NULL.to_be_bytes());
        t.extend_from_slice(&2048u16.to_be_bytes());
        t.extend_from_slice(&0u32.to_be_bytes());
        put_tpm2b(&mut t, modulus).unwrap();
        tpm2b(&t).unwrap()
    }

    #[test]
    fn parses_tpm2b_and_tpmt_forms_alike() {
        let rsa = Rsa::generate(2048).unwrap();
        let n = rsa.n().to_vec();
        let b = rsa_public(&n);
        let a = Public::parse(&b, "ek").unwrap();
        let t = Public::parse(&b[2..], "ek").unwrap();
        assert_eq!(a, t);
        assert_eq!(a.modulus, n);
        assert_eq!(a.exponent, 65_537);
        assert_eq!(a.sym_key_bits, 128);
        assert_eq!(a.name().len(), 34);
        assert_eq!(&a.name()[..2], &[0x00, 0x0b]);
        let e = Public::parse(&b[..b.len() - 1], "ek").unwrap_err();
        assert!(e.to_string().contains("size field"), "{e}");
        assert!(matches!(
            Public::parse(&b[2..b.len() - 1], "ek"),
            Err(TpmError::Truncated(_))
        ));
        let other =
            Public::parse(&rsa_public(&Rsa::generate(2048).unwrap().n().to_vec()), "x").unwrap();
        assert!(!a.same_key(&other));
        assert!(Public::parse(&[0, 0x23, 0, 0x0b], "ek")
            .unwrap_err()
            .to_string()
            .contains("ECC"));
    }

    #[test]
    fn kdfa_is_counter_mode_hmac() {
        let key = [1u8; 32];
        let out = kdfa(&key, "STORAGE", b"ctx", &[], 384);
        assert_eq!(out.len(), 48);
        let mut m1 = 1u32.to_be_bytes().to_vec();
        m1.extend_from_slice(b"STORAGE\0ctx");
        m1.extend_from_slice(&384u32.to_be_bytes());
        assert_eq!(&out[..32], &hmac_sha256(&key, &m1)[..]);
        let mut m2 = 2u32.to_be_bytes().to_vec();
        m2.extend_from_slice(&m1[4..]);
        assert_eq!(&out[32..], &hmac_sha256(&key, &m2)[..16]);
    }

    /// Undoes MakeCredential with the EK's private key, as ActivateCredential does.
    #[test]
    fn credential_opens_with_the_ek_private_key() {
        let rsa = Rsa::generate(2048).unwrap();
        let ek = Public::parse(&rsa_public(&rsa.n().to_vec()), "ek").unwrap();
        let name = object_name(b"some object");
        let (id, secret) = make_credential(&ek, b"0123456789abcdef", &name).unwrap();

        let mut r = Reader {
            buf: &secret,
            what: "s",
        };
        let enc_seed = r.tpm2b().unwrap();
        let pkey = PKey::from_rsa(rsa).unwrap();
        let mut dec = openssl::encrypt::Decrypter::new(&pkey).unwrap();
        dec.set_rsa_padding(Padding::PKCS1_OAEP).unwrap();
        dec.set_rsa_oaep_md(MessageDigest::sha256()).unwrap();
        dec.set_rsa_mgf1_md(MessageDigest::sha256()).unwrap();
        dec.set_rsa_oaep_label(b"IDENTITY\0").unwrap();
        let mut seed = vec![0; dec.decrypt_len(enc_seed).unwrap()];
        let n = dec.decrypt(enc_seed, &mut seed).unwrap();
        seed.truncate(n);
        assert_eq!(seed.len(), 32);

        let mut r = Reader {
            buf: &id,
            what: "i",
        };
        let mut inner = Reader {
            buf: r.tpm2b().unwrap(),
            what: "i",
        };
        r.finish().unwrap();
        let mac = inner.tpm2b().unwrap();
        let enc_identity = inner.buf;
        let mut mac_in = enc_identity.to_vec();
        mac_in.extend_from_slice(&name);
        assert_eq!(
            mac,
            &hmac_sha256(&kdfa(&seed, "INTEGRITY", &[], &[], 256), &mac_in)[..]
        );
        let key = kdfa(&seed, "STORAGE", &name, &[], 128);
        let plain = decrypt(Cipher::aes_128_cfb128(), &key, Some(&[0; 16]), enc_identity).unwrap();
        assert_eq!(plain, b"\x00\x100123456789abcdef");
    }

    #[test]
    fn blob_has_the_five_parts_in_order() {
        let ek_rsa = Rsa::generate(2048).unwrap();
        let srk_rsa = Rsa::generate(2048).unwrap();
        let ek = Public::parse(&rsa_public(&ek_rsa.n().to_vec()), "ek").unwrap();
        let srk = Public::parse(&rsa_public(&srk_rsa.n().to_vec()), "srk").unwrap();
        let key = [9u8; HMAC_KEY_SIZE];
        let blob = authentication_key_blob(&ek, &srk, &key).unwrap();
        let p = split_blob(&blob).unwrap();
        // TPM2B_ID_OBJECT: size, TPM2B_DIGEST(32-byte HMAC), encrypted TPM2B(16-byte k).
        assert_eq!(p.credential_blob.len(), 2 + 2 + 32 + 2 + 16);
        assert_eq!(p.secret.len(), 2 + 256);
        assert_eq!(p.in_sym_seed.len(), 2 + 256);
        // TPM2B_PRIVATE: outer HMAC, then inner integrity + TPM2B_SENSITIVE
        // (type, empty auth, 32-byte seedValue, 32-byte key).
        let sensitive_len = 2 + 2 + 2 + 34 + 34;
        assert_eq!(p.duplicate.len(), 2 + 34 + 34 + sensitive_len);
        assert_eq!(p.public.len(), 2 + 48);
        assert_eq!(&p.public[2..10], &[0, 8, 0, 0x0b, 0, 4, 0, 0x40]);
        let mut joined = p.credential_blob.clone();
        for part in [&p.secret, &p.duplicate, &p.in_sym_seed, &p.public] {
            joined.extend_from_slice(part);
        }
        assert_eq!(joined, blob);
        assert!(split_blob(&blob[..blob.len() - 1]).is_err());
    }
}
