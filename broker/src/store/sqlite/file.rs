//! The SQLite database file itself: one broker's at a time (locked while it runs), its WAL
//! checkpointed off the commit path, kept bounded, and watched for deletion.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

/// How long a statement waits for SQLite's locks.
pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// A WAL of more frames than this (64 MiB of 4 KiB pages) is started over once all of it is
/// in the database file; when SQLite starts it over, the file is cut back to that size. (Not
/// truncated to nothing: a WAL that has to grow again makes every commit's sync a change of the
/// file's size too, which held a logon storm's p99 at 21-95 ms instead of 4-7.)
pub(super) const WAL_LIMIT_FRAMES: i64 = 16_384;
pub(super) const WAL_KEPT_BYTES: i64 = WAL_LIMIT_FRAMES * 4096;

/// Copies what the WAL holds into the database file, without waiting for anyone; and keeps
/// the WAL's size bounded. SQLite starts the WAL over only when a commit finds no reader still
/// using it, which a busy broker's readers rarely allow: the file then grows for as long as
/// the load lasts (12 MB/s at 600 logons and logoffs a second) and keeps its size after. A WAL
/// past the limit, once copied, is started over in the writers' turn (RESTART waits for the
/// readers to leave it, at most 200 ms), and the next commit writes from its beginning.
pub(super) async fn checkpoint_wal(
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
pub(super) fn own_database_file(url: &str, path: &Path) -> anyhow::Result<Option<std::fs::File>> {
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

/// The WAL file as this broker's SQLite connections have it open, to notice it deleted or
/// replaced under them (`rm tsbroker.db-wal`): they would go on writing to the deleted file,
/// and a crash would lose what the last checkpoint had not yet copied. SQLite deletes the WAL
/// itself only when the process's last connection to the file closes, which pools do when
/// idle; `keeper`, a connection that stays open and unused, makes that never happen while the
/// broker runs, so a WAL that is gone is one someone else removed.
pub(super) struct WalWatch {
    path: std::path::PathBuf,
    file: std::fs::File,
    keeper: std::sync::Mutex<Option<SqliteConnection>>,
}

impl std::fmt::Debug for WalWatch {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("WalWatch")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl WalWatch {
    /// Once the database is open (its WAL made); `None` for a database in memory, or a WAL
    /// this process cannot open (said at debug level: the file's own check still runs).
    pub(super) async fn start(
        options: &SqliteConnectOptions,
        database: Option<&std::fs::File>,
    ) -> Option<Self> {
        database?;
        let path = wal_path(options.get_filename());
        let keeper = match SqliteConnection::connect_with(options).await {
            Ok(keeper) => keeper,
            Err(error) => {
                tracing::debug!(%error, "no connection to keep the SQLite WAL open");
                return None;
            }
        };
        match std::fs::File::open(&path) {
            Ok(file) => Some(WalWatch {
                path,
                file,
                keeper: std::sync::Mutex::new(Some(keeper)),
            }),
            Err(error) => {
                tracing::debug!(%error, path = %path.display(), "the SQLite WAL is not watched");
                None
            }
        }
    }

    /// The connection that keeps the WAL open, to close it at the stop (the last one).
    pub(super) fn take_keeper(&self) -> Option<SqliteConnection> {
        self.keeper.lock().ok()?.take()
    }

    /// What went wrong, when the WAL file was deleted or replaced.
    pub(super) fn gone(&self) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        match self.file.metadata() {
            Ok(metadata) if metadata.nlink() == 0 => Some(format!(
                "the database's WAL file {} was deleted or replaced while the broker ran: restart \
                 it (its changes are copied from the deleted file into the database within a \
                 second; those of the last moments before a crash would be lost)",
                self.path.display()
            )),
            _ => None,
        }
    }
}

/// Where SQLite keeps the WAL of the database file at `database`.
fn wal_path(database: &Path) -> std::path::PathBuf {
    let mut path = database.as_os_str().to_owned();
    path.push("-wal");
    path.into()
}

/// Whether opening the database failed for a condition of the disk that clears up without
/// the operator changing a setting: no space (or quota, or a file-size limit), a read-only file
/// system (remounted so after errors), an I/O error — or SQLite's own words for these (FULL,
/// IOERR, READONLY). A wrong path, a refused permission, a file that is not a database or one
/// in use by another broker are not: they are the operator's to fix.
pub fn may_clear_up(error: &anyhow::Error) -> bool {
    // EIO, EFBIG, ENOSPC, EROFS, EDQUOT on Linux.
    const DISK_CONDITIONS: [i32; 5] = [5, 27, 28, 30, 122];
    // SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL (primary codes: the low byte).
    const SQLITE_CONDITIONS: [i32; 3] = [8, 10, 13];
    let disk = |io: &std::io::Error| {
        io.raw_os_error()
            .is_some_and(|code| DISK_CONDITIONS.contains(&code))
    };
    error.chain().any(|cause| {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return disk(io);
        }
        match cause.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Io(io)) => disk(io),
            Some(sqlx::Error::Database(database)) => database
                .code()
                .and_then(|code| code.parse::<i32>().ok())
                .is_some_and(|code| SQLITE_CONDITIONS.contains(&(code & 0xff))),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_or_read_only_disk_may_clear_up_and_a_wrong_setting_does_not() {
        let io = |code: i32| {
            anyhow::Error::from(std::io::Error::from_raw_os_error(code)).context("open sqlite")
        };
        for (code, clears) in [
            (28, true),
            (30, true),
            (5, true),
            (27, true),
            (2, false),
            (13, false),
        ] {
            assert_eq!(may_clear_up(&io(code)), clears, "os error {code}");
        }
        let in_use = anyhow::anyhow!("sqlite database b.db is in use by another process");
        assert!(!may_clear_up(&in_use));
    }

    #[test]
    fn only_a_wal_past_the_limit_and_copied_whole_starts_over() {
        let limit = WAL_LIMIT_FRAMES;
        assert!(!must_restart(limit, limit, limit));
        assert!(must_restart(limit + 1, limit + 1, limit));
        assert!(!must_restart(limit + 1, limit, limit));
    }

    /// `rm b.db-wal` under the running broker: its health probe says so.
    #[tokio::test]
    async fn a_wal_deleted_while_the_broker_runs_is_an_outage() {
        let (store, path) =
            super::super::scratch_store(WAL_LIMIT_FRAMES, super::super::damage::CHECK_INTERVAL)
                .await;
        store.placement_pool.close().await;
        store.ingest_pool.close().await;
        sqlx::query("INSERT INTO scratch VALUES (zeroblob(10))")
            .execute(&store.pool)
            .await
            .unwrap();
        store.probe_database().await.unwrap();
        std::fs::remove_file(wal_path(&path)).unwrap();
        let error = store.probe_database().await.unwrap_err().to_string();
        assert!(error.contains("WAL file"), "{error}");
        assert!(error.contains("deleted or replaced"), "{error}");
    }

    /// The WAL is kept while every pool's connections close and open again (as idle and aged
    /// ones do): SQLite deletes it only after the process's last connection to the file.
    #[tokio::test]
    async fn the_brokers_own_pools_closing_do_not_delete_the_wal() {
        let (store, path) =
            super::super::scratch_store(WAL_LIMIT_FRAMES, super::super::damage::CHECK_INTERVAL)
                .await;
        store.checkpointer.abort();
        for pool in [&store.pool, &store.ingest_pool, &store.placement_pool] {
            pool.close().await;
        }
        assert!(wal_path(&path).exists());
        assert!(store.wal.as_ref().unwrap().gone().is_none());
    }

    /// Writers that never stop while readers keep overlapping: SQLite never finds a moment to
    /// start the WAL over by itself, and otherwise its file grows with every write.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_continuous_reads_and_writes() {
        // 16 MiB here (the file is cut back to 64 MiB when the WAL starts over).
        let limit_frames = 4096;
        let (store, path) =
            super::super::scratch_store(limit_frames, super::super::damage::CHECK_INTERVAL).await;
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
        let wal = path.with_extension("db-wal");
        let mut largest = 0;
        // 384 MiB written in 1 MiB rows, each deleted again (the database stays small).
        for _ in 0..384 {
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
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
        // Bounded: the size it is cut back to, plus what the writers add between two
        // checkpoints that start it over (every 250 ms, or later when readers stay on it: on
        // a loaded machine one CI run saw 126 MB where 3 limits' worth, 112 MiB, was allowed).
        // Unbounded, it would reach the 384 MiB written.
        assert!(
            largest < (WAL_KEPT_BYTES + 6 * limit_frames * 4096) as u64,
            "the WAL reached {largest} bytes"
        );
    }
}
