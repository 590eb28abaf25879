//! The agent stream and the redirect decision end to end, over real gRPC, on both stores.

use crate::support::{by_name, eventually, machine, on_both_stores, reason, redirect};
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::agent_message::Body;
use tsbroker_common::proto::v1::broker_message::Body as Reply;
use tsbroker_tests::fake_agent::{machine as description, session};
use tsbroker_tests::{FakeAgent, TestDatabase, spawn_broker};

on_both_stores!(
    joining_machines_resync_and_users_return_to_their_session,
    drained_machines_take_reconnections_but_no_new_logons,
    unreachable_machines_get_nobody_and_keep_their_sessions,
    silent_agents_time_out,
    an_agent_that_closed_its_stream_counts_as_heard_from_then,
    a_machine_back_within_a_minute_keeps_its_ready_since,
    a_broker_restart_keeps_every_session,
    protocol_violations_get_precise_answers,
    removal_by_the_agent_and_by_an_admin,
    full_and_empty_farms_say_why,
    machines_front_doors_could_not_reach_get_no_new_logons_for_a_while,
);

async fn joining_machines_resync_and_users_return_to_their_session(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let _a = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await;
    let mut b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        vec![
            session(1, "alice", pb::SessionState::Disconnected),
            session(2, "bob", pb::SessionState::Active),
        ],
    )
    .await;
    let listed = client
        .list_machines(pb::ListMachinesRequest {
            farm: "farm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.machines.len(), 2);
    assert!(
        listed
            .machines
            .iter()
            .all(|machine| machine.state == pb::MachineState::Ready as i32)
    );

    let alice = redirect(&mut client, "farm", "Alice").await.unwrap();
    assert_eq!(
        (alice.machine_name.as_str(), reason(&alice)),
        ("ts-b", pb::RedirectReason::ExistingSession)
    );
    assert_eq!((alice.session_id, alice.address.as_str()), (1, "ts-b:3389"));

    // A new user goes to the emptier machine; asking again is the pending logon.
    let carol = redirect(&mut client, "farm", "carol").await.unwrap();
    assert_eq!(
        (carol.machine_name.as_str(), reason(&carol)),
        ("ts-a", pb::RedirectReason::LoadBalanced)
    );
    let carol_again = redirect(&mut client, "farm", "CAROL").await.unwrap();
    assert_eq!(
        (carol_again.machine_name.as_str(), reason(&carol_again)),
        ("ts-a", pb::RedirectReason::PendingLogon)
    );

    // Events change the directory: bob disconnects and logs off; alice logs off.
    b.disconnect(2, "bob").await.unwrap();
    let sessions = client
        .list_sessions(pb::ListSessionsRequest {
            user_name: "bob".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        sessions.sessions[0].state,
        pb::SessionState::Disconnected as i32
    );
    b.logoff(1, "alice").await.unwrap();
    let alice = redirect(&mut client, "farm", "alice").await.unwrap();
    assert_eq!(reason(&alice), pb::RedirectReason::LoadBalanced);
    broker.stop().await;
}

async fn drained_machines_take_reconnections_but_no_new_logons(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let mut admin = broker.admin_client().await;
    let _a = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm", 100),
        vec![session(1, "x", pb::SessionState::Active)],
    )
    .await;
    let mut b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        vec![session(1, "alice", pb::SessionState::Disconnected)],
    )
    .await;
    let drained = admin
        .drain_machine(by_name("farm", "ts-b"))
        .await
        .unwrap()
        .into_inner();
    assert!(drained.draining);
    let command = b
        .next_command(Duration::from_secs(5))
        .await
        .expect("agent told of the drain");
    assert!(
        matches!(
            command.body,
            Some(Reply::Settings(pb::MachineSettings { draining: true, .. }))
        ),
        "{command:?}"
    );
    for user in 0..10 {
        let answer = redirect(&mut client, "farm", &format!("new{user}"))
            .await
            .unwrap();
        assert_eq!(
            answer.machine_name, "ts-a",
            "no new logon on a draining machine"
        );
    }
    let alice = redirect(&mut client, "farm", "alice").await.unwrap();
    assert_eq!(
        (alice.machine_name.as_str(), reason(&alice)),
        ("ts-b", pb::RedirectReason::ExistingSession)
    );
    admin
        .undrain_machine(by_name("farm", "ts-b"))
        .await
        .unwrap();
    let new = redirect(&mut client, "farm", "after-undrain")
        .await
        .unwrap();
    assert_eq!(
        new.machine_name, "ts-b",
        "ts-b is the emptier machine again"
    );
    let weighted = admin
        .set_machine_weight(pb::SetMachineWeightRequest {
            machine: Some(by_name("farm", "ts-b")),
            weight: 300,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(weighted.weight_overridden && weighted.weight == 300);
    let bad = admin
        .set_machine_weight(pb::SetMachineWeightRequest {
            machine: Some(by_name("farm", "ts-b")),
            weight: 10_001,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    broker.stop().await;
}

async fn unreachable_machines_get_nobody_and_keep_their_sessions(database: &TestDatabase) {
    // Long enough for the steps between ts-b's last message and the checks that it is still
    // taken back, on a loaded machine; short enough to wait out below.
    let broker = spawn_broker(&database.url, |config| {
        config.heartbeat_timeout = Duration::from_secs(6)
    })
    .await;
    let mut client = broker.broker_client().await;
    let a_heartbeats = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm", 100),
        vec![session(1, "x", pb::SessionState::Active)],
    )
    .await
    .keep_reporting();
    let mut b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        vec![
            session(1, "alice", pb::SessionState::Disconnected),
            session(2, "ann", pb::SessionState::Disconnected),
        ],
    )
    .await;
    // A logon in flight to ts-b (ts-a left out by the caller).
    let ts_a = machine(&mut client, "farm", "ts-a").await.id;
    let in_flight = redirect_without(&mut client, "inflight", ts_a).await;
    assert_eq!(in_flight.machine_name, "ts-b");
    // Its last message: the heartbeat timeout runs from here.
    b.heartbeat().await.unwrap();
    b.hang_up();
    eventually(10, || {
        let mut client = client.clone();
        async move {
            machine(&mut client, "farm", "ts-b").await.state == pb::MachineState::Unreachable as i32
        }
    })
    .await;
    // The logon in flight stays with ts-b: a retry (through any replica) is not placed twice.
    let retry = redirect(&mut client, "farm", "inflight").await.unwrap();
    assert_eq!(
        (retry.machine_name.as_str(), reason(&retry)),
        ("ts-b", pb::RedirectReason::PendingLogon)
    );
    // Its stream ended, but its server may well be serving (an agent restarted, a replica or
    // a proxy gone): for the heartbeat timeout after its last message, its users are sent
    // back to it; new logons are not.
    let alice = redirect(&mut client, "farm", "alice").await.unwrap();
    assert_eq!(
        (alice.machine_name.as_str(), reason(&alice)),
        ("ts-b", pb::RedirectReason::ExistingSession)
    );
    // (ts-a, left out by a caller above, is avoided by new logons unless nothing else can
    // take them: wait until the placements' copy of the farm has ts-b's new state, at most a
    // second after it changed, or the copy would still offer ts-b.)
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let newcomer = redirect(&mut client, "farm", "newcomer").await.unwrap();
    assert_eq!(newcomer.machine_name, "ts-a");
    // Past the timeout, the machine looks gone: its users are placed elsewhere.
    eventually(10, || {
        let mut client = client.clone();
        async move {
            redirect(&mut client, "farm", "alice")
                .await
                .is_ok_and(|alice| alice.machine_name == "ts-a")
        }
    })
    .await;
    // Placed from the database under the user the `user@domain` name resolves to, so a retry
    // under PAM's form of the name finds that logon in flight.
    let upn = redirect(&mut client, "farm", "ann@example.com")
        .await
        .unwrap();
    let ann = redirect(&mut client, "farm", "ann").await.unwrap();
    assert_eq!(
        (
            upn.machine_name.as_str(),
            ann.machine_name.as_str(),
            reason(&ann)
        ),
        ("ts-a", "ts-a", pb::RedirectReason::PendingLogon)
    );
    for user in 0..5 {
        assert_eq!(
            redirect(&mut client, "farm", &format!("n{user}"))
                .await
                .unwrap()
                .machine_name,
            "ts-a"
        );
    }
    let kept = client
        .list_sessions(pb::ListSessionsRequest {
            user_name: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        kept.sessions.len(),
        1,
        "sessions of an unreachable machine are kept"
    );
    // The agent comes back and resyncs: alice's session counts again.
    let _b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        vec![
            session(1, "alice", pb::SessionState::Disconnected),
            session(2, "late", pb::SessionState::Active),
        ],
    )
    .await;
    // alice was just sent to ts-a as a pending logon; her old session on ts-b wins now.
    let alice = redirect(&mut client, "farm", "alice").await.unwrap();
    assert_eq!(
        (alice.machine_name.as_str(), reason(&alice)),
        ("ts-b", pb::RedirectReason::ExistingSession)
    );
    a_heartbeats.abort();
    broker.stop().await;
}

/// A stopping agent closes its stream itself: it was alive then, and its users are sent back
/// to it for a whole heartbeat timeout from that moment, not from its last report.
async fn an_agent_that_closed_its_stream_counts_as_heard_from_then(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |config| {
        config.heartbeat_timeout = Duration::from_secs(5)
    })
    .await;
    let mut client = broker.broker_client().await;
    let a_heartbeats = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![])
        .await
        .keep_reporting();
    let b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        vec![session(1, "alice", pb::SessionState::Disconnected)],
    )
    .await;
    let ready_at = tokio::time::Instant::now();
    // Its last report is its READY; it stops 3 s later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    b.close().await;
    // Past the timeout since its last report, within it since it closed its stream.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(ready_at.elapsed())).await;
    let alice = redirect(&mut client, "farm", "alice").await.unwrap();
    assert_eq!(
        (alice.machine_name.as_str(), reason(&alice)),
        ("ts-b", pb::RedirectReason::ExistingSession)
    );
    a_heartbeats.abort();
    broker.stop().await;
}

