//! Certificates: the Edge CA (key pair in keyd, certificate from certd) and the module
//! certificates the workload API hands out (fresh in-memory key, CSR, issued by certd with the
//! Edge CA as issuer).
//!
//! The Edge CA's private key never leaves keyd, so its CSR is built by OpenSSL with a throwaway
//! key of the same type and then re-signed: the `CertificationRequestInfo` is cut out of the DER,
//! signed by keyd (ECDSA `/sign`, or RSA PKCS#1 v1.5 `/encrypt` over the SHA-256 DigestInfo),
//! and the request is re-assembled. The result is checked with OpenSSL before it is sent.

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine as _;
use http::StatusCode;
use key_api::{EncryptMechanism, KeyHandle, SignMechanism};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private, Public};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509Name, X509NameBuilder, X509Req, X509ReqBuilder, X509};

use crate::config::{EdgeCa, RenewalTime, Subject};
use crate::error::EdgedError;
use crate::model::{CertificateResponse, PrivateKey};

/// The cert ID and key ID used while renewing the Edge CA.
pub const EDGE_CA_TEMP_ID: &str = "aziot-edged-ca-temp";

/// keyd's algorithm preference for the Edge CA key.
pub const EDGE_CA_KEY_ALGORITHMS: &str = "rsa-2048:*";

/// DER prefix of the SHA-256 `DigestInfo` (PKCS#1 v1.5 signatures).
const SHA256_DIGEST_INFO_PREFIX: &[u8] = &[
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

/// Distinguished-name order for `subject` tables (lower first); unknown names go last.
const DN_ORDER: &[&str] = &[
    "DC",
    "C",
    "ST",
    "L",
    "street",
    "O",
    "OU",
    "title",
    "CN",
    "emailAddress",
];

fn ssl(step: &str) -> impl FnOnce(openssl::error::ErrorStack) -> EdgedError + '_ {
    move |source| EdgedError::crypto(step, source)
}

/// Cuts a CN to 64 characters (the X.520 upper bound).
pub fn truncate_common_name(name: &str) -> String {
    name.chars().take(64).collect()
}

/// The Edge CA subject: the configured one, or `CN=aziot-edge CA <deviceId>`.
pub fn edge_ca_subject(subject: Option<&Subject>, device_id: &str) -> Result<X509Name, EdgedError> {
    let step = "failed to build the Edge CA subject";
    let mut builder = X509NameBuilder::new().map_err(ssl(step))?;
    match subject {
        None => builder
            .append_entry_by_text(
                "CN",
                &truncate_common_name(&format!("aziot-edge CA {device_id}")),
            )
            .map_err(ssl(step))?,
        Some(Subject::CommonName(name)) => builder
            .append_entry_by_text("CN", &truncate_common_name(name))
            .map_err(ssl(step))?,
        Some(Subject::Fields(fields)) => {
            let mut ordered: Vec<(&String, &String)> = fields.iter().collect();
            ordered.sort_by_key(|(key, _)| {
                DN_ORDER
                    .iter()
                    .position(|known| known.eq_ignore_ascii_case(key))
                    .unwrap_or(DN_ORDER.len())
            });
            for (key, value) in ordered {
                let value = if key.eq_ignore_ascii_case("CN") {
                    truncate_common_name(value)
                } else {
                    value.clone()
                };
                builder
                    .append_entry_by_text(key, &value)
                    .map_err(|source| {
                        EdgedError::crypto(
                            format!("invalid Edge CA subject attribute {key:?}"),
                            source,
                        )
                    })?;
            }
        }
    }
    Ok(builder.build())
}

