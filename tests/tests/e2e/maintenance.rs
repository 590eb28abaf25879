//! Maintenance with the broker away too: a drained machine's agent restarted (upgraded, its
//! server rebooted) while no broker answers keeps the machine drained — its front door still
//! refuses new users and lets returning ones in — with the settings the broker sent last, from
//! its state directory.

use crate::front_doors::{connection_request, rdp_stand_in, refused};
use crate::support::{by_name, eventually};
use std::time::Duration;
use tsbroker_tests::process::free_port;
use tsbroker_tests::spawn_agent::{tsagent_cli, tsagent_cli_output};
use tsbroker_tests::{AgentProcess, TestDatabase, spawn_broker};

/// Whether `tsagent status` says the machine drains (it exits with 3 while no broker is
/// connected).
async fn says_draining(socket: &std::path::Path) -> bool {
    let output = tsagent_cli_output(&["status"], socket).await;
    String::from_utf8_lossy(&output.stdout).contains(", draining")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_machine_stays_drained_through_an_agent_restart_without_a_broker() {
    let database = TestDatabase::sqlite();
    let broker = spawn_broker(&database.url, |_| {}).await;
    let (rdp, mut seen) = rdp_stand_in().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let door: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let args: Vec<String> = [
        "--broker",
        &broker.url(),
        "--machine-name",
        "ts-kept",
        "--advertise",
        &door.to_string(),
        "--front-door",
        &door.to_string(),
        "--local-rdp",
        &rdp,
        "--state-dir",
        &dir.path().join("state").display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    let mut agent = AgentProcess::spawn(&args, &socket, &dir.path().join("agent.log"));
    agent.wait_until_connected(Duration::from_secs(20)).await;
    tsagent_cli(
        &["session", "logon", "--user", "bob", "--session-id", "7"],
        &socket,
    )
    .await;
    tsagent_cli(
        &[
            "session",
            "disconnect",
            "--user",
            "bob",
            "--session-id",
            "7",
        ],
        &socket,
    )
    .await;
    let mut admin = broker.admin_client().await;
    admin
        .drain_machine(by_name("default", "ts-kept"))
        .await
        .unwrap();
    eventually(10, || says_draining(&socket)).await;

    // The broker goes away, then the agent restarts.
    broker.stop().await;
    assert!(agent.terminate(Duration::from_secs(15)).await.success());
    let mut agent = AgentProcess::spawn(&args, &socket, &dir.path().join("agent-2.log"));
    eventually(20, || says_draining(&socket)).await;
    assert_eq!(agent.log.count("as the broker last sent them"), 1);

    // A new user is refused (not handed to the RDP service); bob, whose session is here,
    // reaches it.
    assert!(refused(door, &connection_request("carol")).await);
    assert!(
        seen.try_recv().is_err(),
        "a new user reached the RDP service"
    );
    // Said as what it is: no broker reached, not a broker's UNAVAILABLE answer.
    let refusal = agent.log.lines_with("has no session here to return to");
    assert!(
        refusal
            .iter()
            .any(|line| line.contains("no broker reached")),
        "{refusal:?}"
    );
    let mut bob = tokio::net::TcpStream::connect(door).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut bob, &connection_request("bob"))
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("bob reaches the RDP service");
    assert!(first.is_some());
    assert!(agent.terminate(Duration::from_secs(15)).await.success());
}
