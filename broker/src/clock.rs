//! The farm's time. Replicas read each other's timestamps — a machine's lease (its last
//! report), a pending logon's expiry — so a broker whose clock is off would take the machines
//! other replicas serve for gone, or keep dead ones. On PostgreSQL every broker therefore keeps
//! time by the database server's clock: its own, corrected by the offset to the server's
//! measured at start and every minute (`clock_timestamp()` against the midpoint of the round
//! trip). SQLite is a file of this machine and this broker alone: its own clock is the farm's.
//! A broker off by more than a second says so, and `tsbroker_clock_offset_seconds` shows it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tsbroker_common::model;

use crate::metrics::Metrics;
use crate::store::Store;

/// How often the offset is measured again.
const MEASURE_EVERY: Duration = Duration::from_secs(60);
/// A measurement whose round trip took longer than this tells too little; it is skipped.
pub const MAX_ROUND_TRIP_MS: i64 = 500;
/// Offsets within this of the one in use are left alone (no needless steps in the time).
const STEP_MS: i64 = 50;
/// From this offset on, the broker warns: its logs' times, and anything not kept by the
/// database's clock, are off.
const WARN_MS: i64 = 1000;

/// The database's clock as seen from this broker: its own plus an offset.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    /// Now, in milliseconds since the epoch, by the database's clock.
    pub fn now(&self) -> i64 {
        model::now_millis() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// The offset in use (database minus this machine), in milliseconds.
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    /// Takes up a measured offset, unless it is within a step of the one in use.
    pub fn adjust(&self, measured_ms: i64) {
        if (measured_ms - self.offset_ms()).abs() >= STEP_MS {
            self.offset_ms.store(measured_ms, Ordering::Relaxed);
        }
    }
}

/// Measures the offset to the database's clock once, logging it when it is large; `warned`:
/// whether the last measurement was warned about. Returns whether this one was.
pub async fn measure(store: &dyn Store, metrics: &Metrics, warned: bool) -> bool {
    match store.measure_clock().await {
        Ok(Some(offset)) => {
            metrics.clock_offset_seconds.set(offset as f64 / 1000.0);
            let off = offset.abs() >= WARN_MS;
            if off {
                let direction = if offset > 0 { "behind" } else { "ahead of" };
                tracing::warn!(
                    offset_ms = offset,
                    "this machine's clock is {:.1} s {direction} the database server's: the broker \
                     keeps the farm's times by the database's clock, but its log lines are off; \
                     keep the clocks in step (NTP)",
                    offset.abs() as f64 / 1000.0
                );
            } else if warned {
                tracing::info!(
                    offset_ms = offset,
                    "this machine's clock is in step with the database server's again"
                );
            }
            off
        }
        Ok(None) => warned,
        Err(error) => {
            tracing::debug!(%error, "could not read the database's clock");
            warned
        }
    }
}

/// Measures the offset every minute until `shutdown`, after a first measurement that was
/// `warned` about or not.
pub async fn follow(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    mut warned: bool,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(MEASURE_EVERY) => {}
        }
        warned = measure(store.as_ref(), &metrics, warned).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_changes_leave_the_offset_alone() {
        let clock = Clock::default();
        clock.adjust(20);
        assert_eq!(clock.offset_ms(), 0);
        clock.adjust(-40_000);
        assert_eq!(clock.offset_ms(), -40_000);
        clock.adjust(-40_030);
        assert_eq!(clock.offset_ms(), -40_000);
        clock.adjust(3);
        assert_eq!(clock.offset_ms(), 3);
        let before = model::now_millis();
        let now = clock.now();
        assert!(now >= before + 3 && now <= model::now_millis() + 3);
    }
}
