//! In-memory emulator state shared by the DPS, Hub and admin front ends: enrollments,
//! registrations, DPS operations, hubs with their devices and modules, run-time settings,
//! injected faults and the request log. All access happens under one mutex, never across an
//! `.await`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use openssl::x509::X509;
use serde::Serialize;
use serde_json::{json, Value};

use crate::{
    config::{
        Attestation, DeviceAuthSpec, DeviceSpec, FailSpec, FaultSpec, GroupAttestation,
        GroupEnrollment, IndividualEnrollment, SettingsPatch, Target,
    },
    pki,
    sas::{SasError, SasToken},
    tpm::{self, TpmError},
    util, EmulatorError,
};

/// Maximum number of request-log entries kept (oldest dropped first).
const LOG_CAP: usize = 10_000;

/// Placeholder time IoT Hub reports for never-connected devices.
pub(crate) const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// The TLS client certificate chain presented on a connection.
#[derive(Debug)]
pub(crate) struct ClientChain {
    /// The client's leaf certificate.
    pub leaf: X509,
    /// Further certificates the client sent (untrusted helpers for chain building).
    pub intermediates: Vec<X509>,
}

/// The credential a request carries.
#[derive(Debug)]
pub(crate) enum Credential {
    /// No `Authorization` header and no client certificate.
    None,
    /// An `Authorization` header (parsed as a SAS token, or why it did not parse).
    Sas(Result<SasToken, SasError>),
    /// No `Authorization` header, but a TLS client certificate.
    X509(Arc<ClientChain>),
}

impl Credential {
    /// Short name for the request log.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::None => "none",
            Credential::Sas(_) => "sas",
            Credential::X509(_) => "x509",
        }
    }
}

/// How a hub device or module authenticates.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum HubAuth {
    /// Symmetric keys (base64).
    Sas { primary: String, secondary: String },
    /// X.509 thumbprints (hex).
    SelfSigned {
        primary: Option<String>,
        secondary: Option<String>,
    },
    /// CA-signed X.509.
    CertificateAuthority,
    /// No authentication.
    None,
}

impl std::fmt::Debug for HubAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.type_name())
    }
}

fn check_key(k: &str) -> Result<String, String> {
    match util::b64_decode(k) {
        Some(bytes) if (16..=64).contains(&bytes.len()) => Ok(k.to_string()),
        Some(_) => Err("symmetric key must be 16 to 64 bytes".to_string()),
        None => Err("symmetric key is not valid base64".to_string()),
    }
}

impl HubAuth {
    /// Wire name of the type.
    pub fn type_name(&self) -> &'static str {
        match self {
            HubAuth::Sas { .. } => "sas",
            HubAuth::SelfSigned { .. } => "selfSigned",
            HubAuth::CertificateAuthority => "certificateAuthority",
            HubAuth::None => "none",
        }
    }

    /// New SAS auth with the given keys, generating missing ones.
    pub fn sas(primary: Option<String>, secondary: Option<String>) -> Self {
        HubAuth::Sas {
            primary: primary.unwrap_or_else(util::random_key_b64),
            secondary: secondary.unwrap_or_else(util::random_key_b64),
        }
    }

    /// The Hub JSON `authentication` object.
    pub fn to_json(&self) -> Value {
        let (pk, sk) = match self {
            HubAuth::Sas { primary, secondary } => (json!(primary), json!(secondary)),
            _ => (Value::Null, Value::Null),
        };
        let (pt, st) = match self {
            HubAuth::SelfSigned { primary, secondary } => (json!(primary), json!(secondary)),
            _ => (Value::Null, Value::Null),
        };
        json!({
            "type": self.type_name(),
            "symmetricKey": { "primaryKey": pk, "secondaryKey": sk },
            "x509Thumbprint": { "primaryThumbprint": pt, "secondaryThumbprint": st },
        })
    }

    /// Parses a Hub JSON `authentication` object. `Ok(None)` when absent or `null`.
    /// SAS without keys gets random keys.
    pub fn from_json(v: Option<&Value>) -> Result<Option<Self>, String> {
        let v = match v {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(o)) => o,
            Some(_) => return Err("authentication must be an object".to_string()),
        };
        let str_at = |outer: &str, inner: &str| -> Result<Option<String>, String> {
            match v.get(outer).and_then(|o| o.get(inner)) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(format!("{outer}.{inner} must be a string")),
            }
        };
        let ty = match v.get("type") {
            None | Some(Value::Null) => "sas",
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err("authentication.type must be a string".to_string()),
        };
        match ty.to_ascii_lowercase().as_str() {
            "sas" => {
                let p = str_at("symmetricKey", "primaryKey")?
                    .map(|k| check_key(&k))
                    .transpose()?;
                let s = str_at("symmetricKey", "secondaryKey")?
                    .map(|k| check_key(&k))
                    .transpose()?;
                Ok(Some(HubAuth::sas(p, s)))
            }
            "selfsigned" | "x509" => {
                let p = str_at("x509Thumbprint", "primaryThumbprint")?;
                let s = str_at("x509Thumbprint", "secondaryThumbprint")?;
                if p.is_none() && s.is_none() {
                    return Err("selfSigned authentication needs a thumbprint".to_string());
                }
                Ok(Some(HubAuth::SelfSigned {
                    primary: p,
                    secondary: s,
                }))
            }
            "certificateauthority" => Ok(Some(HubAuth::CertificateAuthority)),
            "none" => Ok(Some(HubAuth::None)),
            other => Err(format!("unknown authentication type {other:?}")),
        }
    }
}

