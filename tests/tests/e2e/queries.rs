//! What operators do by hand, over real gRPC: paging through `ListSessions`, naming a machine
//! to `Admin` and `GetMachine` (and contradictory admin requests), and the `Admin` service's
//! loopback rule on a dual-stack listener; and messages far larger than the buffers a call
//! starts with, both ways.

use crate::support::on_both_stores;
use std::collections::BTreeSet;
use tonic::Code;
use tonic::transport::Endpoint;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::admin_client::AdminClient;
use tsbroker_tests::fake_agent::{machine as description, session};
use tsbroker_tests::{Backend, FakeAgent, TestDatabase, spawn_broker, spawn_broker_at};

on_both_stores!(
    every_session_comes_once_and_the_last_page_says_so,
    messages_far_larger_than_a_call_buffer_arrive_whole,
    a_machine_named_two_ways_must_be_one_machine,
    a_page_stays_under_what_clients_accept,
    a_user_principal_name_lists_its_user_parts_sessions_when_it_has_none,
);

/// `GetMachine` by id alone.
async fn machine_by_id(
    client: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
    id: &str,
) -> pb::Machine {
    client
        .get_machine(pb::GetMachineRequest {
            machine: Some(pb::MachineRef {
                machine_id: id.to_owned(),
                ..Default::default()
            }),
        })
        .await
        .expect("GetMachine by id")
        .into_inner()
}

/// A call's buffers start at 1 KiB (common/src/codec.rs) and grow: a RESYNC of 3,000 sessions
/// from the agent (~105 KiB) and a page of them back to an operator (over 100 KiB) come whole.
async fn messages_far_larger_than_a_call_buffer_arrive_whole(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let users: BTreeSet<String> = (1..=3000)
        .map(|id| format!("user-{id:05}-of-a-big-farm"))
        .collect();
    let sessions = users
        .iter()
        .zip(1u32..)
        .map(|(user, id)| session(id, user, pb::SessionState::Active))
        .collect();
    let _agent = FakeAgent::join(
        &broker.url(),
        description("ts-big", "farm-big", 100),
        sessions,
    )
    .await;
    let page = client
        .list_sessions(pb::ListSessionsRequest {
            farm: "farm-big".into(),
            page_size: 10_000,
            ..Default::default()
        })
        .await
        .expect("ListSessions")
        .into_inner();
    assert!(
        prost::Message::encoded_len(&page) > 100 * 1024,
        "{} bytes",
        prost::Message::encoded_len(&page)
    );
    assert!(page.next_page_token.is_empty());
    let listed: BTreeSet<String> = page.sessions.into_iter().map(|s| s.user_name).collect();
    assert_eq!(listed, users);
    broker.stop().await;
}

