//! The plug-in's own picture of the farm, built only from the broker's notifications (it never
//! reads the broker's database): each machine with its state, drain flag and weight, and the
//! sessions on it with their state.
//!
//! The broker sends, after every `Initialize` (when it starts, or when this plug-in comes back):
//! for each machine ADDED (the whole machine), its sessions as RESYNC batches (the last one with
//! `last_batch` set) and CHANGED (the state); then live notifications in order. So the view is
//! cleared on `Initialize` and rebuilt from what follows.
//!
//! Notifications are applied leniently: anything the view cannot use (a session of a machine it
//! has never heard of, an unknown enum value) is skipped and reported back as a warning, never
//! as an error, because a plug-in that fails a notification makes the broker start over with a
//! new `Initialize` and a full resync.

use std::collections::{BTreeMap, HashMap};
use tsbroker_common::model::{SessionEventKind, SessionState};
use tsbroker_common::proto::v1 as pb;

/// Things a notification carried that the view skipped, in words, for the log.
pub type Warnings = Vec<String>;

/// A session as the view knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionView {
    pub user_name: String,
    pub domain: String,
    pub state: SessionState,
}

/// A machine as the view knows it, with its sessions by session number.
#[derive(Clone, Debug, Default)]
pub struct MachineView {
    pub name: String,
    pub farm: String,
    pub address: String,
    pub state: pb::MachineState,
    pub draining: bool,
    /// The machine's effective weight (0 until the broker has said).
    pub weight: u32,
    pub sessions: BTreeMap<u32, SessionView>,
    /// The batches of a RESYNC received so far; they replace `sessions` at the last batch.
    resync: Option<BTreeMap<u32, SessionView>>,
    /// Set once a whole RESYNC has come in: before that `sessions` may be missing some.
    resynced: bool,
}

impl MachineView {
    pub fn active_sessions(&self) -> usize {
        self.count_sessions(SessionState::Active)
    }

    pub fn disconnected_sessions(&self) -> usize {
        self.count_sessions(SessionState::Disconnected)
    }

    fn count_sessions(&self, state: SessionState) -> usize {
        self.sessions
            .values()
            .filter(|session| session.state == state)
            .count()
    }

    /// True while a RESYNC of this machine's sessions has started and not finished.
    #[cfg(test)]
    pub fn resync_in_progress(&self) -> bool {
        self.resync.is_some()
    }

    /// True once the machine's full session list has arrived (a whole RESYNC), so that its
    /// session counts can be trusted.
    pub fn sessions_known(&self) -> bool {
        self.resynced
    }

    /// Takes every field of a full machine description (ADDED).
    fn take_all(&mut self, machine: &pb::Machine) {
        self.name.clone_from(&machine.name);
        self.farm.clone_from(&machine.farm);
        self.address.clone_from(&machine.address);
        self.state = pb::MachineState::try_from(machine.state).unwrap_or_default();
        self.draining = machine.draining;
        self.weight = machine.weight;
    }

    /// Takes the fields a CHANGED names in `changed_fields` ("state", "draining", "weight";
    /// others are not kept here). A CHANGED that names none (from a broker older than that
    /// field) is read by its set fields: protobuf cannot tell "not set" from a zero value, so
    /// zero values are skipped, which loses only an undrain until the next ADDED.
    fn take_changed(&mut self, machine: &pb::Machine, changed_fields: &[String]) {
        let state = pb::MachineState::try_from(machine.state).unwrap_or_default();
        if changed_fields.is_empty() {
            if state != pb::MachineState::Unspecified {
                self.state = state;
            }
            self.draining |= machine.draining;
            if machine.weight != 0 {
                self.weight = machine.weight;
            }
            return;
        }
        for field in changed_fields {
            match field.as_str() {
                "state" => self.state = state,
                "draining" => self.draining = machine.draining,
                "weight" => self.weight = machine.weight,
                _ => {}
            }
        }
    }
}

/// Every machine the plug-in has been told about, by machine id.
#[derive(Debug, Default)]
pub struct FarmView {
    machines: HashMap<String, MachineView>,
}

impl FarmView {
    /// Forgets everything: called on `Initialize`, which a full resync follows.
    pub fn clear(&mut self) {
        self.machines.clear();
    }

    pub fn machine(&self, machine_id: &str) -> Option<&MachineView> {
        self.machines.get(machine_id)
    }

