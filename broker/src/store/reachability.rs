//! Whether the database answers, as the health monitor last found it, and when it went away
//! and came back. While it is away, agent streams are turned away at once (nothing of theirs
//! can be written); while it is away and for one heartbeat timeout after it is back, a machine is
//! not taken for gone because its lease stopped while the outage kept its agent from writing it:
//! agents need a moment to reconnect, and meanwhile their users must not be sent to a new session
//! elsewhere. (A request can reach the database before the health monitor has seen it back: it
//! is answered with the outage's cutoff too.) The agents' writes failing while the database
//! still answers the monitor (a table locked by another client, a starved connection pool)
//! count as such an outage for the leases, from the last write that went through.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

/// One kind of outage: whether it is on, when the last one began and when it ended.
#[derive(Debug)]
struct Outage {
    up: AtomicBool,
    /// When the last outage began (ms since the epoch; 0: never).
    down_since: AtomicI64,
    /// When it ended.
    back_at: AtomicI64,
}

impl Default for Outage {
    fn default() -> Self {
        Outage {
            up: AtomicBool::new(true),
            down_since: AtomicI64::new(0),
            back_at: AtomicI64::new(0),
        }
    }
}

impl Outage {
    /// It began at `since` — or, when that is within `timeout` of the last one's end (the
    /// database was back for moments: a restart that failed again), the last one goes on, from
    /// its own beginning: machines whose agents had no time to write their leases while it was
    /// back keep counting.
    fn began(&self, since: i64, timeout: i64) {
        if self.up.swap(false, Ordering::Relaxed) {
            let last = self.down_since.load(Ordering::Relaxed);
            let back_at = self.back_at.load(Ordering::Relaxed);
            let start = if last != 0 && since < back_at + timeout {
                last
            } else {
                since
            };
            self.down_since.store(start, Ordering::Relaxed);
        }
    }

    /// Whether it was on (and so ended now).
    fn ended(&self, now: i64) -> bool {
        let was_down = !self.up.swap(true, Ordering::Relaxed);
        if was_down {
            self.back_at.store(now, Ordering::Relaxed);
        }
        was_down
    }

    /// The oldest lease counted alive at `now` as far as this outage goes: `now - timeout`,
    /// but during it and for one timeout after it, a lease fresh as it began.
    fn lease_cutoff(&self, now: i64, timeout: i64) -> i64 {
        let normal = now - timeout;
        let down_since = self.down_since.load(Ordering::Relaxed);
        if down_since == 0 {
            return normal;
        }
        if !self.up.load(Ordering::Relaxed) {
            return normal.min(down_since - timeout);
        }
        let back_at = self.back_at.load(Ordering::Relaxed);
        if now < back_at + timeout {
            normal.min(down_since - timeout)
        } else {
            normal
        }
    }
}

/// How long after the database is back a new logon waits for agents to resync what their
/// machines did while it was away (they are told to come back within a second): a session
/// opened then is not a new user's.
pub const SETTLE_AFTER_OUTAGE: Duration = Duration::from_millis(1500);

#[derive(Debug)]
pub struct Reachability {
    /// The agents' heartbeat timeout (ms): how long after an outage its leases still count.
    timeout: i64,
    /// Until when (ms since the epoch) new logons wait after an outage.
    settle_until: AtomicI64,
    /// A request is asking the database whether it is back (one at a time).
    probing: AtomicBool,
    /// The database not answering the health monitor.
    database: Outage,
    /// The agents' writes failing though the database answers (a table locked by another
    /// client, a connection pool starved): leases stop as surely as in an outage.
    writes: Outage,
    /// How many times the database came back: agent streams ask their agents for a RESYNC
    /// at each (a database that crashed may have lost commits it had acknowledged).
    returns: tokio::sync::watch::Sender<u64>,
    /// When the database server last seen started (0: not seen yet).
    server_started: AtomicI64,
}

impl Default for Reachability {
    /// With the default heartbeat timeout (15 s).
    fn default() -> Self {
        Reachability::new(Duration::from_secs(15))
    }
}

impl Reachability {
    /// For agents whose machines time out after `heartbeat_timeout` of silence.
    pub fn new(heartbeat_timeout: Duration) -> Self {
        Reachability {
            timeout: heartbeat_timeout.as_millis() as i64,
            settle_until: AtomicI64::new(0),
            probing: AtomicBool::new(false),
            database: Outage::default(),
            writes: Outage::default(),
            returns: tokio::sync::watch::Sender::new(0),
            server_started: AtomicI64::new(0),
        }
    }

    /// Changes each time the database comes back after an outage.
    pub fn returns(&self) -> tokio::sync::watch::Receiver<u64> {
        self.returns.subscribe()
    }

    pub fn is_up(&self) -> bool {
        self.database.up.load(Ordering::Relaxed)
    }

    /// The database stopped answering; it may have been away since `since` (the last check
    /// that found it up).
    pub fn went_away(&self, since: i64) {
        self.database.began(since, self.timeout);
    }

