//! A plug-in's full RESYNC: ADDED, the sessions (batched) and the state of every machine of
//! its farms, as decisions see them. Changes keep being queued while it runs (a slow plug-in
//! may take minutes over a large farm); each machine's snapshot notes where the queue stood
//! when it was read, so that what the snapshot already holds is not sent again after it.

use super::{PluginLink, Queued};
use crate::metrics::PluginLabels;
use crate::plugin::notices::{self, Notice};
use crate::store::{MachineRecord, SessionFilter, Store};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use tsbroker_common::model::MachineState;
use tsbroker_common::proto::v1 as pb;
use uuid::Uuid;

/// Per machine of the last full resync: the queue's sequence numbers when its row and its
/// sessions were read. A queued notice numbered below them was committed before that read,
/// so the snapshot already holds it.
#[derive(Debug, Default)]
pub struct ResyncCutoffs {
    by_machine: HashMap<String, (u64, u64)>,
}

impl ResyncCutoffs {
    /// Whether the snapshot sent for the notice's machine is newer than the notice.
    pub fn covers(&self, queued: &Queued) -> bool {
        let Some(&(row_read, sessions_read)) = self.by_machine.get(queued.notice.machine_id())
        else {
            return false;
        };
        match queued.notice {
            Notice::Machine(_) => queued.seq < row_read,
            Notice::Sessions(_) => queued.seq < sessions_read,
        }
    }
}

impl PluginLink {
    /// The next number the queue will give a notice.
    fn queue_position(&self) -> u64 {
        self.next_seq.load(Ordering::Acquire)
    }

    pub(super) async fn full_resync(&self, store: &dyn Store) -> Result<ResyncCutoffs, String> {
        self.metrics
            .plugin_resyncs
            .get_or_create(&PluginLabels {
                plugin: self.address.clone(),
            })
            .inc();
        let mut cutoffs = ResyncCutoffs::default();
        // The plug-in was just initialized: it knows no machine's state until this tells it.
        if let Ok(mut told) = self.told_states.lock() {
            told.clear();
        }
        for farm in &self.farms {
            let rows_read = self.queue_position();
            let machines = store
                .list_machines(Some(farm))
                .await
                .map_err(|error| error.to_string())?;
            let lease_cutoff = self.decision.lease_cutoff(store.now());
            for machine in machines {
                // A machine that left is not in the farm (its REMOVED was sent when it left).
                if machine.machine_state() == MachineState::Removed {
                    continue;
                }
                let machine = as_decisions_see_it(machine, lease_cutoff);
                let sessions_read = self.queue_position();
                let sessions = all_sessions(store, machine.id).await?;
                let id = machine.id.to_string();
                for notice in notices::machine_whole(&machine, sessions, self.settings.batch_size) {
                    self.send(notice).await?;
                }
                cutoffs.by_machine.insert(id, (rows_read, sessions_read));
            }
        }
        Ok(cutoffs)
    }
}

impl PluginLink {
    /// Queues a machine whole (ADDED, RESYNC of its sessions, CHANGED state; REMOVED for one
    /// that left) after another replica changed it: that replica's live notifications go to
    /// its own link only, so each replica keeps its plug-in's view of the farm whole.
    pub async fn queue_machine_resync(
        &self,
        store: &dyn Store,
        machine: MachineRecord,
    ) -> Result<(), String> {
        if !self.is_up() {
            // The next Initialize's full resync covers it.
            return Ok(());
        }
        let id = machine.id.to_string();
        if machine.machine_state() == MachineState::Removed {
            self.notify(notices::machine_removed(&id, &machine.name, &machine.farm));
            return Ok(());
        }
        let lease_cutoff = self.decision.lease_cutoff(store.now());
        let machine = as_decisions_see_it(machine, lease_cutoff);
        let sessions = all_sessions(store, machine.id).await?;
        for notice in notices::machine_whole(&machine, sessions, self.settings.batch_size) {
            self.notify(notice);
        }
        Ok(())
    }
}

/// What the plug-in was last told of a machine.
pub(crate) struct Told {
    pub state: i32,
    pub name: String,
    pub farm: String,
}

impl PluginLink {
    /// Notes the state a machine notice tells the plug-in (ADDED, REMOVED, or CHANGED naming
    /// the state).
    pub(super) fn note_state_told(&self, request: &pb::MachineChangeNotificationRequest) {
        let Some(machine) = &request.machine else {
            return;
        };
        let tells_state = request.r#type != pb::NotificationType::Changed as i32
            || request.changed_fields.iter().any(|field| field == "state");
        if tells_state && let Ok(mut told) = self.told_states.lock() {
            let entry = Told {
                state: machine.state,
                name: machine.name.clone(),
                farm: machine.farm.clone(),
            };
            told.insert(request.machine_id.clone(), entry);
        }
    }

