//! The in-memory session directory (`tsbroker::directory`), on both stores: it loads what the
//! database holds, has every kind of commit (events, RESYNC, READY, UNREACHABLE, REMOVED, an
//! administrator's removal) by the time the store answers it, resolves truncated names, and
//! on PostgreSQL hears what another replica wrote. And the guard that makes a directory that
//! is behind harmless: a placement that checks sessions refuses a user who has one in the
//! database.

use crate::conformance::{NOW, ready_machine, request, session};
use crate::support::{counter, eventually, on_both_stores, reason, redirect, scrape};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tsbroker::directory::SessionDirectory;
use tsbroker::store::{
    self, Choice, MachineLoad, Placement, PlacementRequest, Store, StreamMachineState,
};
use tsbroker_common::model::{SessionEvent, SessionEventKind, SessionInfo, SessionState};
use tsbroker_tests::{Backend, TestDatabase};
use uuid::Uuid;

on_both_stores!(
    returning_users_are_answered_from_memory,
    the_directory_follows_every_commit,
    truncated_names_resolve_in_memory,
    principal_names_find_the_user_pam_names,
    a_placement_checking_sessions_refuses_a_user_who_has_one,
);

const FARM: &str = "farm1";

/// Adds, resyncs with `sessions` and readies a machine; returns its id and connection.
async fn ready(store: &dyn Store, name: &str, sessions: &[SessionInfo]) -> (Uuid, Uuid) {
    ready_machine(store, name, 100, sessions).await
}

fn active(session_id: u32, user: &str) -> SessionInfo {
    session(session_id, user, SessionState::Active)
}

async fn loaded(store: Arc<dyn Store>) -> (SessionDirectory, CancellationToken) {
    let stop = CancellationToken::new();
    let directory = SessionDirectory::start(store, stop.clone(), None);
    eventually(10, || {
        let directory = directory.clone();
        async move { directory.is_loaded() }
    })
    .await;
    (directory, stop)
}

/// Where the directory has the user's sessions: (machine, session id, machine state).
fn sessions_of(directory: &SessionDirectory, user: &str) -> Vec<(Uuid, i64, String)> {
    let answer = directory.lookup(FARM, user, "", false, "").expect("loaded");
    let mut found: Vec<(Uuid, i64, String)> = answer
        .sessions
        .into_iter()
        .map(|session| {
            (
                session.machine_id,
                session.session_id,
                session.machine_state,
            )
        })
        .collect();
    found.sort();
    found
}

/// The directory has exactly these sessions of the user now: a commit of this broker reaches
/// the directory before the store answers it.
fn assert_sessions(directory: &SessionDirectory, user: &str, want: Vec<(Uuid, i64, String)>) {
    let mut want = want;
    want.sort();
    assert_eq!(sessions_of(directory, user), want, "sessions of {user}");
}

async fn until_sessions(directory: &SessionDirectory, user: &str, want: Vec<(Uuid, i64, String)>) {
    let mut want = want;
    want.sort();
    eventually(10, || {
        let found = sessions_of(directory, user);
        let want = want.clone();
        async move { found == want }
    })
    .await;
}

async fn the_directory_follows_every_commit(database: &TestDatabase) {
    let store = store::open(&database.url).await.unwrap();
    let (first, first_connection) = ready(store.as_ref(), "ts1", &[active(1, "alice")]).await;
    let (directory, stop) = loaded(store.clone()).await;
    let ready_state = || "ready".to_owned();
    // Loaded from the database, with the machine's redirect details.
    let answer = directory.lookup(FARM, "ALICE", "", false, "").unwrap();
    assert_eq!(answer.user_key, "alice");
    assert_eq!(answer.sessions.len(), 1);
    assert_eq!(answer.sessions[0].machine_address, "ts1:3389");
    assert!(answer.sessions[0].machine_takes_its_users_back(NOW - 15_000));

    // Session events: a logon appears, a disconnect changes the state, a logoff removes it.
    let events = [
        SessionEvent {
            kind: SessionEventKind::Logon,
            session: active(2, "bob"),
        },
        SessionEvent {
            kind: SessionEventKind::Disconnect,
            session: session(1, "alice", SessionState::Disconnected),
        },
    ];
    store
        .apply_session_events(first, first_connection, &events, NOW + 1)
        .await
        .unwrap();
    assert_sessions(&directory, "bob", vec![(first, 2, ready_state())]);
    assert_eq!(
        directory
            .lookup(FARM, "alice", "", false, "")
            .unwrap()
            .sessions[0]
            .state,
        "disconnected"
    );
    let logoff = [SessionEvent {
        kind: SessionEventKind::Logoff,
        session: active(2, "bob"),
    }];
    store
        .apply_session_events(first, first_connection, &logoff, NOW + 2)
        .await
        .unwrap();
    assert_sessions(&directory, "bob", vec![]);

    // A second machine joins with sessions; RESYNC replaces the first machine's.
    let (second, second_connection) = ready(store.as_ref(), "ts2", &[active(5, "carol")]).await;
    assert_sessions(&directory, "carol", vec![(second, 5, ready_state())]);
    store
        .resync_sessions(first, first_connection, &[active(3, "carol")], NOW + 3)
        .await
        .unwrap();
    assert_sessions(
        &directory,
        "carol",
        vec![(first, 3, ready_state()), (second, 5, ready_state())],
    );
    assert_sessions(&directory, "alice", vec![]);

    // The first machine's stream ends: its sessions stay, on an unreachable machine.
    assert!(
        store
            .mark_unreachable(first, first_connection, NOW + 4)
            .await
            .unwrap()
    );
    assert_sessions(
        &directory,
        "carol",
        vec![(first, 3, "unreachable".into()), (second, 5, ready_state())],
    );

    // The second machine leaves cleanly (REMOVED); an administrator removes the first.
    store
        .set_machine_state(
            second,
            second_connection,
            StreamMachineState::Removed,
            NOW + 5,
        )
        .await
        .unwrap();
    assert_sessions(&directory, "carol", vec![(first, 3, "unreachable".into())]);
    store.remove_machine(first).await.unwrap();
    assert_sessions(&directory, "carol", vec![]);
    assert_eq!(directory.session_count(), Some(0));
    stop.cancel();
}

