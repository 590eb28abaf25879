//! One stream from connect to its end: the ADDED/Welcome/RESYNC/READY opening, then events,
//! load reports and the broker's commands; acknowledgements tracked by seq.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::agent_message::Body;
use tsbroker_common::proto::v1::broker_message::Body as Command;

use super::{Outcome, StreamContext, apply_settings, update_status};
use crate::broker_client;
use crate::directory::{DirectoryEvents, NumberedEvent};
use crate::load::LoadSampler;

const OUTBOX_DEPTH: usize = 64;
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
const REMOVED_ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a stopping agent waits for the broker's acknowledgement of its last changes.
const LAST_CHANGES_ACK_TIMEOUT: Duration = Duration::from_secs(3);
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
/// Unacknowledged messages remembered for the log; older ones are forgotten.
const MAX_UNACKED: usize = 4096;
/// What moving to another replica takes (the pause before it, the stream's opening, RESYNC and
/// READY), with room to spare: see [`stall_limit`].
const MOVE_TIME: Duration = Duration::from_secs(3);

/// How long a broker replica may leave a message unacknowledged before the agent moves to the
/// next one. The broker acknowledges a message once it is committed, and a load report's
/// commit is the machine's lease, which the other replicas read: a replica that takes the
/// stream but can no longer commit (its database cut off, or stalled) would let the lease run
/// out while the agent is alive, and the other replicas would send its users to new sessions
/// elsewhere. The limit leaves time to move before that: the heartbeat timeout, less a
/// heartbeat interval (the load report that goes unacknowledged may come that long after the
/// last one that was) and [`MOVE_TIME`]; and never less than a heartbeat interval, so that a
/// busy broker's slower commits do not make its agents move.
pub(super) fn stall_limit(heartbeat_interval: Duration, heartbeat_timeout: Duration) -> Duration {
    heartbeat_timeout
        .saturating_sub(heartbeat_interval)
        .saturating_sub(MOVE_TIME)
        .max(heartbeat_interval)
}

/// The sending half of a stream: numbers messages and remembers which are not yet acked (what
/// they were, and when they were sent).
struct Outbox {
    sender: mpsc::Sender<pb::AgentMessage>,
    seq: u64,
    unacked: BTreeMap<u64, (&'static str, std::time::Instant)>,
}

impl Outbox {
    async fn send(&mut self, body: Body) -> anyhow::Result<u64> {
        self.seq += 1;
        let seq = self.seq;
        let kind = body_kind(&body);
        let message = pb::AgentMessage {
            seq,
            sent_at: Some(std::time::SystemTime::now().into()),
            body: Some(body),
        };
        tokio::time::timeout(SEND_TIMEOUT, self.sender.send(message))
            .await
            .map_err(|_| anyhow!("broker not reading the stream"))?
            .map_err(|_| anyhow!("stream closed"))?;
        self.unacked.insert(seq, (kind, std::time::Instant::now()));
        if self.unacked.len() > MAX_UNACKED {
            self.unacked.pop_first();
        }
        Ok(seq)
    }

    /// What the broker answered about one of our messages.
    fn settle(&mut self, command: &Command) {
        match command {
            Command::Ack(ack) => {
                self.unacked.remove(&ack.seq);
            }
            Command::Reject(reject) => {
                let kind = self
                    .unacked
                    .remove(&reject.seq)
                    .map_or("unknown", |(kind, _)| kind);
                tracing::warn!(
                    seq = reject.seq,
                    message_kind = kind,
                    code = reject.code,
                    reason = %reject.message,
                    "broker rejected a message"
                );
            }
            _ => {}
        }
    }

    /// When the oldest message the broker has not acknowledged was sent.
    fn oldest_unacked(&self) -> Option<std::time::Instant> {
        self.unacked.first_key_value().map(|(_, (_, sent))| *sent)
    }
}

fn body_kind(body: &Body) -> &'static str {
    match body {
        Body::Added(_) => "added",
        Body::Resync(_) => "resync",
        Body::Ready(_) => "ready",
        Body::SessionEvent(_) => "session_event",
        Body::Load(_) => "load",
        Body::Removed(_) => "removed",
    }
}

