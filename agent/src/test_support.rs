//! A fake broker for unit tests: serves `AgentGateway.Connect` (Welcome, then an Ack for
//! every message, REMOVED ends the stream) and `Broker.Redirect` / `ListMachines` with
//! answers the test sets, on 127.0.0.1:0; records everything it receives.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::agent_gateway_server::{AgentGateway, AgentGatewayServer};
use tsbroker_common::proto::v1::agent_message::Body;
use tsbroker_common::proto::v1::broker_message::Body as Command;
use tsbroker_common::proto::v1::broker_server::{Broker, BrokerServer};

type Outbound = mpsc::Sender<Result<pb::BrokerMessage, Status>>;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// Health: SERVING, but NOT_SERVING while streams are refused (a broker whose database is away).
#[tonic::async_trait]
impl Health for FakeBroker {
    async fn check(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let status = match self.with(|state| state.refuse_streams) {
            true => ServingStatus::NotServing,
            false => ServingStatus::Serving,
        };
        Ok(Response::new(HealthCheckResponse {
            status: status as i32,
        }))
    }

    type WatchStream = ReceiverStream<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("the fake broker answers Check only"))
    }
}

#[derive(Default)]
pub struct FakeState {
    /// Every agent message, with the number of the stream it came on (from 1).
    pub received: Vec<(usize, pb::AgentMessage)>,
    pub streams: usize,
    /// New streams are refused with UNAVAILABLE while set.
    pub refuse_streams: bool,
    /// New streams are refused with UNAUTHENTICATED (a wrong agent token) while set.
    pub refuse_credentials: bool,
    /// Streams refused so far.
    pub refusals: usize,
    pub heartbeat_interval_ms: u32,
    pub current: Option<Outbound>,
    pub authorization: Vec<String>,
    pub redirect_requests: Vec<pb::RedirectRequest>,
    pub redirect_answer: Option<Result<pb::RedirectResponse, tonic::Code>>,
    /// Answered first, in order, before `redirect_answer`.
    pub queued_answers: std::collections::VecDeque<Result<pb::RedirectResponse, tonic::Code>>,
    pub machines: Vec<pb::Machine>,
    /// This many RESYNCs are rejected (INVALID_ARGUMENT) instead of acknowledged.
    pub reject_resyncs: usize,
    /// The Welcome says the machine drains.
    pub draining: bool,
    /// Messages are read and no longer answered (a replica whose database is cut off).
    pub answer_nothing: bool,
    /// `Redirect` answers UNAVAILABLE with the broker's retry hint (its database away).
    pub database_away: bool,
    /// `Redirect`s for these users are answered after this long (a broker's queue).
    pub slow_users: Vec<String>,
    pub slow_answer: Duration,
}

#[derive(Clone, Default)]
pub struct FakeBroker {
    pub state: Arc<Mutex<FakeState>>,
    changed: Arc<Notify>,
}

impl FakeBroker {
    /// Serves on 127.0.0.1:0 until `stop`; returns the URL.
    pub async fn serve(&self, stop: CancellationToken) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.serve_on(listener, stop)
    }

    /// Serves on `listener` until `stop`; returns the URL.
    pub fn serve_on(&self, listener: tokio::net::TcpListener, stop: CancellationToken) -> String {
        let address: SocketAddr = listener.local_addr().unwrap();
        let router = tonic::transport::Server::builder()
            .add_service(AgentGatewayServer::new(self.clone()))
            .add_service(BrokerServer::new(self.clone()))
            .add_service(HealthServer::new(self.clone()));
        tokio::spawn(async move {
            let _ = router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled())
                .await;
        });
        format!("http://{address}")
    }

    pub fn with<T>(&self, change: impl FnOnce(&mut FakeState) -> T) -> T {
        let mut state = self.state.lock().unwrap();
        let result = change(&mut state);
        drop(state);
        self.changed.notify_waiters();
        result
    }

    /// Waits until `check` holds on the state (panics after 10 s).
    pub async fn wait_for(&self, what: &str, check: impl Fn(&FakeState) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.changed.notified();
            if check(&self.state.lock().unwrap()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out waiting for {what}");
            }
        }
    }

    /// Ends the current stream with UNAVAILABLE.
    pub async fn break_stream(&self) {
        let current = self.with(|state| state.current.take());
        if let Some(sender) = current {
            let _ = sender
                .send(Err(Status::unavailable("broken by the test")))
                .await;
        }
    }

    /// Sends a command down the current stream.
    pub async fn command(&self, command: Command) {
        let current = self.with(|state| state.current.clone()).expect("a stream");
        current
            .send(Ok(pb::BrokerMessage {
                body: Some(command),
            }))
            .await
            .unwrap();
    }
}