/// Slow start is for a machine that (re)joins a serving farm; one whose agent reconnects
/// (another replica, a restart) keeps its place.
async fn a_machine_back_within_a_minute_keeps_its_ready_since(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let first = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await;
    let ready_since = machine(&mut client, "farm", "ts-a").await.ready_since;
    assert!(ready_since.is_some());
    tokio::time::sleep(Duration::from_millis(200)).await;
    first.close().await;
    let again = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await;
    let back = machine(&mut client, "farm", "ts-a").await;
    assert_eq!(back.state, pb::MachineState::Ready as i32);
    assert_eq!(back.ready_since, ready_since);
    // A machine that left the farm (REMOVED) and joins again starts over.
    again.remove().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _rejoined = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await;
    let rejoined = machine(&mut client, "farm", "ts-a").await;
    let when = |at: &pb::Machine| at.ready_since.as_ref().map(|at| (at.seconds, at.nanos));
    assert!(when(&rejoined) > when(&back), "{rejoined:?}");
    broker.stop().await;
}

async fn silent_agents_time_out(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |config| {
        config.heartbeat_timeout = Duration::from_millis(800)
    })
    .await;
    let mut client = broker.broker_client().await;
    let mut agent = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), vec![]).await;
    assert_eq!(agent.welcome.heartbeat_timeout_ms, 800);
    assert!(agent.welcome.heartbeat_interval_ms < 800);
    let status = agent
        .wait_closed(Duration::from_secs(10))
        .await
        .expect("ended with a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        machine(&mut client, "farm", "ts-a").await.state,
        pb::MachineState::Unreachable as i32
    );
    let none = redirect(&mut client, "farm", "u").await.unwrap_err();
    assert_eq!(none.code(), Code::Unavailable, "{none:?}");

    // An operator changing a silent machine's settings more often than the timeout does not
    // keep its stream alive: the timeout runs from the agent's last message.
    let mut silent = FakeAgent::join(&broker.url(), description("ts-b", "farm", 100), vec![]).await;
    let mut admin = broker.admin_client().await;
    let toggling = tokio::spawn(async move {
        for _ in 0..25 {
            let _ = admin.drain_machine(by_name("farm", "ts-b")).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = admin.undrain_machine(by_name("farm", "ts-b")).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = tokio::time::Instant::now();
    let status = silent
        .wait_closed(Duration::from_secs(10))
        .await
        .expect("ended with a status");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed {:?} after joining, settings changing every 100 ms",
        started.elapsed()
    );
    toggling.abort();
    broker.stop().await;
}

async fn a_broker_restart_keeps_every_session(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let sessions: Vec<_> = (1..=20)
        .map(|id| session(id, &format!("user{id}"), pb::SessionState::Disconnected))
        .collect();
    let mut agent = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm", 100),
        sessions.clone(),
    )
    .await;
    agent.logon(21, "user21").await.unwrap();
    broker.stop().await;
    let command = agent.next_command(Duration::from_secs(5)).await;
    assert!(
        matches!(
            command,
            Some(pb::BrokerMessage {
                body: Some(Reply::Shutdown(pb::Shutdown { removed: false, .. }))
            })
        ),
        "agents are told the broker is going: {command:?}"
    );

    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let listed = client
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.sessions.len(),
        21,
        "every session survives the restart"
    );
    // Until the agent is back, its machine is unreachable.
    assert_eq!(
        machine(&mut client, "farm", "ts-a").await.state,
        pb::MachineState::Unreachable as i32
    );
    let _agent = FakeAgent::join(&broker.url(), description("ts-a", "farm", 100), sessions).await;
    let back = redirect(&mut client, "farm", "user7").await.unwrap();
    assert_eq!(
        (back.machine_name.as_str(), reason(&back)),
        ("ts-a", pb::RedirectReason::ExistingSession)
    );
    let listed = client
        .list_sessions(pb::ListSessionsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.sessions.len(),
        20,
        "the resync is the truth: user21 logged off meanwhile"
    );
    broker.stop().await;
}

