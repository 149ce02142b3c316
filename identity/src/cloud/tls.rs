//! TLS for DPS and IoT Hub: the trust store (system store plus configured CAs) and client
//! authentication whose private-key operations run in keyd, through the rustls signing key
//! of `key_api::rustls` (the one copy; the private key never leaves keyd).

use std::path::PathBuf;
use std::sync::Arc;

use key_api::KeyHandle;
use rustls::pki_types::CertificateDer;

/// The system CA bundles of common distributions (Debian/Ubuntu, Fedora/RHEL, SUSE, Alpine).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Loads the trust store: the operating system's roots **plus** the certificates of
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` when set (the issue asks for both; OpenSSL's own convention
/// would let the variable replace the system store), plus every PEM file in `extra`.
pub fn load_roots(extra: &[PathBuf]) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    // With the variables set, this loads their certificates instead of the system store.
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        log::warn!("could not load some CA certificates: {error}");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    log::debug!("{added} CA certificates trusted from the system store or SSL_CERT_FILE");
    let overridden = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
    if overridden {
        if let Some(bundle) = SYSTEM_BUNDLES
            .iter()
            .find(|path| std::path::Path::new(path).exists())
        {
            let system = std::fs::read(bundle)
                .ok()
                .and_then(|pem| certificates(&String::from_utf8_lossy(&pem)).ok())
                .unwrap_or_default();
            let (added, _ignored) = roots.add_parsable_certificates(system);
            log::debug!("{added} system CA certificates trusted from {bundle}");
        }
    }
    for path in extra {
        let pem = std::fs::read(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let certificates = certificates(&String::from_utf8_lossy(&pem))
            .map_err(|_| format!("{} is not a PEM certificate bundle", path.display()))?;
        if certificates.is_empty() {
            return Err(format!("{} holds no certificate", path.display()));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|error| format!("{}: {error}", path.display()))?;
        }
    }
    Ok(roots)
}

/// The crypto provider used for every cloud connection.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The DER of every `CERTIFICATE` block of a PEM text, in order (other blocks are skipped; a
/// malformed block is an error). The certificates themselves are parsed where they are used.
fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, cert_api::pem::PemError> {
    Ok(cert_api::pem::certificate_ders(pem)?
        .into_iter()
        .map(CertificateDer::from)
        .collect())
}

/// Parses a PEM chain (leaf first) into DER certificates.
pub fn chain_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates =
        certificates(pem).map_err(|_| "the identity certificate is not PEM".to_owned())?;
    if certificates.is_empty() {
        return Err("the identity certificate chain is empty".to_owned());
    }
    Ok(certificates)
}

/// The subject CN of the first certificate of a PEM chain.
pub fn leaf_common_name(pem: &str) -> Option<String> {
    let leaf = crate::renewal::leaf(pem).ok()?;
    cert_api::subject::common_name(&leaf.tbs_certificate.subject)
}

/// Builds the TLS client identity: the chain from certd and a signer whose private-key
/// operations go to keyd at `keyd_uri` with `handle` ([`key_api::rustls`]).
pub fn client_identity(
    chain: Vec<CertificateDer<'static>>,
    keyd_uri: &str,
    handle: KeyHandle,
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    key_api::rustls::certified_key(chain, keyd_uri, handle).map_err(|error| error.to_string())
}
