//! An agent that ends while clients are connected through its front door, on a machine where
//! no PAM reports logons. Killed (SIGKILL): the front door's sessions that had lasted the
//! unconfirmed-logon grace are logons, and the restarted agent keeps them (DISCONNECTED), so
//! that their users go back to them rather than to a second session elsewhere. Stopped
//! (SIGTERM): the stop cuts the connections, and the broker hears of the sessions they leave
//! DISCONNECTED before the stream closes, not only when the agent is back.

use crate::support::{reason, redirect};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::broker_client::BrokerClient;
use tsbroker_tests::process::LogFile;
use tsbroker_tests::spawn_agent::{ListedSession, broker_sessions, parse_session_list};
use tsbroker_tests::{AgentProcess, TestBroker, TestDatabase, spawn_broker};

const MACHINE: &str = "ts-crash.example.test";

/// A stand-in RDP service: answers the connection request (with its own bytes) and holds the
/// connection open, as a session does. Returns its "host:port".
async fn rdp_service() -> String {
    let rdp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = rdp.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = rdp.accept().await {
            tokio::spawn(async move {
                let mut chunk = vec![0u8; 4096];
                while let Ok(count @ 1..) = stream.read(&mut chunk).await {
                    let _ = stream.write_all(&chunk[..count]).await;
                }
            });
        }
    });
    address
}

/// The agent's arguments: a front door on `port` in front of `rdp`, a one-second grace.
fn agent_args(broker_url: &str, port: u16, rdp: &str, state: &Path) -> Vec<String> {
    [
        "--broker",
        broker_url,
        "--machine-name",
        MACHINE,
        "--advertise",
        &format!("127.0.0.1:{port}"),
        "--front-door",
        &format!("127.0.0.1:{port}"),
        "--local-rdp",
        rdp,
        "--unconfirmed-logon-grace",
        "1s",
        "--state-dir",
        &state.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A client of `user` (its cookie names it) connected through the front door on `port`.
async fn connect(port: u16, user: &str) -> TcpStream {
    let cookie = format!("Cookie: mstshash={user}");
    let request =
        tsagent::front_door::x224::build_connection_request(Some(cookie.as_str()), Some(3));
    let mut connection = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    connection.write_all(&request).await.unwrap();
    connection
}

async fn sessions(socket: &Path) -> Vec<ListedSession> {
    let listed = tsbroker_tests::spawn_agent::tsagent_cli(&["session", "list"], socket).await;
    parse_session_list(&listed)
}

/// Waits until the agent on `socket` lists a session of `user`.
async fn listed_within(socket: &Path, user: &str, log: &LogFile) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !sessions(socket)
        .await
        .iter()
        .any(|session| session.user == user)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no session of {user}:\n{}",
            log.tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A broker, an RDP service, and what the agent in front of it runs with.
struct Setup {
    _database: TestDatabase,
    broker: TestBroker,
    client: BrokerClient<Channel>,
    dir: tempfile::TempDir,
    port: u16,
    args: Vec<String>,
    socket: PathBuf,
}

async fn setup() -> Setup {
    let database = TestDatabase::sqlite();
    let broker = spawn_broker(&database.url, |_| {}).await;
    let client = broker.broker_client().await;
    let rdp = rdp_service().await;
    let dir = tempfile::tempdir().unwrap();
    let port = tsbroker_tests::process::free_port();
    let args = agent_args(&broker.url(), port, &rdp, &dir.path().join("state"));
    let socket = dir.path().join("control.sock");
    Setup {
        _database: database,
        broker,
        client,
        dir,
        port,
        args,
        socket,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_keeps_the_front_doors_sessions_that_had_lasted_the_grace() {
    let Setup {
        _database,
        broker,
        mut client,
        dir,
        port,
        args,
        socket,
    } = setup().await;
    let mut first = AgentProcess::spawn(&args, &socket, &dir.path().join("first.log"));
    first.wait_until_connected(Duration::from_secs(20)).await;
    let _kate = connect(port, "kate").await;
    listed_within(&socket, "kate", &first.log).await;
    // kate's connection lasts past the grace; leo's starts just before the crash.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let _leo = connect(port, "leo").await;
    listed_within(&socket, "leo", &first.log).await;
    // The table is saved behind the connections' backs, within a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.kill();

    let mut second = AgentProcess::spawn(&args, &socket, &dir.path().join("second.log"));
    second.wait_until_connected(Duration::from_secs(20)).await;
    // Undecided logons are settled the grace after the start.
    let settled = "front-door logons the previous agent left unconfirmed";
    assert!(
        second
            .log
            .wait_for(settled, 1, Duration::from_secs(10), None)
            .await,
        "{}",
        second.log.tail(20)
    );
    let users: Vec<(String, String)> = sessions(&socket)
        .await
        .into_iter()
        .map(|session| (session.user, session.state))
        .collect();
    assert_eq!(
        users,
        [("kate".to_owned(), "disconnected".to_owned())],
        "{}",
        second.log.tail(20)
    );
    let back = redirect(&mut client, "default", "kate").await.unwrap();
    assert_eq!(
        (back.machine_name.as_str(), reason(&back)),
        ("ts-crash.example.test", pb::RedirectReason::ExistingSession)
    );
    let stopped = second.terminate(Duration::from_secs(15)).await;
    assert!(stopped.success(), "{stopped:?}");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_tells_the_broker_of_the_sessions_its_cut_connections_leave() {
    let Setup {
        _database,
        broker,
        mut client,
        dir,
        port,
        args,
        socket,
    } = setup().await;
    let mut agent = AgentProcess::spawn(&args, &socket, &dir.path().join("agent.log"));
    agent.wait_until_connected(Duration::from_secs(20)).await;
    let _kate = connect(port, "kate").await;
    let _leo = connect(port, "leo").await;
    listed_within(&socket, "kate", &agent.log).await;
    listed_within(&socket, "leo", &agent.log).await;
    // Both last past the grace: logons, kept when their connections end.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let machine_id = tsbroker_common::model::machine_id("default", MACHINE).to_string();
    let states = |listed: Vec<ListedSession>| -> Vec<(String, String)> {
        let mut states: Vec<(String, String)> = listed
            .into_iter()
            .map(|session| (session.user, session.state))
            .collect();
        states.sort();
        states
    };
    let active = [
        ("kate".to_owned(), "active".to_owned()),
        ("leo".to_owned(), "active".to_owned()),
    ];
    assert_eq!(
        states(broker_sessions(&mut client, &machine_id).await),
        active
    );

    let stopped = agent.terminate(Duration::from_secs(15)).await;
    assert!(stopped.success(), "{stopped:?}\n{}", agent.log.tail(20));
    // Before the agent is back: the broker has both DISCONNECTED, from the stopping agent.
    let disconnected = [
        ("kate".to_owned(), "disconnected".to_owned()),
        ("leo".to_owned(), "disconnected".to_owned()),
    ];
    assert_eq!(
        states(broker_sessions(&mut client, &machine_id).await),
        disconnected,
        "{}",
        agent.log.tail(20)
    );
    assert_eq!(
        agent
            .log
            .count("did not acknowledge the last session changes"),
        0,
        "{}",
        agent.log.tail(20)
    );
    broker.stop().await;
}
