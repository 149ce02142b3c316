//! Module reconciliation with the principals (spec 6.4).

use super::{Device, IdentityService, Settings};
use crate::cloud::hub;
use crate::config::IdType;
use crate::error::IdentityError;

impl IdentityService {
    /// Module reconciliation (spec 6.4).
    pub(super) async fn reconcile(
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
}
