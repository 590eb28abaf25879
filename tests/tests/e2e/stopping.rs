//! Stopping the real binary: a first SIGTERM starts a clean stop that waits (up to the grace
//! period) for open calls; a second one ends the process at once, with 128 + the signal's number.

use std::process::Command;
use std::time::{Duration, Instant};

use tonic_health::pb::health_check_response::ServingStatus;
use tsbroker_tests::process::{broker_process, free_port, watch_health};

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
