//! How the agent reaches the broker: one `Endpoint` with HTTP/2 keepalive (so a dead link is
//! noticed in seconds), TLS for an https:// broker (its CA, the agent's client certificate),
//! and the agent token as `authorization: Bearer` metadata on every call.

use std::time::Duration;

use anyhow::Context;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tsbroker_common::pem;

use crate::config::BrokerTls;
use tsbroker_common::proto::v1::agent_gateway_client::AgentGatewayClient;
use tsbroker_common::proto::v1::broker_client::BrokerClient;

pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Adds `authorization: Bearer <token>` when the agent has a token.
#[derive(Clone, Debug, Default)]
pub struct BearerToken {
    value: Option<MetadataValue<Ascii>>,
}

impl BearerToken {
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let value = token
            .map(|token| {
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .context("agent token is not a valid header value")
            })
            .transpose()?;
        Ok(BearerToken { value })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.value {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type AuthChannel = InterceptedService<Channel, BearerToken>;
pub type Gateway = AgentGatewayClient<AuthChannel>;
pub type Broker = BrokerClient<AuthChannel>;

/// The broker's endpoint with the agent's transport settings; for an https:// URL, TLS with
/// `tls`'s files, read now so that a bad one stops the agent at start.
pub fn endpoint(url: &str, tls: &BrokerTls) -> anyhow::Result<Endpoint> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("parse broker url {url:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(client_tls(tls)?)
            .context("TLS settings for the broker")?;
    }
    Ok(endpoint)
}

fn client_tls(tls: &BrokerTls) -> anyhow::Result<ClientTlsConfig> {
    let mut config = match &tls.ca {
        Some(path) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
            pem::read_certificates(path, "--broker-ca")?.pem,
        )),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    if let (Some(cert_path), Some(key_path)) = (&tls.cert, &tls.key) {
        let (chain, key) = pem::read_key_pair(cert_path, key_path)?;
        config = config.identity(Identity::from_pem(chain.pem, key.pem));
    }
    Ok(config)
}

pub fn gateway(channel: Channel, token: BearerToken) -> Gateway {
    AgentGatewayClient::with_interceptor(channel, token)
}

pub fn broker(channel: Channel, token: BearerToken) -> Broker {
    BrokerClient::with_interceptor(channel, token)
}

/// The gRPC status in an error's chain, if a broker's answer (or the transport) made it.
pub fn status_of(error: &anyhow::Error) -> Option<&tonic::Status> {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<tonic::Status>())
}

/// An error as the log and `tsagent status` show it: its contexts, and of a gRPC status only
/// its code, its message and its innermost cause (tonic's own form adds empty details and
/// metadata, and repeats the cause).
pub fn describe(error: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in error.chain() {
        let Some(status) = cause.downcast_ref::<tonic::Status>() else {
            parts.push(cause.to_string());
            continue;
        };
        let mut text = format!("{:?}: {}", status.code(), status.message());
        let mut innermost = None;
        let mut source = std::error::Error::source(status);
        while let Some(cause) = source {
            innermost = Some(cause.to_string());
            source = cause.source();
        }
        if let Some(innermost) = innermost.filter(|cause| !text.contains(cause.as_str())) {
            text.push_str(&format!(" ({innermost})"));
        }
        parts.push(text);
        break;
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_status_is_described_by_its_code_message_and_innermost_cause() {
        let status = tonic::Status::unavailable("the broker's database is unavailable");
        let error = anyhow::Error::new(status).context("open stream");
        assert_eq!(
            super::describe(&error),
            "open stream: Unavailable: the broker's database is unavailable"
        );
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = tonic::Status::from_error(Box::new(refused));
        let described = super::describe(&anyhow::Error::new(status));
        assert!(!described.contains("metadata"), "{described}");
        assert!(described.contains("refused"), "{described}");
    }
}
