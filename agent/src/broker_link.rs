//! The agent's way to the broker: one HTTP/2 connection (a lazy channel, connected when first
//! used and again after it drops) that the stream and the front door's calls share, so a farm
//! of N machines holds N connections on the broker, not 2N. Kept current: the channel is built
//! again when the TLS files it was built from change on disk, so a renewed client certificate
//! or CA is taken up without restarting the agent (a restart would cut every client connection
//! the front door carries). Connections already open keep the certificate they were made with;
//! TLS checks it only at the handshake.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tsbroker_common::cert_validity::Reminder;
use tsbroker_common::pem;
use tsbroker_common::renewal::{Renewable, check_every};

use crate::broker_client::{self, BearerToken, Broker};
use crate::config::BrokerTls;

/// How often the TLS files are looked at (their size and modification time).
pub const TLS_FILES_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// How long a health check of this agent's own replica may take.
const HOME_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

pub struct BrokerLink {
    /// The broker's replicas, in the order they are tried.
    urls: Vec<String>,
    tls: BrokerTls,
    token: BearerToken,
    /// Which of `urls` is in use (modulo their number).
    at: AtomicUsize,
    /// The one this agent starts with and comes back to (its share of the farm's spread).
    home: usize,
    /// One lazy channel per URL: one not in use never connects.
    current: Vec<Renewable<Current>>,
    /// Says the agent's own certificate's expiry as it nears, and when it comes.
    own_certificate: Reminder,
}

struct Current {
    /// Lazy: connects when first used, and again when it drops.
    channel: Channel,
    broker: Broker,
}

impl BrokerLink {
    /// Reads the TLS files now: a bad one is an error at start. `first` picks the URL to start
    /// with (modulo their number), so that a farm's agents spread over the replicas.
    pub fn new(
        urls: &[String],
        first: usize,
        tls: &BrokerTls,
        token: BearerToken,
    ) -> anyhow::Result<Arc<BrokerLink>> {
        anyhow::ensure!(!urls.is_empty(), "no broker URL");
        let files: Vec<_> = [&tls.ca, &tls.cert, &tls.key]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let current = urls
            .iter()
            .map(|url| Renewable::new(files.clone(), || build(url, tls, &token)))
            .collect::<anyhow::Result<_>>()?;
        let own_certificate = Reminder::new("--tls-cert");
        say_own_certificate(tls, &own_certificate);
        Ok(Arc::new(BrokerLink {
            urls: urls.to_vec(),
            tls: tls.clone(),
            token,
            at: AtomicUsize::new(first % urls.len()),
            home: first % urls.len(),
            current,
            own_certificate,
        }))
    }

    fn active(&self) -> usize {
        self.at.load(Ordering::Relaxed) % self.urls.len()
    }

    /// The URL in use.
    pub fn url(&self) -> &str {
        &self.urls[self.active()]
    }

    /// After the stream broke, when there are several replicas: back to this agent's own
    /// replica when a stream that had worked elsewhere broke (so that a farm's agents do not
    /// all gather on one replica after a rolling restart), else on to the next, through all of
    /// them in turn. The stream's next attempt and the front door's calls go there. The URL now
    /// in use, if it changed.
    pub fn fail_over(&self, had_worked: bool) -> Option<&str> {
        if self.urls.len() < 2 {
            return None;
        }
        let next = match self.active() {
            at if had_worked && at != self.home => self.home,
            at => (at + 1) % self.urls.len(),
        };
        self.at.store(next, Ordering::Relaxed);
        Some(self.url())
    }

    /// How many replicas there are.
    pub fn replicas(&self) -> usize {
        self.urls.len()
    }

    /// Whether the one in use is another than this agent's own replica.
    pub fn away_from_home(&self) -> bool {
        self.active() != self.home
    }

    /// Back to this agent's own replica (it is serving again).
    pub fn go_home(&self) -> &str {
        self.at.store(self.home, Ordering::Relaxed);
        self.url()
    }

    /// Whether this agent's own replica answers its health check with SERVING within 5 s.
    pub async fn home_serving(&self) -> bool {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let channel = self.current[self.home].with(|current| current.channel.clone());
        let mut client = HealthClient::with_interceptor(channel, self.token.clone());
        let checked = tokio::time::timeout(
            HOME_CHECK_TIMEOUT,
            client.check(HealthCheckRequest::default()),
        )
        .await;
        matches!(checked, Ok(Ok(answer)) if answer.get_ref().status == ServingStatus::Serving as i32)
    }

    /// Which replica is in use now (see [`BrokerLink::broker_at`]).
    pub fn in_use(&self) -> usize {
        self.active()
    }

