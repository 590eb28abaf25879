//! What the store hands back: rows decoded into plain structs, and the small types that
//! describe a placement (candidates, why a machine is not one, the outcome).

use std::sync::Arc;
use tsbroker_common::model::{MachineState, SessionState};
use uuid::Uuid;

/// A machine as stored, with the pending logons counted at read time.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct MachineRecord {
    pub id: Uuid,
    pub farm: String,
    pub name: String,
    pub address: String,
    pub agent_weight: i64,
    pub admin_weight: Option<i64>,
    pub agent_session_limit: i64,
    pub admin_session_limit: Option<i64>,
    pub single_session: bool,
    pub agent_version: String,
    pub state: String,
    pub draining: bool,
    pub connection_id: Option<Uuid>,
    pub session_count: i64,
    pub load_cpu: Option<f64>,
    pub load_memory: Option<f64>,
    pub load_sessions: Option<i64>,
    pub load_pending: Option<i64>,
    pub last_seen_at: i64,
    pub ready_since: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub front_door: bool,
    pub pending_logons: i64,
}

impl MachineRecord {
    pub fn machine_state(&self) -> MachineState {
        MachineState::parse(&self.state).unwrap_or(MachineState::Unreachable)
    }

    /// The administrator's weight if set, else the agent's.
    pub fn weight(&self) -> u32 {
        self.admin_weight
            .unwrap_or(self.agent_weight)
            .clamp(1, 10_000) as u32
    }

    /// The administrator's limit if set, else the agent's; 0 means none.
    pub fn session_limit(&self) -> u32 {
        self.admin_session_limit
            .unwrap_or(self.agent_session_limit)
            .clamp(0, i64::from(u32::MAX)) as u32
    }

    /// Most sessions the machine may host: its limit, and one in single-session mode.
    pub fn capacity(&self) -> Option<u64> {
        let limit = self.session_limit();
        match (self.single_session, limit) {
            (true, _) => Some(1),
            (false, 0) => None,
            (false, limit) => Some(u64::from(limit)),
        }
    }

    /// The state as operators should see it: a READY or JOINING machine whose lease ran out
    /// before `lease_cutoff` is UNREACHABLE, as decisions take it.
    pub fn state_seen(&self, lease_cutoff: i64) -> MachineState {
        match self.machine_state() {
            MachineState::Ready | MachineState::Joining if self.last_seen_at < lease_cutoff => {
                MachineState::Unreachable
            }
            state => state,
        }
    }

    /// READY and heard from within the heartbeat timeout (`lease_cutoff` is the oldest
    /// acceptable `last_seen_at`).
    pub fn is_reachable(&self, lease_cutoff: i64) -> bool {
        self.machine_state() == MachineState::Ready && self.last_seen_at >= lease_cutoff
    }

    /// Whether the machine's own users (their sessions, their logons in flight) are still sent
    /// to it: heard from within the heartbeat timeout, whether its stream is up or not. A
    /// stream ends for the broker's reasons (a restart, a replica gone, a proxy restarted) or
    /// the agent's (restarted) far more often than with its server, whose RDP service goes on
    /// serving the sessions: sending those users elsewhere at once would open them second
    /// sessions. A new logon still needs [`MachineRecord::is_reachable`].
    pub fn takes_its_users_back(&self, lease_cutoff: i64) -> bool {
        takes_users_back(self.machine_state(), self.last_seen_at, lease_cutoff)
    }
}

fn takes_users_back(state: MachineState, last_seen_at: i64, lease_cutoff: i64) -> bool {
    state != MachineState::Removed && last_seen_at >= lease_cutoff
}

/// A farm with counts taken at read time.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct FarmRecord {
    pub name: String,
    pub policy: String,
    pub machine_count: i64,
    pub ready_machine_count: i64,
    pub session_count: i64,
}

