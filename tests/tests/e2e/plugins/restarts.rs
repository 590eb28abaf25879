//! A plug-in that restarts loses everything it was told: it is initialized again and gets a
//! full RESYNC matching the directory, whether the farm was busy while it was away or quiet;
//! one whose resync keeps failing is said to fail once, and its recovery is said too.

use super::{PluginProcess, broker_with_plugin, redirect, wait_for_call};
use crate::support::{counter, reason, scrape};
use std::process::Command;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::FakeAgent;
use tsbroker_tests::fake_agent::{machine as description, session};
use tsbroker_tests::process::{ChildGuard, LogFile, broker_process, free_port};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_plugin_gets_a_full_resync_that_matches_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let plugin = PluginProcess::start(dir.path(), port, false, "1");
    let setup = broker_with_plugin(&plugin).await;
    let broker = &setup.broker;
    let mut a = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm", 100),
        vec![session(1, "alice", pb::SessionState::Disconnected)],
    )
    .await;
    let _b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        (1..=30)
            .map(|id| session(id, &format!("b{id}"), pb::SessionState::Active))
            .collect(),
    )
    .await;
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["machine_name"] == "ts-b" && call["state"] == "READY"
    })
    .await;
    // A machine that leaves for good before the plug-in restarts is not in its resync.
    let c = FakeAgent::join(&broker.url(), description("ts-c", "farm", 100), vec![]).await;
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["machine_name"] == "ts-c" && call["state"] == "READY"
    })
    .await;
    c.remove().await.unwrap();
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["machine_name"] == "ts-c" && call["type"] == "REMOVED"
    })
    .await;
    drop(plugin);
    // Changes while the plug-in is away.
    a.logon(2, "while-away").await.unwrap();
    a.logoff(1, "alice").await.unwrap();
    let plugin = PluginProcess::start(dir.path(), port, false, "2");
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["type"] == "CHANGED" && call["machine_name"] == "ts-b"
    })
    .await;
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["type"] == "CHANGED" && call["machine_name"] == "ts-a"
    })
    .await;
    assert_eq!(
        plugin.records()[0]["method"],
        "Initialize",
        "Initialize comes first"
    );
    let mut resynced: Vec<(String, String)> = plugin
        .calls("SessionChangeNotification")
        .iter()
        .filter(|call| call["notification"] == "RESYNC")
        .flat_map(|call| {
            let machine = call["machine_name"].as_str().unwrap().to_owned();
            call["changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |change| (machine.clone(), change["user"].as_str().unwrap().to_owned()))
                .collect::<Vec<_>>()
        })
        .collect();
    resynced.sort();
    let mut client = broker.broker_client().await;
    let listed = client
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut directory: Vec<(String, String)> = listed
        .sessions
        .iter()
        .map(|session| (session.machine_name.clone(), session.user_name.clone()))
        .collect();
    directory.sort();
    assert_eq!(resynced, directory);
    let told_of_c: Vec<_> = plugin
        .calls("MachineChangeNotification")
        .into_iter()
        .filter(|call| call["machine_name"] == "ts-c")
        .collect();
    assert!(told_of_c.is_empty(), "{told_of_c:#?}");
    assert!(directory.contains(&("ts-a".into(), "while-away".into())));
    assert_eq!(directory.len(), 31);
    let metrics = scrape(setup.metrics_port).await;
    assert!(
        counter(&metrics, &["tsbroker_plugin_resyncs_total"]) >= 2.0,
        "{metrics}"
    );
    setup.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_restarted_in_a_quiet_farm_is_initialized_before_it_is_asked() {
    // The plug-in answers every call after a restart, never FAILED_PRECONDITION (as a
    // plug-in written in a hurry does): only its new connection says it restarted.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let plugin = PluginProcess::start(dir.path(), port, false, "1");
    let setup = broker_with_plugin(&plugin).await;
    let broker = &setup.broker;
    let _a = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm", 100),
        vec![session(1, "alice", pb::SessionState::Active)],
    )
    .await;
    let _b = FakeAgent::join(&broker.url(), description("ts-b", "farm", 100), vec![]).await;
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["machine_name"] == "ts-b" && call["state"] == "READY"
    })
    .await;
    drop(plugin);
    // Nothing happens in the farm while it restarts.
    let plugin = PluginProcess::start(dir.path(), port, false, "2");
    wait_for_call(&plugin, "Initialize", |_| true).await;
    wait_for_call(&plugin, "SessionChangeNotification", |call| {
        call["notification"] == "RESYNC" && call["machine_name"] == "ts-a"
    })
    .await;
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["type"] == "CHANGED" && call["machine_name"] == "ts-b"
    })
    .await;
    // Its first decision after the restart is its own, made knowing the farm.
    plugin.set_mode("pick ts-a");
    let (answer, _) = redirect(broker, "newcomer").await;
    assert_eq!(reason(&answer), pb::RedirectReason::Plugin);
    assert_eq!(answer.machine_name, "ts-a");
    // Initialized once, not once more for the same restart.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert_eq!(plugin.calls("Initialize").len(), 1);
    let metrics = scrape(setup.metrics_port).await;
    assert_eq!(
        counter(&metrics, &["tsbroker_plugin_fallbacks_total"]),
        0.0,
        "{metrics}"
    );
    setup.broker.stop().await;
}

