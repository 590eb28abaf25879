//! A replica frozen in the middle of a placement (a paused VM, a network split between it and
//! PostgreSQL) holds its farm's lock in an open transaction. The server ends that transaction
//! soon enough that the other replicas' new logons, which wait for the lock, are placed within
//! a front door's wait (3 s): otherwise every front door would decide alone meanwhile, and a
//! user connecting twice at once through two of them would get two sessions. A lock held by
//! another client, which no such timeout ends, is UNAVAILABLE within that wait, not a hang.

use crate::support::{reason, redirect};
use sqlx::Connection;
use std::time::{Duration, Instant};
use tonic::Code;
use tsbroker::store;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::fake_agent::machine as description;
use tsbroker_tests::{FakeAgent, TestDatabase, spawn_broker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replicas_farm_lock_delays_new_logons_by_less_than_a_front_doors_wait() {
    let database = TestDatabase::postgres().await;
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let _agent = FakeAgent::join(&broker.url(), description("ts-a", "farm-f", 100), vec![]).await;
    let placed = redirect(&mut client, "farm-f", "first")
        .await
        .expect("placed");
    assert_eq!(reason(&placed), pb::RedirectReason::LoadBalanced);

    // The frozen replica: a placement connection (the store's settings) that took the farm's
    // lock and then stopped.
    let mut frozen = sqlx::PgConnection::connect(&database.url).await.unwrap();
    for (setting, value) in store::PLACEMENT_SETTINGS {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET {setting} = '{value}'")))
            .execute(&mut frozen)
            .await
            .unwrap();
    }
    hold_farm_lock(&mut frozen).await;

    // A new logon on the live replica waits for the lock, which the server takes from the
    // frozen transaction, and is placed within the front door's 3 s.
    let asked = Instant::now();
    let placed = tokio::time::timeout(
        Duration::from_secs(10),
        redirect(&mut client, "farm-f", "second"),
    )
    .await
    .expect("an answer, not a hang")
    .expect("placed once the frozen transaction is ended");
    assert_eq!(reason(&placed), pb::RedirectReason::LoadBalanced);
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        sqlx::query("SELECT 1").execute(&mut frozen).await.is_err(),
        "the frozen transaction's connection was ended"
    );

    // Another client's lock (no idle timeout): UNAVAILABLE (retry) within the 3 s, saying what
    // happened — the database itself is fine.
    let mut other_client = sqlx::PgConnection::connect(&database.url).await.unwrap();
    hold_farm_lock(&mut other_client).await;
    let asked = Instant::now();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        redirect(&mut client, "farm-f", "third"),
    )
    .await
    .expect("an answer, not a hang")
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("lock was held too long"),
        "{refused:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    other_client.close().await.unwrap();
    let placed = redirect(&mut client, "farm-f", "third")
        .await
        .expect("placed again");
    assert_eq!(reason(&placed), pb::RedirectReason::LoadBalanced);
    broker.stop().await;
    database.drop_database().await;
}

/// Takes farm-f's row lock, as a placement does, in a transaction left open.
async fn hold_farm_lock(connection: &mut sqlx::PgConnection) {
    sqlx::query("BEGIN")
        .execute(&mut *connection)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM farms WHERE name = 'farm-f' FOR UPDATE")
        .execute(&mut *connection)
        .await
        .unwrap();
}
