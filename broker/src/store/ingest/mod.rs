//! Group commit of the agent streams' writes. Every stream's ADDED, RESYNC, READY, runs of
//! session events, load reports and its last word (UNREACHABLE) become [`IngestItem`]s; the [`writer::IngestWriter`] gathers
//! the items of many streams and the store applies each gathering in ONE transaction
//! ([`crate::store::Store::apply_ingest`]), so a thousand streams share a commit instead of
//! paying one each. Each stream has at most one item in flight, and hears its result only after
//! the commit, so acknowledgements still mean "durable".
//!
//! - `plan.rs`: what runs of session events and a RESYNC do to the sessions table, worked out
//!   in memory (pure, no SQL), so the transaction writes each session once, and only if it
//!   changed, with multi-row statements;
//! - `sql.rs`: the transaction itself, written once for both backends (`impl_ingest!`), and
//!   `statement.rs`: how each backend spells the multi-row statements;
//! - `writer.rs`: the queue, the group bounds and the hand-back of results.

pub(super) mod plan;
pub(super) mod sql;
pub(super) mod statement;
pub mod writer;

use super::{EventOutcome, MachineRecord, StoreError, StoreResult};
use tsbroker_common::model::{self, LoadReport, MachineDescription, SessionEvent, SessionInfo};
use uuid::Uuid;

pub use writer::{IngestSettings, IngestTarget, IngestWriter};

/// A new stream's connection id: a UUIDv7 of `now` (the farm's clock, ms since the epoch), so
/// that ids sort by when their streams arrived, across replicas.
pub fn connection_id(now: i64) -> Uuid {
    let millis = u64::try_from(now).unwrap_or(0);
    let timestamp = uuid::Timestamp::from_unix(
        uuid::NoContext,
        millis / 1000,
        (millis % 1000) as u32 * 1_000_000,
    );
    Uuid::new_v7(timestamp)
}

/// Whether the stream that holds a machine (`owner`) arrived after `connection`, at `now`: an
/// ADDED that waited (for the database) while its agent gave up on it and opened the next
/// stream must not take the machine from that one — the agent would take itself for a copy of
/// another server and stay off. Ids that are not UUIDv7 (an older broker's) tell nothing, and
/// an owner's from more than [`FUTURE_TOLERANCE_MS`] ahead of `now` (a clock set back since)
/// would lock the machine out: neither wins.
pub fn held_by_newer(owner: Option<Uuid>, connection: Uuid, now: i64) -> bool {
    let Some(owner) = owner else {
        return false;
    };
    let arrived = |id: Uuid| {
        id.get_timestamp()
            .filter(|_| id.get_version_num() == 7)
            .map(|timestamp| {
                let (secs, nanos) = timestamp.to_unix();
                i64::try_from(secs).unwrap_or(i64::MAX) * 1000 + i64::from(nanos / 1_000_000)
            })
    };
    match (arrived(owner), arrived(connection)) {
        (Some(owner_at), Some(_)) => owner > connection && owner_at <= now + FUTURE_TOLERANCE_MS,
        _ => false,
    }
}

/// How far ahead of the farm's clock an owner's arrival may be and still count (replicas share
/// the database's clock, within milliseconds).
const FUTURE_TOLERANCE_MS: i64 = 1_000;

/// One stream's write, on behalf of its `connection`.
#[derive(Clone, Debug)]
pub struct IngestItem {
    pub machine: Uuid,
    pub connection: Uuid,
    pub op: IngestOp,
}

/// What a stream asks of the directory; each applies exactly as its single-item `Store` method
/// (`machine_added`, `resync_sessions`, `set_machine_state(Ready)`, `apply_session_events`,
/// `record_load`, `mark_unreachable`) documents.
#[derive(Clone, Debug)]
pub enum IngestOp {
    /// ADDED: creates or updates the machine (and its farm) and binds it to the connection.
    Added {
        description: MachineDescription,
        new_farm_policy: String,
    },
    /// RESYNC: the machine's sessions become exactly these.
    Resync(Vec<SessionInfo>),
    /// CHANGED to READY.
    Ready,
    /// A run of session events, applied in order.
    Events(Vec<SessionEvent>),
    /// A load report (also the heartbeat: it refreshes the lease).
    Load(LoadReport),
    /// The stream ended: UNREACHABLE if the connection still owns the machine and it is
    /// JOINING or READY. Not a refusal when it does not: the answer says whether it did.
    Unreachable,
    /// As `Unreachable`, for a stream that ended with the agent alive at that moment (it
    /// closed the stream itself, or the broker is going): the machine counts as heard from
    /// now, so its users are sent back to it for a whole heartbeat timeout from here.
    ClosedAlive,
}

