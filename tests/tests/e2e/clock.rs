//! Replicas whose clocks disagree, on one PostgreSQL database: a real `tsbroker` run with
//! libfaketime (Debian's `faketime`) preloaded, its clock 40 s ahead, keeps the farm's times by the database server's clock,
//! so the machines the other replica serves are alive to it (a returning user goes back to her
//! session, not to a second one on a machine of its own), its own machines are alive to the
//! other replica, and it says how far off its clock is, in its log and its metrics. An agent
//! whose clock is off has its sessions' logon times corrected by the broker, which measures
//! its clock with the times its messages say they were sent.

use std::process::Command;
use std::time::Duration;

use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::broker_client::BrokerClient;
use tsbroker_tests::binaries::workspace_binary;
use tsbroker_tests::process::{
    ChildGuard, LogFile, broker_process, free_port, plain_broker_process,
};
use tsbroker_tests::spawn_agent::{AgentProcess, tsagent_cli};
use tsbroker_tests::{TestAgent, TestDatabase, spawn_broker};

use crate::support::{eventually, listed_sessions, reason, redirect, scrape};

const FARM: &str = "default";

/// Debian's libfaketime, preloaded into the broker itself (not through the `faketime`
/// command, which would stand between the test's guard and the broker and leave the broker
/// running when the guard stops it). The test fails, naming the package, when it is missing.
fn libfaketime() -> std::path::PathBuf {
    let mut candidates = vec![std::path::PathBuf::from("/usr/lib/faketime")];
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        candidates.extend(entries.flatten().map(|entry| entry.path().join("faketime")));
    }
    candidates
        .into_iter()
        .map(|dir| dir.join("libfaketime.so.1"))
        .find(|library| library.is_file())
        .expect(
            "libfaketime.so.1 not found: apt-get install faketime (scripts/test.sh installs it)",
        )
}

/// The machine a `Redirect` sent the user to, and why.
async fn placed(
    client: &mut BrokerClient<tonic::transport::Channel>,
    user: &str,
) -> (String, pb::RedirectReason) {
    let response = redirect(client, FARM, user)
        .await
        .unwrap_or_else(|status| panic!("redirect {user}: {status:?}"));
    let why = reason(&response);
    (response.machine_name, why)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_is_off_keeps_the_farms_time() {
    let database = TestDatabase::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let heartbeat_timeout = Duration::from_secs(15);
    let steady = spawn_broker(&database.url, |config| {
        config.heartbeat_timeout = heartbeat_timeout;
    })
    .await;

    // The other replica: the real binary, its clock (not its timers) 40 s ahead.
    let (port, metrics_port) = (free_port(), free_port());
    let log = LogFile::create(&dir.path().join("ahead.log"));
    let (stdout, stderr) = log.stdio();
    let mut command = Command::new(workspace_binary("tsbroker"));
    command
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME", "+40s")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .env_remove("TSBROKER_DATABASE_URL")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--database-url", &database.url])
        .args(["--heartbeat-timeout", "15s"])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .stdout(stdout)
        .stderr(stderr);
    let mut ahead = ChildGuard::spawn("tsbroker, clock 40 s ahead", command);
    assert!(
        log.wait_for(
            "store ready; serving",
            1,
            Duration::from_secs(30),
            Some(&mut ahead)
        )
        .await,
        "{}",
        log.tail(20)
    );
    let ahead_url = format!("http://127.0.0.1:{port}");

    // One machine reports to each replica; alice has a session on the steady one's.
    let ts1 = TestAgent::start(&steady.url(), "ts1", |_| {}).await;
    let ts2 = TestAgent::start(&ahead_url, "ts2", |_| {}).await;
    ts1.cli(&["session", "logon", "--user", "alice", "--session-id", "3"])
        .await;
    let mut steady_client = steady.broker_client().await;
    let channel = tonic::transport::Endpoint::from_shared(ahead_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut ahead_client = BrokerClient::new(channel);
    // Past a whole heartbeat timeout, so that a lease read by the wrong clock would be stale.
    tokio::time::sleep(heartbeat_timeout + Duration::from_secs(2)).await;

    // The replica ahead sends alice back to her session: ts1 is alive to it.
    assert_eq!(
        placed(&mut ahead_client, "alice").await,
        ("ts1".to_owned(), pb::RedirectReason::ExistingSession)
    );
    // New users: both machines are candidates to the replica ahead (ts2, with no session yet,
    // takes the first; then the two share), and to the steady one.
    let mut machines = Vec::new();
    for user in ["bob", "carol", "dave", "erin"] {
        let (machine, why) = placed(&mut ahead_client, user).await;
        assert_eq!(why, pb::RedirectReason::LoadBalanced, "{user}");
        machines.push(machine);
    }
    machines.sort();
    machines.dedup();
    assert_eq!(
        machines,
        ["ts1", "ts2"],
        "machines the replica ahead placed on"
    );
    assert_eq!(
        placed(&mut steady_client, "frank").await.1,
        pb::RedirectReason::LoadBalanced
    );

    // It says so, in its log and in its metrics.
    assert_eq!(
        log.count("this machine's clock is 40.0 s ahead of the database server's"),
        1,
        "{}",
        log.tail(20)
    );
    eventually(5, || async {
        let text = scrape(metrics_port).await;
        let offset = text
            .lines()
            .find_map(|line| line.strip_prefix("tsbroker_clock_offset_seconds "))
            .and_then(|value| value.trim().parse::<f64>().ok());
        matches!(offset, Some(offset) if (-41.0..=-39.0).contains(&offset))
    })
    .await;

    ts1.stop().await;
    ts2.stop().await;
    ahead.terminate(Duration::from_secs(10)).await;
    steady.stop().await;
    database.drop_database().await;
}