/// The public key behind a keyd key-pair handle, from keyd's `/parameters`.
pub async fn keyd_public_key(
    keyd: &key_api::Client,
    handle: &KeyHandle,
) -> Result<PKey<Public>, EdgedError> {
    let step = "failed to read the Edge CA public key from keyd";
    let parameter = |name: &'static str| async move {
        keyd.get_key_pair_public_parameter(handle, name)
            .await
            .map_err(|source| EdgedError::keyd(step, source))
    };
    let decode = |text: String| {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| EdgedError::Internal("keyd answered invalid base64".to_owned()))
    };
    let algorithm = parameter("algorithm").await?;
    match algorithm.as_str() {
        "RSA" => {
            let modulus = decode(parameter("rsa-modulus").await?)?;
            let exponent = decode(parameter("rsa-exponent").await?)?;
            let rsa = openssl::rsa::Rsa::from_public_components(
                openssl::bn::BigNum::from_slice(&modulus).map_err(ssl(step))?,
                openssl::bn::BigNum::from_slice(&exponent).map_err(ssl(step))?,
            )
            .map_err(ssl(step))?;
            PKey::from_rsa(rsa).map_err(ssl(step))
        }
        "ECDSA" => {
            let oid = decode(parameter("ec-curve-oid").await?)?;
            let point = decode(parameter("ec-point").await?)?;
            let nid = match oid.as_slice() {
                [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07] => {
                    openssl::nid::Nid::X9_62_PRIME256V1
                }
                [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22] => openssl::nid::Nid::SECP384R1,
                [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23] => openssl::nid::Nid::SECP521R1,
                _ => {
                    return Err(EdgedError::Internal(
                        "the Edge CA key uses an unsupported curve".to_owned(),
                    ))
                }
            };
            let group = openssl::ec::EcGroup::from_curve_name(nid).map_err(ssl(step))?;
            let mut context = openssl::bn::BigNumContext::new().map_err(ssl(step))?;
            let point = openssl::ec::EcPoint::from_bytes(&group, &point, &mut context)
                .map_err(ssl(step))?;
            let key = openssl::ec::EcKey::from_public_key(&group, &point).map_err(ssl(step))?;
            PKey::from_ec_key(key).map_err(ssl(step))
        }
        other => Err(EdgedError::Internal(format!(
            "the Edge CA key has an unsupported algorithm {other:?}"
        ))),
    }
}

/// One DER TLV at the start of some bytes.
struct DerElement<'a> {
    tag: u8,
    whole: &'a [u8],
    content: &'a [u8],
    rest: &'a [u8],
}

/// Splits off the first DER TLV.
fn der_element(input: &[u8]) -> Option<DerElement<'_>> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (length, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return None;
        }
        let mut length = 0usize;
        for index in 0..count {
            length = (length << 8) | usize::from(*input.get(2 + index)?);
        }
        (length, 2 + count)
    };
    let end = header.checked_add(length)?;
    let whole = input.get(..end)?;
    Some(DerElement {
        tag,
        whole,
        content: &whole[header..],
        rest: &input[end..],
    })
}

fn der_length(length: usize) -> Vec<u8> {
    if length < 0x80 {
        return vec![u8::try_from(length).unwrap_or(0)];
    }
    let bytes: Vec<u8> = length
        .to_be_bytes()
        .iter()
        .copied()
        .skip_while(|byte| *byte == 0)
        .collect();
    let mut out = vec![0x80 | u8::try_from(bytes.len()).unwrap_or(0)];
    out.extend(bytes);
    out
}

fn der_wrap(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend(der_length(content.len()));
    out.extend_from_slice(content);
    out
}

/// Splits a signed CSR's DER into its `CertificationRequestInfo` and signature algorithm.
fn split_csr(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let outer = der_element(der)?;
    if outer.tag != 0x30 {
        return None;
    }
    let info = der_element(outer.content)?;
    let algorithm = der_element(info.rest)?;
    Some((info.whole.to_vec(), algorithm.whole.to_vec()))
}

