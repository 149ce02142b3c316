//! Certificates: the emulator's own test CA and server certificate, client-certificate checks
//! (thumbprints, chain verification, CN), and helpers that tests use to mint device certs.

use std::{
    cmp::Ordering,
    net::IpAddr,
    path::{Path, PathBuf},
};

use openssl::{
    asn1::{Asn1Integer, Asn1Time},
    bn::{BigNum, MsbOption},
    ec::{EcGroup, EcKey},
    error::ErrorStack,
    hash::MessageDigest,
    nid::Nid,
    pkey::{PKey, Private},
    stack::Stack,
    x509::{
        extension::{
            AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage,
            SubjectAlternativeName, SubjectKeyIdentifier,
        },
        store::X509StoreBuilder,
        verify::X509VerifyFlags,
        X509Builder, X509NameBuilder, X509Ref, X509StoreContext, X509,
    },
};

use crate::{util, EmulatorError as Error};

/// A certificate with its private key.
#[derive(Clone)]
pub struct CertAndKey {
    /// The certificate.
    pub cert: X509,
    /// Its private key.
    pub key: PKey<Private>,
}

impl std::fmt::Debug for CertAndKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAndKey")
            .field("subject_cn", &leaf_cn(&self.cert))
            .finish_non_exhaustive()
    }
}

impl CertAndKey {
    /// Certificate as PEM.
    pub fn cert_pem(&self) -> String {
        String::from_utf8(self.cert.to_pem().unwrap_or_default()).unwrap_or_default()
    }

    /// Private key as PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        String::from_utf8(self.key.private_key_to_pem_pkcs8().unwrap_or_default())
            .unwrap_or_default()
    }

    /// SHA-256 thumbprint of the certificate, uppercase hex.
    pub fn sha256_thumbprint(&self) -> String {
        thumbprints(&self.cert).1
    }

    /// SHA-1 thumbprint of the certificate, uppercase hex.
    pub fn sha1_thumbprint(&self) -> String {
        thumbprints(&self.cert).0
    }
}

/// What kind of certificate [`issue`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// A CA (basicConstraints CA:TRUE, keyCertSign).
    Ca,
    /// A TLS server cert (serverAuth, SANs).
    Server,
    /// A TLS client cert (clientAuth).
    Client,
}

/// Validity window in seconds relative to now: `(not_before, not_after)`.
pub type Validity = (i64, i64);

/// The default validity: from one hour ago for ten years.
pub const DEFAULT_VALIDITY: Validity = (-3600, 10 * 365 * 86_400);

fn new_ec_key() -> Result<PKey<Private>, ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

fn asn1_at(offset_secs: i64) -> Result<Asn1Time, ErrorStack> {
    let now = i64::try_from(util::now_secs()).unwrap_or(0);
    Asn1Time::from_unix(now.saturating_add(offset_secs))
}

fn random_serial() -> Result<Asn1Integer, ErrorStack> {
    let mut bn = BigNum::new()?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false)?;
    bn.to_asn1_integer()
}

