//! A database that lost commits it had acknowledged (a crash under asynchronous commit, a
//! failover to a standby that lagged): once it is back, the broker asks every agent connected
//! to it for its sessions again, so a session the database lost comes back though the agent's
//! stream never broke. Here the loss is made by hand: the session's row deleted while the
//! broker cannot reach the database.

use std::time::Duration;

use sqlx::Connection;
use tonic_health::pb::health_check_response::ServingStatus;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::TestAgent;

use crate::outage::{broker_through_a_link, health};
use crate::support::{eventually, listed_sessions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_database_lost_comes_back_when_it_does() {
    let (database, link, broker) = broker_through_a_link(|config| {
        config.heartbeat_timeout = Duration::from_secs(30);
    })
    .await;
    let client = broker.broker_client().await;
    let agent = TestAgent::start(&broker.url(), "ts-a", |_| {}).await;
    agent
        .cli(&["session", "logon", "--user", "alice", "--session-id", "4"])
        .await;
    let alice = || {
        let request = pb::ListSessionsRequest {
            user_name: "alice".to_owned(),
            ..Default::default()
        };
        listed_sessions(client.clone(), request)
    };
    eventually(10, || async { alice().await.len() == 1 }).await;

    link.cut();
    eventually(15, || async {
        health(&broker).await == ServingStatus::NotServing as i32
    })
    .await;
    let mut direct = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let lost = sqlx::query("DELETE FROM sessions WHERE user_name = 'alice'")
        .execute(&mut direct)
        .await
        .unwrap();
    assert_eq!(lost.rows_affected(), 1);
    link.restore();
    eventually(15, || async {
        health(&broker).await == ServingStatus::Serving as i32
    })
    .await;

    // Back from the agent, on the stream it kept.
    eventually(10, || async {
        alice()
            .await
            .iter()
            .any(|session| session.machine_name == "ts-a" && session.session_id == 4)
    })
    .await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_name = 'alice'")
        .fetch_one(&mut direct)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    agent.stop().await;
    broker.stop().await;
    drop(link);
    database.drop_database().await;
}
