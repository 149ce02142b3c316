//! Provisioning rounds (startup, reprovision, reload, Hub rejection), DPS registration and
//! the device's Hub credentials.

use std::sync::Arc;

use tokio::sync::watch;

use super::{
    lock, Device, DeviceCredentials, DeviceState, IdentityService, Reconciliation, RoundResult,
    Settings, REJECTION_REPROVISION_INTERVAL,
};
use crate::cloud::hub::HubTarget;
use crate::cloud::{dps, tls, CloudError, RequestAuth};
use crate::config::{DpsAttestation, ManualAuth, OperationalCert, Provisioning};
use crate::error::IdentityError;
use crate::state::DeviceInfo;

impl IdentityService {
    /// Reprovisions (DPS only) when IoT Hub rejects the device at run time — it may have been
    /// moved to another hub — at most once per [`REJECTION_REPROVISION_INTERVAL`].
    pub(super) async fn reprovision_on_hub_rejection(self: Arc<Self>) {
        loop {
            self.hub_rejected_device.notified().await;
            if !matches!(self.settings().provisioning, Provisioning::Dps { .. }) {
                continue;
            }
            log::warn!("IoT Hub rejected the device; registering with DPS again");
            if let Err(error) = self.join_reprovision().await {
                log::error!(
                    "reprovisioning after the Hub rejection failed: {}",
                    http_common::error::error_chain(&error)
                );
            }
            tokio::time::sleep(REJECTION_REPROVISION_INTERVAL).await;
        }
    }

    /// One provisioning round (startup, reprovision, reload), then reconciliation. A Hub
    /// rejection of a DPS device during reconciliation triggers one DPS registration.
    /// Module reads wait for the round's reconciliation (see [`IdentityService::reconciled`]);
    /// a round that fails but keeps the current device restores the previous outcome.
    pub(super) async fn provision_round(self: &Arc<Self>, force: bool) -> RoundResult {
        // Dropped last: the heap a round frees (TLS sessions, DPS and hub bodies) goes back to
        // the kernel however the round ends.
        let _release = ReleaseHeapAfter;
        let _round = self.round_lock.lock().await;
        let before = self.reconciliation_state();
        self.set_reconciliation(Reconciliation::Running);
        let mut force = force;
        let mut retried = false;
        loop {
            let settings = self.settings();
            let previous = self.store.device_info();
            let device = match self.provision(&settings, previous.as_ref(), force).await {
                Ok(Some(device)) => Arc::new(device),
                Ok(None) => {
                    log::info!("provisioning source is \"none\"; no cloud identity");
                    if let Err(error) = self.store.set_device_info(None) {
                        log::warn!("{}", http_common::error::error_chain(&error));
                    }
                    self.device.send_replace(DeviceState::NotProvisioned);
                    self.set_reconciliation(Reconciliation::Done);
                    return Ok(());
                }
                Err(error) => {
                    let error = Arc::new(error);
                    let keep_current = error.is_cloud_network()
                        && matches!(self.device_state(), DeviceState::Ready(_));
                    if !keep_current {
                        self.device
                            .send_replace(DeviceState::Failed(Arc::clone(&error)));
                    }
                    // The current device keeps its last outcome, unless this round is the
                    // first to reconcile it (a backup device Hub rejected at startup).
                    self.set_reconciliation(if keep_current && before != Reconciliation::Running {
                        before
                    } else {
                        Reconciliation::Failed(format!(
                            "device provisioning failed: {}",
                            http_common::error::error_chain(error.as_ref())
                        ))
                    });
                    return Err(error);
                }
            };
            let same_place = previous
                .as_ref()
                .is_some_and(|previous| device.same_place(previous));
            if !same_place {
                self.store.clear_modules();
            }
            let saved = self
                .store
                .set_device_info(Some(&device.info()))
                .and_then(|()| {
                    self.store
                        .set_provisioning_digest(&settings.provisioning.digest())
                });
            if let Err(error) = saved {
                log::warn!(
                    "could not save the provisioning backup: {}",
                    http_common::error::error_chain(&error)
                );
            }
            log::info!(
                "device {:?} in hub {} is ready",
                device.device_id,
                device.hub_name
            );
            self.device
                .send_replace(DeviceState::Ready(Arc::clone(&device)));
            match self.reconcile(&settings, &device, same_place).await {
                Ok(()) => {
                    self.set_reconciliation(Reconciliation::Done);
                    return Ok(());
                }
                Err(error)
                    if !retried
                        && matches!(settings.provisioning, Provisioning::Dps { .. })
                        && error.cloud().is_some_and(CloudError::is_device_rejected) =>
                {
                    log::warn!("IoT Hub rejected the device ({error}); registering with DPS again");
                    retried = true;
                    force = true;
                }
                Err(error) => {
                    let reason = http_common::error::error_chain(&error);
                    log::warn!(
                        "module reconciliation failed (cached module data stays in use): {reason}"
                    );
                    self.set_reconciliation(Reconciliation::Failed(format!(
                        "module reconciliation failed: {reason}"
                    )));
                    return Ok(());
                }
            }
        }
    }

