//! The identity service: who the caller is, the device's provisioning state, module identities
//! and reconciliation. No HTTP types here; handlers translate.
//!
//! Provisioning runs in the background ([`IdentityService::start`]); requests that need the
//! device wait for it at most [`DEVICE_WAIT`]. Every provisioning round (startup, reprovision,
//! reload) holds one async lock, so rounds never overlap; concurrent reprovision requests join
//! the round in flight. Module operations do not take that lock.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine as _;
use identity_api::{
    AuthInfo, AziotSpec, DraftAuth, DraftDeviceIdentity, Identity, KeyHandle, LocalSpec,
    ProvisioningInfo,
};
use tokio::sync::watch;

use crate::cloud::hub::{self, HubModule, HubTarget};
use crate::cloud::{dps, tls, CloudClient, CloudError, RequestAuth};
use crate::config::{DpsAttestation, IdType, ManualAuth, Principal, Provisioning};
use crate::error::IdentityError;
use crate::state::{CachedModule, DeviceInfo, StateStore};

/// How long a request waits for provisioning in flight.
pub const DEVICE_WAIT: Duration = Duration::from_secs(25);
/// The keyd key modules' SAS keys are derived from.
pub const MASTER_KEY_ID: &str = "aziot_identityd_master_id";
/// First and longest pause between failed startup provisioning attempts.
const BACKOFF_FIRST: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Shortest pause between reprovisionings caused by Hub rejecting the device at run time.
const REJECTION_REPROVISION_INTERVAL: Duration = Duration::from_secs(60);

/// The settings that can change at run time (config reload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `[[principal]]`.
    pub principals: Vec<Principal>,
    /// `[provisioning]`.
    pub provisioning: Provisioning,
}

/// Settings fixed for the life of the process.
#[derive(Clone, Debug)]
pub struct Fixed {
    /// `hostname`.
    pub hostname: String,
    /// `prefer_module_identity_cache`.
    pub prefer_module_identity_cache: bool,
    /// `trust_bundle_cert`.
    pub trust_bundle_cert: String,
    /// `[localid] domain`.
    pub localid_domain: Option<String>,
    /// keyd's socket URI (the TLS signer opens its own client).
    pub keyd_uri: String,
}

/// How the device authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceCredentials {
    /// SAS with keyd symmetric key `key_id`.
    Sas {
        /// keyd key ID.
        key_id: String,
    },
    /// X.509 cert `cert_id` (certd) with key pair `key_id` (keyd).
    X509 {
        /// certd cert ID.
        cert_id: String,
        /// keyd key pair ID.
        key_id: String,
    },
}

/// The provisioned device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// The hub (authority).
    pub hub_name: String,
    /// The device ID.
    pub device_id: String,
    /// Where to connect: the parent gateway, or the hub.
    pub gateway_host: String,
    /// Parent gateway, if nested.
    pub local_gateway_hostname: Option<String>,
    /// Credentials.
    pub credentials: DeviceCredentials,
}

impl Device {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            hub_name: self.hub_name.clone(),
            local_gateway_hostname: self.local_gateway_hostname.clone(),
            device_id: self.device_id.clone(),
        }
    }

    fn same_place(&self, info: &DeviceInfo) -> bool {
        self.hub_name.eq_ignore_ascii_case(&info.hub_name) && self.device_id == info.device_id
    }
}

/// Where provisioning stands.
#[derive(Clone, Debug)]
pub enum DeviceState {
    /// The first provisioning is running.
    Starting,
    /// The device is usable.
    Ready(Arc<Device>),
    /// `source = "none"`.
    NotProvisioned,
    /// Provisioning failed and there is no device (retried in the background).
    Failed(Arc<IdentityError>),
}

/// Who the caller is (spec section 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallerKind {
    /// The principal without `idtype` (edged).
    Daemon,
    /// uid 0, not a principal.
    LocalRoot,
    /// A principal with `idtype`.
    HostProcess(Principal),
    /// Anyone else.
    Unknown,
}

impl CallerKind {
    fn is_admin(&self) -> bool {
        matches!(self, CallerKind::Daemon | CallerKind::LocalRoot)
    }

    fn may_get_device(&self) -> bool {
        match self {
            CallerKind::Daemon | CallerKind::LocalRoot => true,
            CallerKind::HostProcess(principal) => principal.has(IdType::Device),
            CallerKind::Unknown => false,
        }
    }
}