/// A module identity in a hub.
#[derive(Debug, Clone)]
pub(crate) struct Module {
    pub module_id: String,
    pub device_id: String,
    pub managed_by: Option<String>,
    pub generation_id: String,
    pub etag: String,
    pub auth: HubAuth,
}

impl Module {
    /// Hub JSON for the module.
    pub fn to_json(&self) -> Value {
        json!({
            "moduleId": self.module_id,
            "deviceId": self.device_id,
            "managedBy": self.managed_by,
            "generationId": self.generation_id,
            "etag": self.etag,
            "authentication": self.auth.to_json(),
            "connectionState": "Disconnected",
            "connectionStateUpdatedTime": ZERO_TIME,
            "lastActivityTime": ZERO_TIME,
            "cloudToDeviceMessageCount": 0,
        })
    }
}

/// A device identity in a hub.
#[derive(Debug, Clone)]
pub(crate) struct Device {
    pub device_id: String,
    pub generation_id: String,
    pub etag: String,
    pub auth: HubAuth,
    pub iot_edge: bool,
    pub modules: BTreeMap<String, Module>,
}

impl Device {
    /// Hub JSON for the device.
    pub fn to_json(&self) -> Value {
        json!({
            "deviceId": self.device_id,
            "generationId": self.generation_id,
            "etag": self.etag,
            "connectionState": "Disconnected",
            "status": "enabled",
            "statusReason": null,
            "connectionStateUpdatedTime": ZERO_TIME,
            "statusUpdatedTime": ZERO_TIME,
            "lastActivityTime": ZERO_TIME,
            "cloudToDeviceMessageCount": 0,
            "authentication": self.auth.to_json(),
            "capabilities": { "iotEdge": self.iot_edge },
        })
    }
}

/// One emulated IoT Hub.
#[derive(Debug, Clone)]
pub(crate) struct Hub {
    /// Host name as first given (case preserved).
    pub name: String,
    pub devices: BTreeMap<String, Device>,
}

/// Credential of an individual enrollment, validated.
#[derive(Debug, Clone)]
pub(crate) enum IndividualCred {
    Sas {
        primary: String,
        secondary: Option<String>,
    },
    X509 {
        certs: Vec<X509>,
        thumbprints: Vec<String>,
    },
    /// TPM: the enrolled endorsement key.
    Tpm { ek: tpm::Public },
}

/// A validated individual enrollment.
#[derive(Debug, Clone)]
pub(crate) struct IndividualRec {
    pub spec: IndividualEnrollment,
    pub cred: IndividualCred,
}

/// Credential of a group enrollment, validated.
#[derive(Debug, Clone)]
pub(crate) enum GroupCred {
    Sas {
        primary: String,
        secondary: Option<String>,
    },
    X509 {
        cas: Vec<X509>,
    },
}

/// A validated group enrollment.
#[derive(Debug, Clone)]
pub(crate) struct GroupRec {
    pub spec: GroupEnrollment,
    pub cred: GroupCred,
}

fn invalid(msg: impl Into<String>) -> EmulatorError {
    EmulatorError::InvalidInput(msg.into())
}

fn valid_key(k: &str, what: &str) -> Result<String, EmulatorError> {
    check_key(k).map_err(|e| invalid(format!("{what}: {e}")))
}

fn read_pem_file(path: &std::path::Path) -> Result<String, EmulatorError> {
    std::fs::read_to_string(path).map_err(|source| EmulatorError::Io {
        context: format!("read {}", path.display()),
        source,
    })
}

impl IndividualRec {
    /// Validates a spec: non-empty IDs, base64 keys, parseable certificates.
    pub fn from_spec(spec: IndividualEnrollment) -> Result<Self, EmulatorError> {
        if spec.registration_id.is_empty() {
            return Err(invalid("registration_id must not be empty"));
        }
        if spec.device_id.as_deref() == Some("") {
            return Err(invalid("device_id must not be empty"));
        }
        let cred = match &spec.attestation {
            Attestation::SymmetricKey {
                primary_key,
                secondary_key,
            } => IndividualCred::Sas {
                primary: valid_key(primary_key, "primary_key")?,
                secondary: secondary_key
                    .as_deref()
                    .map(|k| valid_key(k, "secondary_key"))
                    .transpose()?,
            },
            Attestation::X509 {
                cert_pem,
                cert_file,
                thumbprints,
            } => {
                let mut certs = Vec::new();
                if let Some(pem) = cert_pem {
                    certs.extend(pki::parse_pem_bundle(pem)?.into_iter().take(1));
                }
                if let Some(path) = cert_file {
                    certs.extend(
                        pki::parse_pem_bundle(&read_pem_file(path)?)?
                            .into_iter()
                            .take(1),
                    );
                }
                let thumbprints: Vec<String> = thumbprints
                    .iter()
                    .map(|t| util::normalize_thumbprint(t))
                    .filter(|t| !t.is_empty())
                    .collect();
                if certs.is_empty() && thumbprints.is_empty() {
                    return Err(invalid(
                        "x509 attestation needs cert_pem, cert_file or thumbprints",
                    ));
                }
                IndividualCred::X509 { certs, thumbprints }
            }
            Attestation::Tpm { endorsement_key } => IndividualCred::Tpm {
                ek: tpm::Public::parse_b64(endorsement_key, "endorsement_key")
                    .map_err(|e| invalid(e.to_string()))?,
            },
        };
        Ok(IndividualRec { spec, cred })
    }
}

