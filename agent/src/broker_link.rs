//! The agent's way to the broker, kept current: the endpoint (and the front door's client over
//! it) is built again when the TLS files it was built from change on disk, so a renewed client
//! certificate or CA is taken up without restarting the agent (a restart would cut every client
//! connection the front door carries). Connections already open keep the certificate they were
//! made with; TLS checks it only at the handshake.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::broker_client::{self, BearerToken, Broker};
use crate::config::BrokerTls;

/// How often the TLS files are looked at (their size and modification time).
pub const TLS_FILES_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// What a file looked like when it was read: absent, or its modification time and size.
type FileStamp = Option<(SystemTime, u64)>;

pub struct BrokerLink {
    url: String,
    tls: BrokerTls,
    token: BearerToken,
    current: RwLock<Current>,
}

struct Current {
    stamps: Vec<FileStamp>,
    endpoint: Endpoint,
    /// Over a lazy channel of `endpoint`: connects when first used, and again when it drops.
    broker: Broker,
}

impl BrokerLink {
    /// Reads the TLS files now: a bad one is an error at start.
    pub fn new(url: &str, tls: &BrokerTls, token: BearerToken) -> anyhow::Result<Arc<BrokerLink>> {
        let stamps = stamps(tls);
        let endpoint = broker_client::endpoint(url, tls)?;
        let broker = broker_client::broker(endpoint.connect_lazy(), token.clone());
        Ok(Arc::new(BrokerLink {
            url: url.to_owned(),
            tls: tls.clone(),
            token,
            current: RwLock::new(Current {
                stamps,
                endpoint,
                broker,
            }),
        }))
    }

    /// The endpoint to open the next stream with.
    pub fn endpoint(&self) -> Endpoint {
        self.read(|current| current.endpoint.clone())
    }

    /// The client for `Redirect` and `ListMachines`, sharing one connection.
    pub fn broker(&self) -> Broker {
        self.read(|current| current.broker.clone())
    }

    pub fn token(&self) -> BearerToken {
        self.token.clone()
    }

    fn read<T>(&self, take: impl FnOnce(&Current) -> T) -> T {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        take(&current)
    }

    /// Builds the endpoint again when a TLS file changed since it was last read; a file that
    /// does not read or parse now leaves the working endpoint in place (and is tried again
    /// at the next check, as a renewal may be half written). Whether it was rebuilt.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamps(&self.tls);
        if self.read(|current| current.stamps == now) {
            return false;
        }
        match broker_client::endpoint(&self.url, &self.tls) {
            Ok(endpoint) => {
                let broker = broker_client::broker(endpoint.connect_lazy(), self.token.clone());
                let mut current = self
                    .current
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                *current = Current {
                    stamps: now,
                    endpoint,
                    broker,
                };
                tracing::info!("TLS files changed: new connections to the broker use them");
                true
            }
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "TLS files changed but cannot be used; keeping the previous ones"
                );
                false
            }
        }
    }

    /// Looks at the TLS files every `every` until `stop` (nothing to do without any).
    pub async fn watch(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        if stamps(&self.tls).is_empty() {
            return;
        }
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            self.reload_if_changed();
        }
    }
}

fn stamps(tls: &BrokerTls) -> Vec<FileStamp> {
    let files: Vec<&PathBuf> = [&tls.ca, &tls.cert, &tls.key]
        .into_iter()
        .flatten()
        .collect();
    files
        .into_iter()
        .map(|path| {
            std::fs::metadata(path)
                .ok()
                .and_then(|meta| Some((meta.modified().ok()?, meta.len())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// common/testdata/README.md says what it is.
    const CA: &str = include_str!("../../common/testdata/ts1-example-com.pem");

    #[tokio::test]
    async fn changed_tls_files_are_taken_up_and_broken_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, CA).unwrap();
        let tls = BrokerTls {
            ca: Some(ca.clone()),
            ..BrokerTls::default()
        };
        let link =
            BrokerLink::new("https://broker.example.com:50051", &tls, Default::default()).unwrap();
        assert!(!link.reload_if_changed(), "nothing changed");
        // Half written: kept out, the working endpoint stays.
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        assert!(!link.reload_if_changed());
        // Whole again: taken up once.
        std::fs::write(&ca, format!("{CA}\n")).unwrap();
        assert!(link.reload_if_changed());
        assert!(!link.reload_if_changed());
        // A plaintext broker has no files to watch.
        let plain = BrokerLink::new(
            "http://127.0.0.1:50051",
            &BrokerTls::default(),
            Default::default(),
        )
        .unwrap();
        assert!(!plain.reload_if_changed());
    }
}
