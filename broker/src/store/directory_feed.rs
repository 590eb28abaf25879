//! What committed writes did to sessions and machines, for the broker's in-memory session
//! directory (`crate::directory`): after every commit that changed a session or a machine's
//! state, and before the write is answered, each store hands a [`DirectoryDelta`] to the
//! [`DirectorySink`] attached to it; plus the reads the directory loads itself with.
//!
//! A delta carries the session rows exactly as written (absolute values, so applying one twice
//! or after a fresher read changes nothing), the sessions deleted, the machines added, their
//! new states and removals. On PostgreSQL the machines a commit touched are also announced to
//! the other replicas (NOTIFY on [`DIRECTORY_CHANNEL`]), whose directories read them again
//! (deltas with `reload`).

use super::ingest::plan::SessionRow;
use uuid::Uuid;

/// The PostgreSQL channel on which replicas announce the machines whose sessions or state they
/// changed: the payload is the sender's instance id, then machine ids, separated by spaces.
pub const DIRECTORY_CHANNEL: &str = "tsbroker_directory";

/// Most machine ids in one notification (PostgreSQL caps a payload at 8,000 bytes).
pub const IDS_PER_NOTIFICATION: usize = 200;

/// One commit's effect on the directory.
#[derive(Clone, Debug, Default)]
pub struct DirectoryDelta {
    /// Sessions as they are after the commit (created or changed).
    pub upserts: Vec<SessionRow>,
    /// Sessions that ended: (machine, session id).
    pub deletes: Vec<(Uuid, i64)>,
    /// Machines added (or taken over by a new stream), as they now are.
    pub machines: Vec<DirectoryMachine>,
    /// Machines whose state changed, with the new state.
    pub states: Vec<(Uuid, String)>,
    /// Machines deleted or REMOVED, with all their sessions.
    pub removed: Vec<Uuid>,
    /// Machines another replica changed: the directory reads them again.
    pub reload: Vec<Uuid>,
    /// Machines heard from at `at` (their lease was refreshed).
    pub seen: Vec<Uuid>,
    /// Notifications may have been missed: read everything again.
    pub everything: bool,
    /// When the commit happened (ms since the epoch).
    pub at: i64,
}

impl DirectoryDelta {
    /// A delta of machines gone with their sessions.
    pub fn removed(machines: Vec<Uuid>, at: i64) -> Self {
        DirectoryDelta {
            removed: machines,
            at,
            ..DirectoryDelta::default()
        }
    }

    /// A delta of one machine's new state.
    pub fn state(machine: Uuid, state: &str, at: i64) -> Self {
        DirectoryDelta {
            states: vec![(machine, state.to_owned())],
            at,
            ..DirectoryDelta::default()
        }
    }

    /// A delta that asks the directory to read these machines again.
    pub fn reload(machines: Vec<Uuid>) -> Self {
        DirectoryDelta {
            reload: machines,
            ..DirectoryDelta::default()
        }
    }

    /// A delta that asks the directory to read everything again.
    pub fn reload_everything() -> Self {
        DirectoryDelta {
            everything: true,
            ..DirectoryDelta::default()
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.everything
            && self.upserts.is_empty()
            && self.deletes.is_empty()
            && self.machines.is_empty()
            && self.states.is_empty()
            && self.removed.is_empty()
            && self.reload.is_empty()
            && self.seen.is_empty()
    }

    /// The machines whose sessions or state the commit changed (what other replicas must read
    /// again), each once.
    pub fn changed_machines(&self) -> Vec<Uuid> {
        let mut machines: Vec<Uuid> = self
            .upserts
            .iter()
            .map(|row| row.machine_id)
            .chain(self.deletes.iter().map(|(machine, _)| *machine))
            .chain(self.machines.iter().map(|machine| machine.id))
            .chain(self.states.iter().map(|(machine, _)| *machine))
            .chain(self.removed.iter().copied())
            .collect();
        machines.sort_unstable();
        machines.dedup();
        machines
    }
}

/// Where a store hands its deltas: the directory, which applies them before the store answers
/// the write (so nothing a caller can observe is ahead of the directory).
pub trait DirectorySink: Send + Sync + 'static {
    fn apply(&self, delta: DirectoryDelta);
}

