//! The store conformance suite: every test runs against SQLite and against PostgreSQL.

use std::sync::Arc;
use tsbroker::store::{
    self, Choice, EventOutcome, FarmCache, Ineligible, MachineChange, MachineLoad, Placement,
    PlacementRequest, SessionFilter, Store, StoreError, StreamMachineState,
};
use tsbroker_common::model::{
    MachineDescription, SessionEvent, SessionEventKind, SessionInfo, SessionState, machine_id,
};
use tsbroker_tests::{Backend, TestDatabase};
use uuid::Uuid;

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let database = tsbroker_tests::TestDatabase::new(tsbroker_tests::Backend::Sqlite).await;
                    super::$name(&database).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let database = tsbroker_tests::TestDatabase::new(tsbroker_tests::Backend::Postgres).await;
                    super::$name(&database).await;
                    database.drop_database().await;
                }
            )*
        }
    };
}

conformance!(
    added_machines_join_and_keep_admin_settings,
    resync_replaces_sessions_atomically,
    a_newer_connection_supersedes_the_old,
    an_added_that_arrived_before_the_owner_does_not_take_the_machine,
    session_events_apply_and_repair,
    placement_records_a_pending_logon_and_reuses_it,
    placement_classifies_every_machine,
    placement_leaves_out_excluded_machines,
    a_batch_of_placements_counts_its_own_picks,
    a_farm_cache_never_misses_another_brokers_placements,
    a_farm_cache_refresh_reads_what_agents_reported,
    expired_pending_logons_do_not_count,
    truncated_names_find_their_prefix,
    sessions_list_with_filters_and_pages,
    admin_changes_are_announced,
    removing_a_machine_takes_its_sessions,
    farm_policies_are_stored,
    unreachable_keeps_sessions_removed_drops_them,
);

pub(super) const NOW: i64 = 1_700_000_000_000;

async fn open(database: &TestDatabase) -> Arc<dyn Store> {
    let store = store::open(&database.url).await.expect("open store");
    let expected = match database.backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(store.backend(), expected);
    store
}

pub(super) fn description(name: &str, weight: u32) -> MachineDescription {
    MachineDescription {
        name: name.to_owned(),
        farm: "farm1".to_owned(),
        address: format!("{name}:3389"),
        weight,
        session_limit: 0,
        single_session: false,
        agent_version: "1".to_owned(),
        front_door: false,
    }
}

pub(super) fn session(session_id: u32, user: &str, state: SessionState) -> SessionInfo {
    SessionInfo {
        session_id,
        user_name: user.to_owned(),
        domain: String::new(),
        state,
        client_address: String::new(),
        logon_time_ms: Some(NOW - i64::from(session_id)),
    }
}

fn event(kind: SessionEventKind, session_id: u32, user: &str) -> SessionEvent {
    let state = kind.resulting_state().unwrap_or(SessionState::Active);
    SessionEvent {
        kind,
        session: session(session_id, user, state),
    }
}

/// Adds, resyncs and readies a machine; returns its id and connection.
pub(super) async fn ready_machine(
    store: &dyn Store,
    name: &str,
    weight: u32,
    sessions: &[SessionInfo],
) -> (Uuid, Uuid) {
    let connection = Uuid::new_v4();
    let machine = store
        .machine_added(&description(name, weight), "session-count", connection, NOW)
        .await
        .unwrap();
    store
        .resync_sessions(machine.id, connection, sessions, NOW)
        .await
        .unwrap();
    store
        .set_machine_state(machine.id, connection, StreamMachineState::Ready, NOW)
        .await
        .unwrap();
    (machine.id, connection)
}

pub(super) fn request<'a>(user_key: &'a str) -> PlacementRequest<'a> {
    PlacementRequest {
        farm: "farm1",
        user_key,
        now: NOW,
        lease_cutoff: NOW - 15_000,
        pending_ttl_ms: 30_000,
        max_pending_per_machine: 20,
        slow_start_ms: 0,
        excluded: &[],
        check_sessions: false,
    }
}

/// The least-loaded candidate (ties by id), like the default policy without weights.
fn least_loaded(_policy: &str, candidates: &[MachineLoad]) -> Choice {
    candidates
        .iter()
        .min_by_key(|load| (load.load(), load.machine.id))
        .map_or(Choice::Nothing, |load| Choice::Machine(load.machine.id))
}