async fn every_session_comes_once_and_the_last_page_says_so(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let sessions = |machine: &str| -> Vec<pb::SessionInfo> {
        (1..=6)
            .map(|id| session(id, &format!("{machine}-user{id}"), pb::SessionState::Active))
            .collect()
    };
    let _a = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm-p", 100),
        sessions("a"),
    )
    .await;
    let _b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm-p", 100),
        sessions("b"),
    )
    .await;
    for page_size in [1u32, 4, 5, 12, 13] {
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = client
                .list_sessions(pb::ListSessionsRequest {
                    farm: "farm-p".into(),
                    page_size,
                    page_token: token.clone(),
                    ..Default::default()
                })
                .await
                .expect("ListSessions")
                .into_inner();
            pages += 1;
            assert!(pages <= 12, "page size {page_size}: pages without end");
            seen.extend(
                page.sessions
                    .iter()
                    .map(|session| (session.machine_id.clone(), session.session_id)),
            );
            if page.next_page_token.is_empty() {
                break;
            }
            assert_eq!(
                page.sessions.len(),
                page_size as usize,
                "a page before the last"
            );
            // A token is for the filters it was listed with.
            let elsewhere = pb::ListSessionsRequest {
                user_name: "someone".into(),
                page_token: page.next_page_token.clone(),
                ..Default::default()
            };
            let refused = client.list_sessions(elsewhere).await.unwrap_err();
            assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
            assert!(refused.message().contains("page_token"), "{refused:?}");
            token = page.next_page_token;
        }
        // Twelve sessions: a last page that is full comes without a token (no empty page after).
        assert_eq!(pages, 12u32.div_ceil(page_size), "page size {page_size}");
        let distinct: BTreeSet<_> = seen.iter().cloned().collect();
        assert_eq!(seen.len(), 12, "page size {page_size}: {seen:?}");
        assert_eq!(distinct.len(), 12, "page size {page_size}: {seen:?}");
    }

    // By machine name (any case), as operators know their machines.
    let by_name = |farm: &str, name: &str| pb::ListSessionsRequest {
        farm: farm.into(),
        machine_name: name.into(),
        ..Default::default()
    };
    let on_b = client
        .list_sessions(by_name("farm-p", "TS-B"))
        .await
        .expect("ListSessions by machine name")
        .into_inner();
    assert_eq!(on_b.sessions.len(), 6);
    assert!(on_b.sessions.iter().all(|s| s.machine_name == "ts-b"));
    let unknown = client
        .list_sessions(by_name("farm-p", "ts-z"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let no_farm = client.list_sessions(by_name("", "ts-b")).await.unwrap_err();
    assert_eq!(no_farm.code(), Code::InvalidArgument, "{no_farm:?}");
    assert!(no_farm.message().contains("machine_name"), "{no_farm:?}");
    let contradiction = pb::ListSessionsRequest {
        machine_id: on_b.sessions[0].machine_id.clone(),
        ..by_name("farm-p", "ts-a")
    };
    let refused = client.list_sessions(contradiction).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");

    // A farm or machine the broker does not know is NOT_FOUND, not an empty list; a known one
    // with nothing to list is an empty list.
    let farm = |farm: &str| pb::ListSessionsRequest {
        farm: farm.into(),
        ..Default::default()
    };
    let typo = client.list_sessions(farm("farm-q")).await.unwrap_err();
    assert_eq!(typo.code(), Code::NotFound, "{typo:?}");
    assert!(typo.message().contains("farm-q"), "{typo:?}");
    let machines = pb::ListMachinesRequest {
        farm: "farm-q".into(),
    };
    let typo = client.list_machines(machines).await.unwrap_err();
    assert_eq!(typo.code(), Code::NotFound, "{typo:?}");
    let no_such_machine = pb::ListSessionsRequest {
        machine_id: uuid::Uuid::new_v4().to_string(),
        ..Default::default()
    };
    let typo = client.list_sessions(no_such_machine).await.unwrap_err();
    assert_eq!(typo.code(), Code::NotFound, "{typo:?}");
    let nobody = pb::ListSessionsRequest {
        user_name: "nobody".into(),
        ..farm("farm-p")
    };
    let listed = client.list_sessions(nobody).await.unwrap().into_inner();
    assert!(listed.sessions.is_empty());
}

/// `alice@corp.example` is listed as `Redirect` takes it: that name's sessions, or when it has
/// none, `alice`'s (how PAM reports the Linux logon), page after page.
async fn a_user_principal_name_lists_its_user_parts_sessions_when_it_has_none(
    database: &TestDatabase,
) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let sessions = vec![
        session(1, "alice", pb::SessionState::Active),
        session(2, "Alice", pb::SessionState::Disconnected),
        session(3, "bob@corp.example", pb::SessionState::Active),
        session(4, "bob", pb::SessionState::Active),
        pb::SessionInfo {
            domain: "OTHER".into(),
            ..session(5, "erin@corp.example", pb::SessionState::Active)
        },
        session(6, "erin", pb::SessionState::Active),
    ];
    let _agent = FakeAgent::join(&broker.url(), description("ts-u", "farm-u", 100), sessions).await;
    let mut list = async |user: &str, farm: &str, page_size: u32, token: String| {
        client
            .list_sessions(pb::ListSessionsRequest {
                user_name: user.into(),
                farm: farm.into(),
                page_size,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("ListSessions")
            .into_inner()
    };
    let ids = |page: &pb::ListSessionsResponse| -> Vec<u32> {
        page.sessions
            .iter()
            .map(|session| session.session_id)
            .collect()
    };
    // None of its own: the user part's, also one page at a time.
    let first = list("Alice@Corp.Example", "", 1, String::new()).await;
    assert_eq!(ids(&first), [1]);
    assert!(!first.next_page_token.is_empty());
    let second = list("Alice@Corp.Example", "", 1, first.next_page_token).await;
    assert_eq!(ids(&second), [2]);
    assert!(second.next_page_token.is_empty());
    assert_eq!(
        ids(&list("alice@corp.example", "farm-u", 0, String::new()).await),
        [1, 2]
    );
    // Sessions of its own: only those.
    assert_eq!(
        ids(&list("bob@corp.example", "", 0, String::new()).await),
        [3]
    );
    // With a domain, none of its own of that domain: the user part's.
    assert_eq!(
        ids(&list("CORP\\erin@corp.example", "", 0, String::new()).await),
        [6]
    );
    assert_eq!(
        ids(&list("OTHER\\erin@corp.example", "", 0, String::new()).await),
        [5]
    );
    // Neither has any.
    assert!(
        list("carol@corp.example", "", 0, String::new())
            .await
            .sessions
            .is_empty()
    );
    broker.stop().await;
}

async fn a_machine_named_two_ways_must_be_one_machine(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let mut admin = broker.admin_client().await;
    let a = FakeAgent::join(&broker.url(), description("ts-a", "farm-r", 100), vec![]).await;
    let b = FakeAgent::join(&broker.url(), description("ts-b", "farm-r", 100), vec![]).await;
    let reference = |id: &str, farm: &str, name: &str| pb::MachineRef {
        machine_id: id.to_owned(),
        farm: farm.to_owned(),
        machine_name: name.to_owned(),
    };

    // a's id with b's name, or with another farm: refused, and nothing is drained.
    for wrong in [
        reference(&a.machine_id, "farm-r", "ts-b"),
        reference(&a.machine_id, "farm-x", "ts-a"),
        reference(&a.machine_id, "", "ts-b"),
    ] {
        let refused = admin.drain_machine(wrong.clone()).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{wrong:?}: {refused:?}"
        );
        assert!(refused.message().contains("ts-a"), "{refused:?}");
    }
    let refused = client
        .get_machine(pb::GetMachineRequest {
            machine: Some(reference(&b.machine_id, "farm-r", "ts-a")),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    for machine in [&a, &b] {
        let listed = machine_by_id(&mut client, &machine.machine_id).await;
        assert!(!listed.draining, "{listed:?}");
    }

    // The id with its own farm and name (in any case): the machine it names.
    let drained = admin
        .drain_machine(reference(&a.machine_id, "farm-r", "TS-A"))
        .await
        .expect("DrainMachine")
        .into_inner();
    assert_eq!(drained.id, a.machine_id);
    assert!(drained.draining);

    // A session limit and "clear" at once contradict each other: refused, nothing set.
    let refused = admin
        .set_session_limit(pb::SetSessionLimitRequest {
            machine: Some(reference(&b.machine_id, "", "")),
            session_limit: 5,
            clear: true,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let unchanged = machine_by_id(&mut client, &b.machine_id).await;
    assert_eq!(unchanged.session_limit, 0, "{unchanged:?}");

    // ListSessions names a machine the same ways, its errors naming its own fields.
    let sessions = |id: &str, farm: &str, name: &str| pb::ListSessionsRequest {
        machine_id: id.to_owned(),
        farm: farm.to_owned(),
        machine_name: name.to_owned(),
        ..Default::default()
    };
    let listed = client
        .list_sessions(sessions(&a.machine_id, "", "TS-A"))
        .await
        .expect("ListSessions by id and name");
    assert!(listed.into_inner().sessions.is_empty());
    for (wrong, field) in [
        (sessions(&a.machine_id, "farm-x", ""), "machine_id"),
        (sessions(&a.machine_id, "", "ts-b"), "machine_id"),
        (sessions("", "", "ts-a"), "machine_name: give farm"),
        (sessions("", "farm-r", "ts\u{1}"), "machine_name: contains"),
    ] {
        let refused = client.list_sessions(wrong.clone()).await.unwrap_err();
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{wrong:?}: {refused:?}"
        );
        assert!(refused.message().starts_with(field), "{refused:?}");
    }
    let elsewhere = client
        .list_sessions(sessions(&a.machine_id, "farm-x", ""))
        .await
        .unwrap_err();
    assert!(elsewhere.message().contains("farm-r"), "{elsewhere:?}");
}

/// A page of 10,000 sessions with long names and domains (~6 MB) would be more than gRPC
/// clients take by default (4 MiB, as this test's client): the page ends early, with a token,
/// and the pages hold every session once.
async fn a_page_stays_under_what_clients_accept(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let mut agents = Vec::new();
    for machine in ["ts-a", "ts-b", "ts-c"] {
        let sessions = (1..=3000u32)
            .map(|id| pb::SessionInfo {
                domain: "d".repeat(250),
                ..session(
                    id,
                    &format!("{machine}-{id:05}-{}", "u".repeat(230)),
                    pb::SessionState::Active,
                )
            })
            .collect();
        agents.push(
            FakeAgent::join(&broker.url(), description(machine, "farm-l", 100), sessions).await,
        );
    }
    let mut seen = BTreeSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = client
            .list_sessions(pb::ListSessionsRequest {
                farm: "farm-l".into(),
                page_size: 10_000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("ListSessions")
            .into_inner();
        pages += 1;
        assert!(prost::Message::encoded_len(&page) < 4 << 20);
        for listed in page.sessions {
            assert!(seen.insert(listed.user_name.clone()), "twice: {listed:?}");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 9000);
    assert!(pages >= 2, "{pages} pages");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_answers_ipv4_loopback_through_a_dual_stack_listener() {
    let database = TestDatabase::new(Backend::Sqlite).await;
    let broker = spawn_broker_at(&database.url, "[::]:0".parse().unwrap(), |_| {}).await;
    let channel = Endpoint::from_shared(format!("http://127.0.0.1:{}", broker.address.port()))
        .unwrap()
        .connect()
        .await
        .expect("connect over IPv4");
    // The guard lets the call through (the peer is ::ffff:127.0.0.1); the machine is unknown.
    let answer = AdminClient::new(channel)
        .drain_machine(pb::MachineRef {
            machine_id: uuid::Uuid::nil().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(answer.code(), Code::NotFound, "{answer:?}");
}

/// A machine whose lease ran out is UNREACHABLE to operators too, as it is to decisions, even
/// when no broker marked it (its stream's replica died, or, here, gives it longer): two replicas
/// on one database, the agent on the one with a long heartbeat timeout, silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_whose_lease_ran_out_is_shown_unreachable() {
    use std::time::Duration;
    let database = TestDatabase::postgres().await;
    let patient = spawn_broker(&database.url, |config| {
        config.heartbeat_timeout = Duration::from_secs(60);
    })
    .await;
    let strict = spawn_broker(&database.url, |config| {
        config.heartbeat_timeout = Duration::from_secs(2);
    })
    .await;
    let agent = FakeAgent::join(&patient.url(), description("ts-l", "farm-l", 100), vec![]).await;
    let state_on = |broker: &tsbroker_tests::TestBroker| {
        let url = broker.url();
        let id = agent.machine_id.clone();
        async move {
            let channel = Endpoint::from_shared(url).unwrap().connect().await.unwrap();
            let mut client = pb::broker_client::BrokerClient::new(channel);
            let machine = machine_by_id(&mut client, &id).await;
            let listed = client
                .list_machines(pb::ListMachinesRequest {
                    farm: "farm-l".into(),
                })
                .await
                .expect("ListMachines")
                .into_inner();
            let farms = client
                .list_farms(pb::ListFarmsRequest {})
                .await
                .expect("ListFarms")
                .into_inner();
            let farm = farms.farms.iter().find(|farm| farm.name == "farm-l");
            (
                machine.state,
                listed.machines[0].state,
                farm.expect("farm-l").ready_machine_count,
            )
        }
    };
    let ready = pb::MachineState::Ready as i32;
    let unreachable = pb::MachineState::Unreachable as i32;
    assert_eq!(state_on(&strict).await, (ready, ready, 1));
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(state_on(&strict).await, (unreachable, unreachable, 0));
    assert_eq!(state_on(&patient).await, (ready, ready, 1));
    strict.stop().await;
    patient.stop().await;
    database.drop_database().await;
}
