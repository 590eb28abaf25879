//! An agent killed (SIGKILL) while clients are connected through its front door, on a machine
//! where no PAM reports logons: the front door's sessions that had lasted the
//! unconfirmed-logon grace are logons, and the restarted agent keeps them (DISCONNECTED), so
//! that their users go back to them rather than to a second session elsewhere.

use crate::support::{reason, redirect};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::spawn_agent::parse_session_list;
use tsbroker_tests::{AgentProcess, TestDatabase, spawn_broker};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_keeps_the_front_doors_sessions_that_had_lasted_the_grace() {
    let database = TestDatabase::sqlite();
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    // The RDP service: answers the connection request (with its own bytes) and holds the
    // connection open, as a session does.
    let rdp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rdp_address = rdp.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = rdp.accept().await {
            tokio::spawn(async move {
                let mut chunk = vec![0u8; 4096];
                while let Ok(count @ 1..) = stream.read(&mut chunk).await {
                    let _ = stream.write_all(&chunk[..count]).await;
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let port = tsbroker_tests::process::free_port();
    let args: Vec<String> = [
        "--broker",
        &broker.url(),
        "--machine-name",
        "ts-crash.example.test",
        "--advertise",
        &format!("127.0.0.1:{port}"),
        "--front-door",
        &format!("127.0.0.1:{port}"),
        "--local-rdp",
        &rdp_address,
        "--unconfirmed-logon-grace",
        "1s",
        "--state-dir",
        &dir.path().join("state").display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let socket = dir.path().join("control.sock");
    let mut first = AgentProcess::spawn(&args, &socket, &dir.path().join("first.log"));
    first.wait_until_connected(Duration::from_secs(20)).await;
    let connect = |user: &str| {
        let cookie = format!("Cookie: mstshash={user}");
        let request =
            tsagent::front_door::x224::build_connection_request(Some(cookie.as_str()), Some(3));
        async move {
            let mut connection = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            connection.write_all(&request).await.unwrap();
            connection
        }
    };
    let sessions = |socket: std::path::PathBuf| async move {
        let listed = tsbroker_tests::spawn_agent::tsagent_cli(&["session", "list"], &socket).await;
        parse_session_list(&listed)
    };
    let listed_within = |user: &'static str, log: tsbroker_tests::process::LogFile| {
        let socket = socket.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !sessions(socket.clone())
                .await
                .iter()
                .any(|session| session.user == user)
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no session of {user}:\n{}",
                    log.tail(20)
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let _kate = connect("kate").await;
    listed_within("kate", first.log.clone()).await;
    // kate's connection lasts past the grace; leo's starts just before the crash.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let _leo = connect("leo").await;
    listed_within("leo", first.log.clone()).await;
    // The table is saved behind the connections' backs, within a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    first.kill();

    let mut second = AgentProcess::spawn(&args, &socket, &dir.path().join("second.log"));
    second.wait_until_connected(Duration::from_secs(20)).await;
    // Undecided logons are settled the grace after the start.
    let settled = "front-door logons the previous agent left unconfirmed";
    assert!(
        second
            .log
            .wait_for(settled, 1, Duration::from_secs(10), None)
            .await,
        "{}",
        second.log.tail(20)
    );
    let users: Vec<(String, String)> = sessions(socket.clone())
        .await
        .into_iter()
        .map(|session| (session.user, session.state))
        .collect();
    assert_eq!(
        users,
        [("kate".to_owned(), "disconnected".to_owned())],
        "{}",
        second.log.tail(20)
    );
    let back = redirect(&mut client, "default", "kate").await.unwrap();
    assert_eq!(
        (back.machine_name.as_str(), reason(&back)),
        ("ts-crash.example.test", pb::RedirectReason::ExistingSession)
    );
    let stopped = second.terminate(Duration::from_secs(15)).await;
    assert!(stopped.success(), "{stopped:?}");
    broker.stop().await;
}
