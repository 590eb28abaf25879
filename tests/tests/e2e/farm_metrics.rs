//! The broker's `/metrics` shows each farm's state as an operator's dashboard needs it:
//! machines by state (a silent machine turning UNREACHABLE), machines draining, sessions by
//! state, logons in flight, and how long Redirect takes.

use crate::support::{by_name, counter, eventually, on_both_stores, redirect, scrape};
use std::time::Duration;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::fake_agent::{machine as description, session};
use tsbroker_tests::{FakeAgent, TestDatabase, spawn_broker};

on_both_stores!(the_farms_state_is_in_the_metrics);

async fn the_farms_state_is_in_the_metrics(database: &TestDatabase) {
    let metrics_port = tsbroker_tests::process::free_port();
    let broker = spawn_broker(&database.url, |config| {
        config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap());
        config.heartbeat_timeout = Duration::from_secs(2);
    })
    .await;
    let a = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm", 100),
        vec![
            session(1, "alice", pb::SessionState::Active),
            session(2, "bob", pb::SessionState::Disconnected),
        ],
    )
    .await
    .keep_reporting();
    let b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        vec![session(1, "carol", pb::SessionState::Disconnected)],
    )
    .await
    .keep_reporting();
    let mut admin = broker.admin_client().await;
    admin.drain_machine(by_name("farm", "ts-b")).await.unwrap();
    let mut client = broker.broker_client().await;
    let dave = redirect(&mut client, "farm", "dave").await.unwrap();
    assert_eq!(dave.machine_name, "ts-a");
    // ts-c joins and then says nothing: its lease runs out after the heartbeat timeout.
    let silent = FakeAgent::join(&broker.url(), description("ts-c", "farm", 100), vec![]).await;

    let gauge = |metrics: &str, name: &str, labels: &[&str]| {
        let mut fragments = vec![name];
        fragments.extend_from_slice(labels);
        counter(metrics, &fragments)
    };
    let expected_while_ts_c_reports = |metrics: &str| {
        (
            gauge(metrics, "tsbroker_machines{", &["state=\"ready\""]),
            gauge(metrics, "tsbroker_machines{", &["state=\"unreachable\""]),
            gauge(metrics, "tsbroker_machines_draining{", &["farm=\"farm\""]),
            gauge(metrics, "tsbroker_sessions{", &["state=\"active\""]),
            gauge(metrics, "tsbroker_sessions{", &["state=\"disconnected\""]),
            gauge(metrics, "tsbroker_pending_logons{", &["farm=\"farm\""]),
        )
    };
    let metrics = scrape(metrics_port).await;
    assert_eq!(
        expected_while_ts_c_reports(&metrics),
        (3.0, 0.0, 1.0, 1.0, 2.0, 1.0),
        "{metrics}"
    );
    assert!(
        gauge(&metrics, "tsbroker_redirect_seconds_count", &[]) >= 1.0,
        "{metrics}"
    );

    // Drained back; ts-c silent past the timeout.
    admin
        .undrain_machine(by_name("farm", "ts-b"))
        .await
        .unwrap();
    eventually(10, || async {
        let metrics = scrape(metrics_port).await;
        gauge(&metrics, "tsbroker_machines{", &["state=\"unreachable\""]) == 1.0
    })
    .await;
    let metrics = scrape(metrics_port).await;
    assert_eq!(
        gauge(&metrics, "tsbroker_machines{", &["state=\"ready\""]),
        2.0,
        "{metrics}"
    );
    assert_eq!(
        gauge(&metrics, "tsbroker_machines_draining{", &[]),
        0.0,
        "{metrics}"
    );
    a.abort();
    b.abort();
    drop(silent);
    broker.stop().await;
}