/// A session with the machine it runs on.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct SessionRecord {
    pub machine_id: Uuid,
    pub machine_name: String,
    pub machine_address: String,
    pub machine_state: String,
    pub machine_last_seen_at: i64,
    pub machine_front_door: bool,
    pub farm: String,
    pub session_id: i64,
    pub user_name: String,
    pub domain: String,
    pub state: String,
    pub client_address: String,
    pub logon_at: i64,
    pub state_changed_at: i64,
}

impl SessionRecord {
    pub fn session_state(&self) -> SessionState {
        SessionState::parse(&self.state).unwrap_or(SessionState::Active)
    }

    /// Whether a user asking under `domain` may be sent back to this session: any session when
    /// no domain is given; else one reported with that domain (case-insensitive) or with none
    /// (its source named no domain: it may be any domain's).
    pub fn is_of_domain(&self, domain: &str) -> bool {
        domain.is_empty() || self.domain.is_empty() || self.domain.eq_ignore_ascii_case(domain)
    }

    /// Whether the session's machine was READY when last heard of, however long ago.
    pub fn machine_was_ready(&self) -> bool {
        MachineState::parse(&self.machine_state) == Some(MachineState::Ready)
    }

    /// [`MachineRecord::takes_its_users_back`] for the session's machine.
    pub fn machine_takes_its_users_back(&self, lease_cutoff: i64) -> bool {
        MachineState::parse(&self.machine_state)
            .is_some_and(|state| takes_users_back(state, self.machine_last_seen_at, lease_cutoff))
    }
}

/// Filters for listing sessions; `None` does not filter.
#[derive(Clone, Debug, Default)]
pub struct SessionFilter {
    pub farm: Option<String>,
    pub machine: Option<Uuid>,
    pub user_key: Option<String>,
    /// Sessions of this domain (case-insensitive), or of none: a session whose source named no
    /// domain may be any domain's, as a redirect takes it.
    pub domain: Option<String>,
    pub state: Option<SessionState>,
    /// Only sessions after this (machine id, session id), for paging.
    pub after: Option<(Uuid, i64)>,
    pub limit: u32,
}

/// An administrator's change to a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineChange {
    Drain(bool),
    /// `None` clears the override.
    Weight(Option<u32>),
    /// `None` clears the override.
    SessionLimit(Option<u32>),
}

impl std::fmt::Display for MachineChange {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MachineChange::Drain(true) => formatter.write_str("drain"),
            MachineChange::Drain(false) => formatter.write_str("undrain"),
            MachineChange::Weight(Some(weight)) => write!(formatter, "weight {weight}"),
            MachineChange::Weight(None) => formatter.write_str("weight back to the agent's"),
            MachineChange::SessionLimit(Some(0)) => formatter.write_str("no session limit"),
            MachineChange::SessionLimit(Some(limit)) => write!(formatter, "session limit {limit}"),
            MachineChange::SessionLimit(None) => {
                formatter.write_str("session limit back to the agent's")
            }
        }
    }
}

/// The states an agent's own stream may move its machine to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamMachineState {
    Ready,
    Removed,
}

/// What a session event did to the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventOutcome {
    Applied,
    /// Applied after a repair (for example a disconnect of a session the broker did not know,
    /// which is created).
    Repaired(&'static str),
    /// Nothing to do (for example a logoff of an unknown session).
    Ignored(&'static str),
}

/// A machine of the farm and the load the policy sees.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineLoad {
    /// Shared: a farm's records are classified once per placement, never copied.
    pub machine: Arc<MachineRecord>,
    /// Why the machine cannot take a new logon now; `None` for a candidate.
    pub ineligible: Option<Ineligible>,
    /// Slow start: the share of its weight a machine that just became READY works with,
    /// growing from `MIN_RAMP` to 1 over the farm's slow-start period.
    pub ramp: f64,
}

/// Where slow start begins: a fresh machine counts with a twentieth of its weight.
pub const MIN_RAMP: f64 = 0.05;

impl MachineLoad {
    /// Sessions plus logons on their way.
    pub fn load(&self) -> u64 {
        (self.machine.session_count.max(0) + self.machine.pending_logons.max(0)) as u64
    }

