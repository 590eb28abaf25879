//! A broker that was away longer than the heartbeat timeout (crashed, its host rebooted):
//! when it starts again, its agents need a moment to reconnect through their backoff, and
//! meanwhile a user with a session on their machine is sent back to it, not to a second
//! session elsewhere; for a bounded time only.

use crate::support::{reason, redirect};
use std::process::Command;
use std::time::{Duration, Instant};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::broker_client::BrokerClient;
use tsbroker_tests::FakeAgent;
use tsbroker_tests::fake_agent::{machine as description, session};
use tsbroker_tests::process::{broker_process, connect, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_are_sent_back_to_machines_whose_agents_have_not_reconnected_yet() {
    let dir = tempfile::tempdir().unwrap();
    let start = |port| {
        broker_process(dir.path(), port, |binary, args| {
            let mut command = Command::new(binary);
            command.args(args).args(["--heartbeat-timeout", "2s"]);
            command
        })
    };
    let port = free_port();
    let (mut broker, _log) = start(port).await;
    let url = format!("http://127.0.0.1:{port}");
    let alice_on_a = FakeAgent::join(
        &url,
        description("ts-a", "default", 100),
        vec![session(1, "alice", pb::SessionState::Disconnected)],
    )
    .await;
    let b = FakeAgent::join(&url, description("ts-b", "default", 100), vec![]).await;
    // The broker crashes; it is away for longer than the heartbeat timeout.
    broker.kill();
    alice_on_a.hang_up();
    b.hang_up();
    tokio::time::sleep(Duration::from_secs(3)).await;

    let port = free_port();
    let (_broker, log) = start(port).await;
    let started = Instant::now();
    let url = format!("http://127.0.0.1:{port}");
    // ts-b's agent is back at once; ts-a's is still waiting out its backoff.
    let _b = FakeAgent::join(&url, description("ts-b", "default", 100), vec![])
        .await
        .keep_reporting();
    let channel = connect(&url).await;
    let mut client = BrokerClient::new(channel);
    let answer = redirect(&mut client, "default", "alice").await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        (reason(&answer), answer.machine_name.as_str()),
        (pb::RedirectReason::ExistingSession, "ts-a"),
        "{}",
        log.tail(10)
    );
    // Two heartbeat timeouts after the start, a machine still silent is taken for gone.
    tokio::time::sleep(Duration::from_secs(4).saturating_sub(started.elapsed())).await;
    let answer = redirect(&mut client, "default", "alice").await.unwrap();
    assert_eq!(answer.machine_name, "ts-b", "{}", log.tail(10));
}
