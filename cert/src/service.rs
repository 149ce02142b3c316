//! The cert service: authorization, preloaded certs, issuance rules and storage, in terms of cert
//! IDs and PEM text. It has no HTTP types.
//!
//! Concurrency: there is no global lock. Reads take no lock at all (dynamic certs are served from
//! an in-memory copy of what was last written or read). Writes to one cert ID are serialized by a
//! per-ID lock; writes that queue up behind one another on the same ID are merged, so only the
//! newest value is written and every merged writer returns once it is durable (a group commit:
//! each atomic write costs two fsyncs, which would otherwise cap the rate of one ID). Issuance
//! itself (CSR check, keyd signature) runs outside the lock; only the final store is ordered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use key_api::KeyHandle;
use openssl::pkey::{PKey, Public};

use crate::config::{
    cert_id_problem, glob_matches, IssuanceOptions, LocalCa, Method, Policy, Preloaded,
    DEFAULT_EXPIRY_DAYS, DEFAULT_KEY_ALGORITHMS,
};
use crate::error::CertError;
use crate::issuance::{self, IssuedBy, IssuerCert, PublicKey, Template};
use crate::keys::{Keys, SigningKey};
use crate::pem;
use crate::store::{CertStore, StoreError};

mod est;

/// Most dynamic certs kept in memory; beyond it, reads go to the store.
const CACHE_LIMIT: usize = 4096;