type RoundResult = Result<(), Arc<IdentityError>>;

/// The identity service.
#[derive(Debug)]
pub struct IdentityService {
    settings: RwLock<Arc<Settings>>,
    fixed: Fixed,
    keyd: key_api::Client,
    certd: cert_api::Client,
    cloud: CloudClient,
    store: StateStore,
    device: watch::Sender<DeviceState>,
    round_lock: tokio::sync::Mutex<()>,
    reprovision_in_flight: Mutex<Option<watch::Receiver<Option<RoundResult>>>>,
    master_key: tokio::sync::OnceCell<KeyHandle>,
    hub_rejected_device: tokio::sync::Notify,
    module_locks: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl IdentityService {
    /// A service over its peers and state folder; call [`IdentityService::start`] next.
    pub fn new(
        settings: Settings,
        fixed: Fixed,
        keyd: key_api::Client,
        certd: cert_api::Client,
        cloud: CloudClient,
        store: StateStore,
    ) -> Self {
        let (device, _) = watch::channel(DeviceState::Starting);
        IdentityService {
            settings: RwLock::new(Arc::new(settings)),
            fixed,
            keyd,
            certd,
            cloud,
            store,
            device,
            round_lock: tokio::sync::Mutex::new(()),
            reprovision_in_flight: Mutex::new(None),
            master_key: tokio::sync::OnceCell::new(),
            hub_rejected_device: tokio::sync::Notify::new(),
            module_locks: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(
            &self
                .settings
                .read()
                .unwrap_or_else(|poison| poison.into_inner()),
        )
    }

    /// The current provisioning state.
    pub fn device_state(&self) -> DeviceState {
        self.device.borrow().clone()
    }

    /// Starts background provisioning: retried with back-off (5 s doubling to 5 min) until a
    /// device is usable.
    pub fn start(self: &Arc<Self>) {
        let watcher = Arc::clone(self);
        tokio::spawn(async move { watcher.reprovision_on_hub_rejection().await });
        let renewer = Arc::clone(self);
        tokio::spawn(async move { renewer.renew_identity_cert_when_due().await });
        let service = Arc::clone(self);
        tokio::spawn(async move {
            let mut backoff = BACKOFF_FIRST;
            loop {
                match service.provision_round(false).await {
                    Ok(()) => break,
                    Err(error) => {
                        if matches!(service.device_state(), DeviceState::Ready(_)) {
                            break;
                        }
                        log::error!(
                            "provisioning failed, retrying in {} s: {}",
                            backoff.as_secs(),
                            http_common::error::error_chain(error.as_ref())
                        );
                    }
                }
                tokio::time::sleep(backoff).await;
                if matches!(service.device_state(), DeviceState::Ready(_)) {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        });
    }

    /// Reprovisions (DPS only) when IoT Hub rejects the device at run time — it may have been
    /// moved to another hub — at most once per [`REJECTION_REPROVISION_INTERVAL`].
    async fn reprovision_on_hub_rejection(self: Arc<Self>) {
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

    /// Notes a Hub answer for the device: a rejection of the device itself schedules a
    /// reprovisioning (DPS).
    fn observe_hub<T>(&self, result: Result<T, IdentityError>) -> Result<T, IdentityError> {
        if let Err(error) = &result {
            if error.cloud().is_some_and(CloudError::is_device_rejected) {
                self.hub_rejected_device.notify_one();
            }
        }
        result
    }

    /// Renews the DPS X.509 identity certificate when its `identity_auto_renew` policy says so
    /// (spec 6.6); failures are retried after the policy's `retry` period.
    async fn renew_identity_cert_when_due(self: Arc<Self>) {
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
                    let delay = retry.retry_delay(not_before, not_after);
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
        let csr = self.keyd_signed_csr(&old_pem, &handle).await?;
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
            },
        )
        .await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .install_renewed(
                    cert_id, key_id, &temp_cert, &temp_key, &new_chain, rotate_key,
                )
                .await
            {
                Ok(()) => break,
                Err(error) if attempt < 5 => {
                    log::warn!(
                        "installing the renewed credentials failed (attempt {attempt}), retrying: {}",
                        http_common::error::error_chain(&error)
                    );
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                Err(error) => return Err(error),
            }
        }
        let device = Arc::new(Device {
            hub_name: assignment.assigned_hub.clone(),
            device_id: assignment.device_id,
            gateway_host: assignment.assigned_hub,
            local_gateway_hostname: None,
            credentials: DeviceCredentials::X509 {
                cert_id: cert_id.to_owned(),
                key_id: key_id.to_owned(),
            },
        });
        let previous = self.store.device_info();
        let same_place = previous
            .as_ref()
            .is_some_and(|previous| device.same_place(previous));
        if !same_place {
            self.store.clear_modules();
        }
        self.store.set_device_info(Some(&device.info()))?;
        self.device
            .send_replace(DeviceState::Ready(Arc::clone(&device)));
        if let Err(error) = self.reconcile(&settings, &device, same_place).await {
            log::warn!(
                "module reconciliation after the renewal failed: {}",
                http_common::error::error_chain(&error)
            );
        }
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

    /// A CSR for `old_pem`'s subject and the public key behind `handle`, signed by keyd.
    async fn keyd_signed_csr(
        &self,
        old_pem: &str,
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
        let subject = crate::renewal::subject_der(old_pem).map_err(IdentityError::Credentials)?;
        let unsigned = crate::renewal::unsigned_csr(&subject, &public_key)
            .map_err(IdentityError::Credentials)?;
        let digest = openssl::sha::sha256(&unsigned.to_be_signed);
        let signature = match kind {
            crate::renewal::CsrSignature::EcdsaSha256 => {
                self.keyd
                    .sign(handle, key_api::SignMechanism::Ecdsa { digest: &digest })
                    .await
            }
            crate::renewal::CsrSignature::RsaSha256 => {
                const SHA256_DIGEST_INFO: &[u8] = &[
                    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04,
                    0x02, 0x01, 0x05, 0x00, 0x04, 0x20,
                ];
                let mut input = SHA256_DIGEST_INFO.to_vec();
                input.extend_from_slice(&digest);
                self.keyd
                    .encrypt(handle, key_api::EncryptMechanism::RsaPkcs1, &input)
                    .await
            }
        }
        .map_err(IdentityError::keyd("signing the renewal CSR"))?;
        crate::renewal::signed_csr(unsigned, kind, &signature).map_err(IdentityError::Credentials)
    }

    /// Classifies a caller by uid.
    pub fn caller_kind(&self, uid: u32) -> CallerKind {
        let settings = self.settings();
        let daemon = settings
            .principals
            .iter()
            .find(|principal| principal.id_type.is_none());
        if daemon.is_some_and(|daemon| daemon.uid == uid) {
            return CallerKind::Daemon;
        }
        if let Some(principal) = settings
            .principals
            .iter()
            .find(|principal| principal.uid == uid && principal.id_type.is_some())
        {
            return CallerKind::HostProcess(principal.clone());
        }
        if uid == 0 {
            CallerKind::LocalRoot
        } else {
            CallerKind::Unknown
        }
    }

    fn require_admin(&self, uid: u32) -> Result<(), IdentityError> {
        if self.caller_kind(uid).is_admin() {
            Ok(())
        } else {
            Err(IdentityError::Forbidden { uid })
        }
    }

    /// The device, waiting for provisioning in flight at most [`DEVICE_WAIT`].
    pub async fn device(&self) -> Result<Arc<Device>, IdentityError> {
        let mut receiver = self.device.subscribe();
        let state = tokio::time::timeout(
            DEVICE_WAIT,
            receiver.wait_for(|state| !matches!(state, DeviceState::Starting)),
        )
        .await;
        let state = match state {
            Ok(Ok(state)) => state.clone(),
            Ok(Err(_)) | Err(_) => return Err(IdentityError::ProvisioningInProgress),
        };
        match state {
            DeviceState::Ready(device) => Ok(device),
            DeviceState::NotProvisioned => Err(IdentityError::NotProvisioned),
            DeviceState::Failed(error) => Err(IdentityError::Provisioning(error)),
            DeviceState::Starting => Err(IdentityError::ProvisioningInProgress),
        }
    }

    // ----- provisioning -----

    /// One provisioning round (startup, reprovision, reload), then reconciliation. A Hub
    /// rejection of a DPS device during reconciliation triggers one DPS registration.
    async fn provision_round(self: &Arc<Self>, force: bool) -> RoundResult {
        let _round = self.round_lock.lock().await;
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
                Ok(()) => return Ok(()),
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
                    log::warn!(
                        "module reconciliation failed (cached module data stays in use): {}",
                        http_common::error::error_chain(&error)
                    );
                    return Ok(());
                }
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
                    ManualAuth::X509 { cert_id, key_id } => DeviceCredentials::X509 {
                        cert_id: cert_id.clone(),
                        key_id: key_id.clone(),
                    },
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
            } => {
                let credentials = match attestation {
                    DpsAttestation::SymmetricKey { key_id, .. } => DeviceCredentials::Sas {
                        key_id: key_id.clone(),
                    },
                    DpsAttestation::X509 {
                        cert_id, key_id, ..
                    } => DeviceCredentials::X509 {
                        cert_id: cert_id.clone(),
                        key_id: key_id.clone(),
                    },
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
                if let (false, true, Some(previous)) = (force, digest_matches, previous) {
                    log::info!(
                        "using the provisioning backup (device {:?} in hub {})",
                        previous.device_id,
                        previous.hub_name
                    );
                    return Ok(Some(from_backup(previous)));
                }
                match self
                    .register(global_endpoint, scope_id, payload.as_ref(), attestation)
                    .await
                {
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

    /// Registers with DPS.
    async fn register(
        &self,
        global_endpoint: &str,
        scope_id: &str,
        payload: Option<&serde_json::Value>,
        attestation: &DpsAttestation,
    ) -> Result<dps::Assignment, IdentityError> {
        let authority = global_endpoint
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned();
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
                ..
            } => {
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
        };
        dps::register(
            &self.cloud,
            dps::Registration {
                authority: &authority,
                scope_id,
                registration_id: &registration_id,
                payload,
                auth,
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
    async fn hub_target(&self, device: &Device) -> Result<HubTarget, IdentityError> {
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
            if let Err(error) = self.reconcile(&settings, &device, true).await {
                log::warn!(
                    "module reconciliation after the configuration change failed: {}",
                    http_common::error::error_chain(&error)
                );
            }
        }
    }

    // ----- modules -----

    async fn master_key(&self) -> Result<KeyHandle, IdentityError> {
        self.master_key
            .get_or_try_init(|| async {
                self.keyd
                    .create_key_if_not_exists(MASTER_KEY_ID, "derive,sign")
                    .await
                    .map_err(IdentityError::keyd("loading the module master key"))
            })
            .await
            .cloned()
    }

    /// The handle of the derived primary key of module `module_id`, generation `generation_id`.
    async fn module_key_handle(
        &self,
        module_id: &str,
        generation_id: &str,
        which: &str,
    ) -> Result<KeyHandle, IdentityError> {
        let master = self.master_key().await?;
        self.keyd
            .create_derived_key(
                &master,
                format!("{module_id}:{generation_id}:{which}").as_bytes(),
            )
            .await
            .map_err(IdentityError::keyd(format!(
                "deriving the {which} key of module {module_id:?}"
            )))
    }

    /// Derives the module's keys and sends them to Hub.
    async fn set_module_keys(
        &self,
        target: &HubTarget,
        module_id: &str,
        generation_id: &str,
    ) -> Result<HubModule, IdentityError> {
        let mut keys = Vec::new();
        for which in ["primary", "secondary"] {
            let handle = self
                .module_key_handle(module_id, generation_id, which)
                .await?;
            let bytes =
                self.keyd
                    .export_derived_key(&handle)
                    .await
                    .map_err(IdentityError::keyd(format!(
                        "exporting the {which} key of module {module_id:?}"
                    )))?;
            keys.push(b64(&bytes));
        }
        let secondary = keys.pop().unwrap_or_default();
        let primary = keys.pop().unwrap_or_default();
        hub::set_module_keys(&self.cloud, target, module_id, primary, secondary).await
    }

    fn cache(&self, device: &Device, module: &HubModule) -> Result<CachedModule, IdentityError> {
        let generation_id = module.generation_id.clone().ok_or_else(|| {
            IdentityError::Cloud(CloudError::Protocol {
                service: "IoT Hub",
                reason: format!("module {:?} has no generationId", module.module_id),
            })
        })?;
        let cached = CachedModule {
            module_id: module.module_id.clone(),
            device_id: device.device_id.clone(),
            generation_id,
            managed_by: module.managed_by.clone(),
        };
        if let Err(error) = self.store.cache_module(&device.hub_name, &cached) {
            log::warn!("{}", http_common::error::error_chain(&error));
        }
        Ok(cached)
    }

    /// Serializes writes to one module identity (create, key update, delete); other modules
    /// proceed in parallel.
    async fn lock_module(&self, module_id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let module_lock = Arc::clone(
            lock(&self.module_locks)
                .entry(module_id.to_owned())
                .or_default(),
        );
        module_lock.lock_owned().await
    }

    /// Creates a module in Hub with derived keys (spec 6.3).
    async fn create_hub_module(
        &self,
        device: &Device,
        target: &HubTarget,
        module_id: &str,
    ) -> Result<CachedModule, IdentityError> {
        let _module = self.lock_module(module_id).await;
        let created = hub::create_module(&self.cloud, target, module_id).await?;
        let cached = self.cache(device, &created)?;
        let updated = self
            .set_module_keys(target, module_id, &cached.generation_id)
            .await?;
        log::info!("created module identity {module_id:?}");
        self.cache(device, &updated)
    }

    /// Module reconciliation (spec 6.4).
    async fn reconcile(
        &self,
        settings: &Settings,
        device: &Device,
        same_place: bool,
    ) -> Result<(), IdentityError> {
        let current: Vec<&str> = settings
            .principals
            .iter()
            .filter(|principal| principal.has(IdType::Module))
            .map(|principal| principal.name.as_str())
            .collect();
        let previous = if same_place {
            self.store.previous_modules()
        } else {
            Vec::new()
        };
        let target = self.hub_target(device).await?;
        let in_hub = hub::list_modules(&self.cloud, &target).await?;
        let mut present = Vec::new();
        for module in &in_hub {
            let name = module.module_id.as_str();
            let was = previous.iter().any(|previous| previous == name);
            let is = current.contains(&name);
            if was && !is {
                log::info!("removing module identity {name:?} (no longer a principal)");
                match hub::delete_module(&self.cloud, &target, name).await {
                    Ok(()) | Err(IdentityError::ModuleNotFound(_)) => {}
                    Err(error) => return Err(error),
                }
                self.store
                    .uncache_module(&device.hub_name, &device.device_id, name);
            } else if is && !was {
                log::info!("recreating module identity {name:?} (new principal)");
                match hub::delete_module(&self.cloud, &target, name).await {
                    Ok(()) | Err(IdentityError::ModuleNotFound(_)) => {}
                    Err(error) => return Err(error),
                }
                self.create_hub_module(device, &target, name).await?;
                present.push(name.to_owned());
            } else if is {
                let _ = self.cache(device, module);
                present.push(name.to_owned());
            }
        }
        for name in current {
            if !present.iter().any(|present| present == name) {
                self.create_hub_module(device, &target, name).await?;
            }
        }
        self.store
            .set_device_info(Some(&device.info()))
            .and_then(|()| {
                self.store
                    .set_previous_state(&settings.principals, &settings.provisioning)
            })?;
        Ok(())
    }

    /// A module from Hub or the cache (spec 6.5). Waits for a write to the same module in flight
    /// (a create is two Hub requests: a reader in between would get a handle to keys Hub does
    /// not have yet).
    async fn read_module(
        &self,
        device: &Device,
        module_id: &str,
    ) -> Result<CachedModule, IdentityError> {
        let _module = self.lock_module(module_id).await;
        let cached = || {
            self.store
                .cached_module(&device.hub_name, &device.device_id, module_id)
        };
        if self.fixed.prefer_module_identity_cache {
            if let Some(module) = cached() {
                return Ok(module);
            }
        }
        let from_hub = match self.hub_target(device).await {
            Ok(target) => hub::get_module(&self.cloud, &target, module_id).await,
            Err(error) => Err(error),
        };
        match from_hub {
            Ok(Some(module)) => self.cache(device, &module),
            Ok(None) => {
                self.store
                    .uncache_module(&device.hub_name, &device.device_id, module_id);
                Err(IdentityError::ModuleNotFound(module_id.to_owned()))
            }
            Err(error) if error.is_cloud_network() => match cached() {
                Some(module) => {
                    log::warn!("IoT Hub unreachable ({error}); serving module {module_id:?} from the cache");
                    Ok(module)
                }
                None => Err(error),
            },
            Err(error) => Err(error),
        }
    }

    fn module_spec(
        &self,
        device: &Device,
        module: &CachedModule,
        auth: Option<AuthInfo>,
    ) -> Identity {
        Identity::Aziot(AziotSpec {
            hub_name: device.hub_name.clone(),
            gateway_host: device.gateway_host.clone(),
            device_id: device.device_id.clone(),
            module_id: Some(module.module_id.clone()),
            gen_id: Some(module.generation_id.clone()),
            auth,
        })
    }

    async fn module_identity(
        &self,
        device: &Device,
        module: &CachedModule,
    ) -> Result<Identity, IdentityError> {
        let handle = self
            .module_key_handle(&module.module_id, &module.generation_id, "primary")
            .await?;
        Ok(self.module_spec(device, module, Some(AuthInfo::Sas { key_handle: handle })))
    }

    // ----- operations behind the routes -----

    async fn device_auth(&self, device: &Device) -> Result<AuthInfo, IdentityError> {
        Ok(match &device.credentials {
            DeviceCredentials::Sas { key_id } => AuthInfo::Sas {
                key_handle: self
                    .keyd
                    .load_key(key_id)
                    .await
                    .map_err(IdentityError::keyd(format!(
                        "loading device key {key_id:?}"
                    )))?,
            },
            DeviceCredentials::X509 { cert_id, key_id } => {
                AuthInfo::X509 {
                    key_handle: self.keyd.load_key_pair(key_id).await.map_err(
                        IdentityError::keyd(format!("loading identity key pair {key_id:?}")),
                    )?,
                    cert_id: cert_id.clone(),
                }
            }
        })
    }

    /// The device identity for a caller with device rights.
    pub async fn device_identity(&self, uid: u32) -> Result<Identity, IdentityError> {
        if !self.caller_kind(uid).may_get_device() {
            return Err(IdentityError::Forbidden { uid });
        }
        let device = self.device().await?;
        let auth = self.device_auth(&device).await?;
        Ok(Identity::Aziot(AziotSpec {
            hub_name: device.hub_name.clone(),
            gateway_host: device.gateway_host.clone(),
            device_id: device.device_id.clone(),
            module_id: None,
            gen_id: None,
            auth: Some(auth),
        }))
    }

    /// The draft route's device identity.
    pub async fn draft_device_identity(
        &self,
        uid: u32,
    ) -> Result<DraftDeviceIdentity, IdentityError> {
        if !self.caller_kind(uid).may_get_device() {
            return Err(IdentityError::Forbidden { uid });
        }
        let device = self.device().await?;
        let auth = match self.device_auth(&device).await? {
            AuthInfo::Sas { key_handle } => DraftAuth {
                auth_type: "sas".to_owned(),
                keystorehandle: Some(key_handle),
                certstorehandle: None,
            },
            AuthInfo::X509 {
                key_handle,
                cert_id,
            } => DraftAuth {
                auth_type: "x509".to_owned(),
                keystorehandle: Some(key_handle),
                certstorehandle: Some(cert_id),
            },
            AuthInfo::Tpm => DraftAuth {
                auth_type: "tpm".to_owned(),
                keystorehandle: None,
                certstorehandle: None,
            },
        };
        Ok(DraftDeviceIdentity {
            id: format!("aziot://{}/device/{}", device.hub_name, device.device_id),
            managed_by: format!("aziot://{}/", device.hub_name),
            auth,
        })
    }

    /// `GET /identities/identity`: the device identity, or the caller's own module identity.
    pub async fn caller_identity(&self, uid: u32) -> Result<Identity, IdentityError> {
        let kind = self.caller_kind(uid);
        if kind.may_get_device() {
            return self.device_identity(uid).await;
        }
        match kind {
            CallerKind::HostProcess(principal) if principal.has(IdType::Module) => {
                self.get_module(uid, &principal.name, "aziot").await
            }
            CallerKind::HostProcess(principal) if principal.has(IdType::Local) => {
                self.get_module(uid, &principal.name, "local").await
            }
            _ => Err(IdentityError::Forbidden { uid }),
        }
    }

    /// `GET /identities/provisioning`.
    pub async fn provisioning_info(&self) -> ProvisioningInfo {
        let settings = self.settings();
        match &settings.provisioning {
            Provisioning::None => ProvisioningInfo {
                source: "none".to_owned(),
                auth: None,
                endpoint: None,
                scope_id: None,
                registration_id: None,
                payload: None,
            },
            Provisioning::Manual { authentication, .. } => ProvisioningInfo {
                source: "manual".to_owned(),
                auth: Some(
                    match authentication {
                        ManualAuth::Sas { .. } => "sas",
                        ManualAuth::X509 { .. } => "x509",
                    }
                    .to_owned(),
                ),
                endpoint: None,
                scope_id: None,
                registration_id: None,
                payload: None,
            },
            Provisioning::Dps {
                global_endpoint,
                scope_id,
                payload,
                attestation,
            } => {
                let (auth, registration_id) = match attestation {
                    DpsAttestation::SymmetricKey {
                        registration_id, ..
                    } => ("symmetric_key", Some(registration_id.clone())),
                    DpsAttestation::X509 {
                        registration_id: Some(id),
                        ..
                    } => ("x509", Some(id.clone())),
                    DpsAttestation::X509 { cert_id, .. } => (
                        "x509",
                        match self.certd.get_cert(cert_id).await {
                            Ok(pem) => tls::leaf_common_name(&pem),
                            Err(error) => {
                                log::warn!(
                                    "cannot read identity certificate {cert_id:?}: {}",
                                    http_common::error::error_chain(&error)
                                );
                                None
                            }
                        },
                    ),
                };
                ProvisioningInfo {
                    source: "dps".to_owned(),
                    auth: Some(auth.to_owned()),
                    endpoint: Some(global_endpoint.clone()),
                    scope_id: Some(scope_id.clone()),
                    registration_id,
                    payload: Some(payload.clone().unwrap_or(serde_json::Value::Null)),
                }
            }
        }
    }

    fn check_module_id(module_id: &str) -> Result<(), IdentityError> {
        if module_id.is_empty() {
            return Err(IdentityError::BadRequest(
                "parameter \"moduleId\" must not be empty".to_owned(),
            ));
        }
        Ok(())
    }

    /// `GET /identities/modules?type=...`.
    pub async fn list_modules(
        &self,
        uid: u32,
        id_type: &str,
    ) -> Result<Vec<Identity>, IdentityError> {
        self.require_admin(uid)?;
        if id_type == "local" {
            let settings = self.settings();
            return Ok(settings
                .principals
                .iter()
                .filter(|principal| principal.has(IdType::Local))
                .map(|principal| {
                    Identity::Local(LocalSpec {
                        module_id: principal.name.clone(),
                        auth: None,
                    })
                })
                .collect());
        }
        let device = self.device().await?;
        let listed = match self.hub_target(&device).await {
            Ok(target) => hub::list_modules(&self.cloud, &target).await,
            Err(error) => Err(error),
        };
        let modules = match self.observe_hub(listed) {
            Ok(modules) => modules
                .iter()
                .filter_map(|module| self.cache(&device, module).ok())
                .collect(),
            Err(error) if error.is_cloud_network() => {
                log::warn!("IoT Hub unreachable ({error}); listing cached modules");
                self.store
                    .cached_modules(&device.hub_name, &device.device_id)
            }
            Err(error) => return Err(error),
        };
        Ok(modules
            .iter()
            .map(|module| self.module_spec(&device, module, None))
            .collect())
    }

    /// `POST /identities/modules` (type `aziot`).
    pub async fn create_module(
        &self,
        uid: u32,
        module_id: &str,
    ) -> Result<Identity, IdentityError> {
        self.require_admin(uid)?;
        Self::check_module_id(module_id)?;
        let device = self.device().await?;
        let target = self.hub_target(&device).await?;
        let module = self.observe_hub(self.create_hub_module(&device, &target, module_id).await)?;
        self.module_identity(&device, &module).await
    }

    /// `POST /identities/modules` (type `local`).
    pub async fn create_local_module(
        &self,
        uid: u32,
        module_id: &str,
        attributes: Option<&str>,
    ) -> Result<Identity, IdentityError> {
        self.require_admin(uid)?;
        Self::check_module_id(module_id)?;
        let settings = self.settings();
        if settings
            .principals
            .iter()
            .any(|principal| principal.name == module_id && principal.has(IdType::Local))
        {
            return Err(IdentityError::BadRequest(format!(
                "{module_id:?} is a local principal; get its identity with GET instead"
            )));
        }
        let attributes = attributes.unwrap_or("client");
        if attributes != "client" && attributes != "server" {
            return Err(IdentityError::BadRequest(
                "parameter \"localIdOpts.attributes\" must be \"client\" or \"server\"".to_owned(),
            ));
        }
        self.local_identity(module_id, attributes).await
    }

    /// `GET /identities/modules/{m}?type=...`.
    pub async fn get_module(
        &self,
        uid: u32,
        module_id: &str,
        id_type: &str,
    ) -> Result<Identity, IdentityError> {
        let kind = self.caller_kind(uid);
        let allowed = match &kind {
            CallerKind::Daemon | CallerKind::LocalRoot => true,
            CallerKind::HostProcess(principal) => {
                principal.name == module_id
                    && (principal.has(IdType::Module) || principal.has(IdType::Local))
            }
            CallerKind::Unknown => false,
        };
        if !allowed {
            return Err(IdentityError::Forbidden { uid });
        }
        if id_type == "local" {
            let settings = self.settings();
            let principal = settings
                .principals
                .iter()
                .find(|principal| principal.name == module_id && principal.has(IdType::Local))
                .ok_or_else(|| IdentityError::ModuleNotFound(module_id.to_owned()))?;
            let attributes = principal
                .local_attributes
                .clone()
                .unwrap_or_else(|| "client".to_owned());
            return self.local_identity(module_id, &attributes).await;
        }
        let device = self.device().await?;
        let module = self.observe_hub(self.read_module(&device, module_id).await)?;
        self.module_identity(&device, &module).await
    }

    /// `PUT /identities/modules/{m}`: re-derives and re-sends the keys.
    pub async fn update_module(
        &self,
        uid: u32,
        module_id: &str,
    ) -> Result<Identity, IdentityError> {
        self.require_admin(uid)?;
        let device = self.device().await?;
        let target = self.hub_target(&device).await?;
        let _module = self.lock_module(module_id).await;
        let module = self
            .observe_hub(hub::get_module(&self.cloud, &target, module_id).await)?
            .ok_or_else(|| IdentityError::ModuleNotFound(module_id.to_owned()))?;
        let cached = self.cache(&device, &module)?;
        let updated = self.observe_hub(
            self.set_module_keys(&target, module_id, &cached.generation_id)
                .await,
        )?;
        let cached = self.cache(&device, &updated)?;
        self.module_identity(&device, &cached).await
    }

    /// `DELETE /identities/modules/{m}`.
    pub async fn delete_module(&self, uid: u32, module_id: &str) -> Result<(), IdentityError> {
        self.require_admin(uid)?;
        let device = self.device().await?;
        let target = self.hub_target(&device).await?;
        let _module = self.lock_module(module_id).await;
        let result = self.observe_hub(hub::delete_module(&self.cloud, &target, module_id).await);
        if matches!(result, Ok(()) | Err(IdentityError::ModuleNotFound(_))) {
            self.store
                .uncache_module(&device.hub_name, &device.device_id, module_id);
        }
        result
    }

    /// `GET /trust-bundle`.
    pub async fn trust_bundle(&self) -> Result<String, IdentityError> {
        match self.certd.get_cert(&self.fixed.trust_bundle_cert).await {
            Ok(pem) => Ok(pem),
            Err(error) if error.is_not_found() => Ok(String::new()),
            Err(error) => Err(IdentityError::certd("loading the trust bundle")(error)),
        }
    }

    /// A fresh local identity (spec 4): a new RSA-2048 key and a certificate for
    /// `CN=<module>.<hostname>.<domain>` issued by certd under the module's name.
    async fn local_identity(
        &self,
        module_id: &str,
        attributes: &str,
    ) -> Result<Identity, IdentityError> {
        let domain = self.fixed.localid_domain.as_deref().ok_or_else(|| {
            IdentityError::BadRequest("local identities need [localid] domain".to_owned())
        })?;
        let common_name = format!("{module_id}.{}.{domain}", self.fixed.hostname);
        let server = attributes == "server";
        let request =
            tokio::task::spawn_blocking(move || crate::local::request(&common_name, server))
                .await
                .map_err(|error| IdentityError::Local(error.to_string()))?
                .map_err(IdentityError::Local)?;
        let certificate = self
            .certd
            .create_cert(module_id, &request.csr_pem, None)
            .await
            .map_err(IdentityError::certd(format!(
                "issuing the local identity certificate {module_id:?}"
            )))?;
        let expiration = crate::local::expiration(&certificate).map_err(IdentityError::Local)?;
        Ok(Identity::Local(LocalSpec {
            module_id: module_id.to_owned(),
            auth: Some(identity_api::LocalAuth {
                private_key: request.private_key_pem,
                certificate,
                expiration,
            }),
        }))
    }
}
