//! The choice: **fewest active sessions per weight**.
//!
//! The broker's default counts every session, connected or not. A disconnected session keeps
//! its memory but costs little CPU, so a machine with 40 disconnected sessions and 5 active ones
//! serves a new user better than one with 20 active ones. This plug-in ranks the candidates the
//! broker sent by
//!
//! ```text
//!     (ACTIVE sessions in the plug-in's view + logons in flight the broker reports) / weight
//! ```
//!
//! Logons in flight (`pending_logons`) count as active: they are about to be, and without them a
//! storm of logons would all go to the same machine before the first one shows up.
//!
//! It only ever answers one of the candidates (the broker has already left out machines that are
//! not ready, draining, full or at their cap of logons in flight), and it keeps the broker's pick
//! (an empty answer) when it has no better idea: the broker's pick is among the least loaded, or
//! the view does not have a candidate's full session list yet (the plug-in has just started and
//! the resync is not through).

use crate::view::FarmView;
use std::cmp::Ordering;
use std::fmt;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::validate::DEFAULT_WEIGHT;

/// A candidate's load as this policy sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CandidateLoad {
    pub machine_id: String,
    pub name: String,
    pub active: u64,
    pub disconnected: u64,
    /// Logons sent there that have not shown up yet (from the broker).
    pub pending: u64,
    pub weight: u64,
}

impl CandidateLoad {
    fn busy(&self) -> u64 {
        self.active + self.pending
    }

    /// Compares `busy / weight` exactly (cross-multiplied, no floating point), so equal loads
    /// tie.
    fn cmp_load(&self, other: &CandidateLoad) -> Ordering {
        (self.busy() * other.weight).cmp(&(other.busy() * self.weight))
    }
}

impl fmt::Display for CandidateLoad {
    /// `ts1=3a+1p/100` (3 active, 1 logon in flight, weight 100).
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{}={}a+{}p/{}",
            self.name, self.active, self.pending, self.weight
        )
    }
}

/// What the plug-in answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Keep the broker's pick (an empty `machine_id`).
    Keep { reason: String },
    /// This candidate instead.
    Machine { machine_id: String, name: String },
}

/// A choice with the loads it was made from (for the log).
#[derive(Clone, Debug)]
pub struct Decision {
    pub choice: Choice,
    pub loads: Vec<CandidateLoad>,
}

impl Decision {
    /// The answer's `machine_id`: empty keeps the broker's pick.
    pub fn machine_id(&self) -> &str {
        match &self.choice {
            Choice::Keep { .. } => "",
            Choice::Machine { machine_id, .. } => machine_id,
        }
    }

    /// The loads as one line, e.g. `ts1=3a+0p/100 ts2=1a+0p/100`.
    pub fn loads_line(&self) -> String {
        let loads: Vec<String> = self.loads.iter().map(ToString::to_string).collect();
        loads.join(" ")
    }
}

