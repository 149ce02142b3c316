//! The TPM itself, through tss-esapi: synchronous calls on one ESAPI context, made only from the
//! TPM thread ([`super::Tpm`]).
//!
//! Objects (TPM 2.0, TCG EK Credential Profile and Provisioning Guidance):
//! - endorsement key at 0x81010001: RSA 2048 from the TCG default template L-1 (policy A, so
//!   using it needs a PolicySecret session on the endorsement hierarchy);
//! - storage root key at 0x81000001: RSA 2048 restricted decryption key, AES-128-CFB,
//!   userWithAuth, noDA;
//! - authentication key at `0x81000000 + auth_key_index`: the HMAC key DPS sends, imported
//!   under the SRK.
//!
//! Absent EK and SRK are created and persisted (owner authorization), as the reference does.

use std::str::FromStr;

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, PersistentTpmHandle, TpmHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Auth, Data, Digest, EncryptedSecret, IdObject, MaxBuffer, Nonce, Private, Public, PublicBuffer,
    PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder, RsaExponent, RsaScheme,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::{DeviceConfig, TctiNameConf};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

use super::config::{TpmConfig, ENDORSEMENT_KEY_HANDLE, STORAGE_ROOT_KEY_HANDLE};
use super::TpmError;

/// The most bytes one TPM2_HMAC takes (TPM2B_MAX_BUFFER).
pub const MAX_SIGN_DATA: usize = 1024;

/// Checks a TCTI string the way [`open`] will read it.
pub fn check_tcti(tcti: &str) -> Result<(), String> {
    tcti_name_conf(tcti).map(|_| ())
}

fn tcti_name_conf(tcti: &str) -> Result<TctiNameConf, String> {
    if tcti == "device" {
        // The kernel's resource manager when there is one (several TPM users can share it),
        // else the raw device; tpm2-tss's own default order.
        let path = if std::path::Path::new("/dev/tpmrm0").exists() {
            "/dev/tpmrm0"
        } else {
            "/dev/tpm0"
        };
        return DeviceConfig::from_str(path)
            .map(TctiNameConf::Device)
            .map_err(|error| error.to_string());
    }
    TctiNameConf::from_str(tcti).map_err(|_| {
        format!(
            "unsupported TCTI {tcti:?}: expected device[:PATH], swtpm[:host=H,port=P], \
             mssim[:host=H,port=P] or tabrmd[:bus_name=N,bus_type=session|system]"
        )
    })
}

/// An open TPM with its EK and SRK.
pub struct Device {
    context: Context,
    endorsement_key: KeyHandle,
    storage_root_key: KeyHandle,
    auth_key: Option<ObjectHandle>,
    auth_key_handle: u32,
}

fn tss(what: &'static str) -> impl Fn(tss_esapi::Error) -> TpmError {
    move |error| TpmError::Tss {
        what,
        reason: error.to_string(),
    }
}

fn persistent(handle: u32) -> tss_esapi::Result<Persistent> {
    PersistentTpmHandle::new(handle).map(Persistent::Persistent)
}

impl Device {
    /// Opens the TPM, sets the hierarchy authorizations, and finds (or creates and persists)
    /// the EK and SRK; finds the authentication key if one was imported before.
    pub fn open(config: &TpmConfig) -> Result<Device, TpmError> {
        let tcti = tcti_name_conf(&config.tcti).map_err(TpmError::Open)?;
        let mut context = Context::new(tcti)
            .map_err(|error| TpmError::Open(format!("TCTI {:?}: {error}", config.tcti)))?;
        for (hierarchy, secret) in [
            (Hierarchy::Endorsement, &config.endorsement_auth),
            (Hierarchy::Owner, &config.owner_auth),
        ] {
            let auth = Auth::try_from(secret.as_bytes().to_vec())
                .map_err(tss("setting a hierarchy authorization"))?;
            context
                .tr_set_auth(hierarchy.into(), auth)
                .map_err(tss("setting a hierarchy authorization"))?;
        }
        let endorsement_key = find_or_create(
            &mut context,
            ENDORSEMENT_KEY_HANDLE,
            Hierarchy::Endorsement,
            endorsement_key_template()?,
            "endorsement key",
        )?;
        let storage_root_key = find_or_create(
            &mut context,
            STORAGE_ROOT_KEY_HANDLE,
            Hierarchy::Owner,
            storage_root_key_template()?,
            "storage root key",
        )?;
        let auth_key_handle = config.auth_key_handle();
        let auth_key = find(&mut context, auth_key_handle).ok();
        if auth_key.is_some() {
            log::info!("TPM authentication key found at {auth_key_handle:#x}");
        }
        Ok(Device {
            context,
            endorsement_key: endorsement_key.into(),
            storage_root_key: storage_root_key.into(),
            auth_key,
            auth_key_handle,
        })
    }

