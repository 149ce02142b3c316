//! EST issuance in the service layer: enrollment of `method = "est"` cert IDs, the TLS identity
//! (loaded from the store, bootstrapped when missing), and the background auto-renewal of EST
//! identity certificates. The protocol itself is in [`crate::est`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use der::Decode as _;
use x509_cert::name::Name;

use super::{blocking, CertService, Write};
use crate::config::{AutoRenew, CertWithKey, EstTarget, Policy};
use crate::error::CertError;
use crate::est::{self, Credentials, EstClient, Operation};
use crate::issuance::{self, Csr};
use crate::keys::SigningKey;
use crate::pem;

/// keyd algorithms for EST identity keys certd creates (bootstrap, key rotation).
const IDENTITY_KEY_ALGORITHMS: &str = "ec-p256:rsa-4096:*";
/// Shortest pause between two renewal attempts of one identity.
const MIN_RETRY: Duration = Duration::from_secs(5);
/// Longest sleep of the renewal task (so configuration changes are picked up).
const RENEWAL_TICK: Duration = Duration::from_secs(30);

fn now_seconds() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The DER certificates of a PEM chain.
fn chain_ders(pem_text: &str) -> Result<Vec<Vec<u8>>, String> {
    pem::certificates(pem_text)
}

/// `(notBefore, notAfter, subject DER)` of the first certificate of a chain.
fn leaf_facts(pem_text: &str) -> Result<(i64, i64, Vec<u8>), String> {
    let certificate = openssl::x509::X509::from_pem(pem_text.as_bytes())
        .map_err(|_| "the certificate is not PEM".to_owned())?;
    let epoch = openssl::asn1::Asn1Time::from_unix(0).map_err(|error| error.to_string())?;
    let seconds = |time: &openssl::asn1::Asn1TimeRef| -> Result<i64, String> {
        let difference = epoch.diff(time).map_err(|error| error.to_string())?;
        Ok(i64::from(difference.days) * 86_400 + i64::from(difference.secs))
    };
    let subject = certificate
        .subject_name()
        .to_der()
        .map_err(|error| error.to_string())?;
    Ok((
        seconds(certificate.not_before())?,
        seconds(certificate.not_after())?,
        subject,
    ))
}

/// An error with its sources, for the log.
fn describe(error: &CertError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn ders_to_pem(ders: &[Vec<u8>]) -> String {
    let mut chain = String::new();
    for der in ders {
        pem::append(&mut chain, &pem::encode("CERTIFICATE", der));
    }
    chain
}

/// One EST identity to keep renewed, with where and how.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RenewalJob {
    identity: CertWithKey,
    url: String,
    basic: Option<(String, String)>,
    bootstrap: Option<CertWithKey>,
}

/// The EST identities of `policy`, each once (the first EST cert naming it gives the URL).
fn renewal_jobs(policy: &Policy) -> Vec<RenewalJob> {
    let mut jobs: Vec<RenewalJob> = Vec::new();
    for target in policy
        .issuance
        .values()
        .filter_map(|options| options.est.as_ref())
    {
        let Some(identity) = &target.auth.identity else {
            continue;
        };
        if jobs.iter().any(|job| job.identity == *identity) {
            continue;
        }
        jobs.push(RenewalJob {
            identity: identity.clone(),
            url: target.url.clone(),
            basic: target.auth.basic.clone(),
            bootstrap: target.auth.bootstrap.clone(),
        });
    }
    jobs
}

impl CertService {
    /// An EST client trusting the system roots plus `[cert_issuance.est] trusted_certs`.
    async fn est_client(&self, policy: &Policy) -> Result<EstClient, CertError> {
        let mut extra = Vec::new();
        for id in policy
            .est
            .iter()
            .flat_map(|settings| settings.trusted_certs.iter())
        {
            match self.load(policy, id).await? {
                Some(chain) => match chain_ders(&chain) {
                    Ok(ders) => extra.extend(ders),
                    Err(reason) => log::warn!("trusted cert {id:?} is not usable: {reason}"),
                },
                None => log::warn!("trusted cert {id:?} for EST does not exist"),
            }
        }
        blocking(move || EstClient::new(est::roots(&extra))).await
    }

    /// The TLS client identity of cert `cert` with keyd key pair `pk`; `None` when the cert
    /// does not exist.
    async fn tls_identity(
        &self,
        policy: &Policy,
        identity: &CertWithKey,
    ) -> Result<Option<Arc<rustls::sign::CertifiedKey>>, CertError> {
        let Some(chain) = self.load(policy, &identity.cert).await? else {
            return Ok(None);
        };
        let not_usable = |reason: String| CertError::EstNotReady {
            id: identity.cert.clone(),
            reason,
        };
        let ders = chain_ders(&chain).map_err(|reason| not_usable(format!("the cert {reason}")))?;
        let handle = self.keys.handle_for(&identity.pk).await?;
        let chain = ders
            .into_iter()
            .map(rustls::pki_types::CertificateDer::from)
            .collect();
        key_api::rustls::certified_key(chain, &self.keyd_uri, handle)
            .map(Some)
            .map_err(|error| not_usable(error.to_string()))
    }

