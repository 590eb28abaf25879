//! The logons in flight this broker sent users to, kept in memory for their time to live.
//! The database holds them (a pending logon is the store's), but while it is away a
//! user's retry — mstsc connecting again, a front door asking again — would otherwise be told
//! UNAVAILABLE, and the front door would take them to its own RDP service: a second session
//! once the first logon completes. From here the retry goes where the first attempt went.
//!
//! Per replica: a retry that reaches another replica while the database is away is not known
//! there. Front doors ask the broker they are connected to, so a retry through the same front
//! door is.

use super::{RedirectAnswer, RedirectQuery, Target};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tsbroker_common::model;
use tsbroker_common::proto::v1::RedirectReason;
use uuid::Uuid;

/// Most logons remembered at once; past it, new ones are not remembered until some expire.
const MAX_REMEMBERED: usize = 200_000;
/// While the map is full, expired entries are looked for at most this often (a sweep reads
/// every entry: not for each new logon).
const FULL_SWEEP_GAP: Duration = Duration::from_secs(1);

/// Where users' logons in flight went, by farm and user key.
pub struct RecentLogons {
    ttl: Duration,
    held: Mutex<Held>,
}

struct Held {
    by_user: HashMap<String, (Arc<Target>, Instant)>,
    /// One copy of each machine's target, shared by its users' entries.
    targets: HashMap<Uuid, Arc<Target>>,
    /// When expired entries are next dropped (every `ttl`: the map holds at most about two
    /// `ttl`s of logons).
    next_sweep: Instant,
}

impl RecentLogons {
    /// Remembers logons for `ttl` (the pending logons' time to live).
    pub fn new(ttl: Duration) -> Self {
        RecentLogons {
            ttl,
            held: Mutex::new(Held {
                by_user: HashMap::new(),
                targets: HashMap::new(),
                next_sweep: Instant::now() + ttl,
            }),
        }
    }

    /// `user_key`'s logon in `farm` went to `target` at `now`.
    pub fn record(&self, farm: &str, user_key: &str, target: &Target, now: Instant) {
        let Some(machine) = target.machine_id else {
            return;
        };
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        if now >= held.next_sweep {
            held.by_user.retain(|_, (_, until)| *until > now);
            held.targets
                .retain(|_, target| Arc::strong_count(target) > 1);
            held.next_sweep = now + self.ttl;
        }
        let key = key(farm, user_key);
        // The same logon answered again (a retry told PENDING_LOGON, from the database or from
        // here) keeps its time to live: refreshed by each retry, a logon that never completed
        // would be the answer for as long as its user kept trying.
        if held
            .by_user
            .get(&key)
            .is_some_and(|(known, until)| *until > now && known.machine_id == Some(machine))
        {
            return;
        }
        if held.by_user.len() >= MAX_REMEMBERED && !held.by_user.contains_key(&key) {
            held.next_sweep = held.next_sweep.min(now + FULL_SWEEP_GAP);
            return;
        }
        let shared = match held.targets.get(&machine) {
            Some(known) if **known == *target => known.clone(),
            _ => {
                let shared = Arc::new(target.clone());
                held.targets.insert(machine, shared.clone());
                shared
            }
        };
        held.by_user.insert(key, (shared, now + self.ttl));
    }

    /// The answer for `query` from its user's logon in flight, if this broker placed one
    /// (a warning at most once a minute: the database cannot decide).
    pub fn answer(&self, query: &RedirectQuery) -> Option<RedirectAnswer> {
        if query.user_name.is_empty() {
            return None;
        }
        let target = self.recall(
            &query.farm,
            &super::cut_name::logon_key(query, &model::user_key(&query.user_name)),
            &query.excluded_machines,
            Instant::now(),
        )?;
        static RECALLED: std::sync::LazyLock<tsbroker_common::warning_limit::WarningLimit> =
            std::sync::LazyLock::new(Default::default);
        match RECALLED.warn_now() {
            Some(unwarned) => tracing::warn!(
                farm = %query.farm,
                user = %query.user_name,
                machine = %target.name,
                since_last_warning = unwarned,
                "database cannot decide: answering with the user's logon in flight that this \
                 broker placed (said at most once a minute)"
            ),
            None => tracing::debug!(
                farm = %query.farm,
                user = %query.user_name,
                machine = %target.name,
                "database cannot decide: answering with the user's logon in flight"
            ),
        }
        Some(RedirectAnswer {
            target,
            reason: RedirectReason::PendingLogon,
            session_id: None,
            user_name: query.user_name.clone(),
            policy: None,
        })
    }

    /// Where `user_key`'s unexpired logon in `farm` went, unless to one of `excluded`.
    pub fn recall(
        &self,
        farm: &str,
        user_key: &str,
        excluded: &[Uuid],
        now: Instant,
    ) -> Option<Target> {
        let held = self.held.lock().ok()?;
        let (target, until) = held.by_user.get(&key(farm, user_key))?;
        let excluded = target
            .machine_id
            .is_some_and(|machine| excluded.contains(&machine));
        (*until > now && !excluded).then(|| Target::clone(target))
    }
}

