//! The redirect decision: where a connecting user goes. In order: the user's existing session
//! (disconnected first, newest first, drain never blocks it); a logon sent moments ago that has
//! not shown up yet; else the farm's policy among the machines that can take a new logon.

pub(crate) mod cut_name;
pub mod farm_settings;
mod placement_queue;
mod plugin_step;
pub mod policy;
mod recent_logons;
mod refusals;

use crate::directory::SessionDirectory;
use crate::error::ApiError;
use crate::metrics::{DecisionLabels, Metrics};
use crate::plugin::PluginHub;
use crate::store::reachability::Reachability;
use crate::store::{
    Ineligible, MachineLoad, MachineRecord, Placement, PlacementRequest, SessionRecord, Store,
    StoreError,
};
pub use cut_name::may_be_cut;
use farm_settings::{FarmBook, FarmSettings, GroupRule};
pub use placement_queue::SNAPSHOT_MAX_AGE;
use placement_queue::{Placed, PlacementJob, PlacementQueues};
use policy::{ChoiceContext, PolicyRegistry};
use recent_logons::RecentLogons;
use refusals::RecentRefusals;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;
use tsbroker_common::model::{self, SessionState};
use tsbroker_common::proto::v1::RedirectReason;

/// How long a returning user whose sessions the directory knows only on machines not heard
/// from lately waits for the database before the directory's last known session is the
/// answer (well within the front door's 3 s wait for a redirect).
const DEGRADED_ANSWER_AFTER: Duration = Duration::from_secs(1);

/// How long a new user waits for a database taken for away to be seen back (after which the
/// agents' resyncs are waited for too) before hearing UNAVAILABLE: waiting requests ask it
/// themselves, one at a time, and the front door waits 3 s in all.
const NEW_USER_HOLD: Duration = Duration::from_millis(500);

/// Settings of the decision.
#[derive(Clone, Debug)]
pub struct DecisionSettings {
    /// A machine not heard from for this long is not sent anyone.
    pub heartbeat_timeout: Duration,
    /// How long a placed logon counts as pending.
    pub pending_logon_ttl: Duration,
    /// Most logons in flight to one machine.
    pub max_pending_logons_per_machine: u32,
    /// Whether the database answers, and since when (see [`Reachability::lease_cutoff`]).
    pub database: Arc<Reachability>,
}

impl DecisionSettings {
    /// The oldest lease of a machine counted alive at `now`.
    pub fn lease_cutoff(&self, now: i64) -> i64 {
        self.database.lease_cutoff(now, self.heartbeat_timeout)
    }
}

/// A validated redirect question.
#[derive(Clone, Debug, Default)]
pub struct RedirectQuery {
    pub farm: String,
    /// Empty when the client sent no user hint.
    pub user_name: String,
    pub domain: String,
    pub user_name_may_be_truncated: bool,
    /// "ip:port" of the client, when known (passed on to plug-ins).
    pub client_address: String,
    /// Machines the caller could not connect to: no new logon goes there.
    pub excluded_machines: Vec<uuid::Uuid>,
    /// The deadline shared by the plug-in calls this decision makes.
    pub plugin_budget: crate::plugin::PluginBudget,
}

/// Where a client is sent: a machine of the farm, or (for a plug-in's external session) a
/// host outside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `None` for a host outside the farm.
    pub machine_id: Option<uuid::Uuid>,
    pub name: String,
    pub address: String,
    pub front_door: bool,
}

impl From<&MachineRecord> for Target {
    fn from(machine: &MachineRecord) -> Self {
        Target {
            machine_id: Some(machine.id),
            name: machine.name.clone(),
            address: machine.address.clone(),
            front_door: machine.front_door,
        }
    }
}

/// Where the user goes and why.
#[derive(Clone, Debug)]
pub struct RedirectAnswer {
    pub target: Target,
    pub reason: RedirectReason,
    pub session_id: Option<u32>,
    /// The user the decision matched (a truncated name resolved to the full one).
    pub user_name: String,
    /// The policy that placed a new logon.
    pub policy: Option<&'static str>,
}

