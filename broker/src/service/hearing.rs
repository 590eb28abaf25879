//! When an agent's stream was last heard from, and whether it has been heard steadily: a
//! stream that was silent for longer than a heartbeat interval and then delivers a burst (this
//! broker was frozen, or the network stalled, and the agent's messages waited in the socket) is
//! not an agent that is reporting right now, however fresh its last message looks.

use std::time::Duration;
use tokio::time::Instant;

/// What counts as a gap in an agent's reports: one heartbeat interval and a second's slack.
fn gap(heartbeat_interval: Duration) -> Duration {
    heartbeat_interval + Duration::from_secs(1)
}

pub(super) struct Hearing {
    last: Instant,
    /// When the first message after the latest gap arrived (none since the stream began).
    gap_ended: Option<Instant>,
}

impl Hearing {
    pub(super) fn new(now: Instant) -> Hearing {
        Hearing {
            last: now,
            gap_ended: None,
        }
    }

    /// When the agent's last message arrived.
    pub(super) fn last(&self) -> Instant {
        self.last
    }

    /// A message arrived at `now`.
    pub(super) fn heard(&mut self, now: Instant, heartbeat_interval: Duration) {
        if now.saturating_duration_since(self.last) > gap(heartbeat_interval) {
            self.gap_ended = Some(now);
        }
        self.last = now;
    }

    /// Whether the agent is reporting at `now`: heard within an interval, with no gap in the
    /// interval before (a burst after a silence is old messages delivered late).
    pub(super) fn reporting(&self, now: Instant, heartbeat_interval: Duration) -> bool {
        let gap = gap(heartbeat_interval);
        now.saturating_duration_since(self.last) < gap
            && self
                .gap_ended
                .is_none_or(|ended| now.saturating_duration_since(ended) >= gap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(5);

    fn at(start: Instant, seconds: u64) -> Instant {
        start + Duration::from_secs(seconds)
    }

    #[test]
    fn an_agent_heard_every_interval_is_reporting() {
        let start = Instant::now();
        let mut hearing = Hearing::new(start);
        for second in [0, 5, 10, 15] {
            hearing.heard(at(start, second), INTERVAL);
        }
        assert!(hearing.reporting(at(start, 16), INTERVAL));
        // Just connected: its first messages count.
        let mut fresh = Hearing::new(start);
        fresh.heard(start, INTERVAL);
        assert!(fresh.reporting(at(start, 1), INTERVAL));
    }

    #[test]
    fn a_silent_agent_is_not_reporting() {
        let start = Instant::now();
        let mut hearing = Hearing::new(start);
        hearing.heard(start, INTERVAL);
        assert!(!hearing.reporting(at(start, 7), INTERVAL));
    }

    #[test]
    fn a_burst_after_a_silence_is_not_reporting_until_it_goes_on_steadily() {
        let start = Instant::now();
        let mut hearing = Hearing::new(start);
        hearing.heard(start, INTERVAL);
        // This broker was frozen for 20 s: the messages queued meanwhile arrive together.
        for _ in 0..4 {
            hearing.heard(at(start, 20), INTERVAL);
        }
        assert_eq!(hearing.last(), at(start, 20));
        assert!(!hearing.reporting(at(start, 20), INTERVAL));
        assert!(!hearing.reporting(at(start, 25), INTERVAL));
        // The agent goes on reporting on this stream: it is reporting again.
        hearing.heard(at(start, 25), INTERVAL);
        assert!(hearing.reporting(at(start, 26), INTERVAL));
    }
}
