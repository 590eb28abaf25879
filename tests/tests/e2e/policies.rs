//! Load-balancing policies end to end, on both stores: resource thresholds, weighted
//! round-robin chosen at run time, slow start under a logon storm, user groups, and drain and
//! limits under every policy.

use crate::support::{by_name, on_both_stores, redirect};
use std::collections::HashMap;
use std::time::Duration;
use tonic::Code;
use tsbroker::decision::farm_settings::{FarmSettings, GroupRule};
use tsbroker_common::proto::v1 as pb;
use tsbroker_tests::fake_agent::{machine as description, session};
use tsbroker_tests::{FakeAgent, TestBroker, TestDatabase, spawn_broker};

on_both_stores!(
    resource_policy_keeps_logons_off_hot_machines,
    round_robin_set_at_run_time_follows_weights,
    slow_start_protects_a_fresh_machine_from_a_storm,
    groups_pin_users_to_their_machines,
    drain_and_limits_apply_under_every_policy,
);

async fn broker_with_farm(database: &TestDatabase, farm: FarmSettings) -> TestBroker {
    spawn_broker(&database.url, move |config| {
        config.heartbeat_timeout = Duration::from_secs(60);
        // These tests place many logons without confirming them.
        config.max_pending_logons_per_machine = 10_000;
        config.farms.farms.insert("farm".to_owned(), farm);
    })
    .await
}

async fn join(
    broker: &TestBroker,
    name: &str,
    weight: u32,
    sessions: Vec<pb::SessionInfo>,
) -> FakeAgent {
    FakeAgent::join(&broker.url(), description(name, "farm", weight), sessions).await
}

fn tally(names: impl IntoIterator<Item = String>) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for name in names {
        *counts.entry(name).or_default() += 1;
    }
    counts
}

async fn resource_policy_keeps_logons_off_hot_machines(database: &TestDatabase) {
    let farm = FarmSettings {
        policy: Some("resource".into()),
        cpu_threshold: 80.0,
        slow_start: Duration::ZERO,
        ..FarmSettings::default()
    };
    let broker = broker_with_farm(database, farm).await;
    let mut hot_cpu = join(&broker, "hot-cpu", 100, vec![]).await;
    let mut hot_memory = join(&broker, "hot-memory", 100, vec![]).await;
    let mut cool = join(
        &broker,
        "cool",
        100,
        (1..=30)
            .map(|id| session(id, &format!("s{id}"), pb::SessionState::Active))
            .collect(),
    )
    .await;
    hot_cpu.report_load(85.0, 10.0).await.unwrap();
    hot_memory.report_load(10.0, 95.0).await.unwrap();
    cool.report_load(40.0, 40.0).await.unwrap();
    let mut client = broker.broker_client().await;
    let farms = client
        .list_farms(pb::ListFarmsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        farms.farms[0].policy, "resource",
        "the configuration's policy is visible"
    );
    for user in 0..15 {
        let answer = redirect(&mut client, "farm", &format!("u{user}"))
            .await
            .unwrap();
        assert_eq!(
            answer.machine_name, "cool",
            "a machine past a threshold takes no logon while another has room"
        );
    }
    // The hot machine cools down: it takes logons again (it has far fewer sessions), once
    // placements see the report (at most SNAPSHOT_MAX_AGE later).
    hot_cpu.report_load(20.0, 10.0).await.unwrap();
    tokio::time::sleep(tsbroker::decision::SNAPSHOT_MAX_AGE + Duration::from_millis(50)).await;
    let answer = redirect(&mut client, "farm", "after-cooling")
        .await
        .unwrap();
    assert_eq!(answer.machine_name, "hot-cpu");
    broker.stop().await;
}

