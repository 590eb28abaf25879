//! Real RDP through the agents' front doors, with Debian's FreeRDP: `xfreerdp` clients (each
//! on an Xvfb display) connect to a front door; behind every agent a `freerdp-shadow-cli` server
//! (on an Xvfb display of its own) stands as the machine's local RDP service. The servers require
//! NLA, so a session that reaches the active state has carried TLS and CredSSP through the
//! splice (and, between machines, through the PROXY v2 hop) untouched.
//!
//! What a session reaching the active state means here: the client logs
//! `CONNECTION_STATE_FINALIZATION --> CONNECTION_STATE_ACTIVE` (after the X.224 negotiation, TLS,
//! CredSSP, MCS, licensing and the capability exchange), the server logs the same transition for
//! that connection, and the client is still connected a moment later.

use std::time::Duration;

use tonic::transport::Channel;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::broker_client::BrokerClient;
use tsbroker_tests::process::free_port;
use tsbroker_tests::rdp::{RdpClient, ShadowServer, Xvfb};
use tsbroker_tests::spawn_agent::{ListedSession, broker_sessions};
use tsbroker_tests::{TestAgent, TestBroker, TestDatabase, spawn_broker, spawn_broker_at};

/// From starting xfreerdp to the active session, on a loaded 2-core machine.
const SESSION_UP: Duration = Duration::from_secs(60);
/// For the broker's directory to show what the front door saw.
const DIRECTORY_SECONDS: u64 = 15;
/// Every test user, known to every server.
const USERS: &[&str] = &["alice", "bob", "carol", "dave", "erin"];
/// For agents whose tests end a real session within seconds of its start and expect it to stay
/// (disconnected): the shadow servers report no logon to the agent, so the front door's
/// sessions stay unconfirmed, and the default grace (30 s) would take such a short connection
/// for a failed logon. Every session here lasts past this (the test waits a second after it is
/// active).
const SHORT_GRACE: Duration = Duration::from_secs(1);

fn short_grace(config: &mut tsagent::AgentConfig) {
    config.unconfirmed_logon_grace = SHORT_GRACE;
}

/// Every broker here. The servers start one after another, each a few seconds after the last
/// (an Xvfb and an RDP server first): with slow start on, a later machine would count with a
/// fraction of its weight for as long as it lagged the first one, and where a new logon goes
/// would depend on how long the servers took to start on a loaded machine. Slow start has its
/// own test (policies.rs).
fn without_slow_start(config: &mut tsbroker::BrokerConfig) {
    config.farms.defaults.slow_start = Duration::ZERO;
}

/// A terminal server: an RDP server and the agent whose front door stands before it.
struct Server {
    shadow: ShadowServer,
    agent: TestAgent,
}

async fn server(broker: &TestBroker, name: &str) -> Server {
    server_with(broker, name, |_| {}).await
}

async fn server_with(
    broker: &TestBroker,
    name: &str,
    adjust: impl FnOnce(&mut tsagent::AgentConfig),
) -> Server {
    let shadow = ShadowServer::start(USERS).await;
    let agent =
        TestAgent::start_with_front_door(&broker.url(), name, &shadow.address(), adjust).await;
    Server { shadow, agent }
}

async fn user_sessions(client: &mut BrokerClient<Channel>, user: &str) -> Vec<pb::Session> {
    client
        .list_sessions(pb::ListSessionsRequest {
            user_name: user.to_owned(),
            ..Default::default()
        })
        .await
        .expect("ListSessions")
        .into_inner()
        .sessions
}

