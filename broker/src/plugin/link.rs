//! One plug-in: its connection, its state, and the task that keeps it informed. The task
//! initializes the plug-in (again whenever it comes back), sends a full RESYNC of its farms,
//! then live notifications in order, merged into batches. Decision calls (`suggest`,
//! `external_session`) go straight to the plug-in with a deadline and never wait for the task.

use super::connection::{ConnectionCount, CountingConnector};
use super::notices::{self, Notice};

mod decisions;
pub use decisions::PluginBudget;
mod resync;
use crate::decision::DecisionSettings;
use crate::decision::farm_settings::PluginSettings;
use crate::metrics::{Metrics, PluginCallLabels, PluginMethodLabels};
use crate::store::Store;
use resync::ResyncCutoffs;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::plugin_client::PluginClient;
use tsbroker_common::renewal::Renewable;
use tsbroker_common::validate::excerpt;
use tsbroker_common::warning_limit::WarningLimit;
use uuid::Uuid;

/// Notifications waiting for one plug-in; past this, they are dropped and a full RESYNC follows.
const QUEUE_CAPACITY: usize = 10_000;
/// Deadline of notification and lifecycle calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the link checks that the plug-in is still the one it initialized (and follows
/// the machines' leases).
const PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// How often a link that keeps failing the same way says so again.
const REPEAT_FAILURE: Duration = Duration::from_secs(60);

/// Where bringing the link up failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkStage {
    /// `Initialize` got no answer, or an error: the plug-in is not reachable.
    Initialize,
    /// The full resync after `Initialize` failed.
    Resync,
}

/// The link's last failure said at warning level, and when.
#[derive(Default)]
struct FailureSaid(Option<(LinkStage, String, Instant)>);

impl FailureSaid {
    fn now(stage: LinkStage, reason: String) -> FailureSaid {
        FailureSaid(Some((stage, reason, Instant::now())))
    }

    fn stage(&self) -> Option<LinkStage> {
        self.0.as_ref().map(|(stage, ..)| *stage)
    }

    /// Whether this failure is to be said: another than the last one said (a plug-in that is
    /// reachable now but refused, say, for its certificate), or the same a minute on.
    fn is_due(&self, stage: LinkStage, reason: &str) -> bool {
        match &self.0 {
            Some((said_stage, said_reason, at)) => {
                *said_stage != stage || said_reason != reason || at.elapsed() >= REPEAT_FAILURE
            }
            None => true,
        }
    }
}

/// A notice in the queue, numbered in the order notices were given to it.
pub struct Queued {
    seq: u64,
    notice: Notice,
}

/// What a decision gets from a plug-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suggestion {
    /// Keep the broker's pick.
    Keep,
    /// This machine instead (a candidate; checked by the caller).
    Machine(Uuid),
    /// The plug-in failed, was late, or is down: the broker's pick stands (counted).
    Fallback(&'static str),
}

pub struct PluginLink {
    pub address: String,
    pub settings: PluginSettings,
    pub farms: Vec<String>,
    /// The channel to the plug-in and its client, built again when the CA file changes.
    current: Renewable<PluginChannel>,
    /// Connections made to the plug-in so far, and the one `Initialize` went over: a call
    /// answered over a later connection may have reached a plug-in that restarted.
    connections: ConnectionCount,
    initialized_on: AtomicU64,
    /// Initialized: notifications are queued for it.
    up: AtomicBool,
    /// Initialized and sent its full resync: decisions ask it (before, it would answer from a
    /// part of the farm).
    answering: AtomicBool,
    supports_external: AtomicBool,
    /// Set when notifications were dropped: the link re-initializes and resyncs.
    overflowed: AtomicBool,
    /// Woken when a decision call shows the plug-in lost its state or its connection.
    reinitialize: tokio::sync::Notify,
    /// Rate limits of the decision warnings: late, failed, not a candidate; an external session
    /// not used.
    warnings: [WarningLimit; 4],
    /// Rate limits of the link's own warnings: lost, asked to initialize again.
    link_warnings: [WarningLimit; 2],
    queue: mpsc::Sender<Queued>,
    /// The number the next queued notice gets.
    next_seq: AtomicU64,
    /// Each machine's state as last sent to the plug-in (by id), with its name and farm.
    told_states: std::sync::Mutex<std::collections::HashMap<String, resync::Told>>,
    /// For the machines' leases as decisions see them.
    decision: DecisionSettings,
    metrics: Arc<Metrics>,
}

