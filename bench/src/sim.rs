//! Simulated agents: each machine is one task speaking the real `AgentGateway/Connect` stream
//! (ADDED → Welcome + Ack, RESYNC, READY, then load reports and session events, acknowledged
//! by seq), many streams sharing each HTTP/2 connection. A machine reconnects with the real
//! agent's backoff (full jitter) and resyncs everything it holds, like `tsagent` does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tsagent::BackoffSettings;
use tsagent::backoff::Backoff;
use tsbroker_common::model;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::agent_gateway_client::AgentGatewayClient;
use tsbroker_common::proto::v1::agent_message::Body;
use tsbroker_common::proto::v1::broker_message::Body as Reply;
use uuid::Uuid;

/// How long a machine waits for any one answer of the broker before it gives the stream up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Session ids of ingest events start here (base sessions count up from 1, logons from 1,000,000).
const INGEST_SESSION_BASE: u32 = 2_000_000;
const LOGON_SESSION_BASE: u32 = 1_000_000;

/// The user name of base session `index` (shared by every scenario that preloads sessions).
pub fn base_user(index: usize) -> String {
    format!("user{index}")
}

/// The sessions a machine has when it starts: users `index + k * stride` for k below
/// `per_machine`, session ids k + 1, every other one disconnected.
#[derive(Clone, Copy, Debug, Default)]
pub struct BaseSessions {
    pub index: usize,
    pub stride: usize,
    pub per_machine: usize,
}

impl BaseSessions {
    fn sessions(&self) -> Vec<pb::SessionInfo> {
        (0..self.per_machine)
            .map(|k| {
                let state = if k % 2 == 0 {
                    pb::SessionState::Disconnected
                } else {
                    pb::SessionState::Active
                };
                let user = self.index + k * self.stride;
                session_info(k as u32 + 1, &base_user(user), state, user)
            })
            .collect()
    }
}

/// A session from a client address of its own, derived from `seed` (as the front door records
/// it: every session of a real farm has one, and the broker keeps each one's IP).
fn session_info(
    session_id: u32,
    user: &str,
    state: pb::SessionState,
    seed: usize,
) -> pb::SessionInfo {
    pb::SessionInfo {
        session_id,
        user_name: user.to_owned(),
        domain: String::new(),
        state: state as i32,
        client_address: format!(
            "10.{}.{}.{}:{}",
            (seed >> 16) & 255,
            (seed >> 8) & 255,
            seed & 255,
            40_000 + seed % 20_000
        ),
        logon_time: None,
    }
}

/// A seed for a client address from a user name (FNV-1a).
fn seed_of(user: &str) -> usize {
    let hash = user.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    usize::try_from(hash >> 40).unwrap_or_default()
}

/// One simulated machine as its agent describes it.
#[derive(Clone, Debug)]
pub struct MachineSpec {
    pub name: String,
    pub weight: u32,
    pub address: String,
    pub front_door: bool,
    pub base: BaseSessions,
}

#[derive(Clone, Debug)]
pub struct FarmSettings {
    pub url: String,
    pub farm: String,
    /// Streams that share one HTTP/2 connection.
    pub streams_per_connection: usize,
    pub backoff: BackoffSettings,
}

enum Command {
    Logon {
        user: String,
        reply: oneshot::Sender<Result<u32, String>>,
    },
    Ingest(IngestOrder),
}

/// Keep `window` session events unacknowledged until `stop`; count acks in `acked`.
#[derive(Clone)]
pub struct IngestOrder {
    pub window: usize,
    pub acked: Arc<AtomicU64>,
    pub rejected: Arc<AtomicU64>,
    pub stop: CancellationToken,
}

/// A running simulated machine.
pub struct SimMachine {
    pub name: String,
    pub id: Uuid,
    pub weight: u32,
    commands: mpsc::UnboundedSender<Command>,
}

