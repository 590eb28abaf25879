//! What runs of session events do to the sessions table, worked out in memory: given the rows
//! the events touch as they are in the database, every event is applied in order exactly as
//! the one-event-at-a-time statements did (upsert, delete, the same repairs and outcomes), and
//! what is left is each touched session's final row. The transaction then writes each session
//! once: a multi-row delete of those that ended, a multi-row upsert of the others (absolute
//! values: the merging of the client address and logon time already happened here). A RESYNC
//! (`plan_resync`) likewise becomes the rows that differ from what is stored, and the deletes.

use crate::store::EventOutcome;
use crate::store::sql::session_event_outcome;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use tsbroker_common::model::{self, SessionEvent, SessionState};
use uuid::Uuid;

/// A session row, as stored.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct SessionRow {
    pub machine_id: Uuid,
    pub session_id: i64,
    pub farm: String,
    pub user_name: String,
    pub user_key: String,
    pub domain: String,
    pub state: String,
    pub client_address: String,
    pub logon_at: i64,
    pub state_changed_at: i64,
}

/// One machine's run of events (its owner already checked), with the machine's farm.
pub(crate) struct MachineEvents<'a> {
    pub machine: Uuid,
    pub farm: &'a str,
    pub events: &'a [SessionEvent],
}

/// The writes that leave the sessions table as the events would, one by one.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct EventPlan {
    /// Per run, in the order given: one outcome per event.
    pub outcomes: Vec<Vec<EventOutcome>>,
    /// Sessions that existed and ended.
    pub deletes: Vec<(Uuid, i64)>,
    /// Sessions as they are after the events (created or changed).
    pub upserts: Vec<SessionRow>,
    /// (farm, user key) of every LOGON and RECONNECT: that user's pending logon is resolved
    /// (and, for a name that may be cut, the one held for it from the session's client).
    pub resolved_pending: Vec<(String, String)>,
}