/// Connects, opens the stream, and serves it until it ends.
pub(super) async fn run_once(
    context: &StreamContext,
    events: &mut DirectoryEvents,
    sampler: &mut LoadSampler,
    shutdown: &CancellationToken,
) -> anyhow::Result<Outcome> {
    // A renewed certificate or CA is used from the next connection on. The channel (shared with
    // the front door) connects with the call below if it is not connected.
    context.link.reload_if_changed();
    let mut client = broker_client::gateway(context.link.channel(), context.link.token());
    let (sender, receiver) = mpsc::channel(OUTBOX_DEPTH);
    let mut outbox = Outbox {
        sender,
        seq: 0,
        unacked: BTreeMap::new(),
    };
    outbox
        .send(Body::Added(pb::MachineDescription::from(
            &context.description,
        )))
        .await?;
    let response = tokio::select! {
        () = shutdown.cancelled() => return Ok(Outcome::Shutdown),
        // Bounded like the welcome: a proxy or a broker that takes the connection and never
        // answers must not hold the agent here.
        response = tokio::time::timeout(context.welcome_timeout, client.connect(ReceiverStream::new(receiver))) => {
            response.map_err(|_| anyhow!("the broker did not answer the stream's opening"))?.context("open stream")?
        }
    };
    let mut inbound = response.into_inner();
    let welcome = tokio::select! {
        () = shutdown.cancelled() => return Ok(Outcome::Shutdown),
        welcome = tokio::time::timeout(context.welcome_timeout, wait_for_welcome(&mut inbound, &mut outbox)) => {
            welcome.map_err(|_| anyhow!("no welcome from the broker"))??
        }
    };
    let welcome = match welcome {
        Ok(welcome) => welcome,
        Err(outcome) => return Ok(outcome),
    };
    let heartbeat = match welcome.heartbeat_interval_ms {
        0 => context.default_heartbeat,
        millis => Duration::from_millis(u64::from(millis)),
    }
    .max(MIN_HEARTBEAT);
    if let Some(settings) = &welcome.settings {
        apply_settings(context, settings);
    }
    // Everything in the table up to `version` goes in the RESYNC; later changes follow it.
    let (mut version, session_count) = resync(context, &mut outbox).await?;
    let ready_seq = outbox.send(Body::Ready(pb::MachineReady {})).await?;
    tracing::info!(
        machine_id = %welcome.machine_id,
        sessions = session_count,
        heartbeat_ms = heartbeat.as_millis() as u64,
        "connected to the broker, sessions sent (RESYNC); waiting for it to take the machine ready"
    );
    // `connected` waits for the broker's acknowledgement of READY (see `handle_command`).
    update_status(&context.status, |status| {
        status.machine_id = welcome.machine_id.clone();
        status.heartbeat_interval_ms = heartbeat.as_millis() as u64;
        status.last_error.clear();
    });

    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let heartbeat_timeout = match welcome.heartbeat_timeout_ms {
        0 => heartbeat * 3,
        millis => Duration::from_millis(u64::from(millis)),
    };
    // Only where there is another replica to move to.
    let stall_limit =
        (context.link.replicas() > 1).then(|| stall_limit(heartbeat, heartbeat_timeout));
    let away_from_home = context.link.away_from_home();
    let home_is_back = home_is_back(context);
    tokio::pin!(home_is_back);
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                send_last_changes(&mut outbox, &mut inbound, events, version).await;
                if context.leave_on_stop {
                    say_goodbye(&mut outbox, &mut inbound).await;
                }
                // Otherwise the stream just closes: the broker marks the machine unreachable
                // and keeps its sessions, whose users it still sends here for its heartbeat
                // timeout — long enough for a restart.
                return Ok(Outcome::Shutdown);
            }
            message = inbound.message() => {
                let Some(message) = message.context("broker stream")? else {
                    return Ok(Outcome::Ended("broker ended the stream".to_owned()));
                };
                if let Some(Command::Resync(request)) = &message.body {
                    tracing::info!(reason = %request.reason, "the broker asks for this machine's sessions again: resyncing");
                    (version, _) = resync(context, &mut outbox).await?;
                    continue;
                }
                if let Some(outcome) = handle_command(context, &mut outbox, message, ready_seq) {
                    return Ok(outcome);
                }
            }
            Some(event) = events.recv() => {
                if event.version > version {
                    outbox.send(session_event(&event)).await?;
                }
            }
            () = &mut home_is_back, if away_from_home => return Ok(Outcome::HomeIsBack),
            // Once READY is acknowledged (a RESYNC's commit may take long in a farm's restart).
            () = stalled(&outbox, stall_limit), if !outbox.unacked.contains_key(&ready_seq) => {
                let limit = stall_limit.unwrap_or_default();
                return Ok(Outcome::Ended(format!(
                    "the broker acknowledged nothing for {:.1} s (its database cut off or \
                     stalled?): moving to another replica before this machine's lease runs out",
                    limit.as_secs_f64()
                )));
            }
            _ = ticker.tick() => {
                let (session_count, pending_logons) = context.directory.counts();
                let (cpu_percent, memory_percent) = sampler.sample();
                let load = pb::LoadReport { session_count, cpu_percent, memory_percent, pending_logons };
                outbox.send(Body::Load(load)).await?;
            }
        }
    }
}

