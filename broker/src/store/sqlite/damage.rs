//! A damaged database file (a disk's bad sector, a copy taken while it was being written, a
//! file edited by hand). SQLite finds damage only where a statement reads the damaged pages
//! ("database disk image is malformed"), so such a broker looked healthy while every agent's
//! stream and most calls failed. `PRAGMA quick_check` reads the whole file's structure
//! (~0.3 s at a million sessions, from a warm cache): at start, where a damaged file is
//! refused, and every [`CHECK_INTERVAL`] in the health probe, where damage found makes the
//! broker NOT_SERVING (new logons wait and fail, returning users are still answered from the
//! directory in memory) until the file is restored and the broker restarted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use crate::store::error::{is_sqlite_damage, sqlite_damage_seen};
use crate::store::{StoreError, StoreResult};

/// How often the running broker reads the whole file's structure.
pub(super) const CHECK_INTERVAL: Duration = Duration::from_secs(300);
/// At most this many of `quick_check`'s lines go into the message.
const PROBLEMS_SHOWN: usize = 3;

/// What is wrong with the file, in `quick_check`'s words; `None` when nothing is. A fresh
/// connection reads it, so that no page another connection holds in its cache is taken for the
/// file's. A file SQLite refuses as damaged or as no database at all is damaged too.
pub(super) async fn problems(
    options: &SqliteConnectOptions,
) -> Result<Option<String>, sqlx::Error> {
    let mut connection = SqliteConnection::connect_with(options).await?;
    let checked: Result<Vec<(String,)>, sqlx::Error> = sqlx::query_as("PRAGMA quick_check")
        .fetch_all(&mut connection)
        .await;
    let _ = connection.close().await;
    match checked {
        Ok(lines) if lines.len() == 1 && lines[0].0 == "ok" => Ok(None),
        Ok(lines) => {
            let mut shown: Vec<String> = lines
                .iter()
                .take(PROBLEMS_SHOWN)
                .map(|(line,)| line.clone())
                .collect();
            if lines.len() > PROBLEMS_SHOWN {
                shown.push(format!("{} more", lines.len() - PROBLEMS_SHOWN));
            }
            Ok(Some(shown.join("; ")))
        }
        Err(sqlx::Error::Database(error)) if is_sqlite_damage(error.as_ref()) => {
            Ok(Some(error.message().to_owned()))
        }
        Err(error) => Err(error),
    }
}

/// What an operator reads about a damaged file.
pub(super) fn damaged(file: &str, problems: &str) -> String {
    format!(
        "the database file {file} is damaged (PRAGMA quick_check: {problems}): restore it from \
         a backup (`sqlite3 {file} \".restore COPY\"`; a copy put in its place needs \
         {file}-wal and {file}-shm removed first), or move it aside with those two to start \
         with an empty one, and start the broker again (on \
         an empty one the agents report their machines and sessions again; drains, weights, \
         session limits and policies set through Admin are lost)"
    )
}

/// The running broker's check, every [`CHECK_INTERVAL`]. It runs in a task of its own, so
/// that a long read of a large file (a cold cache, a slow disk) never holds up the health probe
/// that asks for its result.
#[derive(Debug)]
pub(super) struct DamageCheck {
    options: SqliteConnectOptions,
    file: String,
    interval: Duration,
    state: Arc<Mutex<CheckState>>,
}

#[derive(Debug)]
struct CheckState {
    last: Instant,
    running: bool,
    /// [`sqlite_damage_seen`] when the last check started: a statement that found damage
    /// since makes the next one due at once.
    damage_seen: u64,
    /// What a check found: a damaged file does not mend, so damage once found is reported at
    /// every probe after.
    damaged: Option<String>,
}

impl DamageCheck {
    pub fn new(options: SqliteConnectOptions, file: String, interval: Duration) -> Self {
        DamageCheck {
            options,
            file,
            interval,
            state: Arc::new(Mutex::new(CheckState {
                last: Instant::now(),
                running: false,
                damage_seen: sqlite_damage_seen(),
                damaged: None,
            })),
        }
    }

