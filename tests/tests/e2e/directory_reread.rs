//! A replica's directory that must read everything again (its listener reconnected: other
//! replicas' notifications may have been missed) while the read cannot finish — the database
//! went away again, or, here, a lock holds the sessions table — keeps answering returning users
//! from what it knows. It used to be taken down for the read, and the decisions then waited on
//! the database: for a whole outage, when the read failed.

use std::time::Duration;

use sqlx::Connection;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::database::TestDatabase;

use crate::outage::join_ts_a_with_alice_and_ts_b;
use crate::support::{eventually, reason, redirect};

/// How long a front door waits for a redirect before it sends the user to its own RDP service.
const FRONT_DOOR_WAIT: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reread_that_cannot_finish_leaves_returning_users_answered() {
    let database = TestDatabase::postgres().await;
    let broker = tsbroker_tests::spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    join_ts_a_with_alice_and_ts_b(&broker, &client).await;

    let mut operator = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let mut locker = sqlx::PgConnection::connect(&database.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE sessions IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    // The broker's listener loses its connection; the one it makes next has the directory
    // read everything, and the read waits for the lock.
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&mut operator)
    .await
    .unwrap();
    assert_eq!(ended, [true], "one listener");
    eventually(10, || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query ILIKE '%FROM sessions%'",
        )
        .fetch_one(&mut sqlx::PgConnection::connect(&database.url).await.unwrap())
        .await
        .unwrap();
        waiting > 0
    })
    .await;
    for _ in 0..3 {
        let alice = tokio::time::timeout(FRONT_DOOR_WAIT, redirect(&mut client, "farm", "alice"))
            .await
            .expect("alice's answer waits for the database")
            .unwrap();
        assert_eq!(
            (alice.machine_name.as_str(), reason(&alice)),
            ("ts-a", pb::RedirectReason::ExistingSession)
        );
    }
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let alice = redirect(&mut client, "farm", "alice").await.unwrap();
    assert_eq!(
        (alice.machine_name.as_str(), reason(&alice)),
        ("ts-a", pb::RedirectReason::ExistingSession)
    );
    broker.stop().await;
    database.drop_database().await;
}