    pub fn machine_count(&self) -> usize {
        self.machines.len()
    }

    pub fn session_count(&self) -> usize {
        self.machines
            .values()
            .map(|machine| machine.sessions.len())
            .sum()
    }

    /// Applies a `MachineChangeNotification`.
    pub fn apply_machine_change(
        &mut self,
        request: &pb::MachineChangeNotificationRequest,
    ) -> Warnings {
        let machine = request.machine.clone().unwrap_or_default();
        let machine_id = if request.machine_id.is_empty() {
            machine.id.clone()
        } else {
            request.machine_id.clone()
        };
        if machine_id.is_empty() {
            return vec!["machine notification without a machine id".to_owned()];
        }
        match pb::NotificationType::try_from(request.r#type) {
            Ok(pb::NotificationType::Added) => {
                // A machine that comes back is ADDED again; its sessions stay (and count) until
                // the RESYNC that follows replaces them, and a RESYNC left unfinished is dropped.
                let entry = self.machines.entry(machine_id).or_default();
                entry.take_all(&machine);
                entry.resync = None;
                Vec::new()
            }
            Ok(pb::NotificationType::Changed | pb::NotificationType::Resync) => {
                match self.machines.get_mut(&machine_id) {
                    Some(entry) => {
                        entry.take_changed(&machine, &request.changed_fields);
                        Vec::new()
                    }
                    None => vec![format!("CHANGED for unknown machine {machine_id}")],
                }
            }
            Ok(pb::NotificationType::Removed) => {
                self.machines.remove(&machine_id);
                Vec::new()
            }
            Ok(pb::NotificationType::Unspecified) | Err(_) => vec![format!(
                "machine notification of unknown type {} for {machine_id}",
                request.r#type
            )],
        }
    }

    /// Applies a `SessionChangeNotification`: live events, or one batch of a RESYNC.
    pub fn apply_session_change(
        &mut self,
        request: &pb::SessionChangeNotificationRequest,
    ) -> Warnings {
        if request.notification == pb::NotificationType::Resync as i32 {
            self.apply_resync_batch(request)
        } else {
            self.apply_live_events(request)
        }
    }

    /// One batch of a RESYNC: collected until the batch with `last_batch`, which replaces the
    /// machine's sessions with exactly the collected list (an empty RESYNC empties it).
    fn apply_resync_batch(&mut self, request: &pb::SessionChangeNotificationRequest) -> Warnings {
        let Some(machine) = self.machines.get_mut(&request.machine_id) else {
            return vec![format!(
                "RESYNC for unknown machine {:?} ({} sessions skipped)",
                request.machine_id,
                request.changes.len()
            )];
        };
        let collected = machine.resync.get_or_insert_with(BTreeMap::new);
        for change in &request.changes {
            let Some(session) = &change.session else {
                continue;
            };
            // A resynced session carries its state; the event type is a fallback.
            let state = SessionState::from_proto("state", session.state)
                .ok()
                .or_else(|| {
                    SessionEventKind::from_proto(change.r#type)
                        .ok()
                        .and_then(SessionEventKind::resulting_state)
                })
                .unwrap_or(SessionState::Active);
            collected.insert(session.session_id, session_view(session, state));
        }
        if request.last_batch {
            machine.sessions = machine.resync.take().unwrap_or_default();
            machine.resynced = true;
        }
        Vec::new()
    }

    /// Live events, applied in order. They are idempotent (a logon of a session already known
    /// replaces it, a logoff of an unknown session does nothing), so an event that overlaps a
    /// resync does no harm.
    fn apply_live_events(&mut self, request: &pb::SessionChangeNotificationRequest) -> Warnings {
        let mut warnings = Warnings::new();
        for change in &request.changes {
            let Some(session) = &change.session else {
                continue;
            };
            let machine_id = if session.machine_id.is_empty() {
                &request.machine_id
            } else {
                &session.machine_id
            };
            let Some(machine) = self.machines.get_mut(machine_id) else {
                warnings.push(format!(
                    "session {} of unknown machine {machine_id:?}",
                    session.session_id
                ));
                continue;
            };
            let after = match SessionEventKind::from_proto(change.r#type) {
                Ok(kind) => kind.resulting_state(),
                Err(_) => match SessionState::from_proto("state", session.state) {
                    Ok(state) => Some(state),
                    Err(_) => {
                        warnings.push(format!(
                            "session {} on {machine_id}: no event type and no state",
                            session.session_id
                        ));
                        continue;
                    }
                },
            };
            match after {
                Some(state) => {
                    machine
                        .sessions
                        .insert(session.session_id, session_view(session, state));
                }
                None => {
                    machine.sessions.remove(&session.session_id);
                }
            }
        }
        warnings
    }
}

fn session_view(session: &pb::Session, state: SessionState) -> SessionView {
    SessionView {
        user_name: session.user_name.clone(),
        domain: session.domain.clone(),
        state,
    }
}

/// Builders of the broker's notifications, shared by the tests of the view, the policy and the
/// service.
#[cfg(test)]
pub mod testing {
    use tsbroker_common::proto::v1 as pb;

