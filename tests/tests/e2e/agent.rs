//! The real agent against the real broker, without RDP: joining, sessions reported through the
//! control socket and its CLI, a broker restart, an agent restart (the `tsagent` binary), and
//! an administrator's drain reaching the agent.

use crate::support::{by_name, eventually, machine, on_both_stores, reason, redirect};
use std::time::Duration;
use tonic::transport::Channel;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::broker_client::BrokerClient;
use tsbroker_tests::binaries::workspace_binary;
use tsbroker_tests::spawn_agent::{
    ListedSession, broker_sessions, parse_session_list, tsagent_cli_output, tsagent_output,
};
use tsbroker_tests::{AgentProcess, TestAgent, TestDatabase, spawn_broker, spawn_broker_at};

on_both_stores!(
    an_agent_joins_and_its_control_socket_sessions_reach_the_broker,
    a_broker_restart_ends_with_the_agents_sessions_including_changes_made_while_it_was_down,
    an_agent_restart_keeps_its_sessions_and_the_broker_ends_with_them,
    a_drain_from_the_admin_api_reaches_the_agent,
);

/// The arguments of a `tsagent` process for machine `name` (`args[3]`) with its state in
/// `state_dir`.
fn process_args(broker_url: &str, name: &str, state_dir: &std::path::Path) -> Vec<String> {
    [
        "--broker",
        broker_url,
        "--machine-name",
        name,
        "--advertise",
        "127.0.0.1:9",
        "--state-dir",
        &state_dir.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Polls until the broker's sessions for `machine_id` equal `expected` (sorted); fails with
/// both lists after `seconds`.
async fn broker_converges(
    client: &mut BrokerClient<Channel>,
    machine_id: &str,
    expected: &[ListedSession],
    seconds: u64,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let listed = broker_sessions(client, machine_id).await;
        if listed == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker's sessions did not become the agent's within {seconds}s:\nbroker: {listed:?}\nagent:  {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The agent's `tsagent session list`, parsed.
async fn session_list(agent: &TestAgent) -> Vec<ListedSession> {
    parse_session_list(&agent.cli(&["session", "list"]).await)
}

async fn an_agent_joins_and_its_control_socket_sessions_reach_the_broker(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let agent = TestAgent::start(&broker.url(), "ts-join.example.test", |config| {
        config.farm = "farm-j".into();
        config.advertise = "ts-join.example.test:3390".into();
        config.weight = 250;
        config.session_limit = 7;
    })
    .await;

    // The machine as its agent described it, READY.
    let listed = client
        .list_machines(pb::ListMachinesRequest {
            farm: "farm-j".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .machines;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let joined = &listed[0];
    assert_eq!(joined.state, pb::MachineState::Ready as i32, "{joined:?}");
    assert_eq!(joined.id, agent.machine_id());
    assert_eq!(joined.name, "ts-join.example.test");
    assert_eq!(joined.address, "ts-join.example.test:3390");
    assert_eq!((joined.weight, joined.session_limit), (250, 7));
    assert!(!joined.single_session && !joined.front_door, "{joined:?}");
    assert_eq!(joined.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(agent.running().link_status().machine_id, agent.machine_id());
    let status = agent.cli(&["status"]).await;
    assert!(
        status.contains("machine: ts-join.example.test in farm farm-j")
            && status.contains(&format!("broker: connected (machine id {})", joined.id)),
        "{status}"
    );
    // An operator's `tsagent --config FILE status` (or with --control-socket before the
    // subcommand) finds the agent where that file (or flag) put its socket.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tsagent.toml");
    let socket = agent.control_socket.to_str().unwrap();
    std::fs::write(&config, format!("control_socket = {socket:?}\n")).unwrap();
    for before in [
        ["--config".as_ref(), config.as_os_str()],
        ["--control-socket".as_ref(), socket.as_ref()],
    ] {
        let output = tsagent_output(&[before[0], before[1], "status".as_ref()]).await;
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && said.contains("machine: ts-join.example.test"),
            "tsagent {before:?} status: {said} {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Its reader gone (`tsagent status | head -0`): no panic, the exit status still tells.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    // (spawn, not output(), which would replace the standard output with a pipe of its own)
    let output = tokio::process::Command::new(workspace_binary("tsagent"))
        .args(["status", "--control-socket", socket])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // A flag wins over the environment, before the subcommand as after it.
    for args in [
        ["--control-socket", socket, "status"],
        ["status", "--control-socket", socket],
    ] {
        let output = tokio::process::Command::new(workspace_binary("tsagent"))
            .env("TSAGENT_CONTROL_SOCKET", dir.path().join("elsewhere.sock"))
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(
            output.status.success(),
            "tsagent {args:?} with TSAGENT_CONTROL_SOCKET set: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    // Logons, as PAM reports them: one with a number of its own, one with the display number
    // and a domain.
    let said = agent.cli(&["session", "logon", "--user", "alice"]).await;
    assert!(said.contains("of alice is active"), "{said}");
    agent
        .cli(&[
            "session",
            "logon",
            "--user",
            "bob",
            "--domain",
            "CORP",
            "--session-id",
            "12",
            "--client-address",
            // As a dual-stack service may see an IPv4 client: kept as 192.0.2.7.
            "::ffff:192.0.2.7",
        ])
        .await;
    let mine = session_list(&agent).await;
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert!(mine.contains(&ListedSession::new(12, "CORP\\bob", "active")));
    assert!(mine.iter().all(|session| session.state == "active"));
    broker_converges(&mut client, &agent.machine_id(), &mine, 10).await;
    let bob = client
        .list_sessions(pb::ListSessionsRequest {
            user_name: "BOB".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(bob.len(), 1, "{bob:?}");
    assert_eq!(
        (bob[0].machine_name.as_str(), bob[0].farm.as_str()),
        ("ts-join.example.test", "farm-j")
    );
    assert_eq!(
        (bob[0].domain.as_str(), bob[0].client_address.as_str()),
        ("CORP", "192.0.2.7")
    );

    // Disconnect, reconnect, logoff.
    agent
        .cli(&["session", "disconnect", "--user", "alice"])
        .await;
    let mine = session_list(&agent).await;
    assert!(
        mine.iter()
            .any(|session| session.user == "alice" && session.state == "disconnected"),
        "{mine:?}"
    );
    broker_converges(&mut client, &agent.machine_id(), &mine, 10).await;
    let disconnected = client
        .list_sessions(pb::ListSessionsRequest {
            state: pb::SessionState::Disconnected as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert_eq!(disconnected.len(), 1);
    assert_eq!(disconnected[0].user_name, "alice");

    agent
        .cli(&["session", "reconnect", "--user", "alice"])
        .await;
    agent
        .cli(&["session", "logoff", "--user", "bob", "--session-id", "12"])
        .await;
    let mine = session_list(&agent).await;
    assert_eq!(mine.len(), 1, "{mine:?}");
    assert_eq!(
        (mine[0].user.as_str(), mine[0].state.as_str()),
        ("alice", "active")
    );
    broker_converges(&mut client, &agent.machine_id(), &mine, 10).await;

    // The CLI says what went wrong, with a failing status.
    let refused = tsagent_cli_output(
        &["session", "logoff", "--user", "nobody"],
        &agent.control_socket,
    )
    .await;
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no session"),
        "{refused:?}"
    );

    // A stop closes the stream: the machine is unreachable, not removed.
    agent.stop().await;
    eventually(10, || {
        let mut client = client.clone();
        async move {
            machine(&mut client, "farm-j", "ts-join.example.test")
                .await
                .state
                == pb::MachineState::Unreachable as i32
        }
    })
    .await;
    broker.stop().await;
}

async fn a_broker_restart_ends_with_the_agents_sessions_including_changes_made_while_it_was_down(
    database: &TestDatabase,
) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let address = broker.address;
    let agent = TestAgent::start(&broker.url(), "ts-restart.example.test", |_| {}).await;
    for user in ["alice", "bob", "carol"] {
        agent.cli(&["session", "logon", "--user", user]).await;
    }
    let mut client = broker.broker_client().await;
    broker_converges(
        &mut client,
        &agent.machine_id(),
        &session_list(&agent).await,
        10,
    )
    .await;
    drop(client);

    broker.stop().await;
    eventually(10, || async { !agent.running().link_status().connected }).await;
    // While the broker is away: a logon, a disconnect, a logoff.
    agent.cli(&["session", "logon", "--user", "dave"]).await;
    agent
        .cli(&["session", "disconnect", "--user", "alice"])
        .await;
    agent.cli(&["session", "logoff", "--user", "bob"]).await;
    // `tsagent status` says so, and its exit status (3) tells a health check.
    let output = tsagent_cli_output(&["status"], &agent.control_socket).await;
    let status = String::from_utf8_lossy(&output.stdout);
    assert!(status.contains("broker: not connected"), "{status}");
    assert_eq!(output.status.code(), Some(3), "{output:?}");
    let mine = session_list(&agent).await;
    let users: Vec<(&str, &str)> = mine
        .iter()
        .map(|session| (session.user.as_str(), session.state.as_str()))
        .collect();
    assert_eq!(
        users,
        [
            ("alice", "disconnected"),
            ("carol", "active"),
            ("dave", "active")
        ]
    );

    // The same database, the same address.
    let started = tokio::time::Instant::now();
    let broker = spawn_broker_at(&database.url, address, |_| {}).await;
    let mut client = broker.broker_client().await;
    broker_converges(&mut client, &agent.machine_id(), &mine, 10).await;
    // READY follows the RESYNC; the agent counts itself connected once READY is acknowledged.
    assert!(
        agent
            .running()
            .wait_until_connected(Duration::from_secs(10))
            .await
    );
    let back = machine(&mut client, "default", "ts-restart.example.test").await;
    assert_eq!(back.state, pb::MachineState::Ready as i32);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    agent.stop().await;
    broker.stop().await;
}

async fn an_agent_restart_keeps_its_sessions_and_the_broker_ends_with_them(
    database: &TestDatabase,
) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let socket = dir.path().join("control.sock");
    let args = process_args(&broker.url(), "ts-agent-restart.example.test", &state_dir);
    let mut first = AgentProcess::spawn(&args, &socket, &dir.path().join("first.log"));
    first.wait_until_connected(Duration::from_secs(20)).await;
    let machine_id = machine(&mut client, "default", "ts-agent-restart.example.test")
        .await
        .id;
    let cli = |args: &'static [&'static str]| {
        let socket = socket.clone();
        async move { tsbroker_tests::spawn_agent::tsagent_cli(args, &socket).await }
    };
    cli(&["session", "logon", "--user", "alice", "--session-id", "10"]).await;
    cli(&["session", "logon", "--user", "bob", "--session-id", "11"]).await;
    cli(&["session", "logon", "--user", "carol"]).await;
    cli(&["session", "disconnect", "--user", "bob"]).await;
    let before = parse_session_list(&cli(&["session", "list"]).await);
    assert_eq!(before.len(), 3, "{before:?}");
    broker_converges(&mut client, &machine_id, &before, 10).await;

    // SIGTERM: a clean exit that only closes the stream. The broker keeps the sessions and,
    // while the machine was heard from within its heartbeat timeout, sends their users back
    // here: a restart does not open anyone a second session elsewhere.
    let status = first.terminate(Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "exit on SIGTERM: {status:?}\n{}",
        first.log.tail(20)
    );
    assert_eq!(
        first.log.count("broker acknowledged the machine's removal"),
        0
    );
    eventually(10, || {
        let mut client = client.clone();
        async move {
            machine(&mut client, "default", "ts-agent-restart.example.test")
                .await
                .state
                == pb::MachineState::Unreachable as i32
        }
    })
    .await;
    let stopped = machine(&mut client, "default", "ts-agent-restart.example.test").await;
    assert_eq!(stopped.session_count, 3);
    let bob = redirect(&mut client, "default", "bob").await.unwrap();
    assert_eq!(
        (bob.machine_id.as_str(), reason(&bob)),
        (machine_id.as_str(), pb::RedirectReason::ExistingSession)
    );

    // Started again on the same state directory: the sessions are back, in the agent and in
    // the broker, with their numbers.
    let mut second = AgentProcess::spawn(&args, &socket, &dir.path().join("second.log"));
    second.wait_until_connected(Duration::from_secs(20)).await;
    let after = parse_session_list(&cli(&["session", "list"]).await);
    assert_eq!(after, before);
    broker_converges(&mut client, &machine_id, &after, 10).await;
    let back = machine(&mut client, "default", "ts-agent-restart.example.test").await;
    assert_eq!(back.state, pb::MachineState::Ready as i32);
    assert_eq!(back.session_count, 3);

    // It keeps working: a logoff after the restart reaches the broker.
    cli(&["session", "logoff", "--user", "alice"]).await;
    let now = parse_session_list(&cli(&["session", "list"]).await);
    assert_eq!(now.len(), 2);
    broker_converges(&mut client, &machine_id, &now, 10).await;

    let status = second.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");
    broker.stop().await;
}

async fn a_drain_from_the_admin_api_reaches_the_agent(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut admin = broker.admin_client().await;
    let agent = TestAgent::start(&broker.url(), "ts-drain.example.test", |_| {}).await;
    let status = agent.cli(&["status"]).await;
    assert!(status.contains("not draining"), "{status}");

    let drained = admin
        .drain_machine(by_name("default", "ts-drain.example.test"))
        .await
        .unwrap()
        .into_inner();
    assert!(drained.draining);
    eventually(10, || async { agent.running().link_status().draining }).await;
    let status = agent.cli(&["status"]).await;
    assert!(
        status.contains(", draining") && !status.contains("not draining"),
        "{status}"
    );

    // Weight and limit changes arrive the same way.
    admin
        .set_machine_weight(pb::SetMachineWeightRequest {
            machine: Some(by_name("default", "ts-drain.example.test")),
            weight: 400,
        })
        .await
        .unwrap();
    eventually(10, || async { agent.running().link_status().weight == 400 }).await;
    let status = agent.cli(&["status"]).await;
    assert!(status.contains("weight 400"), "{status}");

    admin
        .undrain_machine(by_name("default", "ts-drain.example.test"))
        .await
        .unwrap();
    eventually(10, || async { !agent.running().link_status().draining }).await;
    let status = agent.cli(&["status"]).await;
    assert!(status.contains("not draining"), "{status}");

    agent.stop().await;
    broker.stop().await;
}

/// The `tsagent` binary on a state directory it cannot write, and a second agent on it: what
/// is lost at a restart is said when it happens, not found out after one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_save_its_sessions_says_so() {
    let database = TestDatabase::sqlite();
    let broker = spawn_broker(&database.url, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let socket = dir.path().join("control.sock");
    let args = process_args(&broker.url(), "ts-unsaved.example.test", &state_dir);
    let mut agent = AgentProcess::spawn(&args, &socket, &dir.path().join("agent.log"));
    agent.wait_until_connected(Duration::from_secs(20)).await;

    // Another agent (its own name and socket) on the same state directory is refused.
    let second_socket = dir.path().join("second.sock");
    let mut second: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    second[3] = std::ffi::OsStr::new("ts-second.example.test");
    second.extend([
        std::ffi::OsStr::new("--control-socket"),
        second_socket.as_os_str(),
    ]);
    let refused = tsagent_output(&second).await;
    let said = String::from_utf8_lossy(&refused.stdout).to_string()
        + &String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(said.contains("in use by another tsagent"), "{said}");

    // No table can be written any more (a directory where the temporary file goes).
    std::fs::create_dir(state_dir.join("sessions.json.tmp")).unwrap();
    let logon = tsagent_cli_output(&["session", "logon", "--user", "zed"], &socket).await;
    let said = String::from_utf8_lossy(&logon.stderr);
    assert_eq!(logon.status.code(), Some(1), "{said}");
    assert!(said.contains("cannot save its session table"), "{said}");
    let status = tsagent_cli_output(&["status"], &socket).await;
    let said = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(4), "{said}");
    assert!(said.contains("session table: NOT SAVED"), "{said}");

    // A stop that could not save the table is a failed stop.
    let stopped = agent.terminate(Duration::from_secs(15)).await;
    assert_eq!(stopped.code(), Some(1), "{}", agent.log.tail(10));
    assert_eq!(
        agent.log.count("could not be saved before stopping"),
        1,
        "{}",
        agent.log.tail(10)
    );
    broker.stop().await;
}

/// What the front door says of a flood: connections that are not RDP (a scanner, a health
/// check), and clients held back at --max-connections, are said at most once a minute each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_door_flood_is_said_once_not_line_by_line() {
    let database = TestDatabase::sqlite();
    let broker = spawn_broker(&database.url, |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let port = tsbroker_tests::process::free_port();
    let mut args = process_args(
        &broker.url(),
        "ts-flood.example.test",
        &dir.path().join("s"),
    );
    args.extend(
        [
            "--front-door",
            &format!("127.0.0.1:{port}"),
            "--max-connections",
            "2",
            "--client-timeout",
            "30s",
        ]
        .map(str::to_owned),
    );
    let socket = dir.path().join("control.sock");
    let mut agent = AgentProcess::spawn(&args, &socket, &dir.path().join("agent.log"));
    agent.wait_until_connected(Duration::from_secs(20)).await;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for _ in 0..5 {
        let mut http = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = http.read_to_end(&mut rest).await;
    }
    // Two silent clients hold both connections; more wait.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    eventually(10, || {
        let found = agent.log.count("the front door holds max_connections");
        async move { found == 1 }
    })
    .await;
    assert_eq!(
        agent.log.count("not an RDP connection request"),
        1,
        "{}",
        agent.log.tail(20)
    );
    drop(held);
    let stopped = agent.terminate(Duration::from_secs(15)).await;
    assert!(stopped.success(), "{stopped:?}");
    broker.stop().await;
}

/// The store lost (the broker started again on a new, empty database, at the same address):
/// the agents come back with their sessions, and a user who asks the moment the broker is up
/// is sent back to their session, not placed as a new user (a second session elsewhere).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_the_store_is_lost_a_returning_user_is_not_taken_for_a_new_one() {
    let lost = TestDatabase::sqlite();
    let broker = spawn_broker(&lost.url, |_| {}).await;
    let address = broker.address;
    let a = TestAgent::start(&broker.url(), "ts-a.example.test", |_| {}).await;
    let b = TestAgent::start(&broker.url(), "ts-b.example.test", |_| {}).await;
    a.cli(&["session", "logon", "--user", "alice"]).await;
    a.cli(&["session", "disconnect", "--user", "alice"]).await;
    let client = broker.broker_client().await;
    eventually(10, || {
        let mut client = client.clone();
        async move {
            redirect(&mut client, "default", "alice")
                .await
                .is_ok_and(|answer| reason(&answer) == pb::RedirectReason::ExistingSession)
        }
    })
    .await;
    drop(client);
    broker.stop().await;
    eventually(10, || async {
        !a.running().link_status().connected && !b.running().link_status().connected
    })
    .await;

    let empty = TestDatabase::sqlite();
    let broker = spawn_broker_at(&empty.url, address, |_| {}).await;
    let mut client = broker.broker_client().await;
    let answer = redirect(&mut client, "default", "alice")
        .await
        .expect("an answer once the agents are back");
    assert_eq!(
        (reason(&answer), answer.machine_name.as_str()),
        (pb::RedirectReason::ExistingSession, "ts-a.example.test")
    );
    a.stop().await;
    b.stop().await;
    broker.stop().await;
}

/// A broker that stops (a restart, a rolling upgrade of replicas) is said by its agents each
/// time, not only the first: the warning said once is for one refusal that lasts, and a
/// connection in between makes the next one news.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stop_of_the_broker_is_said_by_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let port = tsbroker_tests::process::free_port();
    let (mut broker, _) = tsbroker_tests::process::plain_broker_process(dir.path(), port).await;
    let socket = dir.path().join("control.sock");
    let args = process_args(
        &format!("http://127.0.0.1:{port}"),
        "ts-stops.example.test",
        &dir.path().join("state"),
    );
    let mut agent = AgentProcess::spawn(&args, &socket, &dir.path().join("agent.log"));
    agent.wait_until_connected(Duration::from_secs(20)).await;
    for stop in 1..=2 {
        broker.terminate(Duration::from_secs(15)).await;
        assert!(
            agent
                .log
                .wait_for(
                    "broker asked the agent to go",
                    stop,
                    Duration::from_secs(10),
                    None
                )
                .await,
            "stop {stop}: {}",
            agent.log.tail(20)
        );
        (broker, _) = tsbroker_tests::process::plain_broker_process(dir.path(), port).await;
        assert!(
            agent
                .log
                .wait_for(
                    "the broker has this machine ready",
                    stop + 1,
                    Duration::from_secs(20),
                    None
                )
                .await,
            "{}",
            agent.log.tail(20)
        );
    }
    let said: Vec<String> = agent.log.lines_with("broker asked the agent to go");
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(said.iter().all(|line| line.contains("WARN")), "{said:?}");
    agent.terminate(Duration::from_secs(15)).await;
    broker.terminate(Duration::from_secs(15)).await;
}

/// Brokers that stay down (both replicas given): the agent tries them every few seconds and
/// says so once (again a minute later while it lasts), not at every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_that_stay_down_are_said_once_not_at_every_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let closed = || format!("http://127.0.0.1:{}", tsbroker_tests::process::free_port());
    let urls = format!("{},{}", closed(), closed());
    let socket = dir.path().join("control.sock");
    let args = process_args(&urls, "ts-alone.example.test", &dir.path().join("state"));
    let mut agent = AgentProcess::spawn(&args, &socket, &dir.path().join("agent.log"));
    // Backoff from 0.5 s to 5 s: five attempts or more in 8 s.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(agent.is_running(), "{}", agent.log.tail(20));
    let status = tsbroker_tests::spawn_agent::tsagent_cli_output(&["status"], &socket).await;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("Connection refused"),
        "the status names the failure: {status:?}"
    );
    assert_eq!(
        agent.log.count("broker stream down"),
        1,
        "{}",
        agent.log.tail(20)
    );
    assert!(
        agent.log.count("trying the next broker replica") <= 1,
        "{}",
        agent.log.tail(20)
    );
    let stopped = agent.terminate(Duration::from_secs(15)).await;
    assert!(stopped.success(), "{stopped:?}");
}
