//! Group commit of the agent streams' writes (`store::ingest`), on both stores: many streams'
//! writes in one transaction, each machine's order kept, nothing acknowledged that was not
//! committed, and a write the database refuses failing alone.

use crate::conformance::{NOW, description, session};
use crate::support::on_both_stores;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;
use tsbroker::store::ingest::{IngestSettings, IngestTarget, IngestWriter};
use tsbroker::store::{
    self, Choice, EventOutcome, IngestItem, IngestOp, IngestReply, ItemResult, MachineLoad,
    Placement, PlacementRequest, Store, StoreError, StoreResult, StreamMachineState,
};
use tsbroker_common::model::{LoadReport, SessionEvent, SessionEventKind, SessionState};
use tsbroker_tests::{Backend, TestDatabase};
use uuid::Uuid;

on_both_stores!(
    many_streams_share_one_transaction,
    each_machine_keeps_its_order_within_a_group,
    a_failed_transaction_commits_nothing,
    the_writer_answers_only_after_the_commit,
    a_write_the_database_refuses_fails_alone,
    a_stream_end_marks_only_its_own_machine,
);

const FARM: &str = "farm1";

fn event(kind: SessionEventKind, session_id: u32, user: &str) -> SessionEvent {
    let state = kind.resulting_state().unwrap_or(SessionState::Active);
    SessionEvent {
        kind,
        session: session(session_id, user, state),
    }
}

fn item(machine: Uuid, connection: Uuid, op: IngestOp) -> IngestItem {
    IngestItem {
        machine,
        connection,
        op,
    }
}

/// ADDED (through one group for all), RESYNC (empty) and READY of `count` machines.
async fn ready_machines(store: &dyn Store, count: usize) -> Vec<(Uuid, Uuid)> {
    let added: Vec<IngestItem> = (0..count)
        .map(|index| {
            IngestItem::added(
                description(&format!("ts{index}"), 100),
                "session-count",
                Uuid::new_v4(),
            )
        })
        .collect();
    let results = store.apply_ingest(&added, NOW).await.unwrap();
    let machines: Vec<(Uuid, Uuid)> = added
        .iter()
        .zip(results)
        .map(|(item, result)| {
            let record = result.unwrap().into_machine().unwrap();
            assert_eq!(record.state, "joining");
            assert_eq!(record.connection_id, Some(item.connection));
            (item.machine, item.connection)
        })
        .collect();
    let resync_and_ready: Vec<IngestItem> = machines
        .iter()
        .map(|&(machine, connection)| item(machine, connection, IngestOp::Resync(vec![])))
        .collect();
    for result in store.apply_ingest(&resync_and_ready, NOW).await.unwrap() {
        result.unwrap();
    }
    for &(machine, connection) in &machines {
        store
            .set_machine_state(machine, connection, StreamMachineState::Ready, NOW)
            .await
            .unwrap();
    }
    machines
}

async fn open(database: &TestDatabase) -> Arc<dyn Store> {
    store::open(&database.url).await.expect("open store")
}

fn first_candidate(_policy: &str, candidates: &[MachineLoad]) -> Choice {
    candidates
        .first()
        .map_or(Choice::Nothing, |load| Choice::Machine(load.machine.id))
}

