//! Front-door decisions end to end in one process: a fake broker, plain TCP echo servers in
//! the place of RDP services and other front doors, and an agent whose front door listens on
//! 127.0.0.1:0 (with its `/metrics` on another; `metrics.rs` reads it).

mod busy_broker;
mod metrics;
mod odd_requests;

use std::net::{SocketAddr, SocketAddrV4};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tsbroker_common::model::{SessionEventKind, machine_id};
use tsbroker_common::proto::v1 as pb;

use super::x224::{build_connection_request, encode_routing_token};
use super::{listener, proxy_header};
use crate::config::{AgentConfig, FrontDoorBind};
use crate::directory::RecordState;
use crate::test_support::FakeBroker;

const FARM: &str = "default";
const NAME: &str = "ts1.example";

/// A TCP server that echoes what it gets and reports each connection's bytes at its end.
async fn echo_server() -> (SocketAddr, mpsc::UnboundedReceiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(count) = stream.read(&mut chunk).await {
                    if count == 0 || stream.write_all(&chunk[..count]).await.is_err() {
                        break;
                    }
                    seen.extend_from_slice(&chunk[..count]);
                }
                let _ = sender.send(seen);
            });
        }
    });
    (address, receiver)
}

fn machine(name: &str, address: &str, state: pb::MachineState) -> pb::Machine {
    pb::Machine {
        id: machine_id(FARM, name).to_string(),
        name: name.into(),
        farm: FARM.into(),
        address: address.into(),
        state: state as i32,
        front_door: true,
        ..Default::default()
    }
}

fn answer(name: &str, address: &str, reason: pb::RedirectReason) -> pb::RedirectResponse {
    pb::RedirectResponse {
        machine_id: machine_id(FARM, name).to_string(),
        machine_name: name.into(),
        address: address.into(),
        reason: reason as i32,
        front_door: true,
        ..Default::default()
    }
}

/// [`answer`] for a machine that advertises its plain RDP service (no front door), placed by
/// the policy.
fn plain_rdp_answer(name: &str, address: &str) -> pb::RedirectResponse {
    pb::RedirectResponse {
        front_door: false,
        ..answer(name, address, pb::RedirectReason::LoadBalanced)
    }
}

struct Harness {
    fake: FakeBroker,
    /// The fake broker's URL and what stops it (`broker_up`).
    broker_url: String,
    broker_stop: CancellationToken,
    agent: crate::RunningAgent,
    front_door: SocketAddr,
    local: mpsc::UnboundedReceiver<Vec<u8>>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

/// A front door whose sessions stay (disconnected) however short their connection: these
/// tests' connections last milliseconds.
async fn harness(machines: Vec<pb::Machine>, broker_up: bool) -> Harness {
    harness_with(machines, broker_up, Duration::ZERO, None).await
}

/// A front door (broker up, no machines listed) whose local RDP service is `local_rdp`.
async fn harness_with_local(local_rdp: String) -> Harness {
    harness_with(Vec::new(), true, Duration::ZERO, Some(local_rdp)).await
}

async fn harness_with(
    machines: Vec<pb::Machine>,
    broker_up: bool,
    unconfirmed_logon_grace: Duration,
    local_rdp: Option<String>,
) -> Harness {
    harness_with_token(
        machines,
        broker_up,
        unconfirmed_logon_grace,
        local_rdp,
        None,
    )
    .await
}

async fn harness_with_token(
    machines: Vec<pb::Machine>,
    broker_up: bool,
    unconfirmed_logon_grace: Duration,
    local_rdp: Option<String>,
    agent_token: Option<&str>,
) -> Harness {
    let fake = FakeBroker::default();
    fake.with(|state| state.machines = machines);
    harness_on_fake(
        fake,
        broker_up,
        unconfirmed_logon_grace,
        local_rdp,
        agent_token,
    )
    .await
}

/// A front door whose broker is `fake` (serving when `broker_up`).
async fn harness_on_fake(
    fake: FakeBroker,
    broker_up: bool,
    unconfirmed_logon_grace: Duration,
    local_rdp: Option<String>,
    agent_token: Option<&str>,
) -> Harness {
    let settings = (unconfirmed_logon_grace, local_rdp, agent_token);
    harness_on_replicas(fake, broker_up, |url| url.to_owned(), settings).await
}

/// [`harness_on_fake`] with the agent's `--broker` list made from the fake's URL by `urls`.
async fn harness_on_replicas(
    fake: FakeBroker,
    broker_up: bool,
    urls: impl FnOnce(&str) -> String,
    (unconfirmed_logon_grace, local_rdp, agent_token): (Duration, Option<String>, Option<&str>),
) -> Harness {
    let broker_stop = CancellationToken::new();
    let url = if broker_up {
        fake.serve(broker_stop.clone()).await
    } else {
        "http://127.0.0.1:9".to_owned()
    };
    let replicas = urls(&url);
    let (local_address, local) = echo_server().await;
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let front_door = listener.local_addr().unwrap();
    let mut config = AgentConfig::new(NAME, dir.path());
    config.broker_url = replicas;
    config.advertise = front_door.to_string();
    config.front_door = Some(FrontDoorBind::Listener(listener));
    config.local_rdp = local_rdp.unwrap_or_else(|| local_address.to_string());
    config.client_timeout = Duration::from_millis(300);
    config.machine_refresh = Duration::from_millis(100);
    config.unconfirmed_logon_grace = unconfirmed_logon_grace;
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.agent_token = agent_token.map(str::to_owned);
    let shutdown = CancellationToken::new();
    let agent = crate::start(config, shutdown.clone()).await.unwrap();
    assert_eq!(agent.front_door_addr, Some(front_door));
    Harness {
        fake,
        broker_url: url,
        broker_stop,
        agent,
        front_door,
        local,
        shutdown,
        _dir: dir,
    }
}

impl Harness {
    /// The fake broker places the next new logon on ts2 at `first`, then (asked again, ts2
    /// left out) on ts3 at `second`.
    fn place_on_then_on(&self, first: &str, second: &str) {
        let first = answer("ts2.example", first, pb::RedirectReason::LoadBalanced);
        let second = answer("ts3.example", second, pb::RedirectReason::LoadBalanced);
        self.fake
            .with(|state| state.queued_answers = [Ok(first), Ok(second)].into());
    }

