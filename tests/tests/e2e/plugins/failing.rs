//! A plug-in that fails in ways that ask for nothing drastic, and one in the middle of its
//! resync: an UNAVAILABLE answer (an overloaded plug-in) keeps the broker's pick and nothing
//! more; one that keeps asking for `Initialize` (FAILED_PRECONDITION) is initialized again
//! with a growing pause, not at every decision; and decisions do not ask a plug-in before it
//! has been sent the whole farm.

use super::{
    DEADLINE, PluginProcess, broker_for_plugin_at, broker_with_plugin, redirect,
    two_machines_the_plugin_knows, wait_for_call,
};
use crate::support::reason;
use std::time::Duration;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::FakeAgent;
use tsbroker_tests::fake_agent::{machine as description, session};
use tsbroker_tests::process::free_port;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_plugin_is_not_initialized_again_at_every_decision() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = PluginProcess::start(dir.path(), free_port(), false, "1");
    let setup = broker_with_plugin(&plugin).await;
    let broker = &setup.broker;
    let _agents = two_machines_the_plugin_knows(broker, &plugin).await;
    let initialized = || plugin.calls("Initialize").len();
    assert_eq!(initialized(), 1);

    // Overloaded: every decision keeps the broker's pick; the plug-in is not started over.
    plugin.set_mode("unavailable");
    // (Each decision is a new user's, counted against the two machines' caps of logons in
    // flight, 20 each: under 40 in all.)
    for user in 0..8 {
        let (answer, _) = redirect(broker, &format!("busy{user}")).await;
        assert_eq!(reason(&answer), pb::RedirectReason::LoadBalanced);
    }
    assert_eq!(plugin.calls("GetMostSuitableServer").len(), 8);
    assert_eq!(initialized(), 1, "initialized again after UNAVAILABLE");

    // Asking for Initialize at every decision: it gets it, with a growing pause between.
    plugin.set_mode("failed-precondition");
    for user in 0..12 {
        let (answer, _) = redirect(broker, &format!("again{user}")).await;
        assert_eq!(reason(&answer), pb::RedirectReason::LoadBalanced);
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    let again = initialized() - 1;
    assert!(
        (1..=5).contains(&again),
        "{again} initializations in about a second of decisions"
    );

    // Well again: its picks are used once it is initialized and resynced.
    plugin.set_mode("pick ts-b");
    let mut picked = None;
    for user in 0..12 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (answer, _) = redirect(broker, &format!("well{user}")).await;
        if reason(&answer) == pb::RedirectReason::Plugin {
            picked = Some(answer.machine_name);
            break;
        }
    }
    assert_eq!(picked.as_deref(), Some("ts-b"));
    setup.broker.stop().await;
}

/// A plug-in (re)started into a farm is sent every machine first; a decision meanwhile keeps
/// the broker's pick without asking it (it would answer from part of the farm).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_is_not_asked_before_its_resync_ends() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (broker, _database) =
        broker_for_plugin_at(format!("http://127.0.0.1:{port}"), DEADLINE).await;
    let _agents = [
        FakeAgent::join(
            &broker.url(),
            description("ts-a", "farm", 100),
            vec![session(1, "alice", pb::SessionState::Active)],
        )
        .await,
        FakeAgent::join(&broker.url(), description("ts-b", "farm", 100), vec![]).await,
    ];
    tokio::time::sleep(tsbroker::store::reachability::SETTLE_AFTER_OUTAGE).await;
    // Each of its notifications takes 10 s: the resync the broker starts is under way for
    // the next 5 s (then a notification times out, and it starts over later).
    std::fs::write(dir.path().join(format!("mode-{port}")), "pick ts-b").unwrap();
    let plugin = PluginProcess::start_with(dir.path(), port, &["--slow-notifications"], "slow");
    wait_for_call(&plugin, "MachineChangeNotification", |_| true).await;
    for user in ["early1", "early2", "early3"] {
        let (answer, _) = redirect(&broker, user).await;
        assert_eq!(reason(&answer), pb::RedirectReason::LoadBalanced, "{user}");
    }
    assert!(
        plugin.calls("GetMostSuitableServer").is_empty(),
        "asked during its resync: {:#?}",
        plugin.calls("GetMostSuitableServer")
    );
    broker.stop().await;
}
