//! Load-balancing policies: given the candidates of a farm (machines that can take a new
//! logon, with their load), pick one. Policies are chosen per farm by name.

use crate::store::MachineLoad;
use std::collections::BTreeMap;
use std::sync::Arc;
use uuid::Uuid;

/// A load-balancing policy. `choose` is called under the farm's placement lock, so it must be
/// quick and must not block.
pub trait Policy: Send + Sync {
    /// The name operators use in configuration and `SetFarmPolicy`.
    fn name(&self) -> &'static str;
    /// Picks one of `candidates` (never empty) for `user_key`; `None` when none suits.
    fn choose(&self, user_key: &str, candidates: &[MachineLoad]) -> Option<Uuid>;
}

/// The Session Broker's default: the fewest (sessions + pending logons) relative to weight.
/// Compares what each machine's load would be after taking the logon, so heavier machines
/// fill first from empty; equal scores are broken by a hash of user and machine, so ties
/// spread instead of always landing on the first machine.
pub struct SessionCount;

pub const SESSION_COUNT: &str = "session-count";

impl Policy for SessionCount {
    fn name(&self) -> &'static str {
        SESSION_COUNT
    }

    fn choose(&self, user_key: &str, candidates: &[MachineLoad]) -> Option<Uuid> {
        candidates
            .iter()
            .min_by(|left, right| {
                // (load_l + 1) / weight_l  vs  (load_r + 1) / weight_r, without division.
                let left_score = (left.load() + 1) * u64::from(right.machine.weight());
                let right_score = (right.load() + 1) * u64::from(left.machine.weight());
                left_score
                    .cmp(&right_score)
                    .then_with(|| tie_break(user_key, left).cmp(&tie_break(user_key, right)))
            })
            .map(|candidate| candidate.machine.id)
    }
}

/// A stable pseudo-random order of machines per user (FNV-1a over user and machine id).
fn tie_break(user_key: &str, candidate: &MachineLoad) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in user_key
        .bytes()
        .chain(candidate.machine.id.as_bytes().iter().copied())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The policies a broker knows, by name.
#[derive(Clone)]
pub struct PolicyRegistry {
    policies: BTreeMap<&'static str, Arc<dyn Policy>>,
}

impl Default for PolicyRegistry {
    fn default() -> Self {
        let mut registry = PolicyRegistry {
            policies: BTreeMap::new(),
        };
        registry.register(Arc::new(SessionCount));
        registry
    }
}

impl PolicyRegistry {
    pub fn register(&mut self, policy: Arc<dyn Policy>) {
        self.policies.insert(policy.name(), policy);
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.policies.keys().copied().collect()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Policy>> {
        self.policies.get(name)
    }

    /// The named policy, or the default when a farm names one this broker does not know (a
    /// newer replica may have set it); the caller logs that.
    pub fn get_or_default(&self, name: &str) -> &Arc<dyn Policy> {
        self.policies
            .get(name)
            .or_else(|| self.policies.get(SESSION_COUNT))
            .expect("the default policy is always registered")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::machine_load;

    fn place(policy: &dyn Policy, machines: &mut [MachineLoad], users: usize) {
        for user in 0..users {
            let chosen = policy
                .choose(&format!("user{user}"), machines)
                .expect("a candidate");
            let machine = machines
                .iter_mut()
                .find(|load| load.machine.id == chosen)
                .expect("chosen among the candidates");
            machine.machine.session_count += 1;
        }
    }

    #[test]
    fn equal_weights_spread_evenly() {
        let mut machines: Vec<_> = (0..10).map(|index| machine_load(index, 100, 0)).collect();
        place(&SessionCount, &mut machines, 1000);
        assert!(
            machines
                .iter()
                .all(|load| load.machine.session_count == 100)
        );
    }

    #[test]
    fn weights_split_in_proportion() {
        let mut machines = vec![
            machine_load(0, 200, 0),
            machine_load(1, 100, 0),
            machine_load(2, 50, 0),
        ];
        place(&SessionCount, &mut machines, 700);
        let counts: Vec<_> = machines
            .iter()
            .map(|load| load.machine.session_count)
            .collect();
        assert_eq!(counts, vec![400, 200, 100]);
    }

    #[test]
    fn pending_logons_count_as_load() {
        let mut busy = machine_load(0, 100, 0);
        busy.machine.pending_logons = 5;
        let idle = machine_load(1, 100, 4);
        assert_eq!(
            SessionCount.choose("u", &[busy, idle.clone()]),
            Some(idle.machine.id)
        );
    }

    #[test]
    fn ties_do_not_always_pick_the_first_machine() {
        let machines: Vec<_> = (0..4).map(|index| machine_load(index, 100, 0)).collect();
        let firsts: std::collections::HashSet<_> = (0..50)
            .filter_map(|user| SessionCount.choose(&format!("u{user}"), &machines))
            .collect();
        assert!(firsts.len() > 1);
    }
}