    /// The weight the policies use: the machine's weight scaled by its slow-start ramp.
    pub fn effective_weight(&self) -> f64 {
        f64::from(self.machine.weight()) * self.ramp
    }
}

/// The slow-start ramp at `now` of a machine READY since `ready_since`, in a farm whose earliest
/// reachable machine has been READY since `farm_ready_since`. A machine is slowed for at most as
/// long as it lagged that machine (and at most `slow_start_ms`): machines that came up together
/// (a new farm, every machine after a broker restart) reach full weight at once, a machine that
/// joins a serving farm ramps over the whole period.
pub fn slow_start_ramp(
    ready_since: Option<i64>,
    farm_ready_since: Option<i64>,
    now: i64,
    slow_start_ms: i64,
) -> f64 {
    let (Some(since), Some(farm_since)) = (ready_since, farm_ready_since) else {
        return 1.0;
    };
    let window = slow_start_ms.min(since - farm_since);
    if window <= 0 {
        return 1.0;
    }
    let elapsed = (now - since).max(0) as f64;
    (elapsed / window as f64).clamp(MIN_RAMP, 1.0)
}

/// Why a machine is not a candidate for a new logon.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Ineligible {
    NotReady,
    Draining,
    AtSessionLimit,
    AtLogonCap,
    /// The caller could not connect to it for this client (`exclude_machine_ids`).
    Excluded,
}

impl Ineligible {
    /// Classifies a machine for a new logon; `max_pending_per_machine` is already scaled by the
    /// machine's slow-start ramp.
    pub fn of(
        machine: &MachineRecord,
        lease_cutoff: i64,
        max_pending_per_machine: u32,
    ) -> Option<Ineligible> {
        if !machine.is_reachable(lease_cutoff) {
            return Some(Ineligible::NotReady);
        }
        if machine.draining {
            return Some(Ineligible::Draining);
        }
        let load = (machine.session_count.max(0) + machine.pending_logons.max(0)) as u64;
        if machine.capacity().is_some_and(|capacity| load >= capacity) {
            return Some(Ineligible::AtSessionLimit);
        }
        if machine.pending_logons.max(0) as u64 >= u64::from(max_pending_per_machine) {
            return Some(Ineligible::AtLogonCap);
        }
        None
    }
}

/// What a new logon is placed with.
#[derive(Clone, Debug)]
pub struct PlacementRequest<'a> {
    pub farm: &'a str,
    pub user_key: &'a str,
    pub now: i64,
    pub lease_cutoff: i64,
    pub pending_ttl_ms: i64,
    pub max_pending_per_machine: u32,
    /// The farm's slow-start period (0: none).
    pub slow_start_ms: i64,
    /// Machines the caller could not connect to: never chosen, and a pending logon there is
    /// placed again.
    pub excluded: &'a [Uuid],
    /// The caller looked for the user's sessions in memory only: the placement looks in the
    /// database, under the farm's lock, and answers [`Placement::HasSession`] when it finds one.
    pub check_sessions: bool,
}

/// The policy's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    Machine(Uuid),
    /// The policy found no suitable machine among the candidates.
    Nothing,
}

/// The policy a placement runs: given the farm's policy name and the candidates, picks one.
pub type Chooser<'c> = dyn for<'a> Fn(&'a str, &'a [MachineLoad]) -> Choice + Send + Sync + 'c;

/// The policy of a batch of placements: like [`Chooser`], for the request at the given index.
pub type BatchChooser<'c> =
    dyn for<'a> Fn(usize, &'a str, &'a [MachineLoad]) -> Choice + Send + Sync + 'c;

