//! A batch's working view of the farm for the policy: every machine is classified once per
//! batch, the candidates are kept at the front of one vector, and each pick updates only the
//! machines it changed. Placing a logon then costs the policy's own pass over the candidates,
//! not a copy and a classification of the whole farm per logon.

use super::records::{
    Ineligible, MachineLoad, MachineRecord, PlacementRequest, classify_machines, logon_cap,
};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use uuid::Uuid;

/// What a classification depends on besides the machines (the same for every request of a
/// batch; a request with other terms has the farm classified again).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Terms {
    now: i64,
    lease_cutoff: i64,
    max_pending_per_machine: u32,
    slow_start_ms: i64,
}

impl Terms {
    fn of(request: &PlacementRequest<'_>) -> Self {
        Terms {
            now: request.now,
            lease_cutoff: request.lease_cutoff,
            max_pending_per_machine: request.max_pending_per_machine,
            slow_start_ms: request.slow_start_ms,
        }
    }
}

/// The farm's machines, classified; `loads[..eligible]` are the candidates.
pub(crate) struct CandidateSet {
    loads: Vec<MachineLoad>,
    /// Each load's place in the farm's copy, so the copy is given back in its own order.
    origin: Vec<usize>,
    eligible: usize,
    at: HashMap<Uuid, usize>,
    terms: Terms,
}

impl CandidateSet {
    /// Classifies `machines` for `request`'s terms (its exclusions are applied per request).
    pub fn new(machines: Vec<Arc<MachineRecord>>, request: &PlacementRequest<'_>) -> Self {
        let general = PlacementRequest {
            excluded: &[],
            ..request.clone()
        };
        let classified = classify_machines(machines, &general);
        let count = classified.len();
        let (candidates, ineligible): (Vec<_>, Vec<_>) = classified
            .into_iter()
            .enumerate()
            .partition(|(_, load)| load.ineligible.is_none());
        let eligible = candidates.len();
        let (origin, loads): (Vec<usize>, Vec<MachineLoad>) =
            candidates.into_iter().chain(ineligible).unzip();
        let mut at = HashMap::with_capacity(count);
        for (index, load) in loads.iter().enumerate() {
            at.insert(load.machine.id, index);
        }
        CandidateSet {
            loads,
            origin,
            eligible,
            at,
            terms: Terms::of(request),
        }
    }

    /// Classifies the farm again if `request` has other terms than the set's.
    pub fn follow_terms(&mut self, request: &PlacementRequest<'_>) {
        if Terms::of(request) != self.terms {
            let machines = std::mem::replace(self, CandidateSet::empty()).into_machines();
            *self = CandidateSet::new(machines, request);
        }
    }

    fn empty() -> Self {
        CandidateSet {
            loads: Vec::new(),
            origin: Vec::new(),
            eligible: 0,
            at: HashMap::new(),
            terms: Terms {
                now: 0,
                lease_cutoff: 0,
                max_pending_per_machine: 0,
                slow_start_ms: 0,
            },
        }
    }

    pub fn machine(&self, id: Uuid) -> Option<&Arc<MachineRecord>> {
        self.at.get(&id).map(|&index| &self.loads[index].machine)
    }

