//! The plug-in's part of a decision: `GetUserExternalSession` and `GetMostSuitableServer`,
//! together bounded by the farm's deadline (`PluginBudget`). Whatever goes wrong (late, an
//! error, a machine that is not a candidate, an answer over a connection the plug-in was not
//! initialized on) keeps the broker's own answer, counted by cause and warned about at most
//! once a minute per cause.

use super::{PluginLink, Suggestion};
use crate::metrics::PluginFallbackLabels;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::validate::{self, excerpt};
use uuid::Uuid;

/// One decision's time with its farm's plug-in: every call the decision makes
/// (`GetUserExternalSession`, then `GetMostSuitableServer`) ends within one deadline from the
/// start of the first, so that the decision never waits longer than the deadline for it.
#[derive(Clone, Debug, Default)]
pub struct PluginBudget(OnceLock<Instant>);

impl PluginBudget {
    /// When the decision's calls must have ended: `deadline` after the first one started.
    fn until(&self, deadline: Duration) -> Instant {
        *self.0.get_or_init(Instant::now) + deadline
    }
}

impl PluginLink {
    /// A fallback, and why the broker's pick stood: a warning at most once a minute for each
    /// cause (a slow plug-in fails every decision), counting the others, which go to the debug
    /// level.
    fn fallback_said(
        &self,
        cause: &'static str,
        farm: &str,
        user: &str,
        detail: &str,
    ) -> Suggestion {
        let limit = match cause {
            "timeout" => &self.warnings[0],
            "error" => &self.warnings[1],
            _ => &self.warnings[2],
        };
        let plugin = &self.address;
        match limit.warn_now() {
            Some(unwarned) => tracing::warn!(
                %plugin, %farm, %user, cause, detail, since_last_warning = unwarned,
                "plug-in's answer not used; keeping the broker's pick (said at most once a minute for each cause)"
            ),
            None => {
                tracing::debug!(%plugin, %farm, %user, cause, detail, "plug-in's answer not used; keeping the broker's pick")
            }
        }
        self.fallback(cause)
    }

    /// Why a call that started at `started` was cut off.
    fn late(&self, started: Instant) -> String {
        format!(
            "no answer within the deadline, {:?} for all of a decision's calls (this one waited {:?})",
            self.settings.deadline,
            started.elapsed()
        )
    }

    fn fallback(&self, cause: &'static str) -> Suggestion {
        self.metrics
            .plugin_fallbacks
            .get_or_create(&PluginFallbackLabels {
                plugin: self.address.clone(),
                cause,
            })
            .inc();
        Suggestion::Fallback(cause)
    }

    /// GetMostSuitableServer within the farm's deadline. An answer that is not a candidate is a
    /// fallback too.
    pub async fn suggest(
        &self,
        request: pb::GetMostSuitableServerRequest,
        budget: &PluginBudget,
    ) -> Suggestion {
        if !self.is_answering() {
            // Down, or not yet sent the whole farm.
            return self.fallback("down");
        }
        // Named in warnings: the Redirect's own span is only kept at debug level.
        let (farm, user) = (request.farm.clone(), request.user_name.clone());
        let candidates: Vec<Uuid> = request
            .candidates
            .iter()
            .filter_map(|candidate| candidate.machine.as_ref())
            .filter_map(|machine| Uuid::parse_str(&machine.id).ok())
            .collect();
        let until = budget.until(self.settings.deadline);
        let started = Instant::now();
        if until <= started {
            let detail = "the deadline was spent on GetUserExternalSession";
            return self.fallback_said("timeout", &farm, &user, detail);
        }
        let mut client = self.client();
        let answer =
            tokio::time::timeout_at(until.into(), client.get_most_suitable_server(request)).await;
        let method = "GetMostSuitableServer";
        match answer {
            Err(_) => {
                self.record(method, "timeout", started);
                let detail = self.late(started);
                self.fallback_said("timeout", &farm, &user, &detail)
            }
            Ok(Err(status)) => {
                self.record(method, "error", started);
                let detail = format!("{:?}: {}", status.code(), excerpt(status.message()));
                self.check_status(&status);
                self.fallback_said("error", &farm, &user, &detail)
            }
            Ok(Ok(_)) if self.reconnected() => {
                self.record(method, "ok", started);
                self.fallback("reconnected")
            }
            Ok(Ok(answer)) => {
                self.record(method, "ok", started);
                let chosen = answer.into_inner().machine_id;
                if chosen.is_empty() {
                    return Suggestion::Keep;
                }
                // A UUID in any of its text forms (upper case, braces): the API's ids are
                // compared as UUIDs everywhere.
                match Uuid::parse_str(&chosen) {
                    Ok(machine) if candidates.contains(&machine) => Suggestion::Machine(machine),
                    parsed => {
                        let what = self.not_a_candidate(parsed.ok(), &farm);
                        let chosen = excerpt(&chosen);
                        let detail = format!("it named {chosen}, {what}");
                        self.fallback_said("not_candidate", &farm, &user, &detail)
                    }
                }
            }
        }
    }