    pub fn machine(id: &str, name: &str, weight: u32) -> pb::Machine {
        pb::Machine {
            id: id.to_owned(),
            name: name.to_owned(),
            farm: "default".to_owned(),
            address: format!("{name}:3389"),
            weight,
            state: pb::MachineState::Joining as i32,
            ..Default::default()
        }
    }

    pub fn machine_notice(
        kind: pb::NotificationType,
        machine: pb::Machine,
    ) -> pb::MachineChangeNotificationRequest {
        pb::MachineChangeNotificationRequest {
            r#type: kind as i32,
            machine_id: machine.id.clone(),
            machine: Some(machine),
            changed_fields: Vec::new(),
        }
    }

    /// CHANGED as the broker sends it: the id and the fields it names.
    pub fn changed(
        id: &str,
        fields: &[&str],
        machine: pb::Machine,
    ) -> pb::MachineChangeNotificationRequest {
        pb::MachineChangeNotificationRequest {
            changed_fields: fields.iter().map(|field| (*field).to_owned()).collect(),
            ..machine_notice(
                pb::NotificationType::Changed,
                pb::Machine {
                    id: id.to_owned(),
                    ..machine
                },
            )
        }
    }

    pub fn added(id: &str, name: &str, weight: u32) -> pb::MachineChangeNotificationRequest {
        machine_notice(pb::NotificationType::Added, machine(id, name, weight))
    }

    /// CHANGED as the broker sends it: only the id, name, farm and state set.
    pub fn changed_state(
        id: &str,
        state: pb::MachineState,
    ) -> pb::MachineChangeNotificationRequest {
        let machine = pb::Machine {
            state: state as i32,
            ..Default::default()
        };
        changed(id, &["state"], machine)
    }

    pub fn session(
        machine_id: &str,
        number: u32,
        user: &str,
        state: pb::SessionState,
    ) -> pb::Session {
        pb::Session {
            machine_id: machine_id.to_owned(),
            session_id: number,
            user_name: user.to_owned(),
            state: state as i32,
            ..Default::default()
        }
    }

    /// One RESYNC batch of `sessions` (type UNSPECIFIED, the state in each session).
    pub fn resync_batch(
        machine_id: &str,
        sessions: Vec<pb::Session>,
        last_batch: bool,
    ) -> pb::SessionChangeNotificationRequest {
        pb::SessionChangeNotificationRequest {
            notification: pb::NotificationType::Resync as i32,
            machine_id: machine_id.to_owned(),
            changes: sessions
                .into_iter()
                .map(|session| pb::SessionChange {
                    r#type: pb::SessionEventType::Unspecified as i32,
                    session: Some(session),
                })
                .collect(),
            last_batch,
        }
    }

