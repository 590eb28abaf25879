//! Decisions under concurrency: many requests at once, spread over broker replicas that share
//! one PostgreSQL database, must agree and keep the farm even.

use crate::support::{on_both_stores, reason};
use futures::future::join_all;
use std::collections::HashMap;
use std::time::Duration;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::fake_agent::machine as description;
use tsbroker_tests::{FakeAgent, TestBroker, TestDatabase, spawn_broker};

on_both_stores!(
    thousand_users_spread_evenly,
    weights_split_users_in_proportion
);

async fn broker_for_storms(database_url: &str) -> TestBroker {
    spawn_broker(database_url, |config| {
        config.heartbeat_timeout = Duration::from_secs(60);
        config.max_pending_logons_per_machine = 10_000;
    })
    .await
}

/// Sends a redirect for each user, `in_flight` at a time, spread round-robin over `brokers`;
/// returns the machine name each user got.
async fn storm(
    brokers: &[&TestBroker],
    users: Vec<String>,
    in_flight: usize,
) -> Vec<(String, pb::RedirectResponse)> {
    let mut clients = Vec::new();
    for broker in brokers {
        clients.push(broker.broker_client().await);
    }
    let mut answers = Vec::new();
    for chunk in users.chunks(in_flight) {
        let calls = chunk.iter().enumerate().map(|(index, user)| {
            let mut client = clients[index % clients.len()].clone();
            let user = user.clone();
            async move {
                let request = pb::RedirectRequest {
                    user_name: user.clone(),
                    farm: "farm".into(),
                    ..Default::default()
                };
                let answer = client
                    .redirect(request)
                    .await
                    .expect("redirect")
                    .into_inner();
                (user, answer)
            }
        });
        answers.extend(join_all(calls).await);
    }
    answers
}

fn counts(answers: &[(String, pb::RedirectResponse)]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (_, answer) in answers {
        *counts.entry(answer.machine_name.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_redirects_for_one_user_over_two_brokers_agree() {
    let database = TestDatabase::postgres().await;
    let first = broker_for_storms(&database.url).await;
    let second = broker_for_storms(&database.url).await;
    let mut agents = Vec::new();
    for index in 0..10 {
        let broker = if index % 2 == 0 { &first } else { &second };
        agents.push(
            FakeAgent::join(
                &broker.url(),
                description(&format!("ts{index}"), "farm", 100),
                vec![],
            )
            .await,
        );
    }
    let users = vec!["alice".to_owned(); 200];
    let answers = storm(&[&first, &second], users, 200).await;
    let machines: std::collections::HashSet<_> = answers
        .iter()
        .map(|(_, answer)| answer.machine_id.clone())
        .collect();
    assert_eq!(
        machines.len(),
        1,
        "every answer names the same machine: {machines:?}"
    );
    let placed = answers
        .iter()
        .filter(|(_, answer)| reason(answer) == pb::RedirectReason::LoadBalanced)
        .count();
    assert_eq!(
        placed, 1,
        "one placement; every other answer is the pending logon"
    );
    let mut client = first.broker_client().await;
    let listed = client
        .list_machines(pb::ListMachinesRequest {
            farm: "farm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let pending: u32 = listed
        .machines
        .iter()
        .map(|machine| machine.pending_logons)
        .sum();
    assert_eq!(pending, 1, "one pending logon in the directory");
    drop(agents);
    first.stop().await;
    second.stop().await;
    database.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_brokers_spread_a_storm_evenly() {
    let database = TestDatabase::postgres().await;
    let first = broker_for_storms(&database.url).await;
    let second = broker_for_storms(&database.url).await;
    let mut agents = Vec::new();
    for index in 0..10 {
        agents.push(
            FakeAgent::join(
                &first.url(),
                description(&format!("ts{index}"), "farm", 100),
                vec![],
            )
            .await,
        );
    }
    let users = (0..1000).map(|user| format!("user{user}")).collect();
    let answers = storm(&[&first, &second], users, 32).await;
    let counts = counts(&answers);
    let (min, max) = (
        counts.values().min().copied(),
        counts.values().max().copied(),
    );
    assert_eq!(counts.len(), 10);
    assert!(
        max.unwrap() - min.unwrap() <= 1,
        "within one logon of even: {counts:?}"
    );
    drop(agents);
    first.stop().await;
    second.stop().await;
    database.drop_database().await;
}

async fn thousand_users_spread_evenly(database: &TestDatabase) {
    let broker = broker_for_storms(&database.url).await;
    let mut agents = Vec::new();
    for index in 0..10 {
        agents.push(
            FakeAgent::join(
                &broker.url(),
                description(&format!("ts{index}"), "farm", 100),
                vec![],
            )
            .await,
        );
    }
    let users = (0..1000).map(|user| format!("user{user}")).collect();
    let counts = counts(&storm(&[&broker], users, 16).await);
    assert_eq!(counts.len(), 10);
    let (min, max) = (
        counts.values().min().unwrap(),
        counts.values().max().unwrap(),
    );
    assert!(max - min <= 1, "within one logon of even: {counts:?}");
    drop(agents);
    broker.stop().await;
}

async fn weights_split_users_in_proportion(database: &TestDatabase) {
    let broker = broker_for_storms(&database.url).await;
    let mut agents = Vec::new();
    for (name, weight) in [("big", 200), ("medium", 100), ("small", 50)] {
        agents
            .push(FakeAgent::join(&broker.url(), description(name, "farm", weight), vec![]).await);
    }
    let users = (0..700).map(|user| format!("user{user}")).collect();
    let counts = counts(&storm(&[&broker], users, 16).await);
    for (name, expected) in [("big", 400i64), ("medium", 200), ("small", 100)] {
        let got = counts.get(name).copied().unwrap_or(0) as i64;
        assert!(
            (got - expected).abs() <= 1,
            "{name}: {got} users, expected about {expected}: {counts:?}"
        );
    }
    drop(agents);
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_admin_change_on_one_replica_reaches_the_other_at_once() {
    let database = TestDatabase::postgres().await;
    let first = broker_for_storms(&database.url).await;
    let second = broker_for_storms(&database.url).await;
    let _a = FakeAgent::join(&first.url(), description("ts-a", "farm", 100), vec![]).await;
    let mut b = FakeAgent::join(&first.url(), description("ts-b", "farm", 100), vec![]).await;
    let mut admin_on_second = second.admin_client().await;
    admin_on_second
        .drain_machine(crate::support::by_name("farm", "ts-b"))
        .await
        .unwrap();
    // The agent, connected to the first replica, is told through LISTEN/NOTIFY.
    let command = b
        .next_command(Duration::from_secs(5))
        .await
        .expect("command reaches the agent");
    assert!(
        matches!(
            command.body,
            Some(pb::broker_message::Body::Settings(pb::MachineSettings {
                draining: true,
                ..
            }))
        ),
        "{command:?}"
    );
    // And the first replica's very next decisions honour it.
    let mut client = first.broker_client().await;
    for user in 0..6 {
        let answer = crate::support::redirect(&mut client, "farm", &format!("u{user}"))
            .await
            .unwrap();
        assert_eq!(answer.machine_name, "ts-a");
    }
    first.stop().await;
    second.stop().await;
    database.drop_database().await;
}
