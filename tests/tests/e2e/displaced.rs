//! Two servers whose agents use one machine name (a cloned server that kept its name): the
//! agent that connected last holds the machine, the other one says why it stays off and does
//! not take the machine back — no flipping of the machine's sessions between the two — and
//! takes it once the other agent is gone. The broker counts the one takeover of a live stream.

use std::time::Duration;

use tsbroker_tests::spawn_agent::{ListedSession, broker_sessions};
use tsbroker_tests::{TestAgent, TestDatabase, spawn_broker};

use crate::support::{counter, eventually, scrape};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_whose_machine_name_another_took_stays_off_until_it_is_free() {
    let database = TestDatabase::sqlite();
    let metrics_port = tsbroker_tests::process::free_port();
    let broker = spawn_broker(&database.url, |config| {
        config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap());
    })
    .await;
    let mut client = broker.broker_client().await;
    let quick = |config: &mut tsagent::AgentConfig| {
        config.displaced_check = Duration::from_millis(300);
    };
    let original = TestAgent::start(&broker.url(), "ts1.example", quick).await;
    original
        .cli(&["session", "logon", "--user", "alice", "--session-id", "1"])
        .await;
    let machine_id = original.machine_id();
    let alice = vec![ListedSession::new(1, "alice", "active")];
    eventually(10, || async {
        broker_sessions(&mut client.clone(), &machine_id).await == alice
    })
    .await;

    // The copy connects under the same name and reports its own session.
    let copy = TestAgent::start(&broker.url(), "ts1.example", quick).await;
    copy.cli(&["session", "logon", "--user", "bob", "--session-id", "2"])
        .await;
    let bob = vec![ListedSession::new(2, "bob", "active")];
    eventually(10, || async {
        let status = original.running().link_status();
        !status.connected && status.last_error.contains("another agent connected")
    })
    .await;
    // For several of the original's reconnection delays, the copy keeps the machine and the
    // broker keeps its sessions: the original does not take it back.
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            copy.running().link_status().connected,
            "the copy lost the machine"
        );
        assert!(!original.running().link_status().connected);
        assert_eq!(broker_sessions(&mut client, &machine_id).await, bob);
    }
    let takeovers = counter(
        &scrape(metrics_port).await,
        &["tsbroker_live_takeovers_total"],
    );
    assert_eq!(
        takeovers, 1.0,
        "the broker counts the copy's takeover, once"
    );

    // The copy goes away (REMOVED): the original takes its machine back, with its session.
    copy.stop().await;
    eventually(10, || async { original.running().link_status().connected }).await;
    eventually(10, || async {
        broker_sessions(&mut client.clone(), &machine_id).await == alice
    })
    .await;
    original.stop().await;
    broker.stop().await;
}
