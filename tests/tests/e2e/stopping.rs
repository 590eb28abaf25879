//! Stopping the real binary: a first SIGTERM starts a clean stop that waits (up to the grace
//! period) for open calls; a second one ends the process at once, with 128 + the signal's number.
//! A clean stop closes an SQLite database whole (no WAL left to be read again).

use std::process::Command;
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tsbroker_common::proto::v1::admin_client::AdminClient;
use tsbroker_common::proto::v1::broker_client::BrokerClient;
use tsbroker_tests::TestAgent;
use tsbroker_tests::process::{
    ChildGuard, broker_process, connect, free_port, plain_broker_process, watch_health,
};

use crate::support::{by_name, machine};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_a_stop_that_waits_for_open_calls() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut broker, log) = broker_process(dir.path(), port, |binary, args| {
        let mut command = Command::new(binary);
        command.args(args).args(["--shutdown-grace", "60s"]);
        command
    })
    .await;
    // A call that never ends by itself keeps the clean stop waiting for the grace period.
    let (_channel, mut watch) = watch_health(port).await;

    broker.signal("TERM");
    // The stop has begun once the broker says it no longer serves.
    let stopping = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("no health change within 10 s of SIGTERM")
        .unwrap()
        .unwrap();
    assert_eq!(stopping.status, ServingStatus::NotServing as i32);
    assert!(
        broker
            .wait_exit(Duration::from_millis(1500))
            .await
            .is_none(),
        "the broker did not wait for the open call:\n{}",
        log.tail(10)
    );

    let second = Instant::now();
    broker.signal("TERM");
    let status = broker
        .wait_exit(Duration::from_secs(5))
        .await
        .unwrap_or_else(|| {
            panic!(
                "still running 5 s after a second SIGTERM:\n{}",
                log.tail(10)
            )
        });
    assert_eq!(status.code(), Some(128 + 15), "{}", log.tail(10));
    assert!(second.elapsed() < Duration::from_secs(5));
    assert!(
        log.wait_for(
            "second signal while stopping",
            1,
            Duration::from_secs(1),
            None
        )
        .await,
        "{}",
        log.tail(10)
    );
}

/// A clean stop closes the SQLite database whole, its WAL copied into the file and deleted: a
/// WAL left behind would be read again at the next start, its pages taken over those of a
/// backup copied in meanwhile (the restore undone, or the file damaged). Here a copy of the
/// file made with the broker stopped, copied back after later changes, is what starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_leaves_no_sqlite_wal_and_a_backup_copied_back_is_what_starts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let file = |suffix: &str| dir.path().join(format!("b.db{suffix}"));
    // A clean stop: exit 0, and neither the WAL nor its index left beside the file.
    let stop = |mut broker: ChildGuard| async move {
        broker.signal("TERM");
        let status = broker.wait_exit(Duration::from_secs(15)).await;
        assert_eq!(status.and_then(|status| status.code()), Some(0));
        for suffix in ["-wal", "-shm"] {
            assert!(
                !file(suffix).exists(),
                "b.db{suffix} left after a clean stop"
            );
        }
    };
    let draining = || async {
        let mut client = BrokerClient::new(connect(&url).await);
        machine(&mut client, "default", "ts1").await.draining
    };

    // ts1 joins with sessions and is drained; the stop leaves the file alone, whole.
    let (broker, _) = plain_broker_process(dir.path(), port).await;
    let ts1 = TestAgent::start(&url, "ts1", |_| {}).await;
    for id in 1..=20 {
        let (user, id) = (format!("user{id}"), id.to_string());
        ts1.cli(&["session", "logon", "--user", &user, "--session-id", &id])
            .await;
    }
    let mut admin = AdminClient::new(connect(&url).await);
    admin
        .drain_machine(by_name("default", "ts1"))
        .await
        .unwrap();
    ts1.stop().await;
    stop(broker).await;
    std::fs::copy(file(""), dir.path().join("backup.db")).unwrap();

    // Undrained, more sessions, stopped again: no WAL either.
    let (broker, _) = plain_broker_process(dir.path(), port).await;
    let ts1 = TestAgent::start(&url, "ts1", |_| {}).await;
    let mut admin = AdminClient::new(connect(&url).await);
    admin
        .undrain_machine(by_name("default", "ts1"))
        .await
        .unwrap();
    ts1.cli(&["session", "logon", "--user", "late", "--session-id", "99"])
        .await;
    assert!(!draining().await);
    ts1.stop().await;
    stop(broker).await;

    // The backup copied back is what the broker starts on: ts1 drained.
    std::fs::copy(dir.path().join("backup.db"), file("")).unwrap();
    let (broker, log) = plain_broker_process(dir.path(), port).await;
    assert!(draining().await, "{}", log.tail(10));
    stop(broker).await;
}