async fn protocol_violations_get_precise_answers(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    // An invalid description ends the stream with INVALID_ARGUMENT.
    let bad = FakeAgent::connect(
        &broker.url(),
        pb::MachineDescription {
            address: "nowhere".into(),
            ..description("x", "farm", 100)
        },
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("address"), "{bad:?}");

    let mut agent = FakeAgent::connect(&broker.url(), description("ts-a", "farm", 100))
        .await
        .unwrap();
    // READY before RESYNC is refused, the stream goes on.
    let early = agent.ready().await.unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition);
    // A bad session in a RESYNC is refused with its index; nothing of it is applied.
    let bad_resync = agent
        .resync(vec![
            session(1, "ok", pb::SessionState::Active),
            session(2, "", pb::SessionState::Active),
        ])
        .await
        .unwrap_err();
    assert_eq!(bad_resync.code(), Code::InvalidArgument);
    assert!(
        bad_resync.message().contains("sessions[1].user_name"),
        "{bad_resync:?}"
    );
    // As is one that names a session twice (which of the two is the session?).
    let twice = agent
        .resync(vec![
            session(1, "a", pb::SessionState::Active),
            session(1, "b", pb::SessionState::Disconnected),
        ])
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::InvalidArgument);
    assert!(
        twice.message().contains("session 1 is listed twice"),
        "{twice:?}"
    );
    agent.resync(vec![]).await.unwrap();
    agent.ready().await.unwrap();
    // An event without a type is refused; the stream goes on.
    let untyped = agent
        .request(Body::SessionEvent(pb::SessionEvent {
            r#type: 0,
            session: Some(session(3, "u", pb::SessionState::Active)),
        }))
        .await
        .unwrap_err();
    assert_eq!(untyped.code(), Code::InvalidArgument);
    let no_body = agent.request_raw_body_none().await.unwrap_err();
    assert_eq!(no_body.code(), Code::InvalidArgument);
    // A repeated seq is acknowledged again and not applied twice.
    agent.logon(5, "dup").await.unwrap();
    agent
        .send_raw(pb::AgentMessage {
            seq: 3,
            sent_at: None,
            body: Some(Body::Removed(pb::MachineRemoved::default())),
        })
        .await;
    agent.answer_to(3).await.expect("repeat acknowledged");
    agent
        .heartbeat()
        .await
        .expect("stream still open: the repeated REMOVED was not applied");

    // A second stream for the same machine takes over; the first is told so.
    let mut second = FakeAgent::join(&broker.url(), description("TS-A", "farm", 100), vec![]).await;
    let status = agent
        .wait_closed(Duration::from_secs(10))
        .await
        .expect("first stream ended");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    second.heartbeat().await.unwrap();

    // Anything before ADDED ends the stream with FAILED_PRECONDITION.
    let channel = broker.channel().await;
    let mut client =
        tsbroker_common::proto::v1::agent_gateway_client::AgentGatewayClient::new(channel);
    let early = pb::AgentMessage {
        seq: 1,
        sent_at: None,
        body: Some(Body::Ready(pb::MachineReady {})),
    };
    let mut replies = client
        .connect(tokio_stream::iter(vec![early]))
        .await
        .unwrap()
        .into_inner();
    let status = replies.message().await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // A message over the size limit ends the stream with a status that says so (it had
    // ended with OK, as if the connection had failed).
    let huge = pb::AgentMessage {
        seq: 1,
        sent_at: None,
        body: Some(Body::Added(pb::MachineDescription {
            name: "x".repeat(5 << 20),
            ..description("ts-b", "farm", 100)
        })),
    };
    let mut replies = client
        .connect(tokio_stream::iter(vec![huge]).chain(tokio_stream::pending()))
        .await
        .unwrap()
        .into_inner();
    let status = tokio::time::timeout(Duration::from_secs(10), replies.message())
        .await
        .expect("an answer")
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("refused"), "{status:?}");
    broker.stop().await;
}

