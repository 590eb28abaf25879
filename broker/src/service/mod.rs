//! The gRPC services: `Broker` (decisions and queries), `Admin` (changes), `AgentGateway`
//! (the agents' streams), with the conversions and guards they share.

pub mod admin_api;
mod agent_clock;
pub mod auth;
pub mod broker_api;
pub mod changes;
pub mod convert;
pub mod gateway;
mod hearing;
mod inbound;
pub mod machine_ref;
mod page_token;

use crate::decision::Decider;
use crate::metrics::Metrics;
use crate::plugin::PluginHub;
use crate::store::reachability::Reachability;
use crate::store::{IngestWriter, Store};
use std::sync::{Arc, OnceLock};

/// What the services need once the store is open and migrated.
#[derive(Clone)]
pub struct Core {
    pub store: Arc<dyn Store>,
    /// The agent streams' writes go through it: group commit (see `store::ingest`).
    pub ingest: IngestWriter,
    /// The store's change feed, routed to the streams of the machines that changed.
    pub changes: Arc<changes::ChangeRouter>,
    pub decider: Arc<Decider>,
    pub plugins: Arc<PluginHub>,
    pub metrics: Arc<Metrics>,
    /// Whether the health check finds the database answering: while it is away, agent streams
    /// are turned away at once (with a hint to come back soon) instead of waiting on it.
    pub database: Arc<Reachability>,
}

/// Filled once the store is ready; until then every call answers UNAVAILABLE (the health
/// service says NOT_SERVING meanwhile).
#[derive(Clone, Default)]
pub struct CoreCell(Arc<OnceLock<Core>>);

impl CoreCell {
    pub fn set(&self, core: Core) {
        let _ = self.0.set(core);
    }

    pub fn get(&self) -> Result<&Core, tonic::Status> {
        self.0.get().ok_or_else(|| {
            let mut status = crate::error::unavailable_retry_soon(
                "broker starting: its database is not ready yet",
            );
            status.metadata_mut().insert(
                tsbroker_common::proto::BROKER_STARTING_METADATA,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            status
        })
    }

    /// [`CoreCell::get`] for a call that writes to the database: UNAVAILABLE at once while the
    /// health check finds it away, rather than after the connection pool's wait.
    pub fn with_database(&self) -> Result<&Core, tonic::Status> {
        let core = self.get()?;
        if core.database.is_up() {
            Ok(core)
        } else {
            Err(crate::error::database_unavailable())
        }
    }

    /// [`CoreCell::get`] for a call that reads the database: as [`CoreCell::with_database`]
    /// on PostgreSQL; an SQLite file that takes no writes (a full disk) can still be read.
    pub fn for_reads(&self) -> Result<&Core, tonic::Status> {
        let core = self.get()?;
        if core.store.backend() == "sqlite" {
            Ok(core)
        } else {
            self.with_database()
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_starting_broker_says_so_and_when_to_come_back() {
        let status = super::CoreCell::default().get().err().unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let metadata = status.metadata();
        assert!(metadata.contains_key(tsbroker_common::proto::BROKER_STARTING_METADATA));
        assert!(metadata.contains_key(tsbroker_common::proto::RETRY_AFTER_MS_METADATA));
    }
}
