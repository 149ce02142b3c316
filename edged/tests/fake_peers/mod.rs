//! Stand-ins for edged's peers in tests that call edged's service directly: a Docker engine
//! served on a socket by the test's own handler, and an identityd with device `device` in hub
//! `hub` that hands out any module identity asked for (generation 1, no key).

use std::path::Path;
use std::sync::Arc;

use edged::identity::{DeviceIdentity, IdentityClient, ModuleIdentity};
use http_common::ClientError;

/// Serves `engine` on a new Unix socket at `socket`, on the current runtime, until the test ends.
pub fn serve_engine<H: http_common::Handler>(socket: &Path, engine: Arc<H>) {
    let listener = http_common::listener::listen(
        &http_common::listener::ListenerUri::Unix(socket.to_owned()),
        &http_common::listener::SystemdFds::default(),
        None,
        0o600,
    )
    .unwrap();
    tokio::spawn(http_common::serve(
        listener,
        engine,
        http_common::ServerOptions::default(),
        std::future::pending(),
    ));
}

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