    /// The database answers again at `now` (seen by the health monitor, or by a request that
    /// asked it first: the first to see it says when).
    pub fn came_back(&self, now: i64) {
        if self.database.ended(now) {
            self.settle_from(now);
            self.returns.send_modify(|returns| *returns += 1);
        }
    }

    /// The database server answering at `now` started at `started` (see
    /// `Store::server_started_at`). Another start than the last one seen is a server that
    /// restarted, or another that took over, between two looks (a crash and a quick restart
    /// that no health check saw away): it may have lost commits it had acknowledged, so it is
    /// taken as a return (the agents asked for their sessions, new logons wait for them) —
    /// unless `after_outage`, a return already. Whether it was another start.
    pub fn server_seen(&self, started: i64, now: i64, after_outage: bool) -> bool {
        let known = self.server_started.swap(started, Ordering::Relaxed);
        let another = known != 0 && known != started;
        if another && !after_outage {
            self.settle_from(now);
            self.returns.send_modify(|returns| *returns += 1);
        }
        another
    }

    /// New logons wait [`SETTLE_AFTER_OUTAGE`] from `now` for the agents' resyncs.
    fn settle_from(&self, now: i64) {
        let settle = SETTLE_AFTER_OUTAGE.as_millis() as i64;
        self.settle_until.store(now + settle, Ordering::Relaxed);
    }

