//! The identity service: who the caller is, the device's provisioning state, module identities
//! and reconciliation. No HTTP types here; handlers translate.
//!
//! Provisioning runs in the background ([`IdentityService::start`]); requests that need the
//! device wait for it at most [`DEVICE_WAIT`]. Every provisioning round (startup, reprovision,
//! reload) holds one async lock, so rounds never overlap; concurrent reprovision requests join
//! the round in flight. Module operations do not take that lock.
//!
//! This file holds the types, the service struct and the entry points shared by every route;
//! the rest is split by concern: `provisioning` (rounds, DPS, reprovision, reload),
//! `reconcile` (module reconciliation), `modules` (module identities and their routes),
//! `identities` (device and caller identity reads) and `renewal` (identity-cert renewal).

mod identities;
mod modules;
mod provisioning;
mod reconcile;
mod renewal;

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine as _;
use identity_api::KeyHandle;
use tokio::sync::watch;

use crate::cloud::{CloudClient, CloudError};
use crate::config::{IdType, Principal, Provisioning};
use crate::error::IdentityError;
use crate::state::{DeviceInfo, StateStore};

/// How long a request waits for provisioning in flight.
pub const DEVICE_WAIT: Duration = Duration::from_secs(25);
/// How long a module identity read waits, from its arrival, for the device and for the module
/// reconciliation of the provisioning round in flight (see [`IdentityService::reconciled`]).
pub const MODULE_WAIT: Duration = Duration::from_secs(30);
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
    /// The TPM service (keyd's tpmd API): TPM attestation and TPM-signed SAS tokens.
    pub tpm: key_api::tpm::TpmClient,
}

/// How the device authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceCredentials {
    /// SAS with keyd symmetric key `key_id`.
    Sas {
        /// keyd key ID.
        key_id: String,
    },
    /// SAS signed in the TPM with the authentication key DPS sent.
    Tpm,
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

/// Where the module reconciliation of the current provisioning round stands. Every round
/// (startup, reprovision, provisioning change, principal change, identity-cert renewal) sets
/// `Running` before it changes anything and its outcome when it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reconciliation {
    /// The round (provisioning, then reconciliation) is in flight.
    Running,
    /// The modules match the principals (or there is nothing to reconcile).
    Done,
    /// The round ended without reconciling: the error chain.
    Failed(String),
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
    reconciliation: watch::Sender<Reconciliation>,
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
        let (reconciliation, _) = watch::channel(Reconciliation::Running);
        IdentityService {
            settings: RwLock::new(Arc::new(settings)),
            fixed,
            keyd,
            certd,
            cloud,
            store,
            device,
            reconciliation,
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

    /// Where the current round's module reconciliation stands, right now.
    pub fn reconciliation_state(&self) -> Reconciliation {
        self.reconciliation.borrow().clone()
    }

    /// Waits until the current round's module reconciliation has ended (done or failed), at
    /// most until `deadline`; returns the state then (`Running` when the bound passed). Module
    /// reads call this so that a principal asking right after start-up or during a
    /// reprovisioning gets its module once it exists, instead of a 404.
    pub(super) async fn reconciled(&self, deadline: tokio::time::Instant) -> Reconciliation {
        let mut receiver = self.reconciliation.subscribe();
        let state = match tokio::time::timeout_at(
            deadline,
            receiver.wait_for(|state| *state != Reconciliation::Running),
        )
        .await
        {
            Ok(Ok(state)) => state.clone(),
            Ok(Err(_)) | Err(_) => Reconciliation::Running,
        };
        state
    }

    /// Records the outcome of a round's reconciliation.
    pub(super) fn set_reconciliation(&self, state: Reconciliation) {
        self.reconciliation.send_replace(state);
    }

    /// Starts background provisioning: retried with back-off (5 s doubling to 5 min) until a
    /// device is usable.
    pub fn start(self: &Arc<Self>) {
        let watcher = Arc::clone(self);
        tokio::spawn(async move { watcher.reprovision_on_hub_rejection().await });
        let renewer = Arc::clone(self);
        tokio::spawn(async move { renewer.renew_identity_cert_when_due().await });
        let renewer = Arc::clone(self);
        tokio::spawn(async move { renewer.renew_operational_cert_when_due().await });
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
}