async fn blocking<T: Send + 'static>(
    task: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CertError> {
    tokio::task::spawn_blocking(task)
        .await
        .map_err(CertError::Task)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// A change to one cert ID.
#[derive(Clone, Debug)]
enum Write {
    Store(Arc<str>),
    Delete,
}

/// The write queue of one cert ID.
#[derive(Debug, Default)]
struct Slot {
    /// Held while writing to the store (and by draft create for its whole check-issue-store).
    lock: tokio::sync::Mutex<()>,
    queue: Mutex<Queue>,
}

#[derive(Debug, Default)]
struct Queue {
    /// The last ticket handed out.
    issued: u64,
    /// The newest write not yet taken by a writer, with its ticket.
    pending: Option<(u64, Write)>,
    /// Every ticket up to this one is durable (or failed, see `last_ok`).
    done: u64,
    /// Whether the last completed write succeeded.
    last_ok: bool,
}

enum Turn {
    /// A later write covering this one already finished.
    Done(bool),
    /// Write this (the newest value, possibly another request's), then report `ticket` done.
    Write(u64, Write),
}

impl Slot {
    fn enqueue(&self, write: Write) -> u64 {
        let mut queue = lock(&self.queue);
        queue.issued += 1;
        let ticket = queue.issued;
        queue.pending = Some((ticket, write));
        ticket
    }

    /// Called with `lock` held.
    fn turn(&self, ticket: u64) -> Turn {
        let mut queue = lock(&self.queue);
        if queue.done >= ticket {
            return Turn::Done(queue.last_ok);
        }
        match queue.pending.take() {
            Some((newest, write)) => Turn::Write(newest, write),
            // Cannot happen: a ticket above `done` is pending until a lock holder takes it.
            None => Turn::Done(false),
        }
    }

    /// Called with `lock` held.
    fn finish(&self, ticket: u64, ok: bool) {
        let mut queue = lock(&self.queue);
        queue.done = queue.done.max(ticket);
        queue.last_ok = ok;
    }
}

/// Per-cert-ID write slots.
#[derive(Debug, Default)]
struct Slots {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl Slots {
    fn get(&self, id: &str) -> Arc<Slot> {
        let mut slots = lock(&self.slots);
        if slots.len() > 1024 {
            slots.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        Arc::clone(slots.entry(id.to_owned()).or_default())
    }
}

/// Dynamic certs in memory. A read fills the cache only if no write happened since it started
/// (the generation check), so a slow read can never put back a value a write replaced.
#[derive(Debug, Default)]
struct Cache {
    inner: RwLock<(u64, HashMap<String, Arc<str>>)>,
}

impl Cache {
    fn get(&self, id: &str) -> Option<Arc<str>> {
        self.inner
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .1
            .get(id)
            .cloned()
    }

    fn generation(&self) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .0
    }

    fn fill(&self, id: &str, pem: &Arc<str>, generation: u64) {
        let mut inner = self
            .inner
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        if inner.0 == generation && inner.1.len() < CACHE_LIMIT {
            inner.1.insert(id.to_owned(), Arc::clone(pem));
        }
    }

    fn set(&self, id: &str, pem: Option<&Arc<str>>) {
        let mut inner = self
            .inner
            .write()
            .unwrap_or_else(|poison| poison.into_inner());
        inner.0 += 1;
        match pem {
            Some(pem) if inner.1.len() < CACHE_LIMIT || inner.1.contains_key(id) => {
                inner.1.insert(id.to_owned(), Arc::clone(pem));
            }
            _ => {
                inner.1.remove(id);
            }
        }
    }
}

/// The issuer of a `POST /certificates` request.
#[derive(Debug)]
pub struct IssuerRequest {
    /// The issuer's cert ID.
    pub cert_id: String,
    /// keyd's handle to the issuer's key.
    pub private_key_handle: KeyHandle,
}

/// The error for a signing key that is not the expected one.
type Mismatch<'a> = Box<dyn Fn() -> CertError + Send + Sync + 'a>;

/// How a certificate will be signed.
struct Plan<'a> {
    issuer: Option<Arc<IssuerCert>>,
    signing_key: SigningKey<'a>,
    /// The key the signature must verify with.
    expected_key: PKey<Public>,
    /// The same key in comparable form (`None`: a key type certd cannot sign with).
    expected: Option<PublicKey>,
    /// The error when keyd's key is not `expected_key`.
    mismatch: Mismatch<'a>,
}

impl<'a> Plan<'a> {
    /// Signed by the holder of `issuer` (whose key `signing_key` must be).
    fn by_issuer(
        issuer: Arc<IssuerCert>,
        signing_key: SigningKey<'a>,
        mismatch: Mismatch<'a>,
    ) -> Self {
        Plan {
            expected_key: issuer.public_key.clone(),
            expected: issuer.comparable_key.clone(),
            issuer: Some(issuer),
            signing_key,
            mismatch,
        }
    }

    /// Self-signed with `signing_key`, which must be `key`.
    fn self_signed(
        key: PKey<Public>,
        signing_key: SigningKey<'a>,
        mismatch: Mismatch<'a>,
    ) -> Result<Self, CertError> {
        Ok(Plan {
            expected: PublicKey::from_pkey(&key)?,
            expected_key: key,
            issuer: None,
            signing_key,
            mismatch,
        })
    }
}

/// Most parsed issuer certificates kept.
const ISSUER_CACHE_LIMIT: usize = 256;

/// The cert service.
#[derive(Debug)]
pub struct CertService {
    store: Arc<dyn CertStore>,
    policy: RwLock<Arc<Policy>>,
    keys: Keys,
    slots: Slots,
    cache: Cache,
    /// Parsed issuer certificates by cert ID, reused while the stored chain is unchanged.
    issuers: Mutex<HashMap<String, Arc<IssuerCert>>>,
    /// keyd's URI, for TLS client keys that sign through keyd (EST).
    keyd_uri: String,
}

/// The most ASCII letters and digits a cert ID named through the API may contain: what the file
/// store can name (`config_common::files::MAX_ID_ALPHANUMERICS`), the same limit as keyd's.
pub const MAX_CERT_ID_ALPHANUMERICS: usize = config_common::files::MAX_ID_ALPHANUMERICS;

/// Checks a cert ID field of a request (the contract's rules, then the file store's limit).
pub fn validate_cert_id(id: &str, field: &'static str) -> Result<(), CertError> {
    if let Some(reason) = cert_id_problem(id) {
        return Err(CertError::invalid(field, reason));
    }
    if !config_common::files::fits_file_name(id) {
        return Err(CertError::invalid(
            field,
            format!(
                "must contain at most {MAX_CERT_ID_ALPHANUMERICS} ASCII letters and digits \
                 (the file store's file name limit)"
            ),
        ));
    }
    Ok(())
}

impl CertService {
    /// A service over `store`, signing through `keyd`.
    pub fn new(store: Arc<dyn CertStore>, policy: Policy, keyd: key_api::Client) -> Self {
        CertService {
            store,
            policy: RwLock::new(Arc::new(policy)),
            keys: Keys::new(keyd),
            slots: Slots::default(),
            cache: Cache::default(),
            issuers: Mutex::new(HashMap::new()),
            keyd_uri: crate::config::DEFAULT_KEYD_ENDPOINT.to_owned(),
        }
    }

    /// Sets keyd's URI (the default is [`crate::config::DEFAULT_KEYD_ENDPOINT`]); the EST TLS
    /// client key signs through it.
    pub fn with_keyd_uri(mut self, uri: &str) -> Self {
        uri.clone_into(&mut self.keyd_uri);
        self
    }

    /// Replaces principals, issuance options and preloaded certs (config reload).
    pub fn set_policy(&self, policy: Policy) {
        *self
            .policy
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(policy);
    }

    fn policy(&self) -> Arc<Policy> {
        Arc::clone(
            &self
                .policy
                .read()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }

    fn authorize(&self, policy: &Policy, uid: u32, id: &str) -> Result<(), CertError> {
        if uid == 0 {
            return Ok(());
        }
        let allowed = policy
            .principals
            .iter()
            .filter(|principal| principal.uid == uid)
            .flat_map(|principal| principal.certs.iter())
            .any(|pattern| glob_matches(pattern, id));
        if allowed {
            Ok(())
        } else {
            Err(CertError::Forbidden {
                uid,
                id: id.to_owned(),
            })
        }
    }

    /// Checks everything a write to `id` needs: a valid ID, the caller's rights, not preloaded.
    fn check_write(
        &self,
        uid: u32,
        id: &str,
        field: &'static str,
    ) -> Result<Arc<Policy>, CertError> {
        validate_cert_id(id, field)?;
        let policy = self.policy();
        self.authorize(&policy, uid, id)?;
        if policy.preloaded.contains_key(id) {
            return Err(CertError::Preloaded(id.to_owned()));
        }
        Ok(policy)
    }

    async fn load_dynamic(&self, id: &str) -> Result<Option<Arc<str>>, CertError> {
        if let Some(pem) = self.cache.get(id) {
            return Ok(Some(pem));
        }
        let generation = self.cache.generation();
        let store = Arc::clone(&self.store);
        let owned_id = id.to_owned();
        let loaded = blocking(move || store.load(&owned_id)).await??;
        Ok(loaded.map(|pem| {
            let pem: Arc<str> = pem.into();
            self.cache.fill(id, &pem, generation);
            pem
        }))
    }

    async fn load_file(id: &str, path: &std::path::Path) -> Result<Option<String>, CertError> {
        let owned_path = path.to_owned();
        match blocking(move || std::fs::read(owned_path)).await? {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CertError::PreloadedUnreadable {
                id: id.to_owned(),
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The PEM of cert `id`, preloaded or dynamic; `None` when absent.
    async fn load(&self, policy: &Policy, id: &str) -> Result<Option<String>, CertError> {
        match policy.preloaded.get(id) {
            Some(Preloaded::File(path)) => Self::load_file(id, path).await,
            Some(Preloaded::List(members)) => {
                let mut bundle = String::new();
                let mut found = false;
                for member in members {
                    let pem = match policy.preloaded.get(member) {
                        Some(Preloaded::File(path)) => Self::load_file(member, path).await?,
                        // Nested lists are refused at startup.
                        Some(Preloaded::List(_)) => None,
                        None => self.load_dynamic(member).await?.map(|pem| pem.to_string()),
                    };
                    if let Some(pem) = pem {
                        pem::append(&mut bundle, &pem);
                        found = true;
                    }
                }
                Ok(found.then_some(bundle))
            }
            None => Ok(self.load_dynamic(id).await?.map(|pem| pem.to_string())),
        }
    }

    /// Applies one write to the store and the cache. Called with the ID's lock held.
    async fn apply(&self, id: &str, write: Write) -> Result<(), CertError> {
        let store = Arc::clone(&self.store);
        let owned_id = id.to_owned();
        let value = match &write {
            Write::Store(pem) => Some(Arc::clone(pem)),
            Write::Delete => None,
        };
        blocking(move || match write {
            Write::Store(pem) => store.store(&owned_id, &pem),
            Write::Delete => store.delete(&owned_id),
        })
        .await??;
        self.cache.set(id, value.as_ref());
        Ok(())
    }

    /// Writes (or deletes) `id`, merged with other writes queued on the same ID.
    async fn write(&self, id: &str, write: Write) -> Result<(), CertError> {
        let slot = self.slots.get(id);
        let ticket = slot.enqueue(write);
        let _guard = slot.lock.lock().await;
        match slot.turn(ticket) {
            Turn::Done(true) => Ok(()),
            Turn::Done(false) => Err(CertError::Store(StoreError::MergedWriteFailed)),
            Turn::Write(newest, write) => {
                let result = self.apply(id, write).await;
                slot.finish(newest, result.is_ok());
                result
            }
        }
    }

    /// `GET /certificates/{id}` and the draft load: the stored PEM.
    pub async fn get(&self, id: &str) -> Result<String, CertError> {
        validate_cert_id(id, "certId")?;
        let policy = self.policy();
        self.load(&policy, id)
            .await?
            .ok_or_else(|| CertError::NotFound(id.to_owned()))
    }

    /// `PUT /certificates/{id}` and the draft import: validates and stores `pem` as given.
    pub async fn import(&self, uid: u32, id: &str, pem_text: &str) -> Result<String, CertError> {
        self.check_write(uid, id, "certId")?;
        pem::certificates(pem_text).map_err(|reason| CertError::invalid("pem", reason))?;
        self.write(id, Write::Store(pem_text.into())).await?;
        Ok(pem_text.to_owned())
    }

    /// `DELETE /certificates/{id}`: succeeds when the cert does not exist.
    pub async fn delete(&self, uid: u32, id: &str) -> Result<(), CertError> {
        self.check_write(uid, id, "certId")?;
        self.write(id, Write::Delete).await
    }

    /// Cert `id` as an issuer. The parsed form is cached and reused while the stored chain is
    /// byte-for-byte the same (preloaded files are still read on every request).
    async fn issuer_cert(&self, policy: &Policy, id: &str) -> Result<Arc<IssuerCert>, CertError> {
        let chain = self
            .load(policy, id)
            .await?
            .ok_or_else(|| CertError::NotFound(id.to_owned()))?;
        if let Some(cached) = lock(&self.issuers).get(id) {
            if cached.chain == chain {
                return Ok(Arc::clone(cached));
            }
        }
        let issuer = Arc::new(issuance::issuer_from_pem(id, chain)?);
        let mut issuers = lock(&self.issuers);
        if issuers.len() >= ISSUER_CACHE_LIMIT {
            issuers.clear();
        }
        issuers.insert(id.to_owned(), Arc::clone(&issuer));
        Ok(issuer)
    }

    /// The local CA plan (`[cert_issuance.local_ca]`).
    async fn local_ca_plan<'a>(&self, policy: &'a Policy) -> Result<Plan<'a>, CertError> {
        let local_ca = policy.local_ca.as_ref().ok_or_else(|| {
            CertError::BadRequest("no [cert_issuance.local_ca] is configured".to_owned())
        })?;
        let issuer = match self.issuer_cert(policy, &local_ca.cert).await {
            Err(CertError::NotFound(_)) if Self::makes_local_ca(policy, local_ca) => {
                self.make_local_ca(policy, local_ca).await?;
                self.issuer_cert(policy, &local_ca.cert).await?
            }
            other => other?,
        };
        Ok(Plan::by_issuer(
            issuer,
            SigningKey::Certd(&local_ca.pk),
            Box::new(move || {
                CertError::BadRequest(format!(
                    "key pair {:?} in keyd does not match the public key of cert {:?}",
                    local_ca.pk, local_ca.cert
                ))
            }),
        ))
    }

    /// Whether certd makes the local CA itself: its cert ID is not preloaded and its own
    /// `[cert_issuance.<id>]` says `method = "self_signed"` (what `iotedge config apply` writes
    /// for an issued `[cert_issuance.local_ca]`).
    fn makes_local_ca(policy: &Policy, local_ca: &LocalCa) -> bool {
        !policy.preloaded.contains_key(&local_ca.cert)
            && policy
                .issuance
                .get(&local_ca.cert)
                .is_some_and(|options| options.method == Some(Method::SelfSigned))
    }

    /// Creates the local CA: key pair `pk` in keyd (if it does not exist) and a self-signed CA
    /// certificate for it under `cert`, with its configured subject and expiry.
    async fn make_local_ca(&self, policy: &Policy, local_ca: &LocalCa) -> Result<(), CertError> {
        let id = local_ca.cert.as_str();
        let slot = self.slots.get(id);
        let _guard = slot.lock.lock().await;
        if self.load(policy, id).await?.is_some() {
            return Ok(());
        }
        let options = policy.issuance.get(id);
        let (template, public_key) = self
            .new_key_template(id, &local_ca.pk, options, issuance::local_ca_extensions()?)
            .await?;
        let pk = local_ca.pk.as_str();
        let plan = Plan::self_signed(
            public_key,
            SigningKey::Certd(pk),
            Box::new(move || {
                CertError::BadRequest(format!("key pair {pk:?} changed during issuance"))
            }),
        )?;
        let chain = self.sign(&template, &plan, expiry_days(options)).await?;
        drop(plan);
        self.apply(id, Write::Store(chain.as_str().into())).await?;
        log::info!("created the local CA certificate {id:?}");
        Ok(())
    }

    /// Signs `template` according to `plan` and returns the new certificate followed by the
    /// issuer's chain. The signing key must be the expected key: compared through keyd
    /// `/parameters` before signing, and confirmed by verifying the signature afterwards.
    async fn sign(
        &self,
        template: &Template,
        plan: &Plan<'_>,
        expiry_days: u32,
    ) -> Result<String, CertError> {
        let expected = plan.expected.as_ref().ok_or_else(|| {
            CertError::BadRequest(
                "the signing key's type is not supported (EC P-256/P-384/P-521 or RSA)".to_owned(),
            )
        })?;
        if self.keys.public_key(plan.signing_key, true).await? != *expected
            && self.keys.public_key(plan.signing_key, false).await? != *expected
        {
            return Err((plan.mismatch)());
        }
        let algorithm = expected.signature_algorithm();
        let issued_by = match &plan.issuer {
            Some(issuer) => IssuedBy::Cert(issuer.as_ref()),
            None => IssuedBy::Itself,
        };
        let tbs = issuance::build_tbs(
            template,
            issued_by,
            algorithm,
            expiry_days,
            SystemTime::now(),
        )?;
        let tbs_der = issuance::tbs_der(&tbs)?;
        let signature = self
            .keys
            .sign(plan.signing_key, algorithm, &tbs_der)
            .await?;
        if !issuance::signature_verifies(algorithm, &tbs_der, &signature, &plan.expected_key) {
            self.keys.forget(plan.signing_key);
            return Err((plan.mismatch)());
        }
        let certificate = issuance::assemble(tbs, algorithm, &signature)?;
        let mut chain = pem::encode("CERTIFICATE", &certificate);
        if let Some(issuer) = &plan.issuer {
            pem::append(&mut chain, &issuer.chain);
        }
        Ok(chain)
    }

    fn template_subject(
        options: Option<&IssuanceOptions>,
        default: impl FnOnce() -> Result<x509_cert::name::Name, CertError>,
    ) -> Result<x509_cert::name::Name, CertError> {
        match options.and_then(|options| options.subject.as_ref()) {
            Some(spec) => issuance::subject_from_spec(spec),
            None => default(),
        }
    }

    /// `POST /certificates`: issues a certificate for `csr` and stores it as `id`.
    pub async fn issue_from_csr(
        &self,
        uid: u32,
        id: &str,
        csr: &str,
        issuer: Option<IssuerRequest>,
    ) -> Result<String, CertError> {
        let policy = self.check_write(uid, id, "certId")?;
        if let Some(issuer) = &issuer {
            validate_cert_id(&issuer.cert_id, "issuer.certId")?;
        }
        let csr = issuance::parse_csr(csr)?;
        // An implicit issuer signs for anyone allowed to write the ID, so it never makes a CA
        // unless configuration says the ID may be one. A caller naming an issuer holds the
        // issuer's key and could sign anything itself: unchanged.
        if issuer.is_none() && !policy.may_be_ca(id) {
            if let Some(extension) = issuance::ca_only_request(&csr.extensions)? {
                return Err(CertError::CaNotAllowed {
                    id: id.to_owned(),
                    extension,
                });
            }
        }
        let options = policy.issuance.get(id);
        let plan = match &issuer {
            Some(issuer) => {
                let issuer_cert = self.issuer_cert(&policy, &issuer.cert_id).await?;
                let issuer_id = issuer.cert_id.as_str();
                Plan::by_issuer(
                    issuer_cert,
                    SigningKey::Caller(&issuer.private_key_handle),
                    Box::new(move || {
                        CertError::invalid(
                            "issuer.privateKeyHandle",
                            format!("the key does not match the public key of cert {issuer_id:?}"),
                        )
                    }),
                )
            }
            None => match options.and_then(|options| options.method) {
                Some(Method::SelfSigned) => Plan::self_signed(
                    csr.public_key.clone(),
                    SigningKey::Certd(id),
                    Box::new(move || {
                        CertError::invalid(
                            "csr",
                            format!("the public key does not match key pair {id:?} in keyd"),
                        )
                    }),
                )?,
                Some(Method::LocalCa) => self.local_ca_plan(&policy).await?,
                Some(Method::Est) => {
                    let target = options
                        .and_then(|options| options.est.as_ref())
                        .ok_or_else(|| CertError::EstNotReady {
                            id: id.to_owned(),
                            reason: "no EST server is configured".to_owned(),
                        })?;
                    return self.est_enroll(&policy, id, target, &csr).await;
                }
                None => {
                    return Err(CertError::BadRequest(
                        "issuer is required for locally-issued certs".to_owned(),
                    ))
                }
            },
        };
        let template = Template {
            subject: Self::template_subject(options, || {
                issuance::truncate_common_names(csr.subject.clone())
            })?,
            spki: csr.spki.clone(),
            extensions: csr.extensions.clone(),
        };
        let chain = self.sign(&template, &plan, expiry_days(options)).await?;
        drop(plan);
        self.write(id, Write::Store(chain.as_str().into())).await?;
        Ok(chain)
    }

    /// Creates key pair `key_id` in keyd if it does not exist (`key_algorithms`, or the default)
    /// and the template of a certificate `id` for it: `options`' subject (default CN = `id`)
    /// and `extensions`. Returns the template and the key's public half.
    async fn new_key_template(
        &self,
        id: &str,
        key_id: &str,
        options: Option<&IssuanceOptions>,
        extensions: Vec<x509_cert::ext::Extension>,
    ) -> Result<(Template, PKey<Public>), CertError> {
        let algorithms = options
            .and_then(|options| options.key_algorithms.as_deref())
            .unwrap_or(DEFAULT_KEY_ALGORITHMS);
        self.keys.create_key_pair(key_id, algorithms).await?;
        let key = self
            .keys
            .public_key(SigningKey::Certd(key_id), false)
            .await?;
        let public_key = key.to_pkey()?.ok_or_else(|| {
            CertError::BadRequest(format!(
                "key pair {key_id:?} in keyd has an unsupported curve"
            ))
        })?;
        let template = Template {
            subject: Self::template_subject(options, || issuance::common_name_subject(id))?,
            spki: issuance::spki_of(&public_key)?,
            extensions,
        };
        Ok((template, public_key))
    }

    /// Draft `POST /certstore/cert`: returns the stored cert, or creates key pair `<id>` in
    /// keyd and a certificate for it by the configured method (default self-signed). The bool
    /// says whether it was created now.
    pub async fn draft_create(&self, uid: u32, id: &str) -> Result<(String, bool), CertError> {
        validate_cert_id(id, "certid")?;
        let policy = self.policy();
        self.authorize(&policy, uid, id)?;
        let slot = self.slots.get(id);
        let _guard = slot.lock.lock().await;
        if let Some(pem) = self.load(&policy, id).await? {
            return Ok((pem, false));
        }
        if policy.preloaded.contains_key(id) {
            return Err(CertError::Preloaded(id.to_owned()));
        }
        let options = policy.issuance.get(id);
        if options.and_then(|options| options.method) == Some(Method::Est) {
            return Err(CertError::BadRequest(format!(
                "cert {id:?} is issued by EST: request it with a CSR (POST /certificates)"
            )));
        }
        let (template, public_key) = self.new_key_template(id, id, options, Vec::new()).await?;
        let plan = match options.and_then(|options| options.method) {
            Some(Method::LocalCa) => self.local_ca_plan(&policy).await?,
            _ => Plan::self_signed(
                public_key,
                SigningKey::Certd(id),
                Box::new(move || {
                    CertError::BadRequest(format!("key pair {id:?} changed during issuance"))
                }),
            )?,
        };
        let chain = self.sign(&template, &plan, expiry_days(options)).await?;
        drop(plan);
        self.apply(id, Write::Store(chain.as_str().into())).await?;
        Ok((chain, true))
    }
}

/// The validity of a cert issued with `options`: its `expiry_days`, or the default.
fn expiry_days(options: Option<&IssuanceOptions>) -> u32 {
    options
        .and_then(|options| options.expiry_days)
        .unwrap_or(DEFAULT_EXPIRY_DAYS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Principal;
    use crate::store::memory::MemoryStore;

    fn service(policy: Policy) -> CertService {
        // keyd is never reached by these tests.
        let keyd = key_api::Client::from_uri("unix:///nonexistent/keyd.sock").unwrap();
        CertService::new(Arc::new(MemoryStore::default()), policy, keyd)
    }

    fn certificate_pem() -> String {
        let group =
            openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        let key = PKey::from_ec_key(openssl::ec::EcKey::generate(&group).unwrap()).unwrap();
        let mut builder = openssl::x509::X509::builder().unwrap();
        builder.set_pubkey(&key).unwrap();
        builder
            .set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        builder
            .sign(&key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        String::from_utf8(builder.build().to_pem().unwrap()).unwrap()
    }

    #[tokio::test]
    async fn writes_need_a_principal_reads_do_not() {
        let service = service(Policy {
            principals: vec![Principal {
                uid: 1000,
                certs: vec!["module/*".into()],
            }],
            ..Policy::default()
        });
        let pem = certificate_pem();
        let error = service.import(1001, "module/a", &pem).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "user 1001 is not authorized to modify the cert module/a"
        );
        let error = service.import(1000, "other", &pem).await.unwrap_err();
        assert!(matches!(error, CertError::Forbidden { .. }));
        service.import(1000, "module/a", &pem).await.unwrap();
        service.import(0, "other", &pem).await.unwrap();
        assert_eq!(service.get("module/a").await.unwrap(), pem);
        assert!(matches!(
            service.delete(1001, "module/a").await,
            Err(CertError::Forbidden { .. })
        ));
        service.delete(1000, "module/a").await.unwrap();
        service.delete(1000, "module/a").await.unwrap();
        assert!(matches!(
            service.get("module/a").await,
            Err(CertError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn preloaded_certs_are_read_only_and_lists_concatenate() {
        let folder = tempfile::tempdir().unwrap();
        let file_pem = certificate_pem();
        let path = folder.path().join("a.pem");
        std::fs::write(&path, &file_pem).unwrap();
        let mut preloaded = std::collections::BTreeMap::new();
        preloaded.insert("file".to_owned(), Preloaded::File(path));
        preloaded.insert(
            "missing-file".to_owned(),
            Preloaded::File(folder.path().join("missing.pem")),
        );
        preloaded.insert(
            "bundle".to_owned(),
            Preloaded::List(vec!["file".into(), "absent".into(), "dynamic".into()]),
        );
        preloaded.insert(
            "empty-bundle".to_owned(),
            Preloaded::List(vec!["absent".into(), "missing-file".into()]),
        );
        let service = service(Policy {
            preloaded,
            ..Policy::default()
        });
        let dynamic_pem = certificate_pem();
        service.import(0, "dynamic", &dynamic_pem).await.unwrap();

        assert_eq!(service.get("file").await.unwrap(), file_pem);
        assert_eq!(
            service.get("bundle").await.unwrap(),
            format!("{file_pem}{dynamic_pem}")
        );
        assert!(matches!(
            service.get("missing-file").await,
            Err(CertError::NotFound(_))
        ));
        assert!(matches!(
            service.get("empty-bundle").await,
            Err(CertError::NotFound(_))
        ));
        for id in ["file", "bundle", "missing-file"] {
            assert!(matches!(
                service.import(0, id, &file_pem).await,
                Err(CertError::Preloaded(_))
            ));
            assert!(matches!(
                service.delete(0, id).await,
                Err(CertError::Preloaded(_))
            ));
        }
        // Draft create returns an existing preloaded cert; a missing one cannot be created.
        assert_eq!(
            service.draft_create(0, "file").await.unwrap(),
            (file_pem.clone(), false)
        );
        assert!(matches!(
            service.draft_create(0, "missing-file").await,
            Err(CertError::Preloaded(_))
        ));
    }

    #[tokio::test]
    async fn imports_are_validated_and_ids_checked() {
        let service = service(Policy::default());
        for garbage in [
            "",
            "garbage",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            let error = service.import(0, "x", garbage).await.unwrap_err();
            assert!(error.to_string().starts_with("pem: "), "{error}");
        }
        assert!(matches!(
            service.get("x").await,
            Err(CertError::NotFound(_))
        ));
        for id in ["", "a\nb"] {
            assert!(matches!(
                service.get(id).await,
                Err(CertError::InvalidParameter { name: "certId", .. })
            ));
        }
    }

    #[tokio::test]
    async fn concurrent_writes_to_one_id_are_merged_and_the_last_wins() {
        let service = Arc::new(service(Policy::default()));
        let pems: Vec<String> = (0..8).map(|_| certificate_pem()).collect();
        let mut tasks = Vec::new();
        for pem in pems.clone() {
            let service = Arc::clone(&service);
            tasks.push(tokio::spawn(async move {
                service.import(0, "same", &pem).await.unwrap();
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let stored = service.get("same").await.unwrap();
        assert!(pems.contains(&stored));
        assert_eq!(
            service.store.load("same").unwrap().as_deref(),
            Some(stored.as_str())
        );
    }
}