/// Builds the Edge CA CSR for the keyd key behind `handle`, signed by keyd.
pub async fn edge_ca_csr(
    keyd: &key_api::Client,
    handle: &KeyHandle,
    subject: &X509Name,
) -> Result<String, EdgedError> {
    let step = "failed to build the Edge CA CSR";
    let public = keyd_public_key(keyd, handle).await?;
    let is_rsa = public.id() == openssl::pkey::Id::RSA;
    let throwaway: PKey<Private> = if is_rsa {
        PKey::from_rsa(openssl::rsa::Rsa::generate(1024).map_err(ssl(step))?).map_err(ssl(step))?
    } else {
        let group = public.ec_key().map_err(ssl(step))?.group().curve_name();
        let group = openssl::ec::EcGroup::from_curve_name(
            group.unwrap_or(openssl::nid::Nid::X9_62_PRIME256V1),
        )
        .map_err(ssl(step))?;
        PKey::from_ec_key(openssl::ec::EcKey::generate(&group).map_err(ssl(step))?)
            .map_err(ssl(step))?
    };
    let mut builder = X509ReqBuilder::new().map_err(ssl(step))?;
    builder.set_version(0).map_err(ssl(step))?;
    builder.set_subject_name(subject).map_err(ssl(step))?;
    builder.set_pubkey(&public).map_err(ssl(step))?;
    let mut extensions = openssl::stack::Stack::new().map_err(ssl(step))?;
    extensions
        .push(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_cert_sign()
                .build()
                .map_err(ssl(step))?,
        )
        .map_err(ssl(step))?;
    extensions
        .push(
            BasicConstraints::new()
                .critical()
                .ca()
                .pathlen(0)
                .build()
                .map_err(ssl(step))?,
        )
        .map_err(ssl(step))?;
    builder.add_extensions(&extensions).map_err(ssl(step))?;
    builder
        .sign(&throwaway, MessageDigest::sha256())
        .map_err(ssl(step))?;
    let der = builder.build().to_der().map_err(ssl(step))?;
    let (info, algorithm) = split_csr(&der)
        .ok_or_else(|| EdgedError::Internal("OpenSSL produced an unparsable CSR".to_owned()))?;
    let digest = openssl::sha::sha256(&info);
    let signature = if is_rsa {
        let mut input = SHA256_DIGEST_INFO_PREFIX.to_vec();
        input.extend_from_slice(&digest);
        keyd.encrypt(handle, EncryptMechanism::RsaPkcs1, &input)
            .await
            .map_err(|source| EdgedError::keyd("failed to sign the Edge CA CSR", source))?
    } else {
        keyd.sign(handle, SignMechanism::Ecdsa { digest: &digest })
            .await
            .map_err(|source| EdgedError::keyd("failed to sign the Edge CA CSR", source))?
    };
    let mut bit_string = vec![0u8];
    bit_string.extend_from_slice(&signature);
    let mut content = info;
    content.extend_from_slice(&algorithm);
    content.extend(der_wrap(0x03, &bit_string));
    let csr = X509Req::from_der(&der_wrap(0x30, &content)).map_err(ssl(step))?;
    if !csr.verify(&public).map_err(ssl(step))? {
        return Err(EdgedError::Internal(
            "keyd's signature over the Edge CA CSR does not verify".to_owned(),
        ));
    }
    let pem = csr.to_pem().map_err(ssl(step))?;
    String::from_utf8(pem).map_err(|_| EdgedError::Internal("CSR PEM is not UTF-8".to_owned()))
}

/// Seconds since the epoch of an ASN.1 time.
pub fn asn1_unix(time: &openssl::asn1::Asn1TimeRef) -> Result<i64, EdgedError> {
    let epoch =
        openssl::asn1::Asn1Time::from_unix(0).map_err(ssl("failed to read a certificate time"))?;
    let difference = epoch
        .diff(time)
        .map_err(ssl("failed to read a certificate time"))?;
    Ok(i64::from(difference.days) * 86_400 + i64::from(difference.secs))
}

/// Whether the stored Edge CA chain is usable with `public`: parses, leaf key matches, not
/// expired.
fn usable_ca(pem: &str, public: &PKey<Public>) -> bool {
    let Ok(chain) = X509::stack_from_pem(pem.as_bytes()) else {
        return false;
    };
    let Some(leaf) = chain.first() else {
        return false;
    };
    let matches = leaf
        .public_key()
        .map(|key| key.public_eq(public))
        .unwrap_or(false);
    let now = crate::time::now_unix();
    let not_after = asn1_unix(leaf.not_after()).unwrap_or(0);
    matches && not_after > now
}