async fn added_machines_join_and_keep_admin_settings(database: &TestDatabase) {
    let store = open(database).await;
    let connection = Uuid::new_v4();
    let machine = store
        .machine_added(
            &description("TS1.example", 100),
            "session-count",
            connection,
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(machine.id, machine_id("farm1", "ts1.example"));
    assert_eq!(machine.state, "joining");
    assert_eq!(machine.connection_id, Some(connection));
    store
        .change_machine(machine.id, MachineChange::Drain(true), NOW)
        .await
        .unwrap();
    store
        .change_machine(machine.id, MachineChange::Weight(Some(300)), NOW)
        .await
        .unwrap();
    let again = store
        .machine_added(
            &description("ts1.example", 50),
            "session-count",
            Uuid::new_v4(),
            NOW + 1,
        )
        .await
        .unwrap();
    assert_eq!(
        again.id, machine.id,
        "same farm and name (any case): same id"
    );
    assert!(again.draining, "drain survives a reconnect");
    assert_eq!(
        again.weight(),
        300,
        "the admin's weight wins over the agent's"
    );
    assert_eq!(again.agent_weight, 50);
    assert_eq!(
        store
            .get_farm("farm1")
            .await
            .unwrap()
            .unwrap()
            .machine_count,
        1
    );
}

async fn resync_replaces_sessions_atomically(database: &TestDatabase) {
    let store = open(database).await;
    let (machine, connection) = ready_machine(
        store.as_ref(),
        "ts1",
        100,
        &[
            session(1, "alice", SessionState::Active),
            session(2, "bob", SessionState::Disconnected),
        ],
    )
    .await;
    let replacement = [
        session(2, "bob", SessionState::Active),
        session(3, "carol", SessionState::Disconnected),
        session(3, "carol", SessionState::Disconnected),
    ];
    store
        .resync_sessions(machine, connection, &replacement, NOW + 5)
        .await
        .unwrap();
    let sessions = store
        .list_sessions(&SessionFilter {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut users: Vec<_> = sessions
        .iter()
        .map(|session| (session.user_name.as_str(), session.state.as_str()))
        .collect();
    users.sort();
    assert_eq!(users, vec![("bob", "active"), ("carol", "disconnected")]);
    assert_eq!(
        store
            .get_machine(machine)
            .await
            .unwrap()
            .unwrap()
            .session_count,
        2
    );
    store
        .resync_sessions(machine, connection, &[], NOW + 6)
        .await
        .unwrap();
    assert_eq!(
        store
            .get_machine(machine)
            .await
            .unwrap()
            .unwrap()
            .session_count,
        0
    );
}

async fn a_newer_connection_supersedes_the_old(database: &TestDatabase) {
    let store = open(database).await;
    let (machine, old) = ready_machine(store.as_ref(), "ts1", 100, &[]).await;
    let new = Uuid::new_v4();
    store
        .machine_added(&description("ts1", 100), "session-count", new, NOW + 1)
        .await
        .unwrap();
    let refused = store.resync_sessions(machine, old, &[], NOW + 2).await;
    assert!(
        matches!(refused, Err(StoreError::Superseded)),
        "{refused:?}"
    );
    let refused = store
        .apply_session_events(machine, old, &[event(SessionEventKind::Logon, 1, "a")], NOW)
        .await;
    assert!(
        matches!(refused, Err(StoreError::Superseded)),
        "{refused:?}"
    );
    let load = tsbroker_common::model::LoadReport::default();
    assert!(matches!(
        store.record_load(machine, old, &load, NOW).await,
        Err(StoreError::Superseded)
    ));
    assert!(
        !store.mark_unreachable(machine, old, NOW + 3).await.unwrap(),
        "old stream cannot mark it"
    );
    assert_eq!(
        store.get_machine(machine).await.unwrap().unwrap().state,
        "joining"
    );
    assert!(store.mark_unreachable(machine, new, NOW + 3).await.unwrap());
}

/// An ADDED that waited (for the database) while its agent opened the next stream comes after
/// that stream's: it is refused, and the newer stream keeps the machine — judged when it is
/// written, though its batch began before the newer stream arrived. A machine held by an id
/// that is not time-ordered (an older broker's) is taken as before.
async fn an_added_that_arrived_before_the_owner_does_not_take_the_machine(database: &TestDatabase) {
    use tsbroker::store::ingest::connection_id;
    let store = open(database).await;
    let (stale, fresh) = (connection_id(NOW), connection_id(NOW + 5_000));
    let added = |connection: Uuid, name: &'static str, now: i64| {
        let store = store.clone();
        async move {
            store
                .machine_added(&description(name, 100), "session-count", connection, now)
                .await
        }
    };
    let machine = added(fresh, "ts1", NOW + 5_000).await.unwrap().id;
    // The stale stream's write began at NOW + 100 and waited.
    let refused = added(stale, "ts1", NOW + 100).await;
    assert!(
        matches!(refused, Err(StoreError::Superseded)),
        "{refused:?}"
    );
    let record = store.get_machine(machine).await.unwrap().unwrap();
    assert_eq!(record.connection_id, Some(fresh));
    // Still the fresh stream's to resync.
    store
        .resync_sessions(machine, fresh, &[], NOW + 6_001)
        .await
        .unwrap();

    // A random id above every time-ordered one, as an older broker's could be.
    let legacy = uuid::Builder::from_random_bytes([0xff; 16]).into_uuid();
    assert_eq!(legacy.get_version_num(), 4);
    added(legacy, "ts2", NOW).await.unwrap();
    let machine = added(stale, "ts2", NOW + 100).await.unwrap().id;
    let record = store.get_machine(machine).await.unwrap().unwrap();
    assert_eq!(record.connection_id, Some(stale));
}

async fn session_events_apply_and_repair(database: &TestDatabase) {
    let store = open(database).await;
    let (machine, connection) = ready_machine(store.as_ref(), "ts1", 100, &[]).await;
    let events = [
        event(SessionEventKind::Logon, 1, "alice"),
        event(SessionEventKind::Logon, 1, "Alice"),
        event(SessionEventKind::Disconnect, 2, "bob"),
        event(SessionEventKind::Logoff, 9, "nobody"),
        event(SessionEventKind::Disconnect, 1, "alice"),
        event(SessionEventKind::Reconnect, 2, "bob"),
        event(SessionEventKind::Logoff, 2, "bob"),
    ];
    let outcomes = store
        .apply_session_events(machine, connection, &events, NOW + 1)
        .await
        .unwrap();
    assert_eq!(outcomes[0], EventOutcome::Applied);
    assert!(
        matches!(outcomes[1], EventOutcome::Repaired(_)),
        "duplicate logon: {:?}",
        outcomes[1]
    );
    assert!(
        matches!(outcomes[2], EventOutcome::Repaired(_)),
        "unknown session created: {:?}",
        outcomes[2]
    );
    assert!(
        matches!(outcomes[3], EventOutcome::Ignored(_)),
        "unknown logoff: {:?}",
        outcomes[3]
    );
    assert_eq!(
        &outcomes[4..],
        &[
            EventOutcome::Applied,
            EventOutcome::Applied,
            EventOutcome::Applied
        ]
    );
    let sessions = store.user_sessions("farm1", "alice").await.unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].state, "disconnected");
    assert!(
        store
            .user_sessions("farm1", "bob")
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .get_machine(machine)
            .await
            .unwrap()
            .unwrap()
            .session_count,
        1
    );
}