pub struct Decider {
    store: Arc<dyn Store>,
    settings: DecisionSettings,
    policies: PolicyRegistry,
    farms: FarmBook,
    plugins: Arc<PluginHub>,
    metrics: Arc<Metrics>,
    placements: PlacementQueues,
    directory: SessionDirectory,
    /// Machines front doors could not connect to lately: new logons avoid them.
    refusals: RecentRefusals,
    /// Where this broker sent new logons lately: the answer to their retries while the
    /// database is away.
    recent_logons: RecentLogons,
}

impl Decider {
    /// The oldest lease of a machine counted alive at `now` (see [`DecisionSettings`]).
    pub fn lease_cutoff(&self, now: i64) -> i64 {
        self.settings.lease_cutoff(now)
    }

    /// The session directory the decisions read.
    pub fn directory(&self) -> &SessionDirectory {
        &self.directory
    }

    pub fn new(
        store: Arc<dyn Store>,
        settings: DecisionSettings,
        policies: PolicyRegistry,
        farms: FarmBook,
        plugins: Arc<PluginHub>,
        metrics: Arc<Metrics>,
        directory: SessionDirectory,
    ) -> Self {
        let recent_logons = RecentLogons::new(settings.pending_logon_ttl);
        Decider {
            placements: PlacementQueues::new(
                store.clone(),
                settings.clone(),
                policies.clone(),
                farms.clone(),
            ),
            store,
            settings,
            policies,
            farms,
            plugins,
            metrics,
            directory,
            refusals: RecentRefusals::default(),
            recent_logons,
        }
    }

