//! Load-balancing policies: given the candidates of a farm (machines that can take a new
//! logon, with their load), pick one. Policies are chosen per farm by name; every policy sees
//! the same candidates, already filtered for drain, limits, logons in flight and groups, and
//! the same slow-start ramp on each machine's weight.

mod resource;
mod round_robin;
mod session_count;

use super::farm_settings::FarmSettings;
use crate::store::MachineLoad;
use std::cmp::Ordering;
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
    /// What `choose` would pick now, without changing what it picks next: the broker's pick
    /// a plug-in is shown before the placement itself chooses. A policy that keeps state
    /// between picks (a turn) must not advance it here.
    fn preview(&self, context: &ChoiceContext<'_>, candidates: &[MachineLoad]) -> Option<Uuid> {
        self.choose(context, candidates)
    }
}

/// A stable pseudo-random order of machines per user (FNV-1a over user and machine id), so
/// that ties spread instead of always landing on the first machine.
pub fn tie_break(user_key: &str, candidate: &MachineLoad) -> u64 {
    TieBreak::for_user(user_key).rank(candidate)
}

/// [`tie_break`] with the user's half hashed once, for ranking many candidates.
#[derive(Clone, Copy)]
pub struct TieBreak(u64);

impl TieBreak {
    const PRIME: u64 = 0x0100_0000_01b3;

    pub fn for_user(user_key: &str) -> Self {
        TieBreak(Self::extend(0xcbf2_9ce4_8422_2325, user_key.as_bytes()))
    }

    pub fn rank(self, candidate: &MachineLoad) -> u64 {
        Self::extend(self.0, candidate.machine.id.as_bytes())
    }

    fn extend(mut hash: u64, bytes: &[u8]) -> u64 {
        for &byte in bytes {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(Self::PRIME);
        }
        hash
    }
}

/// The candidate with the lowest score, ties broken by [`tie_break`] (the first candidate
/// among equal ranks). One pass; a rank is computed only for candidates that tie the best.
pub fn lowest_score(
    user_key: &str,
    candidates: &[MachineLoad],
    score: impl Fn(&MachineLoad) -> f64,
) -> Option<Uuid> {
    let order = TieBreak::for_user(user_key);
    // (score, its rank once computed, candidate)
    let mut best: Option<(f64, Option<u64>, &MachineLoad)> = None;
    for candidate in candidates {
        let value = score(candidate);
        let Some((best_value, best_rank, best_candidate)) = &mut best else {
            best = Some((value, None, candidate));
            continue;
        };
        match value.total_cmp(best_value) {
            Ordering::Less => best = Some((value, None, candidate)),
            Ordering::Equal => {
                let current = *best_rank.get_or_insert_with(|| order.rank(best_candidate));
                let rank = order.rank(candidate);
                if rank < current {
                    best = Some((value, Some(rank), candidate));
                }
            }
            Ordering::Greater => {}
        }
    }
    best.map(|(_, _, candidate)| candidate.machine.id)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::machine_load;

    /// `lowest_score` as its definition reads: the lowest score, then the lowest rank.
    fn by_definition(user_key: &str, candidates: &[MachineLoad], scores: &[f64]) -> Option<Uuid> {
        let best = scores.iter().copied().min_by(f64::total_cmp)?;
        candidates
            .iter()
            .zip(scores)
            .filter(|(_, score)| score.total_cmp(&best).is_eq())
            .min_by_key(|(candidate, _)| tie_break(user_key, candidate))
            .map(|(candidate, _)| candidate.machine.id)
    }

    #[test]
    fn one_pass_picks_what_the_definition_picks() {
        let candidates: Vec<MachineLoad> =
            (0..40).map(|index| machine_load(index, 100, 0)).collect();
        for user in 0..200u64 {
            // Few distinct scores, so most picks are decided by the tie-break.
            let scores: Vec<f64> = (0..40u64)
                .map(|index| ((index * 7 + user * 13) % 3) as f64)
                .collect();
            let user_key = format!("user{user}");
            let score_of = |load: &MachineLoad| {
                let index = candidates
                    .iter()
                    .position(|candidate| candidate.machine.id == load.machine.id)
                    .unwrap();
                scores[index]
            };
            assert_eq!(
                lowest_score(&user_key, &candidates, score_of),
                by_definition(&user_key, &candidates, &scores)
            );
        }
        assert_eq!(lowest_score("u", &[], |_| 0.0), None);
    }
}