impl SimMachine {
    /// A LOGON of `user` on this machine (a new session); the session id once the broker
    /// acknowledged it.
    pub async fn logon(&self, user: &str) -> Result<u32, String> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Logon {
                user: user.to_owned(),
                reply,
            })
            .map_err(|_| "machine stopped".to_owned())?;
        answer.await.map_err(|_| "machine stopped".to_owned())?
    }

    pub fn ingest(&self, order: IngestOrder) {
        let _ = self.commands.send(Command::Ingest(order));
    }
}

/// Counters shared by every machine of a farm.
#[derive(Default)]
pub struct FarmCounters {
    /// Machines whose current stream has said READY and had it acknowledged.
    pub ready: AtomicUsize,
    /// Streams opened (ADDED acknowledged).
    pub streams: AtomicU64,
    /// Streams that failed or ended (anything but a stop of the farm).
    pub stream_ends: AtomicU64,
    /// Messages the broker rejected.
    pub rejects: AtomicU64,
    changed: Notify,
}

pub struct SimFarm {
    pub machines: Vec<SimMachine>,
    pub counters: Arc<FarmCounters>,
    by_id: HashMap<Uuid, usize>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SimFarm {
    /// Starts every machine; `join_limit` bounds how many are between connect and READY at
    /// once during their first join (a bulk load), `None` lets them all go at once. A machine
    /// that was READY once reconnects without that bound.
    pub fn start(
        settings: &FarmSettings,
        specs: Vec<MachineSpec>,
        join_limit: Option<usize>,
    ) -> anyhow::Result<SimFarm> {
        let counters = Arc::new(FarmCounters::default());
        let stop = CancellationToken::new();
        let per_connection = settings.streams_per_connection.max(1);
        let connections = specs.len().div_ceil(per_connection).max(1);
        let channels: Vec<Channel> = (0..connections)
            .map(|_| crate::env::lazy_channel(&settings.url))
            .collect::<anyhow::Result<_>>()?;
        let join_gate = join_limit.map(|limit| Arc::new(tokio::sync::Semaphore::new(limit.max(1))));
        let mut machines = Vec::with_capacity(specs.len());
        let mut by_id = HashMap::with_capacity(specs.len());
        let mut tasks = Vec::with_capacity(specs.len());
        for (index, spec) in specs.into_iter().enumerate() {
            let id = model::machine_id(&settings.farm, &spec.name);
            let (commands, receiver) = mpsc::unbounded_channel();
            by_id.insert(id, index);
            machines.push(SimMachine {
                name: spec.name.clone(),
                id,
                weight: spec.weight,
                commands,
            });
            let machine = MachineTask {
                description: pb::MachineDescription {
                    name: spec.name.clone(),
                    farm: settings.farm.clone(),
                    address: spec.address.clone(),
                    weight: spec.weight,
                    session_limit: 0,
                    single_session: false,
                    agent_version: "bench".to_owned(),
                    front_door: spec.front_door,
                },
                base: spec.base,
                dynamic: BTreeMap::new(),
                next_logon_id: LOGON_SESSION_BASE,
                ingest: None,
                ingest_sent: 0,
                channel: channels[index / per_connection].clone(),
                counters: counters.clone(),
                stop: stop.clone(),
                backoff: settings.backoff,
                join_gate: join_gate.clone(),
            };
            tasks.push(tokio::spawn(machine.run(receiver)));
        }
        Ok(SimFarm {
            machines,
            counters,
            by_id,
            stop,
            tasks,
        })
    }

    pub fn machine(&self, id: &Uuid) -> Option<&SimMachine> {
        self.by_id.get(id).map(|index| &self.machines[*index])
    }

    pub fn ready(&self) -> usize {
        self.counters.ready.load(Ordering::Relaxed)
    }

    /// Waits until `count` machines are READY; fails after `limit`.
    pub async fn wait_ready(&self, count: usize, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let notified = self.counters.changed.notified();
            if self.ready() >= count {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!(
                    "only {} of {count} machines READY after {limit:?} ({} stream ends)",
                    self.ready(),
                    self.counters.stream_ends.load(Ordering::Relaxed)
                );
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }

    /// Waits until fewer than `count` machines are READY (their streams saw the broker go).
    pub async fn wait_not_ready(&self, below: usize, limit: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        while self.ready() >= below {
            if started.elapsed() > limit {
                bail!("machines still READY after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Closes every stream (no REMOVED: the broker marks the machines unreachable).
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// What the broker expects an answer for, in seq order.
enum Waiting {
    Control,
    Load,
    Logon(oneshot::Sender<Result<u32, String>>, u32),
    Ingest,
}

struct IngestState {
    order: IngestOrder,
    in_flight: usize,
}

struct MachineTask {
    description: pb::MachineDescription,
    base: BaseSessions,
    /// Sessions added since start (logons, ingest), by session id.
    dynamic: BTreeMap<u32, pb::SessionInfo>,
    next_logon_id: u32,
    ingest: Option<IngestState>,
    ingest_sent: u64,
    channel: Channel,
    counters: Arc<FarmCounters>,
    stop: CancellationToken,
    backoff: BackoffSettings,
    join_gate: Option<Arc<tokio::sync::Semaphore>>,
}

enum StreamEnd {
    Stopped,
    Failed(String),
}

impl MachineTask {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut backoff = Backoff::new(self.backoff);
        loop {
            let started = Instant::now();
            let mut ready = false;
            let end = self.stream(&mut commands, &mut ready).await;
            if ready {
                // Only the bulk load is paced: a machine that joined once reconnects when its
                // backoff says, as every agent of a real farm does after a broker restart.
                self.join_gate = None;
                self.counters.ready.fetch_sub(1, Ordering::Relaxed);
                self.counters.changed.notify_waiters();
            }
            if let Some(ingest) = &mut self.ingest {
                ingest.in_flight = 0;
            }
            match end {
                StreamEnd::Stopped => return,
                StreamEnd::Failed(reason) => {
                    self.counters.stream_ends.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(machine = %self.description.name, %reason, "stream ended");
                }
            }
            backoff.stream_ended(started.elapsed());
            let delay = backoff.next_delay();
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn all_sessions(&self) -> Vec<pb::SessionInfo> {
        let mut sessions = self.base.sessions();
        sessions.extend(self.dynamic.values().cloned());
        sessions
    }

    /// The next event of the ingest cycle: each of 16 sessions goes LOGON, DISCONNECT,
    /// RECONNECT, LOGOFF in turn, so the directory stays the same size.
    fn next_ingest_event(&mut self) -> pb::SessionEvent {
        const SLOTS: u64 = 16;
        let n = self.ingest_sent;
        self.ingest_sent += 1;
        let slot = (n % SLOTS) as u32;
        let session_id = INGEST_SESSION_BASE + slot;
        let user = format!("{}-s{slot}", self.description.name);
        let (kind, state) = match (n / SLOTS) % 4 {
            0 => (pb::SessionEventType::Logon, pb::SessionState::Active),
            1 => (
                pb::SessionEventType::Disconnect,
                pb::SessionState::Disconnected,
            ),
            2 => (pb::SessionEventType::Reconnect, pb::SessionState::Active),
            _ => (pb::SessionEventType::Logoff, pb::SessionState::Active),
        };
        let session = session_info(session_id, &user, state, seed_of(&user));
        if kind == pb::SessionEventType::Logoff {
            self.dynamic.remove(&session_id);
        } else {
            self.dynamic.insert(session_id, session.clone());
        }
        pb::SessionEvent {
            r#type: kind as i32,
            session: Some(session),
        }
    }

    async fn stream(
        &mut self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        ready: &mut bool,
    ) -> StreamEnd {
        let gate = match &self.join_gate {
            Some(gate) => gate.clone().acquire_owned().await.ok(),
            None => None,
        };
        let (sender, receiver) = mpsc::channel::<pb::AgentMessage>(4096);
        let mut outbox = Outbox {
            sender,
            seq: 0,
            waiting: VecDeque::new(),
        };
        outbox.push(Body::Added(self.description.clone()), Waiting::Control);
        let mut client = AgentGatewayClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let opened = tokio::select! {
            () = self.stop.cancelled() => return StreamEnd::Stopped,
            opened = tokio::time::timeout(REPLY_TIMEOUT, client.connect(ReceiverStream::new(receiver))) => opened,
        };
        let mut inbound = match opened {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => return StreamEnd::Failed(format!("connect: {status}")),
            Err(_) => return StreamEnd::Failed("connect timed out".into()),
        };
        let joined = async {
            let welcome = match next_reply(&mut inbound).await? {
                Reply::Welcome(welcome) => welcome,
                other => bail!("expected Welcome, got {other:?}"),
            };
            outbox.expect_ack(&mut inbound, &self.counters).await?;
            outbox.push(
                Body::Resync(pb::SessionResync {
                    sessions: self.all_sessions(),
                }),
                Waiting::Control,
            );
            outbox.expect_ack(&mut inbound, &self.counters).await?;
            outbox.push(Body::Ready(pb::MachineReady {}), Waiting::Control);
            outbox.expect_ack(&mut inbound, &self.counters).await?;
            Ok(welcome)
        };
        let welcome = tokio::select! {
            () = self.stop.cancelled() => return StreamEnd::Stopped,
            joined = joined => match joined {
                Ok(welcome) => welcome,
                Err(error) => return StreamEnd::Failed(format!("join: {error:#}")),
            },
        };
        drop(gate);
        self.counters.streams.fetch_add(1, Ordering::Relaxed);
        self.counters.ready.fetch_add(1, Ordering::Relaxed);
        self.counters.changed.notify_waiters();
        *ready = true;
        let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let end = loop {
            if let Some(ingest) = &self.ingest
                && !ingest.order.stop.is_cancelled()
                && ingest.in_flight < ingest.order.window
            {
                let missing = ingest.order.window - ingest.in_flight;
                for _ in 0..missing {
                    let event = self.next_ingest_event();
                    outbox.push(Body::SessionEvent(event), Waiting::Ingest);
                }
                if let Some(ingest) = &mut self.ingest {
                    ingest.in_flight += missing;
                }
            }
            tokio::select! {
                biased;
                () = self.stop.cancelled() => break StreamEnd::Stopped,
                message = inbound.message() => match message {
                    Ok(Some(pb::BrokerMessage { body: Some(Reply::Ack(ack)) })) => {
                        self.settle(&mut outbox, ack.seq, None);
                    }
                    Ok(Some(pb::BrokerMessage { body: Some(Reply::Reject(reject)) })) => {
                        self.counters.rejects.fetch_add(1, Ordering::Relaxed);
                        self.settle(&mut outbox, reject.seq, Some(reject.message));
                    }
                    Ok(Some(pb::BrokerMessage { body: Some(Reply::Shutdown(shutdown)) })) => {
                        break StreamEnd::Failed(format!("broker said shut down: {}", shutdown.reason));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break StreamEnd::Failed("stream closed by the broker".into()),
                    Err(status) => break StreamEnd::Failed(format!("stream: {status}")),
                },
                command = commands.recv() => match command {
                    Some(Command::Logon { user, reply }) => {
                        let session_id = self.next_logon_id;
                        self.next_logon_id += 1;
                        let seed = seed_of(&user);
                        let session = session_info(session_id, &user, pb::SessionState::Active, seed);
                        self.dynamic.insert(session_id, session.clone());
                        let event = pb::SessionEvent {
                            r#type: pb::SessionEventType::Logon as i32,
                            session: Some(session),
                        };
                        outbox.push(Body::SessionEvent(event), Waiting::Logon(reply, session_id));
                    }
                    Some(Command::Ingest(order)) => {
                        self.ingest = Some(IngestState { order, in_flight: 0 });
                    }
                    None => break StreamEnd::Stopped,
                },
                _ = heartbeat.tick() => {
                    let load = pb::LoadReport {
                        session_count: (self.base.per_machine + self.dynamic.len()) as u32,
                        cpu_percent: 10.0,
                        memory_percent: 20.0,
                        pending_logons: 0,
                    };
                    outbox.push(Body::Load(load), Waiting::Load);
                }
            }
        };
        for (_, waiting) in outbox.waiting.drain(..) {
            if let Waiting::Logon(reply, _) = waiting {
                let _ = reply.send(Err("stream ended before the broker acknowledged".into()));
            }
        }
        end
    }

    /// Resolves everything up to `seq` (the broker answers in order).
    fn settle(&mut self, outbox: &mut Outbox, seq: u64, rejected: Option<String>) {
        while let Some((front, _)) = outbox.waiting.front() {
            if *front > seq {
                break;
            }
            let Some((front, waiting)) = outbox.waiting.pop_front() else {
                break;
            };
            let outcome = if front == seq { rejected.clone() } else { None };
            match waiting {
                Waiting::Control | Waiting::Load => {}
                Waiting::Logon(reply, session_id) => {
                    let _ = reply.send(match outcome {
                        None => Ok(session_id),
                        Some(message) => Err(message),
                    });
                }
                Waiting::Ingest => {
                    if let Some(ingest) = &mut self.ingest {
                        ingest.in_flight = ingest.in_flight.saturating_sub(1);
                        match outcome {
                            None => ingest.order.acked.fetch_add(1, Ordering::Relaxed),
                            Some(_) => ingest.order.rejected.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                }
            }
        }
    }
}

struct Outbox {
    sender: mpsc::Sender<pb::AgentMessage>,
    seq: u64,
    waiting: VecDeque<(u64, Waiting)>,
}

impl Outbox {
    /// Queues a message (never blocks: the queue is larger than any window).
    fn push(&mut self, body: Body, waiting: Waiting) {
        self.seq += 1;
        let message = pb::AgentMessage {
            seq: self.seq,
            sent_at: Some(std::time::SystemTime::now().into()),
            body: Some(body),
        };
        if self.sender.try_send(message).is_ok() {
            self.waiting.push_back((self.seq, waiting));
        }
    }

    /// Waits for the answer to the last message pushed (a control step of the join).
    async fn expect_ack(
        &mut self,
        inbound: &mut tonic::Streaming<pb::BrokerMessage>,
        counters: &FarmCounters,
    ) -> anyhow::Result<()> {
        let seq = self.seq;
        loop {
            match next_reply(inbound).await? {
                Reply::Ack(ack) if ack.seq == seq => {
                    self.waiting.retain(|(waiting, _)| *waiting > seq);
                    return Ok(());
                }
                Reply::Reject(reject) if reject.seq == seq => {
                    counters.rejects.fetch_add(1, Ordering::Relaxed);
                    bail!("seq {seq} rejected: {}", reject.message)
                }
                _ => {}
            }
        }
    }
}

async fn next_reply(inbound: &mut tonic::Streaming<pb::BrokerMessage>) -> anyhow::Result<Reply> {
    match tokio::time::timeout(REPLY_TIMEOUT, inbound.message()).await {
        Err(_) => bail!("no answer from the broker within {REPLY_TIMEOUT:?}"),
        Ok(Err(status)) => Err(status).context("stream"),
        Ok(Ok(None)) => bail!("stream closed by the broker"),
        Ok(Ok(Some(pb::BrokerMessage { body: Some(reply) }))) => Ok(reply),
        Ok(Ok(Some(_))) => bail!("empty broker message"),
    }
}

/// Machine specs for a farm of `machines` with `sessions` base sessions spread evenly
/// (user j on machine j mod machines); weights alternate 100 and 200 when `mixed_weights`.
pub fn farm_specs(
    prefix: &str,
    machines: usize,
    sessions: usize,
    mixed_weights: bool,
) -> Vec<MachineSpec> {
    (0..machines)
        .map(|index| {
            let per_machine = sessions / machines + usize::from(index < sessions % machines);
            let name = format!("{prefix}{index:05}.bench.example");
            MachineSpec {
                address: format!("{name}:3389"),
                name,
                weight: if mixed_weights && index % 2 == 1 {
                    200
                } else {
                    100
                },
                front_door: false,
                base: BaseSessions {
                    index,
                    stride: machines,
                    per_machine,
                },
            }
        })
        .collect()
}