    /// A CSR for `subject` asking for clientAuth, for keyd key pair `pk`, signed by keyd.
    /// Returns its DER and the key's SPKI DER.
    async fn keyd_csr(&self, pk: &str, subject: Name) -> Result<(Vec<u8>, Vec<u8>), CertError> {
        let key = self.keys.public_key(SigningKey::Certd(pk), false).await?;
        let public_key = key.to_pkey()?.ok_or_else(|| {
            CertError::BadRequest(format!("key pair {pk:?} in keyd has an unsupported curve"))
        })?;
        let spki = issuance::spki_of(&public_key)?;
        let spki_der = public_key.public_key_to_der()?;
        let (info, info_der) = est::client_auth_request(subject, spki)?;
        let algorithm = key.signature_algorithm();
        let signature = self
            .keys
            .sign(SigningKey::Certd(pk), algorithm, &info_der)
            .await?;
        Ok((est::signed_request(info, algorithm, &signature)?, spki_der))
    }

    /// The credentials for `target`: Basic as configured, and the TLS identity, which is
    /// enrolled with the bootstrap identity first when it does not exist.
    async fn est_credentials(
        &self,
        policy: &Policy,
        client: &EstClient,
        id: &str,
        target: &EstTarget,
        subject: &Name,
    ) -> Result<Credentials, CertError> {
        let mut credentials = Credentials {
            basic: target.auth.basic.clone(),
            tls: None,
        };
        let Some(identity) = &target.auth.identity else {
            return Ok(credentials);
        };
        credentials.tls = match self.tls_identity(policy, identity).await? {
            Some(tls) => Some(tls),
            None => match &target.auth.bootstrap {
                Some(bootstrap) => {
                    self.bootstrap_identity(policy, client, target, identity, bootstrap, subject)
                        .await?;
                    self.tls_identity(policy, identity).await?
                }
                None if target.auth.basic.is_some() => None,
                None => {
                    return Err(CertError::EstNotReady {
                        id: id.to_owned(),
                        reason: format!(
                            "the EST identity cert {:?} does not exist and no bootstrap \
                             identity or username/password is configured",
                            identity.cert
                        ),
                    })
                }
            },
        };
        Ok(credentials)
    }

    /// Creates the identity key pair in keyd and enrolls the identity cert with the bootstrap
    /// cert as TLS client certificate.
    async fn bootstrap_identity(
        &self,
        policy: &Policy,
        client: &EstClient,
        target: &EstTarget,
        identity: &CertWithKey,
        bootstrap: &CertWithKey,
        subject: &Name,
    ) -> Result<(), CertError> {
        let slot = self.slots.get(&identity.cert);
        let _guard = slot.lock.lock().await;
        if self.load(policy, &identity.cert).await?.is_some() {
            return Ok(());
        }
        let tls =
            self.tls_identity(policy, bootstrap)
                .await?
                .ok_or_else(|| CertError::EstNotReady {
                    id: identity.cert.clone(),
                    reason: format!(
                        "the bootstrap identity cert {:?} does not exist",
                        bootstrap.cert
                    ),
                })?;
        self.keys
            .create_key_pair(&identity.pk, IDENTITY_KEY_ALGORITHMS)
            .await?;
        let (csr, spki) = self.keyd_csr(&identity.pk, subject.clone()).await?;
        let credentials = Credentials {
            basic: target.auth.basic.clone(),
            tls: Some(tls),
        };
        let issued = client
            .enroll(&target.url, Operation::Enroll, &csr, &credentials)
            .await?;
        let chain = ders_to_pem(&est::leaf_first(issued, &spki));
        self.apply(&identity.cert, Write::Store(chain.as_str().into()))
            .await?;
        log::info!(
            "enrolled the EST identity {:?} with the bootstrap identity {:?}",
            identity.cert,
            bootstrap.cert
        );
        Ok(())
    }

    /// `POST /certificates` for a `method = "est"` cert: enrolls the caller's CSR and stores
    /// the issued certificate followed by the EST CA certificates.
    pub(super) async fn est_enroll(
        &self,
        policy: &Policy,
        id: &str,
        target: &EstTarget,
        csr: &Csr,
    ) -> Result<String, CertError> {
        let client = self.est_client(policy).await?;
        let credentials = self
            .est_credentials(policy, &client, id, target, &csr.subject)
            .await?;
        let issued = client
            .enroll(&target.url, Operation::Enroll, &csr.der, &credentials)
            .await?;
        let spki = csr.public_key.public_key_to_der()?;
        let mut ders = est::leaf_first(issued, &spki);
        for der in client.ca_certs(&target.url, &credentials).await? {
            if !ders.contains(&der) {
                ders.push(der);
            }
        }
        let chain = ders_to_pem(&ders);
        self.write(id, Write::Store(chain.as_str().into())).await?;
        log::info!("enrolled cert {id:?} at EST server {}", target.url);
        Ok(chain)
    }

