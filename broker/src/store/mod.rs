//! The session directory's storage: one `Store` trait, implemented for PostgreSQL (production,
//! shared by broker replicas) and SQLite (the embedded default). Correctness under concurrency
//! comes from each backend's transactions and constraints, not from locks in this process.

mod candidates;
pub mod directory_feed;
mod error;
pub mod ingest;
mod placement;
mod postgres;
pub mod reachability;
pub mod records;
mod sql;
mod sqlite;

use async_trait::async_trait;
use tokio::sync::broadcast;
use tsbroker_common::model::{LoadReport, MachineDescription, SessionEvent, SessionInfo};
use uuid::Uuid;

pub use directory_feed::{DirectoryDelta, DirectoryMachine, DirectorySink, MachineLease};
pub use error::{StoreError, describe_with_code, is_lock_timeout};
pub use ingest::plan::SessionRow;
pub use ingest::{IngestItem, IngestOp, IngestReply, IngestWriter, ItemResult};
pub use placement::select_pending_of_users;
pub use postgres::{MAIN_SETTINGS, PLACEMENT_SETTINGS, PostgresStore};
pub use records::*;
pub use sql::HOT_QUERIES;
pub use sqlite::{SqliteStore, may_clear_up as sqlite_may_clear_up};

pub type StoreResult<T> = Result<T, StoreError>;