    /// The EK's and SRK's public areas, each a marshalled TPM2B_PUBLIC.
    pub fn keys(&mut self) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
        let mut public = |key: KeyHandle| -> Result<Vec<u8>, TpmError> {
            let (public, _, _) = self
                .context
                .read_public(key)
                .map_err(tss("reading a public area"))?;
            PublicBuffer::try_from(public)
                .and_then(|buffer| buffer.marshall())
                .map_err(tss("marshalling a public area"))
        };
        Ok((
            public(self.endorsement_key)?,
            public(self.storage_root_key)?,
        ))
    }

    /// HMAC-SHA256 of `data` with the authentication key, computed in the TPM.
    pub fn sign(&mut self, data: &[u8]) -> Result<Vec<u8>, TpmError> {
        let key = self.auth_key.ok_or(TpmError::NoAuthKey {
            handle: self.auth_key_handle,
        })?;
        if data.len() > MAX_SIGN_DATA {
            return Err(TpmError::DataTooLong { len: data.len() });
        }
        let buffer = MaxBuffer::try_from(data.to_vec()).map_err(tss("passing the data"))?;
        let digest = self
            .context
            .execute_with_session(Some(AuthSession::Password), |context| {
                context.hmac(key, buffer, HashingAlgorithm::Sha256)
            })
            .map_err(tss("TPM2_HMAC with the authentication key"))?;
        Ok(digest.value().to_vec())
    }

    /// Imports the key DPS sent: activates the credential (EK, SRK) to recover the inner
    /// wrapping key, imports the duplicated HMAC key under the SRK with it, and persists it at
    /// the authentication key's handle, replacing the previous one.
    pub fn import(&mut self, blob: &[u8]) -> Result<(), TpmError> {
        let parts = AuthKeyBlob::parse(blob)?;
        let credential = IdObject::try_from(parts.credential_blob.to_vec())
            .map_err(|_| TpmError::BadKey("the credential blob is too large".into()))?;
        let secret = EncryptedSecret::try_from(parts.secret.to_vec())
            .map_err(|_| TpmError::BadKey("the credential secret is too large".into()))?;
        let duplicate = Private::try_from(parts.duplicate.to_vec())
            .map_err(|_| TpmError::BadKey("the duplicated key is too large".into()))?;
        let seed = EncryptedSecret::try_from(parts.seed.to_vec())
            .map_err(|_| TpmError::BadKey("the import seed is too large".into()))?;
        let public = PublicBuffer::unmarshall(parts.public)
            .and_then(Public::try_from)
            .map_err(|error| TpmError::BadKey(format!("the key's public area: {error}")))?;

        let inner = self.activate(credential, secret)?;
        let srk = self.storage_root_key;
        let encryption_key =
            Data::try_from(inner.value().to_vec()).map_err(tss("passing the inner key"))?;
        let private = self
            .context
            .execute_with_session(Some(AuthSession::Password), |context| {
                context.import(
                    srk.into(),
                    Some(encryption_key),
                    public.clone(),
                    duplicate,
                    seed,
                    SymmetricDefinitionObject::AES_128_CFB,
                )
            })
            .map_err(tss("TPM2_Import of the authentication key"))?;
        let loaded = self
            .context
            .execute_with_session(Some(AuthSession::Password), |context| {
                context.load(srk, private, public)
            })
            .map_err(tss("TPM2_Load of the authentication key"))?;

        if let Some(previous) = self.auth_key.take() {
            let evicted =
                self.context
                    .execute_with_session(Some(AuthSession::Password), |context| {
                        context.evict_control(
                            Provision::Owner,
                            previous,
                            persistent(self.auth_key_handle)?,
                        )
                    });
            if let Err(error) = evicted {
                // Another TPM user may have evicted it; the new key takes the handle anyway.
                log::warn!("could not evict the previous authentication key: {error}");
            }
        } else if let Ok(stale) = find(&mut self.context, self.auth_key_handle) {
            // A key persisted by another process since we looked.
            let _ = self
                .context
                .execute_with_session(Some(AuthSession::Password), |context| {
                    context.evict_control(
                        Provision::Owner,
                        stale,
                        persistent(self.auth_key_handle)?,
                    )
                });
        }
        let handle = self.auth_key_handle;
        let persisted = self
            .context
            .execute_with_session(Some(AuthSession::Password), |context| {
                context.evict_control(Provision::Owner, loaded.into(), persistent(handle)?)
            });
        let _ = self.context.flush_context(loaded.into());
        let persisted = persisted.map_err(tss("persisting the authentication key"))?;
        self.auth_key = Some(persisted);
        log::info!("TPM authentication key imported at {handle:#x}");
        Ok(())
    }

    /// TPM2_ActivateCredential with the SRK as the credentialed object and the EK as the
    /// decryption key (authorized by PolicySecret on the endorsement hierarchy).
    fn activate(
        &mut self,
        credential: IdObject,
        secret: EncryptedSecret,
    ) -> Result<Digest, TpmError> {
        let session = self
            .context
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(tss("starting the EK policy session"))?
            .ok_or_else(|| TpmError::Tss {
                what: "starting the EK policy session",
                reason: "no session returned".into(),
            })?;
        let result = self.activate_in(session, credential, secret);
        let _ = self.context.flush_context(ObjectHandle::from(
            tss_esapi::handles::SessionHandle::from(session),
        ));
        result
    }

    fn activate_in(
        &mut self,
        session: AuthSession,
        credential: IdObject,
        secret: EncryptedSecret,
    ) -> Result<Digest, TpmError> {
        let policy = PolicySession::try_from(session).map_err(tss("the EK policy session"))?;
        self.context
            .execute_with_session(Some(AuthSession::Password), |context| {
                context.policy_secret(
                    policy,
                    AuthHandle::Endorsement,
                    Nonce::default(),
                    Digest::default(),
                    Nonce::default(),
                    None,
                )
            })
            .map_err(tss("TPM2_PolicySecret on the endorsement hierarchy"))?;
        let (srk, ek) = (self.storage_root_key, self.endorsement_key);
        self.context
            .execute_with_sessions(
                (Some(AuthSession::Password), Some(session), None),
                |context| context.activate_credential(srk, ek, credential, secret),
            )
            .map_err(|error| TpmError::Activation(error.to_string()))
    }
}