async fn removal_by_the_agent_and_by_an_admin(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let mut admin = broker.admin_client().await;
    let agent = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm", 100),
        vec![session(1, "a", pb::SessionState::Active)],
    )
    .await;
    agent.remove().await.unwrap();
    // A machine that leaves is gone from the farm, its sessions with it (an autoscaled farm's
    // would otherwise pile up in every listing).
    let gone = client
        .get_machine(pb::GetMachineRequest {
            machine: Some(crate::support::by_name("farm", "ts-a")),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    let farms = client
        .list_farms(pb::ListFarmsRequest {})
        .await
        .unwrap()
        .into_inner()
        .farms;
    assert_eq!(
        farms
            .iter()
            .map(|farm| (farm.name.as_str(), farm.machine_count))
            .collect::<Vec<_>>(),
        [("farm", 0)]
    );
    let sessions = client
        .list_sessions(pb::ListSessionsRequest {
            user_name: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(sessions.sessions.is_empty());

    let mut agent = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        vec![session(1, "b", pb::SessionState::Active)],
    )
    .await;
    let refused = admin
        .remove_machine(pb::RemoveMachineRequest {
            machine: Some(by_name("farm", "ts-b")),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    let removed = admin
        .remove_machine(pb::RemoveMachineRequest {
            machine: Some(by_name("farm", "ts-b")),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.sessions_removed, 1);
    let command = agent.next_command(Duration::from_secs(5)).await;
    assert!(
        matches!(
            command,
            Some(pb::BrokerMessage {
                body: Some(Reply::Shutdown(pb::Shutdown { removed: true, .. }))
            })
        ),
        "{command:?}"
    );
    let missing = client
        .get_machine(pb::GetMachineRequest {
            machine: Some(by_name("farm", "ts-b")),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let bad_id = client
        .get_machine(pb::GetMachineRequest {
            machine: Some(pb::MachineRef {
                machine_id: "not-a-uuid".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_id.code(), Code::InvalidArgument);
    broker.stop().await;
}

async fn full_and_empty_farms_say_why(database: &TestDatabase) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let unknown = redirect(&mut client, "nofarm", "u").await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let single = pb::MachineDescription {
        single_session: true,
        ..description("kiosk", "farm", 100)
    };
    let _kiosk = FakeAgent::join(&broker.url(), single, vec![]).await;
    let first = redirect(&mut client, "farm", "first").await.unwrap();
    assert_eq!(first.machine_name, "kiosk");
    let full = redirect(&mut client, "farm", "second").await.unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert!(full.message().contains("session limit"), "{full:?}");
    // A limit set on a single-session machine changes nothing, and the machine says so.
    let mut admin = broker.admin_client().await;
    let limited = admin
        .set_session_limit(pb::SetSessionLimitRequest {
            machine: Some(by_name("farm", "kiosk")),
            session_limit: 5,
            clear: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            limited.session_limit,
            limited.single_session,
            limited.session_limit_overridden
        ),
        (1, true, true),
        "{limited:?}"
    );
    let still_full = redirect(&mut client, "farm", "second").await.unwrap_err();
    assert_eq!(still_full.code(), Code::ResourceExhausted, "{still_full:?}");
    let invalid = redirect(&mut client, "farm", &"x".repeat(300))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    broker.stop().await;
}

/// A front door that could not connect to a new logon's machine asks again without it; from
/// then on new logons avoid that machine (it would otherwise be every next pick: no sessions),
/// returning users still go to it, and it still takes new logons when nothing else can.
async fn machines_front_doors_could_not_reach_get_no_new_logons_for_a_while(
    database: &TestDatabase,
) {
    let broker = spawn_broker(&database.url, |_| {}).await;
    let mut client = broker.broker_client().await;
    let _a = FakeAgent::join(
        &broker.url(),
        description("ts-a", "farm", 100),
        vec![session(1, "carol", pb::SessionState::Disconnected)],
    )
    .await;
    let _b = FakeAgent::join(
        &broker.url(),
        description("ts-b", "farm", 100),
        (1..=5)
            .map(|id| session(id, &format!("b{id}"), pb::SessionState::Active))
            .collect(),
    )
    .await;
    // The policy's pick is ts-a (1 session against 5).
    let first = redirect(&mut client, "farm", "first").await.unwrap();
    assert_eq!(first.machine_name, "ts-a");
    // Its RDP service did not answer that front door: asked again without it.
    let ts_a = machine(&mut client, "farm", "ts-a").await.id;
    let again = redirect_without(&mut client, "first", ts_a).await;
    assert_eq!(again.machine_name, "ts-b");
    // New logons from anywhere now avoid ts-a, though it has far fewer sessions.
    for user in 0..3 {
        let placed = redirect(&mut client, "farm", &format!("n{user}"))
            .await
            .unwrap();
        assert_eq!(
            (placed.machine_name.as_str(), reason(&placed)),
            ("ts-b", pb::RedirectReason::LoadBalanced),
            "n{user}"
        );
    }
    // Its users are still sent back to it.
    let carol = redirect(&mut client, "farm", "carol").await.unwrap();
    assert_eq!(
        (carol.machine_name.as_str(), reason(&carol)),
        ("ts-a", pb::RedirectReason::ExistingSession)
    );
    // With ts-b drained, ts-a is the only machine: it is tried after all.
    let mut admin = broker.admin_client().await;
    admin.drain_machine(by_name("farm", "ts-b")).await.unwrap();
    let last = redirect(&mut client, "farm", "last").await.unwrap();
    assert_eq!(
        (last.machine_name.as_str(), reason(&last)),
        ("ts-a", pb::RedirectReason::LoadBalanced)
    );
    // Left out by the caller too, nothing is left; the answer counts every machine.
    let ts_a = machine(&mut client, "farm", "ts-a").await.id;
    let refused = client
        .redirect(pb::RedirectRequest {
            user_name: "nobody".into(),
            farm: "farm".into(),
            exclude_machine_ids: vec![ts_a],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("(2 machines: 0 not ready, 1 draining, 0 at their session limit, 0 at their cap of logons in flight, 1 unreachable from the caller)"),
        "{refused:?}"
    );
    broker.stop().await;
}

/// A new logon in farm `farm` for `user`, `machine` left out by the caller (it could not connect).
async fn redirect_without(
    client: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
    user: &str,
    machine: String,
) -> pb::RedirectResponse {
    client
        .redirect(pb::RedirectRequest {
            user_name: user.into(),
            farm: "farm".into(),
            exclude_machine_ids: vec![machine],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}