/// Makes sure the Edge CA exists (spec section 7) and returns keyd's handle to its key.
pub async fn ensure_edge_ca(
    edge_ca: &EdgeCa,
    device_id: &str,
    keyd: &key_api::Client,
    certd: &cert_api::Client,
) -> Result<KeyHandle, EdgedError> {
    if edge_ca.preloaded {
        let handle = keyd.load_key_pair(&edge_ca.key).await.map_err(|source| {
            EdgedError::keyd(
                format!("failed to load the Edge CA key {:?}", edge_ca.key),
                source,
            )
        })?;
        certd.get_cert(&edge_ca.cert).await.map_err(|source| {
            EdgedError::certd(
                format!("failed to load the Edge CA certificate {:?}", edge_ca.cert),
                source,
            )
        })?;
        return Ok(handle);
    }
    let handle = keyd
        .create_key_pair_if_not_exists(&edge_ca.key, Some(EDGE_CA_KEY_ALGORITHMS))
        .await
        .map_err(|source| {
            EdgedError::keyd(
                format!("failed to create the Edge CA key {:?}", edge_ca.key),
                source,
            )
        })?;
    let public = keyd_public_key(keyd, &handle).await?;
    match certd.get_cert(&edge_ca.cert).await {
        Ok(pem) if usable_ca(&pem, &public) => {
            warn_if_expiring(&pem, edge_ca);
            return Ok(handle);
        }
        Ok(_) => log::info!(
            "Edge CA certificate {:?} is expired or does not match its key; issuing a new one",
            edge_ca.cert
        ),
        Err(error) if error.status() == Some(StatusCode::NOT_FOUND) => {
            log::info!(
                "Edge CA certificate {:?} does not exist; issuing it",
                edge_ca.cert
            )
        }
        Err(source) => {
            return Err(EdgedError::certd(
                format!("failed to read the Edge CA certificate {:?}", edge_ca.cert),
                source,
            ))
        }
    }
    let subject = edge_ca_subject(edge_ca.subject.as_ref(), device_id)?;
    let csr = edge_ca_csr(keyd, &handle, &subject).await?;
    certd
        .create_cert(&edge_ca.cert, &csr, None)
        .await
        .map_err(|source| {
            EdgedError::certd(
                format!("failed to issue the Edge CA certificate {:?}", edge_ca.cert),
                source,
            )
        })?;
    log::info!("issued the Edge CA certificate {:?}", edge_ca.cert);
    Ok(handle)
}

fn warn_if_expiring(pem: &str, edge_ca: &EdgeCa) {
    let Ok(leaf) = X509::from_pem(pem.as_bytes()) else {
        return;
    };
    let (Ok(not_before), Ok(not_after)) =
        (asn1_unix(leaf.not_before()), asn1_unix(leaf.not_after()))
    else {
        return;
    };
    let lifetime = (not_after - not_before).max(1);
    let remaining = not_after - crate::time::now_unix();
    if remaining * 5 < lifetime {
        log::warn!(
            "the Edge CA certificate {:?} expires at {} ({}); restart edged after renewing it",
            edge_ca.cert,
            crate::time::format_unix(not_after, "Z"),
            if edge_ca.auto_renew.is_some() {
                "it is re-issued at the next start once expired"
            } else {
                "auto-renew is not configured"
            }
        );
    }
}

