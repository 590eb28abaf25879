//! A plug-in over TLS, checked against a private CA (`ca_file`): a CA file that does not
//! match (or is put right later, or rotated) is read again when it changes, and the plug-in is
//! initialized once it does; meanwhile each failed `Initialize` is counted. A file that does not
//! load is not used; one changed while the link works is used from then on.

use super::{DEADLINE, PluginProcess, farm_with_plugin, redirect, wait_for_call};
use crate::support::{counter, reason, scrape};
use std::time::Duration;
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::fake_agent::machine as description;
use tsbroker_tests::process::free_port;
use tsbroker_tests::tls::TestCa;
use tsbroker_tests::{FakeAgent, TestDatabase, spawn_broker};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_plugin_ca_file_put_right_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let other = TestCa::new(dir.path(), "other");
    let served = ca.server("plugin");
    let ca_in_use = dir.path().join("ca-in-use.pem");
    std::fs::copy(other.cert(), &ca_in_use).unwrap();
    let (cert, key) = (served.cert.to_str().unwrap(), served.key.to_str().unwrap());
    let plugin = PluginProcess::start_with(
        dir.path(),
        free_port(),
        &["--tls-cert", cert, "--tls-key", key],
        "1",
    );

    let database = TestDatabase::sqlite();
    let metrics_port = free_port();
    let address = format!("https://127.0.0.1:{}", plugin.port);
    let farm = farm_with_plugin(address, DEADLINE, Some(ca_in_use.clone()));
    let broker = spawn_broker(&database.url, move |config| {
        config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap());
        config.farms.farms.insert("farm".to_owned(), farm);
    })
    .await;

    // The plug-in's certificate is not of the CA the broker trusts: no Initialize gets
    // through, and each attempt is counted as a failed call.
    let failed = || async {
        let metrics = scrape(metrics_port).await;
        let method = "method=\"Initialize\"";
        counter(
            &metrics,
            &["tsbroker_plugin_calls_total", method, "outcome=\"error\""],
        )
    };
    let started = std::time::Instant::now();
    while failed().await < 2.0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "failed Initialize calls not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        plugin.calls("Initialize").is_empty(),
        "{:?}",
        plugin.records()
    );

    // The right CA put in place as a rotation does it (a new file renamed over the old): the
    // next attempt uses it.
    let next = dir.path().join("ca-next.pem");
    std::fs::copy(ca.cert(), &next).unwrap();
    std::fs::rename(&next, &ca_in_use).unwrap();
    wait_for_call(&plugin, "Initialize", |_| true).await;

    // A CA file that does not load (garbage written over it) is not used: past the link's next
    // look at it, the plug-in still answers decisions over the channel that works.
    let _agent = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await;
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["machine_name"] == "ts-a" && call["state"] == "READY"
    })
    .await;
    plugin.set_mode("pick ts-a");
    std::fs::write(&ca_in_use, "garbage").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (answer, _) = redirect(&broker, "after-garbage").await;
    assert_eq!(reason(&answer), pb::RedirectReason::Plugin, "{answer:?}");
    assert_eq!(plugin.calls("Initialize").len(), 1);
    // Put right again (a rotation): the link initializes the plug-in over a channel using it.
    std::fs::copy(ca.cert(), &next).unwrap();
    std::fs::rename(&next, &ca_in_use).unwrap();
    let started = std::time::Instant::now();
    while plugin.calls("Initialize").len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "not initialized again over the rotated CA"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.stop().await;
}
