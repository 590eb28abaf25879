//! Machines that front doors could not connect to lately. A front door whose new logon's
//! machine refused the connection, or did not answer it (an RDP service down or hung while
//! its agent still reports the machine READY), asks again with that machine in
//! `exclude_machine_ids`; left at that, the policy would pick the same machine (it has the
//! fewest sessions, none) for every next new logon, and each would pay the failed attempt
//! first. So new logons avoid a machine named that way for [`REFUSAL_HOLD`] after the last
//! report (a passive health check, as a proxy's `max_fails`/`fail_timeout`), unless no other
//! machine can take them. Returning users are not affected: their session decides.
//!
//! What a replica learns stays in its memory: each replica learns from the front doors that
//! ask it, and forgets on restart (the first failed logon teaches it again).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// How long after the last report new logons avoid a machine.
pub const REFUSAL_HOLD: Duration = Duration::from_secs(30);
/// Most machines remembered at once (a caller may name any ids): past it, reports of machines
/// not already remembered are dropped until some expire.
const MAX_REMEMBERED: usize = 10_000;

/// The machines new logons avoid, each until an instant.
pub struct RecentRefusals {
    started: Instant,
    /// Until when (milliseconds since `started`) the last entry to expire holds: past it the
    /// map is known empty without taking the lock (the decisions' common case).
    latest_until_ms: AtomicU64,
    until: Mutex<HashMap<Uuid, Instant>>,
}

impl Default for RecentRefusals {
    fn default() -> Self {
        RecentRefusals {
            started: Instant::now(),
            latest_until_ms: AtomicU64::new(0),
            until: Mutex::default(),
        }
    }
}

impl RecentRefusals {
    /// Records that a caller could not connect to `machines` at `now`; returns those not
    /// already avoided (newly known to refuse).
    pub fn record(&self, machines: &[Uuid], now: Instant) -> Vec<Uuid> {
        if machines.is_empty() {
            return Vec::new();
        }
        let until = now + REFUSAL_HOLD;
        let Ok(mut held) = self.until.lock() else {
            return Vec::new();
        };
        if held.len() + machines.len() > MAX_REMEMBERED {
            held.retain(|_, until| *until > now);
        }
        let mut new = Vec::new();
        for machine in machines {
            let known = held.get(machine).is_some_and(|until| *until > now);
            if !known && held.len() >= MAX_REMEMBERED && !held.contains_key(machine) {
                continue;
            }
            held.insert(*machine, until);
            if !known {
                new.push(*machine);
            }
        }
        let until_ms = self.millis(until);
        self.latest_until_ms.fetch_max(until_ms, Ordering::Relaxed);
        new
    }

    /// Records `machines` of `farm` as refusing now, and warns (at most once a minute) of
    /// those newly avoided, each as `label` names it.
    pub fn note(&self, farm: &str, machines: &[Uuid], label: impl Fn(Uuid) -> String) {
        let new = self.record(machines, Instant::now());
        if new.is_empty() {
            return;
        }
        static REFUSED: std::sync::LazyLock<tsbroker_common::warning_limit::WarningLimit> =
            std::sync::LazyLock::new(Default::default);
        let machines = new
            .iter()
            .map(|id| label(*id))
            .collect::<Vec<_>>()
            .join(", ");
        match REFUSED.warn_now() {
            Some(unwarned) => tracing::warn!(
                farm,
                machines,
                since_last_warning = unwarned,
                "a front door could not connect to these machines: new logons avoid them for \
                 {REFUSAL_HOLD:?} unless no other machine can take them (said at most once a minute)"
            ),
            None => tracing::debug!(
                farm,
                machines,
                "a front door could not connect to these machines: new logons avoid them"
            ),
        }
    }

    /// The machines new logons avoid at `now`, but for those in `already` (the caller's own
    /// exclusions).
    pub fn avoided(&self, now: Instant, already: &[Uuid]) -> Vec<Uuid> {
        if self.millis(now) >= self.latest_until_ms.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let Ok(held) = self.until.lock() else {
            return Vec::new();
        };
        held.iter()
            .filter(|(machine, until)| **until > now && !already.contains(machine))
            .map(|(machine, _)| *machine)
            .collect()
    }

    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reported_machine_is_avoided_for_the_hold_after_its_last_report() {
        let refusals = RecentRefusals::default();
        let start = Instant::now();
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        assert!(refusals.avoided(start, &[]).is_empty());
        assert_eq!(refusals.record(&[a], start), [a]);
        assert_eq!(refusals.avoided(start, &[]), [a]);
        assert!(refusals.avoided(start, &[a]).is_empty(), "the caller's own");
        // Reported again later: held from that report, and not new.
        let later = start + REFUSAL_HOLD / 2;
        assert!(refusals.record(&[a], later).is_empty());
        assert_eq!(refusals.avoided(start + REFUSAL_HOLD, &[]), [a]);
        assert!(refusals.avoided(later + REFUSAL_HOLD, &[]).is_empty());
        // Once expired, a report makes it new again.
        assert_eq!(refusals.record(&[a, b], later + REFUSAL_HOLD), [a, b]);
    }

    #[test]
    fn the_memory_is_bounded() {
        let refusals = RecentRefusals::default();
        let now = Instant::now();
        let many: Vec<Uuid> = (0..MAX_REMEMBERED as u128 + 50)
            .map(Uuid::from_u128)
            .collect();
        refusals.record(&many, now);
        assert_eq!(refusals.avoided(now, &[]).len(), MAX_REMEMBERED);
        // Expired entries make room.
        let later = now + REFUSAL_HOLD + Duration::from_secs(1);
        let fresh = Uuid::from_u128(u128::MAX);
        assert_eq!(refusals.record(&[fresh], later), [fresh]);
        assert_eq!(refusals.avoided(later, &[]), [fresh]);
    }
}