/// The five parts of DPS's `authenticationKey`, in the order the reference client reads them:
/// TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET, TPM2B_PRIVATE, TPM2B_ENCRYPTED_SECRET, TPM2B_PUBLIC.
struct AuthKeyBlob<'a> {
    credential_blob: &'a [u8],
    secret: &'a [u8],
    duplicate: &'a [u8],
    seed: &'a [u8],
    /// The whole TPM2B_PUBLIC, size included.
    public: &'a [u8],
}

impl<'a> AuthKeyBlob<'a> {
    fn parse(mut blob: &'a [u8]) -> Result<Self, TpmError> {
        let mut next = |name: &str| -> Result<(&'a [u8], &'a [u8]), TpmError> {
            let missing = || TpmError::BadKey(format!("the key ends before its {name}"));
            let size = blob.get(..2).ok_or_else(missing)?;
            let size = usize::from(u16::from_be_bytes([size[0], size[1]]));
            let whole = blob.get(..2 + size).ok_or_else(missing)?;
            blob = &blob[2 + size..];
            Ok((&whole[2..], whole))
        };
        let (credential_blob, _) = next("credential blob")?;
        let (secret, _) = next("credential secret")?;
        let (duplicate, _) = next("duplicated key")?;
        let (seed, _) = next("import seed")?;
        let (_, public) = next("public area")?;
        if !blob.is_empty() {
            return Err(TpmError::BadKey(format!(
                "{} bytes follow the public area",
                blob.len()
            )));
        }
        Ok(AuthKeyBlob {
            credential_blob,
            secret,
            duplicate,
            seed,
            public,
        })
    }
}