    /// The fake broker finds the farm full twice (RESOURCE_EXHAUSTED: the front door asks
    /// again after half a second each time), then places new logons on ts2 at `address`.
    fn full_twice_then_on(&self, address: &str) {
        let there = answer("ts2.example", address, pb::RedirectReason::LoadBalanced);
        let full = || Err(tonic::Code::ResourceExhausted);
        self.fake.with(|state| {
            state.queued_answers = [full(), full()].into();
            state.redirect_answer = Some(Ok(there));
        });
    }

    /// Waits until the agent's stream to the fake broker is up.
    async fn connected(&self) {
        let up = self.agent.wait_until_connected(Duration::from_secs(10));
        assert!(up.await, "the agent's stream did not connect");
    }

    /// What the fake broker answers every `Redirect` with from now on.
    fn answer_with(&self, answer: pb::RedirectResponse) {
        self.fake
            .with(|state| state.redirect_answer = Some(Ok(answer)));
    }
}

/// Connects, sends `bytes`, closes its sending side, and returns what came back.
async fn exchange(front_door: SocketAddr, bytes: &[u8]) -> (SocketAddr, Vec<u8>) {
    exchange_waiting(front_door, bytes, Duration::from_secs(5)).await
}

/// [`exchange`], waiting up to `wait` for the answer to end.
async fn exchange_waiting(
    front_door: SocketAddr,
    bytes: &[u8],
    wait: Duration,
) -> (SocketAddr, Vec<u8>) {
    let mut client = TcpStream::connect(front_door).await.unwrap();
    let local = client.local_addr().unwrap();
    client.write_all(bytes).await.unwrap();
    client.shutdown().await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(wait, client.read_to_end(&mut back)).await;
    (local, back)
}

async fn next(receiver: &mut mpsc::UnboundedReceiver<Vec<u8>>) -> Vec<u8> {
    tokio::time::timeout(Duration::from_secs(5), receiver.recv())
        .await
        .unwrap()
        .unwrap()
}

async fn nothing(receiver: &mut mpsc::UnboundedReceiver<Vec<u8>>) {
    let got = tokio::time::timeout(Duration::from_millis(300), receiver.recv()).await;
    assert!(got.is_err(), "expected no connection, got {got:?}");
}

fn request_with_tail(cookie: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let packet = build_connection_request(cookie, Some(3));
    let mut bytes = packet.clone();
    bytes.extend_from_slice(b"\x16\x03\x01 tls hello");
    (packet, bytes)
}

#[tokio::test]
async fn routes_to_this_machine_or_another_with_a_proxy_header() {
    let mut harness = harness(Vec::new(), true).await;
    let (remote_address, mut remote) = echo_server().await;
    let ours = answer(
        NAME,
        &harness.front_door.to_string(),
        pb::RedirectReason::LoadBalanced,
    );
    harness.answer_with(ours);
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=CORP\\alice"));
    let (client, back) = exchange(harness.front_door, &bytes).await;
    // The local service got exactly the client's bytes, and answered through the door.
    assert_eq!(next(&mut harness.local).await, bytes);
    assert_eq!(back, bytes);
    let request = harness
        .fake
        .with(|state| state.redirect_requests[0].clone());
    assert_eq!(
        (request.user_name.as_str(), request.domain.as_str()),
        ("alice", "CORP")
    );
    assert_eq!(request.farm, FARM);
    assert_eq!(
        request.receiving_machine_id,
        harness.agent.machine_id.to_string()
    );
    assert_eq!(request.client_address, client.to_string());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sessions = harness.agent.directory().list();
    assert_eq!(sessions.len(), 1);
    assert_eq!(
        (sessions[0].user_name.as_str(), sessions[0].state),
        ("alice", RecordState::Disconnected)
    );

    let theirs = answer(
        "ts2.example",
        &remote_address.to_string(),
        pb::RedirectReason::LoadBalanced,
    );
    harness.answer_with(theirs);
    let (packet, bytes) = request_with_tail(Some("Cookie: mstshash=bob"));
    let (client, _) = exchange(harness.front_door, &bytes).await;
    let seen = next(&mut remote).await;
    let header_len = proxy_header::FIXED_LEN + proxy_header::payload_len(&seen).unwrap();
    assert_eq!(
        proxy_header::parse(&seen[..header_len]).unwrap().source,
        Some(client)
    );
    assert_eq!(&seen[header_len..header_len + packet.len()], &packet[..]);
    assert_eq!(&seen[header_len..], &bytes[..]);
    nothing(&mut harness.local).await;

    // A machine that advertises a plain RDP service gets the client's bytes as they are.
    let plain = plain_rdp_answer("ts3.example", &remote_address.to_string());
    harness.answer_with(plain);
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=carol"));
    exchange(harness.front_door, &bytes).await;
    assert_eq!(
        next(&mut remote).await,
        bytes,
        "no PROXY header for a plain RDP service"
    );
    harness.shutdown.cancel();
}

/// mstsc cuts its cookie to 9 characters: the front door asks the broker with a 9-character
/// user name marked as possibly cut (with or without a domain before it), and names of other
/// lengths unmarked; the full name the broker answers is the one the session is recorded under.
#[tokio::test]
async fn a_cookie_cut_to_nine_characters_is_resolved_by_the_broker() {
    let mut harness = harness(Vec::new(), true).await;
    let full_name = pb::RedirectResponse {
        user_name: "alexander.long".into(),
        ..answer(
            NAME,
            &harness.front_door.to_string(),
            pb::RedirectReason::ExistingSession,
        )
    };
    harness.answer_with(full_name);
    let cookies = [
        ("Cookie: mstshash=alexander", "alexander", true),
        ("Cookie: mstshash=CORP\\alexander", "alexander", true),
        ("Cookie: mstshash=alexande", "alexande", false),
        ("Cookie: mstshash=alexander.", "alexander.", false),
    ];
    for (cookie, _, _) in cookies {
        let (_, bytes) = request_with_tail(Some(cookie));
        exchange(harness.front_door, &bytes).await;
        assert_eq!(next(&mut harness.local).await, bytes, "{cookie}");
    }
    let asked: Vec<(String, bool)> = harness.fake.with(|state| {
        state
            .redirect_requests
            .iter()
            .map(|request| {
                (
                    request.user_name.clone(),
                    request.user_name_may_be_truncated,
                )
            })
            .collect()
    });
    let expected: Vec<(String, bool)> = cookies
        .iter()
        .map(|(_, user, cut)| ((*user).to_owned(), *cut))
        .collect();
    assert_eq!(asked, expected);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recorded: Vec<String> = harness
        .agent
        .directory()
        .list()
        .into_iter()
        .map(|session| session.user_name)
        .collect();
    assert_eq!(
        recorded,
        ["alexander.long"],
        "one session, under the full name"
    );
    harness.shutdown.cancel();
}

/// With an agent token, a PROXY header counts only when signed with it: a user logged on to
/// a farm machine can connect from its address, but not sign as its front door.
#[tokio::test]
async fn with_an_agent_token_only_signed_proxy_headers_are_trusted() {
    const TOKEN: &str = "the-farms-agent-token-0123456789";
    let peer = machine("ts2.example", "127.0.0.1:4000", pb::MachineState::Ready);
    let mut harness = harness_with_token(vec![peer], true, Duration::ZERO, None, Some(TOKEN)).await;
    let client: SocketAddr = "198.51.100.20:50000".parse().unwrap();
    let (_, tail) = request_with_tail(Some("Cookie: mstshash=alice"));
    let now = proxy_header::now_secs();
    let send = |key: Option<&proxy_header::HeaderKey>| {
        let mut bytes = proxy_header::encode(client, harness.front_door, key, now);
        bytes.extend_from_slice(&tail);
        bytes
    };
    let forged = [
        send(None),
        send(Some(&proxy_header::HeaderKey::from_token(
            "not-the-farms-token",
        ))),
    ];
    for bytes in forged {
        let (_, back) = exchange(harness.front_door, &bytes).await;
        assert!(back.is_empty());
    }
    nothing(&mut harness.local).await;
    let signed = send(Some(&proxy_header::HeaderKey::from_token(TOKEN)));
    let (_, back) = exchange(harness.front_door, &signed).await;
    assert_eq!(next(&mut harness.local).await, tail);
    assert_eq!(back, tail);
    harness
        .fake
        .with(|state| assert!(state.redirect_requests.is_empty()));

    // What this front door sends on to another machine is signed.
    let (remote_address, mut remote) = echo_server().await;
    harness.answer_with(answer(
        "ts3.example",
        &remote_address.to_string(),
        pb::RedirectReason::LoadBalanced,
    ));
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=bob"));
    exchange(harness.front_door, &bytes).await;
    let seen = next(&mut remote).await;
    let header_len = proxy_header::FIXED_LEN + proxy_header::payload_len(&seen).unwrap();
    let header = proxy_header::parse(&seen[..header_len]).unwrap();
    let key = proxy_header::HeaderKey::from_token(TOKEN);
    assert_eq!(key.check(&header, proxy_header::now_secs()), Ok(()));
    harness.shutdown.cancel();
}

#[tokio::test]
async fn proxy_headers_are_trusted_only_from_farm_machines() {
    let foreign = vec![machine(NAME, "192.0.2.1:3389", pb::MachineState::Ready)];
    let mut harness = harness(foreign, true).await;
    let client: SocketAddr = "198.51.100.20:50000".parse().unwrap();
    let (packet, tail) = request_with_tail(Some("Cookie: mstshash=alice"));
    let mut bytes = proxy_header::encode(client, harness.front_door, None, 0);
    bytes.extend_from_slice(&tail);
    let (_, back) = exchange(harness.front_door, &bytes).await;
    assert!(back.is_empty());
    nothing(&mut harness.local).await;

    // Once 127.0.0.1 is a machine of the farm, its header is accepted and not re-routed.
    let peer = machine("ts2.example", "127.0.0.1:4000", pb::MachineState::Ready);
    harness.fake.with(|state| state.machines.push(peer));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, back) = exchange(harness.front_door, &bytes).await;
    assert_eq!(next(&mut harness.local).await, tail);
    assert_eq!(back, tail);
    assert!(tail.starts_with(&packet));
    harness
        .fake
        .with(|state| assert!(state.redirect_requests.is_empty()));
    let sessions = harness.agent.directory().list();
    assert_eq!(sessions[0].client_address, client.to_string());
    harness.shutdown.cancel();
}

