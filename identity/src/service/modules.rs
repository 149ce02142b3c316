//! Module identities: derived keys, the module cache, Hub module writes and reads, and the
//! module routes' operations (aziot and local).

use std::sync::Arc;

use identity_api::{AuthInfo, AziotSpec, Identity, KeyHandle, LocalSpec};

use super::{
    b64, lock, CallerKind, Device, IdentityService, Reconciliation, MASTER_KEY_ID, MODULE_WAIT,
};
use crate::cloud::hub::{self, HubModule, HubTarget};
use crate::cloud::CloudError;
use crate::config::IdType;
use crate::error::IdentityError;
use crate::state::CachedModule;

/// The longest module ID IoT Hub accepts.
const MODULE_ID_MAX: usize = 128;
/// The characters besides ASCII letters and digits IoT Hub accepts in a module ID.
const MODULE_ID_SPECIALS: &str = "-:.+%_#*?!(),=@;$'";

impl IdentityService {
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

    pub(super) fn cache(
        &self,
        device: &Device,
        module: &HubModule,
    ) -> Result<CachedModule, IdentityError> {
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
    pub(super) async fn create_hub_module(
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

    /// IoT Hub's rule for module IDs: 1 to 128 ASCII letters, digits and `-:.+%_#*?!(),=@;$'`.
    /// Checked when a module is created through the API, so a bad ID is a 400 from identityd
    /// rather than a 502 from the hub, and every such ID can also name its cache file (module
    /// principals from the config are not checked here).
    fn check_module_id(module_id: &str) -> Result<(), IdentityError> {
        if module_id.is_empty() {
            return Err(IdentityError::BadRequest(
                "parameter \"moduleId\" must not be empty".to_owned(),
            ));
        }
        if module_id.len() > MODULE_ID_MAX {
            return Err(IdentityError::BadRequest(format!(
                "parameter \"moduleId\" is longer than {MODULE_ID_MAX} characters"
            )));
        }
        if let Some(bad) = module_id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || MODULE_ID_SPECIALS.contains(*c)))
        {
            return Err(IdentityError::BadRequest(format!(
                "parameter \"moduleId\" has the character {bad:?}; IoT Hub allows ASCII letters, \
                 digits and {MODULE_ID_SPECIALS}"
            )));
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
        let (device, _) = self.device_for_module_read().await?;
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
        let (device, reconciliation) = self.device_for_module_read().await?;
        let module = match self.observe_hub(self.read_module(&device, module_id).await) {
            Err(IdentityError::ModuleNotFound(_))
                if reconciliation != Reconciliation::Done
                    && self.is_module_principal(module_id) =>
            {
                let reason = match reconciliation {
                    Reconciliation::Failed(reason) => reason,
                    _ => format!(
                        "module reconciliation is still running after {} s",
                        MODULE_WAIT.as_secs()
                    ),
                };
                return Err(IdentityError::ModuleNotReconciled {
                    module: module_id.to_owned(),
                    reason,
                });
            }
            result => result?,
        };
        self.module_identity(&device, &module).await
    }

    /// The device for a module read, after waiting (bounded by [`MODULE_WAIT`] from now, the
    /// device wait included) for the current round's module reconciliation, with where that
    /// reconciliation stands. The device is read again after the wait: the round may have moved
    /// it.
    async fn device_for_module_read(&self) -> Result<(Arc<Device>, Reconciliation), IdentityError> {
        let deadline = tokio::time::Instant::now() + MODULE_WAIT;
        self.device().await?;
        let reconciliation = self.reconciled(deadline).await;
        Ok((self.device().await?, reconciliation))
    }

    /// Whether `module_id` is a configured principal with a module identity (reconciliation
    /// creates those).
    fn is_module_principal(&self, module_id: &str) -> bool {
        self.settings()
            .principals
            .iter()
            .any(|principal| principal.name == module_id && principal.has(IdType::Module))
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

#[cfg(test)]
mod tests {
    use super::*;

    type Service = IdentityService;

    #[test]
    fn module_ids_follow_iot_hubs_rule() {
        for good in [
            "m",
            "$edgeAgent",
            "a-b:c.d+e%f_g#h*i?j!k(l)m,n=o@p;q$r's",
            &"x".repeat(128),
        ] {
            assert!(Service::check_module_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            &"x".repeat(129),
            "a/b",
            "a b",
            "mödule",
            "a\u{0}b",
            "a\"b",
        ] {
            let error = Service::check_module_id(bad).unwrap_err();
            assert!(
                matches!(error, IdentityError::BadRequest(_)),
                "{bad}: {error:?}"
            );
        }
    }
}