/// The validity window of the Edge CA's leaf certificate, as Unix seconds.
pub async fn edge_ca_validity(
    edge_ca: &EdgeCa,
    certd: &cert_api::Client,
) -> Result<(i64, i64), EdgedError> {
    let pem = certd.get_cert(&edge_ca.cert).await.map_err(|source| {
        EdgedError::certd(
            format!("failed to read the Edge CA certificate {:?}", edge_ca.cert),
            source,
        )
    })?;
    let leaf =
        X509::from_pem(pem.as_bytes()).map_err(ssl("failed to parse the Edge CA certificate"))?;
    Ok((asn1_unix(leaf.not_before())?, asn1_unix(leaf.not_after())?))
}

/// When a certificate valid from `not_before` to `not_after` is due for renewal.
pub fn renewal_time(not_before: i64, not_after: i64, threshold: RenewalTime) -> i64 {
    threshold.renew_at(not_before, not_after)
}

/// How long to wait after a failed renewal (at least a minute).
pub fn retry_delay(not_before: i64, not_after: i64, retry: RenewalTime) -> u64 {
    retry
        .retry_delay(not_before, not_after, std::time::Duration::from_secs(60))
        .as_secs()
}

/// Renews the Edge CA (spec section 7) and returns keyd's handle to its (possibly new) key.
///
/// With `rotate_key`: a fresh key pair `aziot-edged-ca-temp` (a stale one is deleted first), a
/// CSR with the old subject, issuance as `aziot-edged-ca-temp` (certd's issuance options for that
/// ID), the temporary cert deleted, the new chain imported over the Edge CA cert ID, and the
/// temporary key moved over the Edge CA key; if that move fails the old chain is re-imported.
/// Without it, the same key is certified again under the Edge CA cert ID.
pub async fn renew_edge_ca(
    edge_ca: &EdgeCa,
    rotate_key: bool,
    keyd: &key_api::Client,
    certd: &cert_api::Client,
) -> Result<KeyHandle, EdgedError> {
    let old_chain = certd.get_cert(&edge_ca.cert).await.map_err(|source| {
        EdgedError::certd("failed to read the Edge CA certificate for renewal", source)
    })?;
    let old_leaf = X509::from_pem(old_chain.as_bytes())
        .map_err(ssl("failed to parse the Edge CA certificate"))?;
    let subject = old_leaf
        .subject_name()
        .to_owned()
        .map_err(ssl("failed to copy the Edge CA subject"))?;
    if !rotate_key {
        let handle = keyd.load_key_pair(&edge_ca.key).await.map_err(|source| {
            EdgedError::keyd("failed to load the Edge CA key for renewal", source)
        })?;
        let csr = edge_ca_csr(keyd, &handle, &subject).await?;
        certd
            .create_cert(&edge_ca.cert, &csr, None)
            .await
            .map_err(|source| {
                EdgedError::certd("failed to renew the Edge CA certificate", source)
            })?;
        return Ok(handle);
    }
    if let Ok(stale) = keyd.load_key_pair(EDGE_CA_TEMP_ID).await {
        keyd.delete_key_pair(&stale).await.map_err(|source| {
            EdgedError::keyd("failed to delete a stale temporary Edge CA key", source)
        })?;
    }
    let temporary = keyd
        .create_key_pair_if_not_exists(EDGE_CA_TEMP_ID, Some(EDGE_CA_KEY_ALGORITHMS))
        .await
        .map_err(|source| EdgedError::keyd("failed to create the new Edge CA key", source))?;
    let csr = edge_ca_csr(keyd, &temporary, &subject).await?;
    let new_chain = certd
        .create_cert(EDGE_CA_TEMP_ID, &csr, None)
        .await
        .map_err(|source| {
            EdgedError::certd("failed to issue the renewed Edge CA certificate", source)
        })?;
    if let Err(source) = certd.delete_cert(EDGE_CA_TEMP_ID).await {
        log::warn!("could not delete the temporary Edge CA certificate: {source}");
    }
    certd
        .import_cert(&edge_ca.cert, &new_chain)
        .await
        .map_err(|source| {
            EdgedError::certd("failed to store the renewed Edge CA certificate", source)
        })?;
    if let Err(source) = keyd.move_key_pair(EDGE_CA_TEMP_ID, &edge_ca.key).await {
        if let Err(restore) = certd.import_cert(&edge_ca.cert, &old_chain).await {
            log::error!("could not restore the previous Edge CA certificate: {restore}");
        }
        return Err(EdgedError::keyd(
            "failed to move the new Edge CA key into place",
            source,
        ));
    }
    keyd.load_key_pair(&edge_ca.key)
        .await
        .map_err(|source| EdgedError::keyd("failed to load the renewed Edge CA key", source))
}

