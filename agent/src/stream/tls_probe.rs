//! Why the broker closes this agent's TLS connections at once. With TLS 1.3 a client takes the
//! handshake for done before the server has checked its certificate; the server's refusal (an
//! alert: the certificate revoked, expired, of an unknown CA) then often reaches the gRPC
//! client only as a closed connection or a broken pipe. A handshake of its own that then only
//! listens reads the alert, so that the log and `tsagent status` can say what to fix.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tsbroker_common::pem;

use crate::config::BrokerTls;

/// How long the probe may take, connection, handshake and listening together.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long it listens after the handshake for the broker's verdict.
const LISTEN: Duration = Duration::from_secs(2);

/// The alert the broker at `url` answers this agent's client certificate with
/// ("received fatal alert: CertificateRevoked"), if it refuses it; `None` when it takes it,
/// cannot be asked, or the agent has no client certificate to present. The broker's own
/// certificate is checked as the agent's gRPC channel checks it: against `--broker-ca`, or
/// without one against the system's CAs (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured).
pub async fn refusal(url: &str, tls: &BrokerTls) -> Option<String> {
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return None;
    };
    let (address, host) = address_and_host(url)?;
    let mut roots = RootCertStore::empty();
    match &tls.ca {
        Some(ca) => {
            for certificate in pem::read_certificates(ca, "--broker-ca").ok()?.certificates {
                roots.add(certificate).ok()?;
            }
        }
        None => {
            // Those it can read; the gRPC channel makes do with the same.
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let (chain, key) = pem::read_key_pair(cert, key).ok()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain.certificates, key.key)
        .ok()?;
    let name = ServerName::try_from(host).ok()?;
    let probe = async {
        let tcp = tokio::net::TcpStream::connect(&address).await.ok()?;
        let mut stream = match TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
        {
            Ok(stream) => stream,
            Err(error) => return alert_in(&error.to_string()),
        };
        // The broker sends nothing before the client's first bytes: an answer is a refusal.
        let mut byte = [0u8; 1];
        match tokio::time::timeout(LISTEN, stream.read(&mut byte)).await {
            Ok(Err(error)) => alert_in(&error.to_string()),
            _ => None,
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .ok()
        .flatten()
}

/// "host:port" to connect to and the host name to check, of an https:// URL.
fn address_and_host(url: &str) -> Option<(String, String)> {
    let authority = url.strip_prefix("https://")?.split('/').next()?;
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => (host, port),
        _ => (authority, "443"),
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    Some((format!("{host}:{port}"), bare.to_owned()))
}

/// The alert in a TLS error's text, if it is one.
fn alert_in(error: &str) -> Option<String> {
    error.contains("alert").then(|| error.to_owned())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_address_and_name_come_from_the_url() {
        let split = |url| super::address_and_host(url);
        assert_eq!(
            split("https://broker.example:50051"),
            Some(("broker.example:50051".into(), "broker.example".into()))
        );
        assert_eq!(
            split("https://broker.example"),
            Some(("broker.example:443".into(), "broker.example".into()))
        );
        assert_eq!(
            split("https://[::1]:50051/"),
            Some(("[::1]:50051".into(), "::1".into()))
        );
        assert_eq!(split("http://broker.example:50051"), None);
    }
}