#[tokio::test]
async fn routing_tokens_reach_only_ready_farm_machines() {
    let (remote_address, mut remote) = echo_server().await;
    let SocketAddr::V4(remote_v4) = remote_address else {
        panic!()
    };
    let machines = vec![
        machine(
            "ts2.example",
            &remote_address.to_string(),
            pb::MachineState::Ready,
        ),
        machine("ts3.example", "127.0.0.1:1", pb::MachineState::Unreachable),
    ];
    let mut harness = harness(machines, true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let token = |address: SocketAddrV4| format!("Cookie: msts={}", encode_routing_token(address));

    let foreign = token("192.0.2.9:3389".parse().unwrap());
    let (_, back) = exchange(harness.front_door, &request_with_tail(Some(&foreign)).1).await;
    assert!(back.is_empty());
    nothing(&mut harness.local).await;

    let (packet, bytes) = request_with_tail(Some(&token(remote_v4)));
    exchange(harness.front_door, &bytes).await;
    let seen = next(&mut remote).await;
    assert!(seen.starts_with(&[proxy_header::SIGNATURE_FIRST_BYTE]));
    assert!(seen.ends_with(&bytes) && bytes.starts_with(&packet));

    // A token naming this very front door: the local service, even with no list at hand.
    let SocketAddr::V4(ours) = harness.front_door else {
        panic!()
    };
    let (_, bytes) = request_with_tail(Some(&token(ours)));
    exchange(harness.front_door, &bytes).await;
    assert_eq!(next(&mut harness.local).await, bytes);

    // Another farm's collection, and one spelt otherwise than this farm (`DEFAULT` is another
    // farm than `default` at the broker): refused.
    for line in [
        "tsv://MS Terminal Services Plugin.1.elsewhere",
        "tsv://MS Terminal Services Plugin.1.DEFAULT",
    ] {
        let other_farm = request_with_tail(Some(line)).1;
        let (_, back) = exchange(harness.front_door, &other_farm).await;
        assert!(back.is_empty(), "{line}");
        nothing(&mut harness.local).await;
    }
    harness
        .fake
        .with(|state| assert!(state.redirect_requests.is_empty()));
    harness.shutdown.cancel();
}

/// A `tsv://` collection token is the front door's to use: RDP services get the request
/// without it (FreeRDP-based servers refuse one), other front doors get it as it came.
#[tokio::test]
async fn collection_tokens_stop_at_the_front_door() {
    let mut harness = harness(Vec::new(), true).await;
    let (remote_address, mut remote) = echo_server().await;
    let line = "tsv://MS Terminal Services Plugin.1.default";
    let (packet, bytes) = request_with_tail(Some(line));
    let tail = &bytes[packet.len()..];
    let mut expected = build_connection_request(None, Some(3));
    expected.extend_from_slice(tail);

    // This machine's RDP service.
    let ours = answer(
        NAME,
        &harness.front_door.to_string(),
        pb::RedirectReason::LoadBalanced,
    );
    harness.answer_with(ours);
    exchange(harness.front_door, &bytes).await;
    assert_eq!(next(&mut harness.local).await, expected);

    // Another machine's plain RDP service.
    let plain = plain_rdp_answer("ts3.example", &remote_address.to_string());
    harness.answer_with(plain);
    exchange(harness.front_door, &bytes).await;
    assert_eq!(next(&mut remote).await, expected);

    // Another front door: the client's bytes behind a PROXY header.
    let theirs = answer(
        "ts2.example",
        &remote_address.to_string(),
        pb::RedirectReason::LoadBalanced,
    );
    harness.answer_with(theirs);
    exchange(harness.front_door, &bytes).await;
    let seen = next(&mut remote).await;
    let header_len = proxy_header::FIXED_LEN + proxy_header::payload_len(&seen).unwrap();
    assert_eq!(&seen[header_len..], &bytes[..]);
    nothing(&mut harness.local).await;
    harness.fake.with(|state| {
        assert!(
            state
                .redirect_requests
                .iter()
                .all(|request| request.user_name.is_empty() && request.farm == FARM)
        )
    });
    harness.shutdown.cancel();
}

#[tokio::test]
async fn silent_slow_and_garbage_clients_are_cut_off() {
    let mut harness = harness(Vec::new(), true).await;
    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(harness.front_door).await.unwrap();
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buffer)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    let packet = build_connection_request(Some("Cookie: mstshash=alice"), None);
    let mut slow = TcpStream::connect(harness.front_door).await.unwrap();
    slow.write_all(&packet[..6]).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(3), slow.read(&mut buffer)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");

    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[3, 0, 0xff, 0xff, 0, 0][..],
        &[0u8; 64][..],
    ] {
        let (_, back) = exchange(harness.front_door, garbage).await;
        assert!(back.is_empty());
    }
    nothing(&mut harness.local).await;
    harness.shutdown.cancel();
}