    /// Reconciles outside a provisioning round (principal change, renewal) and records the
    /// outcome for module reads; failures are logged (cached module data stays in use).
    pub(super) async fn reconcile_and_record(
        &self,
        settings: &Settings,
        device: &Device,
        same_place: bool,
        after: &str,
    ) {
        match self.reconcile(settings, device, same_place).await {
            Ok(()) => self.set_reconciliation(Reconciliation::Done),
            Err(error) => {
                let reason = http_common::error::error_chain(&error);
                log::warn!("module reconciliation after {after} failed: {reason}");
                self.set_reconciliation(Reconciliation::Failed(format!(
                    "module reconciliation failed: {reason}"
                )));
            }
        }
    }

    /// Works out the device: from config (manual), from the backup or DPS (dps).
    async fn provision(
        &self,
        settings: &Settings,
        previous: Option<&DeviceInfo>,
        force: bool,
    ) -> Result<Option<Device>, IdentityError> {
        match &settings.provisioning {
            Provisioning::None => Ok(None),
            Provisioning::Manual {
                iothub_hostname,
                device_id,
                local_gateway_hostname,
                authentication,
            } => {
                let credentials = match authentication {
                    ManualAuth::Sas { key_id, import } => {
                        if let Some(bytes) = import {
                            self.keyd.import_key(key_id, "sign", bytes).await.map_err(
                                IdentityError::keyd(format!(
                                    "importing the connection string's key as {key_id:?}"
                                )),
                            )?;
                        }
                        DeviceCredentials::Sas {
                            key_id: key_id.clone(),
                        }
                    }
                    ManualAuth::X509 {
                        cert_id,
                        key_id,
                        csr_subject,
                    } => {
                        self.ensure_identity_cert(cert_id, key_id, csr_subject)
                            .await?;
                        DeviceCredentials::X509 {
                            cert_id: cert_id.clone(),
                            key_id: key_id.clone(),
                        }
                    }
                };
                Ok(Some(Device {
                    hub_name: iothub_hostname.clone(),
                    device_id: device_id.clone(),
                    gateway_host: local_gateway_hostname
                        .clone()
                        .unwrap_or_else(|| iothub_hostname.clone()),
                    local_gateway_hostname: local_gateway_hostname.clone(),
                    credentials,
                }))
            }
            Provisioning::Dps {
                global_endpoint,
                scope_id,
                payload,
                attestation,
                operational_cert,
            } => {
                let credentials = match attestation {
                    DpsAttestation::SymmetricKey { key_id, .. } => DeviceCredentials::Sas {
                        key_id: key_id.clone(),
                    },
                    DpsAttestation::Tpm { .. } => DeviceCredentials::Tpm,
                    DpsAttestation::X509 {
                        cert_id, key_id, ..
                    } => DeviceCredentials::X509 {
                        cert_id: cert_id.clone(),
                        key_id: key_id.clone(),
                    },
                };
                // With a DPS-issued certificate, that is what Hub sees.
                let credentials = match operational_cert {
                    Some(operational) => DeviceCredentials::X509 {
                        cert_id: operational.cert_id.clone(),
                        key_id: operational.key_id.clone(),
                    },
                    None => credentials,
                };
                // The backup is only usable with its operational certificate in certd.
                let operational_stored = match operational_cert {
                    Some(operational) => self.certd.get_cert(&operational.cert_id).await.is_ok(),
                    None => true,
                };
                let from_backup = |info: &DeviceInfo| Device {
                    hub_name: info.hub_name.clone(),
                    device_id: info.device_id.clone(),
                    gateway_host: info.hub_name.clone(),
                    local_gateway_hostname: None,
                    credentials: credentials.clone(),
                };
                let stored_digest = self.store.provisioning_digest();
                let digest_matches =
                    stored_digest.as_deref() == Some(settings.provisioning.digest().as_str());
                if let (false, true, Some(previous), true) =
                    (force, digest_matches, previous, operational_stored)
                {
                    log::info!(
                        "using the provisioning backup (device {:?} in hub {})",
                        previous.device_id,
                        previous.hub_name
                    );
                    return Ok(Some(from_backup(previous)));
                }
                let registered = self
                    .register(
                        global_endpoint,
                        scope_id,
                        payload.as_ref(),
                        attestation,
                        operational_cert.as_ref().map(|operational| Operational {
                            cert: operational,
                            key_id: &operational.key_id,
                        }),
                    )
                    .await;
                let registered = match (registered, operational_cert) {
                    (Ok(assignment), Some(operational)) => self
                        .store_operational_cert(&operational.cert_id, &assignment)
                        .await
                        .map(|()| assignment),
                    (result, _) => result,
                };
                match registered {
                    Ok(assignment) => Ok(Some(Device {
                        hub_name: assignment.assigned_hub.clone(),
                        device_id: assignment.device_id,
                        gateway_host: assignment.assigned_hub,
                        local_gateway_hostname: None,
                        credentials,
                    })),
                    Err(error) => {
                        // A backup from the same settings (or from before digests existed)
                        // keeps the device working while DPS is unreachable.
                        let backup_usable = digest_matches || stored_digest.is_none();
                        match previous {
                            Some(previous) if error.is_cloud_network() && backup_usable => {
                                log::warn!(
                                    "DPS is unreachable ({error}); serving the provisioning backup (device {:?} in hub {})",
                                    previous.device_id,
                                    previous.hub_name
                                );
                                Ok(Some(from_backup(previous)))
                            }
                            _ => Err(error),
                        }
                    }
                }
            }
        }
    }

