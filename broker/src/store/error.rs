//! Store errors, sorted by what the caller can do about them.

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

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Database(database_error) => {
                if database_error.is_unique_violation() {
                    StoreError::Conflict(database_error.message().to_owned())
                } else if database_error.is_foreign_key_violation() {
                    StoreError::NotFound(database_error.message().to_owned())
                } else if is_busy(database_error.code().as_deref()) {
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

/// SQLite's BUSY/LOCKED and PostgreSQL's serialization, deadlock and connection classes.
fn is_busy(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("5" | "6" | "40001" | "40P01" | "57P01" | "57P03")
    ) || code.is_some_and(|code| code.starts_with("08"))
}