/// What kind of module certificate to issue.
#[derive(Clone, Debug)]
pub enum ModuleCertKind {
    /// A TLS server certificate for `common_name`.
    Server {
        /// The requested CN / first SAN.
        common_name: String,
        /// The module's generation ID.
        gen_id: String,
    },
    /// A client identity certificate.
    Identity {
        /// IoT Hub host name.
        hub_name: String,
        /// Device ID.
        device_id: String,
    },
}

/// The certd cert ID of a module certificate.
pub fn module_cert_id(module: &str, kind: &ModuleCertKind) -> String {
    match kind {
        ModuleCertKind::Server { gen_id, .. } => format!(
            "aziot-edged/module/{}:{gen_id}:server",
            module.trim_start_matches('$')
        ),
        ModuleCertKind::Identity { .. } => format!("aziot-edged/module/{module}:identity"),
    }
}

/// A fresh RSA-2048 key and a CSR for a module certificate.
pub fn module_csr(
    module: &str,
    kind: &ModuleCertKind,
) -> Result<(PKey<Private>, String), EdgedError> {
    let step = "failed to build the module certificate request";
    let key =
        PKey::from_rsa(openssl::rsa::Rsa::generate(2048).map_err(ssl(step))?).map_err(ssl(step))?;
    let mut builder = X509ReqBuilder::new().map_err(ssl(step))?;
    builder.set_version(0).map_err(ssl(step))?;
    builder.set_pubkey(&key).map_err(ssl(step))?;
    let common_name = match kind {
        ModuleCertKind::Server { common_name, .. } => common_name.clone(),
        ModuleCertKind::Identity { .. } => module.to_owned(),
    };
    let mut name = X509NameBuilder::new().map_err(ssl(step))?;
    name.append_entry_by_text("CN", &truncate_common_name(&common_name))
        .map_err(ssl(step))?;
    builder.set_subject_name(&name.build()).map_err(ssl(step))?;
    let mut extensions = openssl::stack::Stack::new().map_err(ssl(step))?;
    let context = builder.x509v3_context(None);
    let mut san = SubjectAlternativeName::new();
    let eku = match kind {
        ModuleCertKind::Server { common_name, .. } => {
            match common_name.parse::<IpAddr>() {
                Ok(_) => san.ip(common_name),
                Err(_) => san.dns(common_name),
            };
            let bare = module.trim_start_matches('$');
            if bare != common_name {
                san.dns(bare);
            }
            ExtendedKeyUsage::new()
                .server_auth()
                .build()
                .map_err(ssl(step))?
        }
        ModuleCertKind::Identity {
            hub_name,
            device_id,
        } => {
            let uri = format!("azureiot://{hub_name}/devices/{device_id}/modules/{module}");
            // Reference quirk, kept: a DNS entry holding "URI: ..." text; ours adds a real URI.
            san.dns(&format!("URI: {uri}"));
            san.uri(&uri);
            ExtendedKeyUsage::new()
                .client_auth()
                .build()
                .map_err(ssl(step))?
        }
    };
    extensions
        .push(san.build(&context).map_err(ssl(step))?)
        .map_err(ssl(step))?;
    extensions.push(eku).map_err(ssl(step))?;
    builder.add_extensions(&extensions).map_err(ssl(step))?;
    builder
        .sign(&key, MessageDigest::sha256())
        .map_err(ssl(step))?;
    let pem = builder.build().to_pem().map_err(ssl(step))?;
    let pem = String::from_utf8(pem)
        .map_err(|_| EdgedError::Internal("CSR PEM is not UTF-8".to_owned()))?;
    Ok((key, pem))
}