async fn many_streams_share_one_transaction(database: &TestDatabase) {
    let store = open(database).await;
    let machines = ready_machines(store.as_ref(), 40).await;
    // A pending logon for user0, resolved by its logon below.
    let request = PlacementRequest {
        farm: FARM,
        user_key: "user0",
        now: NOW,
        lease_cutoff: NOW - 15_000,
        pending_ttl_ms: 30_000,
        max_pending_per_machine: 20,
        slow_start_ms: 0,
        excluded: &[],
        check_sessions: false,
    };
    let placed = store.place_logon(&request, &first_candidate).await.unwrap();
    assert!(matches!(placed, Placement::Placed(_)), "{placed:?}");

    let mut group: Vec<IngestItem> = Vec::new();
    for (index, &(machine, connection)) in machines.iter().enumerate() {
        let user = format!("user{index}");
        group.push(item(
            machine,
            connection,
            IngestOp::Events(vec![
                event(SessionEventKind::Logon, 1, &user),
                event(SessionEventKind::Logon, 2, &format!("{user}b")),
                event(SessionEventKind::Disconnect, 2, &format!("{user}b")),
            ]),
        ));
    }
    // Load reports of half the machines, in the same group (a machine's second item).
    for &(machine, connection) in machines.iter().take(20) {
        let load = LoadReport {
            session_count: 2,
            cpu_percent: 42.0,
            memory_percent: 7.0,
            pending_logons: 0,
        };
        group.push(item(machine, connection, IngestOp::Load(load)));
    }
    // A stream that lost its machine, and a machine that does not exist.
    group.push(item(
        machines[0].0,
        Uuid::new_v4(),
        IngestOp::Events(vec![event(SessionEventKind::Logon, 9, "intruder")]),
    ));
    group.push(item(
        Uuid::new_v4(),
        Uuid::new_v4(),
        IngestOp::Events(vec![event(SessionEventKind::Logon, 9, "ghost")]),
    ));
    let results = store.apply_ingest(&group, NOW + 1).await.unwrap();
    assert_eq!(results.len(), group.len());
    for result in &results[..40] {
        assert_eq!(
            result.as_ref().unwrap(),
            &IngestReply::Outcomes(vec![EventOutcome::Applied; 3])
        );
    }
    for result in &results[40..60] {
        assert_eq!(result.as_ref().unwrap(), &IngestReply::Done);
    }
    assert!(
        matches!(results[60], Err(StoreError::Superseded)),
        "{:?}",
        results[60]
    );
    assert!(
        matches!(results[61], Err(StoreError::NotFound(_))),
        "{:?}",
        results[61]
    );

    for (index, &(machine, _)) in machines.iter().enumerate() {
        let record = store.get_machine(machine).await.unwrap().unwrap();
        assert_eq!(record.session_count, 2, "{}", record.name);
        assert_eq!(record.last_seen_at, NOW + 1);
        let expected_cpu = if index < 20 { Some(42.0) } else { None };
        assert_eq!(record.load_cpu, expected_cpu, "{}", record.name);
        let sessions = store
            .user_sessions(FARM, &format!("user{index}b"))
            .await
            .unwrap();
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].state, "disconnected");
    }
    assert!(
        store
            .user_sessions(FARM, "intruder")
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .pending_logon(FARM, "user0", NOW + 1)
            .await
            .unwrap()
            .is_none()
    );
}

async fn each_machine_keeps_its_order_within_a_group(database: &TestDatabase) {
    let store = open(database).await;
    let machines = ready_machines(store.as_ref(), 2).await;
    let (a, a_connection) = machines[0];
    let (b, b_connection) = machines[1];
    let group = vec![
        item(
            a,
            a_connection,
            IngestOp::Events(vec![event(SessionEventKind::Logon, 1, "alice")]),
        ),
        item(
            b,
            b_connection,
            IngestOp::Events(vec![event(SessionEventKind::Logon, 1, "carol")]),
        ),
        // The RESYNC comes after alice's logon: it removes her session again.
        item(
            a,
            a_connection,
            IngestOp::Resync(vec![session(2, "bob", SessionState::Active)]),
        ),
        item(
            a,
            a_connection,
            IngestOp::Events(vec![
                event(SessionEventKind::Logoff, 1, "alice"),
                event(SessionEventKind::Disconnect, 2, "bob"),
            ]),
        ),
        item(
            b,
            b_connection,
            IngestOp::Events(vec![event(SessionEventKind::Logoff, 1, "carol")]),
        ),
        // A newer stream takes machine b over; b's old stream is refused after that.
        IngestItem::added(description("ts1", 100), "session-count", Uuid::new_v4()),
        item(
            b,
            b_connection,
            IngestOp::Events(vec![event(SessionEventKind::Logon, 3, "dave")]),
        ),
    ];
    let results = store.apply_ingest(&group, NOW + 1).await.unwrap();
    let outcomes = |index: usize| match &results[index] {
        Ok(IngestReply::Outcomes(outcomes)) => outcomes.clone(),
        other => panic!("item {index}: {other:?}"),
    };
    assert_eq!(outcomes(0), vec![EventOutcome::Applied]);
    assert!(matches!(results[2], Ok(IngestReply::Done)));
    let after_resync = outcomes(3);
    assert!(
        matches!(after_resync[0], EventOutcome::Ignored(_)),
        "alice's session went with the RESYNC: {after_resync:?}"
    );
    assert_eq!(after_resync[1], EventOutcome::Applied);
    assert_eq!(outcomes(4), vec![EventOutcome::Applied]);
    assert!(
        matches!(results[6], Err(StoreError::Superseded)),
        "{:?}",
        results[6]
    );

    assert!(store.user_sessions(FARM, "alice").await.unwrap().is_empty());
    let bob = store.user_sessions(FARM, "bob").await.unwrap();
    assert_eq!(bob.len(), 1);
    assert_eq!(bob[0].state, "disconnected");
    assert!(store.user_sessions(FARM, "carol").await.unwrap().is_empty());
    assert!(store.user_sessions(FARM, "dave").await.unwrap().is_empty());
    assert_eq!(
        store.get_machine(a).await.unwrap().unwrap().session_count,
        1
    );
    let b_record = store.get_machine(b).await.unwrap().unwrap();
    assert_eq!(
        (b_record.session_count, b_record.state.as_str()),
        (0, "joining")
    );
}

