//! `tsbroker.v1.AgentGateway`: one long-lived stream per agent. Each stream runs as its own
//! task (`AgentStream`): it checks the order (ADDED, RESYNC, READY, then events), applies each
//! message to the store and acknowledges it only after the change is durable, watches the
//! heartbeat, and forwards administrators' changes to the agent as commands. Its writes (ADDED,
//! RESYNC, READY, runs of session events, load reports, the UNREACHABLE mark at its end) go
//! through the group-commit writer (`store::ingest`), which applies many streams' writes in one
//! transaction; a stream has one write in flight at a time, so its own order holds. Messages
//! are read in batches (`inbound`): a run of session events is one write.

use crate::decision::Decider;
use crate::decision::policy::SESSION_COUNT;
use crate::error::ApiError;
use crate::metrics::{KindLabels, Metrics};
use crate::plugin::{PluginHub, notices};
use crate::service::agent_clock::{self, AgentClock, ClockMemory};
use crate::service::changes::{ChangeRouter, ChangeSubscription};
use crate::service::hearing::Hearing;
use crate::service::inbound::{Inbound, InboundEnd};
use crate::service::{CoreCell, convert};
use crate::store::{
    EventOutcome, IngestWriter, MachineRecord, Store, StoreError, StreamMachineState,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::CertificateDer;
use tonic::{Code, Request, Response, Status, Streaming};
use tsbroker_common::model::{
    self, LoadReport, MachineDescription, MachineState, SessionEvent, SessionInfo,
};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::agent_message::Body;
use tsbroker_common::proto::v1::broker_message::Body as Reply;
use uuid::Uuid;

/// How long a stopping broker waits to mark a machine unreachable before its agent is told.
/// How long a stream whose machine another stream took waits for its agent's end before the
/// takeover is taken for another server's (an agent moving between replicas ends it itself).
const MOVE_END_WAIT: Duration = Duration::from_millis(500);

const MARK_WAIT_WHEN_STOPPING: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct GatewaySettings {
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    /// Client certificates are required (TLS with a client CA): a stream may speak only for
    /// the machine its certificate names.
    pub machine_named_by_certificate: bool,
}

pub struct GatewayApi {
    core: CoreCell,
    settings: GatewaySettings,
    shutdown: CancellationToken,
    /// Each machine's clock measures, from one of its streams to the next.
    clocks: Arc<ClockMemory>,
}

impl GatewayApi {
    pub fn new(core: CoreCell, settings: GatewaySettings, shutdown: CancellationToken) -> Self {
        GatewayApi {
            core,
            settings,
            shutdown,
            clocks: Arc::default(),
        }
    }
}

#[tonic::async_trait]
impl pb::agent_gateway_server::AgentGateway for GatewayApi {
    type ConnectStream = ReceiverStream<Result<pb::BrokerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        // An IPv4 agent of a dual-stack [::] listener logged as IPv4, not `[::ffff:…]`.
        let peer = request
            .remote_addr()
            .map(tsbroker_common::model::canonical_socket_address);
        let certificate = request
            .peer_certs()
            .and_then(|chain| chain.first().cloned());
        if !self.core.get()?.database.is_up() {
            // Nothing of a stream can be written now; the status says when to come back (not
            // logged: the health monitor said it once, and agents ask every second).
            return Err(crate::error::database_unavailable());
        }
        let (outbound, receiver) = mpsc::channel(64);
        let stream = AgentStream {
            store: self.core.get()?.store.clone(),
            ingest: self.core.get()?.ingest.clone(),
            changes: self.core.get()?.changes.clone(),
            subscription: None,
            decider: self.core.get()?.decider.clone(),
            plugins: self.core.get()?.plugins.clone(),
            metrics: self.core.get()?.metrics.clone(),
            settings: self.settings.clone(),
            outbound,
            peer,
            certificate,
            connection: crate::store::ingest::connection_id(self.core.get()?.store.now()),
            machine: None,
            claimed_name: None,
            last_seq: 0,
            resynced: false,
            hearing: Hearing::new(tokio::time::Instant::now()),
            settings_sent: None,
            clock: AgentClock::new(
                self.core.get()?.metrics.agent_clocks_off.clone(),
                self.clocks.clone(),
            ),
        };
        stream.metrics.agent_streams.inc();
        let inbound = Inbound::new(request.into_inner());
        let database_returns = self.core.get()?.database.returns();
        tokio::spawn(stream.run(inbound, database_returns, self.shutdown.clone()));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// Why a stream ended.
#[derive(Debug)]
enum StreamEnd {
    /// The agent closed its side.
    Closed,
    /// The agent said REMOVED.
    Removed,
    /// An administrator removed the machine.
    RemovedByAdmin,
    /// Nothing arrived within the heartbeat timeout.
    Silent,
    /// The transport failed.
    Transport(Status),
    /// The broker is shutting down.
    BrokerShutdown,
    /// The agent broke the protocol, or the store refused; the status says why.
    Refused(Status),
    /// A newer stream took the machine over.
    Superseded,
}

impl StreamEnd {
    /// The agent's stream failed: a message this broker could not take (larger than the
    /// limit, or not a valid `AgentMessage`) is the agent's fault, and it hears why; anything
    /// else is the connection's.
    fn inbound_failed(status: Status) -> StreamEnd {
        match status.code() {
            Code::OutOfRange | Code::ResourceExhausted => StreamEnd::Refused(Status::new(
                status.code(),
                format!("an agent message was refused: {}", status.message()),
            )),
            Code::Internal if status.message().contains("decode") => {
                StreamEnd::Refused(Status::invalid_argument(format!(
                    "an agent message is not a valid AgentMessage: {}",
                    status.message()
                )))
            }
            _ => StreamEnd::Transport(status),
        }
    }
}

impl std::fmt::Display for StreamEnd {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamEnd::Closed => formatter.write_str("the agent closed its stream"),
            StreamEnd::Removed => formatter.write_str("the agent left the farm"),
            StreamEnd::RemovedByAdmin => formatter.write_str("removed by an administrator"),
            StreamEnd::Silent => formatter.write_str("nothing heard within the heartbeat timeout"),
            StreamEnd::Transport(status) => write!(
                formatter,
                "the connection failed ({:?}: {})",
                status.code(),
                status.message()
            ),
            StreamEnd::BrokerShutdown => formatter.write_str("this broker is stopping"),
            StreamEnd::Refused(status) => write!(
                formatter,
                "refused ({:?}: {})",
                status.code(),
                status.message()
            ),
            StreamEnd::Superseded => {
                formatter.write_str("a newer connection took the machine over")
            }
        }
    }
}