async fn truncated_names_resolve_in_memory(database: &TestDatabase) {
    let store = store::open(&database.url).await.unwrap();
    let (machine, _) = ready(
        store.as_ref(),
        "ts1",
        &[
            active(1, "christopher"),
            SessionInfo {
                client_address: "10.0.0.5:4000".into(),
                ..active(2, "jonathan_a1")
            },
            SessionInfo {
                client_address: "10.0.0.6".into(),
                ..active(3, "jonathan_b2")
            },
            active(4, "alexander"),
            SessionInfo {
                client_address: "10.0.0.7:4000".into(),
                ..active(5, "alexander.b")
            },
        ],
    )
    .await;
    let (directory, stop) = loaded(store.clone()).await;
    // mstsc cut "christopher" to 9 characters: the one user with that prefix.
    let answer = directory.lookup(FARM, "christoph", "", true, "").unwrap();
    assert_eq!(answer.user_key, "christopher");
    assert_eq!(answer.sessions[0].machine_id, machine);
    // Not flagged as possibly cut: an unknown user.
    assert!(
        directory
            .lookup(FARM, "christoph", "", false, "")
            .unwrap()
            .sessions
            .is_empty()
    );
    // Two users share the prefix: the one with a session from the client's IP, else no guess.
    let ambiguous = directory.lookup(FARM, "jonathan_", "", true, "").unwrap();
    assert!(ambiguous.sessions.is_empty());
    let a1 = directory.lookup(FARM, "jonathan_", "", true, "10.0.0.5:4000");
    assert_eq!(a1.unwrap().user_key, "jonathan_a1");
    let elsewhere = directory.lookup(FARM, "jonathan_", "", true, "10.0.0.9:4000");
    assert!(elsewhere.unwrap().sessions.is_empty());
    // A client that names no user: the one user with sessions from its IP.
    let b2 = directory
        .client_user(FARM, "10.0.0.6".parse().unwrap())
        .unwrap();
    assert_eq!(
        (b2.user_key.as_str(), b2.sessions[0].session_id),
        ("jonathan_b2", 3)
    );
    assert!(
        directory
            .client_user(FARM, "10.0.0.9".parse().unwrap())
            .is_none()
    );
    // A 9-character name that is a user's whole name is that user, but from the address of
    // the one longer name's session it starts: there mstsc cut that user's name.
    for client in ["", "10.0.0.9:4000"] {
        let exact = directory
            .lookup(FARM, "alexander", "", true, client)
            .unwrap();
        assert_eq!(exact.sessions.len(), 1);
        assert_eq!(exact.sessions[0].session_id, 4, "from {client:?}");
    }
    let longer = directory.lookup(FARM, "alexander", "", true, "10.0.0.7:4001");
    assert_eq!(longer.unwrap().user_key, "alexander.b");
    // Not flagged as possibly cut: the whole name, wherever from.
    let whole = directory.lookup(FARM, "alexander", "", false, "10.0.0.7:4001");
    assert_eq!(whole.unwrap().user_key, "alexander");
    stop.cancel();
}

