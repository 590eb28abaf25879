//! A PostgreSQL database that answers but takes no writes — read-only (a standby after a
//! failover, `default_transaction_read_only`), or the broker's role denied them — is an outage,
//! as a database that went away: health says NOT_SERVING, new logons hear UNAVAILABLE (not
//! INTERNAL, once per request in the log), and returning users are still sent to their
//! sessions on machines whose leases the outage stopped; once writes work again, SERVING. A
//! database that takes no new connections is an outage from the first request on.

use std::time::Duration;

use sqlx::Connection;
use tonic_health::pb::health_check_response::ServingStatus;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::TestBroker;
use tsbroker_tests::database::TestDatabase;

use crate::outage::{health, join_ts_a_with_alice_and_ts_b};
use crate::support::{eventually, reason, redirect};

/// Makes the test database read-only (or writable again) for new connections, and ends every
/// other connection to it: the broker's next ones get the new mode.
async fn set_read_only(operator: &mut sqlx::PgConnection, on: bool) {
    let setting = if on {
        "SET default_transaction_read_only = on"
    } else {
        "RESET default_transaction_read_only"
    };
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut *operator)
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{name}\" {setting}"
    )))
    .execute(&mut *operator)
    .await
    .unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&mut *operator)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_takes_no_writes_is_an_outage() {
    let database = TestDatabase::postgres().await;
    let broker = tsbroker_tests::spawn_broker(&database.url, |config| {
        config.heartbeat_timeout = Duration::from_secs(3);
    })
    .await;
    let mut client = broker.broker_client().await;
    join_ts_a_with_alice_and_ts_b(&broker, &client).await;

    let mut operator = sqlx::PgConnection::connect(&database.url).await.unwrap();
    set_read_only(&mut operator, true).await;
    eventually(20, || async {
        health(&broker).await == ServingStatus::NotServing as i32
    })
    .await;
    let newcomer = redirect(&mut client, "farm", "newcomer").await.unwrap_err();
    assert_eq!(newcomer.code(), tonic::Code::Unavailable, "{newcomer:?}");
    // Past the heartbeat timeout: ts-a's lease, stopped by the outage, still counts.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let alice = redirect(&mut client, "farm", "alice").await.unwrap();
    assert_eq!(
        (alice.machine_name.as_str(), reason(&alice)),
        ("ts-a", pb::RedirectReason::ExistingSession)
    );

    set_read_only(&mut operator, false).await;
    serving_again_then_gone(broker, operator, database).await;
}

/// A database that takes no new connections (`ALLOW_CONNECTIONS false`, as while it is
/// dropped or restored) is an outage from the first request on: UNAVAILABLE, never INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_takes_no_connections_is_an_outage_at_once() {
    let database = TestDatabase::postgres().await;
    let broker = tsbroker_tests::spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    join_ts_a_with_alice_and_ts_b(&broker, &client).await;

    // Connections to a database are disallowed from another one.
    let mut own = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let name: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut own)
        .await
        .unwrap();
    drop(own);
    let (server, _) = database.url.rsplit_once('/').unwrap();
    let mut operator = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap();
    let allow = |on: bool| format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS {on}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(allow(false)))
        .execute(&mut operator)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&mut operator)
        .await
        .unwrap();
    for user in 0..10 {
        let refused = redirect(&mut client, "farm", &format!("new{user}"))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(allow(true)))
        .execute(&mut operator)
        .await
        .unwrap();
    serving_again_then_gone(broker, operator, database).await;
}

/// The database put right: the broker is SERVING again; then it stops and the database goes.
async fn serving_again_then_gone(
    broker: TestBroker,
    operator: sqlx::PgConnection,
    database: TestDatabase,
) {
    eventually(30, || async {
        health(&broker).await == ServingStatus::Serving as i32
    })
    .await;
    broker.stop().await;
    drop(operator);
    database.drop_database().await;
}
