//! Store errors, sorted by what the caller can do about them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A newer stream for the same machine took over; this stream must stop.
    #[error("a newer connection for this machine took over")]
    Superseded,
    /// A constraint refused the change.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database cannot be reached or is overloaded; worth retrying.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// Anything else.
    #[error("database error: {0}")]
    Internal(sqlx::Error),
}

impl StoreError {
    /// UNAVAILABLE with `message` as what went wrong (an error passed on to other waiters, a
    /// worker gone), read as plainly as the database's own errors.
    pub fn unavailable(message: impl Into<String>) -> Self {
        StoreError::Unavailable(sqlx::Error::Io(std::io::Error::other(message.into())))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(database_error) => {
                if database_error.is_unique_violation() {
                    StoreError::Conflict(database_error.message().to_owned())
                } else if database_error.is_foreign_key_violation() {
                    StoreError::NotFound(database_error.message().to_owned())
                } else if is_transient(database_error.as_ref()) {
                    StoreError::Unavailable(error)
                } else if is_sqlite_damage(database_error.as_ref()) {
                    // Not the request's fault nor the broker's: the file needs its operator,
                    // who hears it from the health check (`sqlite/damage.rs`), run at once.
                    SQLITE_DAMAGE_SEEN.fetch_add(1, Ordering::Relaxed);
                    StoreError::Unavailable(error)
                } else {
                    StoreError::Internal(error)
                }
            }
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(error),
            sqlx::Error::RowNotFound => StoreError::NotFound("row".to_owned()),
            _ => StoreError::Internal(error),
        }
    }
}

/// How many statements of this process have found a SQLite file damaged: the running broker's
/// check of the whole file (`sqlite/damage.rs`) runs at its next health probe when this moves,
/// not minutes later.
static SQLITE_DAMAGE_SEEN: AtomicU64 = AtomicU64::new(0);

/// See [`SQLITE_DAMAGE_SEEN`].
pub(super) fn sqlite_damage_seen() -> u64 {
    SQLITE_DAMAGE_SEEN.load(Ordering::Relaxed)
}

/// SQLite's CORRUPT (11) and NOTADB (26), by primary result code: the file is damaged, or is
/// no database at all.
pub(super) fn is_sqlite_damage(error: &dyn sqlx::error::DatabaseError) -> bool {
    let sqlite = error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some();
    sqlite
        && error
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| matches!(code & 0xff, 11 | 26))
}

/// Whether a PostgreSQL error is a lock held past `lock_timeout` (55P03: another replica
/// frozen in a transaction) or this replica's own transaction ended by
/// `idle_in_transaction_session_timeout` (25P03): not the database being away. Also for an
/// error passed on as [`describe_with_code`]'s text (a placement batch's, to each request).
pub fn is_lock_timeout(error: &sqlx::Error) -> bool {
    const CODES: [&str; 2] = ["55P03", "25P03"];
    match error {
        sqlx::Error::Database(database_error) => database_error
            .code()
            .is_some_and(|code| CODES.contains(&code.as_ref())),
        // Passed on (`StoreError::unavailable`): the text ends with the code.
        sqlx::Error::Io(passed_on) => {
            let text = passed_on.to_string();
            CODES
                .iter()
                .any(|code| text.ends_with(&format!("(SQLSTATE {code})")))
        }
        _ => false,
    }
}

/// The error as text, ending with its SQLSTATE when the database gave one.
pub fn describe_with_code(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(database_error) => match database_error.code() {
            Some(code) => format!("{error} (SQLSTATE {code})"),
            None => error.to_string(),
        },
        _ => error.to_string(),
    }
}

/// Whether the database refused for a reason of its own state, not the request's: worth
/// retrying once it is resolved (the operator frees disk space, the server comes back).
fn is_transient(error: &dyn sqlx::error::DatabaseError) -> bool {
    let Some(code) = error.code() else {
        return false;
    };
    if error
        .try_downcast_ref::<sqlx::sqlite::SqliteError>()
        .is_some()
    {
        code.parse().is_ok_and(sqlite_transient)
    } else {
        postgres_transient(&code) || refuses_connections(&code, error.message())
    }
}

