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
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tsbroker_common::model::{LoadReport, MachineDescription, SessionInfo, SessionState};
use uuid::Uuid;

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
    /// This machine's clock (the database is a file here): no offset.
    clock: crate::clock::Clock,
}

/// How long a statement waits for SQLite's locks.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// A WAL of more frames than this (64 MiB of 4 KiB pages) is started over once all of it is
/// in the database file; when SQLite starts it over, the file is cut back to that size. (Not
/// truncated to nothing: a WAL that has to grow again makes every commit's sync a change of the
/// file's size too, which held a logon storm's p99 at 21-95 ms instead of 4-7.)
const WAL_LIMIT_FRAMES: i64 = 16_384;
const WAL_KEPT_BYTES: i64 = WAL_LIMIT_FRAMES * 4096;

/// Copies what the WAL holds into the database file, without waiting for anyone; and keeps
/// the WAL's size bounded. SQLite starts the WAL over only when a commit finds no reader still
/// using it, which a busy broker's readers rarely allow: the file then grows for as long as
/// the load lasts (12 MB/s at 600 logons and logoffs a second) and keeps its size after. A WAL
/// past the limit, once copied, is started over in the writers' turn (RESTART waits for the
/// readers to leave it, at most 200 ms), and the next commit writes from its beginning.
async fn checkpoint_wal(
    pool: sqlx::SqlitePool,
    writer: Arc<tokio::sync::Mutex<()>>,
    limit_frames: i64,
) {
    let mut ticks = tokio::time::interval(CHECKPOINT_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let done: Result<(i64, i64, i64), sqlx::Error> =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&pool)
                .await;
        match done {
            Ok((_, log, copied)) if log - copied > 100_000 => tracing::warn!(
                frames = log - copied,
                "the SQLite WAL keeps growing: long read transactions hold it"
            ),
            Ok((_, log, copied)) if must_restart(log, copied, limit_frames) => {
                let _turn = writer.lock().await;
                match restart_wal(&pool).await {
                    Ok((0, _, _)) => tracing::debug!(frames = log, "SQLite WAL started over"),
                    Ok(_) => tracing::debug!(
                        frames = log,
                        "SQLite WAL not started over: readers stayed on it"
                    ),
                    Err(error) => tracing::debug!(%error, "WAL restart failed"),
                }
            }
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "WAL checkpoint failed"),
        }
    }
}

/// `wal_checkpoint(RESTART)`, waiting at most 200 ms for readers to leave the WAL: the wait
/// holds off every writer (a placement waits behind it), so a long read (the directory's
/// first load) makes it give up rather than stall the broker's writes.
async fn restart_wal(pool: &sqlx::SqlitePool) -> Result<(i64, i64, i64), sqlx::Error> {
    let mut connection = pool.acquire().await?;
    sqlx::query("PRAGMA busy_timeout = 200")
        .execute(&mut *connection)
        .await?;
    let restarted = sqlx::query_as("PRAGMA wal_checkpoint(RESTART)")
        .fetch_one(&mut *connection)
        .await;
    let restore = format!("PRAGMA busy_timeout = {}", BUSY_TIMEOUT.as_millis());
    let restored = sqlx::query(sqlx::AssertSqlSafe(restore))
        .execute(&mut *connection)
        .await;
    if restored.is_err() {
        // Not back in the pool with the short wait.
        connection.detach();
    }
    restarted
}

/// Whether a WAL of `log` frames, `copied` of them in the database file, is to start over.
fn must_restart(log: i64, copied: i64, limit_frames: i64) -> bool {
    log > limit_frames && copied == log
}