    /// Stores the chain DPS issued as `cert_id` in certd.
    pub(super) async fn store_operational_cert(
        &self,
        cert_id: &str,
        assignment: &dps::Assignment,
    ) -> Result<(), IdentityError> {
        let chain = assignment.issued_chain.as_deref().ok_or_else(|| {
            IdentityError::Cloud(CloudError::Protocol {
                service: "DPS",
                reason: "the registration was assigned without the operational certificate \
                         the CSR asked for"
                    .to_owned(),
            })
        })?;
        self.certd
            .import_cert(cert_id, chain)
            .await
            .map_err(IdentityError::certd(format!(
                "storing the DPS-issued certificate as {cert_id:?}"
            )))?;
        Ok(())
    }

    /// Registers with DPS; with `operational`, the registration carries a CSR (CN = the
    /// registration ID) for key pair `operational.key_id`, created in keyd if absent, and the
    /// assignment carries the issued chain.
    pub(super) async fn register(
        &self,
        global_endpoint: &str,
        scope_id: &str,
        payload: Option<&serde_json::Value>,
        attestation: &DpsAttestation,
        operational: Option<Operational<'_>>,
    ) -> Result<dps::Assignment, IdentityError> {
        let authority = global_endpoint
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned();
        let mut tpm = None;
        let (auth, registration_id) = match attestation {
            DpsAttestation::SymmetricKey {
                registration_id,
                key_id,
            } => {
                let handle = self
                    .keyd
                    .load_key(key_id)
                    .await
                    .map_err(IdentityError::keyd(format!("loading DPS key {key_id:?}")))?;
                (
                    RequestAuth::Sas {
                        resource: format!("{scope_id}/registrations/{registration_id}"),
                        handle,
                        key_name: Some("registration"),
                    },
                    registration_id.clone(),
                )
            }
            DpsAttestation::X509 {
                registration_id,
                cert_id,
                key_id,
                csr_subject,
                ..
            } => {
                if let Some(subject) = csr_subject {
                    self.ensure_identity_cert(cert_id, key_id, subject).await?;
                }
                let (identity, pem) = self.x509_identity(cert_id, key_id).await?;
                let registration_id = match registration_id {
                    Some(id) => id.clone(),
                    None => tls::leaf_common_name(&pem).ok_or_else(|| {
                        IdentityError::Credentials(format!(
                            "identity certificate {cert_id:?} has no subject CN to use as the registration ID"
                        ))
                    })?,
                };
                (RequestAuth::X509(identity), registration_id)
            }
            DpsAttestation::Tpm { registration_id } => {
                let keys = self
                    .fixed
                    .tpm
                    .get_tpm_keys()
                    .await
                    .map_err(IdentityError::tpm("reading the TPM's endorsement key"))?;
                tpm = Some(dps::TpmAttestation {
                    keys,
                    client: self.fixed.tpm.clone(),
                });
                (
                    RequestAuth::TpmSas {
                        resource: format!("{scope_id}/registrations/{registration_id}"),
                        key_name: Some("registration"),
                        tpm: self.fixed.tpm.clone(),
                    },
                    registration_id.clone(),
                )
            }
        };
        let csr = match operational {
            Some(operational) => {
                let handle = self
                    .keyd
                    .create_key_pair_if_not_exists(operational.key_id, Some("ec-p256:rsa-2048:*"))
                    .await
                    .map_err(IdentityError::keyd(format!(
                        "creating key pair {:?} for the operational certificate",
                        operational.key_id
                    )))?;
                let subject = crate::renewal::subject_from_pairs(&[(
                    "CN".to_owned(),
                    registration_id.clone(),
                )])
                .map_err(IdentityError::Credentials)?;
                log::info!(
                    "asking DPS for operational certificate {:?}",
                    operational.cert.cert_id
                );
                Some(self.keyd_signed_csr(&subject, &handle).await?)
            }
            None => None,
        };
        dps::register(
            &self.cloud,
            dps::Registration {
                authority: &authority,
                scope_id,
                registration_id: &registration_id,
                payload,
                auth,
                tpm: tpm.as_ref(),
                csr: csr.as_deref(),
            },
        )
        .await
    }