async fn round_robin_set_at_run_time_follows_weights(database: &TestDatabase) {
    let broker = broker_with_farm(
        database,
        FarmSettings {
            slow_start: Duration::ZERO,
            ..FarmSettings::default()
        },
    )
    .await;
    let _agents = [
        join(&broker, "heavy", 200, vec![]).await,
        join(
            &broker,
            "light-a",
            100,
            (1..=50)
                .map(|id| session(id, &format!("s{id}"), pb::SessionState::Active))
                .collect(),
        )
        .await,
        join(&broker, "light-b", 100, vec![]).await,
    ];
    let mut admin = broker.admin_client().await;
    let farm = admin
        .set_farm_policy(pb::SetFarmPolicyRequest {
            farm: "farm".into(),
            policy: "round-robin".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(farm.policy, "round-robin");
    let unknown = admin
        .set_farm_policy(pb::SetFarmPolicyRequest {
            farm: "farm".into(),
            policy: "fastest".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    let mut client = broker.broker_client().await;
    let mut names = Vec::new();
    for user in 0..400 {
        names.push(
            redirect(&mut client, "farm", &format!("u{user}"))
                .await
                .unwrap()
                .machine_name,
        );
    }
    let counts = tally(names);
    // Turns ignore load (light-a has 50 sessions already) and follow weights 2:1:1.
    assert_eq!(
        (counts["heavy"], counts["light-a"], counts["light-b"]),
        (200, 100, 100),
        "{counts:?}"
    );
    broker.stop().await;
}

/// Four machines that have been up for the whole slow-start period, then a fresh empty one joins
/// just before a storm of 1,000 logons (each confirmed by a LOGON on the chosen machine's
/// stream). Counted over the storm's first 100 logons: without slow start the empty machine
/// takes nearly all of them (it is 100 sessions behind); with it, at most half. (Over a long
/// storm it catches up either way: slow start delays, it does not starve.)
async fn slow_start_protects_a_fresh_machine_from_a_storm(database: &TestDatabase) {
    let fresh_share = |slow_start: Duration| {
        let url = database.url.clone();
        async move {
            let farm = FarmSettings {
                slow_start,
                ..FarmSettings::default()
            };
            let broker = spawn_broker(&url, move |config| {
                config.heartbeat_timeout = Duration::from_secs(60);
                // The share is the policy's, not the cap's: a LOGON frees its slot in the
                // placements' copy of the farm only at the copy's next refresh (100 ms), and a
                // fast storm would otherwise fill the default 20 slots before it.
                config.max_pending_logons_per_machine = 1_000;
                config.farms.farms.insert("farm".to_owned(), farm);
            })
            .await;
            let mut agents = HashMap::new();
            for index in 0..4 {
                let name = format!("old{index}-{}", slow_start.as_millis());
                let sessions = (1..=100)
                    .map(|id| session(id, &format!("{name}-s{id}"), pb::SessionState::Active))
                    .collect();
                agents.insert(name.clone(), join(&broker, &name, 100, sessions).await);
            }
            tokio::time::sleep(slow_start).await;
            let fresh = format!("fresh-{}", slow_start.as_millis());
            agents.insert(fresh.clone(), join(&broker, &fresh, 100, vec![]).await);
            let mut client = broker.broker_client().await;
            let mut names = Vec::new();
            for user in 0..1000u32 {
                if user == 100 {
                    // Only the first 100 are counted; the rest of the storm must still succeed.
                    names.push(String::new());
                }
                let user_name = format!("storm{}-{user}", slow_start.as_millis());
                let answer = redirect(&mut client, "farm", &user_name)
                    .await
                    .expect("no errors in the storm");
                let agent = agents
                    .get_mut(&answer.machine_name)
                    .expect("a farm machine");
                agent.logon(1000 + user, &user_name).await.unwrap();
                names.push(answer.machine_name);
            }
            let counts = tally(names.into_iter().take(100));
            broker.stop().await;
            counts.get(&fresh).copied().unwrap_or(0)
        }
    };
    let without = fresh_share(Duration::ZERO).await;
    let with = fresh_share(Duration::from_secs(10)).await;
    assert!(
        without >= 90,
        "without slow start the empty machine takes nearly all of the first 100: {without}"
    );
    assert!(
        with > 0 && with <= 50,
        "with slow start it takes at most half of the first 100: {with}"
    );
}

async fn groups_pin_users_to_their_machines(database: &TestDatabase) {
    let farm = FarmSettings {
        slow_start: Duration::ZERO,
        groups: vec![
            GroupRule {
                name: "finance".into(),
                users: vec!["alice".into()],
                patterns: vec!["fin-*".into()],
                machines: vec!["ts-fin".into()],
                fallback: false,
            },
            GroupRule {
                name: "labs".into(),
                users: vec![],
                patterns: vec!["lab?".into()],
                machines: vec!["ts-lab".into()],
                fallback: true,
            },
        ],
        ..FarmSettings::default()
    };
    let broker = broker_with_farm(database, farm).await;
    let busy: Vec<_> = (1..=40)
        .map(|id| session(id, &format!("s{id}"), pb::SessionState::Active))
        .collect();
    let _agents = [
        join(&broker, "ts-fin", 100, busy.clone()).await,
        join(&broker, "ts-lab", 100, busy).await,
        join(&broker, "ts-other", 100, vec![]).await,
    ];
    let mut client = broker.broker_client().await;
    for user in ["Alice", "fin-bob", "fin-carol"] {
        assert_eq!(
            redirect(&mut client, "farm", user)
                .await
                .unwrap()
                .machine_name,
            "ts-fin",
            "{user}"
        );
    }
    for user in ["lab1", "lab2"] {
        assert_eq!(
            redirect(&mut client, "farm", user)
                .await
                .unwrap()
                .machine_name,
            "ts-lab",
            "{user}"
        );
    }
    assert_eq!(
        redirect(&mut client, "farm", "dave")
            .await
            .unwrap()
            .machine_name,
        "ts-other",
        "no group: the policy"
    );
    let mut admin = broker.admin_client().await;
    admin
        .drain_machine(by_name("farm", "ts-fin"))
        .await
        .unwrap();
    admin
        .drain_machine(by_name("farm", "ts-lab"))
        .await
        .unwrap();
    let refused = redirect(&mut client, "farm", "fin-erin").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("finance"), "{refused:?}");
    assert_eq!(
        redirect(&mut client, "farm", "lab3")
            .await
            .unwrap()
            .machine_name,
        "ts-other",
        "fallback"
    );
    broker.stop().await;
}

async fn drain_and_limits_apply_under_every_policy(database: &TestDatabase) {
    let broker = broker_with_farm(
        database,
        FarmSettings {
            slow_start: Duration::ZERO,
            ..FarmSettings::default()
        },
    )
    .await;
    let _drained = join(&broker, "drained", 1000, vec![]).await;
    let _full = FakeAgent::join(
        &broker.url(),
        pb::MachineDescription {
            session_limit: 2,
            ..description("full", "farm", 1000)
        },
        vec![
            session(1, "a", pb::SessionState::Active),
            session(2, "b", pb::SessionState::Active),
        ],
    )
    .await;
    let _single = FakeAgent::join(
        &broker.url(),
        pb::MachineDescription {
            single_session: true,
            ..description("single", "farm", 1000)
        },
        vec![session(1, "c", pb::SessionState::Active)],
    )
    .await;
    let _open = join(
        &broker,
        "open",
        1,
        (1..=60)
            .map(|id| session(id, &format!("s{id}"), pb::SessionState::Active))
            .collect(),
    )
    .await;
    let mut admin = broker.admin_client().await;
    admin
        .drain_machine(by_name("farm", "drained"))
        .await
        .unwrap();
    let mut client = broker.broker_client().await;
    for policy in ["session-count", "resource", "round-robin"] {
        admin
            .set_farm_policy(pb::SetFarmPolicyRequest {
                farm: "farm".into(),
                policy: policy.into(),
            })
            .await
            .unwrap();
        for user in 0..5 {
            let answer = redirect(&mut client, "farm", &format!("{policy}-{user}"))
                .await
                .unwrap();
            assert_eq!(
                answer.machine_name, "open",
                "{policy}: only the open machine can take logons"
            );
        }
    }
    broker.stop().await;
}