/// Everything the broker keeps: machines, their sessions, farms and pending logons.
///
/// Calls made on behalf of an agent stream carry the stream's `connection` id: once a newer
/// stream for the same machine has taken over, they fail with [`StoreError::Superseded`].
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// "postgres" or "sqlite".
    fn backend(&self) -> &'static str;

    /// Checks that the database answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Lets another broker open the database once this one has stopped serving (SQLite's file
    /// is this process's while it runs).
    fn release_database(&self) {}

    /// A clean stop, once the calls have ended: every connection closed, within a few seconds
    /// (SQLite's WAL copied into the file and deleted with them; see `SqliteStore`).
    async fn close(&self) {}

    /// The farm's clock (`crate::clock`): every time this broker writes or compares with what
    /// is stored is taken from it.
    fn clock(&self) -> &crate::clock::Clock;

    /// Now, in milliseconds since the epoch, by the farm's clock.
    fn now(&self) -> i64 {
        self.clock().now()
    }

    /// Measures this machine's clock against the database server's and takes the offset up
    /// (database minus this machine, ms); `None` when there is nothing to measure (SQLite) or
    /// the round trip was too slow to tell.
    async fn measure_clock(&self) -> StoreResult<Option<i64>>;

    /// When the database server started (ms since the epoch), to tell a server restarted, or
    /// another taken over, between two looks; `None` where there is no server (SQLite).
    async fn server_started_at(&self) -> StoreResult<Option<i64>>;

    /// ADDED: creates or updates the machine (and its farm, with `new_farm_policy` if the farm
    /// is new), binds it to `connection`, and puts it in the JOINING state. Administrators'
    /// settings (drain, overrides) are kept.
    async fn machine_added(
        &self,
        description: &MachineDescription,
        new_farm_policy: &str,
        connection: Uuid,
        now: i64,
    ) -> StoreResult<MachineRecord> {
        let item = IngestItem::added(description.clone(), new_farm_policy, connection);
        self.apply_one(item, now).await?.into_machine()
    }

    /// RESYNC: replaces the machine's sessions with exactly `sessions`, atomically.
    async fn resync_sessions(
        &self,
        machine: Uuid,
        connection: Uuid,
        sessions: &[SessionInfo],
        now: i64,
    ) -> StoreResult<()> {
        let op = IngestOp::Resync(sessions.to_vec());
        self.apply_one(ingest_item(machine, connection, op), now)
            .await?
            .into_done()
    }

    /// CHANGED to READY, or REMOVED (sessions dropped), for the stream's own machine.
    async fn set_machine_state(
        &self,
        machine: Uuid,
        connection: Uuid,
        state: StreamMachineState,
        now: i64,
    ) -> StoreResult<MachineRecord>;

    /// Marks the machine UNREACHABLE if `connection` still owns it; returns whether it did.
    async fn mark_unreachable(
        &self,
        machine: Uuid,
        connection: Uuid,
        now: i64,
    ) -> StoreResult<bool>;

    /// Applies session events in order, in one transaction; one outcome per event.
    async fn apply_session_events(
        &self,
        machine: Uuid,
        connection: Uuid,
        events: &[SessionEvent],
        now: i64,
    ) -> StoreResult<Vec<EventOutcome>> {
        let op = IngestOp::Events(events.to_vec());
        self.apply_one(ingest_item(machine, connection, op), now)
            .await?
            .into_outcomes()
    }

    /// Records a load report (also the heartbeat: it refreshes the machine's lease).
    async fn record_load(
        &self,
        machine: Uuid,
        connection: Uuid,
        load: &LoadReport,
        now: i64,
    ) -> StoreResult<()> {
        let op = IngestOp::Load(*load);
        self.apply_one(ingest_item(machine, connection, op), now)
            .await?
            .into_done()
    }

    /// Group commit: applies many streams' writes in ONE transaction, as if each item's own
    /// method above ran, one after another in the order given (items of different machines
    /// commute; items of the same machine keep their order). An item whose stream no longer
    /// owns its machine, or whose machine is gone, gets its own `Superseded` / `NotFound` and
    /// changes nothing; the others apply. `Err` means nothing was committed. The writes use
    /// connections of their own, so placements waiting on a farm's lock cannot starve them.
    async fn apply_ingest(&self, items: &[IngestItem], now: i64) -> StoreResult<Vec<ItemResult>>;

    /// `apply_ingest` of a single item.
    async fn apply_one(&self, item: IngestItem, now: i64) -> ItemResult {
        let mut results = self.apply_ingest(std::slice::from_ref(&item), now).await?;
        results.pop().unwrap_or_else(|| {
            Err(StoreError::Internal(sqlx::Error::Protocol(
                "ingest: no result for the item".into(),
            )))
        })
    }

    /// The farm, if the broker knows it.
    async fn get_farm(&self, farm: &str) -> StoreResult<Option<FarmRecord>>;

    /// Creates the farm if needed and sets its policy (the configuration's word at start).
    async fn declare_farm(&self, farm: &str, policy: &str, now: i64) -> StoreResult<()>;

    /// The farm's policy name, if the broker knows the farm (no counts: cheap).
    async fn farm_policy(&self, farm: &str) -> StoreResult<Option<String>>;

    async fn list_farms(&self) -> StoreResult<Vec<FarmRecord>>;

    async fn set_farm_policy(&self, farm: &str, policy: &str) -> StoreResult<FarmRecord>;

    /// Every session of `user_key` in `farm`, with its machine.
    async fn user_sessions(&self, farm: &str, user_key: &str) -> StoreResult<Vec<SessionRecord>>;

    /// Distinct user keys with a session in `farm` that start with `prefix` (at most `limit`).
    async fn users_with_prefix(
        &self,
        farm: &str,
        prefix: &str,
        limit: u32,
    ) -> StoreResult<Vec<String>>;

    /// The user key and client address of each session in `farm` with a client address whose
    /// user key starts with `prefix` (at most `limit`, in no order).
    async fn client_addresses_with_prefix(
        &self,
        farm: &str,
        prefix: &str,
        limit: u32,
    ) -> StoreResult<Vec<(String, String)>>;

    /// The machine of the user's unexpired pending logon, if any.
    async fn pending_logon(
        &self,
        farm: &str,
        user_key: &str,
        now: i64,
    ) -> StoreResult<Option<MachineRecord>>;

    /// Places new logons of one farm (every request names the same farm and time) in one
    /// transaction: under the farm's lock, reads the farm's machines with their load once,
    /// then for each request in order re-checks the user's pending logon (an earlier request
    /// of the batch counts), lets `choose` pick among the candidates (it is given the request's
    /// index and the farm's policy name; earlier picks of the batch count as load), and
    /// records the pending logon. `Err` means nothing was recorded.
    /// `cache` holds the farm's machines between calls (see [`FarmCache`]).
    async fn place_logons(
        &self,
        requests: &[PlacementRequest<'_>],
        choose: &BatchChooser<'_>,
        cache: &mut FarmCache,
    ) -> StoreResult<Vec<Placement>>;

    /// `place_logons` of a single request.
    async fn place_logon(
        &self,
        request: &PlacementRequest<'_>,
        choose: &Chooser<'_>,
    ) -> StoreResult<Placement> {
        let batch_choose =
            |_: usize, policy: &str, candidates: &[MachineLoad]| choose(policy, candidates);
        let mut placements = self
            .place_logons(
                std::slice::from_ref(request),
                &batch_choose,
                &mut FarmCache::default(),
            )
            .await?;
        placements.pop().ok_or_else(|| {
            StoreError::Internal(sqlx::Error::Protocol(
                "placement: no result for the request".into(),
            ))
        })
    }

    async fn get_machine(&self, machine: Uuid) -> StoreResult<Option<MachineRecord>>;

    async fn find_machine(&self, farm: &str, name: &str) -> StoreResult<Option<MachineRecord>>;

    async fn list_machines(&self, farm: Option<&str>) -> StoreResult<Vec<MachineRecord>>;

    async fn list_sessions(&self, filter: &SessionFilter) -> StoreResult<Vec<SessionRecord>>;

    /// Applies an administrator's change and returns the machine after it.
    async fn change_machine(
        &self,
        machine: Uuid,
        change: MachineChange,
        now: i64,
    ) -> StoreResult<MachineRecord>;

    /// Deletes the machine and its sessions; returns how many sessions went with it.
    async fn remove_machine(&self, machine: Uuid) -> StoreResult<u64>;

    /// Machine ids whose settings an administrator changed or that a new stream took over,
    /// from any broker sharing the database (PostgreSQL: LISTEN/NOTIFY; SQLite: in-process).
    /// The nil id: any machine may have changed (notifications were missed).
    fn subscribe_machine_changes(&self) -> broadcast::Receiver<Uuid>;

    /// Attaches the in-memory directory: from now on every commit that changes sessions or
    /// machine states is handed to `sink` (see [`DirectoryDelta`]) before the write is
    /// answered, and on PostgreSQL so are the machines other replicas announce (as deltas
    /// asking to read them again). A second call is ignored.
    fn attach_directory(&self, sink: std::sync::Arc<dyn DirectorySink>);

    /// The machines (all, or those of `ids`) as the in-memory directory keeps them.
    async fn directory_machines(&self, ids: Option<&[Uuid]>) -> StoreResult<Vec<DirectoryMachine>>;

    /// Hands every session (all, or those of the machines `ids`) to `sink`, one row at a time
    /// (a million sessions are streamed, never held in one list).
    async fn directory_sessions(
        &self,
        ids: Option<&[Uuid]>,
        sink: &mut (dyn FnMut(SessionRow) + Send),
    ) -> StoreResult<()>;

    /// Every machine's state and last contact, for the directory's periodic refresh.
    async fn machine_leases(&self) -> StoreResult<Vec<MachineLease>>;
}