/// Issues a certificate with a new P-256 key. `issuer = None` makes it self-signed.
/// `names` become SANs (IP or DNS; a `:port` suffix is stripped) for server certs.
pub fn issue(
    cn: &str,
    kind: CertKind,
    issuer: Option<&CertAndKey>,
    names: &[String],
    validity: Validity,
) -> Result<CertAndKey, ErrorStack> {
    let key = new_ec_key()?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, cn)?;
    let name = name.build();

    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let serial = random_serial()?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(&name)?;
    match issuer {
        Some(i) => b.set_issuer_name(i.cert.subject_name())?,
        None => b.set_issuer_name(&name)?,
    }
    b.set_pubkey(&key)?;
    let not_before = asn1_at(validity.0)?;
    let not_after = asn1_at(validity.1)?;
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;

    match kind {
        CertKind::Ca => {
            b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .digital_signature()
                    .build()?,
            )?;
        }
        CertKind::Server | CertKind::Client => {
            b.append_extension(BasicConstraints::new().critical().build()?)?;
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .digital_signature()
                    .key_agreement()
                    .build()?,
            )?;
            let mut eku = ExtendedKeyUsage::new();
            if kind == CertKind::Server {
                eku.server_auth();
            } else {
                eku.client_auth();
            }
            b.append_extension(eku.build()?)?;
        }
    }
    {
        let ctx = match issuer {
            Some(i) => b.x509v3_context(Some(&i.cert), None),
            None => b.x509v3_context(None, None),
        };
        let ski = SubjectKeyIdentifier::new().build(&ctx)?;
        let aki = issuer
            .map(|_| AuthorityKeyIdentifier::new().keyid(false).build(&ctx))
            .transpose()?;
        let san = if kind == CertKind::Server && !names.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for n in names {
                let host = util::host_part(n);
                if host.parse::<IpAddr>().is_ok() {
                    san.ip(host);
                } else {
                    san.dns(host);
                }
            }
            Some(san.build(&ctx)?)
        } else {
            None
        };
        b.append_extension(ski)?;
        if let Some(aki) = aki {
            b.append_extension(aki)?;
        }
        if let Some(san) = san {
            b.append_extension(san)?;
        }
    }
    let signing_key = issuer.map_or(&key, |i| &i.key);
    b.sign(signing_key, MessageDigest::sha256())?;
    Ok(CertAndKey {
        cert: b.build(),
        key,
    })
}

/// A test CA: mints client certs for device tests. Convenience over [`issue`].
#[derive(Debug, Clone)]
pub struct TestCa {
    /// The CA certificate and key.
    pub ca: CertAndKey,
}

impl TestCa {
    /// A new self-signed CA named `cn`.
    pub fn new(cn: &str) -> Result<Self, ErrorStack> {
        Ok(TestCa {
            ca: issue(cn, CertKind::Ca, None, &[], DEFAULT_VALIDITY)?,
        })
    }

    /// An intermediate CA signed by this CA.
    pub fn intermediate(&self, cn: &str) -> Result<TestCa, ErrorStack> {
        Ok(TestCa {
            ca: issue(cn, CertKind::Ca, Some(&self.ca), &[], DEFAULT_VALIDITY)?,
        })
    }

    /// A client (device) certificate with subject CN `cn`, valid for ten years.
    pub fn issue_client(&self, cn: &str) -> Result<CertAndKey, ErrorStack> {
        issue(cn, CertKind::Client, Some(&self.ca), &[], DEFAULT_VALIDITY)
    }

    /// A client certificate with an explicit validity window (seconds relative to now).
    pub fn issue_client_with_validity(
        &self,
        cn: &str,
        validity: Validity,
    ) -> Result<CertAndKey, ErrorStack> {
        issue(cn, CertKind::Client, Some(&self.ca), &[], validity)
    }

    /// A client certificate (CN `cn`, EKU clientAuth, valid 30 days) for a key held elsewhere
    /// (in keyd, in a token), as PEM.
    pub fn client_cert_for(
        &self,
        cn: &str,
        public_key: &openssl::pkey::PKeyRef<openssl::pkey::Public>,
    ) -> Result<String, ErrorStack> {
        let mut name = X509NameBuilder::new()?;
        name.append_entry_by_nid(Nid::COMMONNAME, cn)?;
        let name = name.build();
        let mut builder = X509Builder::new()?;
        builder.set_version(2)?;
        let serial = random_serial()?;
        builder.set_serial_number(&serial)?;
        builder.set_subject_name(&name)?;
        builder.set_issuer_name(self.ca.cert.subject_name())?;
        builder.set_pubkey(public_key)?;
        let (not_before, not_after) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(30)?);
        builder.set_not_before(&not_before)?;
        builder.set_not_after(&not_after)?;
        builder.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
        builder.sign(&self.ca.key, MessageDigest::sha256())?;
        Ok(String::from_utf8_lossy(&builder.build().to_pem()?).into_owned())
    }

    /// CA certificate as PEM.
    pub fn cert_pem(&self) -> String {
        self.ca.cert_pem()
    }
}

