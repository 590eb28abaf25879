//! External plug-ins end to end: a real plug-in process (`scripted-plugin`) over gRPC. Its pick
//! is honoured; a non-candidate, an error or a hang falls back within the deadline (and is
//! counted); a restarted plug-in gets a full RESYNC that matches the directory; notifications
//! come in the documented order and batches; external sessions come back as EXTERNAL.

use crate::support::{by_name, counter, eventually, reason, scrape};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tsbroker::decision::farm_settings::{FarmSettings, PluginSettings};
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::binaries::workspace_binary;
use tsbroker_tests::fake_agent::{machine as description, session};
use tsbroker_tests::process::{ChildGuard, free_port};
use tsbroker_tests::{FakeAgent, TestBroker, TestDatabase, spawn_broker};

mod failing;
mod overtaken;
mod replicas;
mod restarts;
mod tls;

const DEADLINE: Duration = Duration::from_millis(100);

/// A running `scripted-plugin` with its record and mode files.
struct PluginProcess {
    _child: ChildGuard,
    port: u16,
    record: PathBuf,
    mode: PathBuf,
}

impl PluginProcess {
    fn start(dir: &Path, port: u16, external: bool, run: &str) -> PluginProcess {
        Self::start_with(dir, port, if external { &["--external"] } else { &[] }, run)
    }

    fn start_with(dir: &Path, port: u16, flags: &[&str], run: &str) -> PluginProcess {
        let record = dir.join(format!("record-{run}.jsonl"));
        let mode = dir.join(format!("mode-{port}"));
        let mut command = Command::new(workspace_binary("scripted-plugin"));
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--record")
            .arg(&record)
            .arg("--mode-file")
            .arg(&mode)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .args(flags);
        let mut child = ChildGuard::spawn("scripted-plugin", command);
        let stdout = child.take_stdout().expect("piped stdout");
        let mut first_line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut first_line).unwrap();
        assert!(
            first_line.starts_with("listening on"),
            "plug-in said {first_line:?}"
        );
        PluginProcess {
            _child: child,
            port,
            record,
            mode,
        }
    }

    fn set_mode(&self, mode: &str) {
        std::fs::write(&self.mode, mode).unwrap();
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    fn calls(&self, method: &str) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|record| record["method"] == method)
            .collect()
    }

    fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

struct Setup {
    broker: TestBroker,
    metrics_port: u16,
    _database: TestDatabase,
}

async fn broker_with_plugin(plugin: &PluginProcess) -> Setup {
    broker_with_plugin_and_policy(plugin, None).await
}

/// [`broker_with_plugin`], with farm "farm" under `policy` when given.
async fn broker_with_plugin_and_policy(plugin: &PluginProcess, policy: Option<&str>) -> Setup {
    let database = TestDatabase::sqlite();
    let metrics_port = free_port();
    let farm = FarmSettings {
        policy: policy.map(str::to_owned),
        ..farm_with_plugin(plugin.address(), DEADLINE, None)
    };
    let broker = spawn_broker(&database.url, move |config| {
        config.heartbeat_timeout = Duration::from_secs(60);
        config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap());
        config.farms.farms.insert("farm".to_owned(), farm);
    })
    .await;
    Setup {
        broker,
        metrics_port,
        _database: database,
    }
}

/// A farm served by the plug-in at `address` (batches of 25, a CA file for https), without
/// slow start.
fn farm_with_plugin(address: String, deadline: Duration, ca_file: Option<PathBuf>) -> FarmSettings {
    FarmSettings {
        slow_start: Duration::ZERO,
        plugin: Some(PluginSettings {
            address,
            deadline,
            batch_size: 25,
            ca_file,
        }),
        ..FarmSettings::default()
    }
}

/// A broker (on SQLite) whose farm "farm" has the plug-in at `address`, and its database.
async fn broker_for_plugin_at(address: String, deadline: Duration) -> (TestBroker, TestDatabase) {
    let database = TestDatabase::sqlite();
    let farm = farm_with_plugin(address, deadline, None);
    let broker = spawn_broker(&database.url, move |config| {
        config.heartbeat_timeout = Duration::from_secs(60);
        config.farms.farms.insert("farm".to_owned(), farm);
    })
    .await;
    (broker, database)
}