    /// Live events of one machine, in order.
    pub fn events(
        machine_id: &str,
        events: &[(pb::SessionEventType, u32, &str)],
    ) -> pb::SessionChangeNotificationRequest {
        pb::SessionChangeNotificationRequest {
            notification: pb::NotificationType::Unspecified as i32,
            machine_id: machine_id.to_owned(),
            changes: events
                .iter()
                .map(|&(kind, number, user)| pb::SessionChange {
                    r#type: kind as i32,
                    session: Some(session(
                        machine_id,
                        number,
                        user,
                        pb::SessionState::Unspecified,
                    )),
                })
                .collect(),
            last_batch: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use pb::SessionEventType::{Disconnect, Logoff, Logon, Reconnect};
    use pb::SessionState::{Active, Disconnected};

    fn states(view: &FarmView, machine_id: &str) -> Vec<(u32, &'static str)> {
        view.machine(machine_id)
            .expect("machine in the view")
            .sessions
            .iter()
            .map(|(number, session)| (*number, session.state.as_str()))
            .collect()
    }

    #[test]
    fn a_joining_machine_goes_through_added_resync_changed() {
        let mut view = FarmView::default();
        assert!(
            view.apply_machine_change(&added("m1", "ts1", 200))
                .is_empty()
        );
        let sessions = vec![
            session("m1", 1, "alice", Active),
            session("m1", 2, "bob", Disconnected),
        ];
        assert!(
            view.apply_session_change(&resync_batch("m1", sessions, true))
                .is_empty()
        );
        assert!(
            view.apply_machine_change(&changed_state("m1", pb::MachineState::Ready))
                .is_empty()
        );

        let machine = view.machine("m1").unwrap();
        assert_eq!(machine.name, "ts1");
        assert_eq!(machine.weight, 200);
        assert_eq!(
            machine.state,
            pb::MachineState::Ready,
            "CHANGED sets the state"
        );
        assert_eq!(
            machine.address, "ts1:3389",
            "CHANGED keeps the fields it does not set"
        );
        assert_eq!(
            (machine.active_sessions(), machine.disconnected_sessions()),
            (1, 1)
        );
    }

    #[test]
    fn live_events_are_applied_in_order() {
        let mut view = FarmView::default();
        view.apply_machine_change(&added("m1", "ts1", 100));
        view.apply_session_change(&resync_batch("m1", Vec::new(), true));
        let warnings = view.apply_session_change(&events(
            "m1",
            &[
                (Logon, 1, "alice"),
                (Logon, 2, "bob"),
                (Disconnect, 1, "alice"),
                (Logon, 3, "carol"),
                (Logoff, 2, "bob"),
                (Disconnect, 3, "carol"),
                (Reconnect, 3, "carol"),
            ],
        ));
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            states(&view, "m1"),
            vec![(1, "disconnected"), (3, "active")]
        );
        // Repeats and events the view missed the start of do no harm.
        view.apply_session_change(&events(
            "m1",
            &[
                (Logon, 3, "carol"),
                (Logoff, 9, "zed"),
                (Disconnect, 4, "dan"),
            ],
        ));
        assert_eq!(
            states(&view, "m1"),
            vec![(1, "disconnected"), (3, "active"), (4, "disconnected")]
        );
    }

    #[test]
    fn resync_batches_replace_the_sessions_at_the_last_batch() {
        let mut view = FarmView::default();
        view.apply_machine_change(&added("m1", "ts1", 100));
        assert!(!view.machine("m1").unwrap().sessions_known());
        view.apply_session_change(&events("m1", &[(Logon, 1, "old"), (Logon, 2, "older")]));
        assert!(
            !view.machine("m1").unwrap().sessions_known(),
            "live events are not a full list"
        );

        // The machine comes back: ADDED again, then 60 sessions in batches of 25, 25 and 10.
        view.apply_machine_change(&added("m1", "ts1", 100));
        assert_eq!(
            view.machine("m1").unwrap().sessions.len(),
            2,
            "ADDED keeps sessions until the resync"
        );
        let all: Vec<_> = (10..70)
            .map(|number| session("m1", number, &format!("u{number}"), Active))
            .collect();
        let batches: Vec<_> = all.chunks(25).map(<[pb::Session]>::to_vec).collect();
        for (index, batch) in batches.iter().enumerate() {
            let last = index + 1 == batches.len();
            view.apply_session_change(&resync_batch("m1", batch.clone(), last));
            let machine = view.machine("m1").unwrap();
            if !last {
                assert!(machine.resync_in_progress());
                assert_eq!(
                    machine.sessions.len(),
                    2,
                    "the old list stands until the last batch"
                );
            }
        }
        let machine = view.machine("m1").unwrap();
        assert!(!machine.resync_in_progress());
        assert!(machine.sessions_known());
        assert_eq!(machine.sessions.len(), 60);
        assert!(
            !machine.sessions.contains_key(&1),
            "sessions missing from the resync are gone"
        );
        assert_eq!(view.session_count(), 60);
    }

    #[test]
    fn an_empty_resync_empties_the_machine_and_touches_no_other() {
        let mut view = FarmView::default();
        view.apply_machine_change(&added("m1", "ts1", 100));
        view.apply_machine_change(&added("m2", "ts2", 100));
        view.apply_session_change(&events("m1", &[(Logon, 1, "alice")]));
        view.apply_session_change(&events("m2", &[(Logon, 1, "bob")]));
        view.apply_session_change(&resync_batch("m1", Vec::new(), true));
        assert!(view.machine("m1").unwrap().sessions.is_empty());
        assert_eq!(view.machine("m2").unwrap().sessions.len(), 1);
    }

    #[test]
    fn an_unfinished_resync_is_dropped_when_the_machine_is_added_again() {
        let mut view = FarmView::default();
        view.apply_machine_change(&added("m1", "ts1", 100));
        view.apply_session_change(&resync_batch(
            "m1",
            vec![session("m1", 1, "half", Active)],
            false,
        ));
        view.apply_machine_change(&added("m1", "ts1", 100));
        view.apply_session_change(&resync_batch(
            "m1",
            vec![session("m1", 2, "whole", Active)],
            true,
        ));
        assert_eq!(states(&view, "m1"), vec![(2, "active")]);
    }

    #[test]
    fn removed_machines_leave_the_view_and_clear_forgets_everything() {
        let mut view = FarmView::default();
        view.apply_machine_change(&added("m1", "ts1", 100));
        view.apply_machine_change(&added("m2", "ts2", 100));
        view.apply_machine_change(&machine_notice(
            pb::NotificationType::Removed,
            machine("m1", "ts1", 100),
        ));
        assert!(view.machine("m1").is_none());
        assert_eq!(view.machine_count(), 1);
        view.clear();
        assert_eq!(view.machine_count(), 0);
    }

    #[test]
    fn drain_weight_and_state_changes() {
        let mut view = FarmView::default();
        view.apply_machine_change(&added("m1", "ts1", 100));
        let drained = pb::Machine {
            draining: true,
            ..Default::default()
        };
        view.apply_machine_change(&changed("m1", &["draining"], drained));
        assert!(view.machine("m1").unwrap().draining);
        view.apply_machine_change(&changed_state("m1", pb::MachineState::Unreachable));
        let machine = view.machine("m1").unwrap();
        assert_eq!(machine.state, pb::MachineState::Unreachable);
        assert!(
            machine.draining,
            "a CHANGED of the state alone keeps the drain flag"
        );
        assert_eq!(machine.weight, 100, "and the weight");
        // An undrain is a zero value: it counts because changed_fields names it.
        view.apply_machine_change(&changed("m1", &["draining"], pb::Machine::default()));
        assert!(!view.machine("m1").unwrap().draining);
        let heavier = pb::Machine {
            weight: 250,
            ..Default::default()
        };
        view.apply_machine_change(&changed("m1", &["weight"], heavier));
        let machine = view.machine("m1").unwrap();
        assert_eq!(
            (machine.weight, machine.state),
            (250, pb::MachineState::Unreachable)
        );
    }

    #[test]
    fn a_changed_without_changed_fields_is_read_by_its_set_fields() {
        let mut view = FarmView::default();
        view.apply_machine_change(&added("m1", "ts1", 100));
        let update = pb::Machine {
            id: "m1".into(),
            state: pb::MachineState::Ready as i32,
            draining: true,
            ..Default::default()
        };
        view.apply_machine_change(&machine_notice(pb::NotificationType::Changed, update));
        let machine = view.machine("m1").unwrap();
        assert_eq!(machine.state, pb::MachineState::Ready);
        assert!(machine.draining);
        assert_eq!(machine.weight, 100, "a zero weight is taken as not set");
    }

    #[test]
    fn what_the_view_cannot_use_is_reported_not_applied() {
        let mut view = FarmView::default();
        assert_eq!(
            view.apply_machine_change(&changed_state("nope", pb::MachineState::Ready))
                .len(),
            1
        );
        assert_eq!(
            view.apply_session_change(&events("nope", &[(Logon, 1, "alice")]))
                .len(),
            1
        );
        assert_eq!(
            view.apply_session_change(&resync_batch("nope", Vec::new(), true))
                .len(),
            1
        );
        assert_eq!(view.machine_count(), 0);
    }
}