/// A channel to the plug-in (connected lazily) and its client.
struct PluginChannel {
    client: PluginClient<Channel>,
    channel: Channel,
}

/// The plug-in's channel, with its TLS settings read now (the CA file included); its
/// connections counted into `connections`.
fn open(settings: &PluginSettings, connections: &ConnectionCount) -> anyhow::Result<PluginChannel> {
    use anyhow::Context;
    let mut endpoint = Endpoint::from_shared(settings.address.clone())
        .with_context(|| format!("plug-in address {:?}", settings.address))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    if settings.address.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(ca_file) = &settings.ca_file {
            // Checked here, not by tonic (which leaves out what it cannot parse, trusting no
            // private CA): a file of garbage is an error at start, and a renewal half written
            // keeps the channel that works.
            let file = tsbroker_common::pem::read_certificates(ca_file, "plug-in ca_file")?;
            let mut roots = rustls::RootCertStore::empty();
            for certificate in file.certificates {
                roots.add(certificate).with_context(|| {
                    format!(
                        "plug-in ca_file {}: not a CA certificate",
                        ca_file.display()
                    )
                })?;
            }
            tls = tls.ca_certificate(Certificate::from_pem(file.pem));
        }
        endpoint = endpoint.tls_config(tls).context("plug-in TLS settings")?;
    }
    let channel =
        endpoint.connect_with_connector_lazy(CountingConnector::counting_into(connections));
    Ok(PluginChannel {
        client: PluginClient::new(channel.clone()),
        channel,
    })
}

