//! Listeners: the HTTPS front end (TLS with optional client certificates) that routes DPS
//! and Hub requests, and the plain-HTTP admin front end.

use std::{convert::Infallible, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslOptions, SslSessionCacheMode, SslVerifyMode};
use tokio::{net::TcpListener, sync::watch};
use tokio_openssl::SslStream;

use crate::{
    config::Target,
    control::Control,
    dps::{self, RequestInfo},
    hub,
    pki::ServerPki,
    reply::{dps_error, hub_error, plain_error, Reply},
    sas::SasToken,
    state::{ClientChain, Credential, LogEntry, Shared},
    util, EmulatorError,
};

/// Largest request body accepted.
const MAX_BODY: usize = 1024 * 1024;
/// Deadline for receiving a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the TLS acceptor: server cert from `pki`, client certs requested but not verified
/// by OpenSSL (any chain is accepted at handshake time and checked per request instead).
pub(crate) fn acceptor(pki: &ServerPki) -> Result<Arc<SslAcceptor>, EmulatorError> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    b.set_private_key(&pki.server.key)?;
    b.set_certificate(&pki.server.cert)?;
    b.check_private_key()?;
    b.set_verify_callback(SslVerifyMode::PEER, |_preverify, _ctx| true);
    // No resumption: every connection presents its certificate afresh.
    b.set_session_id_context(b"cloud-emulator")?;
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    b.set_options(SslOptions::NO_TICKET);
    Ok(Arc::new(b.build()))
}