async fn placement_records_a_pending_logon_and_reuses_it(database: &TestDatabase) {
    let store = open(database).await;
    let (first, connection) = ready_machine(store.as_ref(), "ts1", 100, &[]).await;
    ready_machine(
        store.as_ref(),
        "ts2",
        100,
        &[session(1, "x", SessionState::Active)],
    )
    .await;
    let Placement::Placed(placed) = store
        .place_logon(&request("alice"), &least_loaded)
        .await
        .unwrap()
    else {
        panic!("expected a placement");
    };
    assert_eq!(placed.id, first, "the emptier machine");
    assert_eq!(placed.pending_logons, 1);
    let again = store
        .place_logon(&request("alice"), &least_loaded)
        .await
        .unwrap();
    assert!(
        matches!(again, Placement::AlreadyPending(ref machine) if machine.id == first),
        "{again:?}"
    );
    assert_eq!(
        store
            .pending_logon("farm1", "alice", NOW)
            .await
            .unwrap()
            .unwrap()
            .id,
        first
    );
    // The logon shows up: no longer pending.
    store
        .apply_session_events(
            first,
            connection,
            &[event(SessionEventKind::Logon, 4, "Alice")],
            NOW + 1,
        )
        .await
        .unwrap();
    assert!(
        store
            .pending_logon("farm1", "alice", NOW + 1)
            .await
            .unwrap()
            .is_none()
    );
    let unknown = store
        .place_logon(
            &PlacementRequest {
                farm: "nope",
                ..request("a")
            },
            &least_loaded,
        )
        .await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound(_))),
        "{unknown:?}"
    );
}