impl PluginLink {
    /// Builds the link (no connection is made yet) and the receiving end of its queue.
    pub fn new(
        settings: PluginSettings,
        farms: Vec<String>,
        decision: DecisionSettings,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<(Arc<PluginLink>, mpsc::Receiver<Queued>)> {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let connections = ConnectionCount::default();
        // The CA file is read again when it changes (a CA put right, or rotated).
        let ca_files = match &settings.ca_file {
            Some(ca_file) if settings.address.starts_with("https://") => vec![ca_file.clone()],
            _ => Vec::new(),
        };
        let current = Renewable::new(ca_files, || open(&settings, &connections))?;
        let link = PluginLink {
            address: settings.address.clone(),
            settings,
            farms,
            current,
            connections,
            initialized_on: AtomicU64::new(0),
            up: AtomicBool::new(false),
            answering: AtomicBool::new(false),
            supports_external: AtomicBool::new(false),
            overflowed: AtomicBool::new(false),
            reinitialize: tokio::sync::Notify::new(),
            warnings: Default::default(),
            link_warnings: Default::default(),
            queue,
            next_seq: AtomicU64::new(0),
            told_states: Default::default(),
            decision,
            metrics,
        };
        Ok((Arc::new(link), receiver))
    }

    /// Builds the channel again when its CA file changed (and loads); whether it did.
    fn renew_channel(&self) -> bool {
        let renewed = self
            .current
            .renew_if_changed(|| open(&self.settings, &self.connections));
        if renewed {
            tracing::info!(plugin = %self.address, "plug-in's CA file changed: connecting with it");
        }
        renewed
    }

    /// The client of the plug-in's channel in use.
    fn client(&self) -> PluginClient<Channel> {
        self.current.with(|current| current.client.clone())
    }

    /// The channel in use (for the health check).
    fn channel(&self) -> Channel {
        self.current.with(|current| current.channel.clone())
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Whether decisions ask the plug-in: initialized and resynced.
    pub fn is_answering(&self) -> bool {
        self.answering.load(Ordering::Relaxed)
    }

    /// Down: neither notified nor asked until initialized and resynced again. Whether it was
    /// up.
    fn set_down(&self) -> bool {
        self.answering.store(false, Ordering::Relaxed);
        self.up.swap(false, Ordering::Relaxed)
    }

    pub fn supports_external(&self) -> bool {
        self.is_answering() && self.supports_external.load(Ordering::Relaxed)
    }

    /// Queues a notification without waiting; a full queue turns into a RESYNC later.
    pub fn notify(&self, notice: Notice) {
        if !self.is_up() {
            // The next Initialize is followed by a full RESYNC, which covers this.
            return;
        }
        let seq = self.next_seq.fetch_add(1, Ordering::AcqRel);
        let queued = Queued { seq, notice };
        // Closed: the link's task ended (the broker is stopping), nothing to say.
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(queued)
            && !self.overflowed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(plugin = %self.address, "plug-in notification queue full; a full resync will follow");
        }
    }

    fn record(&self, method: &'static str, outcome: &'static str, started: Instant) {
        self.metrics
            .plugin_calls
            .get_or_create(&PluginCallLabels {
                plugin: self.address.clone(),
                method,
                outcome,
            })
            .inc();
        self.metrics
            .plugin_call_seconds
            .get_or_create(&PluginMethodLabels {
                plugin: self.address.clone(),
                method,
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// A decision call answered FAILED_PRECONDITION (the plug-in restarted and wants
    /// `Initialize`): start over, so that it is initialized and resynced at once, even in a farm
    /// where no notification would fail. (UNAVAILABLE is not asked for that: an overloaded
    /// plug-in says it of itself, and one that is gone fails the link's health check within
    /// `PROBE_INTERVAL`, while a restarted one answers over a new connection.)
    fn check_status(&self, status: &tonic::Status) {
        if status.code() == tonic::Code::FailedPrecondition && self.set_down() {
            match self.link_warnings[1].warn_now() {
                Some(unwarned) => {
                    tracing::warn!(plugin = %self.address, since_last_warning = unwarned, "plug-in answered FAILED_PRECONDITION: initializing it again (said at most once a minute)")
                }
                None => {
                    tracing::debug!(plugin = %self.address, "plug-in answered FAILED_PRECONDITION: initializing it again")
                }
            }
            self.reinitialize.notify_one();
        }
    }

    /// Keeps the plug-in informed until `shutdown`: Initialize, full RESYNC, live notifications;
    /// any failure starts over (with a growing pause).
    pub async fn run(
        self: Arc<Self>,
        mut receiver: mpsc::Receiver<Queued>,
        store: Arc<dyn Store>,
        broker_id: String,
        shutdown: CancellationToken,
    ) {
        let mut pause = RETRY_MIN;
        // What failed last, said at warning level when it changes, and again once a minute
        // while it goes on.
        let mut said = FailureSaid::default();
        let mut failed_attempts = 0u32;
        // The link was lost moments after it came up: its next "initialized" line is not said
        // again either (a plug-in that keeps asking for `Initialize`).
        let mut flapping = false;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            // A CA file put right (or rotated) is used from the next attempt on.
            self.renew_channel();
            // A resync that keeps failing does not repeat its "initialized" line every retry.
            let quiet = said.stage() == Some(LinkStage::Resync) || flapping;
            match self
                .connect_and_resync(&mut receiver, store.as_ref(), &broker_id, quiet)
                .await
            {
                Ok(cutoffs) => {
                    if said.stage().is_some() {
                        tracing::info!(
                            plugin = %self.address, failed_attempts,
                            "plug-in initialized and resynced after failed attempts; its answers are used again"
                        );
                    }
                    said = FailureSaid::default();
                    failed_attempts = 0;
                    self.answering.store(true, Ordering::Relaxed);
                    let up_since = Instant::now();
                    let reason = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        reason = self.forward(&mut receiver, cutoffs, store.as_ref()) => reason,
                    };
                    self.set_down();
                    // A link lost moments after it came up (a plug-in that keeps asking for
                    // `Initialize`, or fails right after its resync) is brought up again after
                    // a growing pause, and said once a minute: not a resync of the whole farm,
                    // and a log line, at every decision.
                    match self.link_warnings[0].warn_now() {
                        Some(unwarned) => {
                            tracing::warn!(plugin = %self.address, %reason, since_last_warning = unwarned, "plug-in link lost; will initialize and resync again (said at most once a minute)")
                        }
                        None => {
                            tracing::debug!(plugin = %self.address, %reason, "plug-in link lost; will initialize and resync again")
                        }
                    }
                    flapping = up_since.elapsed() < RETRY_MAX;
                    if !flapping {
                        pause = RETRY_MIN;
                    } else {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(pause) => {}
                        }
                        pause = (pause * 2).min(RETRY_MAX);
                    }
                }
                Err((stage, reason)) => {
                    self.set_down();
                    failed_attempts = failed_attempts.saturating_add(1);
                    let what = match stage {
                        LinkStage::Initialize => {
                            "plug-in not initialized (not reachable, or its Initialize failed); the broker's own picks stand until it is"
                        }
                        LinkStage::Resync => {
                            "plug-in initialized, but its full resync failed; the broker's own picks stand until it works"
                        }
                    };
                    if said.is_due(stage, &reason) {
                        tracing::warn!(
                            plugin = %self.address, %reason, failed_attempts,
                            "{what} (trying again; said again when the reason changes, and once a minute)"
                        );
                        said = FailureSaid::now(stage, reason);
                    } else {
                        tracing::debug!(plugin = %self.address, %reason, retry_in = ?pause, "{what}");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
    }

    async fn connect_and_resync(
        &self,
        receiver: &mut mpsc::Receiver<Queued>,
        store: &dyn Store,
        broker_id: &str,
        quiet: bool,
    ) -> Result<ResyncCutoffs, (LinkStage, String)> {
        let request = pb::InitializeRequest {
            broker_id: broker_id.to_owned(),
            broker_version: env!("CARGO_PKG_VERSION").to_owned(),
            farms: self.farms.clone(),
        };
        let started = Instant::now();
        let mut client = self.client();
        let answer = tokio::time::timeout(CALL_TIMEOUT, client.initialize(request)).await;
        let answer = match answer {
            Ok(Ok(answer)) => {
                self.record("Initialize", "ok", started);
                self.initialized_on
                    .store(self.connections.get(), Ordering::Release);
                answer.into_inner()
            }
            Ok(Err(status)) => {
                self.record("Initialize", "error", started);
                // An HTTP server that is not gRPC shows up as a protocol error.
                let hint = if status.message().contains("protocol error") {
                    " (is a gRPC server listening at this address?)"
                } else {
                    ""
                };
                let reason = format!(
                    "Initialize failed: {:?}: {}{hint}",
                    status.code(),
                    excerpt(status.message())
                );
                return Err((LinkStage::Initialize, reason));
            }
            Err(_) => {
                self.record("Initialize", "timeout", started);
                let reason = format!("Initialize got no answer within {CALL_TIMEOUT:?}");
                return Err((LinkStage::Initialize, reason));
            }
        };
        // Everything queued so far is covered by the resync that follows; so is a request to
        // initialize again made meanwhile (a call that saw the restart this Initialize answers),
        // which `Notify` would otherwise keep for the next `forward` and start over once more.
        while receiver.try_recv().is_ok() {}
        tokio::select! {
            biased;
            _ = self.reinitialize.notified() => {}
            _ = std::future::ready(()) => {}
        }
        self.overflowed.store(false, Ordering::Relaxed);
        self.supports_external
            .store(answer.supports_external_sessions, Ordering::Relaxed);
        // Up before the resync, so that changes during it are queued (and sent after it).
        self.up.store(true, Ordering::Relaxed);
        if quiet {
            tracing::debug!(plugin = %self.address, "plug-in initialized; sending a full resync");
        } else {
            tracing::info!(
                plugin = %self.address, name = %answer.name, external = answer.supports_external_sessions,
                farms = ?self.farms, "plug-in initialized; sending a full resync"
            );
        }
        self.full_resync(store)
            .await
            .map_err(|reason| (LinkStage::Resync, reason))
    }

    /// Sends queued notifications in order, merging live session events into batches, until a
    /// call fails or the queue overflowed.
    async fn forward(
        &self,
        receiver: &mut mpsc::Receiver<Queued>,
        cutoffs: ResyncCutoffs,
        store: &dyn Store,
    ) -> String {
        let mut probe = tokio::time::interval(PROBE_INTERVAL);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.reset();
        loop {
            let received = tokio::select! {
                received = receiver.recv() => received,
                _ = self.reinitialize.notified() => return "a call showed the plug-in needs initializing".to_owned(),
                _ = probe.tick() => {
                    // A CA file changed while the link works: initialized again over a channel
                    // that uses it (one that does not load is warned about, and the channel in
                    // use kept).
                    if self.renew_channel() {
                        return "its CA file changed: initializing it over a connection that uses it"
                            .to_owned();
                    }
                    match self.probe().await {
                        Ok(()) => {
                            self.follow_leases(store).await;
                            continue;
                        }
                        Err(reason) => return reason,
                    }
                }
            };
            let Some(first) = received else {
                return "queue closed".to_owned();
            };
            let mut pending = Vec::new();
            let mut next = Some(first);
            while let Some(queued) = next.take() {
                // What the last full resync's snapshot of its machine already held is not
                // sent again on top of it.
                if !cutoffs.covers(&queued) {
                    pending.push(queued.notice);
                }
                if pending.len() < 1024 {
                    next = receiver.try_recv().ok();
                }
            }
            for notice in notices::merge_live_batches(pending, self.settings.batch_size) {
                if let Err(reason) = self.send(notice).await {
                    return reason;
                }
            }
            if self.overflowed.load(Ordering::Relaxed) {
                return "notifications were dropped".to_owned();
            }
        }
    }

    async fn send(&self, notice: Notice) -> Result<(), String> {
        let started = Instant::now();
        let mut client = self.client();
        if let Notice::Machine(request) = &notice {
            self.note_state_told(request);
        }
        let (method, answer) = match notice {
            Notice::Machine(request) => (
                "MachineChangeNotification",
                tokio::time::timeout(CALL_TIMEOUT, client.machine_change_notification(*request))
                    .await
                    .map(|answer| answer.map(|_| ())),
            ),
            Notice::Sessions(request) => (
                "SessionChangeNotification",
                tokio::time::timeout(CALL_TIMEOUT, client.session_change_notification(request))
                    .await
                    .map(|answer| answer.map(|_| ())),
            ),
        };
        match answer {
            Ok(Ok(())) if self.reconnected() => {
                self.record(method, "ok", started);
                Err(format!("{method} answered over a new connection"))
            }
            Ok(Ok(())) => {
                self.record(method, "ok", started);
                Ok(())
            }
            Ok(Err(status)) => {
                self.record(method, "error", started);
                Err(format!("{method} failed: {}", excerpt(status.message())))
            }
            Err(_) => {
                self.record(method, "timeout", started);
                Err(format!("{method} timed out"))
            }
        }
    }

    /// Whether the plug-in answered over a connection made after its `Initialize` (it may have
    /// restarted, and know nothing): if so, the link initializes and resyncs it again.
    fn reconnected(&self) -> bool {
        if self.connections.get() == self.initialized_on.load(Ordering::Acquire) {
            return false;
        }
        if self.set_down() {
            tracing::warn!(plugin = %self.address, "plug-in reached over a new connection (it may have restarted); initializing it again");
            self.reinitialize.notify_one();
        }
        true
    }

    /// Checks that the plug-in still answers, over the connection it was initialized on: a
    /// health check (a plug-in without the health service answers UNIMPLEMENTED, which is
    /// as good), so that a plug-in that restarted in a quiet farm is initialized again before
    /// the next decision asks it.
    async fn probe(&self) -> Result<(), String> {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel());
        let request = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        match tokio::time::timeout(CALL_TIMEOUT, health.check(request)).await {
            Err(_) => Err("no answer to a health check".to_owned()),
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                Err(format!("health check: {}", excerpt(status.message())))
            }
            Ok(_) if self.reconnected() => {
                Err("the plug-in answered over a new connection (it may have restarted)".to_owned())
            }
            Ok(_) => Ok(()),
        }
    }

    /// Terminated, for a clean shutdown (bounded, best effort).
    pub async fn terminate(&self, reason: &str) {
        if !self.is_up() {
            return;
        }
        let mut client = self.client();
        let request = pb::TerminatedRequest {
            reason: reason.to_owned(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), client.terminated(request)).await;
        self.set_down();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA file with no certificate in it (garbage, a broken block, nothing) is refused: at
    /// start an error, at a renewal the channel in use is kept.
    #[tokio::test]
    async fn a_ca_file_without_a_certificate_is_refused() {
        let path = std::env::temp_dir().join(format!("tsbroker-plugin-ca-{}", Uuid::new_v4()));
        let settings = PluginSettings {
            address: "https://127.0.0.1:50070".to_owned(),
            deadline: Duration::from_millis(100),
            batch_size: 25,
            ca_file: Some(path.clone()),
        };
        let broken = "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n";
        for text in ["garbage", "", broken] {
            std::fs::write(&path, text).unwrap();
            let refused = open(&settings, &ConnectionCount::default()).err();
            let refused = refused.map(|error| format!("{error:#}"));
            assert!(
                refused
                    .as_deref()
                    .is_some_and(|error| error.contains("ca_file")),
                "{text:?}: {refused:?}"
            );
        }
        std::fs::remove_file(&path).unwrap();
    }
}