/// Sends a RESYNC of the whole session table; returns the table's version it holds (the
/// changes up to it are in it: only later ones follow) and how many sessions it lists.
async fn resync(context: &StreamContext, outbox: &mut Outbox) -> anyhow::Result<(u64, usize)> {
    let (version, sessions) = context.directory.snapshot();
    let session_count = sessions.len();
    let sessions = sessions.iter().map(pb::SessionInfo::from).collect();
    outbox
        .send(Body::Resync(pb::SessionResync { sessions }))
        .await?;
    Ok((version, session_count))
}

/// Returns once the oldest message the broker has not acknowledged is `limit` old; never
/// without a limit or such a message.
async fn stalled(outbox: &Outbox, limit: Option<Duration>) {
    match (outbox.oldest_unacked(), limit) {
        (Some(sent), Some(limit)) => {
            tokio::time::sleep_until(tokio::time::Instant::from_std(sent + limit)).await;
        }
        _ => std::future::pending().await,
    }
}

/// Returns once this agent's own replica answers its health check with SERVING, asked every
/// `home_check` (with a quarter of it as jitter, so that a farm's agents do not all move at
/// once).
async fn home_is_back(context: &StreamContext) {
    loop {
        let every = context.home_check;
        let jitter_ms = (every.as_millis() / 4) as u64;
        let jitter =
            Duration::from_millis(rand::Rng::random_range(&mut rand::rng(), 0..=jitter_ms));
        tokio::time::sleep(every + jitter).await;
        if context.link.home_serving().await {
            return;
        }
    }
}

/// Reads until the Welcome; `Err(outcome)` when the broker ends things first.
async fn wait_for_welcome(
    inbound: &mut Streaming<pb::BrokerMessage>,
    outbox: &mut Outbox,
) -> anyhow::Result<Result<pb::Welcome, Outcome>> {
    loop {
        let Some(message) = inbound.message().await.context("broker stream")? else {
            bail!("broker ended the stream before its welcome");
        };
        match message.body {
            Some(Command::Welcome(welcome)) => return Ok(Ok(welcome)),
            Some(Command::Reject(reject)) if reject.seq == 1 => {
                bail!(
                    "broker refused the machine: {} (code {})",
                    reject.message,
                    reject.code
                );
            }
            Some(Command::Shutdown(shutdown)) => return Ok(Err(shutdown_outcome(&shutdown))),
            Some(command) => outbox.settle(&command),
            None => {}
        }
    }
}

fn shutdown_outcome(shutdown: &pb::Shutdown) -> Outcome {
    if shutdown.removed {
        tracing::warn!(reason = %shutdown.reason, "the broker removed this machine, stopping");
        Outcome::Removed
    } else {
        Outcome::BrokerLeaving(format!("broker asked the agent to go: {}", shutdown.reason))
    }
}