    /// The candidates for `request`: the set's, less the machines it excludes.
    pub fn candidates_for(&self, request: &PlacementRequest<'_>) -> Cow<'_, [MachineLoad]> {
        let candidates = &self.loads[..self.eligible];
        if request.excluded.is_empty() {
            return Cow::Borrowed(candidates);
        }
        Cow::Owned(
            candidates
                .iter()
                .filter(|load| !request.excluded.contains(&load.machine.id))
                .cloned()
                .collect(),
        )
    }

    /// Whether `id` is one of `request`'s candidates.
    pub fn is_candidate(&self, id: Uuid, request: &PlacementRequest<'_>) -> bool {
        self.at
            .get(&id)
            .is_some_and(|&index| index < self.eligible && !request.excluded.contains(&id))
    }

    /// Every machine as classified for `request` (its exclusions marked), candidates first.
    pub fn all_for(&self, request: &PlacementRequest<'_>) -> Vec<MachineLoad> {
        let (mut candidates, excluded): (Vec<MachineLoad>, Vec<MachineLoad>) = self.loads
            [..self.eligible]
            .iter()
            .cloned()
            .partition(|load| !request.excluded.contains(&load.machine.id));
        let marked = excluded.into_iter().map(|load| MachineLoad {
            ineligible: Some(Ineligible::Excluded),
            ..load
        });
        let others = self.loads[self.eligible..].iter().map(|load| {
            let excluded = request.excluded.contains(&load.machine.id);
            MachineLoad {
                ineligible: if excluded {
                    Some(Ineligible::Excluded)
                } else {
                    load.ineligible
                },
                ..load.clone()
            }
        });
        candidates.extend(marked.chain(others));
        candidates
    }

    /// Counts `delta` more logons in flight on machine `id` and classifies it again; the
    /// machine as it is now (`None`: not in the set).
    pub fn add_pending(&mut self, id: Uuid, delta: i64) -> Option<&Arc<MachineRecord>> {
        let &index = self.at.get(&id)?;
        let load = &mut self.loads[index];
        let machine = Arc::make_mut(&mut load.machine);
        machine.pending_logons = (machine.pending_logons + delta).max(0);
        let cap = logon_cap(self.terms.max_pending_per_machine, load.ramp);
        load.ineligible = Ineligible::of(&load.machine, self.terms.lease_cutoff, cap);
        let is_candidate = load.ineligible.is_none();
        let mut at = index;
        if index < self.eligible && !is_candidate {
            self.eligible -= 1;
            at = self.eligible;
        } else if index >= self.eligible && is_candidate {
            at = self.eligible;
            self.eligible += 1;
        }
        if at != index {
            self.swap(index, at);
        }
        Some(&self.loads[at].machine)
    }

    fn swap(&mut self, one: usize, other: usize) {
        self.loads.swap(one, other);
        self.origin.swap(one, other);
        self.at.insert(self.loads[one].machine.id, one);
        self.at.insert(self.loads[other].machine.id, other);
    }

    /// The machines, with the batch's changes, in the order they were given.
    pub fn into_machines(self) -> Vec<Arc<MachineRecord>> {
        let mut slots: Vec<Option<Arc<MachineRecord>>> = vec![None; self.loads.len()];
        for (load, origin) in self.loads.into_iter().zip(self.origin) {
            slots[origin] = Some(load.machine);
        }
        slots.into_iter().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::machine_load;

    fn request<'a>(excluded: &'a [Uuid], cap: u32) -> PlacementRequest<'a> {
        PlacementRequest {
            farm: "test",
            user_key: "u",
            now: 1_000,
            lease_cutoff: 0,
            pending_ttl_ms: 30_000,
            max_pending_per_machine: cap,
            slow_start_ms: 0,
            excluded,
            check_sessions: false,
        }
    }

    fn farm(count: u32) -> Vec<Arc<MachineRecord>> {
        (0..count)
            .map(|index| machine_load(index, 100, 0).machine)
            .collect()
    }

    fn ids(loads: &[MachineLoad]) -> Vec<Uuid> {
        loads.iter().map(|load| load.machine.id).collect()
    }

    #[test]
    fn a_machine_at_its_cap_leaves_the_candidates_and_comes_back_below_it() {
        let machines = farm(3);
        let second = machines[1].id;
        let mut set = CandidateSet::new(machines.clone(), &request(&[], 2));
        set.add_pending(second, 1);
        assert!(set.is_candidate(second, &request(&[], 2)));
        set.add_pending(second, 1);
        assert!(!set.is_candidate(second, &request(&[], 2)));
        assert_eq!(set.candidates_for(&request(&[], 2)).len(), 2);
        let all = set.all_for(&request(&[], 2));
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].ineligible, Some(Ineligible::AtLogonCap));
        set.add_pending(second, -1);
        assert!(set.is_candidate(second, &request(&[], 2)));
        let back = set.into_machines();
        assert_eq!(ids_of(&back), ids_of(&machines), "the copy keeps its order");
        assert_eq!(back[1].pending_logons, 1);
    }

    fn ids_of(machines: &[Arc<MachineRecord>]) -> Vec<Uuid> {
        machines.iter().map(|machine| machine.id).collect()
    }

    #[test]
    fn exclusions_apply_to_their_request_only() {
        let machines = farm(3);
        let first = machines[0].id;
        let set = CandidateSet::new(machines, &request(&[], 5));
        let excluded = [first];
        let with = request(&excluded, 5);
        assert!(!ids(&set.candidates_for(&with)).contains(&first));
        assert!(!set.is_candidate(first, &with));
        assert!(set.is_candidate(first, &request(&[], 5)));
        let all = set.all_for(&with);
        let marked = all.iter().find(|load| load.machine.id == first).unwrap();
        assert_eq!(marked.ineligible, Some(Ineligible::Excluded));
        assert_eq!(set.candidates_for(&request(&[], 5)).len(), 3);
    }

    #[test]
    fn other_terms_classify_the_farm_again() {
        let machines = farm(2);
        let first = machines[0].id;
        let mut set = CandidateSet::new(machines, &request(&[], 1));
        set.add_pending(first, 1);
        assert!(!set.is_candidate(first, &request(&[], 1)));
        // A larger cap: the machine is a candidate again, its logon in flight still counted.
        set.follow_terms(&request(&[], 5));
        assert!(set.is_candidate(first, &request(&[], 5)));
        assert_eq!(set.machine(first).unwrap().pending_logons, 1);
    }
}
