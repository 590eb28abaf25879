//! A plug-in's pick that is filled by the time its logon is placed: concurrent new logons that
//! the plug-in all sends to one machine, whose cap of logons in flight is 3. The machine takes
//! three; the others go where the policy puts them, and each of those is counted as a fallback
//! (`no_longer_candidate` when the machine was a candidate as the plug-in was asked,
//! `not_candidate` when it was full already; before, the first went uncounted), so that the plug-in's log and the decisions agree.

use super::{DEADLINE, PluginProcess, farm_with_plugin, wait_for_call};
use crate::support::{counter, reason, scrape};
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::fake_agent::machine as description;
use tsbroker_tests::process::free_port;
use tsbroker_tests::{FakeAgent, TestDatabase, spawn_broker};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_pick_filled_before_its_placement_is_a_counted_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = PluginProcess::start(dir.path(), free_port(), false, "1");
    plugin.set_mode("pick ts-a");
    let database = TestDatabase::sqlite();
    let metrics_port = free_port();
    let farm = farm_with_plugin(plugin.address(), DEADLINE, None);
    let broker = spawn_broker(&database.url, move |config| {
        config.max_pending_logons_per_machine = 3;
        config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap());
        config.farms.farms.insert("farm".to_owned(), farm);
    })
    .await;
    let _a = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await;
    let _b = FakeAgent::join(&broker.url(), description("ts-b", "farm", 100), vec![]).await;
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["machine_name"] == "ts-b" && call["state"] == "READY"
    })
    .await;

    let mut logons = Vec::new();
    for user in 0..8 {
        let mut client = broker.broker_client().await;
        logons.push(tokio::spawn(async move {
            let request = pb::RedirectRequest {
                user_name: format!("u{user}"),
                farm: "farm".into(),
                ..Default::default()
            };
            client
                .redirect(request)
                .await
                .map(|answer| answer.into_inner())
        }));
    }
    let (mut by_plugin, mut by_policy) = (0, 0);
    for logon in logons {
        let Ok(answer) = logon.await.unwrap() else {
            continue; // both machines at their cap
        };
        match reason(&answer) {
            pb::RedirectReason::Plugin => {
                assert_eq!(answer.machine_name, "ts-a");
                by_plugin += 1;
            }
            pb::RedirectReason::LoadBalanced => {
                assert_eq!(answer.machine_name, "ts-b");
                by_policy += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(by_plugin, 3);
    let metrics = scrape(metrics_port).await;
    // Every cause: a slow host may also make one late (`timeout`).
    let counted = counter(&metrics, &["tsbroker_plugin_fallbacks_total", "cause=\""]);
    assert!(
        counted >= f64::from(by_policy),
        "{by_policy} logons placed by the policy, {counted} fallbacks:\n{metrics}"
    );
    broker.stop().await;
}