/// A self-signed client (device) certificate with subject CN `cn`.
pub fn self_signed_client(cn: &str) -> Result<CertAndKey, ErrorStack> {
    issue(cn, CertKind::Client, None, &[], DEFAULT_VALIDITY)
}

/// `(sha1, sha256)` thumbprints of a certificate's DER, uppercase hex.
pub fn thumbprints(cert: &X509Ref) -> (String, String) {
    let sha1 = cert
        .digest(MessageDigest::sha1())
        .map(|d| util::hex_upper(&d))
        .unwrap_or_default();
    let sha256 = cert
        .digest(MessageDigest::sha256())
        .map(|d| util::hex_upper(&d))
        .unwrap_or_default();
    (sha1, sha256)
}

/// True if `thumbprint` (hex, any case, `:` allowed) is the SHA-1 or SHA-256 of `cert`.
pub fn thumbprint_matches(cert: &X509Ref, thumbprint: &str) -> bool {
    let want = util::normalize_thumbprint(thumbprint);
    if want.is_empty() {
        return false;
    }
    let (s1, s256) = thumbprints(cert);
    want == s1.to_ascii_lowercase() || want == s256.to_ascii_lowercase()
}

/// The subject CN of a certificate (first CN entry), if any.
pub fn leaf_cn(cert: &X509Ref) -> Option<String> {
    cert.subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
}

/// True if now is within the certificate's notBefore..notAfter.
pub fn within_validity(cert: &X509Ref) -> bool {
    let Ok(now) = Asn1Time::days_from_now(0) else {
        return false;
    };
    let started = matches!(
        cert.not_before().compare(&now),
        Ok(Ordering::Less | Ordering::Equal)
    );
    let not_ended = matches!(
        cert.not_after().compare(&now),
        Ok(Ordering::Greater | Ordering::Equal)
    );
    started && not_ended
}

/// True if `leaf` (with `intermediates` as untrusted helpers) verifies to one of `trusted`,
/// including validity periods. A trusted cert need not be self-signed (partial chains allowed),
/// so enrolling an intermediate CA works.
pub fn chain_verifies(leaf: &X509Ref, intermediates: &[X509], trusted: &[X509]) -> bool {
    if trusted.is_empty() {
        return false;
    }
    let result = (|| -> Result<bool, ErrorStack> {
        let mut store = X509StoreBuilder::new()?;
        for ca in trusted {
            store.add_cert(ca.clone())?;
        }
        store.set_flags(X509VerifyFlags::PARTIAL_CHAIN)?;
        let store = store.build();
        let mut chain = Stack::new()?;
        for c in intermediates {
            chain.push(c.clone())?;
        }
        let mut ctx = X509StoreContext::new()?;
        ctx.init(&store, leaf, &chain, |c| c.verify_cert())
    })();
    result.unwrap_or(false)
}

/// Parses every certificate in a PEM bundle.
pub fn parse_pem_bundle(pem: &str) -> Result<Vec<X509>, Error> {
    let certs = X509::stack_from_pem(pem.as_bytes())
        .map_err(|e| Error::InvalidInput(format!("invalid certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::InvalidInput(
            "no certificate found in PEM".to_string(),
        ));
    }
    Ok(certs)
}