impl GroupRec {
    /// Validates a spec: non-empty ID, base64 keys, parseable CA certificates.
    pub fn from_spec(spec: GroupEnrollment) -> Result<Self, EmulatorError> {
        if spec.group_id.is_empty() {
            return Err(invalid("group_id must not be empty"));
        }
        let cred = match &spec.attestation {
            GroupAttestation::SymmetricKey {
                primary_key,
                secondary_key,
            } => GroupCred::Sas {
                primary: valid_key(primary_key, "primary_key")?,
                secondary: secondary_key
                    .as_deref()
                    .map(|k| valid_key(k, "secondary_key"))
                    .transpose()?,
            },
            GroupAttestation::X509 { ca_pem, ca_file } => {
                let mut cas = Vec::new();
                if let Some(pem) = ca_pem {
                    cas.extend(pki::parse_pem_bundle(pem)?);
                }
                if let Some(path) = ca_file {
                    cas.extend(pki::parse_pem_bundle(&read_pem_file(path)?)?);
                }
                if cas.is_empty() {
                    return Err(invalid("x509 group attestation needs ca_pem or ca_file"));
                }
                GroupCred::X509 { cas }
            }
        };
        Ok(GroupRec { spec, cred })
    }
}

/// What DPS will do once an operation completes.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub device_id: String,
    pub hub: String,
    pub device_auth: HubAuth,
    pub iot_edge: bool,
    pub payload: Option<Value>,
    /// `symmetricKey`, `x509` or `tpm`.
    pub attestation_field: &'static str,
    pub group_id: Option<String>,
    pub source: String,
    /// The `payload` the device sent.
    pub request_payload: Option<Value>,
    /// TPM attestation: the keys the device sent.
    pub tpm_seen: Option<TpmSeen>,
    /// TPM attestation: `registrationState.tpm.authenticationKey` (base64 blob).
    pub tpm_authentication_key: Option<String>,
    /// A certificate issued for the CSR the device sent (spec 9.6).
    pub issued: Option<crate::issuance::Issued>,
}

/// The TPM public keys a device sent, base64 as received (for the admin API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TpmSeen {
    /// `tpm.endorsementKey` of the request.
    pub endorsement_key: String,
    /// `tpm.storageRootKey` of the request.
    pub storage_root_key: String,
}

/// The HMAC key DPS issued to a TPM registration, with the keys it was wrapped for.
#[derive(Clone)]
pub(crate) struct TpmAssign {
    pub hmac_key: Vec<u8>,
    pub ek: tpm::Public,
    pub srk: tpm::Public,
    pub seen: TpmSeen,
}

impl TpmAssign {
    /// Second TPM step, once the SAS token verified: the blob for
    /// `registrationState.tpm.authenticationKey`, a fresh wrap of the same HMAC key. The
    /// register body may repeat the TPM keys (the C SDK does; the reference identity service
    /// does not): the EK must still be the one the key was issued to, and the SRK given is the
    /// one the new blob is wrapped for.
    pub fn assigned_key(
        &mut self,
        registration_id: &str,
        seen: Option<&TpmSeen>,
    ) -> Result<Vec<u8>, TpmReject> {
        if let Some(seen) = seen {
            let ek = tpm::Public::parse_b64(&seen.endorsement_key, "tpm.endorsementKey")?;
            let srk = tpm::Public::parse_b64(&seen.storage_root_key, "tpm.storageRootKey")?;
            if !ek.same_key(&self.ek) {
                return Err(TpmReject::EkMismatch(registration_id.to_string()));
            }
            self.srk = srk;
            self.seen = seen.clone();
        }
        Ok(tpm::authentication_key_blob(
            &self.ek,
            &self.srk,
            &self.hmac_key,
        )?)
    }
}

impl std::fmt::Debug for TpmAssign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmAssign")
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

/// Why DPS gave a TPM registration no authentication key.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TpmReject {
    /// No individual enrollment has this registration ID.
    #[error("no enrollment for registration ID {0:?}")]
    NoEnrollment(String),
    /// The enrollment exists but uses another attestation.
    #[error("the enrollment for registration ID {0:?} does not use TPM attestation")]
    NotTpm(String),
    /// The enrollment's endorsement key is another one.
    #[error("the TPM endorsement key does not match the one enrolled for registration ID {0:?}")]
    EkMismatch(String),
    /// A key the device sent cannot be used.
    #[error(transparent)]
    BadKey(#[from] TpmError),
}

/// Final outcome decided at registration time.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Assign(Box<Plan>),
    Fail(FailSpec),
}