    /// The TLS client identity for cert `cert_id` and key pair `key_id`, and the cert PEM.
    async fn x509_identity(
        &self,
        cert_id: &str,
        key_id: &str,
    ) -> Result<(Arc<rustls::sign::CertifiedKey>, String), IdentityError> {
        let pem = self
            .certd
            .get_cert(cert_id)
            .await
            .map_err(IdentityError::certd(format!(
                "loading identity certificate {cert_id:?}"
            )))?;
        let handle = self
            .keyd
            .load_key_pair(key_id)
            .await
            .map_err(IdentityError::keyd(format!(
                "loading identity key pair {key_id:?}"
            )))?;
        let chain = tls::chain_from_pem(&pem).map_err(IdentityError::Credentials)?;
        let identity = tls::client_identity(chain, &self.fixed.keyd_uri, handle)
            .map_err(IdentityError::Credentials)?;
        Ok((identity, pem))
    }

    /// How to reach the device's hub, authenticated as the device.
    pub(super) async fn hub_target(&self, device: &Device) -> Result<HubTarget, IdentityError> {
        let auth = match &device.credentials {
            DeviceCredentials::Sas { key_id } => RequestAuth::Sas {
                resource: format!("{}/devices/{}", device.hub_name, device.device_id),
                handle: self
                    .keyd
                    .load_key(key_id)
                    .await
                    .map_err(IdentityError::keyd(format!(
                        "loading device key {key_id:?}"
                    )))?,
                key_name: None,
            },
            DeviceCredentials::X509 { cert_id, key_id } => {
                RequestAuth::X509(self.x509_identity(cert_id, key_id).await?.0)
            }
            DeviceCredentials::Tpm => RequestAuth::TpmSas {
                resource: format!("{}/devices/{}", device.hub_name, device.device_id),
                key_name: None,
                tpm: self.fixed.tpm.clone(),
            },
        };
        Ok(HubTarget {
            gateway_host: device.gateway_host.clone(),
            device_id: device.device_id.clone(),
            auth,
        })
    }