/// The emulator's own TLS identity: CA (written to disk for clients) and server cert.
#[derive(Debug)]
pub struct ServerPki {
    /// The test CA.
    pub ca: CertAndKey,
    /// The server certificate issued by the CA for all served names.
    pub server: CertAndKey,
    /// Where the CA PEM was written.
    pub ca_cert_path: PathBuf,
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// Loads `ca.pem` + `ca.key` from `dir` if both exist, else generates a CA and saves it there.
fn load_or_create_ca(dir: &Path) -> Result<CertAndKey, Error> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca.key");
    if cert_path.exists() && key_path.exists() {
        let cert =
            std::fs::read(&cert_path).map_err(io_err(format!("read {}", cert_path.display())))?;
        let key =
            std::fs::read(&key_path).map_err(io_err(format!("read {}", key_path.display())))?;
        let cert = X509::from_pem(&cert)
            .map_err(|e| Error::Config(format!("{}: invalid CA PEM: {e}", cert_path.display())))?;
        let key = PKey::private_key_from_pem(&key)
            .map_err(|e| Error::Config(format!("{}: invalid CA key: {e}", key_path.display())))?;
        return Ok(CertAndKey { cert, key });
    }
    std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
    let ca = issue(
        "cloud-emulator test CA",
        CertKind::Ca,
        None,
        &[],
        DEFAULT_VALIDITY,
    )?;
    write_file(&cert_path, ca.cert_pem().as_bytes(), 0o644)?;
    write_file(&key_path, ca.key_pem().as_bytes(), 0o600)?;
    Ok(ca)
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .map_err(io_err(format!("create {}", parent.display())))?;
        }
    }
    let tmp = path.with_extension("tmp~");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(format!("write {}", tmp.display())))?;
    f.write_all(data)
        .map_err(io_err(format!("write {}", tmp.display())))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("rename to {}", path.display())))
}

impl ServerPki {
    /// Sets up the CA (from `pki_dir`, or generated in memory when `None`), issues a server
    /// cert for `names`, and writes the CA PEM to `ca_cert_path`.
    pub fn new(
        pki_dir: Option<&Path>,
        names: &[String],
        ca_cert_path: &Path,
    ) -> Result<Self, Error> {
        let ca = match pki_dir {
            Some(dir) => load_or_create_ca(dir)?,
            None => issue(
                "cloud-emulator test CA",
                CertKind::Ca,
                None,
                &[],
                DEFAULT_VALIDITY,
            )?,
        };
        let server = issue(
            "localhost",
            CertKind::Server,
            Some(&ca),
            names,
            DEFAULT_VALIDITY,
        )?;
        write_file(ca_cert_path, ca.cert_pem().as_bytes(), 0o644)?;
        Ok(ServerPki {
            ca,
            server,
            ca_cert_path: ca_cert_path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issued_leaf_verifies_and_expired_does_not() {
        let root = TestCa::new("root").unwrap();
        let inter = root.intermediate("inter").unwrap();
        let leaf = inter.issue_client("dev1").unwrap();
        assert!(chain_verifies(
            &leaf.cert,
            std::slice::from_ref(&inter.ca.cert),
            std::slice::from_ref(&root.ca.cert)
        ));
        // Enrolling the intermediate directly works too (partial chain).
        assert!(chain_verifies(
            &leaf.cert,
            &[],
            std::slice::from_ref(&inter.ca.cert)
        ));
        // Without the intermediate the root cannot be reached.
        assert!(!chain_verifies(
            &leaf.cert,
            &[],
            std::slice::from_ref(&root.ca.cert)
        ));
        let other = TestCa::new("other").unwrap();
        assert!(!chain_verifies(
            &leaf.cert,
            &[],
            std::slice::from_ref(&other.ca.cert)
        ));
        let expired = inter
            .issue_client_with_validity("dev1", (-7200, -3600))
            .unwrap();
        assert!(!within_validity(&expired.cert));
        assert!(!chain_verifies(
            &expired.cert,
            &[],
            std::slice::from_ref(&inter.ca.cert)
        ));
        assert!(within_validity(&leaf.cert));
        assert_eq!(leaf_cn(&leaf.cert).as_deref(), Some("dev1"));
    }

    #[test]
    fn thumbprints_match_both_algorithms() {
        let c = self_signed_client("x").unwrap();
        assert!(thumbprint_matches(&c.cert, &c.sha1_thumbprint()));
        assert!(thumbprint_matches(
            &c.cert,
            &c.sha256_thumbprint().to_lowercase()
        ));
        assert!(!thumbprint_matches(&c.cert, "00"));
        assert!(!thumbprint_matches(&c.cert, ""));
    }
}