/// A DPS registration operation.
#[derive(Debug, Clone)]
pub(crate) struct Operation {
    pub registration_id: String,
    pub polls_left: u32,
    pub outcome: Outcome,
    /// Set once finished: (`status`, `registrationState`).
    pub result: Option<(&'static str, Value)>,
}

/// DPS's record of a registration ID.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RegistrationRec {
    pub registration_id: String,
    pub device_id: String,
    pub assigned_hub: String,
    pub enrollment: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub etag: String,
    /// Completed assignments so far (1 after the first registration).
    pub assignments: u32,
    /// The `payload` the device sent with its last accepted `register` request.
    pub last_request_payload: Option<Value>,
    /// Generation ID of the hub device at the last assignment.
    pub device_generation_id: String,
    /// TPM attestation: the EK and SRK the device sent in its last accepted registration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmSeen>,
}

/// Run-time settings (see [`SettingsPatch`]).
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Hub DPS assigns devices to (unless the enrollment overrides it).
    pub assigned_hub: String,
    /// DPS polls answered 202 before the final answer.
    pub assigning_polls: u32,
    /// `Retry-After` on DPS 202 answers.
    pub retry_after_secs: u32,
    /// When set, registrations end `failed` with this error.
    pub fail_registrations: Option<FailSpec>,
    /// Artificial delay on DPS answers.
    pub dps_delay_ms: u64,
    /// Artificial delay on Hub answers.
    pub hub_delay_ms: u64,
}

/// One received DPS or Hub request, as recorded for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    /// Sequence number (increasing from 1).
    pub seq: u64,
    /// Arrival time, Unix milliseconds.
    pub time_ms: u64,
    /// `dps`, `hub` or `other` (unknown path).
    pub service: &'static str,
    /// HTTP method.
    pub method: String,
    /// Request path as sent (still percent-encoded).
    pub path: String,
    /// Query string, if any.
    pub query: Option<String>,
    /// Value of the `Host` header, if any.
    pub host: Option<String>,
    /// Credential presented: `sas`, `x509` or `none`.
    pub auth: &'static str,
    /// Whether authentication passed (`None` when the request never got that far).
    pub auth_ok: Option<bool>,
    /// Status answered.
    pub status: u16,
    /// `Retry-After` answered, if any.
    pub retry_after: Option<u32>,
    /// True if the answer was an injected fault.
    pub fault: bool,
    /// The TPM public keys in a DPS `register` body (`tpm.endorsementKey`, ...), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tpm: Option<TpmSeen>,
}

/// Everything the emulator knows.
#[derive(Debug)]
pub(crate) struct State {
    pub id_scope: String,
    pub default_hub: String,
    pub settings: Settings,
    pub individual: BTreeMap<String, IndividualRec>,
    pub groups: BTreeMap<String, GroupRec>,
    pub registrations: BTreeMap<String, RegistrationRec>,
    pub operations: HashMap<String, Operation>,
    /// TPM registrations: the HMAC key last issued per registration ID.
    pub tpm_keys: HashMap<String, TpmAssign>,
    pub hubs: BTreeMap<String, Hub>,
    pub trusted_cas: Vec<X509>,
    pub faults: VecDeque<FaultSpec>,
    /// The CA DPS issues device certificates from (trusted by the hubs).
    pub dps_issuing_ca: Option<crate::pki::TestCa>,
    /// Certificate issuance policies: enrollment ID → validity of issued certs (seconds).
    pub issuance: BTreeMap<String, u64>,
    log: VecDeque<LogEntry>,
    next_seq: u64,
    etag_counter: u64,
}

/// State behind its lock, shared by all tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    state: Mutex<State>,
}

impl Shared {
    pub fn new(state: State) -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(state),
        })
    }

    /// Locks the state (a poisoned lock is recovered: every mutation leaves it consistent).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Result of DPS authentication.
#[derive(Debug)]
pub(crate) struct Attested {
    pub device_auth: HubAuth,
    pub attestation_field: &'static str,
    pub group_id: Option<String>,
    pub source: String,
    pub device_id: String,
    pub assigned_hub: Option<String>,
    pub payload: Option<Value>,
    pub iot_edge: bool,
    pub tpm: Option<TpmAssign>,
}

impl State {
    /// New state with the given scope and default hub.
    pub fn new(
        id_scope: String,
        default_hub: String,
        assigning_polls: u32,
        retry_after_secs: u32,
    ) -> Self {
        let mut hubs = BTreeMap::new();
        hubs.insert(
            default_hub.to_ascii_lowercase(),
            Hub {
                name: default_hub.clone(),
                devices: BTreeMap::new(),
            },
        );
        State {
            id_scope,
            settings: Settings {
                assigned_hub: default_hub.clone(),
                assigning_polls,
                retry_after_secs,
                fail_registrations: None,
                dps_delay_ms: 0,
                hub_delay_ms: 0,
            },
            default_hub,
            individual: BTreeMap::new(),
            groups: BTreeMap::new(),
            registrations: BTreeMap::new(),
            operations: HashMap::new(),
            tpm_keys: HashMap::new(),
            hubs,
            trusted_cas: Vec::new(),
            faults: VecDeque::new(),
            dps_issuing_ca: None,
            issuance: BTreeMap::new(),
            log: VecDeque::new(),
            next_seq: 1,
            etag_counter: 0,
        }
    }

    /// A fresh etag (base64 of a global counter, so every write gets a new one).
    pub fn next_etag(&mut self) -> String {
        self.etag_counter += 1;
        util::b64(self.etag_counter.to_string().as_bytes())
    }