/// A store's attachment point for its directory (set once, shared with the store's listener).
pub type SinkSlot = std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn DirectorySink>>>;

/// Hands `delta` to the attached sink, if any (and if there is anything in it).
pub fn hand_over(slot: &SinkSlot, delta: DirectoryDelta) {
    if let Some(sink) = slot.get()
        && !delta.is_empty()
    {
        sink.apply(delta);
    }
}

/// The payloads announcing `machines` to the other replicas, as `instance` (each under
/// PostgreSQL's limit).
pub fn notification_payloads(instance: Uuid, machines: &[Uuid]) -> Vec<String> {
    machines
        .chunks(IDS_PER_NOTIFICATION)
        .map(|chunk| {
            let mut payload = instance.to_string();
            for machine in chunk {
                payload.push(' ');
                payload.push_str(&machine.to_string());
            }
            payload
        })
        .collect()
}

/// Reads a payload: `None` when it came from `own` instance (already applied) or is
/// malformed; else the machines to read again.
pub fn parse_notification(payload: &str, own: Uuid) -> Option<Vec<Uuid>> {
    let mut words = payload.split(' ');
    let sender = Uuid::parse_str(words.next()?).ok()?;
    if sender == own {
        return None;
    }
    words.map(|word| Uuid::parse_str(word).ok()).collect()
}

/// A machine as the directory keeps it: what a redirect to it needs, and whether it is alive.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct DirectoryMachine {
    pub id: Uuid,
    pub farm: String,
    pub name: String,
    pub address: String,
    pub front_door: bool,
    pub state: String,
    pub last_seen_at: i64,
    /// When the row last changed: a lease read earlier than a change applied since is ignored.
    pub updated_at: i64,
}

/// A machine's lease as stored, for the directory's periodic refresh.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct MachineLease {
    pub id: Uuid,
    pub state: String,
    pub last_seen_at: i64,
    pub updated_at: i64,
}

pub(super) const SELECT_DIRECTORY_MACHINES: &str =
    "SELECT id, farm, name, address, front_door, state, last_seen_at, updated_at FROM machines";
/// (The directory keeps each session's client IP: who a client without a user name is.)
pub(super) const SELECT_DIRECTORY_SESSIONS: &str = "SELECT machine_id, session_id, farm, \
     user_name, user_key, domain, state, client_address, logon_at, state_changed_at \
     FROM sessions";
pub(super) const SELECT_MACHINE_LEASES: &str =
    "SELECT id, state, last_seen_at, updated_at FROM machines";

/// The sessions of `count` machines (`$1…`): what a replica reads again when another announces
/// that it changed them.
pub fn select_sessions_of_machines(count: usize) -> String {
    where_in(SELECT_DIRECTORY_SESSIONS, "machine_id", count)
}

/// `base` restricted to `count` ids (`$1…`) of `column`.
pub(super) fn where_in(base: &str, column: &str, count: usize) -> String {
    let list: Vec<String> = (1..=count).map(|at| format!("${at}")).collect();
    format!("{base} WHERE {column} IN ({})", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_own_ones_are_skipped() {
        let me = Uuid::from_u128(1);
        let other = Uuid::from_u128(2);
        let machines: Vec<Uuid> = (10..420).map(Uuid::from_u128).collect();
        let payloads = notification_payloads(other, &machines);
        assert_eq!(payloads.len(), 3);
        assert!(payloads.iter().all(|payload| payload.len() < 8_000));
        let read: Vec<Uuid> = payloads
            .iter()
            .flat_map(|payload| parse_notification(payload, me).unwrap())
            .collect();
        assert_eq!(read, machines);
        assert_eq!(parse_notification(&payloads[0], other), None);
        assert_eq!(parse_notification("garbage", me), None);
        assert_eq!(parse_notification(&format!("{other} nope"), me), None);
    }

    #[test]
    fn restricted_statements_number_their_parameters() {
        assert_eq!(
            where_in("SELECT id FROM machines", "id", 2),
            "SELECT id FROM machines WHERE id IN ($1, $2)"
        );
    }
}