/// A broker restarted (stopped, then serving again on its port 1.2 s later): the client
/// connecting meanwhile waits for it and goes where it answers, not to this machine's RDP
/// service (a second session for a returning user). A broker that answers, even UNAVAILABLE,
/// is not waited for.
#[tokio::test]
async fn a_broker_restart_is_ridden_out() {
    let mut harness = harness(Vec::new(), true).await;
    let (remote_address, mut remote) = echo_server().await;
    let theirs = answer(
        "ts2.example",
        &remote_address.to_string(),
        pb::RedirectReason::ExistingSession,
    );
    harness.answer_with(theirs);
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=alice"));
    exchange(harness.front_door, &bytes).await;
    assert!(next(&mut remote).await.ends_with(&bytes));

    harness.broker_stop.cancel();
    let address = harness.broker_url.trim_start_matches("http://").to_owned();
    // Let the agent's connection to the stopped broker end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fake = harness.fake.clone();
    let restart = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let listener = TcpListener::bind(&address).await.unwrap();
        fake.serve_on(listener, CancellationToken::new());
    });
    let started = tokio::time::Instant::now();
    exchange(harness.front_door, &bytes).await;
    assert!(next(&mut remote).await.ends_with(&bytes));
    nothing(&mut harness.local).await;
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "answered before the broker was back: {:?}",
        started.elapsed()
    );
    restart.await.unwrap();

    harness
        .fake
        .with(|state| state.redirect_answer = Some(Err(tonic::Code::Unavailable)));
    let started = tokio::time::Instant::now();
    exchange(harness.front_door, &bytes).await;
    assert_eq!(next(&mut harness.local).await, bytes);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a broker's UNAVAILABLE waited {:?}",
        started.elapsed()
    );
    harness.shutdown.cancel();
}

