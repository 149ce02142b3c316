//! The blocking bridge to keyd: one thread per provider instance (normally one per process) runs a current-thread tokio runtime
//! with the one keyd client (`key_api::Client`, pooled connections); provider functions hand it
//! a request and wait for the answer. The host program's own runtime, if it has one, is never
//! entered, and no runtime is built per call.

use std::future::Future;
use std::pin::Pin;

use crate::error::ProviderError;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The keyd client thread.
#[derive(Debug)]
pub struct Keyd {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
    client: key_api::Client,
}

impl Keyd {
    /// Starts the client thread for keyd at `uri` (`unix:///path`).
    pub fn start(uri: &str) -> Result<Keyd, ProviderError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| ProviderError::Internal(format!("cannot start a runtime: {error}")))?;
        let client = {
            let _context = runtime.enter();
            key_api::Client::from_uri(uri)
                .map_err(|error| ProviderError::Endpoint(http_common::error::error_chain(&error)))?
        };
        let (jobs, mut receiver) = tokio::sync::mpsc::unbounded_channel::<Job>();
        std::thread::Builder::new()
            .name("keyd-provider".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some(job) = receiver.recv().await {
                        tokio::spawn(job);
                    }
                });
            })
            .map_err(|error| {
                ProviderError::Internal(format!("cannot start the keyd client thread: {error}"))
            })?;
        Ok(Keyd { jobs, client })
    }

    /// Runs `work` with the client on the client thread and waits for its result.
    pub fn call<T, F, Fut>(&self, work: F) -> Result<T, ProviderError>
    where
        F: FnOnce(key_api::Client) -> Fut,
        Fut: Future<Output = Result<T, ProviderError>> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let future = work(self.client.clone());
        self.jobs
            .send(Box::pin(async move {
                let _ = reply.send(future.await);
            }))
            .map_err(|_| ProviderError::Internal("the keyd client thread has stopped".into()))?;
        answer
            .recv()
            .map_err(|_| ProviderError::Internal("the keyd request was dropped".into()))?
    }
}