    /// The client for `Redirect` on replica `at` (modulo their number): a front door asks the
    /// one in use when its call began, then the next ones when it does not answer — counted
    /// from that one, not from the one in use later (the stream may have moved meanwhile).
    pub fn broker_at(&self, at: usize) -> Broker {
        self.current[at % self.urls.len()].with(|current| current.broker.clone())
    }

    /// The channel to open the next stream on.
    pub fn channel(&self) -> Channel {
        self.current[self.active()].with(|current| current.channel.clone())
    }

    /// The client for `Redirect` and `ListMachines`, sharing one connection.
    pub fn broker(&self) -> Broker {
        self.current[self.active()].with(|current| current.broker.clone())
    }

    /// The TLS files the agent presents and checks the broker with.
    pub fn tls(&self) -> &BrokerTls {
        &self.tls
    }

    pub fn token(&self) -> BearerToken {
        self.token.clone()
    }

    /// Builds the channels again when a TLS file changed since it was last read; files that
    /// do not load now leave the working channels in place (and are tried again at the next
    /// check, as a renewal may be half written). Whether they were rebuilt.
    pub fn reload_if_changed(&self) -> bool {
        let mut changed = false;
        for (url, current) in self.urls.iter().zip(&self.current) {
            changed |= current.renew_if_changed(|| build(url, &self.tls, &self.token));
        }
        if changed {
            say_own_certificate(&self.tls, &self.own_certificate);
        }
        changed
    }

    /// Looks at the TLS files every `every` until `stop` (nothing to do without any).
    pub async fn watch(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        if !self.current[0].has_files() {
            return;
        }
        check_every(every, stop.cancelled(), || {
            self.own_certificate.look_again(SystemTime::now());
            self.reload_if_changed();
        })
        .await;
    }
}

/// Says when the agent's client certificate has expired, is not valid yet or soon expires
/// (the broker refuses it; its refusal reaches the agent as a closed connection at best), and
/// has `reminder` say it again as its end nears.
fn say_own_certificate(tls: &BrokerTls, reminder: &Reminder) {
    if let Some(path) = &tls.cert
        && let Ok(file) = pem::read_certificates(path, "--tls-cert")
    {
        reminder.loaded(&file.certificates, path);
    }
}

fn build(url: &str, tls: &BrokerTls, token: &BearerToken) -> anyhow::Result<Current> {
    let channel = broker_client::endpoint(url, tls)?.connect_lazy();
    let broker = broker_client::broker(channel.clone(), token.clone());
    Ok(Current { channel, broker })
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
        let link = BrokerLink::new(
            &["https://broker.example.com:50051".to_owned()],
            0,
            &tls,
            Default::default(),
        )
        .unwrap();
        assert!(!link.reload_if_changed(), "nothing changed");
        // Half written: kept out, the working channel stays.
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        assert!(!link.reload_if_changed());
        // Whole again: taken up once.
        std::fs::write(&ca, format!("{CA}\n")).unwrap();
        assert!(link.reload_if_changed());
        assert!(!link.reload_if_changed());
        // A plaintext broker has no files to watch.
        let plain = BrokerLink::new(
            &["http://127.0.0.1:50051".to_owned()],
            0,
            &BrokerTls::default(),
            Default::default(),
        )
        .unwrap();
        assert!(!plain.reload_if_changed());
    }

    #[tokio::test]
    async fn several_replicas_each_agent_has_its_own_and_the_next_when_that_breaks() {
        let urls: Vec<String> = [
            "http://10.0.0.1:50051",
            "http://10.0.0.2:50051",
            "http://10.0.0.3:50051",
        ]
        .map(str::to_owned)
        .to_vec();
        let link = BrokerLink::new(&urls, 4, &BrokerTls::default(), Default::default()).unwrap();
        // Its own replica first; when that breaks the next, and after a stream that worked
        // there broke, its own again (a farm does not gather on one replica after a rolling
        // restart).
        assert_eq!(link.url(), urls[1]);
        assert_eq!(link.fail_over(true), Some(urls[2].as_str()));
        assert_eq!(link.fail_over(true), Some(urls[1].as_str()));
        // Replicas that do not answer: every one in turn, not only its own and the next.
        assert_eq!(link.fail_over(false), Some(urls[2].as_str()));
        assert_eq!(link.fail_over(false), Some(urls[0].as_str()));
        assert_eq!(link.fail_over(false), Some(urls[1].as_str()));
        let one =
            BrokerLink::new(&urls[..1], 7, &BrokerTls::default(), Default::default()).unwrap();
        assert_eq!(one.fail_over(false), None);
        assert_eq!(one.url(), urls[0]);
    }
}