/// A machine the caller could not connect to is never chosen, and a pending logon there is
/// placed again elsewhere.
async fn placement_leaves_out_excluded_machines(database: &TestDatabase) {
    let store = open(database).await;
    let (empty, _) = ready_machine(store.as_ref(), "ts1", 100, &[]).await;
    let (busy, _) = ready_machine(
        store.as_ref(),
        "ts2",
        100,
        &[session(1, "x", SessionState::Active)],
    )
    .await;
    let Placement::Placed(first) = store
        .place_logon(&request("alice"), &least_loaded)
        .await
        .unwrap()
    else {
        panic!("expected a placement");
    };
    assert_eq!(first.id, empty);
    let excluding_empty = [empty];
    let retried = store
        .place_logon(
            &PlacementRequest {
                excluded: &excluding_empty,
                ..request("alice")
            },
            &least_loaded,
        )
        .await
        .unwrap();
    assert!(
        matches!(retried, Placement::Placed(ref machine) if machine.id == busy),
        "{retried:?}"
    );
    let pending = store.pending_logon("farm1", "alice", NOW).await.unwrap();
    assert_eq!(pending.map(|machine| machine.id), Some(busy));
    let both = [empty, busy];
    let Placement::NoCandidate(loads) = store
        .place_logon(
            &PlacementRequest {
                excluded: &both,
                ..request("bob")
            },
            &least_loaded,
        )
        .await
        .unwrap()
    else {
        panic!("expected no candidate");
    };
    assert_eq!(loads.len(), 2);
    assert!(
        loads
            .iter()
            .all(|load| load.ineligible == Some(Ineligible::Excluded)),
        "{loads:?}"
    );
}

/// Placements made together: each pick is load for the next, a user twice in the batch is
/// placed once, and the choice is asked per request.
async fn a_batch_of_placements_counts_its_own_picks(database: &TestDatabase) {
    let store = open(database).await;
    let (one, _) = ready_machine(store.as_ref(), "ts1", 100, &[]).await;
    let (two, _) = ready_machine(store.as_ref(), "ts2", 100, &[]).await;
    let users = ["u1", "u2", "u1", "u3"];
    let requests: Vec<PlacementRequest<'_>> = users.iter().map(|user| request(user)).collect();
    let asked = std::sync::Mutex::new(Vec::new());
    let choose = |index: usize, policy: &str, candidates: &[MachineLoad]| {
        asked.lock().unwrap().push(index);
        least_loaded(policy, candidates)
    };
    let placements = store
        .place_logons(&requests, &choose, &mut FarmCache::default())
        .await
        .unwrap();
    let machine_of = |placement: &Placement| match placement {
        Placement::Placed(machine) | Placement::AlreadyPending(machine) => machine.id,
        Placement::NoCandidate(loads) => panic!("no candidate: {loads:?}"),
        Placement::HasSession => panic!("no request asked to check sessions"),
    };
    let first = machine_of(&placements[0]);
    let second = machine_of(&placements[1]);
    assert_ne!(
        first, second,
        "the first pick counts as load for the second"
    );
    assert!(matches!(placements[2], Placement::AlreadyPending(ref machine) if machine.id == first));
    assert!(
        matches!(placements[3], Placement::Placed(_)),
        "{:?}",
        placements[3]
    );
    assert_eq!(*asked.lock().unwrap(), [0, 1, 3]);
    for (user, machine) in [("u1", first), ("u2", second)] {
        let pending = store.pending_logon("farm1", user, NOW).await.unwrap();
        assert_eq!(pending.map(|found| found.id), Some(machine));
    }
    let mut placed = [first, second];
    placed.sort();
    let mut expected = [one, two];
    expected.sort();
    assert_eq!(placed, expected);
    // Nothing recorded when the farm is unknown.
    let unknown: Vec<PlacementRequest<'_>> = ["v1", "v2"]
        .iter()
        .map(|user| PlacementRequest {
            farm: "nope",
            ..request(user)
        })
        .collect();
    let failed = store
        .place_logons(&unknown, &choose, &mut FarmCache::default())
        .await;
    assert!(matches!(failed, Err(StoreError::NotFound(_))), "{failed:?}");
    // Each failed placement ended its transaction: more of them than the store has placement
    // connections, and the farm still takes placements.
    for _ in 0..4 {
        let again = store
            .place_logons(&unknown, &choose, &mut FarmCache::default())
            .await;
        assert!(matches!(again, Err(StoreError::NotFound(_))), "{again:?}");
    }
    let after = store
        .place_logons(&[request("v3")], &choose, &mut FarmCache::default())
        .await
        .unwrap();
    assert!(matches!(after[..], [Placement::Placed(_)]), "{after:?}");
    assert!(
        store
            .pending_logon("nope", "v1", NOW)
            .await
            .unwrap()
            .is_none()
    );
}