/// What an item gives back once committed.
#[derive(Clone, Debug, PartialEq)]
pub enum IngestReply {
    /// ADDED and READY: the machine after the change.
    Machine(Box<MachineRecord>),
    /// One outcome per event, in order.
    Outcomes(Vec<EventOutcome>),
    /// RESYNC and load reports.
    Done,
    /// UNREACHABLE: whether the machine was marked.
    Marked(bool),
}

/// The result of one item of a committed group: its own refusal (superseded, machine gone) or
/// its reply.
pub type ItemResult = StoreResult<IngestReply>;

impl IngestItem {
    /// ADDED of the machine `description` names.
    pub fn added(description: MachineDescription, new_farm_policy: &str, connection: Uuid) -> Self {
        IngestItem {
            machine: model::machine_id(&description.farm, &description.name),
            connection,
            op: IngestOp::Added {
                description,
                new_farm_policy: new_farm_policy.to_owned(),
            },
        }
    }

    /// How much work the item is, for the group bound: rows it may write.
    pub fn weight(&self) -> usize {
        match &self.op {
            IngestOp::Resync(sessions) => sessions.len().max(1),
            IngestOp::Events(events) => events.len().max(1),
            IngestOp::Added { .. }
            | IngestOp::Ready
            | IngestOp::Load(_)
            | IngestOp::Unreachable
            | IngestOp::ClosedAlive => 1,
        }
    }
}

impl IngestReply {
    pub fn into_machine(self) -> StoreResult<MachineRecord> {
        match self {
            IngestReply::Machine(machine) => Ok(*machine),
            other => Err(unexpected_reply(&other)),
        }
    }

    pub fn into_outcomes(self) -> StoreResult<Vec<EventOutcome>> {
        match self {
            IngestReply::Outcomes(outcomes) => Ok(outcomes),
            other => Err(unexpected_reply(&other)),
        }
    }

    pub fn into_marked(self) -> StoreResult<bool> {
        match self {
            IngestReply::Marked(marked) => Ok(marked),
            other => Err(unexpected_reply(&other)),
        }
    }

    pub fn into_done(self) -> StoreResult<()> {
        match self {
            IngestReply::Done => Ok(()),
            other => Err(unexpected_reply(&other)),
        }
    }
}

fn unexpected_reply(reply: &IngestReply) -> StoreError {
    StoreError::Internal(sqlx::Error::Protocol(format!(
        "ingest: unexpected reply {reply:?}"
    )))
}

/// Splits a group into rounds in which each machine appears at most once, keeping the order
/// of the items: within a round the items of different machines commute, so a round may apply
/// them statement by statement (all RESYNCs, then all events, ...) without changing what any
/// order of them would give; rounds apply one after the other.
pub(super) fn rounds(items: &[IngestItem]) -> Vec<Vec<usize>> {
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut current = Vec::new();
    for (index, item) in items.iter().enumerate() {
        if !seen.insert(item.machine) {
            rounds.push(std::mem::take(&mut current));
            seen.clear();
            seen.insert(item.machine);
        }
        current.push(index);
    }
    if !current.is_empty() {
        rounds.push(current);
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(machine: u128) -> IngestItem {
        IngestItem {
            machine: Uuid::from_u128(machine),
            connection: Uuid::nil(),
            op: IngestOp::Ready,
        }
    }

    #[test]
    fn a_machine_appears_once_per_round_in_order() {
        let items = [item(1), item(2), item(1), item(3), item(1), item(2)];
        assert_eq!(rounds(&items), vec![vec![0, 1], vec![2, 3], vec![4, 5]]);
        assert!(rounds(&[]).is_empty());
    }

    #[test]
    fn connection_ids_sort_by_arrival_and_only_they_hold_a_machine() {
        let (earlier, later) = (
            connection_id(1_700_000_000_000),
            connection_id(1_700_000_000_001),
        );
        let now = 1_700_000_000_002;
        assert!(earlier < later);
        assert!(held_by_newer(Some(later), earlier, now));
        assert!(!held_by_newer(Some(earlier), later, now));
        assert!(!held_by_newer(None, earlier, now));
        // A random (v4) id, as an older broker gave, holds nothing against a v7.
        let legacy = Uuid::new_v4();
        assert!(!held_by_newer(Some(legacy), earlier, now));
        assert!(!held_by_newer(Some(later), legacy, now));
        // An owner from a clock since set back a minute holds nothing either.
        let ahead = connection_id(now + 60_000);
        assert!(!held_by_newer(Some(ahead), later, now));
        assert!(held_by_newer(Some(ahead), later, now + 59_500));
    }
}
