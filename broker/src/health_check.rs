//! `tsbroker --health-check`: asks a running broker's health service whether it is serving,
//! for container health checks and scripts. The broker answers SERVING only once its store is
//! open and migrated, so this is a better probe than the port being open. Over TLS it trusts
//! exactly the broker's own certificate (whatever names it carries) and presents none: health
//! checks need no client certificate.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::tls::ServerTls;

/// The longest the whole check may take (Docker's own timeout in the images is longer).
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// The address to ask: the broker's listen address, with an unspecified host (it listens on
/// every interface) replaced by loopback.
pub fn target(listen: SocketAddr) -> SocketAddr {
    let mut target = listen;
    if listen.ip().is_unspecified() {
        target.set_ip(match listen {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        });
    }
    target
}

/// The whole server's status as the broker at `listen` reports it; an error says why it could
/// not be asked.
pub async fn check(listen: SocketAddr, tls: Option<&ServerTls>) -> Result<ServingStatus, String> {
    let address = target(listen);
    let ask = async {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|error| format!("bad address {address}: {error}"))?;
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config_with_verifier(
                    ClientTlsConfig::new().domain_name("localhost"),
                    tls.own_certificate(),
                )
                .map_err(|error| format!("TLS settings: {error}"))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| format!("cannot connect to {address}: {}", causes(&error)))?;
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map_err(|status| {
                // A plaintext HTTP/2 preface to a TLS port gets the connection closed, seen as
                // a protocol error or a broken pipe: say what is most likely wrong.
                let closed = matches!(status.code(), tonic::Code::Internal | tonic::Code::Unknown);
                let hint = if tls.is_none() && closed {
                    " (does it serve TLS? give the check the broker's --tls-cert and --tls-key)"
                } else {
                    ""
                };
                format!("{address} answered {status}{hint}")
            })?;
        Ok(ServingStatus::try_from(answer.into_inner().status).unwrap_or(ServingStatus::Unknown))
    };
    tokio::time::timeout(TIMEOUT, ask)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {address} within {TIMEOUT:?}")))
}

/// `error` and its causes, joined by ": ", each said once where two layers say the same
/// (tonic's and hyper-util's "tcp connect error").
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(cause) = next {
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        next = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_host_is_asked_on_loopback() {
        let cases = [
            ("0.0.0.0:50051", "127.0.0.1:50051"),
            ("[::]:50051", "[::1]:50051"),
            ("192.0.2.4:7000", "192.0.2.4:7000"),
            ("127.0.0.1:50051", "127.0.0.1:50051"),
        ];
        for (listen, asked) in cases {
            let listen: SocketAddr = listen.parse().unwrap();
            assert_eq!(target(listen), asked.parse().unwrap(), "{listen}");
        }
    }
}
