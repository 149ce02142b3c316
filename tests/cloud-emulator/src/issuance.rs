//! DPS certificate issuance (spec 9.6): a CSR in the registration body is checked (signature,
//! subject CN = registration ID) and, when the enrollment has an issuance policy, answered with a
//! short-lived client certificate from the emulator's DPS issuing CA.
//!
//! Both field generations are served: `csr` → `issuedCertificateChain` (base64 DER strings, leaf
//! first, then the issuing CA) and `clientCertificateCsr` → `issuedClientCertificate` (PEM leaf)
//! plus `trustBundle` (`{"certificates": [{"certificate": "<PEM>"}]}`, the emulator's choice: the
//! spec leaves its shape open).

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage};
use openssl::x509::{X509Builder, X509NameBuilder, X509Req, X509};
use serde_json::{json, Value};

use crate::pki::TestCa;
use crate::util;

/// Which request field carried the CSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Generation {
    /// `csr` (api-version `2025-07-01-preview`).
    Current,
    /// `clientCertificateCsr` (api-version `2021-11-01-preview`).
    Earlier,
}

/// A CSR found in a registration body.
pub struct CsrRequest {
    /// The field generation.
    pub generation: Generation,
    /// The parsed request.
    pub request: X509Req,
}

impl std::fmt::Debug for CsrRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CsrRequest")
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// What an issuance answers, kept in the operation until the device polls.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The field generation to answer in.
    pub generation: Generation,
    /// The new leaf.
    pub leaf: X509,
    /// The issuing CA.
    pub ca: X509,
}

impl Issued {
    /// The `registrationState` fields for this issuance.
    pub fn fields(&self) -> Vec<(&'static str, Value)> {
        let der = |cert: &X509| cert.to_der().map(|der| util::b64(&der)).unwrap_or_default();
        let pem = |cert: &X509| {
            cert.to_pem()
                .map(|pem| String::from_utf8_lossy(&pem).into_owned())
                .unwrap_or_default()
        };
        match self.generation {
            Generation::Current => vec![(
                "issuedCertificateChain",
                json!([der(&self.leaf), der(&self.ca)]),
            )],
            Generation::Earlier => vec![
                ("issuedClientCertificate", json!(pem(&self.leaf))),
                (
                    "trustBundle",
                    json!({ "certificates": [{ "certificate": pem(&self.ca) }] }),
                ),
            ],
        }
    }
}

/// The CSR of a registration body, if it has one: `Err` names what is wrong with it.
pub fn csr_in_body(body: &Value, registration_id: &str) -> Result<Option<CsrRequest>, String> {
    let (generation, field, text) = match (body.get("csr"), body.get("clientCertificateCsr")) {
        (Some(Value::String(text)), _) => (Generation::Current, "csr", text),
        (None | Some(Value::Null), Some(Value::String(text))) => {
            (Generation::Earlier, "clientCertificateCsr", text)
        }
        (None | Some(Value::Null), None | Some(Value::Null)) => return Ok(None),
        _ => return Err("the CSR must be a string".to_owned()),
    };
    let request = if text.trim_start().starts_with("-----BEGIN") {
        X509Req::from_pem(text.as_bytes()).map_err(|_| format!("{field} is not a PEM CSR"))?
    } else {
        let der = util::b64_decode(text.trim()).ok_or(format!("{field} is not base64"))?;
        X509Req::from_der(&der).map_err(|_| format!("{field} is not a DER PKCS#10 CSR"))?
    };
    let key = request
        .public_key()
        .map_err(|_| format!("{field} has no usable public key"))?;
    if !request.verify(&key).unwrap_or(false) {
        return Err(format!("{field} signature does not verify"));
    }
    let cn = request
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|entry| entry.data().to_string().ok());
    if cn.as_deref() != Some(registration_id) {
        return Err(format!(
            "the CSR's subject CN must be the registration ID {registration_id:?}"
        ));
    }
    Ok(Some(CsrRequest {
        generation,
        request,
    }))
}

/// Issues a client certificate for the CSR's key, subject `CN=<registration ID>`, valid from ten
/// seconds ago (clock skew) for `validity_secs`.
pub fn issue(
    ca: &TestCa,
    csr: &CsrRequest,
    registration_id: &str,
    validity_secs: u64,
) -> Result<Issued, openssl::error::ErrorStack> {
    let key = csr.request.public_key()?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, registration_id)?;
    let name = name.build();
    let mut builder = X509Builder::new()?;
    builder.set_version(2)?;
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    let serial = serial.to_asn1_integer()?;
    builder.set_serial_number(&serial)?;
    builder.set_subject_name(&name)?;
    builder.set_issuer_name(ca.ca.cert.subject_name())?;
    builder.set_pubkey(&key)?;
    let now = i64::try_from(util::now_secs()).unwrap_or(i64::MAX);
    let not_before = Asn1Time::from_unix(now - 10)?;
    let not_after =
        Asn1Time::from_unix(now + i64::try_from(validity_secs).unwrap_or(i64::MAX / 2))?;
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    builder.append_extension(BasicConstraints::new().critical().build()?)?;
    builder.append_extension(
        KeyUsage::new()
            .critical()
            .digital_signature()
            .key_encipherment()
            .build()?,
    )?;
    builder.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
    builder.sign(&ca.ca.key, MessageDigest::sha256())?;
    Ok(Issued {
        generation: csr.generation,
        leaf: builder.build(),
        ca: ca.ca.cert.clone(),
    })
}