/// A database that takes no new connections (`ALTER DATABASE … ALLOW_CONNECTIONS false`, as
/// when it is being dropped or restored): SQLSTATE 55000, which PostgreSQL also gives for
/// faults of a session's own state, so the message tells this one.
fn refuses_connections(sqlstate: &str, message: &str) -> bool {
    sqlstate == "55000" && message.contains("not currently accepting connections")
}

/// SQLite, by primary result code (the low byte of the extended code sqlx reports): BUSY and
/// LOCKED (another writer), READONLY (the file or its file system made read-only), IOERR (the
/// disk failed a read or write), FULL (no space left): the database is there but takes no
/// writes until its operator acts, which callers hear as UNAVAILABLE, not as a broker fault.
fn sqlite_transient(extended_code: i32) -> bool {
    matches!(extended_code & 0xff, 5 | 6 | 8 | 10 | 13)
}

/// PostgreSQL, by SQLSTATE: serialization failures and deadlocks, lost connections (class 08),
/// insufficient resources (class 53: disk full, out of memory, too many connections), a server
/// shutting down or starting (57P01-57P03), a lock held past `lock_timeout` (55P03: another
/// replica frozen in a transaction), a transaction ended by
/// `idle_in_transaction_session_timeout` (25P03: this replica was the frozen one), and a
/// database that takes no writes: read-only (25006: a standby after a failover,
/// `default_transaction_read_only`) or the broker's role denied them (42501: a REVOKE) — as
/// SQLite's READONLY, the operator must act, and meanwhile it is an outage, not a fault.
fn postgres_transient(sqlstate: &str) -> bool {
    matches!(
        sqlstate,
        "40001" | "40P01" | "57P01" | "57P02" | "57P03" | "55P03" | "25P03" | "25006" | "42501"
    ) || sqlstate.starts_with("08")
        || sqlstate.starts_with("53")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_timeout_passed_on_is_still_a_lock_timeout() {
        let passed_on = |text: &str| match StoreError::unavailable(text) {
            StoreError::Unavailable(error) => error,
            other => panic!("{other:?}"),
        };
        let lock = passed_on("canceling statement due to lock timeout (SQLSTATE 55P03)");
        assert!(is_lock_timeout(&lock));
        assert!(!is_lock_timeout(&passed_on("pool timed out")));
        assert!(!is_lock_timeout(&sqlx::Error::PoolTimedOut));
    }

    #[test]
    fn sqlite_errors_of_the_files_state_are_worth_retrying() {
        // BUSY, BUSY_SNAPSHOT, LOCKED, READONLY, READONLY_DBMOVED, IOERR, IOERR_FSYNC, FULL.
        for code in [5, 517, 6, 8, 1032, 10, 1034, 13] {
            assert!(sqlite_transient(code), "{code}");
        }
        // ERROR, CONSTRAINT_CHECK, CORRUPT, MISMATCH.
        for code in [1, 275, 11, 20] {
            assert!(!sqlite_transient(code), "{code}");
        }
    }

    #[test]
    fn postgres_errors_of_the_servers_state_are_worth_retrying() {
        for code in [
            "40001", "40P01", "08006", "53100", "53300", "57P01", "57P03", "55P03", "25P03",
            "25006", "42501",
        ] {
            assert!(postgres_transient(code), "{code}");
        }
        for code in ["23505", "22P02", "42P01", "XX000"] {
            assert!(!postgres_transient(code), "{code}");
        }
        let refusing = "database \"tsb\" is not currently accepting connections";
        assert!(refuses_connections("55000", refusing));
        assert!(!refuses_connections(
            "55000",
            "lastval is not yet defined in this session"
        ));
    }
}