fn find(context: &mut Context, handle: u32) -> Result<ObjectHandle, TpmError> {
    let tpm_handle = TpmHandle::Persistent(
        PersistentTpmHandle::new(handle).map_err(tss("naming a persistent handle"))?,
    );
    context
        .execute_without_session(|context| context.tr_from_tpm_public(tpm_handle))
        .map_err(tss("reading a persistent object"))
}

fn find_or_create(
    context: &mut Context,
    handle: u32,
    hierarchy: Hierarchy,
    template: Public,
    what: &'static str,
) -> Result<ObjectHandle, TpmError> {
    if let Ok(found) = find(context, handle) {
        return Ok(found);
    }
    log::info!("no {what} at {handle:#x}: creating and persisting one");
    let created = context
        .execute_with_session(Some(AuthSession::Password), |context| {
            context.create_primary(hierarchy, template, None, None, None, None)
        })
        .map_err(|error| TpmError::Tss {
            what: "TPM2_CreatePrimary",
            reason: format!("{what}: {error}"),
        })?;
    let transient: ObjectHandle = created.key_handle.into();
    let persisted = context.execute_with_session(Some(AuthSession::Password), |context| {
        context.evict_control(Provision::Owner, transient, persistent(handle)?)
    });
    let _ = context.flush_context(transient);
    persisted.map_err(|error| TpmError::Tss {
        what: "TPM2_EvictControl",
        reason: format!("{what}: {error}"),
    })
}

fn endorsement_key_template() -> Result<Public, TpmError> {
    tss_esapi::abstraction::ek::create_ek_public_from_default_template(
        tss_esapi::interface_types::algorithm::AsymmetricAlgorithm::Rsa,
        None,
    )
    .map_err(tss("the EK template"))
}

fn storage_root_key_template() -> Result<Public, TpmError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(tss("the SRK attributes"))?;
    let parameters = PublicRsaParametersBuilder::new()
        .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
        .with_scheme(RsaScheme::Null)
        .with_key_bits(RsaKeyBits::Rsa2048)
        .with_exponent(RsaExponent::default())
        .with_is_decryption_key(true)
        .with_restricted(true)
        .build()
        .map_err(tss("the SRK parameters"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_rsa_parameters(parameters)
        .with_rsa_unique_identifier(PublicKeyRsa::new_empty_with_size(RsaKeyBits::Rsa2048))
        .build()
        .map_err(tss("the SRK template"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_parts_are_split_in_the_reference_order() {
        let mut blob = Vec::new();
        for part in [&b"cred"[..], b"sec", b"dup", b"seed", b"public"] {
            blob.extend_from_slice(&(part.len() as u16).to_be_bytes());
            blob.extend_from_slice(part);
        }
        let parts = AuthKeyBlob::parse(&blob).unwrap();
        assert_eq!(parts.credential_blob, b"cred");
        assert_eq!(parts.secret, b"sec");
        assert_eq!(parts.duplicate, b"dup");
        assert_eq!(parts.seed, b"seed");
        assert_eq!(parts.public, b"\x00\x06public");

        let error = AuthKeyBlob::parse(&blob[..blob.len() - 1]).err().unwrap();
        assert!(error.to_string().contains("public area"), "{error}");
        blob.push(0);
        let error = AuthKeyBlob::parse(&blob).err().unwrap();
        assert!(error.to_string().contains("1 bytes follow"), "{error}");
    }

    #[test]
    fn tcti_strings() {
        assert!(check_tcti("device").is_ok());
        assert!(check_tcti("device:/dev/tpm0").is_ok());
        assert!(check_tcti("swtpm:host=127.0.0.1,port=2321").is_ok());
        assert!(check_tcti("swtpm").is_ok());
        assert!(check_tcti("nope").is_err());
    }
}