/// A farm's machines as this broker's last placement transaction left them (its own picks
/// counted), reused by its next placement transaction instead of reading the farm again while
/// the farm's placement counter shows that nobody else placed in between and no admin change
/// came. So no placement is ever missed (any other broker's makes the copy stale). What the
/// agents report (sessions, loads, logons that turn pending logons into sessions) reaches the
/// copy by refreshes: a copy older than `max_age_ms` is brought up to date by reading only the
/// machines whose row changed since (with their pending logons), and read whole again every
/// [`FULL_READ_EVERY`] copies' ages (pending logons that expired, a row another broker's clock
/// stamped late). Each user's own pending logon is always read from the database.
#[derive(Debug, Default)]
pub struct FarmCache {
    machines: Vec<Arc<MachineRecord>>,
    /// The farm's placement counter after the transaction that left `machines`.
    counter: i64,
    /// When `machines` were read or refreshed; `None`: nothing usable.
    read: Option<FarmRead>,
    max_age_ms: i64,
}

/// A whole read of the farm is due after this many `max_age_ms`.
pub const FULL_READ_EVERY: i64 = 10;

/// A refresh reads rows changed since the last one minus this much: a stream write that
/// stamped its rows before the last refresh but committed after it is still seen.
pub const REFRESH_OVERLAP_MS: i64 = 500;

/// When a farm copy was read from the database (ms since the epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FarmRead {
    /// The last read or refresh.
    pub refreshed_at: i64,
    /// The last whole read.
    pub full_at: i64,
}

impl FarmRead {
    /// A whole read at `now`.
    pub fn full(now: i64) -> Self {
        FarmRead {
            refreshed_at: now,
            full_at: now,
        }
    }

    /// Rows changed at or after this time are read by the next refresh.
    pub fn changed_since(&self) -> i64 {
        self.refreshed_at - REFRESH_OVERLAP_MS
    }
}

/// What a placement transaction may do with the farm's copy.
#[derive(Debug)]
pub enum CachedFarm {
    /// Use it as it is.
    Fresh(Vec<Arc<MachineRecord>>, FarmRead),
    /// Read the machines changed since `FarmRead::changed_since` into it first.
    Refresh(Vec<Arc<MachineRecord>>, FarmRead),
    /// Read the farm.
    Stale,
}

impl FarmCache {
    /// A cache whose copies live at most `max_age_ms` (0: never reused).
    pub fn new(max_age_ms: i64) -> Self {
        FarmCache {
            max_age_ms,
            ..FarmCache::default()
        }
    }

    /// Forgets the copy: the next transaction reads the farm.
    pub fn invalidate(&mut self) {
        self.read = None;
        self.machines = Vec::new();
    }

    /// What the transaction that took the farm's lock and saw `counter` may do with the copy;
    /// empties the cache either way (it is refilled by [`FarmCache::keep`] after a commit).
    pub fn take(&mut self, counter: i64, now: i64) -> CachedFarm {
        let Some(read) = self.read.take() else {
            return CachedFarm::Stale;
        };
        let machines = std::mem::take(&mut self.machines);
        if counter != self.counter + 1 {
            return CachedFarm::Stale;
        }
        if now.saturating_sub(read.refreshed_at) < self.max_age_ms {
            CachedFarm::Fresh(machines, read)
        } else if now.saturating_sub(read.full_at) < self.max_age_ms * FULL_READ_EVERY {
            CachedFarm::Refresh(machines, read)
        } else {
            CachedFarm::Stale
        }
    }

    /// Keeps the machines a committed transaction left, read from the database as `read` says.
    pub fn keep(&mut self, machines: Vec<Arc<MachineRecord>>, counter: i64, read: FarmRead) {
        if self.max_age_ms > 0 {
            self.machines = machines;
            self.counter = counter;
            self.read = Some(read);
        }
    }

    /// When the copy was last read or refreshed, if there is one.
    pub fn loaded_at(&self) -> Option<i64> {
        self.read.map(|read| read.refreshed_at)
    }
}

/// The outcome of placing a logon.
#[derive(Clone, Debug)]
pub enum Placement {
    /// Another request placed this user moments ago: same machine.
    AlreadyPending(MachineRecord),
    /// The policy's pick, now recorded as a pending logon.
    Placed(MachineRecord),
    /// No machine can take the logon; the farm's machines as they were classified.
    NoCandidate(Vec<MachineLoad>),
    /// The request asked to check (`check_sessions`) and the user has a session in the farm:
    /// nothing was placed; the caller sends the user back to it.
    HasSession,
}

