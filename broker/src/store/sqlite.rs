//! The SQLite store: the embedded default, one file, one broker process. Write transactions
//! start with `BEGIN IMMEDIATE`, so they queue for SQLite's single writer instead of failing
//! half-way; WAL lets readers go on meanwhile. The WAL is checkpointed by a task of its own
//! (`PASSIVE`, four times a second), never by the commit that happens to cross SQLite's
//! threshold: a checkpoint writes and syncs the database file, and a stream write or a
//! placement waiting behind one would wait for the disk.

use super::directory_feed::{self, DirectoryDelta, SinkSlot};
use super::ingest;
use super::sql::{self, StoreHooks, WriteTurn};
use super::{
    BatchChooser, FarmCache, FarmRecord, MachineChange, MachineRecord, Placement, PlacementRequest,
    SessionFilter, SessionRecord, StoreError, StoreResult, StreamMachineState,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tsbroker_common::model::{LoadReport, MachineDescription, SessionInfo, SessionState};
use uuid::Uuid;

mod damage;
mod file;
pub use file::may_clear_up;
use file::{
    BUSY_TIMEOUT, WAL_KEPT_BYTES, WAL_LIMIT_FRAMES, WalWatch, checkpoint_wal, own_database_file,
};

pub struct SqliteStore {
    pool: sqlx::SqlitePool,
    /// The group-commit writer's own connection (see `ingest`), so its turn at SQLite's
    /// single writer never waits for a free connection of `pool` too.
    ingest_pool: sqlx::SqlitePool,
    /// The placements' connection: `synchronous=NORMAL` (see `begin_placement`). One: a
    /// placement's transaction holds SQLite's single writer, so a second connection would never
    /// place at the same time, and placements alternating between two would each find the
    /// other's commit and drop their page cache.
    placement_pool: sqlx::SqlitePool,
    changes: broadcast::Sender<Uuid>,
    directory: SinkSlot,
    checkpointer: tokio::task::JoinHandle<()>,
    /// SQLite has one writer at a time. Write transactions take their turn here, in order,
    /// before `BEGIN IMMEDIATE`: one that found the file locked would otherwise wait in
    /// SQLite's busy handler, which sleeps 1, 2, 5, 10… ms between tries whatever the time
    /// the lock is held (behind a 3 ms group commit, a placement would wait 8 ms).
    writer: Arc<tokio::sync::Mutex<()>>,
    /// The database file, locked while this broker runs (see `own_database_file`).
    owner: std::sync::Mutex<Option<std::fs::File>>,
    /// Its WAL file, watched for deletion (see `WalWatch`).
    wal: Option<WalWatch>,
    /// This machine's clock (the database is a file here): no offset.
    clock: crate::clock::Clock,
    /// The file's structure read every few minutes (`damage.rs`).
    damage: damage::DamageCheck,
}

/// What the three pools share: a 10 s wait for a connection, and no connection reused that a
/// failed transaction left stuck. sqlx counts a transaction as open until its `ROLLBACK`
/// succeeds; when SQLite has already ended it itself (a `COMMIT` refused because the disk is
/// full), that `ROLLBACK` fails too, and the connection would refuse every later `BEGIN`
/// ("non-zero transaction depth") for the rest of the process. Such a connection is closed
/// instead (closing ends whatever SQLite still holds) and the pool opens a new one, so writes
/// resume once the disk has room again.
fn pool_options() -> SqlitePoolOptions {
    SqlitePoolOptions::new()
        .acquire_timeout(Duration::from_secs(10))
        .before_acquire(|connection, _| {
            Box::pin(async move {
                let stuck = sqlx::Connection::is_in_transaction(connection);
                if stuck {
                    // Each failed write does this while the disk is full: one warning a minute.
                    static REPLACED: std::sync::LazyLock<tsbroker_common::warning_limit::WarningLimit> =
                        std::sync::LazyLock::new(Default::default);
                    match REPLACED.warn_now() {
                        Some(unwarned) => tracing::warn!(
                            since_last_warning = unwarned,
                            "an SQLite connection left in a failed transaction is closed and replaced (said at most once a minute)"
                        ),
                        None => tracing::debug!(
                            "an SQLite connection left in a failed transaction is closed and replaced"
                        ),
                    }
                }
                Ok(!stuck)
            })
        })
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.checkpointer.abort();
    }
}