    /// Decides, and counts the decision by reason and policy.
    pub async fn redirect(&self, query: &RedirectQuery) -> Result<RedirectAnswer, ApiError> {
        self.note_refusals(query);
        let answer = match self.decide(query).await {
            Ok(answer) => answer,
            Err(error @ ApiError::Store(StoreError::Unavailable(_))) => {
                self.recalled_logon(query).ok_or(error)?
            }
            Err(error) => return Err(error),
        };
        self.remember_logon(query, &answer);
        let reason = match answer.reason {
            RedirectReason::ExistingSession => "existing_session",
            RedirectReason::PendingLogon => "pending_logon",
            RedirectReason::LoadBalanced => "load_balanced",
            RedirectReason::Plugin => "plugin",
            RedirectReason::External => "external",
            RedirectReason::Unspecified => "unspecified",
        };
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                reason,
                policy: answer.policy.unwrap_or("none"),
            })
            .inc();
        Ok(answer)
    }

    /// Remembers where a new logon went (see [`recent_logons`]).
    fn remember_logon(&self, query: &RedirectQuery, answer: &RedirectAnswer) {
        let new_logon = matches!(
            answer.reason,
            RedirectReason::LoadBalanced | RedirectReason::Plugin | RedirectReason::PendingLogon
        );
        if new_logon && !query.user_name.is_empty() {
            self.recent_logons.record(
                &query.farm,
                &cut_name::logon_key(query, &model::user_key(&query.user_name)),
                &answer.target,
                std::time::Instant::now(),
            );
        }
    }

    /// The user's logon in flight that this broker placed, while the database cannot say.
    fn recalled_logon(&self, query: &RedirectQuery) -> Option<RedirectAnswer> {
        let answer = self.recent_logons.answer(query)?;
        self.count_lookup("memory_degraded");
        Some(answer)
    }

    /// Remembers the machines the caller could not connect to (see [`refusals`]).
    fn note_refusals(&self, query: &RedirectQuery) {
        if !query.excluded_machines.is_empty() {
            let label = |id| self.directory.machine_label(id);
            self.refusals
                .note(&query.farm, &query.excluded_machines, label);
        }
    }

    async fn decide(&self, query: &RedirectQuery) -> Result<RedirectAnswer, ApiError> {
        let database = &self.settings.database;
        let mut now = self.store.now();
        let outage_near = !database.is_up() || database.settling(now).is_some();
        if outage_near && !self.knows_a_session_of(query) {
            if let Some(answer) = self.recalled_logon(query) {
                return Ok(answer);
            }
            self.wait_for_the_agents().await?;
            now = self.store.now();
        }
        let lease_cutoff = self.settings.lease_cutoff(now);
        if query.user_name.is_empty() {
            // A client that named no user (mstsc with a collection's load-balancing info, or
            // no user name saved): the one user with sessions from the client's IP, if any.
            let client = model::client_ip(&query.client_address);
            if let Some(known) = client.and_then(|ip| self.directory.client_user(&query.farm, ip))
                && let Some(session) = best_session(&known.sessions, "", |session| {
                    session.machine_takes_its_users_back(lease_cutoff)
                })
            {
                self.count_lookup("memory");
                return Ok(session_answer(session));
            }
            let placed = self
                .place(query, &anonymous_key(), now, lease_cutoff, false)
                .await?;
            return placed.ok_or_else(has_session_unexpectedly);
        }
        // The directory in memory first: a session there on a live machine is the answer; no
        // session there is a new user, whose placement checks the database under the farm's
        // lock. Sessions only on machines that look gone: the database decides.
        let known = self.directory.lookup(
            &query.farm,
            &query.user_name,
            &query.domain,
            may_be_cut(
                &query.user_name,
                &query.domain,
                query.user_name_may_be_truncated,
            ),
            &query.client_address,
        );
        if let Some(known) = &known {
            if let Some(session) = best_session(&known.sessions, &query.domain, |session| {
                session.machine_takes_its_users_back(lease_cutoff)
            }) {
                self.count_lookup("memory");
                return Ok(session_answer(session));
            }
            // A farm with a plug-in takes the database's way (below): the user's logon in
            // flight is read first, so that a retry does not ask the plug-in about a logon
            // already placed. A `None` placement: the directory was behind, and the user has
            // a session after all.
            if known.sessions.is_empty()
                && self.plugins.for_farm(&query.farm).is_none()
                && let Some(answer) = self
                    .place(query, &known.user_key, now, lease_cutoff, true)
                    .await?
            {
                self.count_lookup("memory");
                return Ok(answer);
            }
        }
        let from_store = self.decide_from_store(query, now, lease_cutoff);
        let fallback = known
            .as_ref()
            // On a machine READY when last heard of, however long ago: its lease may have run
            // out only because the database kept its agent from writing. Not on one whose
            // stream had ended (stopped, or gone): that is where nobody should be sent blind.
            .and_then(|known| {
                best_session(
                    &known.sessions,
                    &query.domain,
                    SessionRecord::machine_was_ready,
                )
            });
        let Some(session) = fallback else {
            self.count_lookup("database");
            return from_store.await;
        };
        // The directory knows a session of the user, on a machine not heard from lately (an
        // agent cannot write while the database is away): if the database cannot say better in
        // time, the last session known beats sending the user nowhere.
        let why = match tokio::time::timeout(DEGRADED_ANSWER_AFTER, from_store).await {
            Ok(Err(ApiError::Store(StoreError::Unavailable(error)))) => error.to_string(),
            Err(_) => format!("no answer within {DEGRADED_ANSWER_AFTER:?}"),
            Ok(answer) => {
                self.count_lookup("database");
                return answer;
            }
        };
        // Every returning user's answer while the database is away: one warning a minute.
        static DEGRADED: std::sync::LazyLock<tsbroker_common::warning_limit::WarningLimit> =
            std::sync::LazyLock::new(Default::default);
        match DEGRADED.warn_now() {
            Some(unwarned) => tracing::warn!(
                farm = %query.farm,
                user = %query.user_name,
                database = why,
                machine = %session.machine_name,
                since_last_warning = unwarned,
                "database cannot decide: answering with the user's last known session (said at most once a minute)"
            ),
            None => tracing::debug!(
                farm = %query.farm,
                user = %query.user_name,
                database = why,
                machine = %session.machine_name,
                "database cannot decide: answering with the user's last known session"
            ),
        }
        self.count_lookup("memory_degraded");
        Ok(session_answer(session))
    }

    /// Whether the directory in memory knows a session of the named user (on any machine: one
    /// that looks gone is the degraded answer's while the database is away).
    fn knows_a_session_of(&self, query: &RedirectQuery) -> bool {
        if query.user_name.is_empty() {
            return false;
        }
        let cut = may_be_cut(
            &query.user_name,
            &query.domain,
            query.user_name_may_be_truncated,
        );
        self.directory
            .lookup(
                &query.farm,
                &query.user_name,
                &query.domain,
                cut,
                &query.client_address,
            )
            .is_some_and(|known| !known.sessions.is_empty())
    }

    /// A user the directory knows no session of is placed only once the database answers and
    /// the agents have resynced after an outage: a session opened while it was away is not a
    /// new user's. While the database is taken for away, waits up to [`NEW_USER_HOLD`] for its
    /// return (asking it, one request at a time) and answers UNAVAILABLE if it is still away;
    /// just after it is back, waits out the agents' resyncs
    /// ([`crate::store::reachability::SETTLE_AFTER_OUTAGE`]).
    async fn wait_for_the_agents(&self) -> Result<(), ApiError> {
        let database = &self.settings.database;
        let held = std::time::Instant::now();
        while !database.is_up() {
            if held.elapsed() >= NEW_USER_HOLD {
                return Err(ApiError::Store(StoreError::unavailable(
                    "the database is away: no new logon is placed",
                )));
            }
            // One waiting request at a time asks the database itself: it may be back before
            // the health monitor's next look, and the agents are let back in once it is.
            if database.start_probe() {
                let answered =
                    tokio::time::timeout(Duration::from_millis(300), self.store.ping()).await;
                if matches!(answered, Ok(Ok(()))) {
                    database.came_back(self.store.now());
                }
                database.probed();
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if let Some(wait) = database.settling(self.store.now()) {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    fn count_lookup(&self, kind: &'static str) {
        self.metrics
            .session_lookups
            .get_or_create(&crate::metrics::KindLabels { kind })
            .inc();
    }

    /// The decision with everything read from the database.
    async fn decide_from_store(
        &self,
        query: &RedirectQuery,
        now: i64,
        lease_cutoff: i64,
    ) -> Result<RedirectAnswer, ApiError> {
        let (user_key, sessions) = self.sessions_of(query).await?;
        if let Some(session) = best_session(&sessions, &query.domain, |session| {
            session.machine_takes_its_users_back(lease_cutoff)
        }) {
            return Ok(session_answer(session));
        }
        let pending = self
            .store
            .pending_logon(&query.farm, &cut_name::logon_key(query, &user_key), now)
            .await?;
        if let Some(machine) = pending.filter(|machine| {
            machine.takes_its_users_back(lease_cutoff)
                && !query.excluded_machines.contains(&machine.id)
        }) {
            return Ok(pending_answer(&machine, query));
        }
        if sessions.is_empty()
            && let Some(answer) = self.external_session(query).await
        {
            return Ok(answer);
        }
        let placed = self
            .place(query, &user_key, now, lease_cutoff, false)
            .await?;
        placed.ok_or_else(has_session_unexpectedly)
    }

    /// A plug-in's session outside the farm for a user without one inside it.
    async fn external_session(&self, query: &RedirectQuery) -> Option<RedirectAnswer> {
        let link = self.plugins.for_farm(&query.farm);
        plugin_step::external_session(link, query).await
    }

    /// The user's sessions in the farm; a truncated name that is the unique prefix of a user
    /// with sessions becomes that user (of several, the one with a session from the client's
    /// address, when only one has — also when the name is someone's whole name), and a name in
    /// user principal form without sessions of its own (`ann@example.com`; with a domain, none
    /// of that domain) becomes its user part (`ann`) when that one has sessions (of the domain).
    async fn sessions_of(
        &self,
        query: &RedirectQuery,
    ) -> Result<(String, Vec<SessionRecord>), ApiError> {
        let user_key = model::user_key(&query.user_name);
        let cut = may_be_cut(
            &query.user_name,
            &query.domain,
            query.user_name_may_be_truncated,
        );
        let by_client = || {
            let store = self.store.as_ref();
            cut_name::user_by_client(store, &query.farm, &user_key, &query.client_address)
        };
        let sessions = self.store.user_sessions(&query.farm, &user_key).await?;
        if !sessions.is_empty() {
            // A whole name that may also be a longer one's cut (see `lookup_in`).
            if cut && let Some(found) = by_client().await? {
                return Ok(found);
            }
            return self.or_user_part(query, (user_key, sessions)).await;
        }
        if cut {
            let matches = self
                .store
                .users_with_prefix(&query.farm, &user_key, 2)
                .await?;
            match matches.as_slice() {
                [full_key] => {
                    let sessions = self.store.user_sessions(&query.farm, full_key).await?;
                    return Ok((full_key.clone(), sessions));
                }
                // Several users share the cut name: the one with a session from this client.
                [_, _, ..] => {
                    if let Some(found) = by_client().await? {
                        return Ok(found);
                    }
                }
                _ => {}
            }
        }
        self.or_user_part(query, (user_key, sessions)).await
    }

    /// A name in user principal form whose sessions are none of the domain asked for (or who
    /// has none): its user part's, when that one has sessions
    /// ([`crate::directory::upn_fallback`]).
    async fn or_user_part(
        &self,
        query: &RedirectQuery,
        whole: (String, Vec<SessionRecord>),
    ) -> Result<(String, Vec<SessionRecord>), ApiError> {
        let in_domain = |sessions: &[SessionRecord]| {
            sessions
                .iter()
                .any(|session| session.is_of_domain(&query.domain))
        };
        if in_domain(&whole.1) {
            return Ok(whole);
        }
        let Some(user) = model::upn_user_part(&query.user_name) else {
            return Ok(whole);
        };
        let short_key = model::user_key(user);
        let sessions = self.store.user_sessions(&query.farm, &short_key).await?;
        Ok(crate::directory::upn_fallback(
            whole,
            (short_key, sessions),
            in_domain,
        ))
    }

    /// Places a new logon; `None` when `check_sessions` found that the user has a session.
    async fn place(
        &self,
        query: &RedirectQuery,
        user_key: &str,
        now: i64,
        lease_cutoff: i64,
        check_sessions: bool,
    ) -> Result<Option<RedirectAnswer>, ApiError> {
        // Held as in flight under this key (the user's, or a cut name's with the client's IP).
        let logon_key = cut_name::logon_key(query, user_key);
        // A plug-in is asked outside the farm's lock (it may take up to its deadline); its pick
        // is honoured if it is still a candidate once the lock is held.
        let preferred = match self.plugins.for_farm(&query.farm) {
            Some(link) => {
                let farm_settings = self.farms.get(&query.farm);
                let request = PlacementRequest {
                    farm: &query.farm,
                    user_key: &logon_key,
                    now,
                    lease_cutoff,
                    pending_ttl_ms: self.settings.pending_logon_ttl.as_millis() as i64,
                    max_pending_per_machine: self.settings.max_pending_logons_per_machine,
                    slow_start_ms: farm_settings.slow_start.as_millis() as i64,
                    excluded: &query.excluded_machines,
                    check_sessions: false,
                };
                let context = ChoiceContext {
                    farm: &query.farm,
                    user_key,
                    settings: farm_settings,
                };
                let step = plugin_step::PluginStep {
                    store: self.store.as_ref(),
                    policies: &self.policies,
                    link,
                };
                let group = farm_settings.group_of(user_key);
                step.preference(query, &request, &context, group).await?
            }
            None => None,
        };
        // Machines that refused others' connections lately are left out, unless that leaves
        // no candidate: then they are tried after all (they may take this one).
        let avoided = self
            .refusals
            .avoided(std::time::Instant::now(), &query.excluded_machines);
        let job = |avoided: &[uuid::Uuid]| PlacementJob {
            user_key: logon_key.clone().into_owned(),
            excluded: [query.excluded_machines.as_slice(), avoided].concat(),
            preferred,
            check_sessions,
        };
        let mut placed = self.placements.place(&query.farm, job(&avoided)).await?;
        if !avoided.is_empty() && matches!(placed.placement, Placement::NoCandidate(_)) {
            placed = self.placements.place(&query.farm, job(&[])).await?;
        }
        let Placed {
            placement,
            policy,
            by_plugin,
        } = placed;
        let reason = if by_plugin {
            RedirectReason::Plugin
        } else {
            RedirectReason::LoadBalanced
        };
        if preferred.is_some()
            && !by_plugin
            && matches!(placement, Placement::Placed(_))
            && let Some(link) = self.plugins.for_farm(&query.farm)
        {
            link.pick_overtaken(&query.farm, user_key);
        }
        match placement {
            Placement::AlreadyPending(machine) => Ok(Some(pending_answer(&machine, query))),
            Placement::Placed(machine) => Ok(Some(RedirectAnswer {
                target: Target::from(&machine),
                reason,
                session_id: None,
                user_name: query.user_name.clone(),
                policy,
            })),
            Placement::NoCandidate(loads) => {
                let group = self.farms.get(&query.farm).group_of(user_key);
                Err(no_candidate_error(&query.farm, &loads, group))
            }
            Placement::HasSession => Ok(None),
        }
    }

    /// The settings of a farm.
    pub fn farm_settings(&self, farm: &str) -> &FarmSettings {
        self.farms.get(farm)
    }
}

/// Back to the user's session.
fn session_answer(session: &SessionRecord) -> RedirectAnswer {
    RedirectAnswer {
        target: Target {
            machine_id: Some(session.machine_id),
            name: session.machine_name.clone(),
            address: session.machine_address.clone(),
            front_door: session.machine_front_door,
        },
        reason: RedirectReason::ExistingSession,
        session_id: u32::try_from(session.session_id).ok(),
        user_name: session.user_name.clone(),
        policy: None,
    }
}

/// A placement that did not ask to check sessions cannot answer `HasSession`.
fn has_session_unexpectedly() -> ApiError {
    ApiError::Store(crate::store::StoreError::Internal(sqlx::Error::Protocol(
        "placement found a session it was not asked to look for".into(),
    )))
}

fn pending_answer(machine: &MachineRecord, query: &RedirectQuery) -> RedirectAnswer {
    RedirectAnswer {
        target: Target::from(machine),
        reason: RedirectReason::PendingLogon,
        session_id: None,
        user_name: query.user_name.clone(),
        policy: None,
    }
}

/// The candidates a user may be placed on: their group's machines, or (when none of those can
/// take the logon and the group allows it) every candidate.
pub(crate) fn group_pool<'a>(
    group: Option<&GroupRule>,
    candidates: &'a [MachineLoad],
) -> Cow<'a, [MachineLoad]> {
    let Some(group) = group else {
        return Cow::Borrowed(candidates);
    };
    let members: Vec<MachineLoad> = candidates
        .iter()
        .filter(|candidate| group.includes_machine(&candidate.machine.name))
        .cloned()
        .collect();
    if members.is_empty() && group.fallback {
        Cow::Borrowed(candidates)
    } else {
        Cow::Owned(members)
    }
}

/// Pending logons of clients that sent no user name still count as load, each on its own key.
fn anonymous_key() -> String {
    format!("\u{1}anonymous-{}", uuid::Uuid::new_v4())
}

/// The session to send the user back to: on a machine `eligible` accepts, matching the domain
/// when one was given; disconnected before active; the newest among equals.
pub fn best_session<'a>(
    sessions: &'a [SessionRecord],
    domain: &str,
    eligible: impl Fn(&SessionRecord) -> bool,
) -> Option<&'a SessionRecord> {
    sessions
        .iter()
        .filter(|session| eligible(session) && session.is_of_domain(domain))
        .max_by_key(|session| {
            (
                session.session_state() == SessionState::Disconnected,
                session.logon_at,
                session.state_changed_at,
            )
        })
}

