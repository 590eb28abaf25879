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
}