async fn principal_names_find_the_user_pam_names(database: &TestDatabase) {
    let store = store::open(&database.url).await.unwrap();
    ready(
        store.as_ref(),
        "ts1",
        &[
            active(1, "ann"),
            active(2, "bo@example.com"),
            active(3, "bo"),
        ],
    )
    .await;
    let (directory, stop) = loaded(store.clone()).await;
    // A Windows client sends the name as typed; PAM reported the logon as "ann".
    let ann = directory
        .lookup(FARM, "Ann@Example.com", "", false, "")
        .unwrap();
    assert_eq!((ann.user_key.as_str(), ann.sessions.len()), ("ann", 1));
    // mstsc's 9 characters of it still name ann.
    let cut = directory.lookup(FARM, "ann@examp", "", true, "").unwrap();
    assert_eq!(
        (cut.user_key.as_str(), cut.sessions[0].session_id),
        ("ann", 1)
    );
    // A user with sessions under the whole name is that user, not the user part.
    let bo = directory
        .lookup(FARM, "bo@example.com", "", false, "")
        .unwrap();
    assert_eq!(
        (bo.user_key.as_str(), bo.sessions[0].session_id),
        ("bo@example.com", 2)
    );
    // Nobody under either name: an unknown user, placed under the name sent.
    let carl = directory
        .lookup(FARM, "carl@example.com", "", false, "")
        .unwrap();
    assert_eq!(carl.user_key, "carl@example.com");
    assert!(carl.sessions.is_empty());
    stop.cancel();
}

async fn a_placement_checking_sessions_refuses_a_user_who_has_one(database: &TestDatabase) {
    let store = store::open(&database.url).await.unwrap();
    ready(store.as_ref(), "ts1", &[active(1, "alice")]).await;
    let least_loaded = |_: &str, candidates: &[MachineLoad]| {
        candidates
            .first()
            .map_or(Choice::Nothing, |load| Choice::Machine(load.machine.id))
    };
    let request = |user_key: &'static str, check_sessions: bool| PlacementRequest {
        check_sessions,
        ..request(user_key)
    };
    let checked = store
        .place_logon(&request("alice", true), &least_loaded)
        .await
        .unwrap();
    assert!(matches!(checked, Placement::HasSession), "{checked:?}");
    let new_user = store
        .place_logon(&request("bob", true), &least_loaded)
        .await
        .unwrap();
    assert!(matches!(new_user, Placement::Placed(_)), "{new_user:?}");
    // Without the check (the caller read the sessions itself), the placement places.
    let unchecked = store
        .place_logon(&request("alice", false), &least_loaded)
        .await
        .unwrap();
    assert!(matches!(unchecked, Placement::Placed(_)), "{unchecked:?}");
}

/// Two brokers share a PostgreSQL database: what one writes, the other's directory learns
/// (NOTIFY with the machines, then a read of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_hear_each_others_sessions_on_postgres() {
    let database = TestDatabase::new(Backend::Postgres).await;
    let writer = store::open(&database.url).await.unwrap();
    let reader = store::open(&database.url).await.unwrap();
    let (directory, stop) = loaded(reader.clone()).await;
    let (machine, connection) = ready(writer.as_ref(), "ts1", &[active(1, "alice")]).await;
    until_sessions(&directory, "alice", vec![(machine, 1, "ready".into())]).await;
    let logon = [SessionEvent {
        kind: SessionEventKind::Logon,
        session: active(2, "bob"),
    }];
    writer
        .apply_session_events(machine, connection, &logon, NOW + 1)
        .await
        .unwrap();
    until_sessions(&directory, "bob", vec![(machine, 2, "ready".into())]).await;
    writer
        .mark_unreachable(machine, connection, NOW + 2)
        .await
        .unwrap();
    until_sessions(&directory, "bob", vec![(machine, 2, "unreachable".into())]).await;
    stop.cancel();
    drop((writer, reader));
    database.drop_database().await;
}

/// Through a real broker: once the directory is loaded, a returning user's Redirect is
/// answered from memory (counted in `tsbroker_session_lookups_total{kind="memory"}`) and goes
/// to the session's machine; a new user is placed (the directory knew no session of theirs).
async fn returning_users_are_answered_from_memory(database: &TestDatabase) {
    use tsbroker_common::proto::v1 as pb;
    use tsbroker_tests::fake_agent::{machine as agent_machine, session as agent_session};
    let metrics_port = tsbroker_tests::process::free_port();
    let broker = tsbroker_tests::spawn_broker(&database.url, |config| {
        config.metrics_listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap());
    })
    .await;
    let mut client = broker.broker_client().await;
    let _a = tsbroker_tests::FakeAgent::join(
        &broker.url(),
        agent_machine("ts-a", "farm", 100),
        vec![agent_session(1, "alice", pb::SessionState::Disconnected)],
    )
    .await;
    let _b =
        tsbroker_tests::FakeAgent::join(&broker.url(), agent_machine("ts-b", "farm", 100), vec![])
            .await;
    let from_memory = || async {
        counter(
            &scrape(metrics_port).await,
            &["tsbroker_session_lookups_total", "kind=\"memory\""],
        )
    };
    eventually(10, || async {
        let alice = redirect(&mut client.clone(), "farm", "Alice")
            .await
            .unwrap();
        assert_eq!(alice.machine_name, "ts-a");
        assert_eq!(reason(&alice), pb::RedirectReason::ExistingSession);
        from_memory().await >= 1.0
    })
    .await;
    let before = from_memory().await;
    let bob = redirect(&mut client, "farm", "bob").await.unwrap();
    assert_eq!(reason(&bob), pb::RedirectReason::LoadBalanced);
    assert_eq!(from_memory().await, before + 1.0);
    broker.stop().await;
}
