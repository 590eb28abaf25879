//! Reconnection delays: exponential backoff with full jitter (a uniform pick between zero and
//! the exponential ceiling), so a broker restart does not meet every agent at the same instant.

use std::time::Duration;

use rand::Rng;

use crate::config::BackoffSettings;

#[derive(Debug)]
pub struct Backoff {
    settings: BackoffSettings,
    attempt: u32,
}

impl Backoff {
    pub fn new(settings: BackoffSettings) -> Self {
        Backoff {
            settings,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay: `base * 2^attempt`, at most `cap`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.settings
            .base
            .checked_mul(factor)
            .unwrap_or(self.settings.cap)
            .min(self.settings.cap)
    }

    /// The next delay to wait before reconnecting.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=ceiling_ms))
    }

    /// The delay when the broker said when to come back (`hint`, at most the cap): a pick
    /// between half of it and all of it, so that agents do not all come back at once; the
    /// backoff does not grow meanwhile.
    pub fn hinted_delay(&self, hint: Duration) -> Duration {
        let hint_ms = u64::try_from(hint.min(self.settings.cap).as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(hint_ms / 2..=hint_ms))
    }

    /// The delay after a refusal that time will not fix (the agent's credentials): six times
    /// the cap (30 s by default), so the broker is asked now and then, not every few seconds.
    pub fn patient_delay(&self) -> Duration {
        self.settings.cap * 6
    }

    /// Back to `base`, after a healthy stream.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Resets when the stream that just ended had been up at least `healthy_after`.
    pub fn stream_ended(&mut self, lasted: Duration) {
        if lasted >= self.settings.healthy_after {
            self.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BackoffSettings {
        BackoffSettings {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            healthy_after: Duration::from_secs(30),
        }
    }

    #[test]
    fn delays_stay_under_a_doubling_ceiling_capped_at_30s() {
        let mut backoff = Backoff::new(settings());
        let mut ceilings = Vec::new();
        for _ in 0..80 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay();
            assert!(delay <= ceiling, "{delay:?} above {ceiling:?}");
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(
            &ceilings[..8],
            &[500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]
        );
        assert!(ceilings.iter().all(|ceiling| *ceiling <= 30_000));
    }

    #[test]
    fn delays_are_jittered() {
        let mut backoff = Backoff::new(settings());
        for _ in 0..10 {
            backoff.next_delay();
        }
        let delays: std::collections::HashSet<_> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(delays.len() > 1);
    }

    #[test]
    fn healthy_stream_resets() {
        let mut backoff = Backoff::new(settings());
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.stream_ended(Duration::from_secs(1));
        assert_eq!(backoff.ceiling(), Duration::from_secs(16));
        backoff.stream_ended(Duration::from_secs(31));
        assert_eq!(backoff.ceiling(), Duration::from_millis(500));
    }

    #[test]
    fn a_hinted_delay_is_between_half_and_all_of_the_hint_and_does_not_grow_the_backoff() {
        let mut backoff = Backoff::new(settings());
        for _ in 0..5 {
            backoff.next_delay();
        }
        let ceiling = backoff.ceiling();
        for _ in 0..200 {
            let delay = backoff.hinted_delay(Duration::from_secs(1));
            assert!(delay >= Duration::from_millis(500) && delay <= Duration::from_secs(1));
        }
        assert_eq!(backoff.ceiling(), ceiling);
        // A hint above the cap is held to the cap.
        assert!(backoff.hinted_delay(Duration::from_secs(3600)) <= Duration::from_secs(30));
    }
}