    /// Renews one EST identity: a new CSR (for `<pk>-temp` with `rotate_key`, else for `pk`)
    /// with the current cert's subject, `simplereenroll` authenticated by the current cert (or
    /// `simpleenroll` with the bootstrap cert when the current one has expired), then the
    /// temp key is moved over `pk` and the new cert stored. Until then the old cert and key stay.
    async fn renew_identity(
        &self,
        policy: &Policy,
        job: &RenewalJob,
        rotate_key: bool,
    ) -> Result<(), CertError> {
        let identity = &job.identity;
        let current = self
            .load(policy, &identity.cert)
            .await?
            .ok_or_else(|| CertError::NotFound(identity.cert.clone()))?;
        let (_, not_after, subject_der) =
            leaf_facts(&current).map_err(|reason| CertError::EstNotReady {
                id: identity.cert.clone(),
                reason,
            })?;
        let subject =
            Name::from_der(&subject_der).map_err(|error| CertError::Encoding(error.to_string()))?;
        let client = self.est_client(policy).await?;
        let expired = now_seconds() >= not_after;
        let (operation, tls) = match (&job.bootstrap, expired) {
            (Some(bootstrap), true) => (
                Operation::Enroll,
                self.tls_identity(policy, bootstrap).await?,
            ),
            _ => (
                Operation::Reenroll,
                self.tls_identity(policy, identity).await?,
            ),
        };
        let credentials = Credentials {
            basic: job.basic.clone(),
            tls,
        };
        let key_id = if rotate_key {
            let temp = format!("{}-temp", identity.pk);
            self.keys
                .create_key_pair(&temp, IDENTITY_KEY_ALGORITHMS)
                .await?;
            temp
        } else {
            identity.pk.clone()
        };
        let (csr, spki) = self.keyd_csr(&key_id, subject).await?;
        let issued = client
            .enroll(&job.url, operation, &csr, &credentials)
            .await?;
        let chain = ders_to_pem(&est::leaf_first(issued, &spki));
        if rotate_key {
            self.keys.move_key_pair(&key_id, &identity.pk).await?;
        }
        self.write(&identity.cert, Write::Store(chain.as_str().into()))
            .await?;
        Ok(())
    }

    /// Keeps the EST identity certs renewed per `[cert_issuance.est.identity_auto_renew]`;
    /// runs for the daemon's lifetime (configuration changes apply on the next round).
    pub async fn run_est_renewal(self: Arc<Self>) {
        // Per identity cert ID: when the last failure allows the next attempt.
        let mut retry_at: HashMap<String, i64> = HashMap::new();
        loop {
            let policy = self.policy();
            let mut next = now_seconds() + RENEWAL_TICK.as_secs() as i64;
            if let Some(settings) = &policy.est {
                let renew: AutoRenew = settings.auto_renew;
                for job in renewal_jobs(&policy) {
                    let due = match self.renewal_due(&policy, &job, renew).await {
                        Some(due) => due,
                        None => continue,
                    };
                    let (not_before, not_after, due) = due;
                    let now = now_seconds();
                    let allowed = retry_at.get(&job.identity.cert).copied().unwrap_or(0);
                    let when = due.max(allowed);
                    if now < when {
                        next = next.min(when);
                        continue;
                    }
                    match self.renew_identity(&policy, &job, renew.rotate_key).await {
                        Ok(()) => {
                            retry_at.remove(&job.identity.cert);
                            log::info!("renewed the EST identity cert {:?}", job.identity.cert);
                            next = now_seconds();
                        }
                        Err(error) => {
                            let delay = renew.retry.retry_delay(not_before, not_after, MIN_RETRY);
                            let again = now_seconds() + delay.as_secs() as i64;
                            retry_at.insert(job.identity.cert.clone(), again);
                            next = next.min(again);
                            log::warn!(
                                "renewing the EST identity cert {:?} failed: {}; retrying in {} s",
                                job.identity.cert,
                                describe(&error),
                                delay.as_secs()
                            );
                        }
                    }
                }
            }
            let pause = (next - now_seconds()).clamp(1, RENEWAL_TICK.as_secs() as i64);
            tokio::time::sleep(Duration::from_secs(pause as u64)).await;
        }
    }

    /// `(notBefore, notAfter, due)` of an identity cert; `None` when it does not exist (it is
    /// enrolled on first use) or cannot be read.
    async fn renewal_due(
        &self,
        policy: &Policy,
        job: &RenewalJob,
        renew: AutoRenew,
    ) -> Option<(i64, i64, i64)> {
        let pem_text = match self.load(policy, &job.identity.cert).await {
            Ok(Some(pem_text)) => pem_text,
            Ok(None) => return None,
            Err(error) => {
                log::warn!(
                    "cannot read the EST identity cert {:?}: {error}",
                    job.identity.cert
                );
                return None;
            }
        };
        match leaf_facts(&pem_text) {
            Ok((not_before, not_after, _)) => Some((
                not_before,
                not_after,
                renew.threshold.renew_at(not_before, not_after),
            )),
            Err(reason) => {
                log::warn!(
                    "the EST identity cert {:?} is not usable: {reason}",
                    job.identity.cert
                );
                None
            }
        }
    }
}