/// Says why no machine could take the logon, with the right status: UNAVAILABLE when nothing
/// is ready (or everything drains), RESOURCE_EXHAUSTED when ready machines are full or a
/// group without fallback has no machine free.
fn no_candidate_error(farm: &str, loads: &[MachineLoad], group: Option<&GroupRule>) -> ApiError {
    let count = |reason: Ineligible| {
        loads
            .iter()
            .filter(|load| load.ineligible == Some(reason))
            .count()
    };
    let not_ready = count(Ineligible::NotReady);
    let draining = count(Ineligible::Draining);
    let at_limit = count(Ineligible::AtSessionLimit);
    let at_cap = count(Ineligible::AtLogonCap);
    let excluded = count(Ineligible::Excluded);
    let mut summary = format!(
        "{} machines: {not_ready} not ready, {draining} draining, {at_limit} at their session limit, \
         {at_cap} at their cap of logons in flight",
        loads.len()
    );
    if excluded > 0 {
        summary.push_str(&format!(", {excluded} unreachable from the caller"));
    }
    let candidates = loads
        .iter()
        .filter(|load| load.ineligible.is_none())
        .count();
    if let (Some(group), true) = (group, candidates > 0) {
        return ApiError::FarmFull(format!(
            "no machine of group {:?} in farm {farm:?} can take a new logon now, and the group has no fallback",
            group.name
        ));
    }
    if loads.is_empty() {
        ApiError::NoMachineAvailable(format!("farm {farm:?} has no machines"))
    } else if at_limit + at_cap > 0 {
        ApiError::FarmFull(format!(
            "no machine in farm {farm:?} can take a new logon now ({summary})"
        ))
    } else {
        ApiError::NoMachineAvailable(format!(
            "no machine in farm {farm:?} is ready for new logons ({summary})"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(machine: u128, state: &str, logon_at: i64, domain: &str) -> SessionRecord {
        SessionRecord {
            machine_id: uuid::Uuid::from_u128(machine),
            machine_name: format!("ts{machine}"),
            machine_address: format!("ts{machine}:3389"),
            machine_state: "ready".into(),
            machine_last_seen_at: 100,
            machine_front_door: false,
            farm: "f".into(),
            session_id: 1,
            user_name: "alice".into(),
            domain: domain.into(),
            state: state.into(),
            client_address: String::new(),
            logon_at,
            state_changed_at: logon_at,
        }
    }

    #[test]
    fn disconnected_wins_then_newest() {
        let sessions = vec![
            session(1, "active", 50, ""),
            session(2, "disconnected", 10, ""),
            session(3, "disconnected", 20, ""),
        ];
        assert_eq!(
            best_session(&sessions, "", |session| session
                .machine_takes_its_users_back(0))
            .unwrap()
            .machine_id,
            uuid::Uuid::from_u128(3)
        );
    }

    #[test]
    fn unreachable_machines_and_other_domains_are_skipped() {
        let mut stale = session(1, "disconnected", 10, "");
        stale.machine_last_seen_at = 5;
        let other_domain = session(2, "disconnected", 10, "EVIL");
        let sessions = vec![stale, other_domain, session(3, "active", 1, "corp")];
        assert_eq!(
            best_session(&sessions, "CORP", |session| session
                .machine_takes_its_users_back(6))
            .unwrap()
            .machine_id,
            uuid::Uuid::from_u128(3)
        );
    }

    #[test]
    fn the_fallback_without_the_database_takes_only_machines_last_seen_ready() {
        // Stopped an hour ago (its stream closed: unreachable), with a disconnected session.
        let mut stopped = session(1, "disconnected", 10, "");
        stopped.machine_state = "unreachable".into();
        stopped.machine_last_seen_at = -3_600_000;
        // Ready when last heard of; its lease ran out during the outage.
        let mut lapsed = session(2, "active", 5, "");
        lapsed.machine_last_seen_at = -60_000;
        let sessions = vec![stopped, lapsed];
        assert_eq!(
            best_session(&sessions, "", SessionRecord::machine_was_ready)
                .unwrap()
                .machine_id,
            uuid::Uuid::from_u128(2)
        );
    }

    #[test]
    fn no_candidate_statuses() {
        use crate::store::test_support::machine_load;
        let mut full = machine_load(0, 100, 5);
        full.ineligible = Some(Ineligible::AtSessionLimit);
        let status: tonic::Status = no_candidate_error("f", &[full], None).into();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let mut draining = machine_load(1, 100, 0);
        draining.ineligible = Some(Ineligible::Draining);
        let status: tonic::Status = no_candidate_error("f", &[draining], None).into();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("1 draining"),
            "{}",
            status.message()
        );
    }
}