#[tokio::test]
async fn falls_back_to_the_local_service_but_never_moves_a_reconnection() {
    // Broker down: local.
    let mut down = harness(Vec::new(), false).await;
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=alice"));
    exchange(down.front_door, &bytes).await;
    assert_eq!(next(&mut down.local).await, bytes);
    down.shutdown.cancel();

    let mut harness = harness(Vec::new(), true).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_address = closed.local_addr().unwrap().to_string();
    drop(closed);
    // A new logon whose machine refuses the connection is placed again without it, up to
    // MAX_TARGETS machines; when every pick refuses, local.
    let new_logon = answer(
        "ts2.example",
        &closed_address,
        pb::RedirectReason::LoadBalanced,
    );
    harness.answer_with(new_logon);
    exchange(harness.front_door, &bytes).await;
    assert_eq!(next(&mut harness.local).await, bytes);
    let excluded: Vec<Vec<String>> = harness.fake.with(|state| {
        state
            .redirect_requests
            .drain(..)
            .map(|request| request.exclude_machine_ids)
            .collect()
    });
    let ts2 = machine_id(FARM, "ts2.example").to_string();
    let mut expected = vec![Vec::new()];
    for _ in 1..listener::MAX_TARGETS {
        expected.push(vec![ts2.clone()]);
    }
    assert_eq!(excluded, expected);
    // A reconnection whose machine refuses: closed, not moved, the broker asked once.
    let existing = answer(
        "ts2.example",
        &closed_address,
        pb::RedirectReason::ExistingSession,
    );
    harness.answer_with(existing);
    let (_, back) = exchange(harness.front_door, &bytes).await;
    assert!(back.is_empty());
    nothing(&mut harness.local).await;
    assert_eq!(harness.fake.with(|state| state.redirect_requests.len()), 1);
    // No user at all and a broker that cannot place one: local.
    harness
        .fake
        .with(|state| state.redirect_answer = Some(Err(tonic::Code::InvalidArgument)));
    let (_, anonymous) = request_with_tail(None);
    exchange(harness.front_door, &anonymous).await;
    assert_eq!(next(&mut harness.local).await, anonymous);
    harness.shutdown.cancel();
}

