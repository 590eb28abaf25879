//! A scripted agent: speaks the real `AgentGateway.Connect` stream so tests can drive a
//! machine through ADDED, RESYNC, READY, session events, load reports and REMOVED.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::agent_gateway_client::AgentGatewayClient;
use tsbroker_common::proto::v1::agent_message::Body;
use tsbroker_common::proto::v1::broker_message::Body as Reply;

const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// One machine's stream.
pub struct FakeAgent {
    pub machine_id: String,
    pub description: pb::MachineDescription,
    pub welcome: pb::Welcome,
    sender: mpsc::Sender<pb::AgentMessage>,
    inbound: Streaming<pb::BrokerMessage>,
    next_seq: u64,
    /// Messages other than acks and rejects, in arrival order.
    commands: VecDeque<pb::BrokerMessage>,
}

/// A machine description for tests: address `<name>:3389`.
pub fn machine(name: &str, farm: &str, weight: u32) -> pb::MachineDescription {
    pb::MachineDescription {
        name: name.to_owned(),
        farm: farm.to_owned(),
        address: format!("{name}:3389"),
        weight,
        session_limit: 0,
        single_session: false,
        agent_version: "test".to_owned(),
        front_door: false,
    }
}

/// A session for RESYNC or events.
pub fn session(session_id: u32, user: &str, state: pb::SessionState) -> pb::SessionInfo {
    pb::SessionInfo {
        session_id,
        user_name: user.to_owned(),
        domain: String::new(),
        state: state as i32,
        client_address: String::new(),
        logon_time: None,
    }
}

impl FakeAgent {
    /// Opens the stream and says ADDED; returns once the broker welcomed and acknowledged it.
    pub async fn connect(
        broker_url: &str,
        description: pb::MachineDescription,
    ) -> Result<FakeAgent, Status> {
        let channel = tonic::transport::Endpoint::from_shared(broker_url.to_owned())
            .map_err(|error| Status::invalid_argument(error.to_string()))?
            .connect()
            .await
            .map_err(|error| Status::unavailable(error.to_string()))?;
        let (sender, receiver) = mpsc::channel(1024);
        let mut client = AgentGatewayClient::new(channel);
        let mut agent_sender = sender.clone();
        let first = pb::AgentMessage {
            seq: 1,
            sent_at: None,
            body: Some(Body::Added(description.clone())),
        };
        agent_sender
            .send(first)
            .await
            .map_err(|_| Status::internal("send"))?;
        agent_sender = sender;
        let inbound = client
            .connect(ReceiverStream::new(receiver))
            .await?
            .into_inner();
        let mut agent = FakeAgent {
            machine_id: String::new(),
            description,
            welcome: pb::Welcome::default(),
            sender: agent_sender,
            inbound,
            next_seq: 2,
            commands: VecDeque::new(),
        };
        let welcome = match agent.next_reply().await? {
            Reply::Welcome(welcome) => welcome,
            other => return Err(Status::internal(format!("expected Welcome, got {other:?}"))),
        };
        match agent.next_reply().await? {
            Reply::Ack(pb::Ack { seq: 1 }) => {}
            other => return Err(Status::internal(format!("expected Ack 1, got {other:?}"))),
        }
        agent.machine_id = welcome.machine_id.clone();
        agent.welcome = welcome;
        Ok(agent)
    }

    /// ADDED, RESYNC with `sessions`, READY.
    pub async fn join(
        broker_url: &str,
        description: pb::MachineDescription,
        sessions: Vec<pb::SessionInfo>,
    ) -> FakeAgent {
        let mut agent = Self::connect(broker_url, description)
            .await
            .expect("ADDED accepted");
        agent.resync(sessions).await.expect("RESYNC accepted");
        agent.ready().await.expect("READY accepted");
        agent
    }

