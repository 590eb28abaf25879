//! Brokers started in-process through `tsbroker::run` on `127.0.0.1:0`, and clients for them.

use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tsbroker::BrokerConfig;
use tsbroker_common::proto::v1::admin_client::AdminClient;
use tsbroker_common::proto::v1::broker_client::BrokerClient;

/// A broker running in this process.
pub struct TestBroker {
    pub address: SocketAddr,
    pub database_url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts a broker on `database_url` with test-friendly timings, changed by `adjust`.
pub async fn spawn_broker(
    database_url: &str,
    adjust: impl FnOnce(&mut BrokerConfig),
) -> TestBroker {
    spawn_broker_at(
        database_url,
        "127.0.0.1:0".parse().expect("address"),
        adjust,
    )
    .await
}

/// Like [`spawn_broker`], listening on `address`: a broker restarted where the previous one
/// listened (`TestBroker::address`), so that agents find it again. Retries the bind for a few
/// seconds while the old listener's port is still being released.
pub async fn spawn_broker_at(
    database_url: &str,
    address: SocketAddr,
    adjust: impl FnOnce(&mut BrokerConfig),
) -> TestBroker {
    let mut config = BrokerConfig {
        database_url: database_url.to_owned(),
        // Generous: scripted agents send no heartbeats, and CI machines can be slow. Tests of
        // the timeout itself set their own.
        heartbeat_timeout: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(3),
        ..BrokerConfig::default()
    };
    adjust(&mut config);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => break listener,
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(%address, %error, "broker address busy, retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("bind the broker to {address}: {error}"),
        }
    };
    let address = listener.local_addr().expect("local address");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tsbroker::run(config, listener, shutdown.clone()));
    let mut broker = TestBroker {
        address,
        database_url: database_url.to_owned(),
        shutdown,
        task,
    };
    broker.wait_until_serving().await;
    broker
}

impl TestBroker {
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the broker")
    }

    pub async fn broker_client(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel().await)
    }

    pub async fn admin_client(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    async fn wait_until_serving(&mut self) {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = Endpoint::from_shared(self.url())
                .expect("endpoint")
                .connect()
                .await
            {
                let answer = HealthClient::new(channel)
                    .check(HealthCheckRequest::default())
                    .await;
                if answer
                    .is_ok_and(|answer| answer.get_ref().status == ServingStatus::Serving as i32)
                {
                    return;
                }
            }
            if self.task.is_finished() {
                // Says why (a port taken meanwhile, a database that would not open) rather
                // than waiting out the deadline.
                match (&mut self.task).await {
                    Ok(Err(error)) => panic!("broker stopped before serving: {error:#}"),
                    Ok(Ok(())) => panic!("broker stopped before serving, without an error"),
                    Err(error) => panic!("broker task failed before serving: {error}"),
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "broker did not become SERVING"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the broker (as SIGTERM would) and waits for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(15), self.task).await;
        let result = stopped
            .expect("broker stops within its grace period")
            .expect("broker task");
        result.expect("broker ran without error");
    }
}