    /// Appends to the request log.
    pub fn push_log(&mut self, mut entry: LogEntry) {
        entry.seq = self.next_seq;
        self.next_seq += 1;
        if self.log.len() >= LOG_CAP {
            self.log.pop_front();
        }
        self.log.push_back(entry);
    }

    /// The request log, oldest first.
    pub fn log(&self) -> Vec<LogEntry> {
        self.log.iter().cloned().collect()
    }

    /// Clears the request log (sequence numbers keep increasing).
    pub fn clear_log(&mut self) {
        self.log.clear();
    }

    /// Takes one injected fault for `target`, if any is pending.
    pub fn take_fault(&mut self, target: Target) -> Option<FaultSpec> {
        let idx = self
            .faults
            .iter()
            .position(|f| f.target == target && f.count > 0)?;
        let fault = self.faults.get_mut(idx)?;
        fault.count -= 1;
        let taken = fault.clone();
        if fault.count == 0 {
            self.faults.remove(idx);
        }
        Some(taken)
    }

    /// Queues a fault.
    pub fn add_fault(&mut self, fault: FaultSpec) -> Result<(), EmulatorError> {
        if !(400..=599).contains(&fault.status) {
            return Err(invalid("fault status must be 400..=599"));
        }
        if fault.count > 0 {
            self.faults.push_back(fault);
        }
        Ok(())
    }

    /// Applies a settings patch.
    pub fn patch_settings(&mut self, patch: SettingsPatch) -> Result<(), EmulatorError> {
        if let Some(h) = patch.assigned_hub {
            if h.is_empty() {
                return Err(invalid("assigned_hub must not be empty"));
            }
            self.settings.assigned_hub = h;
        }
        if let Some(n) = patch.assigning_polls {
            self.settings.assigning_polls = n;
        }
        if let Some(n) = patch.retry_after_secs {
            self.settings.retry_after_secs = n;
        }
        if let Some(f) = patch.fail_registrations {
            self.settings.fail_registrations = f;
        }
        if let Some(ms) = patch.dps_delay_ms {
            self.settings.dps_delay_ms = ms;
        }
        if let Some(ms) = patch.hub_delay_ms {
            self.settings.hub_delay_ms = ms;
        }
        Ok(())
    }

    /// Resolves a hub name (for admin calls): `None` → default hub. Returns the map key.
    pub fn hub_key(&self, name: Option<&str>) -> String {
        name.unwrap_or(&self.default_hub).to_ascii_lowercase()
    }

    /// Picks the hub a Hub request addresses from its `Host` header: exact (case-insensitive)
    /// match of a known hub, else a unique match on the host part ignoring ports, else the
    /// default hub. Returns the map key.
    pub fn hub_for_host(&self, host: Option<&str>) -> String {
        if let Some(host) = host {
            let lower = host.to_ascii_lowercase();
            if self.hubs.contains_key(&lower) {
                return lower;
            }
            let hp = util::host_part(&lower);
            let mut matches = self.hubs.keys().filter(|k| util::host_part(k) == hp);
            if let (Some(k), None) = (matches.next(), matches.next()) {
                return k.clone();
            }
        }
        self.default_hub.to_ascii_lowercase()
    }

    /// The hub named `name`, created empty if unknown.
    pub fn hub_mut(&mut self, name: &str) -> &mut Hub {
        self.hubs
            .entry(name.to_ascii_lowercase())
            .or_insert_with(|| Hub {
                name: name.to_string(),
                devices: BTreeMap::new(),
            })
    }

    /// CAs the hubs trust: explicit ones plus every X.509 group enrollment CA.
    pub fn hub_trusted_cas(&self) -> Vec<X509> {
        let mut cas = self.trusted_cas.clone();
        cas.extend(self.dps_issuing_ca.iter().map(|ca| ca.ca.cert.clone()));
        for g in self.groups.values() {
            if let GroupCred::X509 { cas: group_cas } = &g.cred {
                cas.extend(group_cas.iter().cloned());
            }
        }
        cas
    }

    /// Adds (or replaces) an individual enrollment.
    pub fn add_individual(&mut self, spec: IndividualEnrollment) -> Result<(), EmulatorError> {
        let rec = IndividualRec::from_spec(spec)?;
        self.individual
            .insert(rec.spec.registration_id.clone(), rec);
        Ok(())
    }

    /// Adds (or replaces) a group enrollment.
    pub fn add_group(&mut self, spec: GroupEnrollment) -> Result<(), EmulatorError> {
        let rec = GroupRec::from_spec(spec)?;
        self.groups.insert(rec.spec.group_id.clone(), rec);
        Ok(())
    }

    /// Adds a CA bundle to the hubs' trust.
    pub fn add_trusted_ca(&mut self, pem: &str) -> Result<(), EmulatorError> {
        self.trusted_cas.extend(pki::parse_pem_bundle(pem)?);
        Ok(())
    }