/// The kinds of the messages of stream `stream`, in order.
pub fn kinds(state: &FakeState, stream: usize) -> Vec<&'static str> {
    state
        .received
        .iter()
        .filter(|(number, _)| *number == stream)
        .map(|(_, message)| match &message.body {
            Some(Body::Added(_)) => "added",
            Some(Body::Resync(_)) => "resync",
            Some(Body::Ready(_)) => "ready",
            Some(Body::SessionEvent(_)) => "event",
            Some(Body::Load(_)) => "load",
            Some(Body::Removed(_)) => "removed",
            None => "empty",
        })
        .collect()
}

fn reply(body: Command) -> Result<pb::BrokerMessage, Status> {
    Ok(pb::BrokerMessage { body: Some(body) })
}

#[tonic::async_trait]
impl AgentGateway for FakeBroker {
    type ConnectStream = ReceiverStream<Result<pb::BrokerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let (sender, receiver) = mpsc::channel(64);
        let number = self.with(|state| {
            if state.refuse_streams || state.refuse_credentials {
                state.refusals += 1;
                return None;
            }
            state.streams += 1;
            state.authorization.push(authorization);
            state.current = Some(sender.clone());
            Some(state.streams)
        });
        let Some(number) = number else {
            if self.with(|state| state.refuse_credentials) {
                return Err(Status::unauthenticated(
                    "the AgentGateway service needs a valid bearer token",
                ));
            }
            return Err(Status::unavailable("refusing streams"));
        };
        let fake = self.clone();
        let mut inbound = request.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                let seq = message.seq;
                let body = message.body.clone();
                let (heartbeat, draining, silent) = fake.with(|state| {
                    state.received.push((number, message));
                    (
                        state.heartbeat_interval_ms,
                        state.draining,
                        state.answer_nothing,
                    )
                });
                if silent {
                    continue;
                }
                if let Some(Body::Added(description)) = &body {
                    let welcome = pb::Welcome {
                        machine_id: tsbroker_common::model::machine_id(
                            &description.farm,
                            &description.name,
                        )
                        .to_string(),
                        heartbeat_interval_ms: heartbeat,
                        heartbeat_timeout_ms: heartbeat * 3,
                        settings: Some(pb::MachineSettings {
                            draining,
                            weight: description.weight,
                            session_limit: description.session_limit,
                        }),
                    };
                    let _ = sender.send(reply(Command::Welcome(welcome))).await;
                }
                let reject = matches!(body, Some(Body::Resync(_)))
                    && fake.with(|state| {
                        let reject = state.reject_resyncs > 0;
                        state.reject_resyncs = state.reject_resyncs.saturating_sub(1);
                        reject
                    });
                let answer = if reject {
                    Command::Reject(pb::Reject {
                        seq,
                        code: tonic::Code::InvalidArgument as i32,
                        message: "sessions[0].user_name: refused by the test".into(),
                    })
                } else {
                    Command::Ack(pb::Ack { seq })
                };
                let _ = sender.send(reply(answer)).await;
                if let Some(Body::Removed(_)) = body {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

#[tonic::async_trait]
impl Broker for FakeBroker {
    async fn redirect(
        &self,
        request: Request<pb::RedirectRequest>,
    ) -> Result<Response<pb::RedirectResponse>, Status> {
        let user = request.get_ref().user_name.clone();
        let delay = self.with(|state| {
            state
                .slow_users
                .contains(&user)
                .then_some(state.slow_answer)
        });
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        if self.with(|state| state.database_away) {
            let mut status = Status::unavailable("the broker's database is unavailable");
            status.metadata_mut().insert(
                tsbroker_common::proto::RETRY_AFTER_MS_METADATA,
                tonic::metadata::MetadataValue::from(1000u64),
            );
            return Err(status);
        }
        let answer = self.with(|state| {
            state.redirect_requests.push(request.into_inner());
            match state.queued_answers.pop_front() {
                Some(answer) => Some(answer),
                None => state.redirect_answer.clone(),
            }
        });
        match answer {
            Some(Ok(response)) => Ok(Response::new(response)),
            Some(Err(code)) => Err(Status::new(code, "set by the test")),
            None => Err(Status::unavailable("no answer set")),
        }
    }

    async fn list_machines(
        &self,
        request: Request<pb::ListMachinesRequest>,
    ) -> Result<Response<pb::ListMachinesResponse>, Status> {
        let farm = request.into_inner().farm;
        let machines = self.with(|state| state.machines.clone());
        let machines = machines
            .into_iter()
            .filter(|machine| farm.is_empty() || machine.farm == farm)
            .collect();
        Ok(Response::new(pb::ListMachinesResponse { machines }))
    }

    async fn get_machine(
        &self,
        _: Request<pb::GetMachineRequest>,
    ) -> Result<Response<pb::Machine>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_sessions(
        &self,
        _: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_farms(
        &self,
        _: Request<pb::ListFarmsRequest>,
    ) -> Result<Response<pb::ListFarmsResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}
