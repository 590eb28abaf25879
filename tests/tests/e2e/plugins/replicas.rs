//! Replicas sharing one PostgreSQL database, each with its own link to a plug-in: a change an
//! agent or an administrator makes through one replica reaches the other replica's plug-in too
//! (the machine resent whole), so every replica's plug-in sees the whole farm.

use super::{PluginProcess, wait_for_call};
use std::time::Duration;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::fake_agent::{machine as description, session};
use tsbroker_tests::process::free_port;
use tsbroker_tests::{FakeAgent, TestBroker, TestDatabase, spawn_broker};

async fn replica(database: &TestDatabase, plugin: &PluginProcess) -> TestBroker {
    let farm = super::farm_with_plugin(plugin.address(), super::DEADLINE, None);
    spawn_broker(&database.url, move |config| {
        config.heartbeat_timeout = Duration::from_secs(60);
        config.farms.farms.insert("farm".to_owned(), farm);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_through_one_replica_reaches_the_other_replicas_plugin() {
    let database = TestDatabase::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let plugin_a = PluginProcess::start(dir.path(), free_port(), false, "a");
    let plugin_b = PluginProcess::start(dir.path(), free_port(), false, "b");
    let a = replica(&database, &plugin_a).await;
    let b = replica(&database, &plugin_b).await;
    wait_for_call(&plugin_a, "Initialize", |_| true).await;
    wait_for_call(&plugin_b, "Initialize", |_| true).await;

    // The agent's stream is with replica B.
    let mut agent = FakeAgent::join(
        &b.url(),
        description("ts-x", "farm", 100),
        vec![session(1, "alice", pb::SessionState::Active)],
    )
    .await;
    agent.logon(2, "bob").await.unwrap();
    let resynced_with = |user: &'static str| {
        move |call: &serde_json::Value| {
            call["notification"] == "RESYNC"
                && call["machine_name"] == "ts-x"
                && call["changes"]
                    .as_array()
                    .is_some_and(|changes| changes.iter().any(|change| change["user"] == user))
        }
    };
    // Replica A's plug-in learns the machine and both sessions.
    wait_for_call(&plugin_a, "MachineChangeNotification", |call| {
        call["type"] == "ADDED" && call["machine_name"] == "ts-x"
    })
    .await;
    wait_for_call(&plugin_a, "SessionChangeNotification", resynced_with("bob")).await;
    // And its leaving.
    agent.logoff(1, "alice").await.unwrap();
    wait_for_call(&plugin_a, "SessionChangeNotification", |call| {
        resynced_with("bob")(call) && call["changes"].as_array().unwrap().len() == 1
    })
    .await;
    // An administrator's change made through replica B: drained.
    b.admin_client()
        .await
        .drain_machine(crate::support::by_name("farm", "ts-x"))
        .await
        .unwrap();
    wait_for_call(&plugin_a, "MachineChangeNotification", |call| {
        call["machine_name"] == "ts-x" && call["draining"] == true
    })
    .await;
    agent.remove().await.unwrap();
    wait_for_call(&plugin_a, "MachineChangeNotification", |call| {
        call["type"] == "REMOVED" && call["machine_name"] == "ts-x"
    })
    .await;
    a.stop().await;
    b.stop().await;
    database.drop_database().await;
}