fn key(farm: &str, user_key: &str) -> String {
    format!("{farm}\n{user_key}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(id: u128, address: &str) -> Target {
        Target {
            machine_id: Some(Uuid::from_u128(id)),
            name: format!("ts{id}"),
            address: address.to_owned(),
            front_door: true,
        }
    }

    #[test]
    fn a_logon_is_recalled_for_its_time_to_live_in_its_farm_only() {
        let recent = RecentLogons::new(Duration::from_secs(30));
        let now = Instant::now();
        let ts1 = target(1, "10.0.0.1:3389");
        recent.record("farm", "alice", &ts1, now);
        assert_eq!(recent.recall("farm", "alice", &[], now), Some(ts1.clone()));
        assert_eq!(recent.recall("other", "alice", &[], now), None);
        assert_eq!(recent.recall("farm", "bob", &[], now), None);
        let ts1_id = ts1.machine_id.unwrap();
        assert_eq!(recent.recall("farm", "alice", &[ts1_id], now), None);
        let later = now + Duration::from_secs(31);
        assert_eq!(recent.recall("farm", "alice", &[], later), None);
        // Placed again elsewhere: the newest logon is the answer.
        let ts2 = target(2, "10.0.0.2:3389");
        recent.record("farm", "alice", &ts2, later);
        assert_eq!(recent.recall("farm", "alice", &[], later), Some(ts2));
    }

    #[test]
    fn answering_the_same_logon_again_does_not_extend_it() {
        let ttl = Duration::from_secs(30);
        let recent = RecentLogons::new(ttl);
        let now = Instant::now();
        let ts1 = target(1, "10.0.0.1:3389");
        recent.record("farm", "alice", &ts1, now);
        // Her retries, every few seconds, are answered with it (and recorded again).
        for retry in 1..=5 {
            let at = now + Duration::from_secs(5 * retry);
            assert_eq!(recent.recall("farm", "alice", &[], at), Some(ts1.clone()));
            recent.record("farm", "alice", &ts1, at);
        }
        assert_eq!(recent.recall("farm", "alice", &[], now + ttl), None);
        // Once expired, a new logon (even on the same machine) is remembered anew.
        recent.record("farm", "alice", &ts1, now + ttl);
        assert_eq!(
            recent.recall("farm", "alice", &[], now + ttl + Duration::from_secs(29)),
            Some(ts1)
        );
    }

    #[test]
    fn a_full_memory_takes_new_logons_again_once_old_ones_expired() {
        let ttl = Duration::from_secs(30);
        let recent = RecentLogons::new(ttl);
        let now = Instant::now();
        let ts1 = target(1, "10.0.0.1:3389");
        for user in 0..MAX_REMEMBERED {
            recent.record("farm", &format!("u{user}"), &ts1, now);
        }
        recent.record("farm", "late", &ts1, now);
        assert_eq!(recent.recall("farm", "late", &[], now), None, "full");
        // A sweep half a second on (due a second after the map filled) would find nothing
        // expired anyway: not made, still full. Once the entries expired, the next one makes
        // room.
        let soon = now + FULL_SWEEP_GAP / 2;
        recent.record("farm", "soon", &ts1, soon);
        assert_eq!(recent.recall("farm", "soon", &[], soon), None);
        let swept = now + ttl + FULL_SWEEP_GAP;
        recent.record("farm", "latest", &ts1, swept);
        assert_eq!(recent.recall("farm", "latest", &[], swept), Some(ts1));
        assert_eq!(recent.held.lock().unwrap().by_user.len(), 1);
    }

    #[test]
    fn expired_logons_are_dropped_and_machines_shared() {
        let ttl = Duration::from_secs(30);
        let recent = RecentLogons::new(ttl);
        let now = Instant::now();
        let ts1 = target(1, "10.0.0.1:3389");
        for user in 0..100 {
            recent.record("farm", &format!("u{user}"), &ts1, now);
        }
        {
            let held = recent.held.lock().unwrap();
            assert_eq!((held.by_user.len(), held.targets.len()), (100, 1));
        }
        // A machine whose address changed gets a new copy; the old one serves its entries.
        let moved = target(1, "10.0.0.9:3389");
        recent.record("farm", "late", &moved, now);
        assert_eq!(recent.recall("farm", "u0", &[], now), Some(ts1));
        assert_eq!(recent.recall("farm", "late", &[], now), Some(moved.clone()));
        // A ttl later, the sweep drops what expired (and copies nobody uses).
        let later = now + ttl + Duration::from_secs(1);
        recent.record("farm", "newest", &moved, later);
        let held = recent.held.lock().unwrap();
        assert_eq!((held.by_user.len(), held.targets.len()), (1, 1));
    }
}
