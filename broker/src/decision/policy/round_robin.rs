//! `round-robin`: candidates in turn, weighted (smooth weighted round-robin: a machine of weight
//! 200 is picked twice as often as one of 100, interleaved, not in runs). The turn is kept per
//! farm in this broker's memory: replicas each keep their own, which still splits by weight.

use super::{ChoiceContext, Policy};
use crate::store::MachineLoad;
use std::collections::HashMap;
use std::sync::Mutex;
use uuid::Uuid;

pub const ROUND_ROBIN: &str = "round-robin";

#[derive(Default)]
pub struct RoundRobin {
    /// Per farm, each machine's running credit.
    credits: Mutex<HashMap<String, HashMap<Uuid, f64>>>,
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        ROUND_ROBIN
    }

    fn choose(&self, context: &ChoiceContext<'_>, candidates: &[MachineLoad]) -> Option<Uuid> {
        let mut farms = self.farms();
        take_turn(
            farms.entry(context.farm.to_owned()).or_default(),
            candidates,
        )
    }

    fn preview(&self, context: &ChoiceContext<'_>, candidates: &[MachineLoad]) -> Option<Uuid> {
        let mut credits = self.farms().get(context.farm).cloned().unwrap_or_default();
        take_turn(&mut credits, candidates)
    }
}

impl RoundRobin {
    fn farms(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<Uuid, f64>>> {
        self.credits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The machine whose turn it is, by the farm's `credits`, which are moved on past it.
fn take_turn(credits: &mut HashMap<Uuid, f64>, candidates: &[MachineLoad]) -> Option<Uuid> {
    // Machines that left the candidates lose their credit, so a returning one starts fair.
    credits.retain(|machine, _| {
        candidates
            .iter()
            .any(|candidate| candidate.machine.id == *machine)
    });
    let total: f64 = candidates.iter().map(MachineLoad::effective_weight).sum();
    let mut best: Option<(f64, Uuid)> = None;
    for candidate in candidates {
        let credit = credits.entry(candidate.machine.id).or_insert(0.0);
        *credit += candidate.effective_weight();
        let better = best.is_none_or(|(best_credit, best_id)| {
            *credit > best_credit || (*credit == best_credit && candidate.machine.id < best_id)
        });
        if better {
            best = Some((*credit, candidate.machine.id));
        }
    }
    let (_, chosen) = best?;
    if let Some(credit) = credits.get_mut(&chosen) {
        *credit -= total;
    }
    Some(chosen)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{place, sessions};
    use super::*;
    use crate::store::test_support::machine_load;

    #[test]
    fn turns_follow_the_weights_interleaved() {
        let policy = RoundRobin::default();
        let mut machines = vec![
            machine_load(0, 200, 0),
            machine_load(1, 100, 0),
            machine_load(2, 100, 0),
        ];
        place(&policy, &mut machines, 400);
        assert_eq!(sessions(&machines), vec![200, 100, 100]);
        // Interleaved: in any 4 consecutive picks the heavy machine appears twice.
        let settings = crate::decision::farm_settings::FarmSettings::default();
        let picks: Vec<_> = (0..8)
            .map(|_| {
                policy
                    .choose(
                        &super::super::test_support::context(&settings, "u"),
                        &machines,
                    )
                    .unwrap()
            })
            .collect();
        for window in picks.windows(4) {
            assert_eq!(
                window
                    .iter()
                    .filter(|id| **id == machines[0].machine.id)
                    .count(),
                2,
                "{picks:?}"
            );
        }
    }

    #[test]
    fn a_preview_shows_the_next_turn_without_taking_it() {
        let policy = RoundRobin::default();
        let settings = crate::decision::farm_settings::FarmSettings::default();
        let context = super::super::test_support::context(&settings, "u");
        let machines = vec![machine_load(0, 100, 0), machine_load(1, 100, 0)];
        let mut picks = Vec::new();
        for _ in 0..4 {
            let previewed = policy.preview(&context, &machines);
            assert_eq!(policy.preview(&context, &machines), previewed);
            let chosen = policy.choose(&context, &machines);
            assert_eq!(chosen, previewed);
            picks.push(chosen.unwrap());
        }
        assert_ne!(picks[0], picks[1], "{picks:?}");
        assert_eq!(picks[0], picks[2], "{picks:?}");
    }

    #[test]
    fn ignores_load() {
        let policy = RoundRobin::default();
        let mut machines = vec![machine_load(0, 100, 500), machine_load(1, 100, 0)];
        place(&policy, &mut machines, 10);
        assert_eq!(sessions(&machines), vec![505, 5]);
    }
}
