//! Load-balancing policies: given the candidates of a farm (machines that can take a new
//! logon, with their load), pick one. Policies are chosen per farm by name; every policy sees
//! the same candidates, already filtered for drain, limits, logons in flight and groups, and
//! the same slow-start ramp on each machine's weight.

mod resource;
mod round_robin;
mod session_count;

use super::farm_settings::FarmSettings;
use crate::store::MachineLoad;
use std::collections::BTreeMap;
use std::sync::Arc;
use uuid::Uuid;

pub use resource::{RESOURCE, Resource};
pub use round_robin::{ROUND_ROBIN, RoundRobin};
pub use session_count::{SESSION_COUNT, SessionCount};

/// What a policy knows besides the candidates.
pub struct ChoiceContext<'a> {
    pub farm: &'a str,
    pub user_key: &'a str,
    pub settings: &'a FarmSettings,
}

/// A load-balancing policy. `choose` runs under the farm's placement lock: it must be quick
/// and must not block.
pub trait Policy: Send + Sync {
    /// The name operators use in configuration and `SetFarmPolicy`.
    fn name(&self) -> &'static str;
    /// Picks one of `candidates` (never empty); `None` when none suits.
    fn choose(&self, context: &ChoiceContext<'_>, candidates: &[MachineLoad]) -> Option<Uuid>;
}

/// A stable pseudo-random order of machines per user (FNV-1a over user and machine id), so
/// that ties spread instead of always landing on the first machine.
pub fn tie_break(user_key: &str, candidate: &MachineLoad) -> u64 {
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

/// The candidate with the lowest score, ties broken by `tie_break`.
pub fn lowest_score(
    user_key: &str,
    candidates: &[MachineLoad],
    score: impl Fn(&MachineLoad) -> f64,
) -> Option<Uuid> {
    // The lowest score first; the tie-break (a hash) only among the candidates that share it.
    let best = candidates
        .iter()
        .map(&score)
        .min_by(|left, right| left.total_cmp(right))?;
    candidates
        .iter()
        .filter(|candidate| score(candidate).total_cmp(&best).is_eq())
        .min_by_key(|candidate| tie_break(user_key, candidate))
        .map(|candidate| candidate.machine.id)
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
        registry.register(Arc::new(Resource));
        registry.register(Arc::new(RoundRobin::default()));
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
    /// newer replica may have set it).
    pub fn get_or_default(&self, name: &str) -> &Arc<dyn Policy> {
        self.policies
            .get(name)
            .or_else(|| self.policies.get(SESSION_COUNT))
            .expect("the default policy is always registered")
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn context<'a>(settings: &'a FarmSettings, user_key: &'a str) -> ChoiceContext<'a> {
        ChoiceContext {
            farm: "test",
            user_key,
            settings,
        }
    }

    /// Places `users` logons one after another, counting each as a session on its machine.
    pub fn place(policy: &dyn Policy, machines: &mut [MachineLoad], users: usize) {
        let settings = FarmSettings::default();
        for user in 0..users {
            let user_key = format!("user{user}");
            let chosen = policy
                .choose(&context(&settings, &user_key), machines)
                .expect("a candidate");
            let machine = machines
                .iter_mut()
                .find(|load| load.machine.id == chosen)
                .expect("chosen among the candidates");
            std::sync::Arc::make_mut(&mut machine.machine).session_count += 1;
        }
    }

    pub fn sessions(machines: &[MachineLoad]) -> Vec<i64> {
        machines
            .iter()
            .map(|load| load.machine.session_count)
            .collect()
    }
}