/// ts-a and ts-b, without sessions, join "farm"; back once the plug-in heard ts-b is READY.
async fn two_machines_the_plugin_knows(
    broker: &TestBroker,
    plugin: &PluginProcess,
) -> [FakeAgent; 2] {
    let agents = [
        FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await,
        FakeAgent::join(&broker.url(), description("ts-b", "farm", 100), vec![]).await,
    ];
    wait_for_call(plugin, "MachineChangeNotification", |call| {
        call["machine_name"] == "ts-b" && call["state"] == "READY"
    })
    .await;
    agents
}

async fn wait_for_call(plugin: &PluginProcess, method: &str, matching: impl Fn(&Value) -> bool) {
    let seconds = 15;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !plugin.calls(method).iter().any(&matching) {
        assert!(
            Instant::now() < deadline,
            "no matching {method} within {seconds}s: {:#?}",
            plugin.records()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn redirect(broker: &TestBroker, user: &str) -> (pb::RedirectResponse, Duration) {
    let mut client = broker.broker_client().await;
    let started = Instant::now();
    let answer = crate::support::redirect(&mut client, "farm", user)
        .await
        .expect("redirect");
    (answer, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_plugins_pick_is_honoured_and_failures_fall_back_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = PluginProcess::start(dir.path(), free_port(), false, "1");
    let setup = broker_with_plugin(&plugin).await;
    let broker = &setup.broker;
    let busy = (1..=50)
        .map(|id| session(id, &format!("s{id}"), pb::SessionState::Active))
        .collect();
    let _agents = [
        FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await,
        FakeAgent::join(&broker.url(), description("ts-b", "farm", 100), vec![]).await,
        FakeAgent::join(&broker.url(), description("ts-c", "farm", 100), busy).await,
    ];
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["machine_name"] == "ts-c" && call["state"] == "READY"
    })
    .await;

    plugin.set_mode("pick ts-c");
    let (answer, _) = redirect(broker, "picked").await;
    assert_eq!(
        (answer.machine_name.as_str(), reason(&answer)),
        ("ts-c", pb::RedirectReason::Plugin)
    );
    let asked = plugin.calls("GetMostSuitableServer");
    let asked = asked.last().expect("asked");
    assert_eq!(asked["user"], "picked");
    let mut candidates: Vec<String> = serde_json::from_value(asked["candidates"].clone()).unwrap();
    candidates.sort();
    assert_eq!(candidates, vec!["ts-a", "ts-b", "ts-c"]);
    assert!(
        asked["broker_pick"] == "ts-a" || asked["broker_pick"] == "ts-b",
        "{asked}"
    );

    // An id in another of a UUID's text forms is the same machine (as the Admin API takes it).
    plugin.set_mode("pick-upper ts-c");
    let (answer, _) = redirect(broker, "picked-upper").await;
    assert_eq!(
        (answer.machine_name.as_str(), reason(&answer)),
        ("ts-c", pb::RedirectReason::Plugin)
    );

    plugin.set_mode("keep");
    let (kept, _) = redirect(broker, "kept").await;
    assert_eq!(reason(&kept), pb::RedirectReason::LoadBalanced);
    assert_ne!(kept.machine_name, "ts-c");

    for (mode, user) in [("not-candidate", "nc"), ("error", "err"), ("hang", "hung")] {
        plugin.set_mode(mode);
        let (answer, took) = redirect(broker, user).await;
        assert_eq!(
            reason(&answer),
            pb::RedirectReason::LoadBalanced,
            "{mode}: the broker's pick stands"
        );
        assert_ne!(answer.machine_name, "ts-c", "{mode}");
        assert!(
            took < DEADLINE + Duration::from_millis(900),
            "{mode}: took {took:?}"
        );
    }
    // The hang cost the deadline, not the plug-in's 10 s; notifications still flow meanwhile.
    let metrics = scrape(setup.metrics_port).await;
    assert!(
        metrics
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{metrics}"
    );
    for cause in ["not_candidate", "error", "timeout"] {
        assert!(
            counter(
                &metrics,
                &[
                    "tsbroker_plugin_fallbacks_total",
                    &format!("cause=\"{cause}\"")
                ]
            ) >= 1.0,
            "{cause}:\n{metrics}"
        );
    }
    assert_eq!(
        counter(&metrics, &["tsbroker_decisions_total", "reason=\"plugin\""]),
        2.0,
        "{metrics}"
    );
    assert!(
        counter(
            &metrics,
            &[
                "tsbroker_decisions_total",
                "reason=\"load_balanced\"",
                "policy=\"session-count\""
            ]
        ) >= 4.0
    );
    assert!(
        metrics.contains("tsbroker_plugin_call_seconds_bucket"),
        "{metrics}"
    );
    setup.broker.stop().await;
    wait_for_call(&plugin, "Terminated", |_| true).await;
}

/// The broker's pick shown to the plug-in is a preview: a round-robin turn is taken once per
/// placement, not once for the plug-in and again for the placement (which, with two machines,
/// sent every new logon to the same one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_robin_takes_one_turn_per_logon_with_a_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = PluginProcess::start(dir.path(), free_port(), false, "rr");
    let setup = broker_with_plugin_and_policy(&plugin, Some("round-robin")).await;
    let broker = &setup.broker;
    let _agents = two_machines_the_plugin_knows(broker, &plugin).await;
    plugin.set_mode("keep");
    let mut placed = Vec::new();
    for user in 0..6 {
        let (answer, _) = redirect(broker, &format!("rr-user{user}")).await;
        assert_eq!(reason(&answer), pb::RedirectReason::LoadBalanced);
        let asked = plugin.calls("GetMostSuitableServer");
        let asked = asked.last().expect("asked");
        assert_eq!(
            asked["broker_pick"], answer.machine_name,
            "the plug-in kept the pick it was shown"
        );
        placed.push(answer.machine_name);
    }
    for pair in placed.windows(2) {
        assert_ne!(pair[0], pair[1], "turns alternate: {placed:?}");
    }
    // A machine the plug-in names is its choice, also when it is the pick it was shown: after
    // six turns the next is placed[0]'s machine, and the plug-in names it.
    let next_turn = placed[0].clone();
    plugin.set_mode(&format!("pick {next_turn}"));
    for user in 0..4 {
        let (answer, _) = redirect(broker, &format!("rr-pick{user}")).await;
        assert_eq!(
            (answer.machine_name.as_str(), reason(&answer)),
            (next_turn.as_str(), pb::RedirectReason::Plugin)
        );
    }
    setup.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_come_in_order_and_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = PluginProcess::start(dir.path(), free_port(), false, "1");
    let setup = broker_with_plugin(&plugin).await;
    let broker = &setup.broker;
    wait_for_call(&plugin, "Initialize", |call| call["farms"][0] == "farm").await;
    let sessions = (1..=60)
        .map(|id| session(id, &format!("s{id}"), pb::SessionState::Disconnected))
        .collect();
    let mut agent =
        FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), sessions).await;
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["state"] == "READY"
    })
    .await;

    // ADDED, then RESYNC in batches of at most 25 ending with last_batch, then CHANGED to READY.
    let sequence: Vec<String> = plugin
        .records()
        .iter()
        .filter(|call| call["method"] != "Initialize")
        .map(|call| match call["method"].as_str().unwrap() {
            "MachineChangeNotification" => format!(
                "{}:{}",
                call["type"].as_str().unwrap(),
                call["state"].as_str().unwrap()
            ),
            _ => format!(
                "{}:{}:{}",
                call["notification"].as_str().unwrap(),
                call["changes"].as_array().unwrap().len(),
                call["last_batch"]
            ),
        })
        .collect();
    // The plug-in's initial full resync races with the join: it may send a snapshot group (or
    // cover the live ADDED itself). Whatever the interleaving, the machine is ADDED first, every
    // group ends with a last RESYNC batch and a CHANGED, and the last group carries the 60
    // sessions in batches of at most 25 and READY.
    assert_eq!(sequence[0], "ADDED:JOINING", "{sequence:?}");
    let groups: Vec<&[String]> = sequence
        .split_inclusive(|step| step.starts_with("CHANGED:"))
        .collect();
    for group in &groups {
        assert!(group.len() >= 2, "{sequence:?}");
        assert!(
            group[group.len() - 1].starts_with("CHANGED:"),
            "{sequence:?}"
        );
        assert!(
            group[group.len() - 2].ends_with(":true"),
            "last RESYNC batch: {sequence:?}"
        );
    }
    let last = groups[groups.len() - 1];
    let batches: Vec<&str> = last
        .iter()
        .filter(|step| step.starts_with("RESYNC:"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        batches,
        vec!["RESYNC:25:false", "RESYNC:25:false", "RESYNC:10:true"],
        "{sequence:?}"
    );
    assert_eq!(last[last.len() - 1], "CHANGED:READY", "{sequence:?}");

    // Thirty logons sent back to back: merged into calls of at most 25 changes.
    let mut seqs = Vec::new();
    for id in 100..130u32 {
        let event = pb::SessionEvent {
            r#type: pb::SessionEventType::Logon as i32,
            session: Some(session(
                id,
                &format!("burst{id}"),
                pb::SessionState::Unspecified,
            )),
        };
        seqs.push(
            agent
                .send(pb::agent_message::Body::SessionEvent(event))
                .await,
        );
    }
    for seq in seqs {
        agent.answer_to(seq).await.unwrap();
    }
    let burst_calls = || {
        plugin
            .calls("SessionChangeNotification")
            .into_iter()
            .filter(|call| call["notification"] == "UNSPECIFIED")
            .collect::<Vec<_>>()
    };
    eventually(15, || async {
        burst_calls()
            .iter()
            .map(|call| call["changes"].as_array().unwrap().len())
            .sum::<usize>()
            == 30
    })
    .await;
    let sizes: Vec<usize> = burst_calls()
        .iter()
        .map(|call| call["changes"].as_array().unwrap().len())
        .collect();
    assert!(sizes.iter().all(|size| *size <= 25), "{sizes:?}");
    assert!(sizes.len() < 30, "events were batched: {sizes:?}");
    let first = &burst_calls()[0]["changes"][0];
    assert_eq!(
        (
            first["type"].as_str(),
            first["user"].as_str(),
            first["state"].as_str()
        ),
        (Some("LOGON"), Some("burst100"), Some("ACTIVE"))
    );

    // Admin changes: CHANGED names the field, even when it changes to its default.
    let mut admin = broker.admin_client().await;
    admin.drain_machine(by_name("farm", "ts-a")).await.unwrap();
    admin
        .undrain_machine(by_name("farm", "ts-a"))
        .await
        .unwrap();
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["changed_fields"][0] == "draining" && call["draining"] == false
    })
    .await;
    let drains: Vec<bool> = plugin
        .calls("MachineChangeNotification")
        .iter()
        .filter(|call| call["changed_fields"][0] == "draining")
        .map(|call| call["draining"].as_bool().unwrap())
        .collect();
    assert_eq!(drains, vec![true, false]);

    agent.remove().await.unwrap();
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["type"] == "REMOVED"
    })
    .await;
    setup.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn external_sessions_come_back_as_external() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = PluginProcess::start(dir.path(), free_port(), true, "1");
    plugin.set_mode("external vdi-alice.example.com:3389");
    let setup = broker_with_plugin(&plugin).await;
    let broker = &setup.broker;
    let _agent = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm", 100),
        vec![session(1, "bob", pb::SessionState::Disconnected)],
    )
    .await;
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["state"] == "READY"
    })
    .await;
    let (alice, _) = redirect(broker, "alice").await;
    assert_eq!(reason(&alice), pb::RedirectReason::External);
    assert_eq!(
        (
            alice.address.as_str(),
            alice.machine_id.as_str(),
            alice.front_door
        ),
        ("vdi-alice.example.com:3389", "", false)
    );
    // A user with a session in the farm goes back to it; the plug-in is not asked.
    let asked_before = plugin.calls("GetUserExternalSession").len();
    let (bob, _) = redirect(broker, "bob").await;
    assert_eq!(reason(&bob), pb::RedirectReason::ExistingSession);
    assert_eq!(plugin.calls("GetUserExternalSession").len(), asked_before);
    // No external host for this user: the farm places them.
    plugin.set_mode("keep");
    let (carol, _) = redirect(broker, "carol").await;
    assert_eq!(
        (carol.machine_name.as_str(), reason(&carol)),
        ("ts-a", pb::RedirectReason::LoadBalanced)
    );
    // The host name is shown to clients and logged: one that is no machine name is not used.
    plugin.set_mode("external vdi-dora.example.com:3389 vdi-dora");
    let (dora, _) = redirect(broker, "dora").await;
    assert_eq!(
        (dora.machine_name.as_str(), reason(&dora)),
        ("vdi-dora", pb::RedirectReason::External)
    );
    plugin.set_mode("external vdi-erin.example.com:3389 vdi\u{7}erin");
    let (erin, _) = redirect(broker, "erin").await;
    assert_eq!(
        (erin.machine_name.as_str(), reason(&erin)),
        ("ts-a", pb::RedirectReason::LoadBalanced)
    );
    // An address to listen on, not to connect to, is not used either.
    plugin.set_mode("external 0.0.0.0:3389");
    let (gil, _) = redirect(broker, "gil").await;
    assert_eq!(reason(&gil), pb::RedirectReason::LoadBalanced);
    // Both of a decision's calls share the deadline: after GetUserExternalSession took all of
    // it, GetMostSuitableServer is not asked (the decision would wait twice the deadline).
    plugin.set_mode("hang");
    let (fay, took) = redirect(broker, "fay").await;
    assert_eq!(reason(&fay), pb::RedirectReason::LoadBalanced);
    assert!(
        took < DEADLINE + Duration::from_millis(900),
        "took {took:?}"
    );
    let asked_fay = |method: &str| {
        let calls = plugin.calls(method);
        calls.iter().filter(|call| call["user"] == "fay").count()
    };
    assert_eq!(asked_fay("GetUserExternalSession"), 1);
    assert_eq!(asked_fay("GetMostSuitableServer"), 0);
    // A decision that keeps the broker's pick is one fallback: erin's and gil's unusable
    // external sessions were none (the placement then asked the plug-in, which kept the pick), fay's
    // spent deadline one. The calls' outcomes say what the external-session calls did.
    let metrics = scrape(setup.metrics_port).await;
    // Every cause whose name starts so (all of them for "").
    let fallbacks = |cause: &str| {
        let cause = format!("cause=\"{cause}");
        counter(&metrics, &["tsbroker_plugin_fallbacks_total", &cause])
    };
    assert_eq!(
        (fallbacks(""), fallbacks("timeout")),
        (1.0, 1.0),
        "{metrics}"
    );
    let external_calls = |outcome: &str| {
        let outcome = format!("outcome=\"{outcome}\"");
        let method = "method=\"GetUserExternalSession\"";
        counter(&metrics, &["tsbroker_plugin_calls_total", method, &outcome])
    };
    assert_eq!(
        (external_calls("unusable"), external_calls("timeout")),
        (2.0, 1.0),
        "{metrics}"
    );
    setup.broker.stop().await;
}

