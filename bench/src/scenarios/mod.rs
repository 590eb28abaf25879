//! The five scenarios of issue 5, and `revocation` (what checking open TLS connections against
//! a new revocation list costs).

pub mod decisions;
pub mod frontdoor;
pub mod ingest;
pub mod revocation;
pub mod scale;
pub mod storm;

use std::time::Duration;
use tonic::transport::Channel;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::broker_client::BrokerClient;

/// The farm every scenario's simulated machines join.
pub const FARM: &str = "bench";

/// A Redirect for `user` in the benchmark farm.
pub fn redirect_request(user: String) -> pb::RedirectRequest {
    pb::RedirectRequest {
        user_name: user,
        farm: FARM.to_owned(),
        ..Default::default()
    }
}

/// `count` channels (HTTP/2 connections) to the broker.
pub async fn channels(url: &str, count: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        channels.push(crate::env::channel(url).await?);
    }
    Ok(channels)
}

/// Every session of the farm, through ListSessions pages.
pub async fn list_all_sessions(channel: Channel) -> anyhow::Result<Vec<pb::Session>> {
    let mut client = BrokerClient::new(channel).max_decoding_message_size(256 << 20);
    let mut sessions = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_sessions(pb::ListSessionsRequest {
                farm: FARM.to_owned(),
                page_size: 10_000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        sessions.extend(page.sessions);
        if page.next_page_token.is_empty() {
            return Ok(sessions);
        }
        token = page.next_page_token;
    }
}

/// Seconds with millisecond precision.
pub fn seconds(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Closed-loop Redirect load against `channels`; `pick_user(worker, iteration)` names the user.
pub async fn redirect_load(
    channels: &[Channel],
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    pick_user: impl Fn(usize, u64) -> String + Send + Sync + 'static,
) -> crate::load::LoadResult {
    let clients: Vec<BrokerClient<Channel>> =
        channels.iter().cloned().map(BrokerClient::new).collect();
    crate::load::closed_loop(concurrency, warmup, duration, move |worker, iteration| {
        let mut client = clients[worker % clients.len()].clone();
        let request = redirect_request(pick_user(worker, iteration));
        async move {
            client
                .redirect(request)
                .await
                .map(|_| ())
                .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
        }
    })
    .await
}

/// Closed-loop grpc.health.v1 Check load: the trivial RPC on the same server.
pub async fn echo_load(
    channels: &[Channel],
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
) -> crate::load::LoadResult {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let clients: Vec<HealthClient<Channel>> =
        channels.iter().cloned().map(HealthClient::new).collect();
    crate::load::closed_loop(concurrency, warmup, duration, move |worker, _| {
        let mut client = clients[worker % clients.len()].clone();
        async move {
            client
                .check(HealthCheckRequest {
                    service: "tsbroker.v1.Broker".to_owned(),
                })
                .await
                .map(|_| ())
                .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
        }
    })
    .await
}
