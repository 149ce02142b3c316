//! An identityd stand-in for tests that call edged's service directly: device `device` in hub
//! `hub`, and any module identity asked for (generation 1, no key).

use edged::identity::{DeviceIdentity, IdentityClient, ModuleIdentity};
use http_common::ClientError;

pub struct FakeIdentity;

impl IdentityClient for FakeIdentity {
    async fn get_device(&self) -> Result<DeviceIdentity, ClientError> {
        Ok(DeviceIdentity {
            hub_name: "hub".into(),
            gateway_host: "hub".into(),
            device_id: "device".into(),
        })
    }
    async fn reprovision(&self) -> Result<(), ClientError> {
        Ok(())
    }
    async fn list_modules(&self) -> Result<Vec<ModuleIdentity>, ClientError> {
        Ok(Vec::new())
    }
    async fn create_module(&self, module_id: &str) -> Result<ModuleIdentity, ClientError> {
        self.get_module(module_id).await
    }
    async fn get_module(&self, module_id: &str) -> Result<ModuleIdentity, ClientError> {
        Ok(ModuleIdentity {
            module_id: module_id.into(),
            gen_id: "1".into(),
            key_handle: None,
            local: false,
        })
    }
    async fn update_module(&self, module_id: &str) -> Result<ModuleIdentity, ClientError> {
        self.get_module(module_id).await
    }
    async fn delete_module(&self, _: &str) -> Result<(), ClientError> {
        Ok(())
    }
}
