//! The TPM service (the reference's aziot-tpmd API, served by keyd on the tpmd socket).
//!
//! One thread owns the one ESAPI context ([`device::Device`]); requests reach it over a channel
//! and wait for its answer, so TPM commands never run on the async threads and never overlap.
//! The TPM is opened on the first request, not at start: every device gets a tpmd
//! configuration (the reference's `config apply` writes one for all), but only TPM-attested
//! devices have, or use, a TPM. A failed open is reported to that request and retried on the
//! next.

pub mod config;
mod device;
pub mod routes;

use std::sync::mpsc;

use tokio::sync::oneshot;

pub use config::TpmConfig;
pub use device::MAX_SIGN_DATA;

/// Why a TPM request failed.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The TPM could not be opened (TCTI, device, simulator).
    #[error("the TPM could not be opened: {0}")]
    Open(String),
    /// A TPM command failed.
    #[error("TPM error while {what}: {reason}")]
    Tss {
        /// The step.
        what: &'static str,
        /// tss-esapi's account (a TPM response code).
        reason: String,
    },
    /// No authentication key has been imported.
    #[error("no TPM authentication key at {handle:#x}: import one first (POST /import_auth_key)")]
    NoAuthKey {
        /// Its persistent handle.
        handle: u32,
    },
    /// The key to import is malformed.
    #[error("the authentication key to import is malformed: {0}")]
    BadKey(String),
    /// ActivateCredential refused the credential: it was made for another EK or SRK.
    #[error(
        "the TPM refused the authentication key's credential (made for another endorsement or \
         storage root key?): {0}"
    )]
    Activation(String),
    /// More data than one TPM2_HMAC takes.
    #[error("data is {len} bytes; the TPM signs at most {MAX_SIGN_DATA}")]
    DataTooLong {
        /// The length given.
        len: usize,
    },
    /// The TPM thread is gone.
    #[error("the TPM thread stopped")]
    Stopped,
}

type Job = Box<dyn FnOnce(&mut Option<device::Device>, &TpmConfig) + Send>;

/// The handle requests use; cheap to share.
#[derive(Debug)]
pub struct Tpm {
    jobs: mpsc::Sender<Job>,
}

impl Tpm {
    /// Starts the TPM thread (the TPM is opened by the first request).
    pub fn start(config: TpmConfig) -> std::io::Result<Tpm> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tpm".into())
            .spawn(move || {
                let mut device = None;
                for job in queue {
                    job(&mut device, &config);
                }
            })?;
        Ok(Tpm { jobs })
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut device::Device) -> Result<T, TpmError> + Send + 'static,
    ) -> Result<T, TpmError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |device, config| {
            if device.is_none() {
                match device::Device::open(config) {
                    Ok(opened) => *device = Some(opened),
                    Err(error) => {
                        let _ = reply.send(Err(error));
                        return;
                    }
                }
            }
            let result = device.as_mut().map_or(Err(TpmError::Stopped), work);
            if matches!(result, Err(TpmError::Tss { .. })) {
                // The context may be unusable (a TPM or simulator restart): open afresh next time.
                *device = None;
            }
            let _ = reply.send(result);
        });
        self.jobs.send(job).map_err(|_| TpmError::Stopped)?;
        answer.await.map_err(|_| TpmError::Stopped)?
    }

    /// The EK's and SRK's TPM2B_PUBLIC.
    pub async fn keys(&self) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
        self.run(device::Device::keys).await
    }

    /// Imports DPS's `authenticationKey` blob as the authentication key.
    pub async fn import_auth_key(&self, blob: Vec<u8>) -> Result<(), TpmError> {
        self.run(move |device| device.import(&blob)).await
    }

    /// HMAC-SHA256 with the authentication key.
    pub async fn sign_with_auth_key(&self, data: Vec<u8>) -> Result<Vec<u8>, TpmError> {
        self.run(move |device| device.sign(&data)).await
    }
}