/// A machine's cap of logons in flight: the farm's cap scaled by its slow-start ramp, never
/// below one.
pub fn logon_cap(max_pending_per_machine: u32, ramp: f64) -> u32 {
    ((f64::from(max_pending_per_machine) * ramp).floor() as u32).max(1)
}

/// Classifies each machine of the farm for a new logon. Slow start (see `slow_start_ramp`) is
/// measured against the farm's earliest reachable machine, so only a machine that (re)joined
/// while others were serving is slowed; its cap of logons in flight shrinks with its weight
/// (never below one).
pub fn classify_machines<M: Into<Arc<MachineRecord>>>(
    machines: Vec<M>,
    request: &PlacementRequest<'_>,
) -> Vec<MachineLoad> {
    let machines: Vec<Arc<MachineRecord>> = machines.into_iter().map(Into::into).collect();
    let farm_ready_since = machines
        .iter()
        .filter(|machine| machine.is_reachable(request.lease_cutoff))
        .filter_map(|machine| machine.ready_since)
        .min();
    machines
        .into_iter()
        .map(|machine| {
            let ramp = slow_start_ramp(
                machine.ready_since,
                farm_ready_since,
                request.now,
                request.slow_start_ms,
            );
            let cap = logon_cap(request.max_pending_per_machine, ramp);
            let ineligible = if request.excluded.contains(&machine.id) {
                Some(Ineligible::Excluded)
            } else {
                Ineligible::of(&machine, request.lease_cutoff, cap)
            };
            MachineLoad {
                ineligible,
                machine,
                ramp,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::machine_load;

    fn request(now: i64) -> PlacementRequest<'static> {
        PlacementRequest {
            farm: "test",
            user_key: "u",
            now,
            lease_cutoff: 0,
            pending_ttl_ms: 30_000,
            max_pending_per_machine: 20,
            slow_start_ms: 60_000,
            excluded: &[],
            check_sessions: false,
        }
    }

    fn ready_at(index: u32, since: i64) -> MachineRecord {
        let mut machine = MachineRecord::clone(&machine_load(index, 100, 0).machine);
        machine.ready_since = Some(since);
        machine
    }

    #[test]
    fn machines_that_came_up_together_are_not_slowed() {
        let loads = classify_machines(
            vec![ready_at(0, 1_000), ready_at(1, 1_050), ready_at(2, 2_000)],
            &request(3_000),
        );
        assert!(
            loads
                .iter()
                .all(|load| load.ramp == 1.0 && load.ineligible.is_none()),
            "{loads:?}"
        );
    }

    #[test]
    fn machines_that_joined_moments_apart_stay_equal_later_on() {
        // Half a second apart, 3.5 s in: a ratio of ramps would slow the second machine.
        let loads = classify_machines(vec![ready_at(0, 0), ready_at(1, 500)], &request(3_500));
        assert_eq!((loads[0].ramp, loads[1].ramp), (1.0, 1.0));
        // While it is still within its half-second lag, the second one is slowed.
        let early = classify_machines(vec![ready_at(0, 0), ready_at(1, 500)], &request(600));
        assert!(early[1].ramp < 0.5, "{}", early[1].ramp);
    }

    #[test]
    fn a_machine_that_joins_a_serving_farm_ramps_up() {
        let loads = classify_machines(
            vec![ready_at(0, 0), ready_at(1, 120_000)],
            &request(123_000),
        );
        assert_eq!(loads[0].ramp, 1.0);
        assert!((loads[1].ramp - 0.05).abs() < 1e-9, "{}", loads[1].ramp);
        let later = classify_machines(
            vec![ready_at(0, 0), ready_at(1, 120_000)],
            &request(150_000),
        );
        assert!((later[1].ramp - 0.5).abs() < 1e-9, "{}", later[1].ramp);
        let done = classify_machines(
            vec![ready_at(0, 0), ready_at(1, 120_000)],
            &request(180_000),
        );
        assert_eq!(done[1].ramp, 1.0);
    }
}