    /// Adds (or replaces, keeping modules and generation ID) a device in a hub.
    pub fn add_device(&mut self, spec: DeviceSpec) -> Result<Value, EmulatorError> {
        if spec.device_id.is_empty() {
            return Err(invalid("device_id must not be empty"));
        }
        let auth = match spec.authentication {
            DeviceAuthSpec::Sas {
                primary_key,
                secondary_key,
            } => HubAuth::sas(
                primary_key
                    .map(|k| valid_key(&k, "primary_key"))
                    .transpose()?,
                secondary_key
                    .map(|k| valid_key(&k, "secondary_key"))
                    .transpose()?,
            ),
            DeviceAuthSpec::SelfSigned {
                primary_thumbprint,
                secondary_thumbprint,
                cert_pem,
            } => {
                let from_cert = cert_pem
                    .map(|pem| pki::parse_pem_bundle(&pem).map(|c| pki::thumbprints(&c[0]).1))
                    .transpose()?;
                let primary = primary_thumbprint.or(from_cert);
                if primary.is_none() && secondary_thumbprint.is_none() {
                    return Err(invalid(
                        "self_signed needs primary_thumbprint, secondary_thumbprint or cert_pem",
                    ));
                }
                HubAuth::SelfSigned {
                    primary,
                    secondary: secondary_thumbprint,
                }
            }
            DeviceAuthSpec::CertificateAuthority { ca_pem } => {
                if let Some(pem) = ca_pem {
                    self.add_trusted_ca(&pem)?;
                }
                HubAuth::CertificateAuthority
            }
        };
        let hub_name = spec.hub.unwrap_or_else(|| self.default_hub.clone());
        Ok(self.upsert_device(&hub_name, &spec.device_id, auth, spec.iot_edge))
    }

    /// Creates or updates a device; returns its JSON.
    pub fn upsert_device(
        &mut self,
        hub: &str,
        device_id: &str,
        auth: HubAuth,
        iot_edge: bool,
    ) -> Value {
        let etag = self.next_etag();
        let hub = self.hub_mut(hub);
        let dev = hub
            .devices
            .entry(device_id.to_string())
            .or_insert_with(|| Device {
                device_id: device_id.to_string(),
                generation_id: util::random_generation_id(),
                etag: String::new(),
                auth: HubAuth::None,
                iot_edge,
                modules: BTreeMap::new(),
            });
        dev.etag = etag;
        dev.auth = auth;
        dev.iot_edge = iot_edge;
        dev.to_json()
    }

    /// Authenticates a DPS request for `registration_id` (spec 9.1, 9.4). On failure the
    /// error says why (for the log; it contains no secrets).
    pub fn authenticate_registration(
        &self,
        registration_id: &str,
        cred: &Credential,
        now: u64,
    ) -> Result<Attested, String> {
        let resource = format!("{}/registrations/{}", self.id_scope, registration_id);
        let individual = self.individual.get(registration_id);
        match cred {
            Credential::None => Err("no credential".to_string()),
            Credential::Sas(Err(e)) => Err(e.to_string()),
            Credential::Sas(Ok(token)) => {
                let audience = |t: &SasToken| t.check_exact_audience(&resource);
                if let Some(rec) = individual {
                    if let IndividualCred::Tpm { ek } = &rec.cred {
                        return self.authenticate_tpm_sas(rec, ek, token, &resource, now);
                    }
                    let IndividualCred::Sas { primary, secondary } = &rec.cred else {
                        return Err("enrollment does not use symmetric keys".to_string());
                    };
                    let keys = std::iter::once(primary.as_str()).chain(secondary.as_deref());
                    token
                        .verify(now, audience, Some("registration"), keys)
                        .map_err(|e| e.to_string())?;
                    return Ok(Attested {
                        device_auth: HubAuth::sas(Some(primary.clone()), secondary.clone()),
                        attestation_field: "symmetricKey",
                        group_id: None,
                        source: format!("individual:{registration_id}"),
                        device_id: rec
                            .spec
                            .device_id
                            .clone()
                            .unwrap_or_else(|| registration_id.to_string()),
                        assigned_hub: rec.spec.assigned_hub.clone(),
                        payload: rec.spec.payload.clone(),
                        iot_edge: rec.spec.iot_edge,
                        tpm: None,
                    });
                }
                let mut last_err = "no enrollment for this registration ID".to_string();
                for g in self.groups.values() {
                    let GroupCred::Sas { primary, secondary } = &g.cred else {
                        continue;
                    };
                    let derive = |k: &str| crate::sas::derive_device_key(k, registration_id);
                    let Some(dp) = derive(primary) else { continue };
                    let ds = secondary.as_deref().and_then(derive);
                    let keys = std::iter::once(dp.as_str()).chain(ds.as_deref());
                    match token.verify(now, audience, Some("registration"), keys) {
                        Ok(()) => {
                            return Ok(Attested {
                                device_auth: HubAuth::sas(Some(dp.clone()), ds.clone()),
                                attestation_field: "symmetricKey",
                                group_id: Some(g.spec.group_id.clone()),
                                source: format!("group:{}", g.spec.group_id),
                                device_id: registration_id.to_string(),
                                assigned_hub: g.spec.assigned_hub.clone(),
                                payload: g.spec.payload.clone(),
                                iot_edge: g.spec.iot_edge,
                                tpm: None,
                            })
                        }
                        Err(e) => last_err = e.to_string(),
                    }
                }
                Err(last_err)
            }
            Credential::X509(chain) => {
                let cn = pki::leaf_cn(&chain.leaf);
                if cn.as_deref() != Some(registration_id) {
                    return Err(
                        "client certificate CN does not match the registration ID".to_string()
                    );
                }
                let (_, sha256) = pki::thumbprints(&chain.leaf);
                let self_signed = HubAuth::SelfSigned {
                    primary: Some(sha256),
                    secondary: None,
                };
                if let Some(rec) = individual {
                    let IndividualCred::X509 { certs, thumbprints } = &rec.cred else {
                        return Err("enrollment does not use X.509".to_string());
                    };
                    let leaf_der = chain.leaf.to_der().unwrap_or_default();
                    let matches = certs
                        .iter()
                        .any(|c| c.to_der().map(|d| d == leaf_der).unwrap_or(false))
                        || thumbprints
                            .iter()
                            .any(|t| pki::thumbprint_matches(&chain.leaf, t));
                    if !matches {
                        return Err("client certificate is not the enrolled one".to_string());
                    }
                    if !pki::within_validity(&chain.leaf) {
                        return Err("client certificate is outside its validity period".to_string());
                    }
                    return Ok(Attested {
                        device_auth: self_signed,
                        attestation_field: "x509",
                        group_id: None,
                        source: format!("individual:{registration_id}"),
                        device_id: rec
                            .spec
                            .device_id
                            .clone()
                            .unwrap_or_else(|| registration_id.to_string()),
                        assigned_hub: rec.spec.assigned_hub.clone(),
                        payload: rec.spec.payload.clone(),
                        iot_edge: rec.spec.iot_edge,
                        tpm: None,
                    });
                }
                for g in self.groups.values() {
                    let GroupCred::X509 { cas } = &g.cred else {
                        continue;
                    };
                    if pki::chain_verifies(&chain.leaf, &chain.intermediates, cas) {
                        return Ok(Attested {
                            device_auth: HubAuth::CertificateAuthority,
                            attestation_field: "x509",
                            group_id: Some(g.spec.group_id.clone()),
                            source: format!("group:{}", g.spec.group_id),
                            device_id: registration_id.to_string(),
                            assigned_hub: g.spec.assigned_hub.clone(),
                            payload: g.spec.payload.clone(),
                            iot_edge: g.spec.iot_edge,
                            tpm: None,
                        });
                    }
                }
                Err("no enrollment accepts this client certificate".to_string())
            }
        }
    }

