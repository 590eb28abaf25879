//! `session-count`, the default and the Session Broker's own: the fewest (sessions + pending
//! logons) relative to weight.

use super::{ChoiceContext, Policy, lowest_score};
use crate::store::MachineLoad;
use uuid::Uuid;

pub const SESSION_COUNT: &str = "session-count";

/// Scores each machine by what its load per weight would be after taking the logon, so heavier
/// machines fill first from empty and the farm stays within one logon of even.
pub struct SessionCount;

impl Policy for SessionCount {
    fn name(&self) -> &'static str {
        SESSION_COUNT
    }

    fn choose(&self, context: &ChoiceContext<'_>, candidates: &[MachineLoad]) -> Option<Uuid> {
        lowest_score(context.user_key, candidates, |candidate| {
            (candidate.load() + 1) as f64 / candidate.effective_weight()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{context, place, sessions};
    use super::*;
    use crate::decision::farm_settings::FarmSettings;
    use crate::store::test_support::machine_load;

    #[test]
    fn equal_weights_spread_evenly() {
        let mut machines: Vec<_> = (0..10).map(|index| machine_load(index, 100, 0)).collect();
        place(&SessionCount, &mut machines, 1000);
        assert!(sessions(&machines).iter().all(|&count| count == 100));
    }

    #[test]
    fn weights_split_in_proportion() {
        let mut machines = vec![
            machine_load(0, 200, 0),
            machine_load(1, 100, 0),
            machine_load(2, 50, 0),
        ];
        place(&SessionCount, &mut machines, 700);
        assert_eq!(sessions(&machines), vec![400, 200, 100]);
    }

    #[test]
    fn pending_logons_count_as_load() {
        let mut busy = machine_load(0, 100, 0);
        std::sync::Arc::make_mut(&mut busy.machine).pending_logons = 5;
        let idle = machine_load(1, 100, 4);
        let settings = FarmSettings::default();
        let chosen = SessionCount.choose(&context(&settings, "u"), &[busy, idle.clone()]);
        assert_eq!(chosen, Some(idle.machine.id));
    }

    #[test]
    fn ties_do_not_always_pick_the_first_machine() {
        let machines: Vec<_> = (0..4).map(|index| machine_load(index, 100, 0)).collect();
        let settings = FarmSettings::default();
        let firsts: std::collections::HashSet<_> = (0..50)
            .filter_map(|user| {
                SessionCount.choose(&context(&settings, &format!("u{user}")), &machines)
            })
            .collect();
        assert!(firsts.len() > 1);
    }

    #[test]
    fn a_machine_in_slow_start_takes_a_small_share() {
        let mut machines: Vec<_> = (0..4).map(|index| machine_load(index, 100, 100)).collect();
        let mut fresh = machine_load(4, 100, 0);
        fresh.ramp = 0.05;
        machines.push(fresh);
        place(&SessionCount, &mut machines, 1000);
        let fresh_share = machines[4].machine.session_count;
        assert!(fresh_share < 40, "fresh machine took {fresh_share} of 1000");
    }
}
