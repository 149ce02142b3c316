//! [`Control`]: run-time control of a running emulator, used by the admin HTTP API and
//! directly by tests that embed the emulator in-process.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::{
    config::{DeviceSpec, FaultSpec, GroupEnrollment, IndividualEnrollment, SettingsPatch},
    state::{Device, LogEntry, Module, Settings, Shared},
    EmulatorError,
};

/// Handle for changing and inspecting emulator state at run time. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Control {
    shared: Arc<Shared>,
}

fn device_json(hub: &str, d: &Device) -> Value {
    let mut v = d.to_json();
    if let Some(map) = v.as_object_mut() {
        map.insert("hub".to_string(), json!(hub));
        map.insert(
            "modules".to_string(),
            Value::Array(d.modules.values().map(Module::to_json).collect()),
        );
    }
    v
}

impl Control {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Control { shared }
    }

    /// Adds or replaces an individual enrollment.
    pub fn add_individual_enrollment(&self, e: IndividualEnrollment) -> Result<(), EmulatorError> {
        self.shared.lock().add_individual(e)
    }

    /// Removes an individual enrollment; false if it did not exist.
    pub fn remove_individual_enrollment(&self, registration_id: &str) -> bool {
        self.shared
            .lock()
            .individual
            .remove(registration_id)
            .is_some()
    }

    /// Adds or replaces a group enrollment.
    pub fn add_group_enrollment(&self, g: GroupEnrollment) -> Result<(), EmulatorError> {
        self.shared.lock().add_group(g)
    }

    /// Sets (or, with `None`, removes) the certificate issuance policy of an enrollment
    /// (registration ID or group ID): its registrations that send a CSR get a certificate valid
    /// for `validity_secs`.
    pub fn set_certificate_issuance(&self, enrollment: &str, validity_secs: Option<u64>) {
        let mut state = self.shared.lock();
        match validity_secs {
            Some(secs) => state.issuance.insert(enrollment.to_owned(), secs),
            None => state.issuance.remove(enrollment),
        };
    }

    /// The PEM of the CA DPS issues device certificates from.
    pub fn dps_issuing_ca_pem(&self) -> String {
        self.shared
            .lock()
            .dps_issuing_ca
            .as_ref()
            .map(crate::pki::TestCa::cert_pem)
            .unwrap_or_default()
    }

    /// Removes a group enrollment; false if it did not exist.
    pub fn remove_group_enrollment(&self, group_id: &str) -> bool {
        self.shared.lock().groups.remove(group_id).is_some()
    }

    /// Enrollments without key material:
    /// `{"individual": [{registration_id, device_id, assigned_hub, attestation}], "groups": [...]}`.
    pub fn enrollments(&self) -> Value {
        self.shared.lock().enrollments_json()
    }

    /// DPS registration records (who was assigned where, how often, last device payload).
    pub fn registrations(&self) -> Vec<Value> {
        self.shared
            .lock()
            .registrations
            .values()
            .map(|r| serde_json::to_value(r).unwrap_or(Value::Null))
            .collect()
    }

    /// Adds a device to a hub (or replaces its authentication, keeping modules and
    /// generation ID). Returns the device JSON (Hub shape plus `hub` and `modules`).
    pub fn add_device(&self, d: DeviceSpec) -> Result<Value, EmulatorError> {
        let mut st = self.shared.lock();
        let hub = st.hub_key(d.hub.as_deref());
        let id = d.device_id.clone();
        st.add_device(d)?;
        let h = st
            .hubs
            .get(&hub)
            .ok_or_else(|| EmulatorError::NotFound(format!("hub {hub}")))?;
        let dev = h
            .devices
            .get(&id)
            .ok_or_else(|| EmulatorError::NotFound(format!("device {id}")))?;
        Ok(device_json(&h.name, dev))
    }

    /// Removes a device (with its modules) from a hub (`None`: the default hub).
    pub fn remove_device(&self, hub: Option<&str>, device_id: &str) -> bool {
        let mut st = self.shared.lock();
        let key = st.hub_key(hub);
        st.hubs
            .get_mut(&key)
            .and_then(|h| h.devices.remove(device_id))
            .is_some()
    }

    /// One device (`hub = None`: the default hub).
    pub fn device(&self, hub: Option<&str>, device_id: &str) -> Option<Value> {
        let st = self.shared.lock();
        let h = st.hubs.get(&st.hub_key(hub))?;
        h.devices.get(device_id).map(|d| device_json(&h.name, d))
    }

    /// Devices of one hub, or of every hub when `hub` is `None`.
    pub fn devices(&self, hub: Option<&str>) -> Vec<Value> {
        let st = self.shared.lock();
        let wanted = hub.map(|h| st.hub_key(Some(h)));
        st.hubs
            .iter()
            .filter(|(k, _)| wanted.as_ref().is_none_or(|w| w == *k))
            .flat_map(|(_, h)| h.devices.values().map(|d| device_json(&h.name, d)))
            .collect()
    }

    /// Modules of a device (`hub = None`: the default hub); `None` if the device is unknown.
    pub fn modules(&self, hub: Option<&str>, device_id: &str) -> Option<Vec<Value>> {
        let st = self.shared.lock();
        let h = st.hubs.get(&st.hub_key(hub))?;
        h.devices
            .get(device_id)
            .map(|d| d.modules.values().map(Module::to_json).collect())
    }

    /// Names of the hubs known so far (the default hub first is not guaranteed).
    pub fn hubs(&self) -> Vec<String> {
        self.shared
            .lock()
            .hubs
            .values()
            .map(|h| h.name.clone())
            .collect()
    }

    /// Adds CA certificates (PEM bundle) that hubs trust for `certificateAuthority` devices.
    pub fn add_trusted_ca(&self, pem: &str) -> Result<(), EmulatorError> {
        self.shared.lock().add_trusted_ca(pem)
    }

    /// Queues an injected fault.
    pub fn add_fault(&self, f: FaultSpec) -> Result<(), EmulatorError> {
        self.shared.lock().add_fault(f)
    }

    /// Pending injected faults.
    pub fn faults(&self) -> Vec<FaultSpec> {
        self.shared.lock().faults.iter().cloned().collect()
    }

    /// Drops all pending faults.
    pub fn clear_faults(&self) {
        self.shared.lock().faults.clear();
    }

    /// Current run-time settings.
    pub fn settings(&self) -> Settings {
        self.shared.lock().settings.clone()
    }

    /// Changes run-time settings; returns the new settings.
    pub fn patch_settings(&self, patch: SettingsPatch) -> Result<Settings, EmulatorError> {
        let mut st = self.shared.lock();
        st.patch_settings(patch)?;
        Ok(st.settings.clone())
    }

    /// The request log (DPS and Hub requests), oldest first.
    pub fn requests(&self) -> Vec<LogEntry> {
        self.shared.lock().log()
    }

    /// Clears the request log.
    pub fn clear_requests(&self) {
        self.shared.lock().clear_log();
    }
}