struct AgentStream {
    store: Arc<dyn Store>,
    /// Group commit of the stream's writes.
    ingest: IngestWriter,
    /// The change feed, routed by machine.
    changes: Arc<ChangeRouter>,
    /// This stream's machine's changes (from ADDED on).
    subscription: Option<ChangeSubscription>,
    /// For the farms' settings (a new farm's initial policy).
    decider: Arc<Decider>,
    /// Told of every change, after it is durable.
    plugins: Arc<PluginHub>,
    metrics: Arc<Metrics>,
    settings: GatewaySettings,
    outbound: mpsc::Sender<Result<pb::BrokerMessage, Status>>,
    peer: Option<SocketAddr>,
    /// The client certificate the agent presented, if any (verified by the TLS handshake).
    certificate: Option<CertificateDer<'static>>,
    /// This stream's id; the store refuses its writes once another stream owns the machine.
    connection: Uuid,
    machine: Option<MachineRecord>,
    /// The name a valid ADDED gave, for the log while that ADDED is not (or could not be)
    /// stored: a stream refused because the database is away still says whose it was.
    claimed_name: Option<String>,
    last_seq: u64,
    resynced: bool,
    /// When the agent's messages arrived.
    hearing: Hearing,
    /// The settings the agent last heard, so unchanged settings are not sent again.
    settings_sent: Option<pb::MachineSettings>,
    /// The agent's clock against the broker's: its logon times are corrected by it.
    clock: AgentClock,
}