/// A cookie whose name the broker would refuse (here U+0085, what byte 0x85 of an ANSI code
/// page reads as) is taken as naming no user: the broker is asked without one and decides, as
/// for any client (it used to answer INVALID_ARGUMENT, and the client went to the local RDP
/// service past a full farm's refusal).
#[tokio::test]
async fn a_cookie_the_broker_would_refuse_is_decided_by_the_broker_as_naming_no_user() {
    let mut harness = harness(Vec::new(), true).await;
    harness.connected().await;
    let (remote_address, mut remote) = echo_server().await;
    harness.answer_with(answer(
        "ts2.example",
        &remote_address.to_string(),
        pb::RedirectReason::LoadBalanced,
    ));
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=new\u{85}bie"));
    exchange(harness.front_door, &bytes).await;
    assert!(next(&mut remote).await.ends_with(&bytes));
    nothing(&mut harness.local).await;
    let asked: Vec<String> = harness.fake.with(|state| {
        state
            .redirect_requests
            .iter()
            .map(|request| request.user_name.clone())
            .collect()
    });
    assert_eq!(asked, [""]);
    harness.shutdown.cancel();
}

/// The broker's answer that no machine may take a new logon now is a refusal, not the local
/// RDP service: a farm at its limits (RESOURCE_EXHAUSTED, asked again for 10 s first), or
/// nothing ready while this machine drains (UNAVAILABLE). With this machine not draining,
/// UNAVAILABLE (the farm's agents not back after a broker restart) still goes local.
#[tokio::test]
async fn a_broker_that_takes_no_new_logons_refuses_the_client() {
    let fake_full = |harness: &Harness| {
        harness
            .fake
            .with(|state| state.redirect_answer = Some(Err(tonic::Code::ResourceExhausted)))
    };
    let mut harness = harness(Vec::new(), true).await;
    harness.connected().await;
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=newbie"));
    // Full for a second (a logon storm's caps): the client waits, and goes where the broker
    // then says.
    let (remote_address, mut remote) = echo_server().await;
    harness.full_twice_then_on(&remote_address.to_string());
    let started = tokio::time::Instant::now();
    exchange(harness.front_door, &bytes).await;
    assert!(next(&mut remote).await.ends_with(&bytes));
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // Full for longer than a client waits (10 s): closed, never the local RDP service.
    fake_full(&harness);
    let started = tokio::time::Instant::now();
    let (_, back) = exchange_waiting(harness.front_door, &bytes, Duration::from_secs(20)).await;
    assert!(back.is_empty(), "{back:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    nothing(&mut harness.local).await;
    harness
        .fake
        .with(|state| state.redirect_answer = Some(Err(tonic::Code::Unavailable)));
    exchange(harness.front_door, &bytes).await;
    assert_eq!(next(&mut harness.local).await, bytes);
    harness.shutdown.cancel();

    let fake = FakeBroker::default();
    fake.with(|state| state.draining = true);
    let mut draining = harness_on_fake(fake, true, Duration::ZERO, None, None).await;
    draining.connected().await;
    assert!(draining.agent.link_status().draining);
    draining
        .fake
        .with(|state| state.redirect_answer = Some(Err(tonic::Code::Unavailable)));
    let (_, back) = exchange(draining.front_door, &bytes).await;
    assert!(back.is_empty(), "{back:?}");
    nothing(&mut draining.local).await;

    // The broker cannot decide (its database away, an error, no answer): a new user is
    // refused while this machine drains (it took them before); a user with a session here
    // still reaches it.
    for code in [tonic::Code::Internal, tonic::Code::Unknown] {
        draining
            .fake
            .with(|state| state.redirect_answer = Some(Err(code)));
        let (_, back) = exchange(draining.front_door, &bytes).await;
        assert!(back.is_empty(), "{code:?}: {back:?}");
        nothing(&mut draining.local).await;
    }
    draining
        .agent
        .directory()
        .apply(
            SessionEventKind::Disconnect,
            crate::directory::SessionRequest {
                user_name: "olivia".into(),
                session_id: Some(3),
                ..Default::default()
            },
        )
        .unwrap();
    let (_, returning) = request_with_tail(Some("Cookie: mstshash=olivia"));
    exchange(draining.front_door, &returning).await;
    assert_eq!(next(&mut draining.local).await, returning);
    draining.shutdown.cancel();
}

/// With two broker replicas, one frozen (it takes connections and never answers): a client
/// goes where the other one says within about a second, whichever of the two the agent uses.
#[tokio::test]
async fn a_frozen_replica_is_passed_over_for_the_other() {
    for frozen_first in [true, false] {
        let frozen = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let frozen_url = format!("http://{}", frozen.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = frozen.accept().await {
                held.push(stream);
            }
        });
        let urls = |url: &str| match frozen_first {
            true => format!("{frozen_url},{url}"),
            false => format!("{url},{frozen_url}"),
        };
        let settings = (Duration::ZERO, None, None);
        let harness = harness_on_replicas(FakeBroker::default(), true, urls, settings).await;
        let took = sent_where_the_broker_says(&harness, pb::RedirectReason::ExistingSession).await;
        assert!(
            took < Duration::from_millis(2500),
            "frozen first: {frozen_first}, {took:?}"
        );
        harness.shutdown.cancel();
    }
}

