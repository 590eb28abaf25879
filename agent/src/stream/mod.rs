//! The agent's stream to the broker: ADDED, Welcome, RESYNC from the session table, READY,
//! then session events and load reports; reconnects with backoff and resyncs after any break;
//! REMOVED on shutdown.

mod displaced;
mod link;
pub mod saved_settings;
#[cfg(test)]
mod tests;
mod tls_probe;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tsbroker_common::model::MachineDescription;
use tsbroker_common::proto::v1 as pb;

use crate::backoff::Backoff;
use crate::broker_link::BrokerLink;
use crate::config::BackoffSettings;
use crate::directory::{Directory, DirectoryEvents};
use crate::load::LoadSampler;

/// What the agent knows of its standing with the broker, for `tsagent status` and the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LinkStatus {
    /// The stream is up and the broker acknowledged READY: the machine is a candidate.
    pub connected: bool,
    /// The machine's id, from the broker's Welcome.
    pub machine_id: String,
    /// The machine's effective settings as the broker last sent them.
    pub draining: bool,
    pub weight: u32,
    pub session_limit: u32,
    /// Single-session mode (this agent's setting): at most one session, whatever the limit.
    #[serde(default)]
    pub single_session: bool,
    pub heartbeat_interval_ms: u64,
    /// Why the last stream ended, if it did.
    pub last_error: String,
    /// Since when no stream has been connected (none since the agent started, or the last one
    /// ended then); `None` while connected.
    #[serde(skip)]
    pub down_since: Option<std::time::Instant>,
}

pub type SharedStatus = Arc<Mutex<LinkStatus>>;

pub(crate) fn update_status(status: &SharedStatus, change: impl FnOnce(&mut LinkStatus)) {
    let mut guard = status
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    change(&mut guard);
}

/// Everything the stream needs.
pub struct StreamContext {
    pub description: MachineDescription,
    /// The channel each stream opens on (shared with the front door), current with the TLS
    /// files, and the agent token.
    pub link: Arc<BrokerLink>,
    pub backoff: BackoffSettings,
    /// Load report interval until the Welcome names one.
    pub default_heartbeat: Duration,
    pub welcome_timeout: Duration,
    /// How often a displaced agent asks whether its machine is free again (`displaced`).
    pub displaced_check: Duration,
    /// How often a stream away from this agent's own replica checks whether it is back.
    pub home_check: Duration,
    pub directory: Directory,
    pub status: SharedStatus,
    /// Where the broker's settings for the machine are kept for the next start.
    pub saved_settings: Arc<saved_settings::SettingsFile>,
    /// On shutdown, REMOVED (leave the farm) rather than only closing the stream.
    pub leave_on_stop: bool,
}

/// Why the stream task stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamExit {
    /// The agent is shutting down (with `leave_on_stop`, REMOVED was sent if the broker was
    /// reachable; otherwise the stream was closed and the machine's sessions stay).
    Shutdown,
    /// The broker said the machine was removed: do not reconnect.
    Removed,
}

/// How one stream ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    Shutdown,
    Removed,
    /// The broker ended the stream (or asked the agent to come back later).
    Ended(String),
    /// The broker said it is going away (a restart, a replica stopping): a planned end, not a
    /// failure. The agent comes back within `BROKER_LEAVING_RETRY`, with its backoff reset.
    BrokerLeaving(String),
    /// The stream was on another replica than this agent's own, and its own serves again: the
    /// agent moves back, so that a farm's agents spread over the replicas again after one of
    /// them was away.
    HomeIsBack,
}

/// How soon an agent reconnects after its broker said it is going (a pick between half of it
/// and all of it): another replica, or the restarted broker, takes it at once, and the
/// machine's users are still sent back to it meanwhile.
const BROKER_LEAVING_RETRY: Duration = Duration::from_secs(1);

