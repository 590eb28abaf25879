//! The stream against a fake gateway: the opening order, resync after a reconnect, load
//! reports, commands, and REMOVED on shutdown.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tsbroker_common::model::SessionEventKind;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::agent_message::Body;
use tsbroker_common::proto::v1::broker_message::Body as Command;

use crate::config::{AgentConfig, BackoffSettings};
use crate::directory::SessionRequest;
use crate::test_support::{FakeBroker, kinds};

fn config(url: &str, dir: &std::path::Path) -> AgentConfig {
    let mut config = AgentConfig::new("ts1.example", dir);
    config.broker_url = url.to_owned();
    config.agent_token = Some("t0ken".into());
    config.backoff = BackoffSettings {
        base: Duration::from_millis(50),
        cap: Duration::from_millis(200),
        healthy_after: Duration::from_secs(30),
    };
    config
}

/// An agent started on `config`, with the token that stops it.
async fn started(config: AgentConfig) -> (crate::RunningAgent, CancellationToken) {
    let shutdown = CancellationToken::new();
    let agent = crate::start(config, shutdown.clone()).await.unwrap();
    (agent, shutdown)
}

/// Stops the agent and waits (5 s at most) for it to end without error.
async fn stopped(agent: crate::RunningAgent, shutdown: CancellationToken) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), agent.wait())
        .await
        .unwrap()
        .unwrap();
}

fn logon(user: &str, session_id: u32) -> SessionRequest {
    SessionRequest {
        user_name: user.into(),
        session_id: Some(session_id),
        ..Default::default()
    }
}

/// How many messages of `kind` the agent sent on its first stream.
fn sent(state: &crate::test_support::FakeState, kind: &str) -> usize {
    kinds(state, 1).iter().filter(|sent| **sent == kind).count()
}

fn resync_users(message: &pb::AgentMessage) -> Option<Vec<String>> {
    match &message.body {
        Some(Body::Resync(resync)) => {
            let mut users: Vec<String> = resync
                .sessions
                .iter()
                .map(|s| s.user_name.clone())
                .collect();
            users.sort();
            Some(users)
        }
        _ => None,
    }
}