/// The example plug-in, as an operator runs it: its policy (fewest active sessions) overrides
/// the broker's (fewest sessions); after it restarts in a quiet farm, the next decision it
/// refuses (FAILED_PRECONDITION: not initialized) makes the broker initialize and resync it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_of_a_logon_in_flight_does_not_ask_the_plugin_again() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = PluginProcess::start(dir.path(), free_port(), true, "1");
    let setup = broker_with_plugin(&plugin).await;
    let broker = &setup.broker;
    let _a = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await;
    let _b = FakeAgent::join(&broker.url(), description("ts-b", "farm", 100), vec![]).await;
    wait_for_call(&plugin, "MachineChangeNotification", |call| {
        call["machine_name"] == "ts-b" && call["state"] == "READY"
    })
    .await;
    plugin.set_mode("pick ts-b");
    let (first, _) = redirect(broker, "carol").await;
    assert_eq!(reason(&first), pb::RedirectReason::Plugin);
    let asked = |method| plugin.calls(method).len();
    let (suggestions, externals) = (
        asked("GetMostSuitableServer"),
        asked("GetUserExternalSession"),
    );
    assert_eq!((suggestions, externals), (1, 1));
    // The client comes back before its logon is reported: the same machine, nothing asked.
    let (retry, _) = redirect(broker, "carol").await;
    assert_eq!(reason(&retry), pb::RedirectReason::PendingLogon);
    assert_eq!(retry.machine_name, "ts-b");
    assert_eq!(
        (
            asked("GetMostSuitableServer"),
            asked("GetUserExternalSession")
        ),
        (1, 1)
    );
    setup.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_example_plugin_overrides_and_is_reinitialized_after_a_restart() {
    let port = free_port();
    let start_example = || {
        let mut command = Command::new(workspace_binary("tsbroker-plugin-example"));
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        ChildGuard::spawn("tsbroker-plugin-example", command)
    };
    let wait_listening = || async move {
        eventually(15, || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
    };
    let example = start_example();
    wait_listening().await;
    let address = format!("http://127.0.0.1:{port}");
    let (broker, _database) = broker_for_plugin_at(address, Duration::from_millis(300)).await;
    // The broker counts every session: ts-idle (12 disconnected) is busier than ts-busy (10
    // active). The example plug-in counts active sessions only, and prefers ts-idle.
    let idle = (1..=12)
        .map(|id| session(id, &format!("i{id}"), pb::SessionState::Disconnected))
        .collect();
    let busy = (1..=10)
        .map(|id| session(id, &format!("b{id}"), pb::SessionState::Active))
        .collect();
    let _agents = [
        FakeAgent::join(&broker.url(), description("ts-idle", "farm", 100), idle).await,
        FakeAgent::join(&broker.url(), description("ts-busy", "farm", 100), busy).await,
    ];
    let mut user = 0;
    let mut next_user = || {
        user += 1;
        format!("user{user}")
    };
    let plugin_decides = |answer: &pb::RedirectResponse| {
        reason(answer) == pb::RedirectReason::Plugin && answer.machine_name == "ts-idle"
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (answer, _) = redirect(&broker, &next_user()).await;
        if plugin_decides(&answer) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the example plug-in never took over: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Restart the plug-in while nothing happens in the farm.
    drop(example);
    let _example = start_example();
    wait_listening().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (answer, _) = redirect(&broker, &next_user()).await;
        if plugin_decides(&answer) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted plug-in was never initialized again: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.stop().await;
}

/// Two farms, two plug-ins: one takes 10 s to answer each notification. The other farm's
/// plug-in hears of its machine at once, and the slow one's farm still decides within the
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_plugin_delays_nobody_else() {
    let dir = tempfile::tempdir().unwrap();
    let slow =
        PluginProcess::start_with(dir.path(), free_port(), &["--slow-notifications"], "slow");
    let quick = PluginProcess::start_with(dir.path(), free_port(), &[], "quick");
    let database = TestDatabase::sqlite();
    let plugin = |process: &PluginProcess| farm_with_plugin(process.address(), DEADLINE, None);
    let (slow_farm, quick_farm) = (plugin(&slow), plugin(&quick));
    let broker = spawn_broker(&database.url, move |config| {
        config.heartbeat_timeout = Duration::from_secs(60);
        config.farms.farms.insert("slow".to_owned(), slow_farm);
        config.farms.farms.insert("quick".to_owned(), quick_farm);
    })
    .await;
    wait_for_call(&slow, "Initialize", |_| true).await;
    wait_for_call(&quick, "Initialize", |_| true).await;
    let _slow_agent =
        FakeAgent::join(&broker.url(), description("ts-slow", "slow", 100), vec![]).await;
    let joined = Instant::now();
    let _quick_agent =
        FakeAgent::join(&broker.url(), description("ts-quick", "quick", 100), vec![]).await;
    wait_for_call(&quick, "MachineChangeNotification", |call| {
        call["state"] == "READY"
    })
    .await;
    assert!(
        joined.elapsed() < Duration::from_secs(5),
        "the quick plug-in waited for the slow one: {:?}",
        joined.elapsed()
    );
    assert_eq!(
        slow.calls("MachineChangeNotification").len(),
        1,
        "the slow plug-in is still on its first notification"
    );
    let mut client = broker.broker_client().await;
    // A broker started on a store without machines holds new logons for its agents' resyncs
    // at first (a database lost and made again looks so): what is measured here comes after.
    tokio::time::sleep(tsbroker::store::reachability::SETTLE_AFTER_OUTAGE).await;
    let started = Instant::now();
    let answer = crate::support::redirect(&mut client, "slow", "u1")
        .await
        .unwrap();
    assert_eq!(answer.machine_name, "ts-slow");
    assert!(
        started.elapsed() < DEADLINE + Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    broker.stop().await;
}
