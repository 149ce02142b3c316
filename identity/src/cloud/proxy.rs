//! `HTTPS_PROXY` / `https_proxy` support: an HTTP CONNECT tunnel, with `Proxy-Authorization:
//! Basic` when the proxy URL carries `user:pass@`, and `NO_PROXY` honoured. The password is
//! never logged (`Debug` is redacted).

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A configured proxy.
#[derive(Clone)]
pub struct Proxy {
    host: String,
    port: u16,
    authorization: Option<String>,
    no_proxy: Vec<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

fn env(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|name| std::env::var(name).ok())
        .filter(|value| !value.trim().is_empty())
}

impl Proxy {
    /// The proxy from the environment, if any (an unusable value is logged and ignored).
    pub fn from_env() -> Option<Proxy> {
        let url = env(&["HTTPS_PROXY", "https_proxy"])?;
        let no_proxy = env(&["NO_PROXY", "no_proxy"])
            .map(|list| {
                list.split(',')
                    .map(|entry| entry.trim().to_ascii_lowercase())
                    .filter(|entry| !entry.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        match Proxy::parse(&url, no_proxy) {
            Some(proxy) => {
                log::info!(
                    "using proxy {}:{} for cloud requests",
                    proxy.host,
                    proxy.port
                );
                Some(proxy)
            }
            None => {
                log::warn!("HTTPS_PROXY is set but is not an http://[user:pass@]host[:port] URL; ignoring it");
                None
            }
        }
    }

    fn parse(url: &str, no_proxy: Vec<String>) -> Option<Proxy> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .unwrap_or(url);
        let authority = rest.split('/').next()?;
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((credentials, host_port)) => (Some(credentials), host_port),
            None => (None, authority),
        };
        let (host, port) = match crate::util::split_authority(host_port) {
            Some((host, port)) if host_port.contains(':') => (host, port),
            Some((host, _)) => (host, 80),
            None => return None,
        };
        let authorization = credentials.map(|credentials| {
            let decoded = percent_encoding::percent_decode_str(credentials).decode_utf8_lossy();
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(decoded.as_bytes())
            )
        });
        Some(Proxy {
            host,
            port,
            authorization,
            no_proxy,
        })
    }

    /// Whether requests to `host` go through the proxy (`NO_PROXY` entries match the host or
    /// a domain suffix; `*` matches everything).
    pub fn applies_to(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        !self.no_proxy.iter().any(|entry| {
            let entry = entry.trim_start_matches('.');
            entry == "*" || host == entry || host.ends_with(&format!(".{entry}"))
        })
    }

    /// Opens a tunnel to `host:port`.
    pub async fn connect(&self, host: &str, port: u16) -> Result<tokio::net::TcpStream, String> {
        let mut stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|error| format!("connect to proxy: {error}"))?;
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(authorization) = &self.authorization {
            head.push_str(&format!("Proxy-Authorization: {authorization}\r\n"));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|error| format!("proxy: {error}"))?;
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") {
            if answer.len() > 16 * 1024 {
                return Err("proxy: answer head too long".to_owned());
            }
            let read = stream
                .read(&mut byte)
                .await
                .map_err(|error| format!("proxy: {error}"))?;
            if read == 0 {
                return Err("proxy closed the connection".to_owned());
            }
            answer.push(byte[0]);
        }
        let status_line = String::from_utf8_lossy(&answer);
        let status = status_line.split_whitespace().nth(1).unwrap_or("");
        if status != "200" {
            return Err(format!("proxy refused the tunnel with status {status}"));
        }
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_no_proxy() {
        let proxy = Proxy::parse(
            "http://user:p%40ss@proxy.local:3128/",
            vec!["example.com".into()],
        )
        .unwrap();
        assert_eq!(proxy.host, "proxy.local");
        assert_eq!(proxy.port, 3128);
        assert_eq!(proxy.authorization.as_deref(), Some("Basic dXNlcjpwQHNz"));
        assert!(!format!("{proxy:?}").contains("dXNlcjpwQHNz"));
        assert!(!proxy.applies_to("hub.example.com"));
        assert!(proxy.applies_to("hub.azure-devices.net"));
        assert_eq!(Proxy::parse("proxy", vec![]).unwrap().port, 80);
    }
}