/// How long a client took to reach the machine the (working) fake broker names.
async fn sent_where_the_broker_says(harness: &Harness, reason: pb::RedirectReason) -> Duration {
    let (remote_address, mut remote) = echo_server().await;
    harness.answer_with(answer("ts2.example", &remote_address.to_string(), reason));
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=alice"));
    let started = tokio::time::Instant::now();
    exchange(harness.front_door, &bytes).await;
    assert!(next(&mut remote).await.ends_with(&bytes));
    started.elapsed()
}

/// With two broker replicas, one whose database is away (it answers UNAVAILABLE with its
/// retry hint): a new user goes where the other one places them, at once, whichever of the
/// two the agent uses — not to this machine's RDP service, as if no broker could decide.
#[tokio::test]
async fn a_replica_whose_database_is_away_is_passed_over_for_the_other() {
    for away_first in [true, false] {
        let away = FakeBroker::default();
        away.with(|state| state.database_away = true);
        let stop = CancellationToken::new();
        let away_url = away.serve(stop.clone()).await;
        let urls = |url: &str| match away_first {
            true => format!("{away_url},{url}"),
            false => format!("{url},{away_url}"),
        };
        let settings = (Duration::ZERO, None, None);
        let harness = harness_on_replicas(FakeBroker::default(), true, urls, settings).await;
        harness.connected().await;
        let took = sent_where_the_broker_says(&harness, pb::RedirectReason::LoadBalanced).await;
        assert!(
            took < Duration::from_millis(900),
            "database away first: {away_first}, {took:?}"
        );
        harness.shutdown.cancel();
        stop.cancel();
    }
}

/// A machine whose RDP service takes the connection but never answers the request (hung)
/// counts as refusing: the new logon goes to the next candidate, that machine left out.
#[tokio::test]
async fn a_target_that_never_answers_counts_as_refusing() {
    let harness = harness(Vec::new(), true).await;
    let staller = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let staller_address = staller.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = staller.accept().await {
            held.push(stream);
        }
    });
    let (other_address, mut other) = echo_server().await;
    harness.place_on_then_on(&staller_address, &other_address.to_string());
    let (packet, bytes) = request_with_tail(Some("Cookie: mstshash=bob"));
    // The client stays past the stalling target's 5 s and gets the next one's answer.
    let (_, back) = exchange_waiting(harness.front_door, &bytes, Duration::from_secs(15)).await;
    let seen = next(&mut other).await;
    assert!(seen.ends_with(&bytes) && seen.len() > packet.len());
    // The echo of the candidate that took it (its PROXY header first).
    assert!(back.ends_with(&bytes), "{back:?}");
    let requests = harness
        .fake
        .with(|state| std::mem::take(&mut state.redirect_requests));
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[1].exclude_machine_ids,
        [machine_id(FARM, "ts2.example").to_string()]
    );
    harness.shutdown.cancel();
}