/// Two brokers, each with its copy of the farm: a placement by one makes the other's copy
/// stale (the farm's placement counter), so no broker places on loads that miss a placement.
async fn a_farm_cache_refresh_reads_what_agents_reported(database: &TestDatabase) {
    let store = open(database).await;
    let first = ready_machine(store.as_ref(), "ts1", 100, &[]).await;
    let second = ready_machine(store.as_ref(), "ts2", 100, &[]).await;
    // Copies live 50 ms (of the requests' clock); a whole read every 500 ms.
    let mut cache = FarmCache::new(50);
    let choose =
        |_: usize, policy: &str, candidates: &[MachineLoad]| least_loaded(policy, candidates);
    let place = async |user: &str, now: i64, cache: &mut FarmCache| {
        let placed = PlacementRequest {
            now,
            ..request(user)
        };
        let placements = store.place_logons(&[placed], &choose, cache).await.unwrap();
        match placements.as_slice() {
            [Placement::Placed(machine)] => machine.id,
            other => panic!("expected one placement, got {other:?}"),
        }
    };
    let u1 = place("u1", NOW, &mut cache).await;
    // Five users log on to the machine u1 did not go to (not through a placement).
    let (busy, busy_connection) = if u1 == first.0 { second } else { first };
    let logons: Vec<SessionEvent> = (1..=5)
        .map(|id| event(SessionEventKind::Logon, id, &format!("walk-in{id}")))
        .collect();
    store
        .apply_session_events(busy, busy_connection, &logons, NOW + 10)
        .await
        .unwrap();
    // 60 ms on, the copy is refreshed with the rows that changed: the busy machine has five
    // sessions, u1's has one pending logon: u2 joins u1.
    let u2 = place("u2", NOW + 60, &mut cache).await;
    assert_eq!(u2, u1, "the refresh saw the five logons");
    assert_eq!(cache.loaded_at(), Some(NOW + 60));
}

async fn a_farm_cache_never_misses_another_brokers_placements(database: &TestDatabase) {
    let store = open(database).await;
    ready_machine(store.as_ref(), "ts1", 100, &[]).await;
    ready_machine(store.as_ref(), "ts2", 100, &[]).await;
    let mut first_broker = FarmCache::new(60_000);
    let mut second_broker = FarmCache::new(60_000);
    let choose =
        |_: usize, policy: &str, candidates: &[MachineLoad]| least_loaded(policy, candidates);
    let place = async |user: &str, cache: &mut FarmCache| {
        let placements = store
            .place_logons(&[request(user)], &choose, cache)
            .await
            .unwrap();
        match placements.as_slice() {
            [Placement::Placed(machine)] => machine.id,
            other => panic!("expected one placement, got {other:?}"),
        }
    };
    let a = place("u1", &mut first_broker).await;
    assert!(first_broker.loaded_at().is_some(), "the copy is kept");
    let b = place("u2", &mut second_broker).await;
    assert_ne!(
        a, b,
        "the second broker read the farm with u1's pending logon"
    );
    // With its copy (ts1 one pending, ts2 none) the first broker would pick the other machine
    // again; the counter shows u2's placement, so it reads the farm: both have one, and the
    // tie goes to the same machine as u1's.
    let c = place("u3", &mut first_broker).await;
    assert_eq!(c, a);
    // Its own placements it counts without reading: u4 goes to the other machine.
    let d = place("u4", &mut first_broker).await;
    assert_eq!(d, b);
}

