//! The broker's one error type at the service boundary, and its deliberate mapping to gRPC
//! status codes. Internal details are logged once here, never sent to clients.

use crate::store::StoreError;
use std::sync::LazyLock;
use std::time::Duration;
use tsbroker_common::ValidationError;
use tsbroker_common::warning_limit::WarningLimit;

/// What an UNAVAILABLE for the database tells clients to wait before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// UNAVAILABLE because the database is away, with the hint to try again in [`RETRY_AFTER`]
/// (`tsbroker_common::proto::RETRY_AFTER_MS_METADATA`).
pub fn database_unavailable() -> tonic::Status {
    unavailable_retry_soon("the broker's database is unavailable; retry shortly")
}

/// UNAVAILABLE with `message` and the hint to try again in [`RETRY_AFTER`]: agents then come
/// back within a second or two instead of after their growing backoff.
pub fn unavailable_retry_soon(message: &str) -> tonic::Status {
    let mut status = tonic::Status::unavailable(message);
    status.metadata_mut().insert(
        tsbroker_common::proto::RETRY_AFTER_MS_METADATA,
        tonic::metadata::MetadataValue::from(RETRY_AFTER.as_millis() as u64),
    );
    status
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{0} not found")]
    NotFound(String),
    /// No machine is ready (or all are draining).
    #[error("{0}")]
    NoMachineAvailable(String),
    /// Machines are ready but all are full.
    #[error("{0}")]
    FarmFull(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        use tonic::Status;
        match error {
            ApiError::Invalid(error) => Status::invalid_argument(error.to_string()),
            ApiError::NotFound(what) => Status::not_found(format!("{what} not found")),
            ApiError::NoMachineAvailable(why) => Status::unavailable(why),
            ApiError::FarmFull(why) => Status::resource_exhausted(why),
            ApiError::FailedPrecondition(why) => Status::failed_precondition(why),
            ApiError::Store(StoreError::NotFound(what)) => {
                Status::not_found(format!("{what} not found"))
            }
            ApiError::Store(StoreError::Conflict(what)) => Status::already_exists(what),
            ApiError::Store(StoreError::Superseded) => {
                Status::aborted("a newer connection for this machine took over")
            }
            ApiError::Store(StoreError::Unavailable(error))
                if crate::store::is_lock_timeout(&error) =>
            {
                static LOCK_WAITS: LazyLock<WarningLimit> = LazyLock::new(WarningLimit::default);
                warn_limited(
                    &LOCK_WAITS,
                    &error,
                    "a farm's placement lock was held too long",
                );
                unavailable_retry_soon(
                    "a farm's placement lock was held too long (another broker replica frozen \
                     or cut off in the middle of a placement, or another client holding the \
                     broker's tables?); retry shortly",
                )
            }
            ApiError::Store(StoreError::Unavailable(error)) => {
                // Every request fails while the database is away: one warning a minute.
                static UNAVAILABLE: LazyLock<WarningLimit> = LazyLock::new(WarningLimit::default);
                warn_limited(&UNAVAILABLE, &error, "store unavailable");
                database_unavailable()
            }
            ApiError::Store(StoreError::Internal(error)) => {
                tracing::error!(%error, "store error");
                Status::internal("internal database error (logged by the broker)")
            }
        }
    }
}

/// `what` happened to a request: a warning when `limit` says one is due (with how many went
/// unwarned), else at debug level.
pub(crate) fn warn_limited(limit: &WarningLimit, error: &dyn std::fmt::Display, what: &str) {
    match limit.warn_now() {
        Some(unwarned) => {
            tracing::warn!(%error, since_last_warning = unwarned, "{what} (said at most once a minute)")
        }
        None => tracing::debug!(%error, "{what}"),
    }
}