/// A new logon is retried on the broker's next candidate when its machine refuses the
/// connection (that machine left out of the placement); when this machine's own RDP service
/// refuses a new logon the broker placed here, the next candidate is asked for too.
#[tokio::test]
async fn a_refused_new_logon_goes_to_the_next_candidate() {
    let mut harness = harness(Vec::new(), true).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_address = closed.local_addr().unwrap().to_string();
    drop(closed);
    let (other_address, mut other) = echo_server().await;
    harness.place_on_then_on(&closed_address, &other_address.to_string());
    harness
        .fake
        .with(|state| state.redirect_answer = Some(Err(tonic::Code::Internal)));
    let (packet, bytes) = request_with_tail(Some("Cookie: mstshash=bob"));
    let (client, _) = exchange(harness.front_door, &bytes).await;
    // The next candidate got the connection, as another front door gets it.
    let seen = next(&mut other).await;
    let header = proxy_header::encode(client, harness.front_door, None, 0);
    assert_eq!(&seen[..header.len()], header.as_slice());
    assert_eq!(
        &seen[header.len()..header.len() + packet.len()],
        packet.as_slice()
    );
    nothing(&mut harness.local).await;
    let requests = harness
        .fake
        .with(|state| std::mem::take(&mut state.redirect_requests));
    assert_eq!(requests.len(), 2);
    assert!(requests[0].exclude_machine_ids.is_empty());
    assert_eq!(
        requests[1].exclude_machine_ids,
        [machine_id(FARM, "ts2.example").to_string()]
    );
    assert_eq!(requests[1].user_name, "bob");
    harness.shutdown.cancel();

    // This machine placed a new logon on itself, and its RDP service refuses.
    let refusing_local = harness_with_local(closed_address.clone()).await;
    let (third_address, mut third) = echo_server().await;
    let here = answer(
        NAME,
        &refusing_local.front_door.to_string(),
        pb::RedirectReason::LoadBalanced,
    );
    let there = answer(
        "ts3.example",
        &third_address.to_string(),
        pb::RedirectReason::LoadBalanced,
    );
    refusing_local.fake.with(|state| {
        state.queued_answers = [Ok(here), Ok(there)].into();
    });
    exchange(refusing_local.front_door, &bytes).await;
    let seen = next(&mut third).await;
    assert!(seen.ends_with(&bytes), "{seen:?}");
    let requests = refusing_local
        .fake
        .with(|state| std::mem::take(&mut state.redirect_requests));
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[1].exclude_machine_ids,
        [machine_id(FARM, NAME).to_string()]
    );
    // A reconnection to this machine whose RDP service refuses: closed, never moved.
    let existing = answer(
        NAME,
        &refusing_local.front_door.to_string(),
        pb::RedirectReason::ExistingSession,
    );
    refusing_local.answer_with(existing);
    let (_, back) = exchange(refusing_local.front_door, &bytes).await;
    assert!(back.is_empty());
    nothing(&mut third).await;
    assert_eq!(
        refusing_local
            .fake
            .with(|state| state.redirect_requests.len()),
        1
    );
    refusing_local.shutdown.cancel();
}

/// A cookie is a hint anyone can write: a connection handed to the local service for a user
/// nobody confirmed, that ends within the grace, leaves no session; the same connection for a
/// user whose session a local source reported leaves that session disconnected.
#[tokio::test]
async fn a_short_unconfirmed_logon_leaves_no_session() {
    let mut harness = harness_with(Vec::new(), false, Duration::from_secs(30), None).await;
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=mallory"));
    exchange(harness.front_door, &bytes).await;
    assert_eq!(next(&mut harness.local).await, bytes);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !harness.agent.directory().list().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            harness.agent.directory().list()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // bob's session is known to PAM: the short connection only disconnects it.
    harness
        .agent
        .directory()
        .apply(
            SessionEventKind::Logon,
            crate::directory::SessionRequest {
                user_name: "bob".into(),
                session_id: Some(4),
                ..Default::default()
            },
        )
        .unwrap();
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=bob"));
    exchange(harness.front_door, &bytes).await;
    assert_eq!(next(&mut harness.local).await, bytes);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let sessions = harness.agent.directory().list();
        assert_eq!(sessions.len(), 1, "{sessions:?}");
        if sessions[0].state == RecordState::Disconnected {
            assert_eq!(sessions[0].session_id, 4);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{sessions:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    harness.shutdown.cancel();
}