async fn placement_classifies_every_machine(database: &TestDatabase) {
    let store = open(database).await;
    let (draining, _) = ready_machine(store.as_ref(), "draining", 100, &[]).await;
    store
        .change_machine(draining, MachineChange::Drain(true), NOW)
        .await
        .unwrap();
    let (full, _) = ready_machine(
        store.as_ref(),
        "full",
        100,
        &[session(1, "u1", SessionState::Active)],
    )
    .await;
    store
        .change_machine(full, MachineChange::SessionLimit(Some(1)), NOW)
        .await
        .unwrap();
    let (stale, _) = ready_machine(store.as_ref(), "stale", 100, &[]).await;
    let joining = store
        .machine_added(
            &description("joining", 100),
            "session-count",
            Uuid::new_v4(),
            NOW,
        )
        .await
        .unwrap();
    let (capped, _) = ready_machine(store.as_ref(), "capped", 100, &[]).await;
    // Every machine was last heard from at NOW: with the lease past it, none is ready.
    let late = PlacementRequest {
        lease_cutoff: NOW + 1,
        ..request("early")
    };
    let Placement::NoCandidate(loads) = store.place_logon(&late, &least_loaded).await.unwrap()
    else {
        panic!("expected no candidate");
    };
    assert_eq!(loads.len(), 5);
    assert!(
        loads
            .iter()
            .all(|load| load.ineligible == Some(Ineligible::NotReady)),
        "{loads:?}"
    );
    // With a cap of one logon in flight, "stale" and "capped" take one each, then nobody can.
    let mut placed = Vec::new();
    for user in ["first", "second"] {
        let capped_request = PlacementRequest {
            max_pending_per_machine: 1,
            ..request(user)
        };
        match store
            .place_logon(&capped_request, &least_loaded)
            .await
            .unwrap()
        {
            Placement::Placed(machine) => placed.push(machine.id),
            other => panic!("expected a placement, got {other:?}"),
        }
    }
    placed.sort();
    let mut expected = vec![stale, capped];
    expected.sort();
    assert_eq!(placed, expected);
    let third = PlacementRequest {
        max_pending_per_machine: 1,
        ..request("third")
    };
    let Placement::NoCandidate(loads) = store.place_logon(&third, &least_loaded).await.unwrap()
    else {
        panic!("expected no candidate");
    };
    let reason = |id: Uuid| {
        loads
            .iter()
            .find(|load| load.machine.id == id)
            .and_then(|load| load.ineligible)
    };
    assert_eq!(reason(joining.id), Some(Ineligible::NotReady));
    assert_eq!(reason(draining), Some(Ineligible::Draining));
    assert_eq!(reason(full), Some(Ineligible::AtSessionLimit));
    assert_eq!(reason(capped), Some(Ineligible::AtLogonCap));
    assert_eq!(reason(stale), Some(Ineligible::AtLogonCap));
}

async fn expired_pending_logons_do_not_count(database: &TestDatabase) {
    let store = open(database).await;
    let (machine, _) = ready_machine(store.as_ref(), "ts1", 100, &[]).await;
    store
        .place_logon(&request("alice"), &least_loaded)
        .await
        .unwrap();
    assert_eq!(
        store
            .get_machine(machine)
            .await
            .unwrap()
            .unwrap()
            .pending_logons,
        0,
        "get_machine counts against the wall clock, long after NOW + ttl"
    );
    let later = NOW + 31_000;
    assert!(
        store
            .pending_logon("farm1", "alice", later)
            .await
            .unwrap()
            .is_none()
    );
    let placed = store
        .place_logon(
            &PlacementRequest {
                now: later,
                lease_cutoff: NOW - 1,
                ..request("alice")
            },
            &least_loaded,
        )
        .await
        .unwrap();
    assert!(
        matches!(placed, Placement::Placed(_)),
        "an expired pending logon is placed anew: {placed:?}"
    );
}