    /// Tells the plug-in that a machine it knows is gone from the database (another replica's
    /// agent left, or an administrator removed it there): REMOVED, unless it was told so.
    pub fn machine_gone(&self, machine_id: &str) {
        let known = self.told_states.lock().ok().and_then(|told| {
            told.get(machine_id)
                .filter(|told| told.state != pb::MachineState::Removed as i32)
                .map(|told| (told.name.clone(), told.farm.clone()))
        });
        if let Some((name, farm)) = known {
            self.notify(notices::machine_removed(machine_id, &name, &farm));
        }
    }

    /// Tells the plug-in of machines whose state as decisions see it is no longer the one it
    /// was told: a lease that ran out with no stream to end (an agent that stopped while no
    /// broker ran, a replica killed with its agents' streams) changes nothing in the database.
    pub(super) async fn follow_leases(&self, store: &dyn Store) {
        for farm in &self.farms {
            let Ok(machines) = store.list_machines(Some(farm)).await else {
                return;
            };
            let lease_cutoff = self.decision.lease_cutoff(store.now());
            for machine in machines {
                // A machine's leaving is told when it happens, not found here.
                if machine.machine_state() == MachineState::Removed {
                    continue;
                }
                let machine = as_decisions_see_it(machine, lease_cutoff);
                let state = machine.machine_state().to_proto() as i32;
                let stale = self
                    .told_states
                    .lock()
                    .ok()
                    .and_then(|told| told.get(&machine.id.to_string()).map(|told| told.state))
                    .is_some_and(|told| told != state);
                if stale {
                    self.notify(notices::machine_state_changed(&machine));
                }
            }
        }
    }
}

/// A READY or JOINING machine whose lease ran out is UNREACHABLE, as decisions take it (a
/// machine whose agent stopped while no broker was running is still READY in its row).
fn as_decisions_see_it(mut machine: MachineRecord, lease_cutoff: i64) -> MachineRecord {
    let live = matches!(
        machine.machine_state(),
        MachineState::Ready | MachineState::Joining
    );
    if live && machine.last_seen_at < lease_cutoff {
        machine.state = MachineState::Unreachable.as_str().to_owned();
    }
    machine
}

/// Every session of a machine, page by page.
async fn all_sessions(store: &dyn Store, machine: Uuid) -> Result<Vec<pb::Session>, String> {
    let mut sessions = Vec::new();
    let mut filter = SessionFilter {
        machine: Some(machine),
        limit: 10_000,
        ..SessionFilter::default()
    };
    loop {
        let page = store
            .list_sessions(&filter)
            .await
            .map_err(|error| error.to_string())?;
        sessions.extend(page.iter().map(notices::session_from_record));
        match page.last() {
            Some(last) if page.len() == filter.limit as usize => {
                filter.after = Some((last.machine_id, last.session_id))
            }
            _ => return Ok(sessions),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::machine_load;
    use tsbroker_common::model::SessionEventKind;

    #[test]
    fn a_machine_whose_lease_ran_out_is_unreachable_and_others_keep_their_state() {
        let mut silent = MachineRecord::clone(&machine_load(0, 100, 0).machine);
        silent.last_seen_at = 1_000;
        assert_eq!(
            as_decisions_see_it(silent.clone(), 2_000).machine_state(),
            MachineState::Unreachable
        );
        assert_eq!(
            as_decisions_see_it(silent.clone(), 500).machine_state(),
            MachineState::Ready
        );
        silent.state = MachineState::Removed.as_str().to_owned();
        assert_eq!(
            as_decisions_see_it(silent, 2_000).machine_state(),
            MachineState::Removed
        );
    }

    #[test]
    fn queued_notices_older_than_their_machines_snapshot_are_covered() {
        let machine = MachineRecord::clone(&machine_load(0, 100, 0).machine);
        let other = MachineRecord::clone(&machine_load(1, 100, 0).machine);
        let mut cutoffs = ResyncCutoffs::default();
        cutoffs.by_machine.insert(machine.id.to_string(), (10, 20));
        let queued = |seq, notice| Queued { seq, notice };
        let session = |of: &MachineRecord| {
            let info = tsbroker_common::model::SessionInfo {
                session_id: 1,
                user_name: "alice".into(),
                domain: String::new(),
                state: tsbroker_common::model::SessionState::Active,
                client_address: String::new(),
                logon_time_ms: None,
            };
            notices::session_event(
                of,
                SessionEventKind::Logon,
                notices::session_from_info(of, &info, 0),
            )
        };
        let changed = |of: &MachineRecord| notices::machine_state_changed(of);
        // The machine's row was read at 10, its sessions at 20.
        assert!(cutoffs.covers(&queued(9, changed(&machine))));
        assert!(!cutoffs.covers(&queued(10, changed(&machine))));
        assert!(cutoffs.covers(&queued(19, session(&machine))));
        assert!(!cutoffs.covers(&queued(20, session(&machine))));
        // A machine the resync did not send: everything queued for it goes out.
        assert!(!cutoffs.covers(&queued(0, session(&other))));
        assert!(!cutoffs.covers(&queued(0, changed(&other))));
    }
}