/// Issues a module certificate through certd with the Edge CA as issuer.
pub async fn issue_module_cert(
    certd: &cert_api::Client,
    edge_ca_cert: &str,
    edge_ca_key: &KeyHandle,
    module: &str,
    kind: ModuleCertKind,
) -> Result<CertificateResponse, EdgedError> {
    let cert_id = module_cert_id(module, &kind);
    let module_name = module.to_owned();
    let kind_for_csr = kind.clone();
    let (key, csr) = tokio::task::spawn_blocking(move || module_csr(&module_name, &kind_for_csr))
        .await
        .map_err(|error| EdgedError::Internal(format!("key generation task failed: {error}")))??;
    let chain = certd
        .create_cert(&cert_id, &csr, Some((edge_ca_cert, edge_ca_key)))
        .await
        .map_err(|source| {
            EdgedError::certd(
                format!("failed to issue a certificate for module {module}"),
                source,
            )
        })?;
    let step = "failed to read the issued certificate";
    let leaf = X509::from_pem(chain.as_bytes()).map_err(ssl(step))?;
    let expiration = crate::time::format_unix(asn1_unix(leaf.not_after())?, "+00:00");
    let private_key = key.private_key_to_pem_pkcs8().map_err(ssl(step))?;
    Ok(CertificateResponse {
        private_key: PrivateKey {
            key_type: "key".to_owned(),
            bytes: String::from_utf8(private_key)
                .map_err(|_| EdgedError::Internal("key PEM is not UTF-8".to_owned()))?,
        },
        certificate: chain,
        expiration,
    })
}

/// The PEM certificates of `text`, each re-encoded, in order.
pub fn pem_certificates(text: &str) -> Vec<String> {
    X509::stack_from_pem(text.as_bytes())
        .unwrap_or_default()
        .iter()
        .filter_map(|certificate| certificate.to_pem().ok())
        .filter_map(|pem| String::from_utf8(pem).ok())
        .collect()
}