impl SqliteStore {
    /// Opens (creating it if missing) and migrates the database file the URL names.
    pub async fn open(database_url: &str) -> anyhow::Result<Self> {
        Self::open_with(database_url, WAL_LIMIT_FRAMES, damage::CHECK_INTERVAL).await
    }

    /// [`SqliteStore::open`], starting the WAL over past `wal_limit_frames` and reading the
    /// file's structure every `damage_check` (tests use less).
    async fn open_with(
        database_url: &str,
        wal_limit_frames: i64,
        damage_check: Duration,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let options = SqliteConnectOptions::from_str(database_url)
            .with_context(|| format!("parse sqlite url {database_url:?}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: an acknowledged change survives a power cut, not just a process crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // Commits never checkpoint; `checkpoint_wal` does.
            .pragma("wal_autocheckpoint", "0")
            // When SQLite starts the WAL over, the file is cut back to this.
            .pragma("journal_size_limit", WAL_KEPT_BYTES.to_string());
        let owner = own_database_file(database_url, options.get_filename())?;
        let pool = pool_options()
            .max_connections(8)
            .connect_with(options.clone())
            .await
            .with_context(|| format!("open sqlite database {database_url:?}"))?;
        let file = options.get_filename().display().to_string();
        if let Some(problems) = damage::problems(&options)
            .await
            .with_context(|| format!("check sqlite database {database_url:?}"))?
        {
            anyhow::bail!(damage::damaged(&file, &problems));
        }
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .context("migrate the sqlite database")?;
        let ingest_pool = pool_options()
            .max_connections(2)
            .connect_with(options.clone())
            .await
            .with_context(|| format!("open sqlite database {database_url:?}"))?;
        let placement_pool = pool_options()
            .max_connections(1)
            // A connection to a local file does not go stale: no round trip to the
            // connection's thread before each batch.
            .test_before_acquire(false)
            .connect_with(options.clone().synchronous(SqliteSynchronous::Normal))
            .await
            .with_context(|| format!("open sqlite database {database_url:?}"))?;
        let (changes, _) = broadcast::channel(1024);
        let writer = Arc::default();
        let checkpointer = tokio::spawn(checkpoint_wal(
            pool.clone(),
            Arc::clone(&writer),
            wal_limit_frames,
        ));
        let wal = WalWatch::start(&options, owner.as_ref()).await;
        Ok(SqliteStore {
            owner: std::sync::Mutex::new(owner),
            wal,
            checkpointer,
            pool,
            ingest_pool,
            placement_pool,
            changes,
            directory: SinkSlot::default(),
            writer,
            clock: crate::clock::Clock::default(),
            damage: damage::DamageCheck::new(options, file, damage_check),
        })
    }

    /// No server: the file is this broker's.
    async fn database_server_started_at(&self) -> StoreResult<Option<i64>> {
        Ok(None)
    }

    /// Nothing to measure: the file is on this machine, and this broker alone writes it.
    async fn measure_database_clock(&self) -> StoreResult<Option<i64>> {
        Ok(None)
    }

    /// Whether the database takes a write: the file is always there to read, and what goes
    /// away is room to write (a full disk, a file made read-only). One page of the file's
    /// header (`user_version`, which nothing else uses) is written in the writers' turn.
    async fn probe_database(&self) -> StoreResult<()> {
        self.check_file_still_there()?;
        let _turn = self.write_turn().await;
        let stamp = (crate::store::Store::now(self) / 1000) & 0x7fff_ffff;
        let probe = format!("PRAGMA user_version = {stamp}");
        sqlx::query(sqlx::AssertSqlSafe(probe))
            .execute(&self.pool)
            .await?;
        self.damage.check_if_due()
    }

    /// A database file deleted (or replaced) under the running broker is still written, by its
    /// open descriptors, and lost at the next start: an outage until someone restarts it. So is
    /// its WAL file, less badly.
    fn check_file_still_there(&self) -> StoreResult<()> {
        use std::os::unix::fs::MetadataExt;
        let Ok(owner) = self.owner.lock() else {
            return Ok(());
        };
        let Some(file) = owner.as_ref() else {
            return Ok(());
        };
        match file.metadata() {
            Ok(metadata) if metadata.nlink() == 0 => Err(StoreError::unavailable(
                "the database file was deleted or replaced while the broker ran: restart it \
                     (what it wrote since is in the deleted file)",
            )),
            _ => match self.wal.as_ref().and_then(WalWatch::gone) {
                Some(gone) => Err(StoreError::unavailable(gone)),
                None => Ok(()),
            },
        }
    }

    /// Closes every connection, the WAL copied into the database file first, so that SQLite
    /// deletes the WAL and its index as the last one closes. A WAL left behind (a crash leaves
    /// one) is read again at the next open, its pages taken over the file's: over a backup
    /// copied in meanwhile, that would undo the restore, or damage it.
    async fn close_database(&self) {
        self.checkpointer.abort();
        let _turn = self.write_turn().await;
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await
        {
            tracing::debug!(%error, "WAL not checkpointed at the stop");
        }
        self.placement_pool.close().await;
        self.ingest_pool.close().await;
        self.pool.close().await;
        if let Some(keeper) = self.wal.as_ref().and_then(WalWatch::take_keeper) {
            let _ = sqlx::Connection::close(keeper).await;
        }
    }

    /// Unlocks the database file (the pools stay open for whatever still finishes).
    fn release_database_file(&self) {
        if let Ok(mut owner) = self.owner.lock() {
            owner.take();
        }
    }

    /// The writer's turn (see `writer`): held from before `BEGIN` until after the commit.
    async fn write_turn(&self) -> WriteTurn {
        Some(self.writer.clone().lock_owned().await)
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    /// A placement's transaction. Its commit does not wait for the disk (WAL with
    /// `synchronous=NORMAL`: durable across a crash of the process, not of the machine): a
    /// pending logon is a hint that lives 30 seconds, and after a power cut the broker starts
    /// without the last moments' ones, as it would without the machine. Agents' events keep
    /// `FULL`.
    async fn begin_placement(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.placement_pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn begin_ingest(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.ingest_pool.begin_with("BEGIN IMMEDIATE").await
    }

    async fn announce_changes(&self, machines: &[Uuid]) {
        for machine in machines {
            self.announce_change(*machine).await;
        }
    }

    /// One process owns an SQLite file: only its own directory hears of its commits.
    async fn publish_directory(&self, delta: DirectoryDelta) {
        directory_feed::hand_over(&self.directory, delta);
    }

    /// One process owns an SQLite file: there are no other replicas.
    async fn tell_other_replicas(&self, _changed: &[Uuid]) {}

    /// One process owns an SQLite file, so a change is announced in-process.
    async fn announce_change(&self, machine: Uuid) {
        let _ = self.changes.send(machine);
    }
}

impl StoreHooks for SqliteStore {
    const BACKEND: &'static str = "sqlite";
    // BEGIN IMMEDIATE already holds SQLite's write lock for the whole transaction.
    const LOCK_OWNER: &'static str = "SELECT connection_id, farm FROM machines WHERE id = $1";
}

sql::impl_store!(SqliteStore, sqlx::Sqlite);
ingest::sql::impl_ingest!(SqliteStore, sqlx::Sqlite, sqlite, "");

/// A store on a new file in a directory of its own, with an empty table `scratch (x BLOB)`;
/// and the file's path.
#[cfg(test)]
async fn scratch_store(
    wal_limit_frames: i64,
    damage_check: Duration,
) -> (SqliteStore, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("tsbroker-sqlite-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("b.db");
    let url = format!("sqlite://{}", path.display());
    let store = SqliteStore::open_with(&url, wal_limit_frames, damage_check)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE scratch (x BLOB)")
        .execute(&store.pool)
        .await
        .unwrap();
    (store, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transaction SQLite ended by itself (as when a `COMMIT` finds the disk full; here a
    /// trigger's `RAISE(ROLLBACK)`, which does the same on purpose) leaves sqlx counting it open:
    /// the connection it was on must not be handed out again.
    #[tokio::test]
    async fn a_connection_whose_transaction_sqlite_ended_is_not_reused() {
        let dir = std::env::temp_dir().join(format!("tsbroker-sqlite-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.join("test.db"))
            .create_if_missing(true);
        let pool = pool_options()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        for statement in [
            "CREATE TABLE t (x INTEGER)",
            "CREATE TRIGGER refuse BEFORE INSERT ON t WHEN NEW.x < 0 \
             BEGIN SELECT RAISE(ROLLBACK, 'negative'); END",
        ] {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }

        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        let refused = sqlx::query("INSERT INTO t VALUES (-1)")
            .execute(&mut *tx)
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("negative"), "{refused}");
        drop(tx);

        // The pool's one connection was stuck; a new one begins and writes.
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
        sqlx::query("INSERT INTO t VALUES (2)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let rows: Vec<(i64,)> = sqlx::query_as("SELECT x FROM t")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(rows, vec![(2,)]);
        pool.close().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
