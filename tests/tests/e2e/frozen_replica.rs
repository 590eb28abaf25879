//! A replica frozen in the middle of a placement (a paused VM, a network split between it and
//! PostgreSQL) holds its farm's lock in an open transaction. The other replicas' new logons must
//! hear UNAVAILABLE within the front door's wait, not hang, and the server must end the frozen
//! transaction soon, so that new logons are placed again without anyone restarting anything.

use crate::support::{reason, redirect};
use sqlx::Connection;
use std::time::{Duration, Instant};
use tonic::Code;
use tsbroker::store;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::fake_agent::machine as description;
use tsbroker_tests::{FakeAgent, TestDatabase, spawn_broker};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_replicas_farm_lock_stops_new_logons_only_for_seconds() {
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
    sqlx::query("BEGIN").execute(&mut frozen).await.unwrap();
    sqlx::query("SELECT 1 FROM farms WHERE name = 'farm-f' FOR UPDATE")
        .execute(&mut frozen)
        .await
        .unwrap();
    let frozen_at = Instant::now();

    // A new logon on the live replica: UNAVAILABLE (retry) within the front door's 3 s wait.
    let asked = Instant::now();
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        redirect(&mut client, "farm-f", "second"),
    )
    .await
    .expect("an answer, not a hang")
    .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // It says what happened: the database itself is fine.
    assert!(
        refused.message().contains("lock was held too long"),
        "{refused:?}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );

    // The server ends the frozen transaction (5 s idle): new logons are placed again.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(frozen_at.elapsed())).await;
    let placed = redirect(&mut client, "farm-f", "third")
        .await
        .expect("placed again");
    assert_eq!(reason(&placed), pb::RedirectReason::LoadBalanced);
    assert!(
        sqlx::query("SELECT 1").execute(&mut frozen).await.is_err(),
        "the frozen transaction's connection was ended"
    );
    broker.stop().await;
    database.drop_database().await;
}
