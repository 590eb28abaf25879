//! At most one warning a minute about one kind of trouble, with how many times it happened
//! since: a flood of refused calls or failing requests cannot fill the log, and the operator
//! still sees how much there was.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Least time between two warnings of one kind.
pub const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// When a kind of trouble was last warned about, and how many times it came since.
#[derive(Debug, Default)]
pub struct WarningLimit {
    last_warning: Mutex<Option<Instant>>,
    since: AtomicU64,
}

impl WarningLimit {
    /// `Some(unwarned)` when this occurrence is to be a warning (`unwarned`: how many went
    /// without one before it); `None` when it is to be logged at debug level only.
    pub fn warn_now(&self) -> Option<u64> {
        self.warn_at(Instant::now())
    }

    pub fn warn_at(&self, now: Instant) -> Option<u64> {
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let due = last.is_none_or(|at| now.duration_since(at) >= WARNING_INTERVAL);
        if due {
            *last = Some(now);
            Some(self.since.swap(0, Ordering::Relaxed))
        } else {
            self.since.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warning_a_minute_counting_the_others() {
        let limit = WarningLimit::default();
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        assert_eq!(limit.warn_at(at(0)), Some(0));
        assert_eq!(limit.warn_at(at(1)), None);
        assert_eq!(limit.warn_at(at(59)), None);
        // A minute later: a warning again, counting the two in between.
        assert_eq!(limit.warn_at(at(60)), Some(2));
        assert_eq!(limit.warn_at(at(61)), None);
    }
}
