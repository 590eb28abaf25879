//! The SQLite broker when its database stops taking writes (a full disk) or its file is deleted
//! under it: the file can still be read, so only a write (or the file's link count) shows it. The broker is run with `SIGXFSZ` ignored, so that a
//! file-size limit (`prlimit --fsize`, set on the running process) makes every write fail as a
//! full disk does. Health goes NOT_SERVING, and once writes work again, the machines whose
//! agents could not write their heartbeats meanwhile still take their users back.

use crate::support::{reason, redirect};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::broker_client::BrokerClient;
use tsbroker_tests::FakeAgent;
use tsbroker_tests::binaries::tool;
use tsbroker_tests::fake_agent::{machine as description, session};
use tsbroker_tests::process::{broker_process, connect, free_port, in_shell, plain_broker_process};

fn limit_file_size(pid: u32, limit: &str) {
    let prlimit = tool("prlimit", "apt-get install util-linux");
    let status = Command::new(prlimit)
        .args(["--pid", &pid.to_string(), &format!("--fsize={limit}:")])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn wait_for_health(channel: &tonic::transport::Channel, wanted: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = HealthClient::new(channel.clone())
            .check(HealthCheckRequest::default())
            .await;
        if answer.is_ok_and(|answer| answer.get_ref().status == wanted as i32) {
            return;
        }
        assert!(Instant::now() < deadline, "health never became {wanted:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_takes_no_writes_is_an_outage_and_users_are_sent_back_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (broker, log) = broker_process(dir.path(), port, |binary, args| {
        let mut command = in_shell("trap '' XFSZ", binary, args);
        command.args(["--heartbeat-timeout", "2s"]);
        command
    })
    .await;
    let url = format!("http://127.0.0.1:{port}");
    let _a = FakeAgent::join(
        &url,
        description("ts-a", "default", 100),
        vec![session(1, "alice", pb::SessionState::Disconnected)],
    )
    .await
    .keep_reporting();
    let _b = FakeAgent::join(&url, description("ts-b", "default", 100), vec![])
        .await
        .keep_reporting();
    let channel = connect(&url).await;

    // Every write fails from now on, as with a full disk.
    limit_file_size(broker.pid(), "4096");
    wait_for_health(&channel, ServingStatus::NotServing).await;
    assert!(
        log.wait_for("takes no write", 1, Duration::from_secs(1), None)
            .await,
        "{}",
        log.tail(10)
    );
    // Longer than the heartbeat timeout without a write.
    tokio::time::sleep(Duration::from_secs(3)).await;
    limit_file_size(broker.pid(), "unlimited");
    wait_for_health(&channel, ServingStatus::Serving).await;

    // The agents' streams ended with the outage; alice's machine still takes her back.
    let answer = redirect(&mut BrokerClient::new(channel), "default", "alice")
        .await
        .unwrap_or_else(|status| panic!("{status:?}\n{}", log.tail(10)));
    assert_eq!(
        (reason(&answer), answer.machine_name.as_str()),
        (pb::RedirectReason::ExistingSession, "ts-a")
    );
}

/// A database file deleted under the running broker: its writes go to the deleted file, lost
/// at the next start. That is an outage too, and the log says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_file_deleted_while_the_broker_runs_is_an_outage() {
    deleting_is_an_outage("b.db", "database file was deleted or replaced").await;
}

/// The same for the database's WAL file: what the last checkpoint had not copied would be lost
/// at a crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_file_deleted_while_the_broker_runs_is_an_outage() {
    deleting_is_an_outage("b.db-wal", "WAL file").await;
}

/// Deletes `file` of the running broker's database: NOT_SERVING, and `words` in the log.
async fn deleting_is_an_outage(file: &str, words: &str) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (_broker, log) = plain_broker_process(dir.path(), port).await;
    let channel = connect(&format!("http://127.0.0.1:{port}")).await;
    wait_for_health(&channel, ServingStatus::Serving).await;
    std::fs::remove_file(dir.path().join(file)).unwrap();
    wait_for_health(&channel, ServingStatus::NotServing).await;
    assert!(
        log.wait_for(words, 1, Duration::from_secs(1), None).await,
        "{}",
        log.tail(10)
    );
}

/// A database that opens but takes no writes from the start (here opened read-only) is never
/// said to be served: health is NOT_SERVING from the first check, not after the first interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_takes_no_writes_at_start_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let (mut first, _) = plain_broker_process(dir.path(), free_port()).await;
    first.terminate(Duration::from_secs(10)).await;

    let port = free_port();
    let log = tsbroker_tests::process::LogFile::create(&dir.path().join("read-only.log"));
    let (stdout, stderr) = log.stdio();
    let mut command = Command::new(tsbroker_tests::binaries::workspace_binary("tsbroker"));
    command
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--database-url")
        .arg(format!(
            "sqlite://{}?mode=ro",
            dir.path().join("b.db").display()
        ))
        .env("RUST_LOG", "info")
        .stdout(stdout)
        .stderr(stderr);
    let mut broker = tsbroker_tests::process::ChildGuard::spawn("tsbroker", command);
    assert!(
        log.wait_for(
            "store opened, but",
            1,
            Duration::from_secs(20),
            Some(&mut broker)
        )
        .await,
        "{}",
        log.tail(10)
    );
    let channel = connect(&format!("http://127.0.0.1:{port}")).await;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();
    assert_eq!(answer.get_ref().status, ServingStatus::NotServing as i32);
    assert!(
        !std::fs::read_to_string(dir.path().join("read-only.log"))
            .unwrap()
            .contains("store ready")
    );
}

/// A broker started while its disk takes no writes (here a file-size limit of 0, as a full
/// disk) does not exit: it says why, stays NOT_SERVING, and opens the database once writes
/// work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_started_on_a_full_disk_waits_for_room_and_then_serves() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut command = Command::new("sh");
    // The limit holds for every file the broker writes, its log too: the log goes through a
    // pipe, copied to the file here.
    command
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -S -f 0; exec \"$0\" \"$@\" 2>&1")
        .arg(tsbroker_tests::binaries::workspace_binary("tsbroker"))
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--database-url")
        .arg(format!("sqlite://{}", dir.path().join("b.db").display()))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped());
    let mut broker = tsbroker_tests::process::ChildGuard::spawn("tsbroker", command);
    let log = tsbroker_tests::process::LogFile::create(&dir.path().join("broker.log"));
    let mut output = broker.take_stdout().unwrap();
    let mut copy = std::fs::OpenOptions::new()
        .append(true)
        .open(log.path())
        .unwrap();
    std::thread::spawn(move || std::io::copy(&mut output, &mut copy));
    assert!(
        log.wait_for(
            "cannot be opened for writing",
            2,
            Duration::from_secs(20),
            Some(&mut broker)
        )
        .await,
        "{}",
        log.tail(10)
    );
    let channel = connect(&format!("http://127.0.0.1:{port}")).await;
    wait_for_health(&channel, ServingStatus::NotServing).await;
    limit_file_size(broker.pid(), "unlimited");
    assert!(
        log.wait_for("store ready", 1, Duration::from_secs(20), Some(&mut broker))
            .await,
        "{}",
        log.tail(10)
    );
    wait_for_health(&channel, ServingStatus::Serving).await;
}