    /// Reprovisions (spec 6.2) and waits; concurrent calls join the round in flight.
    pub async fn reprovision(self: &Arc<Self>, uid: u32) -> Result<(), IdentityError> {
        self.require_admin(uid)?;
        self.join_reprovision().await
    }

    /// Runs a reprovisioning round, or joins the one in flight, and waits for it.
    async fn join_reprovision(self: &Arc<Self>) -> Result<(), IdentityError> {
        let mut receiver = {
            let mut slot = lock(&self.reprovision_in_flight);
            match slot.as_ref() {
                Some(receiver) => receiver.clone(),
                None => {
                    let (sender, receiver) = watch::channel(None);
                    *slot = Some(receiver.clone());
                    let service = Arc::clone(self);
                    tokio::spawn(async move {
                        log::info!("reprovisioning");
                        let result = service.provision_round(true).await;
                        lock(&service.reprovision_in_flight).take();
                        let _ = sender.send(Some(result));
                    });
                    receiver
                }
            }
        };
        let outcome = receiver
            .wait_for(Option::is_some)
            .await
            .map(|result| result.clone())
            .map_err(|_| IdentityError::ProvisioningInProgress)?;
        match outcome {
            Some(Ok(())) => Ok(()),
            Some(Err(error)) => Err(IdentityError::Provisioning(error)),
            None => Err(IdentityError::ProvisioningInProgress),
        }
    }

    /// Applies reloaded settings: provisioning changes run a provisioning round, principal
    /// changes a reconciliation.
    pub async fn reload(self: &Arc<Self>, settings: Settings) {
        let previous = self.settings();
        if *previous == settings {
            return;
        }
        let provisioning_changed = previous.provisioning != settings.provisioning;
        *self
            .settings
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(settings);
        if provisioning_changed {
            log::info!("provisioning settings changed; provisioning again");
            if let Err(error) = self.provision_round(false).await {
                log::error!(
                    "provisioning after the configuration change failed: {}",
                    http_common::error::error_chain(error.as_ref())
                );
            }
            return;
        }
        let _round = self.round_lock.lock().await;
        if let DeviceState::Ready(device) = self.device_state() {
            let settings = self.settings();
            self.set_reconciliation(Reconciliation::Running);
            self.reconcile_and_record(&settings, &device, true, "the configuration change")
                .await;
        }
    }
}

/// Returns freed heap memory to the kernel when dropped (http_common::memory).
struct ReleaseHeapAfter;

impl Drop for ReleaseHeapAfter {
    fn drop(&mut self) {
        http_common::memory::release_free_heap();
    }
}

/// The operational certificate a registration asks DPS for, with the key pair its CSR is made
/// for (`pk`, or `<pk>-temp` when a renewal rotates the key).
#[derive(Clone, Copy, Debug)]
pub(super) struct Operational<'a> {
    /// The configuration.
    pub cert: &'a OperationalCert,
    /// The key pair the CSR is for.
    pub key_id: &'a str,
}