/// Handles one message from the broker; `Some` ends the stream. The acknowledgement of READY
/// (`ready_seq`) marks the link connected: from then on the broker has the machine READY.
fn handle_command(
    context: &StreamContext,
    outbox: &mut Outbox,
    message: pb::BrokerMessage,
    ready_seq: u64,
) -> Option<Outcome> {
    match message.body? {
        Command::Settings(settings) => apply_settings(context, &settings),
        Command::Shutdown(shutdown) => return Some(shutdown_outcome(&shutdown)),
        Command::Welcome(_) => tracing::debug!("second welcome ignored"),
        Command::Ack(ack) if ack.seq == ready_seq => {
            outbox.settle(&Command::Ack(ack));
            tracing::info!("the broker has this machine ready");
            update_status(&context.status, |status| {
                status.connected = true;
                status.down_since = None;
            });
        }
        // RESYNC (sent just before READY) or READY refused: the machine would stay JOINING on
        // this stream for ever. End it: the reason goes to the log and `tsagent status`, and
        // the agent tries again after a pause.
        Command::Reject(reject) if reject.seq == ready_seq || reject.seq + 1 == ready_seq => {
            let kind = if reject.seq == ready_seq {
                "READY"
            } else {
                "RESYNC"
            };
            return Some(Outcome::Ended(format!(
                "the broker refused this machine's {kind} (code {}): {}",
                reject.code, reject.message
            )));
        }
        command => outbox.settle(&command),
    }
    None
}

fn session_event(event: &NumberedEvent) -> Body {
    Body::SessionEvent(pb::SessionEvent {
        r#type: event.kind.to_proto() as i32,
        session: Some(pb::SessionInfo::from(&event.session)),
    })
}

/// The table's changes not yet acknowledged when the agent stops (the sessions whose
/// front-door connections the stop cut, now DISCONNECTED): sent, and the broker's
/// acknowledgements of everything sent awaited — the broker commits before it acknowledges,
/// and a stream closed earlier loses what it has not read — for up to
/// [`LAST_CHANGES_ACK_TIMEOUT`]. Without them the broker would show those sessions ACTIVE
/// until the agent is back. (What goes unacknowledged is in the saved table and the next
/// start's RESYNC.)
async fn send_last_changes(
    outbox: &mut Outbox,
    inbound: &mut Streaming<pb::BrokerMessage>,
    events: &mut DirectoryEvents,
    version: u64,
) {
    let mut changes = 0;
    while let Ok(event) = events.try_recv() {
        if event.version > version {
            if outbox.send(session_event(&event)).await.is_err() {
                return;
            }
            changes += 1;
        }
    }
    if changes > 0 {
        tracing::info!(
            changes,
            "sending the session table's last changes before stopping"
        );
    }
    let acked = tokio::time::timeout(LAST_CHANGES_ACK_TIMEOUT, async {
        while !outbox.unacked.is_empty() {
            match inbound.message().await {
                Ok(Some(message)) => {
                    if let Some(command) = &message.body {
                        outbox.settle(command);
                    }
                }
                _ => return false,
            }
        }
        true
    })
    .await;
    if !matches!(acked, Ok(true)) {
        tracing::warn!(
            unacknowledged = outbox.unacked.len(),
            "the broker did not acknowledge the last session changes before the agent stopped: \
             the next start's RESYNC carries them"
        );
    }
}

/// REMOVED, then a short wait for its acknowledgement.
async fn say_goodbye(outbox: &mut Outbox, inbound: &mut Streaming<pb::BrokerMessage>) {
    let removed = Body::Removed(pb::MachineRemoved {
        reason: "agent shutting down".to_owned(),
    });
    let Ok(seq) = outbox.send(removed).await else {
        return;
    };
    let acked = tokio::time::timeout(REMOVED_ACK_TIMEOUT, async {
        while let Ok(Some(message)) = inbound.message().await {
            if let Some(Command::Ack(ack)) = &message.body
                && ack.seq == seq
            {
                return true;
            }
        }
        false
    })
    .await;
    match acked {
        Ok(true) => tracing::info!("broker acknowledged the machine's removal"),
        _ => tracing::warn!("no acknowledgement of the machine's removal"),
    }
}
