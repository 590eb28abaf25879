//! `resource`: load from the agents' reports. A machine whose CPU or memory use is at or past
//! its farm's full-load threshold takes no new logon while another has room; among the rest,
//! the fewest sessions per weight wins, scaled up by how close the machine is to full load.

use super::{ChoiceContext, Policy, lowest_score};
use crate::store::MachineLoad;
use uuid::Uuid;

pub const RESOURCE: &str = "resource";

pub struct Resource;

/// 0 for an idle machine, 1 at the full-load threshold (of CPU or memory, whichever is nearer).
/// A machine that has not reported yet counts as idle.
fn pressure(candidate: &MachineLoad, context: &ChoiceContext<'_>) -> f64 {
    let cpu = candidate.machine.load_cpu.unwrap_or(0.0) / f64::from(context.settings.cpu_threshold);
    let memory =
        candidate.machine.load_memory.unwrap_or(0.0) / f64::from(context.settings.memory_threshold);
    cpu.max(memory).max(0.0)
}

impl Policy for Resource {
    fn name(&self) -> &'static str {
        RESOURCE
    }

    fn choose(&self, context: &ChoiceContext<'_>, candidates: &[MachineLoad]) -> Option<Uuid> {
        let with_room: Vec<MachineLoad> = candidates
            .iter()
            .filter(|candidate| pressure(candidate, context) < 1.0)
            .cloned()
            .collect();
        // Every machine is past a threshold: the least pressed still takes the logon.
        let pool = if with_room.is_empty() {
            candidates
        } else {
            &with_room
        };
        lowest_score(context.user_key, pool, |candidate| {
            let sessions_per_weight = (candidate.load() + 1) as f64 / candidate.effective_weight();
            sessions_per_weight * (1.0 + pressure(candidate, context).min(2.0))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::context;
    use super::*;
    use crate::decision::farm_settings::FarmSettings;
    use crate::store::test_support::machine_load;

    fn loaded(index: u32, sessions: i64, cpu: f64, memory: f64) -> MachineLoad {
        let mut load = machine_load(index, 100, sessions);
        let machine = std::sync::Arc::make_mut(&mut load.machine);
        machine.load_cpu = Some(cpu);
        machine.load_memory = Some(memory);
        load
    }

    #[test]
    fn machines_past_a_threshold_take_no_logon_while_others_have_room() {
        let settings = FarmSettings::default();
        let hot_cpu = loaded(0, 0, 95.0, 10.0);
        let hot_memory = loaded(1, 0, 10.0, 91.0);
        let busy_but_cool = loaded(2, 40, 50.0, 50.0);
        let candidates = [hot_cpu, hot_memory, busy_but_cool.clone()];
        for user in 0..20 {
            let chosen = Resource.choose(&context(&settings, &format!("u{user}")), &candidates);
            assert_eq!(chosen, Some(busy_but_cool.machine.id));
        }
    }

    #[test]
    fn lower_resource_use_wins_at_equal_sessions() {
        let settings = FarmSettings::default();
        let calm = loaded(0, 10, 5.0, 20.0);
        let warm = loaded(1, 10, 70.0, 20.0);
        assert_eq!(
            Resource.choose(&context(&settings, "u"), &[warm, calm.clone()]),
            Some(calm.machine.id)
        );
    }

    #[test]
    fn thresholds_are_the_farms() {
        let settings = FarmSettings {
            cpu_threshold: 50.0,
            ..FarmSettings::default()
        };
        let over = loaded(0, 0, 60.0, 0.0);
        let under = loaded(1, 30, 40.0, 0.0);
        assert_eq!(
            Resource.choose(&context(&settings, "u"), &[over, under.clone()]),
            Some(under.machine.id)
        );
    }

    #[test]
    fn when_every_machine_is_hot_the_least_pressed_takes_it() {
        let settings = FarmSettings::default();
        let hotter = loaded(0, 0, 99.0, 0.0);
        let hot = loaded(1, 0, 92.0, 0.0);
        assert_eq!(
            Resource.choose(&context(&settings, "u"), &[hotter, hot.clone()]),
            Some(hot.machine.id)
        );
    }
}
