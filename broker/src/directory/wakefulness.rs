//! Whether this broker has been running all along. A process frozen for seconds (a paused VM,
//! SIGSTOP, a starved host) wakes with a directory that missed what other replicas did
//! meanwhile — their notifications wait, unread, in its socket — and with their users' calls
//! queued too: answered first, from the directory, they would go to sessions that ended while it
//! slept. So a lookup trusts the directory only while a beat every 200 ms keeps coming, and for
//! a few seconds after a gap: meanwhile the database is asked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the beat comes.
const BEAT: Duration = Duration::from_millis(200);
/// A beat this late means the process did not run (or hardly ran) meanwhile.
const GAP: Duration = Duration::from_secs(1);
/// How long after such a gap the directory is not trusted: long enough to read what queued.
const CATCH_UP: Duration = Duration::from_secs(3);

pub(super) struct Wakefulness {
    origin: Instant,
    /// The last beat, in ms since `origin`.
    beat: AtomicU64,
    /// Not trusted before this (ms since `origin`).
    trusted_from: AtomicU64,
}

impl Wakefulness {
    pub(super) fn new() -> Self {
        Wakefulness {
            origin: Instant::now(),
            beat: AtomicU64::new(0),
            trusted_from: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// One beat: after a gap, the directory is not trusted for [`CATCH_UP`].
    pub(super) fn beat(&self) {
        let now = self.now_ms();
        let last = self.beat.swap(now, Ordering::Relaxed);
        let gap = now.saturating_sub(last);
        if gap > GAP.as_millis() as u64 {
            self.trusted_from
                .store(now + CATCH_UP.as_millis() as u64, Ordering::Relaxed);
            tracing::warn!(
                paused_ms = gap,
                "this broker did not run for a while (paused or starved): for the next {} s \
                 returning users are looked up in the database, while the session directory \
                 catches up on what the other replicas did meanwhile",
                CATCH_UP.as_secs()
            );
        }
    }

    /// Whether the directory's answers can be trusted now.
    pub(super) fn trusted(&self) -> bool {
        let now = self.now_ms();
        now.saturating_sub(self.beat.load(Ordering::Relaxed)) <= GAP.as_millis() as u64
            && now >= self.trusted_from.load(Ordering::Relaxed)
    }

    /// Beats until `stop`.
    pub(super) async fn run(self: std::sync::Arc<Self>, stop: CancellationToken) {
        let mut beats = tokio::time::interval(BEAT);
        beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = beats.tick() => self.beat(),
                () = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_gap_in_the_beats_distrusts_the_directory_until_it_caught_up() {
        let awake = Wakefulness::new();
        awake.beat();
        assert!(awake.trusted());
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(awake.trusted());
        // Frozen for 30 s: not trusted from the moment it runs again, before any beat.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(!awake.trusted());
        awake.beat();
        assert!(!awake.trusted(), "catching up");
        for _ in 0..14 {
            tokio::time::advance(BEAT).await;
            awake.beat();
            assert!(!awake.trusted());
        }
        tokio::time::advance(BEAT).await;
        awake.beat();
        assert!(awake.trusted());
    }
}