/// The `tsbroker` process on `port` with farm "farm" served by `plugin` (see `broker_process`).
async fn broker_process_with_plugin(
    dir: &std::path::Path,
    plugin: &PluginProcess,
    port: u16,
) -> (ChildGuard, LogFile) {
    let config = dir.join("tsbroker.toml");
    std::fs::write(
        &config,
        format!(
            "[farms.farm]\nslow_start = \"0s\"\n[farms.farm.plugin]\naddress = \"{}\"\n",
            plugin.address()
        ),
    )
    .unwrap();
    broker_process(dir, port, move |binary, args| {
        let mut command = Command::new(binary);
        command
            .args(args)
            .arg("--config")
            .arg(config)
            .args(["--heartbeat-timeout", "3s"]);
        command
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resync_that_keeps_failing_is_said_once_and_its_recovery_too() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = PluginProcess::start(dir.path(), free_port(), false, "1");
    plugin.set_mode("fail-notifications");
    let port = free_port();
    let (_broker, log) = broker_process_with_plugin(dir.path(), &plugin, port).await;
    let _agent = FakeAgent::join(
        &format!("http://127.0.0.1:{port}"),
        description("ts-a", "farm", 100),
        vec![session(1, "alice", pb::SessionState::Active)],
    )
    .await;
    let failing = "its full resync failed";
    let limit = std::time::Duration::from_secs(15);
    assert!(
        log.wait_for(failing, 1, limit, None).await,
        "{}",
        log.tail(20)
    );
    let initialized = "plug-in initialized; sending a full resync";
    let said = log.count(initialized);
    // The next attempts (0.4, 0.8, 1.6 s apart) fail too, and are not said again.
    let attempts = || {
        let records = plugin.records();
        let initialize = records.iter().filter(|call| call["method"] == "Initialize");
        initialize.count()
    };
    let attempted = attempts();
    let deadline = std::time::Instant::now() + limit;
    while attempts() < attempted + 3 {
        assert!(std::time::Instant::now() < deadline, "{}", log.tail(20));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(log.count(initialized), said, "{}", log.text());
    assert_eq!(log.count(failing), 1, "{}", log.text());
    plugin.set_mode("keep");
    assert!(
        log.wait_for("its answers are used again", 1, limit, None)
            .await,
        "{}",
        log.tail(20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_machine_gone_while_the_broker_was_down_turns_unreachable_for_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = PluginProcess::start(dir.path(), free_port(), false, "1");
    let start = |port| broker_process_with_plugin(dir.path(), &plugin, port);
    let port = free_port();
    let (mut broker, _log) = start(port).await;
    let agent = FakeAgent::join(
        &format!("http://127.0.0.1:{port}"),
        description("ts-a", "farm", 100),
        vec![session(1, "alice", pb::SessionState::Active)],
    )
    .await;
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["machine_name"] == "ts-a" && call["state"] == "READY"
    })
    .await;
    // The broker dies with the agent's stream; the agent is gone too, and tells nobody.
    broker.kill();
    agent.hang_up();
    let port = free_port();
    let (_broker, log) = start(port).await;
    // Back within the timeout, the full resync shows the machine as it looks: still READY.
    let resynced_state = || {
        let records = plugin.records();
        let second_start = records
            .iter()
            .enumerate()
            .filter(|(_, record)| record["method"] == "Initialize")
            .nth(1)?
            .0;
        records[second_start..]
            .iter()
            .find(|call| call["type"] == "CHANGED" && call["machine_name"] == "ts-a")
            .map(|call| call["state"].clone())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let state = loop {
        if let Some(state) = resynced_state() {
            break state;
        }
        assert!(std::time::Instant::now() < deadline, "{}", log.tail(10));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(state, "READY", "{:#?}", plugin.records());
    // Once its lease has run out, the plug-in is told, with no stream ending to say so.
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["type"] == "CHANGED"
            && call["machine_name"] == "ts-a"
            && call["state"] == "UNREACHABLE"
    })
    .await;
}