#[tokio::test]
async fn opening_order_events_and_load_reports() {
    let fake = FakeBroker::default();
    fake.with(|state| state.heartbeat_interval_ms = 100);
    let stop = CancellationToken::new();
    let url = fake.serve(stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    // A session from before the agent started is in the first RESYNC.
    {
        let (directory, _events) = crate::directory::Directory::open(dir.path()).unwrap();
        directory
            .apply(SessionEventKind::Logon, logon("alice", 10))
            .unwrap();
    }
    let (agent, shutdown) = started(config(&url, dir.path())).await;
    fake.wait_for("ready and two load reports", |state| {
        kinds(state, 1)
            .iter()
            .filter(|kind| **kind == "load")
            .count()
            >= 2
    })
    .await;
    agent
        .directory()
        .apply(SessionEventKind::Logon, logon("bob", 11))
        .unwrap();
    fake.wait_for("bob's logon", |state| kinds(state, 1).contains(&"event"))
        .await;
    fake.with(|state| {
        let stream = kinds(state, 1);
        assert_eq!(&stream[..3], &["added", "resync", "ready"]);
        let seqs: Vec<u64> = state.received.iter().map(|(_, m)| m.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        assert_eq!(
            resync_users(&state.received[1].1),
            Some(vec!["alice".to_owned()])
        );
        let Some(Body::Added(added)) = &state.received[0].1.body else {
            panic!()
        };
        assert_eq!(
            (added.name.as_str(), added.address.as_str()),
            ("ts1.example", "ts1.example:3389")
        );
        assert_eq!(state.authorization, vec!["Bearer t0ken".to_owned()]);
        let load = state.received.iter().find_map(|(_, m)| match &m.body {
            Some(Body::Load(load)) => Some(*load),
            _ => None,
        });
        assert!(load.unwrap().session_count >= 1);
    });
    assert!(agent.link_status().connected);
    assert_eq!(agent.link_status().heartbeat_interval_ms, 100);

    // Settings from the broker are applied.
    let settings = pb::MachineSettings {
        draining: true,
        weight: 50,
        session_limit: 7,
    };
    fake.command(Command::Settings(settings)).await;
    for _ in 0..100 {
        if agent.link_status().draining {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        (
            agent.link_status().weight,
            agent.link_status().session_limit
        ),
        (50, 7)
    );

    // Shutdown closes the stream without REMOVED: the machine's sessions stay at the broker.
    stopped(agent, shutdown).await;
    fake.with(|state| assert!(!kinds(state, 1).contains(&"removed")));
    stop.cancel();
}

#[tokio::test]
async fn a_broker_going_away_is_rejoined_within_a_second_whatever_the_backoff() {
    let fake = FakeBroker::default();
    let stop = CancellationToken::new();
    let url = fake.serve(stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&url, dir.path());
    // A backoff that would keep the agent away for up to a minute.
    config.backoff = BackoffSettings {
        base: Duration::from_secs(60),
        cap: Duration::from_secs(60),
        healthy_after: Duration::from_secs(3600),
    };
    let (agent, shutdown) = started(config).await;
    fake.wait_for("ready", |state| kinds(state, 1).contains(&"ready"))
        .await;
    let started = tokio::time::Instant::now();
    fake.command(Command::Shutdown(pb::Shutdown {
        reason: "broker shutting down".into(),
        removed: false,
    }))
    .await;
    fake.wait_for("a second stream, ready", |state| {
        kinds(state, 2).contains(&"ready")
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    stopped(agent, shutdown).await;
    stop.cancel();
}

#[tokio::test]
async fn with_several_broker_urls_a_broken_stream_moves_to_the_next_replica() {
    let (first, second) = (FakeBroker::default(), FakeBroker::default());
    let stop = CancellationToken::new();
    let first_url = first.serve(stop.clone()).await;
    let second_url = second.serve(stop.clone()).await;
    // The first replica is down (refuses streams): the agent ends up on the second, whichever
    // it started with.
    first.with(|state| state.refuse_streams = true);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&format!("{first_url}, {second_url}"), dir.path());
    let (agent, shutdown) = started(config).await;
    second
        .wait_for("ready on the second", |state| {
            kinds(state, 1).contains(&"ready")
        })
        .await;
    // The second goes away, the first is back: the agent moves there.
    first.with(|state| state.refuse_streams = false);
    second.with(|state| state.refuse_streams = true);
    second.break_stream().await;
    first
        .wait_for("ready on the first", |state| {
            kinds(state, 1).contains(&"ready")
        })
        .await;
    stopped(agent, shutdown).await;
    stop.cancel();
}

/// A replica that keeps the stream but acknowledges nothing (its database cut off): the agent
/// moves to the next one before the machine's lease runs out. With no other replica, it stays.
#[tokio::test]
async fn a_replica_that_acknowledges_nothing_is_left_for_the_next_one() {
    let (first, second) = (FakeBroker::default(), FakeBroker::default());
    for fake in [&first, &second] {
        fake.with(|state| state.heartbeat_interval_ms = 100);
    }
    let stop = CancellationToken::new();
    let first_url = first.serve(stop.clone()).await;
    let second_url = second.serve(stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, shutdown) =
        started(config(&format!("{first_url}, {second_url}"), dir.path())).await;
    assert!(agent.wait_until_connected(Duration::from_secs(10)).await);
    let (stuck, other) = match first.with(|state| state.streams) {
        0 => (&second, &first),
        _ => (&first, &second),
    };
    stuck.with(|state| state.answer_nothing = true);
    other
        .wait_for("ready on the other replica", |state| {
            state.streams > 0 && kinds(state, state.streams).contains(&"ready")
        })
        .await;
    stopped(agent, shutdown).await;

    // One replica only: nowhere to go, so the stream stays (load reports go on).
    let lone = FakeBroker::default();
    lone.with(|state| state.heartbeat_interval_ms = 100);
    let url = lone.serve(stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, shutdown) = started(config(&url, dir.path())).await;
    assert!(agent.wait_until_connected(Duration::from_secs(10)).await);
    lone.with(|state| state.answer_nothing = true);
    let loads = |state: &crate::test_support::FakeState| {
        kinds(state, 1)
            .iter()
            .filter(|kind| **kind == "load")
            .count()
    };
    let before = lone.with(|state| loads(state));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(lone.with(|state| state.streams), 1);
    assert!(lone.with(|state| loads(state)) >= before + 10);
    stopped(agent, shutdown).await;
    stop.cancel();
}

#[test]
fn the_stall_limit_leaves_time_to_move_before_the_lease_runs_out() {
    use super::link::stall_limit;
    let seconds = Duration::from_secs;
    // The defaults: a 15 s timeout, a report every 5 s.
    assert_eq!(stall_limit(seconds(5), seconds(15)), seconds(7));
    // Never shorter than a heartbeat interval.
    assert_eq!(stall_limit(seconds(2), seconds(6)), seconds(2));
    assert_eq!(
        stall_limit(Duration::from_millis(100), Duration::from_millis(300)),
        Duration::from_millis(100)
    );
}

/// An agent moved off its own replica (it refused streams) goes back once that one serves
/// again, so that a farm's agents spread over the replicas again.
#[tokio::test]
async fn an_agent_goes_back_to_its_own_replica_once_it_serves_again() {
    let (first, second) = (FakeBroker::default(), FakeBroker::default());
    let stop = CancellationToken::new();
    let first_url = first.serve(stop.clone()).await;
    let second_url = second.serve(stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&format!("{first_url}, {second_url}"), dir.path());
    config.home_check = Duration::from_millis(200);
    let (agent, shutdown) = started(config).await;
    assert!(agent.wait_until_connected(Duration::from_secs(10)).await);
    // Whichever the agent started with is its own.
    let (home, other) = match first.with(|state| state.streams) {
        0 => (&second, &first),
        _ => (&first, &second),
    };
    home.with(|state| state.refuse_streams = true);
    home.break_stream().await;
    other
        .wait_for("ready on the other replica", |state| {
            state.streams > 0 && kinds(state, state.streams).contains(&"ready")
        })
        .await;
    home.with(|state| state.refuse_streams = false);
    home.wait_for("back on its own replica", |state| {
        state.streams > 1 && kinds(state, state.streams).contains(&"ready")
    })
    .await;
    stopped(agent, shutdown).await;
    stop.cancel();
}

#[tokio::test]
async fn with_two_replicas_of_three_down_the_third_is_found() {
    let brokers = [
        FakeBroker::default(),
        FakeBroker::default(),
        FakeBroker::default(),
    ];
    let stop = CancellationToken::new();
    let mut urls = Vec::new();
    for broker in &brokers {
        urls.push(broker.serve(stop.clone()).await);
    }
    // Whichever the agent starts with, only one of the three takes streams.
    for up in 0..3 {
        for (index, broker) in brokers.iter().enumerate() {
            broker.with(|state| state.refuse_streams = index != up);
        }
        let dir = tempfile::tempdir().unwrap();
        let (agent, shutdown) = started(config(&urls.join(","), dir.path())).await;
        brokers[up]
            .wait_for("ready on the one replica up", |state| {
                state.streams > 0 && kinds(state, state.streams).contains(&"ready")
            })
            .await;
        stopped(agent, shutdown).await;
    }
    stop.cancel();
}

/// A broker that refuses the agent's token: retried (the broker's side may be what gets
/// fixed), with what to fix in `tsagent status`, and connected once it takes the token.
#[tokio::test]
async fn a_refused_token_says_what_to_fix_and_is_retried() {
    let fake = FakeBroker::default();
    fake.with(|state| state.refuse_credentials = true);
    let stop = CancellationToken::new();
    let url = fake.serve(stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, shutdown) = started(config(&url, dir.path())).await;
    fake.wait_for("a refusal", |state| state.refusals >= 1)
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while agent.link_status().last_error.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = agent.link_status();
    assert!(!status.connected);
    assert!(
        status.last_error.contains("bearer token") && status.last_error.contains("--agent-token"),
        "{}",
        status.last_error
    );
    fake.with(|state| state.refuse_credentials = false);
    fake.wait_for("ready", |state| kinds(state, 1).contains(&"ready"))
        .await;
    stopped(agent, shutdown).await;
    stop.cancel();
}

#[tokio::test]
async fn leaving_on_stop_sends_removed() {
    let fake = FakeBroker::default();
    let stop = CancellationToken::new();
    let url = fake.serve(stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&url, dir.path());
    config.leave_on_stop = true;
    let (agent, shutdown) = started(config).await;
    fake.wait_for("ready", |state| kinds(state, 1).contains(&"ready"))
        .await;
    stopped(agent, shutdown).await;
    fake.with(|state| assert_eq!(kinds(state, 1).last(), Some(&"removed")));
    stop.cancel();
}

#[tokio::test]
async fn reconnect_resyncs_what_happened_while_apart() {
    let fake = FakeBroker::default();
    fake.with(|state| state.heartbeat_interval_ms = 1000);
    let stop = CancellationToken::new();
    let url = fake.serve(stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, shutdown) = started(config(&url, dir.path())).await;
    fake.wait_for("first ready", |state| kinds(state, 1).contains(&"ready"))
        .await;
    assert!(agent.wait_until_connected(Duration::from_secs(5)).await);
    agent
        .directory()
        .apply(SessionEventKind::Logon, logon("alice", 10))
        .unwrap();
    fake.wait_for("alice's logon", |state| kinds(state, 1).contains(&"event"))
        .await;

    // The broker goes away: events go on in the table.
    fake.with(|state| state.refuse_streams = true);
    fake.break_stream().await;
    for _ in 0..100 {
        if !agent.link_status().connected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!agent.link_status().connected);
    agent
        .directory()
        .apply(SessionEventKind::Logon, logon("bob", 11))
        .unwrap();
    agent
        .directory()
        .apply(SessionEventKind::Logoff, logon("alice", 10))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    fake.with(|state| state.refuse_streams = false);
    fake.wait_for("second ready", |state| kinds(state, 2).contains(&"ready"))
        .await;
    fake.with(|state| {
        assert_eq!(&kinds(state, 2)[..3], &["added", "resync", "ready"]);
        let resync = state
            .received
            .iter()
            .filter(|(n, _)| *n == 2)
            .nth(1)
            .unwrap();
        assert_eq!(resync_users(&resync.1), Some(vec!["bob".to_owned()]));
        // Nothing from while apart is sent twice after the RESYNC.
        assert!(!kinds(state, 2).contains(&"event"));
        assert_eq!(resync.1.seq, 2);
    });
    shutdown.cancel();
    agent.wait().await.unwrap();
    stop.cancel();
}

#[tokio::test]
async fn removal_by_the_broker_stops_the_agent() {
    let fake = FakeBroker::default();
    let stop = CancellationToken::new();
    let url = fake.serve(stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = crate::start(config(&url, dir.path()), CancellationToken::new())
        .await
        .unwrap();
    fake.wait_for("ready", |state| kinds(state, 1).contains(&"ready"))
        .await;
    let shutdown = pb::Shutdown {
        reason: "removed by admin".into(),
        removed: true,
    };
    fake.command(Command::Shutdown(shutdown)).await;
    tokio::time::timeout(Duration::from_secs(5), agent.wait())
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.with(|state| assert_eq!(state.streams, 1));
    stop.cancel();
}

#[tokio::test]
async fn a_refused_resync_ends_the_stream_and_the_agent_tries_again() {
    let fake = FakeBroker::default();
    fake.with(|state| state.reject_resyncs = 1);
    let stop = CancellationToken::new();
    let url = fake.serve(stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, shutdown) = started(config(&url, dir.path())).await;
    // The first stream's RESYNC is refused: rather than stay JOINING on it, the agent opens
    // another, whose RESYNC and READY are taken.
    fake.wait_for("a second stream, ready", |state| {
        state.streams == 2 && kinds(state, 2).contains(&"ready")
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !agent.link_status().connected {
        assert!(tokio::time::Instant::now() < deadline, "not connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stopped(agent, shutdown).await;
    stop.cancel();
}

#[tokio::test]
async fn unreachable_broker_is_retried_and_shutdown_still_works() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let (agent, shutdown) = started(config(&url, dir.path())).await;
    agent
        .directory()
        .apply(SessionEventKind::Logon, logon("carol", 3))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!agent.link_status().connected);
    assert!(!agent.link_status().last_error.is_empty());
    stopped(agent, shutdown).await;
}

#[tokio::test]
async fn a_broker_that_never_answers_the_opening_is_given_up_on() {
    // Takes connections and reads them, never writes: a stuck broker or a proxy before one.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = [0u8; 1024];
                while matches!(
                    tokio::io::AsyncReadExt::read(&mut socket, &mut sink).await,
                    Ok(1..)
                ) {}
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&url, dir.path());
    config.welcome_timeout = Duration::from_millis(300);
    let (agent, shutdown) = started(config).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let error = agent.link_status().last_error;
        if error.contains("did not answer") || error.contains("no welcome") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still waiting on the broker: {error:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stopped(agent, shutdown).await;
}

#[test]
fn the_brokers_retry_hint_is_read_from_its_unavailable_status_only() {
    use anyhow::Context;
    let with_hint = |code: tonic::Code, value: &str| {
        let mut status = tonic::Status::new(code, "the broker's database is unavailable");
        status.metadata_mut().insert(
            tsbroker_common::proto::RETRY_AFTER_MS_METADATA,
            value.parse().unwrap(),
        );
        Err::<(), _>(status).context("open stream").unwrap_err()
    };
    assert_eq!(
        super::retry_after(&with_hint(tonic::Code::Unavailable, "1000")),
        Some(Duration::from_secs(1))
    );
    assert_eq!(
        super::retry_after(&with_hint(tonic::Code::Internal, "1000")),
        None
    );
    assert_eq!(
        super::retry_after(&with_hint(tonic::Code::Unavailable, "soon")),
        None
    );
    let without = Err::<(), _>(tonic::Status::unavailable("transport error"))
        .context("broker stream")
        .unwrap_err();
    assert_eq!(super::retry_after(&without), None);
    assert_eq!(super::retry_after(&anyhow::anyhow!("no welcome")), None);
}

#[test]
fn a_connection_closed_under_the_call_is_told_apart() {
    assert!(super::connection_closed(
        "open stream: Unknown: transport error (stream closed because of a broken pipe)"
    ));
    assert!(super::connection_closed(
        "open stream: Cancelled: operation was canceled (connection closed)"
    ));
    assert!(!super::connection_closed(
        "open stream: Unavailable: tcp connect error (Connection refused (os error 111))"
    ));
}

/// Two replicas failing in turn for different reasons (one's database away, the other starting
/// or down) say each reason once, not at every other attempt; replicas failing alike say it
/// once between them; a stream that connected in between makes them news again.
#[test]
fn replicas_failing_in_turn_each_say_their_failure_once() {
    let mut said = super::SaidFailures::default();
    let away = "the broker's database is unavailable; retry shortly";
    let starting = "broker starting: its database is not ready yet";
    let news: Vec<bool> = (0..10)
        .map(|attempt| {
            let reason = if attempt % 2 == 0 { away } else { starting };
            !said.is_repeat(reason, true)
        })
        .collect();
    assert_eq!(news.iter().filter(|news| **news).count(), 2, "{news:?}");
    assert!(news[0] && news[1]);
    // A reason that does not last is said once a minute, not at every attempt.
    assert!(!said.is_repeat("tcp connect error", false));
    assert!(said.is_repeat("tcp connect error", false));
    said.clear();
    assert!(!said.is_repeat(starting, true));
}

/// The broker's database was away and may have lost what it had acknowledged: asked, the
/// agent sends its whole table again on the same stream, and the changes after it follow.
#[tokio::test]
async fn a_resync_request_sends_the_sessions_again() {
    let fake = FakeBroker::default();
    let stop = CancellationToken::new();
    let url = fake.serve(stop.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (agent, shutdown) = started(config(&url, dir.path())).await;
    fake.wait_for("ready", |state| kinds(state, 1).contains(&"ready"))
        .await;
    let directory = agent.directory();
    directory
        .apply(SessionEventKind::Logon, logon("alice", 10))
        .unwrap();
    directory
        .apply(SessionEventKind::Logon, logon("bob", 11))
        .unwrap();
    fake.wait_for("two logons", |state| sent(state, "event") == 2)
        .await;

    let request = pb::ResyncRequest {
        reason: "database back".to_owned(),
    };
    fake.command(Command::Resync(request)).await;
    fake.wait_for("a second resync", |state| sent(state, "resync") == 2)
        .await;
    directory
        .apply(SessionEventKind::Logon, logon("carol", 12))
        .unwrap();
    fake.wait_for("carol's logon", |state| sent(state, "event") == 3)
        .await;
    fake.with(|state| {
        let on_stream: Vec<_> = state
            .received
            .iter()
            .filter(|(stream, _)| *stream == 1)
            .collect();
        let resyncs: Vec<_> = on_stream
            .iter()
            .filter_map(|(_, message)| resync_users(message))
            .collect();
        assert_eq!(resyncs[1], ["alice", "bob"]);
        // One stream, its messages numbered on.
        let seqs: Vec<u64> = on_stream.iter().map(|(_, message)| message.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
        // Every message says when it was sent.
        assert!(
            on_stream
                .iter()
                .all(|(_, message)| message.sent_at.is_some())
        );
    });
    assert_eq!(fake.with(|state| state.streams), 1);
    stopped(agent, shutdown).await;
    stop.cancel();
}