    /// Verifies the SAS token of a TPM registration with the HMAC key DPS last issued to it.
    fn authenticate_tpm_sas(
        &self,
        rec: &IndividualRec,
        enrolled_ek: &tpm::Public,
        token: &SasToken,
        resource: &str,
        now: u64,
    ) -> Result<Attested, String> {
        let reg_id = &rec.spec.registration_id;
        let issued = self
            .tpm_keys
            .get(reg_id)
            .filter(|t| t.ek.same_key(enrolled_ek))
            .ok_or_else(|| {
                "no TPM authentication key has been issued for this registration ID \
                 (register with tpm.endorsementKey and no Authorization first)"
                    .to_string()
            })?;
        let key = util::b64(&issued.hmac_key);
        token
            .verify(
                now,
                |t| t.check_exact_audience(resource),
                Some("registration"),
                [key.as_str()],
            )
            .map_err(|e| e.to_string())?;
        Ok(Attested {
            device_auth: HubAuth::sas(Some(key), None),
            attestation_field: "tpm",
            group_id: None,
            source: format!("individual:{reg_id}"),
            device_id: rec.spec.device_id.clone().unwrap_or_else(|| reg_id.clone()),
            assigned_hub: rec.spec.assigned_hub.clone(),
            payload: rec.spec.payload.clone(),
            iot_edge: rec.spec.iot_edge,
            tpm: Some(issued.clone()),
        })
    }

    /// First step of TPM registration (spec 9.7): checks the device's EK against its
    /// enrollment and issues a fresh HMAC key, returned as the `authenticationKey` blob only
    /// that TPM can import. The key replaces any earlier one for this registration ID.
    pub fn tpm_challenge(
        &mut self,
        registration_id: &str,
        seen: &TpmSeen,
    ) -> Result<Vec<u8>, TpmReject> {
        let ek = tpm::Public::parse_b64(&seen.endorsement_key, "tpm.endorsementKey")?;
        let srk = tpm::Public::parse_b64(&seen.storage_root_key, "tpm.storageRootKey")?;
        let rec = self
            .individual
            .get(registration_id)
            .ok_or_else(|| TpmReject::NoEnrollment(registration_id.to_string()))?;
        let IndividualCred::Tpm { ek: enrolled } = &rec.cred else {
            return Err(TpmReject::NotTpm(registration_id.to_string()));
        };
        if !enrolled.same_key(&ek) {
            return Err(TpmReject::EkMismatch(registration_id.to_string()));
        }
        let hmac_key = util::random_bytes(tpm::HMAC_KEY_SIZE);
        let blob = tpm::authentication_key_blob(&ek, &srk, &hmac_key)?;
        self.tpm_keys.insert(
            registration_id.to_string(),
            TpmAssign {
                hmac_key,
                ek,
                srk,
                seen: seen.clone(),
            },
        );
        Ok(blob)
    }

