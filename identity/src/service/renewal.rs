//! Renewal of the DPS X.509 identity certificate (spec 6.6).

use std::sync::Arc;
use std::time::Duration;

use identity_api::KeyHandle;

use super::{Device, DeviceCredentials, DeviceState, IdentityService, Reconciliation};
use crate::cloud::{dps, tls, RequestAuth};
use crate::config::{DpsAttestation, Provisioning};
use crate::error::IdentityError;

impl IdentityService {
    /// Renews the DPS X.509 identity certificate when its `identity_auto_renew` policy says so
    /// (spec 6.6); failures are retried after the policy's `retry` period.
    pub(super) async fn renew_identity_cert_when_due(self: Arc<Self>) {
        const IDLE: Duration = Duration::from_secs(60);
        loop {
            let settings = self.settings();
            let Provisioning::Dps {
                attestation:
                    DpsAttestation::X509 {
                        cert_id,
                        key_id,
                        auto_renew: Some(auto_renew),
                        ..
                    },
                ..
            } = &settings.provisioning
            else {
                tokio::time::sleep(IDLE).await;
                continue;
            };
            let (Some(threshold), Some(retry)) = (
                crate::renewal::Policy::parse(&auto_renew.threshold),
                crate::renewal::Policy::parse(&auto_renew.retry),
            ) else {
                tokio::time::sleep(IDLE).await;
                continue;
            };
            let validity = match self.certd.get_cert(cert_id).await {
                Ok(pem) => crate::renewal::validity(&pem),
                Err(error) => Err(http_common::error::error_chain(&error)),
            };
            let (not_before, not_after) = match validity {
                Ok(validity) => validity,
                Err(reason) => {
                    log::warn!(
                        "cannot read identity certificate {cert_id:?} for renewal: {reason}"
                    );
                    tokio::time::sleep(IDLE).await;
                    continue;
                }
            };
            let now = i64::try_from(crate::util::unix_now()).unwrap_or(i64::MAX);
            let due = threshold.renew_at(not_before, not_after);
            if now < due {
                let wait = u64::try_from(due - now).unwrap_or(0).min(3600);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            log::info!("renewing identity certificate {cert_id:?}");
            match self
                .renew_identity_cert(cert_id, key_id, auto_renew.rotate_key)
                .await
            {
                Ok(()) => log::info!("identity certificate {cert_id:?} renewed"),
                Err(error) => {
                    let delay =
                        retry.retry_delay(not_before, not_after, crate::renewal::RETRY_FLOOR);
                    log::error!(
                        "renewing identity certificate {cert_id:?} failed, retrying in {} s: {}",
                        delay.as_secs(),
                        http_common::error::error_chain(&error)
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One renewal: key (new `<pk>-temp` when rotating), CSR with the old subject signed by
    /// keyd, certd issues `<cert>-temp`, DPS registration with the new credentials, then the new
    /// chain replaces `<cert>`, the temp key replaces `<pk>` and the temp cert is deleted (those
    /// local steps are retried: DPS already accepted the new credentials).
    async fn renew_identity_cert(
        self: &Arc<Self>,
        cert_id: &str,
        key_id: &str,
        rotate_key: bool,
    ) -> Result<(), IdentityError> {
        let _round = self.round_lock.lock().await;
        let settings = self.settings();
        let Provisioning::Dps {
            global_endpoint,
            scope_id,
            payload,
            attestation: DpsAttestation::X509 {
                registration_id, ..
            },
            ..
        } = &settings.provisioning
        else {
            return Ok(());
        };
        let temp_cert = format!("{cert_id}-temp");
        let temp_key = format!("{key_id}-temp");
        let old_pem = self
            .certd
            .get_cert(cert_id)
            .await
            .map_err(IdentityError::certd(format!(
                "loading identity certificate {cert_id:?}"
            )))?;
        let handle = if rotate_key {
            self.keyd
                .create_key_pair_if_not_exists(&temp_key, Some("rsa-2048:*"))
                .await
                .map_err(IdentityError::keyd(format!(
                    "creating key pair {temp_key:?}"
                )))?
        } else {
            self.keyd
                .load_key_pair(key_id)
                .await
                .map_err(IdentityError::keyd(format!("loading key pair {key_id:?}")))?
        };
        let subject = crate::renewal::subject_der(&old_pem).map_err(IdentityError::Credentials)?;
        let csr = self.keyd_signed_csr(&subject, &handle).await?;
        let new_chain = self
            .certd
            .create_cert(&temp_cert, &csr, None)
            .await
            .map_err(IdentityError::certd(format!(
                "issuing certificate {temp_cert:?}"
            )))?;
        let chain = tls::chain_from_pem(&new_chain).map_err(IdentityError::Credentials)?;
        let identity = tls::client_identity(chain, &self.fixed.keyd_uri, handle)
            .map_err(IdentityError::Credentials)?;
        let registration_id = match registration_id {
            Some(id) => id.clone(),
            None => tls::leaf_common_name(&new_chain).ok_or_else(|| {
                IdentityError::Credentials("the renewed certificate has no subject CN".to_owned())
            })?,
        };
        let authority = global_endpoint
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned();
        let assignment = dps::register(
            &self.cloud,
            dps::Registration {
                authority: &authority,
                scope_id,
                registration_id: &registration_id,
                payload: payload.as_ref(),
                auth: RequestAuth::X509(identity),
                tpm: None,
                csr: None,
            },
        )
        .await?;
        retry_local_steps("the renewed credentials", || {
            self.install_renewed(
                cert_id, key_id, &temp_cert, &temp_key, &new_chain, rotate_key,
            )
        })
        .await?;
        let credentials = DeviceCredentials::X509 {
            cert_id: cert_id.to_owned(),
            key_id: key_id.to_owned(),
        };
        self.adopt_renewed_assignment(&settings, assignment, credentials)
            .await
    }

    /// Renews the DPS-issued operational certificate (spec 9.6) when its `auto_renew` policy
    /// says so, by registering again with a new CSR; failures are retried after `retry`.
    pub(super) async fn renew_operational_cert_when_due(self: Arc<Self>) {
        const IDLE: Duration = Duration::from_secs(30);
        loop {
            let settings = self.settings();
            let Provisioning::Dps {
                operational_cert: Some(operational),
                ..
            } = &settings.provisioning
            else {
                tokio::time::sleep(IDLE).await;
                continue;
            };
            let (Some(threshold), Some(retry)) = (
                crate::renewal::Policy::parse(&operational.auto_renew.threshold),
                crate::renewal::Policy::parse(&operational.auto_renew.retry),
            ) else {
                tokio::time::sleep(IDLE).await;
                continue;
            };
            let cert_id = &operational.cert_id;
            // Until provisioning stored it, there is nothing to renew.
            let Ok(Ok((not_before, not_after))) = self
                .certd
                .get_cert(cert_id)
                .await
                .map(|pem| crate::renewal::validity(&pem))
            else {
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            };
            let now = i64::try_from(crate::util::unix_now()).unwrap_or(i64::MAX);
            let due = threshold.renew_at(not_before, not_after);
            if now < due {
                // Wake at the due time, or sooner to notice a configuration change.
                let wait = u64::try_from(due - now).unwrap_or(0).clamp(1, 60);
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            log::info!("renewing the DPS-issued operational certificate {cert_id:?}");
            match self.renew_operational_cert().await {
                Ok(()) => log::info!("operational certificate {cert_id:?} renewed"),
                Err(error) => {
                    let delay =
                        retry.retry_delay(not_before, not_after, crate::renewal::RETRY_FLOOR);
                    log::error!(
                        "renewing operational certificate {cert_id:?} failed, retrying in {} s: {}",
                        delay.as_secs(),
                        http_common::error::error_chain(&error)
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One renewal of the operational certificate: a registration with a CSR for a new key
    /// (`<pk>-temp` with `rotate_key`, else the current key); once DPS issued the new chain it
    /// replaces `<cert>` and the temp key replaces `<pk>` (retried: DPS already issued it).
    /// Until then the current certificate and key stay in use.
    async fn renew_operational_cert(self: &Arc<Self>) -> Result<(), IdentityError> {
        let _round = self.round_lock.lock().await;
        let settings = self.settings();
        let Provisioning::Dps {
            global_endpoint,
            scope_id,
            payload,
            attestation,
            operational_cert: Some(operational),
        } = &settings.provisioning
        else {
            return Ok(());
        };
        let rotate_key = operational.auto_renew.rotate_key;
        let temp_key = format!("{}-temp", operational.key_id);
        let key_id = if rotate_key {
            temp_key.as_str()
        } else {
            operational.key_id.as_str()
        };
        let assignment = self
            .register(
                global_endpoint,
                scope_id,
                payload.as_ref(),
                attestation,
                Some(super::provisioning::Operational {
                    cert: operational,
                    key_id,
                }),
            )
            .await?;
        retry_local_steps("the renewed operational certificate", || async {
            if rotate_key {
                match self
                    .keyd
                    .move_key_pair(&temp_key, &operational.key_id)
                    .await
                {
                    Ok(()) => {}
                    // Already moved by an earlier attempt.
                    Err(error) if error.is_not_found() => {}
                    Err(error) => {
                        return Err(IdentityError::keyd(format!(
                            "moving key pair {temp_key:?} to {:?}",
                            operational.key_id
                        ))(error))
                    }
                }
            }
            self.store_operational_cert(&operational.cert_id, &assignment)
                .await
        })
        .await?;
        let credentials = DeviceCredentials::X509 {
            cert_id: operational.cert_id.clone(),
            key_id: operational.key_id.clone(),
        };
        self.adopt_renewed_assignment(&settings, assignment, credentials)
            .await
    }

    /// The device after a renewal's DPS registration: stored as the backup, published, and
    /// its modules reconciled (cleared first when DPS moved it).
    async fn adopt_renewed_assignment(
        &self,
        settings: &super::Settings,
        assignment: dps::Assignment,
        credentials: DeviceCredentials,
    ) -> Result<(), IdentityError> {
        let device = Arc::new(Device {
            hub_name: assignment.assigned_hub.clone(),
            device_id: assignment.device_id,
            gateway_host: assignment.assigned_hub,
            local_gateway_hostname: None,
            credentials,
        });
        let previous = self.store.device_info();
        let same_place = previous
            .as_ref()
            .is_some_and(|previous| device.same_place(previous));
        if !same_place {
            self.store.clear_modules();
        }
        self.store.set_device_info(Some(&device.info()))?;
        self.set_reconciliation(Reconciliation::Running);
        self.device
            .send_replace(DeviceState::Ready(Arc::clone(&device)));
        self.reconcile_and_record(settings, &device, same_place, "the renewal")
            .await;
        Ok(())
    }

    async fn install_renewed(
        &self,
        cert_id: &str,
        key_id: &str,
        temp_cert: &str,
        temp_key: &str,
        new_chain: &str,
        rotate_key: bool,
    ) -> Result<(), IdentityError> {
        self.certd
            .import_cert(cert_id, new_chain)
            .await
            .map_err(IdentityError::certd(format!(
                "storing the renewed certificate as {cert_id:?}"
            )))?;
        if rotate_key {
            match self.keyd.move_key_pair(temp_key, key_id).await {
                Ok(()) => {}
                // Already moved by an earlier attempt.
                Err(error) if error.is_not_found() => {}
                Err(error) => {
                    return Err(IdentityError::keyd(format!(
                        "moving key pair {temp_key:?} to {key_id:?}"
                    ))(error))
                }
            }
        }
        self.certd
            .delete_cert(temp_cert)
            .await
            .map_err(IdentityError::certd(format!("deleting {temp_cert:?}")))
    }

    /// Makes sure the device identity cert `cert_id` exists: when certd has none (404), key pair
    /// `key_id` is made in keyd if it does not exist yet (RSA 2048 preferred, as the reference),
    /// and certd issues the cert from a CSR with `subject`, signed by keyd (the key never
    /// leaves keyd). An existing cert, or key, is never replaced here.
    pub(super) async fn ensure_identity_cert(
        &self,
        cert_id: &str,
        key_id: &str,
        subject: &[(String, String)],
    ) -> Result<(), IdentityError> {
        match self.certd.get_cert(cert_id).await {
            Ok(_) => return Ok(()),
            Err(error) if error.is_not_found() => {}
            Err(error) => {
                return Err(IdentityError::certd(format!(
                    "loading identity certificate {cert_id:?}"
                ))(error))
            }
        }
        log::info!("identity certificate {cert_id:?} does not exist; asking certd to issue it");
        let handle = self
            .keyd
            .create_key_pair_if_not_exists(key_id, Some("rsa-2048:*"))
            .await
            .map_err(IdentityError::keyd(format!("creating key pair {key_id:?}")))?;
        let subject =
            crate::renewal::subject_from_pairs(subject).map_err(IdentityError::Credentials)?;
        let csr = self.keyd_signed_csr(&subject, &handle).await?;
        self.certd
            .create_cert(cert_id, &csr, None)
            .await
            .map_err(IdentityError::certd(format!(
                "issuing identity certificate {cert_id:?}"
            )))?;
        Ok(())
    }

    /// A CSR for `subject` (DER) and the key pair behind `handle`, signed by keyd.
    pub(super) async fn keyd_signed_csr(
        &self,
        subject: &[u8],
        handle: &KeyHandle,
    ) -> Result<String, IdentityError> {
        use base64::Engine as _;
        let parameter = |name: &'static str| async move {
            self.keyd
                .get_key_pair_public_parameter(handle, name)
                .await
                .map_err(IdentityError::keyd(format!("reading the key's {name}")))
        };
        let decode = |text: String| {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| IdentityError::Credentials("keyd sent invalid base64".to_owned()))
        };
        let algorithm = parameter("algorithm").await?;
        let (public_key, kind) = match algorithm.as_str() {
            "ECDSA" => (
                crate::renewal::ec_public_key_der(
                    &decode(parameter("ec-curve-oid").await?)?,
                    &decode(parameter("ec-point").await?)?,
                ),
                crate::renewal::CsrSignature::EcdsaSha256,
            ),
            "RSA" => (
                crate::renewal::rsa_public_key_der(
                    &decode(parameter("rsa-modulus").await?)?,
                    &decode(parameter("rsa-exponent").await?)?,
                ),
                crate::renewal::CsrSignature::RsaSha256,
            ),
            other => {
                return Err(IdentityError::Credentials(format!(
                    "keyd reports an unknown key algorithm {other:?}"
                )))
            }
        };
        let public_key = public_key.map_err(IdentityError::Credentials)?;
        let unsigned = crate::renewal::unsigned_csr(subject, &public_key)
            .map_err(IdentityError::Credentials)?;
        let digest = crate::util::sha256(&unsigned.to_be_signed);
        let digest = digest.as_ref();
        let signature = match kind {
            crate::renewal::CsrSignature::EcdsaSha256 => {
                self.keyd
                    .sign(handle, key_api::SignMechanism::Ecdsa { digest })
                    .await
            }
            crate::renewal::CsrSignature::RsaSha256 => {
                const SHA256_DIGEST_INFO: &[u8] = &[
                    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04,
                    0x02, 0x01, 0x05, 0x00, 0x04, 0x20,
                ];
                let mut input = SHA256_DIGEST_INFO.to_vec();
                input.extend_from_slice(digest);
                self.keyd
                    .encrypt(handle, key_api::EncryptMechanism::RsaPkcs1, &input)
                    .await
            }
        }
        .map_err(IdentityError::keyd("signing the CSR"))?;
        crate::renewal::signed_csr(unsigned, kind, &signature).map_err(IdentityError::Credentials)
    }
}

/// Runs a renewal's local steps (certd, keyd) up to five times, 5 s apart: DPS already accepted
/// the new credentials, so giving up early would strand the device.
async fn retry_local_steps<F, Fut>(what: &str, mut steps: F) -> Result<(), IdentityError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), IdentityError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match steps().await {
            Ok(()) => return Ok(()),
            Err(error) if attempt < 5 => {
                log::warn!(
                    "installing {what} failed (attempt {attempt}), retrying: {}",
                    http_common::error::error_chain(&error)
                );
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Err(error) => return Err(error),
        }
    }
}