    /// Sends a message without waiting; returns its seq.
    pub async fn send(&mut self, body: Body) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.send_raw(pb::AgentMessage {
            seq,
            sent_at: None,
            body: Some(body),
        })
        .await;
        seq
    }

    /// Sends a message exactly as given (any seq, any body).
    pub async fn send_raw(&mut self, message: pb::AgentMessage) {
        self.sender.send(message).await.expect("stream open");
    }

    /// Sends and waits for the broker's answer to it: `Ok` for an Ack, `Err` for a Reject or
    /// the end of the stream.
    pub async fn request(&mut self, body: Body) -> Result<(), Status> {
        let seq = self.send(body).await;
        self.answer_to(seq).await
    }

    /// Waits for the Ack or Reject of `seq`.
    pub async fn answer_to(&mut self, seq: u64) -> Result<(), Status> {
        loop {
            match self.next_reply().await? {
                Reply::Ack(ack) if ack.seq == seq => return Ok(()),
                Reply::Reject(reject) if reject.seq == seq => {
                    return Err(Status::new(
                        tonic::Code::from_i32(reject.code),
                        reject.message,
                    ));
                }
                Reply::Ack(_) | Reply::Reject(_) => {}
                other => self
                    .commands
                    .push_back(pb::BrokerMessage { body: Some(other) }),
            }
        }
    }

    pub async fn resync(&mut self, sessions: Vec<pb::SessionInfo>) -> Result<(), Status> {
        self.request(Body::Resync(pb::SessionResync { sessions }))
            .await
    }

    pub async fn ready(&mut self) -> Result<(), Status> {
        self.request(Body::Ready(pb::MachineReady {})).await
    }

    pub async fn event(
        &mut self,
        kind: pb::SessionEventType,
        session_id: u32,
        user: &str,
    ) -> Result<(), Status> {
        let event = pb::SessionEvent {
            r#type: kind as i32,
            session: Some(session(session_id, user, pb::SessionState::Unspecified)),
        };
        self.request(Body::SessionEvent(event)).await
    }

    pub async fn logon(&mut self, session_id: u32, user: &str) -> Result<(), Status> {
        self.event(pb::SessionEventType::Logon, session_id, user)
            .await
    }

    pub async fn disconnect(&mut self, session_id: u32, user: &str) -> Result<(), Status> {
        self.event(pb::SessionEventType::Disconnect, session_id, user)
            .await
    }

    pub async fn logoff(&mut self, session_id: u32, user: &str) -> Result<(), Status> {
        self.event(pb::SessionEventType::Logoff, session_id, user)
            .await
    }

    pub async fn heartbeat(&mut self) -> Result<(), Status> {
        self.request(Body::Load(pb::LoadReport::default())).await
    }

    /// REMOVED, then waits for the broker to end the stream.
    pub async fn remove(mut self) -> Result<(), Status> {
        self.request(Body::Removed(pb::MachineRemoved {
            reason: "test".into(),
        }))
        .await
    }

    /// The next command (Settings, Shutdown) the broker sends, if one comes in time.
    pub async fn next_command(&mut self, wait: Duration) -> Option<pb::BrokerMessage> {
        if let Some(command) = self.commands.pop_front() {
            return Some(command);
        }
        loop {
            let reply = tokio::time::timeout(wait, self.next_reply())
                .await
                .ok()?
                .ok()?;
            match reply {
                Reply::Ack(_) | Reply::Reject(_) => {}
                other => return Some(pb::BrokerMessage { body: Some(other) }),
            }
        }
    }

    /// Waits for the stream to end; returns the status it ended with (`None` for a clean end).
    pub async fn wait_closed(&mut self, wait: Duration) -> Option<Status> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(remaining, self.inbound.message()).await {
                Err(_) => panic!("stream still open after {wait:?}"),
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return None,
                Ok(Err(status)) => return Some(status),
            }
        }
    }

    /// Sends a heartbeat every 300 ms from a task of its own until the stream fails (abort the
    /// task to stop): an agent that stays heard from while the test looks elsewhere.
    pub fn keep_reporting(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while self.heartbeat().await.is_ok() {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    }

    /// Ends the agent's side cleanly, without REMOVED, as a stopping tsagent does, and waits
    /// (up to 5 s) for the broker to end the stream too.
    pub async fn close(self) {
        let FakeAgent {
            sender,
            mut inbound,
            ..
        } = self;
        drop(sender);
        let _ = tokio::time::timeout(REPLY_TIMEOUT, async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
    }

    /// Closes the agent's side without REMOVED, as a crashed agent's connection would end.
    pub fn hang_up(self) {
        drop(self);
    }

    async fn next_reply(&mut self) -> Result<Reply, Status> {
        match tokio::time::timeout(REPLY_TIMEOUT, self.inbound.message()).await {
            Err(_) => Err(Status::deadline_exceeded("no reply from the broker")),
            Ok(Err(status)) => Err(status),
            Ok(Ok(None)) => Err(Status::cancelled("stream closed by the broker")),
            Ok(Ok(Some(pb::BrokerMessage { body: Some(reply) }))) => Ok(reply),
            Ok(Ok(Some(_))) => Err(Status::internal("empty broker message")),
        }
    }
}

impl FakeAgent {
    /// Sends a message with no body and waits for the answer.
    pub async fn request_raw_body_none(&mut self) -> Result<(), Status> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.send_raw(pb::AgentMessage {
            seq,
            sent_at: None,
            body: None,
        })
        .await;
        self.answer_to(seq).await
    }
}

impl FakeAgent {
    /// A load report with these CPU and memory percentages.
    pub async fn report_load(
        &mut self,
        cpu_percent: f32,
        memory_percent: f32,
    ) -> Result<(), Status> {
        self.request(Body::Load(pb::LoadReport {
            session_count: 0,
            cpu_percent,
            memory_percent,
            pending_logons: 0,
        }))
        .await
    }
}