    /// UNAVAILABLE naming the damage when a check found the file damaged; starts a check when
    /// one is due: every `interval`, and after a statement found damage.
    pub fn check_if_due(&self) -> StoreResult<()> {
        let mut state = lock(&self.state);
        let damage_seen = sqlite_damage_seen();
        let due = state.last.elapsed() >= self.interval || damage_seen != state.damage_seen;
        if state.damaged.is_none() && !state.running && due {
            (state.running, state.damage_seen) = (true, damage_seen);
            let (options, file, shared) = (
                self.options.clone(),
                self.file.clone(),
                Arc::clone(&self.state),
            );
            tokio::spawn(async move {
                let found = match problems(&options).await {
                    Ok(found) => found.map(|problems| damaged(&file, &problems)),
                    // Not damage (the file cannot be opened now, say): the probe's own
                    // statement says what is wrong with the database.
                    Err(error) => {
                        tracing::debug!(%error, "quick_check of the database file failed");
                        None
                    }
                };
                let mut state = lock(&shared);
                (state.last, state.running, state.damaged) = (Instant::now(), false, found);
            });
        }
        match &state.damaged {
            Some(message) => Err(StoreError::unavailable(message.clone())),
            None => Ok(()),
        }
    }

    /// Until the check started now (if one was due) has ended (tests).
    #[cfg(test)]
    async fn settled(&self) {
        while lock(&self.state).running {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn lock(state: &Mutex<CheckState>) -> std::sync::MutexGuard<'_, CheckState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::super::SqliteStore;
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    /// A store on a new file with a few hundred pages of rows, all in the file itself.
    async fn filled(check_every: Duration) -> (SqliteStore, std::path::PathBuf) {
        let (store, path) = super::super::scratch_store(16_384, check_every).await;
        for _ in 0..400 {
            sqlx::query("INSERT INTO scratch VALUES (zeroblob(2000))")
                .execute(&store.pool)
                .await
                .unwrap();
        }
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&store.pool)
            .await
            .unwrap();
        (store, path)
    }

    /// Garbage over pages 20 to 29 (of 4 KiB), as a bad sector leaves them.
    fn damage(path: &std::path::Path) {
        let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.seek(SeekFrom::Start(20 * 4096)).unwrap();
        let garbage: Vec<u8> = (0..10 * 4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        file.write_all(&garbage).unwrap();
        file.sync_all().unwrap();
    }

    #[tokio::test]
    async fn a_damaged_file_is_refused_at_start() {
        let (store, path) = filled(CHECK_INTERVAL).await;
        store.pool.close().await;
        store.ingest_pool.close().await;
        store.placement_pool.close().await;
        drop(store);
        damage(&path);
        let refused = SqliteStore::open(&format!("sqlite://{}", path.display()))
            .await
            .err()
            .expect("a damaged file is refused");
        let message = format!("{refused:#}");
        assert!(message.contains("is damaged"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    #[tokio::test]
    async fn damage_found_while_running_is_reported_at_every_probe() {
        let (store, path) = filled(Duration::ZERO).await;
        store.probe_database().await.unwrap();
        store.damage.settled().await;
        damage(&path);
        // The probe that starts the check answers at once; the next ones report the damage.
        let _ = store.probe_database().await;
        store.damage.settled().await;
        for _ in 0..2 {
            let error = store.probe_database().await.unwrap_err().to_string();
            assert!(error.contains("is damaged"), "{error}");
        }
    }

    #[tokio::test]
    async fn a_statement_that_finds_damage_makes_the_check_run_at_once() {
        let (store, path) = filled(CHECK_INTERVAL).await;
        store.probe_database().await.unwrap();
        damage(&path);
        // A statement reads the damaged pages (on a connection of its own, whose cache holds
        // none of them), minutes before the next check would be due.
        let mut reader = SqliteConnection::connect_with(&store.damage.options)
            .await
            .unwrap();
        let read = sqlx::query("SELECT sum(length(x)) FROM scratch")
            .fetch_one(&mut reader)
            .await
            .unwrap_err();
        let error = StoreError::from(read);
        assert!(matches!(error, StoreError::Unavailable(_)), "{error:?}");
        let _ = store.probe_database().await;
        store.damage.settled().await;
        let error = store.probe_database().await.unwrap_err().to_string();
        assert!(error.contains("is damaged"), "{error}");
    }
}