impl AgentStream {
    /// The stream's task, one for each agent and alive as long as its stream: what it does with
    /// a message (the store's round trip, the settings' push, the end) is boxed, so that the
    /// task between messages holds little more than the stream's state (2.5 KiB where it held
    /// 5.4: 28 MiB less at 10,000 agents; BENCHMARKS.md, thirty-third run).
    async fn run(
        mut self,
        mut inbound: Inbound<Streaming<pb::AgentMessage>>,
        mut database_returns: tokio::sync::watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
        let end = loop {
            let change = async {
                match &self.subscription {
                    Some(subscription) => subscription.changed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break StreamEnd::BrokerShutdown,
                () = change => {
                    // A store call may wait long while the database is away: the broker's
                    // stop does not wait for it (what it leaves undone, the agent resyncs).
                    let pushed = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => Err(StreamEnd::BrokerShutdown),
                        pushed = Box::pin(self.push_settings()) => pushed,
                    };
                    match pushed {
                        // An agent moving to another replica ends this stream as it opens the
                        // next one, and its end may come here after the other replica's news:
                        // an end within a moment is that, not a takeover by a copy of the
                        // server.
                        Err(StreamEnd::Superseded) if inbound.ends_within(MOVE_END_WAIT).await => {
                            break StreamEnd::Closed;
                        }
                        Err(end) => break end,
                        Ok(()) => {}
                    }
                },
                // The database is back after an outage, and may have lost commits it had
                // acknowledged (a crash with asynchronous commit, a failover to a standby that
                // lagged): the agent sends its sessions again.
                Ok(()) = database_returns.changed() => {
                    if self.machine.is_some() {
                        let reason = "the broker's database was away and is back: it may have \
                                      lost changes it had acknowledged";
                        if let Err(end) = self.ask_resync(reason).await {
                            break end;
                        }
                    }
                },
                // From the last message heard, not from this wake: settings changes must not
                // keep a silent agent's stream alive.
                received = tokio::time::timeout_at(
                    self.hearing.last() + self.settings.heartbeat_timeout,
                    inbound.next(),
                ) => {
                    let first = match received {
                        Err(_) => break StreamEnd::Silent,
                        Ok(Some(Err(status))) => break StreamEnd::inbound_failed(status),
                        Ok(None) => break StreamEnd::Closed,
                        Ok(Some(Ok(message))) => message,
                    };
                    self.hearing
                        .heard(tokio::time::Instant::now(), self.settings.heartbeat_interval);
                    let (batch, after) = inbound.batch(first).await;
                    // Unacknowledged, the batch is sent again after the agent's reconnection.
                    let handled = tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => Err(StreamEnd::BrokerShutdown),
                        handled = Box::pin(self.handle_batch(batch)) => handled,
                    };
                    if let Err(end) = handled {
                        break end;
                    }
                    match after {
                        None => {}
                        Some(InboundEnd::Closed) => break StreamEnd::Closed,
                        Some(InboundEnd::Failed(status)) => break StreamEnd::inbound_failed(status),
                    }
                }
            }
        };
        Box::pin(self.finish(end)).await;
    }

    fn count(&self, kind: &'static str) {
        self.metrics
            .agent_messages
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    fn machine_id(&self) -> Option<Uuid> {
        self.machine.as_ref().map(|machine| machine.id)
    }

    async fn send(&self, reply: Reply) -> Result<(), StreamEnd> {
        let message = pb::BrokerMessage { body: Some(reply) };
        self.outbound
            .send(Ok(message))
            .await
            .map_err(|_| StreamEnd::Closed)
    }

    /// Asks the agent for a RESYNC of its sessions, saying why.
    async fn ask_resync(&self, reason: &str) -> Result<(), StreamEnd> {
        let reason = reason.to_owned();
        self.send(Reply::Resync(pb::ResyncRequest { reason })).await
    }

    async fn ack(&self, seq: u64) -> Result<(), StreamEnd> {
        self.send(Reply::Ack(pb::Ack { seq })).await
    }

    async fn reject(&self, seq: u64, code: Code, message: String) -> Result<(), StreamEnd> {
        tracing::warn!(machine = self.who(), seq, ?code, %message, "agent message rejected");
        self.send(Reply::Reject(pb::Reject {
            seq,
            code: code as i32,
            message,
        }))
        .await
    }

    fn machine_name(&self) -> Option<&str> {
        self.machine.as_ref().map(|machine| machine.name.as_str())
    }

    /// The machine's name for the log (the name its ADDED claims until that is stored), `-`
    /// before its ADDED.
    fn who(&self) -> &str {
        self.machine_name()
            .or(self.claimed_name.as_deref())
            .unwrap_or("-")
    }

    /// The agent's address for the log, `-` when unknown.
    fn peer_label(&self) -> String {
        self.peer
            .map_or_else(|| "-".to_owned(), |peer| peer.to_string())
    }

    /// Handles messages in order; runs of session events go to the store as one transaction.
    async fn handle_batch(&mut self, batch: Vec<pb::AgentMessage>) -> Result<(), StreamEnd> {
        let mut events: Vec<(u64, SessionEvent)> = Vec::new();
        for message in batch {
            let Some(seq) = self.accept_seq(message.seq).await? else {
                continue;
            };
            let now = self.store.now();
            if let Some(Body::Added(added)) = &message.body {
                self.clock
                    .machine(model::machine_id(&added.farm, &added.name));
            }
            let clock_news = message
                .sent_at
                .as_ref()
                .and_then(|sent_at| self.clock.heard(model::timestamp_to_millis(sent_at), now));
            match message.body {
                Some(Body::SessionEvent(event)) if self.machine.is_some() => {
                    match SessionEvent::try_from(event) {
                        Ok(mut event) => {
                            let logon = event.session.logon_time_ms;
                            event.session.logon_time_ms = self.clock.logon_time(logon, now);
                            events.push((seq, event));
                        }
                        Err(error) => {
                            self.flush_events(&mut events).await?;
                            self.reject(seq, Code::InvalidArgument, error.to_string())
                                .await?;
                        }
                    }
                }
                body => {
                    self.flush_events(&mut events).await?;
                    self.handle(seq, body).await?;
                }
            }
            // After the message: an ADDED has named the machine by then.
            if let Some(news) = clock_news {
                let off = matches!(news, agent_clock::ClockNews::Off(_));
                agent_clock::say(self.who(), news);
                if off && self.resynced {
                    // Its sessions were taken before this offset was known (a clock behind
                    // shows only after several messages): again, corrected.
                    let reason = "this machine's clock is off the broker's: its sessions again, \
                                  their logon times corrected";
                    self.ask_resync(reason).await?;
                }
            }
        }
        self.flush_events(&mut events).await
    }

    /// Checks the sequence number: `None` for a repeat (acknowledged again, not applied).
    async fn accept_seq(&mut self, seq: u64) -> Result<Option<u64>, StreamEnd> {
        if seq == 0 {
            return Err(StreamEnd::Refused(Status::invalid_argument(
                "seq must start at 1 and increase with every message",
            )));
        }
        if seq <= self.last_seq {
            tracing::debug!(
                seq,
                last = self.last_seq,
                "repeated message acknowledged again"
            );
            self.ack(seq).await?;
            return Ok(None);
        }
        self.last_seq = seq;
        Ok(Some(seq))
    }

    async fn handle(&mut self, seq: u64, body: Option<Body>) -> Result<(), StreamEnd> {
        let Some(body) = body else {
            return self
                .reject(seq, Code::InvalidArgument, "message has no body".into())
                .await;
        };
        let machine = match (&body, &self.machine) {
            (Body::Added(description), _) => return self.on_added(seq, description.clone()).await,
            (_, None) => {
                return Err(StreamEnd::Refused(Status::failed_precondition(
                    "the first message of a stream must be ADDED",
                )));
            }
            (_, Some(machine)) => machine.id,
        };
        let now = self.store.now();
        match body {
            Body::Added(_) => unreachable!("handled above"),
            Body::Resync(resync) => {
                let mut sessions = match validate_sessions(resync.sessions) {
                    Ok(sessions) => sessions,
                    Err(message) => return self.reject(seq, Code::InvalidArgument, message).await,
                };
                for session in &mut sessions {
                    session.logon_time_ms = self.clock.logon_time(session.logon_time_ms, now);
                }
                // The plug-in's copy, made before the store takes the list, only for a farm
                // with a plug-in: after a broker's restart every agent's list is in flight at
                // once.
                let for_plugin = self
                    .machine
                    .as_ref()
                    .filter(|record| self.plugins.for_farm(&record.farm).is_some())
                    .map(|record| {
                        sessions
                            .iter()
                            .map(|session| notices::session_from_info(record, session, now))
                            .collect()
                    });
                let count = sessions.len();
                self.store_call(self.ingest.resync(machine, self.connection, sessions))
                    .await?;
                self.resynced = true;
                tracing::info!(machine = self.who(), sessions = count, "sessions resynced");
                if let (Some(record), Some(sessions)) = (&self.machine, for_plugin) {
                    self.plugins
                        .resync_sessions(&record.farm, &record.id.to_string(), sessions);
                }
                self.count("resync");
            }
            Body::Ready(_) => {
                if !self.resynced {
                    let message = "send RESYNC before READY".to_owned();
                    return self.reject(seq, Code::FailedPrecondition, message).await;
                }
                let record = self
                    .store_call(self.ingest.ready(machine, self.connection))
                    .await?;
                tracing::info!(machine = %record.name, farm = %record.farm, "machine ready");
                self.plugins
                    .notify(&record.farm, notices::machine_state_changed(&record));
                self.machine = Some(record);
                self.count("ready");
            }
            Body::Load(load) => {
                let load = match LoadReport::try_from(load) {
                    Ok(load) => load,
                    Err(error) => {
                        return self
                            .reject(seq, Code::InvalidArgument, error.to_string())
                            .await;
                    }
                };
                self.store_call(self.ingest.load(machine, self.connection, load))
                    .await?;
                self.count("load");
            }
            Body::Removed(removed) => {
                self.store_call(self.store.set_machine_state(
                    machine,
                    self.connection,
                    StreamMachineState::Removed,
                    now,
                ))
                .await?;
                tracing::info!(machine = self.who(), reason = %removed.reason, "machine removed by its agent");
                if let Some(record) = &self.machine {
                    let notice = notices::machine_removed(
                        &record.id.to_string(),
                        &record.name,
                        &record.farm,
                    );
                    self.plugins.notify(&record.farm, notice);
                }
                self.count("removed");
                self.ack(seq).await?;
                return Err(StreamEnd::Removed);
            }
            Body::SessionEvent(_) => unreachable!("batched by handle_batch"),
        }
        self.ack(seq).await
    }

    async fn on_added(
        &mut self,
        seq: u64,
        description: pb::MachineDescription,
    ) -> Result<(), StreamEnd> {
        let description = MachineDescription::try_from(description).map_err(|error| {
            StreamEnd::Refused(Status::invalid_argument(format!("ADDED: {error}")))
        })?;
        if self.machine.is_none() {
            self.claimed_name = Some(description.name.clone());
        }
        if self.settings.machine_named_by_certificate {
            let named = match &self.certificate {
                Some(certificate) => {
                    crate::tls::certificate_names_machine(certificate, &description.name)
                }
                None => Err("no client certificate".to_owned()),
            };
            if let Err(why) = named {
                tracing::warn!(machine = %description.name, peer = %self.peer_label(), why, "ADDED refused");
                return Err(StreamEnd::Refused(Status::permission_denied(format!(
                    "ADDED: {why}"
                ))));
            }
        }
        let id = model::machine_id(&description.farm, &description.name);
        if self.machine_id().is_some_and(|current| current != id) {
            return Err(StreamEnd::Refused(Status::failed_precondition(
                "a stream speaks for one machine; open another stream for another machine",
            )));
        }
        // Listen before the ADDED is committed, so no change made after it is missed.
        if self
            .subscription
            .as_ref()
            .is_none_or(|subscription| subscription.machine() != id)
        {
            self.subscription = Some(self.changes.subscribe(id, self.connection));
        }
        let new_farm_policy = self
            .decider
            .farm_settings(&description.farm)
            .policy
            .clone()
            .unwrap_or_else(|| SESSION_COUNT.to_owned());
        let record = self
            .store_call(
                self.ingest
                    .machine_added(description, &new_farm_policy, self.connection),
            )
            .await?;
        tracing::info!(
            machine = %record.name, farm = %record.farm, id = %record.id, peer = %self.peer_label(),
            version = %record.agent_version, "machine added"
        );
        self.resynced = false;
        let settings = convert::settings(&record);
        self.send(Reply::Welcome(pb::Welcome {
            machine_id: record.id.to_string(),
            heartbeat_interval_ms: self.settings.heartbeat_interval.as_millis() as u32,
            heartbeat_timeout_ms: self.settings.heartbeat_timeout.as_millis() as u32,
            settings: Some(settings),
        }))
        .await?;
        self.settings_sent = Some(settings);
        self.plugins
            .notify(&record.farm, notices::machine_added(&record));
        self.count("added");
        self.clock.keep_for_next_stream();
        self.machine = Some(record);
        self.ack(seq).await
    }

    async fn flush_events(
        &mut self,
        events: &mut Vec<(u64, SessionEvent)>,
    ) -> Result<(), StreamEnd> {
        let Some(machine) = self.machine_id() else {
            events.clear();
            return Ok(());
        };
        if events.is_empty() {
            return Ok(());
        }
        let batch: Vec<SessionEvent> = events.iter().map(|(_, event)| event.clone()).collect();
        let outcomes = self
            .store_call(self.ingest.events(machine, self.connection, batch))
            .await?;
        let now = self.store.now();
        for ((seq, event), outcome) in events.drain(..).zip(outcomes) {
            match outcome {
                EventOutcome::Applied => {}
                EventOutcome::Repaired(what) | EventOutcome::Ignored(what) => tracing::info!(
                    machine = self.who(), session = event.session.session_id,
                    user = %event.session.user_name, kind = ?event.kind, "{what}"
                ),
            }
            if let (Some(record), false) =
                (&self.machine, matches!(outcome, EventOutcome::Ignored(_)))
            {
                let session = notices::session_from_info(record, &event.session, now);
                self.plugins.notify(
                    &record.farm,
                    notices::session_event(record, event.kind, session),
                );
            }
            self.count("session_event");
            self.ack(seq).await?;
        }
        Ok(())
    }

    /// Runs a store call; a failure ends the stream (the agent reconnects and resyncs).
    async fn store_call<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StreamEnd> {
        call.await.map_err(|error| match error {
            StoreError::Superseded => StreamEnd::Superseded,
            StoreError::NotFound(_) => StreamEnd::RemovedByAdmin,
            other => StreamEnd::Refused(ApiError::Store(other).into()),
        })
    }

    /// The machine changed: stop if another stream took it over or it was removed, else tell
    /// the agent its new settings (if they changed).
    async fn push_settings(&mut self) -> Result<(), StreamEnd> {
        let Some(machine) = self.machine_id() else {
            return Ok(());
        };
        match self.store.get_machine(machine).await {
            Ok(Some(record)) if record.connection_id != Some(self.connection) => {
                Err(StreamEnd::Superseded)
            }
            Ok(Some(record)) => {
                let settings = convert::settings(&record);
                if self.settings_sent == Some(settings) {
                    return Ok(());
                }
                self.settings_sent = Some(settings);
                tracing::info!(
                    machine = %record.name,
                    draining = settings.draining,
                    weight = settings.weight,
                    session_limit = settings.session_limit,
                    "sending new settings to agent"
                );
                self.machine = Some(record);
                self.send(Reply::Settings(settings)).await
            }
            Ok(None) => Err(StreamEnd::RemovedByAdmin),
            Err(error) => {
                tracing::warn!(%error, "could not read machine settings for its agent");
                Ok(())
            }
        }
    }

    /// Another connection took this stream's machine. An agent reconnects only once it found
    /// its link dead (HTTP/2 keepalive: 5-10 s without an answer), so its old stream has been
    /// quiet for longer than a heartbeat interval; a resynced stream whose agent reports
    /// steadily (every interval) is another process speaking as this machine — two servers
    /// with one name, whose displaced agent then stays off and says so. Counted and warned
    /// about. (After a freeze of this broker, the agent's queued messages arrive in a burst:
    /// fresh, but not steady, so an agent that only moved is not taken for a copy.)
    fn taken_over(&self, name: &str) {
        let live = self.resynced
            && self.hearing.reporting(
                tokio::time::Instant::now(),
                self.settings.heartbeat_interval,
            );
        if live {
            self.metrics.live_takeovers.inc();
            tracing::warn!(
                machine = name, peer = %self.peer_label(),
                "a newer connection took over this machine while its agent was still reporting: \
                 two servers may be using this machine's name"
            );
        } else {
            tracing::info!(machine = name, peer = %self.peer_label(), "a newer connection took over this machine");
        }
    }

    /// Records the end in the directory first (UNREACHABLE unless the machine left or another
    /// stream owns it; a stopping broker waits at most [`MARK_WAIT_WHEN_STOPPING`] for it),
    /// then gives the agent its last words.
    async fn finish(self, end: StreamEnd) {
        self.metrics.agent_streams.dec();
        let name = self.who().to_owned();
        if matches!(end, StreamEnd::Superseded) {
            self.taken_over(&name);
        }
        let keeps_ownership = !matches!(
            end,
            StreamEnd::Removed | StreamEnd::Superseded | StreamEnd::RemovedByAdmin
        );
        if let (Some(machine), true) = (self.machine_id(), keeps_ownership) {
            // The agent closed its stream itself (a stop, a restart), or this broker is going:
            // it was alive just now, and its users are sent back to it from here on.
            let agent_alive = matches!(end, StreamEnd::Closed | StreamEnd::BrokerShutdown);
            let marked = self
                .ingest
                .unreachable(machine, self.connection, agent_alive);
            // A stopping broker tells its agents soon, database or not: they move to another
            // replica (the mark is a courtesy: the machine's lease runs out anyway).
            let marked = if matches!(end, StreamEnd::BrokerShutdown) {
                tokio::time::timeout(MARK_WAIT_WHEN_STOPPING, marked)
                    .await
                    .unwrap_or_else(|_| {
                        Err(StoreError::unavailable(format!(
                            "no answer within {MARK_WAIT_WHEN_STOPPING:?} while stopping"
                        )))
                    })
            } else {
                marked.await
            };
            match marked {
                Ok(true) => {
                    match end {
                        StreamEnd::BrokerShutdown => tracing::info!(
                            machine = %name,
                            "machine's stream ended: this broker is stopping"
                        ),
                        // A stop or restart of the agent, or its move to another replica:
                        // its users are still sent to it for the heartbeat timeout, which its
                        // return is expected to beat.
                        StreamEnd::Closed => tracing::info!(
                            machine = %name,
                            "machine's agent closed its stream (stopping, restarting, or moving \
                             to another broker replica): unreachable until its stream is back"
                        ),
                        _ => tracing::warn!(
                            machine = %name,
                            %end,
                            "machine unreachable: its stream ended"
                        ),
                    }
                    if let Some(record) = &self.machine {
                        let unreachable = MachineRecord {
                            state: MachineState::Unreachable.as_str().to_owned(),
                            ..record.clone()
                        };
                        self.plugins
                            .notify(&record.farm, notices::machine_state_changed(&unreachable));
                    }
                }
                Ok(false) => tracing::info!(machine = %name, %end, "stream ended"),
                // While the database is away every stream's end fails so: one warning a minute
                // (its lease runs out anyway, and the outage's cutoff covers it meanwhile).
                Err(error @ StoreError::Unavailable(_)) => {
                    static UNMARKED: std::sync::LazyLock<
                        tsbroker_common::warning_limit::WarningLimit,
                    > = std::sync::LazyLock::new(Default::default);
                    crate::error::warn_limited(
                        &UNMARKED,
                        &format!("{name}: {error}"),
                        "could not mark a machine unreachable",
                    );
                }
                Err(error) => {
                    tracing::error!(machine = %name, %error, "could not mark machine unreachable")
                }
            }
        } else {
            tracing::info!(machine = %name, %end, "stream ended");
        }
        let last_words = match end {
            StreamEnd::BrokerShutdown => Ok(shutdown_message("broker shutting down", false)),
            StreamEnd::RemovedByAdmin => Ok(shutdown_message(
                "machine removed by an administrator",
                true,
            )),
            StreamEnd::Silent => Err(Status::deadline_exceeded(format!(
                "no message for {:?} (heartbeat timeout)",
                self.settings.heartbeat_timeout
            ))),
            StreamEnd::Superseded => Err(Status::aborted(
                "a newer connection for this machine took over",
            )),
            StreamEnd::Refused(status) => Err(status),
            StreamEnd::Transport(status) => {
                tracing::info!(machine = %name, code = ?status.code(), detail = status.message(), "agent stream broke");
                return;
            }
            StreamEnd::Closed | StreamEnd::Removed => return,
        };
        let _ = self.outbound.send(last_words).await;
    }
}

fn shutdown_message(reason: &str, removed: bool) -> pb::BrokerMessage {
    pb::BrokerMessage {
        body: Some(Reply::Shutdown(pb::Shutdown {
            reason: reason.to_owned(),
            removed,
        })),
    }
}

/// Checks every session of a RESYNC; the message names the first bad one.
fn validate_sessions(sessions: Vec<pb::SessionInfo>) -> Result<Vec<SessionInfo>, String> {
    let sessions: Vec<SessionInfo> = sessions
        .into_iter()
        .enumerate()
        .map(|(index, session)| {
            SessionInfo::try_from(session).map_err(|error| format!("sessions[{index}].{error}"))
        })
        .collect::<Result<_, _>>()?;
    // A machine's session numbers are its own and unique: a list naming one twice says two
    // things of it, and neither is taken.
    let mut seen = std::collections::HashSet::with_capacity(sessions.len());
    if let Some((index, session)) = sessions
        .iter()
        .enumerate()
        .find(|(_, session)| !seen.insert(session.session_id))
    {
        return Err(format!(
            "sessions[{index}].session_id: session {} is listed twice",
            session.session_id
        ));
    }
    Ok(sessions)
}