/// Locks the database file for this process (`flock`, which SQLite's own locks do not touch):
/// one broker per SQLite file. A second one would answer from a session directory that never
/// hears of the first one's commits; replicas share PostgreSQL instead. `None` for a database
/// in memory.
fn own_database_file(url: &str, path: &Path) -> anyhow::Result<Option<std::fs::File>> {
    use anyhow::Context;
    let in_memory = url.contains("mode=memory") || path.to_string_lossy().starts_with("file:");
    if in_memory {
        return Ok(None);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("open sqlite database {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "sqlite database {} is in use by another process (another tsbroker?): one broker \
             per SQLite file; several replicas share a PostgreSQL database instead",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("lock sqlite database {}", path.display()))
        }
    }
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
                    static REPLACED: std::sync::LazyLock<crate::warning_limit::WarningLimit> =
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
        Self::open_with_wal_limit(database_url, WAL_LIMIT_FRAMES).await
    }

    /// [`SqliteStore::open`], starting the WAL over past `wal_limit_frames` (tests use less).
    async fn open_with_wal_limit(
        database_url: &str,
        wal_limit_frames: i64,
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
            .connect_with(options.synchronous(SqliteSynchronous::Normal))
            .await
            .with_context(|| format!("open sqlite database {database_url:?}"))?;
        let (changes, _) = broadcast::channel(1024);
        let writer = Arc::default();
        let checkpointer = tokio::spawn(checkpoint_wal(
            pool.clone(),
            Arc::clone(&writer),
            wal_limit_frames,
        ));
        Ok(SqliteStore {
            owner: std::sync::Mutex::new(owner),
            checkpointer,
            pool,
            ingest_pool,
            placement_pool,
            changes,
            directory: SinkSlot::default(),
            writer,
            clock: crate::clock::Clock::default(),
        })
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
        Ok(())
    }

    /// A database file deleted (or replaced) under the running broker is still written, by its
    /// open descriptors, and lost at the next start: an outage until someone restarts it.
    fn check_file_still_there(&self) -> StoreResult<()> {
        use std::os::unix::fs::MetadataExt;
        let Ok(owner) = self.owner.lock() else {
            return Ok(());
        };
        let Some(file) = owner.as_ref() else {
            return Ok(());
        };
        match file.metadata() {
            Ok(metadata) if metadata.nlink() == 0 => {
                Err(StoreError::Unavailable(sqlx::Error::Protocol(
                    "the database file was deleted or replaced while the broker ran: restart it \
                     (what it wrote since is in the deleted file)"
                        .into(),
                )))
            }
            _ => Ok(()),
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

#[cfg(test)]
mod wal_tests {
    use super::*;

    #[test]
    fn only_a_wal_past_the_limit_and_copied_whole_starts_over() {
        let limit = WAL_LIMIT_FRAMES;
        assert!(!must_restart(limit, limit, limit));
        assert!(must_restart(limit + 1, limit + 1, limit));
        assert!(!must_restart(limit + 1, limit, limit));
    }

    /// Writers that never stop while readers keep overlapping: SQLite never finds a moment to
    /// start the WAL over by itself, and otherwise its file grows with every write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_continuous_reads_and_writes() {
        let dir = std::env::temp_dir().join(format!("tsbroker-wal-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.db");
        // 16 MiB here (the file is cut back to 64 MiB when the WAL starts over).
        let limit_frames = 4096;
        let store =
            SqliteStore::open_with_wal_limit(&format!("sqlite://{}", path.display()), limit_frames)
                .await
                .unwrap();
        sqlx::query("CREATE TABLE scratch (x BLOB)")
            .execute(&store.pool)
            .await
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (pool, stop) = (store.pool.clone(), stop.clone());
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let _: Result<(i64,), _> = sqlx::query_as("SELECT count(*) FROM scratch")
                            .fetch_one(&pool)
                            .await;
                    }
                })
            })
            .collect();
        let wal = dir.join("b.db-wal");
        let mut largest = 0;
        // 256 MiB written in 1 MiB rows, each deleted again (the database stays small).
        for _ in 0..256 {
            let _turn = store.write_turn().await;
            let mut tx = store.begin_write().await.unwrap();
            sqlx::query("INSERT INTO scratch VALUES (zeroblob(1048576))")
                .execute(&mut *tx)
                .await
                .unwrap();
            sqlx::query("DELETE FROM scratch")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
        stop.cancel();
        for reader in readers {
            reader.await.unwrap();
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            largest < (WAL_KEPT_BYTES + 3 * limit_frames * 4096) as u64,
            "the WAL reached {largest} bytes"
        );
    }
}