/// Chooses among the request's candidates.
pub fn choose(view: &FarmView, request: &pb::GetMostSuitableServerRequest) -> Decision {
    let keep = |reason: String, loads: Vec<CandidateLoad>| Decision {
        choice: Choice::Keep { reason },
        loads,
    };
    let mut loads = Vec::with_capacity(request.candidates.len());
    for candidate in &request.candidates {
        let Some(machine) = &candidate.machine else {
            continue;
        };
        let Some(known) = view
            .machine(&machine.id)
            .filter(|known| known.sessions_known())
        else {
            let reason = format!(
                "the sessions of candidate {} are not known yet (resync not through)",
                machine.name
            );
            return keep(reason, loads);
        };
        // The candidate's weight is the broker's current effective weight; the view's is a
        // fallback for a broker that leaves it out.
        let weight = [machine.weight, known.weight, DEFAULT_WEIGHT]
            .into_iter()
            .find(|&weight| weight != 0)
            .unwrap_or(DEFAULT_WEIGHT);
        let name = if machine.name.is_empty() {
            known.name.clone()
        } else {
            machine.name.clone()
        };
        loads.push(CandidateLoad {
            machine_id: machine.id.clone(),
            name,
            active: known.active_sessions() as u64,
            disconnected: known.disconnected_sessions() as u64,
            pending: u64::from(machine.pending_logons),
            weight: u64::from(weight),
        });
    }
    let Some(lowest) = loads.iter().min_by(|a, b| a.cmp_load(b)).cloned() else {
        return keep("no candidates".to_owned(), loads);
    };
    let least_loaded: Vec<&CandidateLoad> = loads
        .iter()
        .filter(|load| load.cmp_load(&lowest) == Ordering::Equal)
        .collect();
    if least_loaded
        .iter()
        .any(|load| load.machine_id == request.broker_pick)
    {
        let reason = "the broker's pick is among the least loaded".to_owned();
        return keep(reason, loads);
    }
    // Among equals, the one with fewer disconnected sessions (less memory held), then by name
    // so that the answer does not depend on the order of the candidates.
    let best = least_loaded
        .into_iter()
        .min_by(|a, b| {
            a.disconnected
                .cmp(&b.disconnected)
                .then_with(|| a.name.cmp(&b.name))
        })
        .cloned();
    match best {
        Some(best) => Decision {
            choice: Choice::Machine {
                machine_id: best.machine_id,
                name: best.name,
            },
            loads,
        },
        None => keep("no candidates".to_owned(), loads),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::testing::*;
    use pb::SessionState::{Active, Disconnected};

    /// A view of machines `(id, name, weight, active, disconnected)`.
    fn farm(machines: &[(&str, &str, u32, u32, u32)]) -> FarmView {
        let mut view = FarmView::default();
        for &(id, name, weight, active, disconnected) in machines {
            view.apply_machine_change(&added(id, name, weight));
            let sessions = (0..active)
                .map(|number| session(id, number, "a", Active))
                .chain(
                    (0..disconnected).map(|number| session(id, 1000 + number, "d", Disconnected)),
                )
                .collect();
            view.apply_session_change(&resync_batch(id, sessions, true));
            view.apply_machine_change(&changed_state(id, pb::MachineState::Ready));
        }
        view
    }

    fn request(
        candidates: &[(&str, &str, u32, u32)],
        broker_pick: &str,
    ) -> pb::GetMostSuitableServerRequest {
        pb::GetMostSuitableServerRequest {
            user_name: "alice".into(),
            farm: "default".into(),
            candidates: candidates
                .iter()
                .map(|&(id, name, weight, pending)| pb::Candidate {
                    machine: Some(pb::Machine {
                        pending_logons: pending,
                        ..machine(id, name, weight)
                    }),
                })
                .collect(),
            broker_pick: broker_pick.into(),
            ..Default::default()
        }
    }

    fn picked(decision: &Decision) -> Option<&str> {
        match &decision.choice {
            Choice::Keep { .. } => None,
            Choice::Machine { name, .. } => Some(name),
        }
    }

    #[test]
    fn disconnected_sessions_do_not_count() {
        // The broker counts everything: ts2 (20) looks lighter than ts1 (5 + 40).
        let view = farm(&[("m1", "ts1", 100, 5, 40), ("m2", "ts2", 100, 20, 0)]);
        let decision = choose(
            &view,
            &request(&[("m1", "ts1", 100, 0), ("m2", "ts2", 100, 0)], "m2"),
        );
        assert_eq!(picked(&decision), Some("ts1"));
        assert_eq!(decision.machine_id(), "m1");
        assert_eq!(decision.loads_line(), "ts1=5a+0p/100 ts2=20a+0p/100");
    }

    #[test]
    fn weight_scales_the_load() {
        // 10 active on weight 300 (3.3 per 100) beats 4 active on weight 100.
        let view = farm(&[("m1", "ts1", 100, 4, 0), ("m2", "big", 300, 10, 0)]);
        let decision = choose(
            &view,
            &request(&[("m1", "ts1", 100, 0), ("m2", "big", 300, 0)], "m1"),
        );
        assert_eq!(picked(&decision), Some("big"));
    }

    #[test]
    fn the_candidates_weight_wins_over_the_views() {
        // An administrator raised ts2's weight; the candidate carries the new one.
        let view = farm(&[("m1", "ts1", 100, 4, 0), ("m2", "ts2", 100, 6, 0)]);
        let decision = choose(
            &view,
            &request(&[("m1", "ts1", 100, 0), ("m2", "ts2", 200, 0)], "m1"),
        );
        assert_eq!(picked(&decision), Some("ts2"));
    }

    #[test]
    fn logons_in_flight_count_as_active() {
        let view = farm(&[("m1", "ts1", 100, 0, 0), ("m2", "ts2", 100, 2, 0)]);
        let decision = choose(
            &view,
            &request(&[("m1", "ts1", 100, 3), ("m2", "ts2", 100, 0)], "m1"),
        );
        assert_eq!(picked(&decision), Some("ts2"));
    }

    #[test]
    fn keeps_the_brokers_pick_when_it_is_among_the_least_loaded() {
        let view = farm(&[
            ("m1", "ts1", 100, 2, 0),
            ("m2", "ts2", 100, 2, 0),
            ("m3", "ts3", 100, 9, 0),
        ]);
        let decision = choose(
            &view,
            &request(
                &[
                    ("m1", "ts1", 100, 0),
                    ("m2", "ts2", 100, 0),
                    ("m3", "ts3", 100, 0),
                ],
                "m2",
            ),
        );
        assert_eq!(decision.machine_id(), "", "{decision:?}");
    }

    #[test]
    fn ties_go_to_fewer_disconnected_then_by_name() {
        let view = farm(&[
            ("m1", "ts1", 100, 1, 5),
            ("m2", "ts2", 100, 1, 2),
            ("m3", "ts3", 100, 1, 2),
            ("m4", "ts4", 100, 9, 0),
        ]);
        let candidates = [
            ("m3", "ts3", 100, 0),
            ("m1", "ts1", 100, 0),
            ("m2", "ts2", 100, 0),
            ("m4", "ts4", 100, 0),
        ];
        let decision = choose(&view, &request(&candidates, "m4"));
        assert_eq!(picked(&decision), Some("ts2"));
    }

    #[test]
    fn chooses_only_among_the_candidates() {
        // ts3 is the emptiest machine in the view, but the broker did not offer it (draining, say).
        let view = farm(&[
            ("m1", "ts1", 100, 5, 0),
            ("m2", "ts2", 100, 3, 0),
            ("m3", "ts3", 100, 0, 0),
        ]);
        let decision = choose(
            &view,
            &request(&[("m1", "ts1", 100, 0), ("m2", "ts2", 100, 0)], "m1"),
        );
        assert_eq!(picked(&decision), Some("ts2"));
    }

    #[test]
    fn keeps_the_brokers_pick_without_a_full_view() {
        let mut view = farm(&[("m1", "ts1", 100, 5, 0)]);
        let both = request(&[("m1", "ts1", 100, 0), ("m2", "ts2", 100, 0)], "m1");
        let decision = choose(&view, &both);
        assert!(
            matches!(decision.choice, Choice::Keep { .. }),
            "{decision:?}"
        );
        // ts2 added, its resync half through: it looks empty but is not known yet.
        view.apply_machine_change(&added("m2", "ts2", 100));
        view.apply_session_change(&resync_batch(
            "m2",
            vec![session("m2", 1, "x", Active)],
            false,
        ));
        assert_eq!(choose(&view, &both).machine_id(), "");
        view.apply_session_change(&resync_batch("m2", Vec::new(), true));
        assert_eq!(choose(&view, &both).machine_id(), "m2");
        let decision = choose(&view, &request(&[], ""));
        assert_eq!(decision.machine_id(), "");
    }
}