/// A real `tsagent` named `name` reporting to `url`, its clock (not its timers) moved by
/// `offset` (libfaketime's `+2h`, `-2h`), its state directory and control socket
/// (`NAME.sock`) in `dir`.
fn agent_with_clock(url: &str, name: &str, dir: &std::path::Path, offset: &str) -> AgentProcess {
    let state_dir = dir.join(format!("{name}-state")).display().to_string();
    let args = [
        "--broker",
        url,
        "--machine-name",
        name,
        "--advertise",
        "127.0.0.1:9",
        "--state-dir",
        &state_dir,
    ]
    .map(str::to_owned);
    let library = libfaketime();
    let env: [(&str, &std::path::Path); 3] = [
        ("LD_PRELOAD", &library),
        ("FAKETIME", offset.as_ref()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".as_ref()),
    ];
    let socket = dir.join(format!("{name}.sock"));
    let log = dir.join(format!("{name}.log"));
    AgentProcess::spawn_with_env(&args, &socket, &log, &env)
}

/// `tsagent session VERB --user USER --session-id ID` against the agent at `socket`.
async fn session_cli(socket: &std::path::Path, verb: &str, user: &str, id: &str) -> String {
    let args = ["session", verb, "--user", user, "--session-id", id];
    tsagent_cli(&args, socket).await
}

/// A real `tsagent` whose clock (not its timers) is 2 h ahead: the broker says so and corrects
/// its sessions' logon times, so a returning user with two disconnected sessions goes back to
/// the one she really opened last, not to the one the fast clock dates later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_clock_is_off_has_its_logon_times_corrected() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut broker, broker_log) = plain_broker_process(dir.path(), port).await;
    let url = format!("http://127.0.0.1:{port}");
    let socket = dir.path().join("ahead.sock");
    let mut ahead = agent_with_clock(&url, "ahead", dir.path(), "+2h");
    ahead.wait_until_connected(Duration::from_secs(30)).await;
    let steady = TestAgent::start(&url, "steady", |_| {}).await;

    // carol logs on at the machine ahead, then (later) at the steady one; both disconnect.
    let at_ahead = |verb| session_cli(&socket, verb, "carol", "5");
    at_ahead("logon").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    steady
        .cli(&["session", "logon", "--user", "carol", "--session-id", "6"])
        .await;
    at_ahead("disconnect").await;
    steady
        .cli(&[
            "session",
            "disconnect",
            "--user",
            "carol",
            "--session-id",
            "6",
        ])
        .await;
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = BrokerClient::new(channel);
    let carols = |client: BrokerClient<tonic::transport::Channel>| {
        let request = pb::ListSessionsRequest {
            user_name: "carol".to_owned(),
            ..Default::default()
        };
        listed_sessions(client, request)
    };
    eventually(10, || async {
        let sessions = carols(client.clone()).await;
        sessions.len() == 2
            && sessions
                .iter()
                .all(|session| session.state == pb::SessionState::Disconnected as i32)
    })
    .await;

    assert_eq!(
        placed(&mut client, "carol").await,
        ("steady".to_owned(), pb::RedirectReason::ExistingSession)
    );
    // Dated by the broker's clock: the machine ahead's logon is not in the future, and came
    // first.
    let logon = |session: &pb::Session| session.logon_time.as_ref().unwrap().seconds;
    let sessions = carols(client.clone()).await;
    let on = |name: &str| {
        sessions
            .iter()
            .find(|session| session.machine_name == name)
            .map(logon)
            .unwrap()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(on("ahead") <= now + 1, "{sessions:?}");
    assert!(on("ahead") <= on("steady"), "{sessions:?}");
    // Said once: 2 h, less the first message's time in transit.
    let said = ["clock is 7200.0 s ahead", "clock is 7199.9 s ahead"]
        .map(|line| broker_log.count(line))
        .iter()
        .sum::<usize>();
    assert_eq!(said, 1, "{}", broker_log.tail(20));

    steady.stop().await;
    ahead.terminate(Duration::from_secs(10)).await;
    broker.terminate(Duration::from_secs(10)).await;
}

/// A real `tsagent` whose clock is 2 h behind, with a session. After a broker restart its
/// RESYNC comes before the new broker can tell it is behind (that takes a full window of its
/// messages, since time in transit looks the same), so once it can, it asks for the sessions
/// again and dates them right: the user is sent to her newer session, the one on that
/// machine. After the agent's own restart the broker still has its last measures, and the
/// RESYNC is dated right at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_clock_is_behind_has_its_resynced_sessions_dated_right() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Load reports every half second: the window of eight fills within seconds.
    let start_broker = || {
        broker_process(dir.path(), port, |binary, args| {
            let mut command = Command::new(binary);
            command.args(args).args(["--heartbeat-timeout", "1500ms"]);
            command
        })
    };
    let (mut broker, _) = start_broker().await;
    let url = format!("http://127.0.0.1:{port}");
    let steady = TestAgent::start(&url, "steady", |_| {}).await;
    let mut behind = agent_with_clock(&url, "behind", dir.path(), "-2h");
    behind.wait_until_connected(Duration::from_secs(30)).await;
    let socket = dir.path().join("behind.sock");

    // dave logs on at the steady machine, then (later) at the one behind; both disconnect.
    steady
        .cli(&["session", "logon", "--user", "dave", "--session-id", "3"])
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dave = |verb| session_cli(&socket, verb, "dave", "8");
    dave("logon").await;
    dave("disconnect").await;
    steady
        .cli(&[
            "session",
            "disconnect",
            "--user",
            "dave",
            "--session-id",
            "3",
        ])
        .await;
    let to_dave = || async {
        let channel = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        placed(&mut BrokerClient::new(channel), "dave").await
    };
    let dave_back = ("behind".to_owned(), pb::RedirectReason::ExistingSession);

    // A new broker: the agents' RESYNCs reach it before it knows the clock.
    broker.terminate(Duration::from_secs(10)).await;
    let (mut broker, broker_log) = start_broker().await;
    let wait = Duration::from_secs(20);
    let told = broker_log.wait_for("s behind the broker's", 1, wait, Some(&mut broker));
    assert!(told.await, "{}", broker_log.tail(20));
    eventually(10, || async { to_dave().await == dave_back }).await;
    assert!(
        behind
            .log
            .count("the broker asks for this machine's sessions again")
            >= 1,
        "{}",
        behind.log.tail(20)
    );

    // The agent restarts: its RESYNC is dated right as it comes.
    behind.terminate(Duration::from_secs(10)).await;
    let mut behind = agent_with_clock(&url, "behind", dir.path(), "-2h");
    behind.wait_until_connected(Duration::from_secs(30)).await;
    assert_eq!(to_dave().await, dave_back);

    steady.stop().await;
    behind.terminate(Duration::from_secs(10)).await;
    broker.terminate(Duration::from_secs(10)).await;
}