/// Accepts HTTPS connections until shutdown.
pub(crate) async fn tls_accept_loop(
    listener: TcpListener,
    acceptor: Arc<SslAcceptor>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    log::debug!("HTTPS connection from {peer}");
                    tokio::spawn(tls_connection(
                        tcp,
                        acceptor.clone(),
                        shared.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
}

fn client_chain(stream: &SslStream<tokio::net::TcpStream>) -> Option<Arc<ClientChain>> {
    let ssl = stream.ssl();
    let leaf = ssl.peer_certificate()?;
    let leaf_der = leaf.to_der().ok();
    // On the server side OpenSSL's peer chain normally excludes the leaf; drop it if present.
    let intermediates = ssl
        .peer_cert_chain()
        .map(|chain| {
            chain
                .iter()
                .filter(|c| c.to_der().ok() != leaf_der)
                .map(|c| c.to_owned())
                .collect()
        })
        .unwrap_or_default();
    Some(Arc::new(ClientChain {
        leaf,
        intermediates,
    }))
}

async fn tls_connection(
    tcp: tokio::net::TcpStream,
    acceptor: Arc<SslAcceptor>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stream = Ssl::new(acceptor.context()).and_then(|ssl| SslStream::new(ssl, tcp));
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => {
            log::warn!("TLS setup failed: {e}");
            return;
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, Pin::new(&mut stream).accept()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            log::debug!("TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            log::debug!("TLS handshake timed out");
            return;
        }
    }
    let chain = client_chain(&stream);
    let svc = service_fn(move |req| {
        let shared = shared.clone();
        let chain = chain.clone();
        async move { Ok::<_, Infallible>(handle_cloud(shared, chain, req).await) }
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    serve_until_shutdown(conn, &mut shutdown).await;
}

async fn serve_until_shutdown<I, S>(
    conn: http1::Connection<I, S>,
    shutdown: &mut watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                log::debug!("connection ended with error: {e}");
            }
        }
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// Reads a body with size and time limits. `Err` is the status to answer.
async fn read_body(body: Incoming) -> Result<Bytes, StatusCode> {
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(StatusCode::PAYLOAD_TOO_LARGE)
        }
        Ok(Err(_)) => Err(StatusCode::BAD_REQUEST),
        Err(_) => Err(StatusCode::REQUEST_TIMEOUT),
    }
}

fn error_for(target: Option<Target>, status: StatusCode, message: &str) -> Reply {
    match target {
        Some(Target::Dps) => dps_error(status, u32::from(status.as_u16()) * 1000, message),
        Some(Target::Hub) => hub_error(status, "ArgumentInvalid", message),
        None => plain_error(status, message),
    }
}

fn fault_reply(target: Target, status: u16, retry_after: Option<u32>) -> Reply {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let reply = match target {
        Target::Dps => {
            let n = u32::from(status) * 1000 + u32::from(status == 429);
            dps_error(code, n, "injected fault")
        }
        Target::Hub => {
            let name = match status {
                429 => "ThrottlingException",
                503 => "ServiceUnavailable",
                _ => "InjectedFault",
            };
            hub_error(code, name, "injected fault")
        }
    };
    Reply {
        fault: true,
        ..reply.with_retry_after(retry_after)
    }
}

/// Handles one DPS or Hub request: body, credential, delay, fault injection, dispatch, log.
async fn handle_cloud(
    shared: Arc<Shared>,
    chain: Option<Arc<ClientChain>>,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let time_ms = util::now_ms();
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.to_string()));
    let segs = util::path_segments(&path);
    let target = match segs.as_deref() {
        Some([first, ..]) if first == "devices" => Some(Target::Hub),
        Some([_, second, ..]) if second == "registrations" => Some(Target::Dps),
        _ => None,
    };
    let cred = match parts.headers.get(header::AUTHORIZATION) {
        Some(v) => Credential::Sas(
            v.to_str()
                .map_err(|_| crate::sas::SasError::Malformed("non-ASCII header"))
                .and_then(SasToken::parse),
        ),
        None => chain.map_or(Credential::None, Credential::X509),
    };
    let body = read_body(body).await;

    let delay = {
        let st = shared.lock();
        match target {
            Some(Target::Dps) => st.settings.dps_delay_ms,
            Some(Target::Hub) => st.settings.hub_delay_ms,
            None => 0,
        }
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }

    let mut st = shared.lock();
    let fault = target.and_then(|t| st.take_fault(t).map(|f| (t, f)));
    let reply = match (fault, &body, &segs, target) {
        (Some((t, f)), _, _, _) => fault_reply(t, f.status, f.retry_after_secs),
        (None, Err(status), _, _) => error_for(target, *status, "could not read request body"),
        (None, Ok(bytes), Some(segs), Some(t)) => {
            let if_match = parts
                .headers
                .get(header::IF_MATCH)
                .and_then(|v| v.to_str().ok());
            let info = RequestInfo {
                method: &parts.method,
                query: query.as_deref(),
                host: host.as_deref(),
                if_match,
                body: bytes,
                cred: &cred,
            };
            match t {
                Target::Dps => dps::handle(&mut st, &info, segs),
                Target::Hub => hub::handle(&mut st, &info, segs),
            }
        }
        (None, Ok(_), _, _) => plain_error(StatusCode::NOT_FOUND, "not found"),
    };
    st.push_log(LogEntry {
        seq: 0,
        time_ms,
        service: match target {
            Some(Target::Dps) => "dps",
            Some(Target::Hub) => "hub",
            None => "other",
        },
        method: parts.method.to_string(),
        path,
        query,
        host,
        auth: cred.kind(),
        auth_ok: reply.auth_ok,
        status: reply.status.as_u16(),
        retry_after: reply.retry_after,
        fault: reply.fault,
        tpm: reply.tpm.as_deref().cloned(),
    });
    drop(st);
    log::debug!(
        "{} {} -> {}",
        parts.method,
        parts.uri.path(),
        reply.status.as_u16()
    );
    reply.into_response()
}

/// Accepts admin connections (plain HTTP) until shutdown.
pub(crate) async fn admin_accept_loop(
    listener: TcpListener,
    control: Control,
    info: Arc<serde_json::Value>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let control = control.clone();
                    let info = info.clone();
                    let mut shutdown = shutdown.clone();
                    tokio::spawn(async move {
                        let svc = service_fn(move |req| {
                            let control = control.clone();
                            let info = info.clone();
                            async move {
                                Ok::<_, Infallible>(crate::admin::handle(&control, &info, req).await)
                            }
                        });
                        let conn = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
                        serve_until_shutdown(conn, &mut shutdown).await;
                    });
                }
                Err(e) => {
                    log::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
}