/// Makes the database refuse any session of user "poison" (a trigger).
async fn poison_sessions(database: &TestDatabase) {
    match database.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&database.url).await.unwrap();
            sqlx::query(
                "CREATE TRIGGER poison BEFORE INSERT ON sessions \
                 WHEN NEW.user_name = 'poison' BEGIN SELECT RAISE(ABORT, 'poisoned'); END",
            )
            .execute(&pool)
            .await
            .unwrap();
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&database.url).await.unwrap();
            for statement in [
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS \
                 $$ BEGIN IF NEW.user_name = 'poison' THEN RAISE EXCEPTION 'poisoned'; END IF; \
                 RETURN NEW; END $$",
                "CREATE TRIGGER poison BEFORE INSERT ON sessions FOR EACH ROW \
                 EXECUTE FUNCTION poison()",
            ] {
                sqlx::query(statement).execute(&pool).await.unwrap();
            }
            pool.close().await;
        }
    }
}

async fn a_failed_transaction_commits_nothing(database: &TestDatabase) {
    let store = open(database).await;
    let machines = ready_machines(store.as_ref(), 3).await;
    poison_sessions(database).await;
    let mut group: Vec<IngestItem> = machines
        .iter()
        .enumerate()
        .map(|(index, &(machine, connection))| {
            let user = if index == 2 {
                "poison".to_owned()
            } else {
                format!("user{index}")
            };
            item(
                machine,
                connection,
                IngestOp::Events(vec![event(SessionEventKind::Logon, 1, &user)]),
            )
        })
        .collect();
    group.push(item(
        machines[0].0,
        machines[0].1,
        IngestOp::Load(LoadReport {
            cpu_percent: 99.0,
            ..LoadReport::default()
        }),
    ));
    let failed = store.apply_ingest(&group, NOW + 1).await;
    assert!(matches!(failed, Err(StoreError::Internal(_))), "{failed:?}");
    for index in 0..2 {
        assert!(
            store
                .user_sessions(FARM, &format!("user{index}"))
                .await
                .unwrap()
                .is_empty()
        );
    }
    let first = store.get_machine(machines[0].0).await.unwrap().unwrap();
    assert_eq!((first.session_count, first.load_cpu), (0, None));
}

/// The store behind a writer, counting its groups; the first group waits for `gate`, and
/// while `unavailable` is set every group fails as if the database were gone (nothing applied).
struct Observed {
    store: Arc<dyn Store>,
    groups: Mutex<Vec<usize>>,
    gate: Notify,
    gated: AtomicBool,
    unavailable: AtomicBool,
}

#[async_trait::async_trait]
impl IngestTarget for Observed {
    async fn apply_ingest(&self, items: &[IngestItem], now: i64) -> StoreResult<Vec<ItemResult>> {
        if self.gated.swap(false, Ordering::SeqCst) {
            self.gate.notified().await;
        }
        self.groups.lock().unwrap().push(items.len());
        if self.unavailable.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut));
        }
        self.store.apply_ingest(items, now).await
    }
}