fn ingest_item(machine: Uuid, connection: Uuid, op: IngestOp) -> IngestItem {
    IngestItem {
        machine,
        connection,
        op,
    }
}

/// Opens the store a database URL names (`sqlite://…` or `postgres://…`) and migrates it.
pub async fn open(database_url: &str) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        Ok(std::sync::Arc::new(
            PostgresStore::open(database_url).await?,
        ))
    } else if database_url.starts_with("sqlite:") {
        Ok(std::sync::Arc::new(SqliteStore::open(database_url).await?))
    } else {
        anyhow::bail!("database url must start with sqlite:// or postgres://")
    }
}

#[cfg(test)]
pub mod test_support {
    //! Records for unit tests of code that works on store results.
    use super::{MachineLoad, MachineRecord};

    /// A READY machine of farm "test" with the given weight and session count.
    pub fn machine_load(index: u32, weight: i64, sessions: i64) -> MachineLoad {
        MachineLoad {
            machine: std::sync::Arc::new(MachineRecord {
                id: uuid::Uuid::from_u128(u128::from(index) + 1),
                farm: "test".into(),
                name: format!("ts{index}"),
                address: format!("ts{index}:3389"),
                agent_weight: weight,
                admin_weight: None,
                agent_session_limit: 0,
                admin_session_limit: None,
                single_session: false,
                agent_version: String::new(),
                state: "ready".into(),
                draining: false,
                connection_id: None,
                session_count: sessions,
                load_cpu: None,
                load_memory: None,
                load_sessions: None,
                load_pending: None,
                last_seen_at: i64::MAX,
                ready_since: Some(0),
                created_at: 0,
                updated_at: 0,
                front_door: false,
                pending_logons: 0,
            }),
            ineligible: None,
            ramp: 1.0,
        }
    }
}