/// Waits until the broker holds exactly one session of `user`, on `machine_id`, in `state`;
/// returns it.
async fn broker_shows(
    client: &mut BrokerClient<Channel>,
    user: &str,
    machine_id: &str,
    state: pb::SessionState,
) -> pb::Session {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(DIRECTORY_SECONDS);
    loop {
        let sessions = user_sessions(client, user).await;
        if let [session] = sessions.as_slice()
            && session.machine_id == machine_id
            && session.state == state as i32
        {
            return session.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker did not show {user}'s one session {state:?} on {machine_id} within {DIRECTORY_SECONDS}s: {sessions:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the broker holds `count` sessions on `agent`'s machine.
async fn broker_counts(client: &mut BrokerClient<Channel>, agent: &TestAgent, count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(DIRECTORY_SECONDS);
    loop {
        let sessions = broker_sessions(client, &agent.machine_id()).await;
        if sessions.len() == count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker did not show {count} sessions on {} within {DIRECTORY_SECONDS}s: {sessions:?}",
            agent.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The session is up on both ends and stays up: the client reached the active state over NLA,
/// `shadow` saw one more active session, and a second later the client is still connected.
async fn session_completes(client: &mut RdpClient, shadow: &ShadowServer, activated_before: usize) {
    client.wait_active(SESSION_UP).await;
    assert!(
        client.negotiated_nla(),
        "the client did not negotiate NLA:\n{}",
        client.log.tail(40)
    );
    let server_side = shadow
        .log
        .wait_for(
            tsbroker_tests::rdp::SERVER_ACTIVE,
            activated_before + 1,
            Duration::from_secs(10),
            None,
        )
        .await;
    assert!(
        server_side,
        "the server this connection should reach did not log a session active (did it go \
         elsewhere?); its log ends:\n{}",
        shadow.log.tail(40)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        client.is_running(),
        "xfreerdp ended right after the session came up:\n{}",
        client.log.tail(40)
    );
}

/// Sends a front door an X.224 request whose routing token names an address of no machine
/// (which makes it refresh its list of the farm's machines) and checks that the connection is
/// closed without an answer.
async fn refused_token(front_door_port: u16) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nowhere =
        tsagent::front_door::x224::encode_routing_token("192.0.2.1:3389".parse().unwrap());
    let request = tsagent::front_door::x224::build_connection_request(
        Some(&format!("Cookie: msts={nowhere}")),
        Some(3),
    );
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", front_door_port))
        .await
        .expect("connect to the front door");
    stream.write_all(&request).await.expect("send the request");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    assert!(
        matches!(read, Ok(Ok(0))),
        "the front door answered a token of no machine: {read:?} {answer:?}"
    );
}

/// A user with a disconnected session on B connects through A's front door: A sends the
/// connection to B's front door (with a PROXY v2 header), B hands it to its RDP server, the
/// session completes there, and A's RDP server never sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_disconnected_user_reaches_their_server_through_another_front_door() {
    let database = TestDatabase::postgres().await;
    let broker = spawn_broker(&database.url, without_slow_start).await;
    let mut directory = broker.broker_client().await;
    let a = server(&broker, "ts-a.example.test").await;
    let b = server_with(&broker, "ts-b.example.test", short_grace).await;
    let screen = Xvfb::start().await;

    // Carol's session on A makes B the emptier machine: bob's first logon, through B's own
    // front door, lands on B.
    a.agent
        .cli(&["session", "logon", "--user", "carol", "--session-id", "3"])
        .await;
    broker_shows(
        &mut directory,
        "carol",
        &a.agent.machine_id(),
        pb::SessionState::Active,
    )
    .await;
    let mut first = RdpClient::connect(&screen, b.agent.front_door_port(), "bob");
    session_completes(&mut first, &b.shadow, 0).await;
    let logon = broker_shows(
        &mut directory,
        "bob",
        &b.agent.machine_id(),
        pb::SessionState::Active,
    )
    .await;

    // The client goes away without logging off: a disconnected session on B.
    first.kill();
    broker_shows(
        &mut directory,
        "bob",
        &b.agent.machine_id(),
        pb::SessionState::Disconnected,
    )
    .await;
    // A is now the emptier machine: only bob's session can send him to B.
    a.agent
        .cli(&["session", "logoff", "--user", "carol", "--session-id", "3"])
        .await;
    broker_counts(&mut directory, &a.agent, 0).await;

    let mut second = RdpClient::connect(&screen, a.agent.front_door_port(), "bob");
    session_completes(&mut second, &b.shadow, 1).await;
    assert_eq!(
        b.shadow.connections_of("bob"),
        2,
        "{}",
        b.shadow.log.tail(40)
    );
    assert_eq!(b.shadow.nla_negotiations(), 2);
    assert_eq!(
        a.shadow.connections(),
        0,
        "A's own RDP server saw a connection:\n{}",
        a.shadow.log.tail(40)
    );

    // B's agent saw the reconnection itself (A recorded nothing), with the client's own
    // address carried across the hop.
    assert!(a.agent.sessions().is_empty(), "{:?}", a.agent.sessions());
    let records = b.agent.running().directory().list();
    assert_eq!(records.len(), 1, "{records:?}");
    let record = &records[0];
    assert_eq!(
        (record.session_id, record.user_name.as_str()),
        (logon.session_id, "bob")
    );
    let to_a: Vec<_> = second
        .connections()
        .into_iter()
        .filter(|(_, remote)| remote.port() == a.agent.front_door_port())
        .collect();
    assert_eq!(
        to_a.len(),
        1,
        "xfreerdp's connections: {:?}",
        second.connections()
    );
    assert_eq!(record.client_address, to_a[0].0.to_string());

    // The directory: still one session of bob, the same one, active again.
    let again = broker_shows(
        &mut directory,
        "bob",
        &b.agent.machine_id(),
        pb::SessionState::Active,
    )
    .await;
    assert_eq!(again.session_id, logon.session_id);
    assert_eq!(again.client_address, record.client_address);

    // Gone again, through both front doors.
    second.kill();
    broker_shows(
        &mut directory,
        "bob",
        &b.agent.machine_id(),
        pb::SessionState::Disconnected,
    )
    .await;
    a.agent.stop().await;
    b.agent.stop().await;
    broker.stop().await;
    database.drop_database().await;
}

/// A new user who connects to a busy machine's front door is sent to the least-loaded one;
/// when that one refuses the connection, to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_user_reaches_the_least_loaded_server() {
    let database = TestDatabase::postgres().await;
    let broker = spawn_broker(&database.url, without_slow_start).await;
    let mut directory = broker.broker_client().await;
    let a = server(&broker, "ts-a.example.test").await;
    let b = server(&broker, "ts-b.example.test").await;
    // A third machine whose RDP service is not there: sending anyone to it would fail.
    let c = TestAgent::start_with_front_door(
        &broker.url(),
        "ts-c.example.test",
        &format!("127.0.0.1:{}", free_port()),
        |_| {},
    )
    .await;
    let screen = Xvfb::start().await;

    // Load: A two sessions, C one, B none.
    a.agent.cli(&["session", "logon", "--user", "alice"]).await;
    a.agent.cli(&["session", "logon", "--user", "bob"]).await;
    c.cli(&["session", "logon", "--user", "carol"]).await;
    broker_counts(&mut directory, &a.agent, 2).await;
    broker_counts(&mut directory, &c, 1).await;

    let mut client = RdpClient::connect(&screen, a.agent.front_door_port(), "dave");
    session_completes(&mut client, &b.shadow, 0).await;
    assert_eq!(b.shadow.connections_of("dave"), 1);
    assert_eq!(
        a.shadow.connections(),
        0,
        "A's own RDP server saw a connection:\n{}",
        a.shadow.log.tail(40)
    );
    let placed = broker_shows(
        &mut directory,
        "dave",
        &b.agent.machine_id(),
        pb::SessionState::Active,
    )
    .await;
    assert_eq!(placed.machine_name, "ts-b.example.test");
    assert_eq!(
        b.agent.sessions(),
        vec![ListedSession::new(placed.session_id, "dave", "active")]
    );
    assert!(
        !a.agent
            .sessions()
            .iter()
            .any(|session| session.user == "dave")
    );
    let machine_b = directory
        .get_machine(pb::GetMachineRequest {
            machine: Some(crate::support::by_name("default", "ts-b.example.test")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(machine_b.session_count, 1);

    // C empties and is now the least loaded, but its RDP service refuses: its front door
    // closes the handed-over connection unanswered, and A's front door asks the broker for
    // the next candidate (C left out), B, where the session completes.
    c.cli(&["session", "logoff", "--user", "carol"]).await;
    broker_counts(&mut directory, &c, 0).await;
    let mut retried = RdpClient::connect(&screen, a.agent.front_door_port(), "erin");
    session_completes(&mut retried, &b.shadow, 1).await;
    assert_eq!(b.shadow.connections_of("erin"), 1);
    assert_eq!(a.shadow.connections(), 0);
    broker_shows(
        &mut directory,
        "erin",
        &b.agent.machine_id(),
        pb::SessionState::Active,
    )
    .await;
    assert!(c.sessions().is_empty(), "{:?}", c.sessions());

    retried.kill();
    client.kill();
    c.stop().await;
    a.agent.stop().await;
    b.agent.stop().await;
    broker.stop().await;
    database.drop_database().await;
}

/// The front door's own view reaches the directory: a client that connects is an active
/// session, a client that vanishes leaves it disconnected, connecting again makes the same
/// session active.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connects_and_drops_seen_by_the_front_door_reach_the_directory() {
    let database = TestDatabase::postgres().await;
    let broker = spawn_broker(&database.url, without_slow_start).await;
    let mut directory = broker.broker_client().await;
    let a = server_with(&broker, "ts-a.example.test", short_grace).await;
    let machine_id = a.agent.machine_id();
    let screen = Xvfb::start().await;

    let mut client = RdpClient::connect(&screen, a.agent.front_door_port(), "alice");
    session_completes(&mut client, &a.shadow, 0).await;
    let logon = broker_shows(
        &mut directory,
        "alice",
        &machine_id,
        pb::SessionState::Active,
    )
    .await;

    client.kill();
    let dropped = broker_shows(
        &mut directory,
        "alice",
        &machine_id,
        pb::SessionState::Disconnected,
    )
    .await;
    assert_eq!(dropped.session_id, logon.session_id);

    let mut client = RdpClient::connect(&screen, a.agent.front_door_port(), "alice");
    session_completes(&mut client, &a.shadow, 1).await;
    let back = broker_shows(
        &mut directory,
        "alice",
        &machine_id,
        pb::SessionState::Active,
    )
    .await;
    assert_eq!(back.session_id, logon.session_id);
    assert_eq!(a.shadow.connections_of("alice"), 2);
    // The agent's table and the directory agree.
    let listed =
        tsbroker_tests::spawn_agent::parse_session_list(&a.agent.cli(&["session", "list"]).await);
    assert_eq!(listed, broker_sessions(&mut directory, &machine_id).await);
    assert_eq!(
        listed,
        vec![ListedSession::new(logon.session_id, "alice", "active")]
    );

    client.kill();
    broker_shows(
        &mut directory,
        "alice",
        &machine_id,
        pb::SessionState::Disconnected,
    )
    .await;
    a.agent.stop().await;
    broker.stop().await;
    database.drop_database().await;
}

/// With the broker down, the front door sends clients to its own RDP server and the session
/// is in the directory once the broker is back (the agent's RESYNC carries it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_broker_down_clients_reach_the_local_server_and_the_directory_catches_up() {
    let database = TestDatabase::postgres().await;
    let broker = spawn_broker(&database.url, without_slow_start).await;
    let address = broker.address;
    let a = server_with(&broker, "ts-a.example.test", short_grace).await;
    let b = server(&broker, "ts-b.example.test").await;
    let screen = Xvfb::start().await;
    // A is the busier machine: with the broker up, a new user would go to B.
    a.agent.cli(&["session", "logon", "--user", "carol"]).await;
    let mut directory = broker.broker_client().await;
    broker_counts(&mut directory, &a.agent, 1).await;
    drop(directory);

    broker.stop().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(DIRECTORY_SECONDS);
    while a.agent.running().link_status().connected {
        assert!(tokio::time::Instant::now() < deadline, "A still connected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = RdpClient::connect(&screen, a.agent.front_door_port(), "alice");
    session_completes(&mut client, &a.shadow, 0).await;
    assert_eq!(a.shadow.connections_of("alice"), 1);
    assert_eq!(b.shadow.connections(), 0);
    let mine = a.agent.sessions();
    assert!(
        mine.iter()
            .any(|session| session.user == "alice" && session.state == "active"),
        "{mine:?}"
    );
    // A reports its logons (carol's above), as PAM does: alice's too. Without it her session,
    // which only the front door saw, would be taken for a failed logon when her connection
    // ends (directory/rules.rs).
    a.agent.cli(&["session", "logon", "--user", "alice"]).await;

    let broker = spawn_broker_at(&database.url, address, without_slow_start).await;
    let mut directory = broker.broker_client().await;
    let session = broker_shows(
        &mut directory,
        "alice",
        &a.agent.machine_id(),
        pb::SessionState::Active,
    )
    .await;
    client.kill();
    let dropped = broker_shows(
        &mut directory,
        "alice",
        &a.agent.machine_id(),
        pb::SessionState::Disconnected,
    )
    .await;
    assert_eq!(dropped.session_id, session.session_id);

    a.agent.stop().await;
    b.agent.stop().await;
    broker.stop().await;
    database.drop_database().await;
}

/// What xfreerdp sends instead of the `mstshash` cookie when given `/load-balance-info`: a
/// routing token (`Cookie: msts=IP.PORT.0000`) names the machine to go to, a collection
/// (`tsv://MS Terminal Services Plugin.1.<farm>`) gets the policy's pick; a token naming no
/// machine of the farm, or another farm's collection, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_tokens_and_collections_from_xfreerdp_are_honoured() {
    let database = TestDatabase::postgres().await;
    let broker = spawn_broker(&database.url, without_slow_start).await;
    let mut directory = broker.broker_client().await;
    // A's list of the farm's machines is not refreshed on its own during the test, and holds
    // A (READY) but not B when B joins: the token for B must make A look again (B shares A's
    // IP, so A itself must not stand in for it).
    let a = server_with(&broker, "ts-a.example.test", |config| {
        config.machine_refresh = Duration::from_secs(600);
    })
    .await;
    refused_token(a.agent.front_door_port()).await;
    let b = server(&broker, "ts-b.example.test").await;
    let screen = Xvfb::start().await;
    // A is the busier machine: the policy picks B.
    a.agent.cli(&["session", "logon", "--user", "carol"]).await;
    broker_counts(&mut directory, &a.agent, 1).await;

    // A token naming B's front door, sent to A's: A passes the connection to B.
    let b_address = match b.agent.front_door {
        Some(std::net::SocketAddr::V4(address)) => address,
        other => panic!("B's front door is {other:?}"),
    };
    let token = tsagent::front_door::x224::encode_routing_token(b_address);
    let mut client = RdpClient::connect_with(
        &screen,
        a.agent.front_door_port(),
        "bob",
        &[&format!("/load-balance-info:Cookie: msts={token}")],
    );
    session_completes(&mut client, &b.shadow, 0).await;
    assert_eq!(b.shadow.connections(), 1);
    assert_eq!(a.shadow.connections(), 0);
    client.kill();

    // The farm's collection: the policy's pick, B.
    let mut client = RdpClient::connect_with(
        &screen,
        a.agent.front_door_port(),
        "dave",
        &["/load-balance-info:tsv://MS Terminal Services Plugin.1.default"],
    );
    session_completes(&mut client, &b.shadow, 1).await;
    assert_eq!(b.shadow.connections(), 2);
    assert_eq!(a.shadow.connections(), 0);
    client.kill();

    // Refused: the client's connection is closed before any server sees it.
    let nowhere =
        tsagent::front_door::x224::encode_routing_token("192.0.2.1:3389".parse().unwrap());
    for info in [
        format!("/load-balance-info:Cookie: msts={nowhere}"),
        "/load-balance-info:tsv://MS Terminal Services Plugin.1.elsewhere".to_owned(),
    ] {
        let mut client =
            RdpClient::connect_with(&screen, a.agent.front_door_port(), "bob", &[&info]);
        let status = client.wait_exit(Duration::from_secs(30)).await;
        assert!(
            status.is_some_and(|status| !status.success()),
            "{info}: xfreerdp did not fail ({status:?}):\n{}",
            client.log.tail(20)
        );
        assert_eq!(client.log.count(tsbroker_tests::rdp::CLIENT_ACTIVE), 0);
    }
    assert_eq!((a.shadow.connections(), b.shadow.connections()), (0, 2));

    a.agent.stop().await;
    b.agent.stop().await;
    broker.stop().await;
    database.drop_database().await;
}

/// The `mstshash` cookie is a hint anyone can write: a client naming a user the server does not
/// know (NLA refuses it) reaches the local RDP server through the front door, fails, and leaves
/// no session behind, neither in the agent's table nor in the directory, so the broker never
/// sends that user here as a returning one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_nla_logon_leaves_no_session() {
    let database = TestDatabase::postgres().await;
    let broker = spawn_broker(&database.url, without_slow_start).await;
    let mut directory = broker.broker_client().await;
    // The default grace: what a farm runs with.
    let a = server(&broker, "ts-a.example.test").await;
    let machine_id = a.agent.machine_id();
    let screen = Xvfb::start().await;

    let mut client = RdpClient::connect(&screen, a.agent.front_door_port(), "mallory");
    let status = client.wait_exit(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|status| !status.success()),
        "xfreerdp as mallory did not fail ({status:?}):\n{}",
        client.log.tail(40)
    );
    assert_eq!(client.log.count(tsbroker_tests::rdp::CLIENT_ACTIVE), 0);
    // xfreerdp tries twice before it gives up.
    assert!(
        a.shadow.connections_of("mallory") >= 1,
        "the connection did not reach the local RDP server:\n{}",
        a.shadow.log.tail(40)
    );
    assert_eq!(a.shadow.sessions_activated(), 0);

    // The agent dropped the failed logon.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(DIRECTORY_SECONDS);
    while !a.agent.sessions().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent kept a session of the failed logon: {:?}",
            a.agent.sessions()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent's changes reach the broker in order: once a later one is there, so is the end
    // of mallory's.
    a.agent
        .cli(&["session", "logon", "--user", "carol", "--session-id", "3"])
        .await;
    broker_shows(
        &mut directory,
        "carol",
        &machine_id,
        pb::SessionState::Active,
    )
    .await;
    let mallory = user_sessions(&mut directory, "mallory").await;
    assert!(mallory.is_empty(), "{mallory:?}");
    assert_eq!(
        broker_sessions(&mut directory, &machine_id).await,
        vec![ListedSession::new(3, "carol", "active")]
    );

    a.agent.stop().await;
    broker.stop().await;
    database.drop_database().await;
}