async fn the_writer_answers_only_after_the_commit(database: &TestDatabase) {
    let store = open(database).await;
    let machines = ready_machines(store.as_ref(), 30).await;
    let observed = Arc::new(Observed {
        store: store.clone(),
        groups: Mutex::new(Vec::new()),
        gate: Notify::new(),
        gated: AtomicBool::new(true),
        unavailable: AtomicBool::new(false),
    });
    // One transaction at a time, so that what queues behind the first is one group.
    let settings = IngestSettings {
        concurrency: 1,
        ..IngestSettings::for_backend(store.backend())
    };
    let writer = IngestWriter::start(observed.clone(), settings, Default::default());

    // Machine 0's write holds the first group; the 29 others queue meanwhile and share one.
    let submit = |index: usize, session_id: u32| {
        let (machine, connection) = machines[index];
        let writer = writer.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let user = format!("user{index}-{session_id}");
            let events = vec![event(SessionEventKind::Logon, session_id, &user)];
            let outcome = writer.events(machine, connection, events).await;
            // Answered after the commit: the session is there (or, on failure, is not).
            let visible = !store.user_sessions(FARM, &user).await.unwrap().is_empty();
            (outcome, visible)
        })
    };
    let first = submit(0, 1);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let rest: Vec<_> = (1..30).map(|index| submit(index, 1)).collect();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    observed.gate.notify_one();
    let (outcome, visible) = first.await.unwrap();
    assert_eq!(outcome.unwrap(), vec![EventOutcome::Applied]);
    assert!(visible);
    for task in rest {
        let (outcome, visible) = task.await.unwrap();
        assert_eq!(outcome.unwrap(), vec![EventOutcome::Applied]);
        assert!(visible);
    }
    let groups = observed.groups.lock().unwrap().clone();
    assert_eq!(groups, vec![1, 29]);

    // The database is gone for a while: every write of the group fails, none is answered Ok,
    // nothing is applied.
    observed.unavailable.store(true, Ordering::SeqCst);
    let failing: Vec<_> = (0..30).map(|index| submit(index, 2)).collect();
    for task in failing {
        let (outcome, visible) = task.await.unwrap();
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
        assert!(!visible);
    }
    observed.unavailable.store(false, Ordering::SeqCst);
    let (outcome, visible) = submit(3, 3).await.unwrap();
    assert!(outcome.is_ok() && visible);
    drop(writer);
}

async fn a_write_the_database_refuses_fails_alone(database: &TestDatabase) {
    let store = open(database).await;
    let machines = ready_machines(store.as_ref(), 10).await;
    poison_sessions(database).await;
    let writer = IngestWriter::for_store(store.clone(), Default::default());
    let tasks: Vec<_> = machines
        .iter()
        .enumerate()
        .map(|(index, &(machine, connection))| {
            let writer = writer.clone();
            let user = if index == 4 {
                "poison".to_owned()
            } else {
                format!("user{index}")
            };
            tokio::spawn(async move {
                let events = vec![event(SessionEventKind::Logon, 1, &user)];
                writer.events(machine, connection, events).await
            })
        })
        .collect();
    for (index, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.unwrap();
        if index == 4 {
            assert!(
                matches!(outcome, Err(StoreError::Internal(_))),
                "{outcome:?}"
            );
        } else {
            assert_eq!(outcome.unwrap(), vec![EventOutcome::Applied]);
            assert_eq!(
                store
                    .user_sessions(FARM, &format!("user{index}"))
                    .await
                    .unwrap()
                    .len(),
                1
            );
        }
    }
}

async fn a_stream_end_marks_only_its_own_machine(database: &TestDatabase) {
    let store = open(database).await;
    let machines = ready_machines(store.as_ref(), 3).await;
    let group = vec![
        item(machines[0].0, machines[0].1, IngestOp::Unreachable),
        item(machines[1].0, Uuid::new_v4(), IngestOp::Unreachable),
        item(Uuid::new_v4(), Uuid::new_v4(), IngestOp::Unreachable),
        item(
            machines[2].0,
            machines[2].1,
            IngestOp::Load(LoadReport::default()),
        ),
        // Already UNREACHABLE: not marked again.
        item(machines[0].0, machines[0].1, IngestOp::Unreachable),
    ];
    let results = store.apply_ingest(&group, NOW + 1).await.unwrap();
    let marked: Vec<bool> = results
        .into_iter()
        .filter_map(|result| match result.unwrap() {
            IngestReply::Marked(marked) => Some(marked),
            _ => None,
        })
        .collect();
    assert_eq!(marked, vec![true, false, false, false]);
    for (index, expected) in ["unreachable", "ready", "ready"].into_iter().enumerate() {
        let record = store.get_machine(machines[index].0).await.unwrap().unwrap();
        assert_eq!(record.state, expected, "{}", record.name);
    }
}