    /// The plug-in named a candidate that was no longer one when the logon was placed (logons
    /// placed meanwhile filled it, or it was drained): the policy's pick stood. Counted (cause
    /// `no_longer_candidate`), not warned about: a race, not the plug-in's fault.
    pub fn pick_overtaken(&self, farm: &str, user: &str) {
        tracing::debug!(plugin = %self.address, %farm, %user, "the plug-in's pick was no longer a candidate when the logon was placed; the policy's pick stands");
        self.fallback("no_longer_candidate");
    }

    /// What a machine the plug-in named, which is not one of the candidates, is: as far as the
    /// plug-in was told.
    fn not_a_candidate(&self, machine: Option<Uuid>, farm: &str) -> String {
        let Some(machine) = machine else {
            return "which is not a machine id".to_owned();
        };
        let told = self.told_states.lock().ok().and_then(|told| {
            told.get(&machine.to_string())
                .map(|told| (told.name.clone(), told.farm.clone(), told.state))
        });
        match told {
            None => "a machine the plug-in was never told of".to_owned(),
            Some((name, other, _)) if other != farm => {
                format!("machine {name:?} of farm {other:?}, not of this farm")
            }
            Some((name, _, state)) => {
                let state = pb::MachineState::try_from(state)
                    .map_or("unknown", |state| state.as_str_name());
                format!(
                    "machine {name:?} ({state}), which is not a candidate: draining, at its session \
                     limit or cap of logons in flight, excluded by the caller, or not ready"
                )
            }
        }
    }

    /// GetUserExternalSession within the deadline: `Some((address, host name))` when the
    /// plug-in has a host outside the farm for the user. A failure here is not a decision's
    /// fallback (the decision goes on to place the user in the farm, where the plug-in is asked
    /// again, and that counts): it is counted in the call's outcome and warned about.
    pub async fn external_session(
        &self,
        request: pb::GetUserExternalSessionRequest,
        budget: &PluginBudget,
    ) -> Option<(String, String)> {
        if !self.supports_external() {
            return None;
        }
        let (farm, user) = (request.farm.clone(), request.user_name.clone());
        let until = budget.until(self.settings.deadline);
        let started = Instant::now();
        let mut client = self.client();
        let answer =
            tokio::time::timeout_at(until.into(), client.get_user_external_session(request)).await;
        let method = "GetUserExternalSession";
        let failure = match answer {
            Ok(Ok(_)) if self.reconnected() => {
                // Not used: the link initializes the plug-in again, and the placement that
                // follows counts the decision's fallback (`down`).
                self.record(method, "ok", started);
                return None;
            }
            Ok(Ok(answer)) => {
                let answer = answer.into_inner();
                if answer.address.is_empty() {
                    self.record(method, "ok", started);
                    return None;
                }
                // Shown to clients and written to logs: a machine name's rules.
                let checked = validate::address("address", &answer.address).and_then(|address| {
                    if let Some(ip) = validate::unspecified_host(&address) {
                        let why = format!("{ip} is no address a client can connect to");
                        return Err(validate::ValidationError::new("address", why));
                    }
                    if answer.host_name.is_empty() {
                        return Ok((address.clone(), address));
                    }
                    let name = validate::machine_name("host_name", &answer.host_name)?;
                    Ok((address, name))
                });
                match checked {
                    Ok(external) => {
                        self.record(method, "ok", started);
                        return Some(external);
                    }
                    Err(error) => {
                        self.record(method, "unusable", started);
                        format!("an unusable external session: {error}")
                    }
                }
            }
            Ok(Err(status)) => {
                self.record(method, "error", started);
                self.check_status(&status);
                format!("{:?}: {}", status.code(), excerpt(status.message()))
            }
            Err(_) => {
                self.record(method, "timeout", started);
                self.late(started)
            }
        };
        let plugin = &self.address;
        match self.warnings[3].warn_now() {
            Some(unwarned) => tracing::warn!(
                %plugin, %farm, %user, detail = failure, since_last_warning = unwarned,
                "plug-in's GetUserExternalSession answer not used; the user is placed in the farm (said at most once a minute)"
            ),
            None => tracing::debug!(
                %plugin, %farm, %user, detail = failure,
                "plug-in's GetUserExternalSession answer not used; the user is placed in the farm"
            ),
        }
        None
    }
}