    /// Authenticates a Hub request as device `device_id` of hub `hub_key`, accessing
    /// `resource` (`<hub>/devices/<id>[/...]`).
    pub fn authenticate_device(
        &self,
        hub_key: &str,
        device_id: &str,
        resource_suffix: &str,
        cred: &Credential,
        now: u64,
    ) -> Result<(), String> {
        let hub = self.hubs.get(hub_key).ok_or("unknown hub")?;
        let device = hub
            .devices
            .get(device_id)
            .ok_or("device not registered in this hub")?;
        match cred {
            Credential::None => Err("no credential".to_string()),
            Credential::Sas(Err(e)) => Err(e.to_string()),
            Credential::Sas(Ok(token)) => {
                let HubAuth::Sas { primary, secondary } = &device.auth else {
                    return Err("device does not use SAS authentication".to_string());
                };
                let device_resource = format!("{}/devices/{}", hub.name, device_id);
                let resource = format!("{device_resource}{resource_suffix}");
                token
                    .verify(
                        now,
                        |t| t.check_prefix_audience(&resource, &device_resource),
                        None,
                        [primary.as_str(), secondary.as_str()],
                    )
                    .map_err(|e| e.to_string())
            }
            Credential::X509(chain) => match &device.auth {
                HubAuth::SelfSigned { primary, secondary } => {
                    let ok = [primary, secondary]
                        .into_iter()
                        .flatten()
                        .any(|t| pki::thumbprint_matches(&chain.leaf, t));
                    if !ok {
                        Err("client certificate thumbprint does not match".to_string())
                    } else if !pki::within_validity(&chain.leaf) {
                        Err("client certificate is outside its validity period".to_string())
                    } else {
                        Ok(())
                    }
                }
                HubAuth::CertificateAuthority => {
                    if pki::leaf_cn(&chain.leaf).as_deref() != Some(device_id) {
                        Err("client certificate CN is not the device ID".to_string())
                    } else if !pki::chain_verifies(
                        &chain.leaf,
                        &chain.intermediates,
                        &self.hub_trusted_cas(),
                    ) {
                        Err("client certificate does not chain to a trusted CA".to_string())
                    } else {
                        Ok(())
                    }
                }
                _ => Err("device does not use X.509 authentication".to_string()),
            },
        }
    }

    /// Admin view of all enrollments (no keys).
    pub fn enrollments_json(&self) -> Value {
        let individual: Vec<Value> = self
            .individual
            .values()
            .map(|r| {
                json!({
                    "registration_id": r.spec.registration_id,
                    "device_id": r.spec.device_id,
                    "assigned_hub": r.spec.assigned_hub,
                    "attestation": match r.cred {
                        IndividualCred::Sas { .. } => "symmetric_key",
                        IndividualCred::X509 { .. } => "x509",
                        IndividualCred::Tpm { .. } => "tpm",
                    },
                })
            })
            .collect();
        let groups: Vec<Value> = self
            .groups
            .values()
            .map(|g| {
                json!({
                    "group_id": g.spec.group_id,
                    "assigned_hub": g.spec.assigned_hub,
                    "attestation": match g.cred { GroupCred::Sas { .. } => "symmetric_key", GroupCred::X509 { .. } => "x509" },
                })
            })
            .collect();
        json!({ "individual": individual, "groups": groups })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_json_roundtrip_and_key_generation() {
        let a = HubAuth::from_json(Some(&json!({"type": "sas"})))
            .unwrap()
            .unwrap();
        let HubAuth::Sas { primary, secondary } = &a else {
            panic!("expected sas")
        };
        assert_eq!(util::b64_decode(primary).unwrap().len(), 32);
        assert_ne!(primary, secondary);
        let back = HubAuth::from_json(Some(&a.to_json())).unwrap().unwrap();
        assert_eq!(back, a);
        assert!(HubAuth::from_json(Some(&json!({"type": "weird"}))).is_err());
        assert!(HubAuth::from_json(Some(
            &json!({"type": "sas", "symmetricKey": {"primaryKey": "!!"}})
        ))
        .is_err());
        assert_eq!(HubAuth::from_json(Some(&Value::Null)).unwrap(), None);
    }

    #[test]
    fn hub_selection_by_host() {
        let mut s = State::new("scope".into(), "localhost:8443".into(), 1, 1);
        s.hub_mut("127.0.0.1:8443");
        assert_eq!(s.hub_for_host(Some("LOCALHOST:8443")), "localhost:8443");
        assert_eq!(s.hub_for_host(Some("127.0.0.1:8443")), "127.0.0.1:8443");
        assert_eq!(s.hub_for_host(Some("127.0.0.1")), "127.0.0.1:8443");
        assert_eq!(s.hub_for_host(Some("gateway.local")), "localhost:8443");
        assert_eq!(s.hub_for_host(None), "localhost:8443");
    }

    #[test]
    fn faults_are_consumed_in_order() {
        let mut s = State::new("scope".into(), "h".into(), 1, 1);
        s.add_fault(FaultSpec {
            target: Target::Dps,
            status: 429,
            count: 2,
            retry_after_secs: Some(3),
        })
        .unwrap();
        assert!(s.take_fault(Target::Hub).is_none());
        assert_eq!(s.take_fault(Target::Dps).unwrap().status, 429);
        assert_eq!(s.take_fault(Target::Dps).unwrap().status, 429);
        assert!(s.take_fault(Target::Dps).is_none());
        assert!(s
            .add_fault(FaultSpec {
                target: Target::Dps,
                status: 200,
                count: 1,
                retry_after_secs: None
            })
            .is_err());
    }
}