/// Concatenates PEM bundles, dropping repeated certificates.
pub fn merge_bundles(bundles: &[String]) -> String {
    let mut seen: BTreeMap<String, ()> = BTreeMap::new();
    let mut out = String::new();
    for bundle in bundles {
        for certificate in pem_certificates(bundle) {
            if seen.insert(certificate.clone(), ()).is_none() {
                out.push_str(&certificate);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_round_trip_and_split() {
        let key = PKey::from_ec_key(
            openssl::ec::EcKey::generate(
                &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1)
                    .unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        let mut builder = X509ReqBuilder::new().unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_subject_name(&edge_ca_subject(None, "dev").unwrap())
            .unwrap();
        builder.sign(&key, MessageDigest::sha256()).unwrap();
        let der = builder.build().to_der().unwrap();
        let (info, algorithm) = split_csr(&der).unwrap();
        // Re-sign the info ourselves like keyd would and re-assemble.
        let digest = openssl::sha::sha256(&info);
        let signature = openssl::ecdsa::EcdsaSig::sign(&digest, &key.ec_key().unwrap())
            .unwrap()
            .to_der()
            .unwrap();
        let mut bit_string = vec![0u8];
        bit_string.extend_from_slice(&signature);
        let mut content = info;
        content.extend_from_slice(&algorithm);
        content.extend(der_wrap(0x03, &bit_string));
        let csr = X509Req::from_der(&der_wrap(0x30, &content)).unwrap();
        assert!(csr.verify(&key).unwrap());
        assert_eq!(der_length(0x7f), vec![0x7f]);
        assert_eq!(der_length(0x80), vec![0x81, 0x80]);
        assert_eq!(der_length(0x1234), vec![0x82, 0x12, 0x34]);
    }

    #[test]
    fn subjects_and_ids() {
        let long = "d".repeat(80);
        let name = edge_ca_subject(None, &long).unwrap();
        let cn = name.entries().next().unwrap().data().to_string();
        assert_eq!(cn.unwrap().chars().count(), 64);
        let mut fields = BTreeMap::new();
        fields.insert("CN".to_owned(), "ca".to_owned());
        fields.insert("O".to_owned(), "org".to_owned());
        let name = edge_ca_subject(Some(&Subject::Fields(fields)), "d").unwrap();
        let order: Vec<String> = name
            .entries()
            .map(|entry| entry.object().nid().short_name().unwrap().to_owned())
            .collect();
        assert_eq!(order, ["O", "CN"]);
        assert_eq!(
            module_cert_id(
                "$edgeHub",
                &ModuleCertKind::Server {
                    common_name: "h".into(),
                    gen_id: "g".into()
                }
            ),
            "aziot-edged/module/edgeHub:g:server"
        );
        assert_eq!(
            module_cert_id(
                "m",
                &ModuleCertKind::Identity {
                    hub_name: "h".into(),
                    device_id: "d".into()
                }
            ),
            "aziot-edged/module/m:identity"
        );
    }

    #[test]
    fn module_csrs_carry_the_right_names() {
        let (_, pem) = module_csr(
            "$edgeHub",
            &ModuleCertKind::Server {
                common_name: "10.0.0.1".into(),
                gen_id: "g".into(),
            },
        )
        .unwrap();
        let csr = X509Req::from_pem(pem.as_bytes()).unwrap();
        let text = String::from_utf8(csr.to_text().unwrap()).unwrap();
        assert!(text.contains("IP Address:10.0.0.1"), "{text}");
        assert!(text.contains("DNS:edgeHub"), "{text}");
        assert!(text.contains("TLS Web Server Authentication"), "{text}");
        let (_, pem) = module_csr(
            "m",
            &ModuleCertKind::Identity {
                hub_name: "hub.example".into(),
                device_id: "dev".into(),
            },
        )
        .unwrap();
        let text = String::from_utf8(
            X509Req::from_pem(pem.as_bytes())
                .unwrap()
                .to_text()
                .unwrap(),
        )
        .unwrap();
        assert!(
            text.contains("URI:azureiot://hub.example/devices/dev/modules/m"),
            "{text}"
        );
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
    }

    #[test]
    fn renewal_schedule() {
        let (start, end) = (1_000, 101_000);
        assert_eq!(renewal_time(start, end, RenewalTime::Percent(80)), 81_000);
        assert_eq!(
            renewal_time(
                start,
                end,
                RenewalTime::Duration(std::time::Duration::from_secs(600))
            ),
            100_400
        );
        assert_eq!(
            renewal_time(
                start,
                end,
                RenewalTime::Duration(std::time::Duration::from_secs(10_000_000))
            ),
            start
        );
        assert_eq!(retry_delay(start, end, RenewalTime::Percent(4)), 4_000);
        assert_eq!(
            retry_delay(
                start,
                end,
                RenewalTime::Duration(std::time::Duration::from_secs(5))
            ),
            60
        );
    }

    #[test]
    fn bundles_merge_without_duplicates() {
        let key = PKey::from_rsa(openssl::rsa::Rsa::generate(1024).unwrap()).unwrap();
        let make = |cn: &str| {
            let mut builder = X509::builder().unwrap();
            let mut name = X509NameBuilder::new().unwrap();
            name.append_entry_by_text("CN", cn).unwrap();
            let name = name.build();
            builder.set_subject_name(&name).unwrap();
            builder.set_issuer_name(&name).unwrap();
            builder.set_pubkey(&key).unwrap();
            builder
                .set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
                .unwrap();
            builder
                .set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
                .unwrap();
            builder.sign(&key, MessageDigest::sha256()).unwrap();
            String::from_utf8(builder.build().to_pem().unwrap()).unwrap()
        };
        let a = make("a");
        let b = make("b");
        let merged = merge_bundles(&[format!("{a}{b}"), b.clone(), a.clone()]);
        assert_eq!(pem_certificates(&merged).len(), 2);
    }
}