async fn truncated_names_find_their_prefix(database: &TestDatabase) {
    let store = open(database).await;
    ready_machine(
        store.as_ref(),
        "ts1",
        100,
        &[
            session(1, "alexander.long", SessionState::Disconnected),
            SessionInfo {
                client_address: "10.0.0.5:4000".into(),
                ..session(2, "bernadette.a", SessionState::Active)
            },
            session(3, "bernadette.b", SessionState::Active),
            SessionInfo {
                client_address: "10.0.0.6".into(),
                ..session(4, "bernadette.b", SessionState::Disconnected)
            },
        ],
    )
    .await;
    // The sessions with a client address, for telling users who share a cut name apart.
    let mut addresses = store
        .client_addresses_with_prefix("farm1", "bernadett", 100)
        .await
        .unwrap();
    addresses.sort();
    assert_eq!(
        addresses,
        vec![
            ("bernadette.a".to_owned(), "10.0.0.5:4000".to_owned()),
            ("bernadette.b".to_owned(), "10.0.0.6".to_owned()),
        ]
    );
    let limited = store.client_addresses_with_prefix("farm1", "bernadett", 1);
    assert_eq!(limited.await.unwrap().len(), 1);
    let elsewhere = store.client_addresses_with_prefix("farm2", "bernadett", 100);
    assert!(elsewhere.await.unwrap().is_empty());
    assert_eq!(
        store
            .users_with_prefix("farm1", "alexander", 2)
            .await
            .unwrap(),
        vec!["alexander.long"]
    );
    assert_eq!(
        store
            .users_with_prefix("farm1", "bernadett", 2)
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(
        store
            .users_with_prefix("farm1", "zed", 2)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .users_with_prefix("farm2", "alexander", 2)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn sessions_list_with_filters_and_pages(database: &TestDatabase) {
    let store = open(database).await;
    let sessions: Vec<_> = (1..=7)
        .map(|id| {
            session(
                id,
                if id % 2 == 0 { "even" } else { "odd" },
                SessionState::Active,
            )
        })
        .collect();
    let (machine, _) = ready_machine(store.as_ref(), "ts1", 100, &sessions).await;
    ready_machine(
        store.as_ref(),
        "ts2",
        100,
        &[session(1, "odd", SessionState::Disconnected)],
    )
    .await;
    let odd = SessionFilter {
        user_key: Some("odd".into()),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(store.list_sessions(&odd).await.unwrap().len(), 5);
    let disconnected = SessionFilter {
        state: Some(SessionState::Disconnected),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(store.list_sessions(&disconnected).await.unwrap().len(), 1);
    let on_machine = SessionFilter {
        machine: Some(machine),
        farm: Some("farm1".into()),
        limit: 100,
        ..Default::default()
    };
    assert_eq!(store.list_sessions(&on_machine).await.unwrap().len(), 7);
    let mut seen = Vec::new();
    let mut filter = SessionFilter {
        limit: 3,
        ..Default::default()
    };
    loop {
        let page = store.list_sessions(&filter).await.unwrap();
        seen.extend(
            page.iter()
                .map(|session| (session.machine_id, session.session_id)),
        );
        match page.last() {
            Some(last) if page.len() == 3 => {
                filter.after = Some((last.machine_id, last.session_id))
            }
            _ => break,
        }
    }
    let unique: std::collections::HashSet<_> = seen.iter().collect();
    assert_eq!(
        (seen.len(), unique.len()),
        (8, 8),
        "every session once across pages"
    );

    // `odd` of domain CORP (any case): that domain's sessions and those of no domain.
    let of_domain = |session_id, domain: &str| SessionInfo {
        domain: domain.to_owned(),
        ..session(session_id, "odd", SessionState::Active)
    };
    let (ts3, _) = ready_machine(
        store.as_ref(),
        "ts3",
        100,
        &[of_domain(1, "Corp"), of_domain(2, "OTHER")],
    )
    .await;
    let corp = SessionFilter {
        user_key: Some("odd".into()),
        domain: Some("CORP".into()),
        limit: 100,
        ..Default::default()
    };
    let listed = store.list_sessions(&corp).await.unwrap();
    let domains: Vec<_> = listed
        .iter()
        .map(|session| session.domain.as_str())
        .collect();
    assert_eq!(domains.len(), 6, "{domains:?}");
    assert!(domains.iter().all(|domain| ["", "Corp"].contains(domain)));
    assert!(listed.iter().any(|session| session.machine_id == ts3));
}

async fn admin_changes_are_announced(database: &TestDatabase) {
    let store = open(database).await;
    let (machine, _) = ready_machine(store.as_ref(), "ts1", 100, &[]).await;
    let mut changes = store.subscribe_machine_changes();
    // PostgreSQL delivers through LISTEN, which may still be starting.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let changed = store
        .change_machine(machine, MachineChange::Weight(Some(250)), NOW)
        .await
        .unwrap();
    assert_eq!(changed.weight(), 250);
    // This broker's own placements and streams have it when the change is answered (on
    // PostgreSQL the notification through LISTEN comes later: a logon placed right after a
    // drain went to the drained machine).
    assert_eq!(changes.try_recv().ok(), Some(machine));
    let cleared = store
        .change_machine(machine, MachineChange::Weight(None), NOW)
        .await
        .unwrap();
    assert_eq!(cleared.weight(), 100);
    let limited = store
        .change_machine(machine, MachineChange::SessionLimit(Some(7)), NOW)
        .await
        .unwrap();
    assert_eq!(limited.session_limit(), 7);
    let missing = store
        .change_machine(Uuid::new_v4(), MachineChange::Drain(true), NOW)
        .await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "{missing:?}"
    );
}

async fn removing_a_machine_takes_its_sessions(database: &TestDatabase) {
    let store = open(database).await;
    let (machine, _) = ready_machine(
        store.as_ref(),
        "ts1",
        100,
        &[
            session(1, "a", SessionState::Active),
            session(2, "b", SessionState::Active),
        ],
    )
    .await;
    store
        .place_logon(&request("c"), &least_loaded)
        .await
        .unwrap();
    assert_eq!(store.remove_machine(machine).await.unwrap(), 2);
    assert!(store.get_machine(machine).await.unwrap().is_none());
    assert!(
        store
            .list_sessions(&SessionFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .pending_logon("farm1", "c", NOW)
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        store.remove_machine(machine).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn farm_policies_are_stored(database: &TestDatabase) {
    let store = open(database).await;
    ready_machine(
        store.as_ref(),
        "ts1",
        100,
        &[session(1, "a", SessionState::Active)],
    )
    .await;
    let farm = store.get_farm("farm1").await.unwrap().unwrap();
    assert_eq!(
        (
            farm.policy.as_str(),
            farm.machine_count,
            farm.ready_machine_count,
            farm.session_count
        ),
        ("session-count", 1, 1, 1)
    );
    assert_eq!(
        store
            .set_farm_policy("farm1", "round-robin")
            .await
            .unwrap()
            .policy,
        "round-robin"
    );
    assert!(matches!(
        store.set_farm_policy("nope", "x").await,
        Err(StoreError::NotFound(_))
    ));
    // The configuration declares farms (new or not); a new farm takes the policy it is given.
    store
        .declare_farm("declared", "resource", NOW)
        .await
        .unwrap();
    store.declare_farm("farm1", "resource", NOW).await.unwrap();
    assert_eq!(
        store.get_farm("declared").await.unwrap().unwrap().policy,
        "resource"
    );
    assert_eq!(
        store.get_farm("farm1").await.unwrap().unwrap().policy,
        "resource"
    );
    let other = MachineDescription {
        farm: "fresh".into(),
        ..description("ts9", 100)
    };
    store
        .machine_added(&other, "round-robin", Uuid::new_v4(), NOW)
        .await
        .unwrap();
    assert_eq!(
        store.get_farm("fresh").await.unwrap().unwrap().policy,
        "round-robin"
    );
    store
        .machine_added(&other, "resource", Uuid::new_v4(), NOW)
        .await
        .unwrap();
    assert_eq!(
        store.get_farm("fresh").await.unwrap().unwrap().policy,
        "round-robin",
        "an existing farm keeps its policy"
    );
    assert_eq!(store.list_farms().await.unwrap().len(), 3);
}

async fn unreachable_keeps_sessions_removed_drops_them(database: &TestDatabase) {
    let store = open(database).await;
    let (machine, connection) = ready_machine(
        store.as_ref(),
        "ts1",
        100,
        &[session(1, "a", SessionState::Active)],
    )
    .await;
    assert!(
        store
            .mark_unreachable(machine, connection, NOW)
            .await
            .unwrap()
    );
    assert_eq!(store.user_sessions("farm1", "a").await.unwrap().len(), 1);
    let connection = Uuid::new_v4();
    store
        .machine_added(&description("ts1", 100), "session-count", connection, NOW)
        .await
        .unwrap();
    let removed = store
        .set_machine_state(machine, connection, StreamMachineState::Removed, NOW)
        .await
        .unwrap();
    assert_eq!(
        (removed.state.as_str(), removed.session_count),
        ("removed", 0)
    );
    assert!(store.user_sessions("farm1", "a").await.unwrap().is_empty());
}