/// Runs the stream until shutdown or removal, reconnecting after every break.
pub async fn run(
    context: StreamContext,
    mut events: DirectoryEvents,
    shutdown: CancellationToken,
) -> StreamExit {
    let mut backoff = Backoff::new(context.backoff);
    let mut sampler = LoadSampler::default();
    let mut last_said = SaidFailures::default();
    loop {
        let started = Instant::now();
        let outcome = link::run_once(&context, &mut events, &mut sampler, &shutdown).await;
        // Whether the broker had acknowledged READY on the stream that just ended.
        let mut was_ready = false;
        update_status(&context.status, |status| {
            was_ready = status.connected;
            if was_ready || status.down_since.is_none() {
                status.down_since = Some(std::time::Instant::now());
            }
            status.connected = false;
        });
        if was_ready {
            last_said.clear();
        }
        let mut credentials_refused = false;
        let (reason, retry_after) = match outcome {
            Ok(Outcome::Shutdown) => return StreamExit::Shutdown,
            Ok(Outcome::Removed) => return StreamExit::Removed,
            Ok(Outcome::Ended(reason)) => (reason, None),
            Ok(Outcome::HomeIsBack) => {
                let url = context.link.go_home();
                tracing::info!(
                    broker = url,
                    "this agent's own broker replica serves again: moving the stream back to it"
                );
                backoff.reset();
                while events.try_recv().is_ok() {}
                continue;
            }
            Ok(Outcome::BrokerLeaving(reason)) => {
                backoff.reset();
                (reason, Some(BROKER_LEAVING_RETRY))
            }
            Err(error) if was_ready && displaced::taken_over(&error) => {
                let why = format!(
                    "another agent connected to the broker as machine {:?} of farm {:?} (a \
                     copy of this server with the same name? give each server its own \
                     --machine-name); this agent stays off until that one is gone",
                    context.description.name, context.description.farm
                );
                tracing::error!("{why}");
                update_status(&context.status, |status| status.last_error = why);
                // The table's changes while off are in the next RESYNC: drop them as they come
                // (the wait can last days; kept, they would pile up in memory).
                let free = tokio::select! {
                    free = displaced::wait_until_free(&context, context.displaced_check, &shutdown) => free,
                    () = discard(&mut events) => unreachable!("discard never ends"),
                };
                if !free {
                    return StreamExit::Shutdown;
                }
                tracing::info!("the machine is free again: reconnecting");
                while events.try_recv().is_ok() {}
                continue;
            }
            Err(error) => {
                let mut described = crate::broker_client::describe(&error);
                let mut tls_refused = described.contains("received fatal alert");
                // The broker's refusal of this agent's certificate often arrives as a closed
                // connection only (`tls_probe`): asked once more, in a handshake that listens.
                if !tls_refused
                    && !was_ready
                    && connection_closed(&described)
                    && let Some(alert) =
                        tls_probe::refusal(context.link.url(), context.link.tls()).await
                {
                    described = format!(
                        "{described}; the broker refuses this agent's client certificate: {alert}"
                    );
                    tls_refused = true;
                }
                credentials_refused = refuses_credentials(&error) || tls_refused;
                let reason = if credentials_refused {
                    format!("{described} ({CREDENTIALS_HINT})")
                } else {
                    described
                };
                (reason, retry_after(&error))
            }
        };
        backoff.stream_ended(started.elapsed());
        let delay = match retry_after {
            Some(hint) => backoff.hinted_delay(hint),
            // Fixed by someone, not by time: asked again now and then, not every few seconds.
            None if credentials_refused => backoff.patient_delay(),
            None => backoff.next_delay(),
        };
        // While the broker's database is away the agent asks every second, and a refused
        // credential stays refused until someone fixes it: one warning (an error for the
        // credential), then the same refusal again only at debug. A broker that is down is
        // asked every few seconds: said again once a minute.
        let lasting = retry_after.is_some() || credentials_refused;
        let broker = context.link.url().to_owned();
        let again = last_said.is_repeat(&reason, lasting);
        if again {
            tracing::debug!(%broker, error = %reason, retry_in_ms = delay.as_millis() as u64, "broker stream still down");
        } else if credentials_refused {
            tracing::error!(%broker, error = %reason, retry_in_ms = delay.as_millis() as u64, "broker refuses this agent; retrying until it is fixed");
        } else {
            tracing::warn!(%broker, error = %reason, retry_in_ms = delay.as_millis() as u64, "broker stream down");
        }
        update_status(&context.status, |status| status.last_error = reason);
        // With several replicas given, the next attempt (and the front door's calls) go to the
        // next one: the one that just broke may be the one that is gone. (Said after the
        // failure's own line, which is about the replica before.)
        if let Some(url) = context.link.fail_over(was_ready) {
            // Every second while the database is away: said with a refusal that is news.
            if again {
                tracing::debug!(broker = url, "trying the next broker replica");
            } else {
                tracing::info!(broker = url, "trying the next broker replica");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return StreamExit::Shutdown,
            () = tokio::time::sleep(delay) => {}
        }
        // Changes made while apart are in the table; the next RESYNC carries them.
        while events.try_recv().is_ok() {}
    }
}

/// How often a failure that repeats (the broker down) is said again.
const FAILURE_REMINDER: Duration = Duration::from_secs(60);

/// The failures said, and when: one that is expected to last (the broker's retry hint, a
/// refused credential) is said once, any other once a minute while it repeats. Kept by what
/// was said, whichever replica said it: with two replicas failing in turn for different
/// reasons (one's database away, the other starting or down), each reason is said once, not
/// at every other attempt; replicas that fail alike (all down) say it once between them.
#[derive(Default)]
struct SaidFailures(HashMap<String, Instant>);

/// Most reasons remembered: more (reasons that never repeat) start the memory afresh.
const MOST_SAID: usize = 32;

impl SaidFailures {
    /// Connected in between: a failure from here on is news again, even one said before.
    fn clear(&mut self) {
        self.0.clear();
    }

    /// Whether `reason` was said already (and is not due again); noted when not.
    fn is_repeat(&mut self, reason: &str, lasting: bool) -> bool {
        let repeat = self
            .0
            .get(reason)
            .is_some_and(|at| lasting || at.elapsed() < FAILURE_REMINDER);
        if !repeat {
            if self.0.len() >= MOST_SAID {
                self.0.clear();
            }
            self.0.insert(reason.to_owned(), Instant::now());
        }
        repeat
    }
}

/// What to fix when the broker refused this agent's credentials.
const CREDENTIALS_HINT: &str = "the agent's token (--agent-token, TSAGENT_AGENT_TOKEN) must be the \
     broker's --agent-token, and with TLS client certificates its certificate must be signed by \
     the broker's client CA and name this machine";

/// Whether the broker refused the agent's credentials (UNAUTHENTICATED, PERMISSION_DENIED):
/// retried, as the broker's side may be what gets fixed, but said as what to fix.
fn refuses_credentials(error: &anyhow::Error) -> bool {
    crate::broker_client::status_of(error).is_some_and(|status| {
        matches!(
            status.code(),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        )
    })
}

/// Whether an error's description says the connection closed under the call (what a TLS
/// refusal that came after the handshake looks like to the gRPC client).
fn connection_closed(described: &str) -> bool {
    [
        "connection closed",
        "broken pipe",
        "close_notify",
        "connection reset",
    ]
    .iter()
    .any(|sign| described.contains(sign))
}

/// Receives and drops the table's changes, for ever.
async fn discard(events: &mut DirectoryEvents) {
    while events.recv().await.is_some() {}
    std::future::pending().await
}

/// The broker's own word on when to try again: an UNAVAILABLE it gave while its database is
/// away (the broker is up and will take the stream as soon as its database is back).
fn retry_after(error: &anyhow::Error) -> Option<Duration> {
    let status = crate::broker_client::status_of(error)?;
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    let millis = status
        .metadata()
        .get(tsbroker_common::proto::RETRY_AFTER_MS_METADATA)?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()?;
    Some(Duration::from_millis(millis))
}

/// The settings the broker sent, applied, logged and saved for the next start.
pub(crate) fn apply_settings(context: &StreamContext, settings: &pb::MachineSettings) {
    tracing::info!(
        draining = settings.draining,
        weight = settings.weight,
        session_limit = settings.session_limit,
        "machine settings from the broker"
    );
    set_status(&context.status, settings);
    context.saved_settings.save(settings);
}

/// `settings` as the machine's current ones in `status`.
pub(crate) fn set_status(status: &SharedStatus, settings: &pb::MachineSettings) {
    update_status(status, |status| {
        status.draining = settings.draining;
        status.weight = settings.weight;
        status.session_limit = settings.session_limit;
    });
}