/// The sessions the runs touch: what to read before planning.
pub(crate) fn touched_sessions(runs: &[MachineEvents<'_>]) -> Vec<(Uuid, i64)> {
    let keys: BTreeSet<(Uuid, i64)> = runs
        .iter()
        .flat_map(|run| {
            run.events
                .iter()
                .map(|event| (run.machine, i64::from(event.session.session_id)))
        })
        .collect();
    keys.into_iter().collect()
}

/// Applies the runs in order over `existing` (the touched rows as stored; a touched session
/// missing from it does not exist).
pub(crate) fn plan_events(
    runs: &[MachineEvents<'_>],
    existing: HashMap<(Uuid, i64), SessionRow>,
    now: i64,
) -> EventPlan {
    struct Slot {
        existed: bool,
        current: Option<SessionRow>,
        dirty: bool,
    }
    let mut existing = existing;
    let mut slots: BTreeMap<(Uuid, i64), Slot> = BTreeMap::new();
    let mut resolved = BTreeSet::new();
    let mut outcomes = Vec::with_capacity(runs.len());
    for run in runs {
        let mut run_outcomes = Vec::with_capacity(run.events.len());
        for event in run.events {
            let session = &event.session;
            let key = (run.machine, i64::from(session.session_id));
            let slot = slots.entry(key).or_insert_with(|| {
                let current = existing.remove(&key);
                Slot {
                    existed: current.is_some(),
                    current,
                    dirty: false,
                }
            });
            let outcome = match (event.kind.resulting_state(), slot.current.take()) {
                (None, None) => {
                    EventOutcome::Ignored("logoff of a session the broker does not know")
                }
                (None, Some(_)) => {
                    slot.dirty = true;
                    EventOutcome::Applied
                }
                (Some(state), current) => {
                    let user_key = model::user_key(&session.user_name);
                    let known_user = current.as_ref().map(|row| row.user_key.as_str());
                    let outcome = session_event_outcome(event.kind, known_user, &user_key);
                    // What the upsert's ON CONFLICT clause did: keep the address when the
                    // event has none, keep the logon time while the user stays the same.
                    let client_address = match (&current, session.client_address.is_empty()) {
                        (Some(row), true) => row.client_address.clone(),
                        _ => session.client_address.clone(),
                    };
                    let logon_at = match &current {
                        Some(row) if row.user_key == user_key => row.logon_at,
                        _ => session.logon_time_ms.unwrap_or(now),
                    };
                    if state == SessionState::Active {
                        resolved.insert((run.farm.to_owned(), user_key.clone()));
                        if let Some(cut_key) = crate::decision::cut_name::cut_logon_key_of_session(
                            &session.user_name,
                            &session.domain,
                            &client_address,
                        ) {
                            resolved.insert((run.farm.to_owned(), cut_key));
                        }
                    }
                    slot.current = Some(SessionRow {
                        machine_id: run.machine,
                        session_id: key.1,
                        farm: current.map_or_else(|| run.farm.to_owned(), |row| row.farm),
                        user_name: session.user_name.clone(),
                        user_key,
                        domain: session.domain.clone(),
                        state: state.as_str().to_owned(),
                        client_address,
                        logon_at,
                        state_changed_at: now,
                    });
                    slot.dirty = true;
                    outcome
                }
            };
            run_outcomes.push(outcome);
        }
        outcomes.push(run_outcomes);
    }
    let mut plan = EventPlan {
        outcomes,
        resolved_pending: resolved.into_iter().collect(),
        ..EventPlan::default()
    };
    for (key, slot) in slots {
        match (slot.dirty, slot.current, slot.existed) {
            (true, Some(row), _) => plan.upserts.push(row),
            (true, None, true) => plan.deletes.push(key),
            _ => {}
        }
    }
    plan
}

/// What a RESYNC writes: the machine's sessions become exactly `sessions` (the last entry wins
/// for a session id listed twice), but a session that is already stored as listed is left
/// alone, so a broker restart, where every agent resyncs what the broker already holds,
/// rewrites nothing. A session of the same user keeps its logon time when the agent does not
/// send one, and its state-change time while its state stays the same.
pub(crate) fn plan_resync(
    machine: Uuid,
    farm: &str,
    sessions: &[tsbroker_common::model::SessionInfo],
    mut existing: HashMap<i64, SessionRow>,
    now: i64,
) -> (Vec<SessionRow>, Vec<(Uuid, i64)>) {
    let mut wanted = BTreeMap::new();
    for session in sessions {
        wanted.insert(i64::from(session.session_id), session);
    }
    let mut upserts = Vec::new();
    for (session_id, session) in wanted {
        let user_key = model::user_key(&session.user_name);
        let stored = existing
            .remove(&session_id)
            .filter(|row| row.user_key == user_key);
        let state = session.state.as_str();
        let row = SessionRow {
            machine_id: machine,
            session_id,
            farm: stored
                .as_ref()
                .map_or_else(|| farm.to_owned(), |row| row.farm.clone()),
            user_name: session.user_name.clone(),
            user_key,
            domain: session.domain.clone(),
            state: state.to_owned(),
            client_address: session.client_address.clone(),
            logon_at: session
                .logon_time_ms
                .or(stored.as_ref().map(|row| row.logon_at))
                .unwrap_or(now),
            state_changed_at: match &stored {
                Some(row) if row.state == state => row.state_changed_at,
                _ => now,
            },
        };
        if stored.as_ref() != Some(&row) {
            upserts.push(row);
        }
    }
    let mut deletes: Vec<(Uuid, i64)> = existing.into_keys().map(|id| (machine, id)).collect();
    deletes.sort_unstable();
    (upserts, deletes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsbroker_common::model::{SessionEventKind, SessionInfo};

    const NOW: i64 = 1_000;

    fn event(kind: SessionEventKind, id: u32, user: &str, address: &str) -> SessionEvent {
        SessionEvent {
            kind,
            session: SessionInfo {
                session_id: id,
                user_name: user.to_owned(),
                domain: String::new(),
                state: kind.resulting_state().unwrap_or(SessionState::Active),
                client_address: address.to_owned(),
                logon_time_ms: Some(10 * i64::from(id)),
            },
        }
    }

    fn row(machine: Uuid, id: i64, user: &str, address: &str, logon_at: i64) -> SessionRow {
        SessionRow {
            machine_id: machine,
            session_id: id,
            farm: "f".into(),
            user_name: user.into(),
            user_key: user.to_lowercase(),
            domain: String::new(),
            state: "active".into(),
            client_address: address.into(),
            logon_at,
            state_changed_at: 0,
        }
    }

    #[test]
    fn a_session_written_many_times_is_written_once_as_it_ends() {
        use SessionEventKind::*;
        let machine = Uuid::from_u128(1);
        let events = [
            event(Logon, 1, "Alice", "10.0.0.1:1"),
            event(Disconnect, 1, "alice", ""),
            event(Reconnect, 1, "alice", ""),
            event(Logon, 2, "bob", ""),
            event(Logoff, 2, "bob", ""),
            event(Logoff, 3, "carol", ""),
        ];
        let runs = [MachineEvents {
            machine,
            farm: "f",
            events: &events,
        }];
        assert_eq!(
            touched_sessions(&runs),
            vec![(machine, 1), (machine, 2), (machine, 3)]
        );
        let existing = HashMap::from([((machine, 3), row(machine, 3, "carol", "", 5))]);
        let plan = plan_events(&runs, existing, NOW);
        assert_eq!(plan.outcomes[0][..5], [EventOutcome::Applied; 5]);
        assert_eq!(plan.deletes, vec![(machine, 3)]);
        assert_eq!(plan.upserts.len(), 1);
        let alice = &plan.upserts[0];
        assert_eq!(
            (
                alice.user_key.as_str(),
                alice.state.as_str(),
                alice.client_address.as_str()
            ),
            ("alice", "active", "10.0.0.1:1")
        );
        assert_eq!(
            alice.logon_at, 10,
            "the logon time of the first logon stays"
        );
        assert_eq!(
            plan.resolved_pending,
            vec![
                ("f".to_owned(), "alice".to_owned()),
                ("f".to_owned(), "bob".to_owned())
            ]
        );
    }

    #[test]
    fn repairs_and_merges_follow_the_stored_row() {
        use SessionEventKind::*;
        let machine = Uuid::from_u128(1);
        let events = [
            // Known session, same user, no address: address and logon time stay.
            event(Disconnect, 1, "ALICE", ""),
            // Known session of another user: replaced, new logon time.
            event(Reconnect, 2, "dave", ""),
            // Unknown logoff, and an unknown session's disconnect (created).
            event(Logoff, 9, "x", ""),
            event(Disconnect, 4, "erin", ""),
            // A user changes and changes back: the second change takes the event's time.
            event(Disconnect, 5, "frank", ""),
            event(Disconnect, 5, "gina", ""),
        ];
        let runs = [MachineEvents {
            machine,
            farm: "f",
            events: &events,
        }];
        let existing = HashMap::from([
            ((machine, 1), row(machine, 1, "alice", "1.1.1.1:1", 3)),
            ((machine, 2), row(machine, 2, "bob", "2.2.2.2:2", 4)),
            ((machine, 5), row(machine, 5, "gina", "5.5.5.5:5", 6)),
        ]);
        let plan = plan_events(&runs, existing, NOW);
        let outcomes = &plan.outcomes[0];
        assert_eq!(outcomes[0], EventOutcome::Applied);
        assert!(matches!(outcomes[1], EventOutcome::Repaired(_)));
        assert!(matches!(outcomes[2], EventOutcome::Ignored(_)));
        assert!(matches!(outcomes[3], EventOutcome::Repaired(_)));
        let by_id: HashMap<i64, &SessionRow> = plan
            .upserts
            .iter()
            .map(|row| (row.session_id, row))
            .collect();
        assert_eq!(
            (by_id[&1].client_address.as_str(), by_id[&1].logon_at),
            ("1.1.1.1:1", 3)
        );
        assert_eq!(
            (by_id[&2].user_key.as_str(), by_id[&2].logon_at),
            ("dave", 20)
        );
        assert_eq!(
            (by_id[&4].state.as_str(), by_id[&4].client_address.as_str()),
            ("disconnected", "")
        );
        assert_eq!(
            (by_id[&5].logon_at, by_id[&5].client_address.as_str()),
            (50, "5.5.5.5:5")
        );
        assert!(plan.deletes.is_empty());
        assert_eq!(
            plan.resolved_pending,
            vec![("f".to_owned(), "dave".to_owned())]
        );
    }

    #[test]
    fn a_resync_of_what_is_stored_writes_nothing() {
        let machine = Uuid::from_u128(3);
        let stored = |id: i64, user: &str, state: &str| SessionRow {
            state: state.into(),
            ..row(machine, id, user, "", 10 * id)
        };
        let info = |id: u32, user: &str, state: SessionState, logon: Option<i64>| SessionInfo {
            session_id: id,
            user_name: user.into(),
            domain: String::new(),
            state,
            client_address: String::new(),
            logon_time_ms: logon,
        };
        let existing = HashMap::from([
            (1, stored(1, "alice", "active")),
            (2, stored(2, "bob", "active")),
            (3, stored(3, "carol", "active")),
            (4, stored(4, "dave", "active")),
        ]);
        let sessions = [
            // Unchanged (no logon time sent: the stored one stays).
            info(1, "alice", SessionState::Active, None),
            // Now disconnected.
            info(2, "bob", SessionState::Disconnected, Some(20)),
            // Another user in the same session.
            info(3, "erin", SessionState::Active, None),
            // New; listed twice, the last entry wins.
            info(5, "fred", SessionState::Active, Some(1)),
            info(5, "fred", SessionState::Disconnected, Some(2)),
        ];
        let (upserts, deletes) = plan_resync(machine, "f", &sessions, existing, NOW);
        assert_eq!(deletes, vec![(machine, 4)]);
        let by_id: HashMap<i64, &SessionRow> =
            upserts.iter().map(|row| (row.session_id, row)).collect();
        assert_eq!(by_id.len(), 3, "{upserts:?}");
        assert_eq!(
            (
                by_id[&2].state.as_str(),
                by_id[&2].logon_at,
                by_id[&2].state_changed_at
            ),
            ("disconnected", 20, NOW)
        );
        assert_eq!(
            (by_id[&3].user_key.as_str(), by_id[&3].logon_at),
            ("erin", NOW)
        );
        assert_eq!(
            (by_id[&5].state.as_str(), by_id[&5].logon_at),
            ("disconnected", 2)
        );
    }

    #[test]
    fn runs_of_the_same_machine_apply_in_order() {
        use SessionEventKind::*;
        let machine = Uuid::from_u128(7);
        let first = [event(Logon, 1, "a", "")];
        let second = [event(Logoff, 1, "a", ""), event(Logoff, 1, "a", "")];
        let runs = [
            MachineEvents {
                machine,
                farm: "f",
                events: &first,
            },
            MachineEvents {
                machine,
                farm: "f",
                events: &second,
            },
        ];
        let plan = plan_events(&runs, HashMap::new(), NOW);
        assert_eq!(plan.outcomes[0], vec![EventOutcome::Applied]);
        assert_eq!(plan.outcomes[1][0], EventOutcome::Applied);
        assert!(matches!(plan.outcomes[1][1], EventOutcome::Ignored(_)));
        assert!(plan.upserts.is_empty() && plan.deletes.is_empty());
    }
}
