//! How the agent reaches the broker: one `Endpoint` with HTTP/2 keepalive (so a dead link is
//! noticed in seconds) and the agent token as `authorization: Bearer` metadata on every call.

use std::time::Duration;

use anyhow::Context;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
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

/// The broker's endpoint with the agent's transport settings.
pub fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("parse broker url {url:?}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    Ok(endpoint)
}

pub fn gateway(channel: Channel, token: BearerToken) -> Gateway {
    AgentGatewayClient::with_interceptor(channel, token)
}

pub fn broker(channel: Channel, token: BearerToken) -> Broker {
    BrokerClient::with_interceptor(channel, token)
}