    /// Whether the caller may ask the database whether it is back (no one else is asking);
    /// it calls [`Reachability::probed`] when done.
    pub fn start_probe(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    pub fn probed(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// How much longer a new logon waits at `now` for agents to resync after an outage.
    pub fn settling(&self, now: i64) -> Option<Duration> {
        let left = self.settle_until.load(Ordering::Relaxed) - now;
        (left > 0).then(|| Duration::from_millis(left as u64))
    }

    /// The agents' writes fail for want of the database (unavailable, a lock or a connection
    /// waited for too long); the last one that went through committed at `last_written`.
    pub fn writes_failing(&self, last_written: i64) {
        self.writes.began(last_written, self.timeout);
    }

    /// The agents' writes go through again, at `now`.
    pub fn writes_pass(&self, now: i64) {
        self.writes.ended(now);
    }

    /// The broker starts at `now` on a store that knows no machine (a new database, or one
    /// lost and made again): the farm's agents are reconnecting with their sessions, so new
    /// logons wait [`SETTLE_AFTER_OUTAGE`] for their resyncs, as after an outage — a user
    /// whose session the store lost is not taken for a new user meanwhile.
    pub fn started_empty(&self, now: i64) {
        self.settle_from(now);
    }

    /// The broker starts at `now` on a database whose machines were last heard of at
    /// `last_heard` (by the broker that ran before, which may have been away much longer than
    /// a heartbeat timeout): taken as an outage of the database from then, so that a machine
    /// alive when the broker went counts alive for `grace` after the start, while its agent
    /// reconnects (with its backoff), and its users are sent back to it rather than to a
    /// second session elsewhere. With other replicas running, `last_heard` is about `now`:
    /// nothing changes.
    pub fn started_after(
        &self,
        last_heard: i64,
        now: i64,
        grace: Duration,
        heartbeat_timeout: Duration,
    ) {
        if last_heard <= 0 || last_heard >= now {
            return;
        }
        let timeout = heartbeat_timeout.as_millis() as i64;
        let grace = grace.as_millis() as i64;
        self.database
            .down_since
            .store(last_heard, Ordering::Relaxed);
        // The cutoff of the outage holds until `back_at + timeout`.
        self.database
            .back_at
            .store(now + grace - timeout, Ordering::Relaxed);
    }

    /// The oldest lease of a machine still counted alive at `now`: `now - heartbeat_timeout`,
    /// except during an outage (of the database, or of the agents' writes) and within one
    /// heartbeat timeout after it, when a lease that was fresh as the outage began still counts.
    pub fn lease_cutoff(&self, now: i64, heartbeat_timeout: Duration) -> i64 {
        let timeout = heartbeat_timeout.as_millis() as i64;
        self.database
            .lease_cutoff(now, timeout)
            .min(self.writes.lease_cutoff(now, timeout))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn another_server_start_between_two_looks_is_a_return() {
        let reachability = Reachability::default();
        let mut returns = reachability.returns();
        // The first look, and the same server again: nothing.
        assert!(!reachability.server_seen(1_000, 50_000, false));
        assert!(!reachability.server_seen(1_000, 55_000, false));
        assert!(!returns.has_changed().unwrap());
        assert_eq!(reachability.settling(55_000), None);
        // Restarted unseen: a return, new logons wait for the agents.
        assert!(reachability.server_seen(58_000, 60_000, false));
        assert!(returns.has_changed().unwrap());
        returns.mark_unchanged();
        assert!(reachability.settling(60_000).is_some());
        // Restarted during an outage the monitor saw: that return said it already.
        reachability.went_away(61_000);
        reachability.came_back(70_000);
        assert!(returns.has_changed().unwrap());
        returns.mark_unchanged();
        assert!(reachability.server_seen(69_000, 70_000, true));
        assert!(!returns.has_changed().unwrap());
    }

    use super::*;

    #[test]
    fn leases_stopped_by_an_outage_count_for_one_timeout_after_it() {
        let timeout = Duration::from_secs(15);
        let reachability = Reachability::default();
        assert_eq!(reachability.lease_cutoff(100_000, timeout), 85_000);
        // Away from 100 s (last found up) to 160 s.
        reachability.went_away(100_000);
        assert!(!reachability.is_up());
        // While it is away (a request may reach it before the monitor sees it back), too.
        assert_eq!(reachability.lease_cutoff(130_000, timeout), 85_000);
        reachability.came_back(160_000);
        assert!(reachability.is_up());
        // A machine last seen at 90 s (fresh when the outage began) still counts...
        assert_eq!(reachability.lease_cutoff(161_000, timeout), 85_000);
        assert_eq!(reachability.lease_cutoff(174_999, timeout), 85_000);
        // ...until one timeout after the database came back.
        assert_eq!(reachability.lease_cutoff(175_000, timeout), 160_000);
    }

    #[test]
    fn an_outage_again_moments_after_it_ended_goes_on_from_its_beginning() {
        let timeout = Duration::from_secs(15);
        let reachability = Reachability::new(timeout);
        // Away from 100 s; back at 120 s for half a second; away again from 120.5 s to 150 s.
        reachability.went_away(100_000);
        reachability.came_back(120_000);
        reachability.went_away(120_500);
        // A machine last seen at 90 s, whose agent did not get back in the half second.
        assert_eq!(reachability.lease_cutoff(140_000, timeout), 85_000);
        reachability.came_back(150_000);
        assert_eq!(reachability.lease_cutoff(164_999, timeout), 85_000);
        assert_eq!(reachability.lease_cutoff(165_000, timeout), 150_000);
        // Back for longer than a timeout: a new outage is counted from its own beginning.
        reachability.went_away(200_000);
        assert_eq!(reachability.lease_cutoff(210_000, timeout), 185_000);
    }

    #[test]
    fn machines_alive_when_the_broker_went_count_for_the_grace_after_it_starts() {
        let timeout = Duration::from_secs(15);
        let reachability = Reachability::default();
        // Machines last heard of at 100 s; the broker starts again at 200 s.
        reachability.started_after(100_000, 200_000, Duration::from_secs(30), timeout);
        assert!(reachability.is_up());
        assert_eq!(reachability.lease_cutoff(200_000, timeout), 85_000);
        assert_eq!(reachability.lease_cutoff(229_999, timeout), 85_000);
        assert_eq!(reachability.lease_cutoff(230_000, timeout), 215_000);
        // Other replicas kept the leases fresh: nothing changes.
        let busy = Reachability::default();
        busy.started_after(200_000, 200_000, Duration::from_secs(30), timeout);
        assert_eq!(busy.lease_cutoff(200_000, timeout), 185_000);
    }

    #[test]
    fn new_logons_wait_a_moment_after_the_database_is_back() {
        let reachability = Reachability::default();
        assert_eq!(reachability.settling(100_000), None);
        reachability.went_away(100_000);
        reachability.came_back(160_000);
        // Seen back a second time (the monitor after a request): the first sighting counts.
        reachability.came_back(160_400);
        assert_eq!(
            reachability.settling(160_500),
            Some(SETTLE_AFTER_OUTAGE - Duration::from_millis(500))
        );
        assert_eq!(reachability.settling(162_000), None);
        assert!(reachability.start_probe());
        assert!(!reachability.start_probe(), "one probe at a time");
        reachability.probed();
        assert!(reachability.start_probe());
        // A broker's start after others were away is no return of the database.
        let started = Reachability::default();
        started.started_after(
            100_000,
            200_000,
            Duration::from_secs(30),
            Duration::from_secs(15),
        );
        assert_eq!(started.settling(200_000), None);
        // A start on a store that knows no machine waits for the agents as after an outage.
        let empty = Reachability::default();
        empty.started_empty(300_000);
        assert_eq!(empty.settling(300_000), Some(SETTLE_AFTER_OUTAGE));
        assert_eq!(empty.settling(301_500), None);
    }

    #[test]
    fn leases_stopped_by_failing_writes_count_as_in_an_outage() {
        let timeout = Duration::from_secs(15);
        let reachability = Reachability::default();
        // The last write went through at 100 s; writes fail from then to 140 s.
        reachability.writes_failing(100_000);
        // A later failure does not move the start.
        reachability.writes_failing(120_000);
        assert!(reachability.is_up(), "the database answers");
        assert_eq!(reachability.lease_cutoff(130_000, timeout), 85_000);
        reachability.writes_pass(140_000);
        assert_eq!(reachability.lease_cutoff(154_999, timeout), 85_000);
        assert_eq!(reachability.lease_cutoff(155_000, timeout), 140_000);
        // Passing writes with no failure change nothing.
        reachability.writes_pass(160_000);
        assert_eq!(reachability.lease_cutoff(160_000, timeout), 145_000);
    }
}
