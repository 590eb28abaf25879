//! An agent's clock against the broker's (the database server's, on PostgreSQL), measured with
//! the time each of its messages says it was sent (`AgentMessage.sent_at`). A session's logon
//! time is the agent's, and it decides which of a user's disconnected sessions is the newest,
//! the one a returning user is sent to: a machine whose clock is off has its logon times
//! corrected by the difference, is warned about, and is counted in `tsbroker_agent_clocks_off`.
//! A message's transit and the broker's queue only ever make the agent look behind: a clock a
//! second or more ahead is taken from one measure, one behind only when it is 5 s or more so in
//! every one of the last [`SAMPLES`] (a broker overloaded for a moment, all its agents' messages
//! late, must not shift every logon time). No logon time is taken from the future either (an
//! agent too old to send its time, a clock that jumped ahead). A machine's last measures are
//! kept when its stream ends and taken up by its next one (`ClockMemory`): a clock still behind
//! dates that stream's RESYNC right at once, one set right in between shows in its first measure.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use uuid::Uuid;

/// Each machine's measures when its last stream ended, for its next one (on this broker).
#[derive(Default)]
pub struct ClockMemory(Mutex<HashMap<Uuid, VecDeque<i64>>>);

/// How far ahead an agent's clock may be and still be taken as agreeing: logons a second apart
/// on two machines are not told apart anyway.
const AHEAD_TOLERANCE_MS: i64 = 1_000;
/// How far behind: more, since every measure holds the message's time in transit and queued.
const BEHIND_TOLERANCE_MS: i64 = 5_000;
/// Measures kept; the smallest is the offset (transit and queueing only ever add to one).
const SAMPLES: usize = 8;
/// A machine still off is warned about again after this.
const WARN_AGAIN: Duration = Duration::from_secs(3600);

/// What the log should say after a measure.
#[derive(Debug, PartialEq, Eq)]
pub enum ClockNews {
    /// The machine's clock is off by this much (broker's minus the agent's, milliseconds):
    /// newly, by another second or more than was said, or for another hour.
    Off(i64),
    /// Its clock agrees with the broker's again.
    Agrees,
}

/// One stream's measures of its agent's clock.
pub struct AgentClock {
    /// The latest measures (the broker's time of arrival minus the agent's of sending).
    samples: VecDeque<i64>,
    /// What logon times are corrected by: 0 while within the tolerances.
    offset_ms: i64,
    /// The offset last said, and when.
    said: Option<(i64, Instant)>,
    /// Streams whose agent's clock is off: this one while it is.
    clocks_off: Gauge,
    /// The machine, once its ADDED named it, and where its measures go at the end (once the
    /// broker took that ADDED: a stream refused the name leaves nothing for the machine's).
    machine: Option<Uuid>,
    memory: Arc<ClockMemory>,
    keep: bool,
}

impl AgentClock {
    pub fn new(clocks_off: Gauge, memory: Arc<ClockMemory>) -> Self {
        AgentClock {
            samples: VecDeque::new(),
            offset_ms: 0,
            said: None,
            clocks_off,
            machine: None,
            memory,
            keep: false,
        }
    }

    /// The broker took the stream's ADDED: its measures are the machine's.
    pub fn keep_for_next_stream(&mut self) {
        self.keep = true;
    }

    /// The stream is `machine`'s: its last stream's measures are taken up, before this one's.
    pub fn machine(&mut self, machine: Uuid) {
        if self.machine.replace(machine).is_some() {
            return;
        }
        // Copied, not taken: a stream refused the name must not erase the machine's.
        let previous = self
            .memory
            .0
            .lock()
            .ok()
            .and_then(|memory| memory.get(&machine).cloned());
        if let Some(mut previous) = previous {
            previous.extend(self.samples.drain(..));
            while previous.len() > SAMPLES {
                previous.pop_front();
            }
            self.samples = previous;
        }
    }

    /// Takes a message sent at `sent_at_ms` by the agent's clock and heard at `now_ms` by the
    /// broker's; what to say about the clock, if anything.
    pub fn heard(&mut self, sent_at_ms: i64, now_ms: i64) -> Option<ClockNews> {
        if self.samples.len() == SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(now_ms.saturating_sub(sent_at_ms));
        let measured = self.samples.iter().copied().min().unwrap_or(0);
        let was_off = self.offset_ms != 0;
        let ahead = measured <= -AHEAD_TOLERANCE_MS;
        let behind = measured >= BEHIND_TOLERANCE_MS && self.samples.len() == SAMPLES;
        self.offset_ms = if ahead || behind { measured } else { 0 };
        match (was_off, self.offset_ms != 0) {
            (false, true) => {
                self.clocks_off.inc();
            }
            (true, false) => {
                self.clocks_off.dec();
            }
            _ => {}
        }
        match self.said {
            None if self.offset_ms != 0 => {}
            Some(_) if self.offset_ms == 0 => {
                self.said = None;
                return Some(ClockNews::Agrees);
            }
            Some((said, at))
                if self.offset_ms.saturating_sub(said).saturating_abs() >= AHEAD_TOLERANCE_MS
                    || at.elapsed() >= WARN_AGAIN => {}
            _ => return None,
        }
        self.said = Some((self.offset_ms, Instant::now()));
        Some(ClockNews::Off(self.offset_ms))
    }

    /// A logon time by the agent's clock (milliseconds since the epoch), by the broker's:
    /// corrected by the offset, and never after `now_ms`.
    pub fn logon_time(&self, logon_ms: Option<i64>, now_ms: i64) -> Option<i64> {
        logon_ms.map(|logon| logon.saturating_add(self.offset_ms).min(now_ms))
    }
}

impl Drop for AgentClock {
    fn drop(&mut self) {
        if self.offset_ms != 0 {
            self.clocks_off.dec();
        }
        if let (Some(machine), true, Ok(mut memory)) =
            (self.machine, self.keep, self.memory.0.lock())
        {
            memory.insert(machine, std::mem::take(&mut self.samples));
        }
    }
}

/// How a machine's clock news reads in the log.
pub fn say(machine: &str, news: ClockNews) {
    match news {
        ClockNews::Off(offset_ms) => {
            let direction = if offset_ms < 0 { "ahead of" } else { "behind" };
            tracing::warn!(
                machine,
                ahead_seconds = -(offset_ms as f64) / 1000.0,
                "this machine's clock is {:.1} s {direction} the broker's: its sessions' logon \
                 times (which decide a returning user's newest session) are corrected by it, \
                 but keep its clock synchronized (NTP): front doors refuse signed PROXY headers \
                 more than 120 s off",
                offset_ms.unsigned_abs() as f64 / 1000.0
            );
        }
        ClockNews::Agrees => {
            tracing::info!(
                machine,
                "this machine's clock agrees with the broker's again"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn a_clock_within_a_second_is_taken_as_it_is() {
        let gauge = Gauge::default();
        let mut clock = AgentClock::new(gauge.clone(), Arc::default());
        assert_eq!(clock.heard(NOW - 300, NOW), None);
        assert_eq!(clock.heard(NOW + 900, NOW), None);
        assert_eq!(gauge.get(), 0);
        assert_eq!(clock.logon_time(Some(NOW - 5_000), NOW), Some(NOW - 5_000));
        // Never in the future, however it came.
        assert_eq!(clock.logon_time(Some(NOW + 700), NOW), Some(NOW));
        assert_eq!(clock.logon_time(None, NOW), None);
    }

    #[test]
    fn a_clock_off_is_said_corrected_for_and_counted() {
        let gauge = Gauge::default();
        let mut clock = AgentClock::new(gauge.clone(), Arc::default());
        let two_hours = 7_200_000;
        // Two hours ahead; the quickest message is the measure (queueing only adds).
        assert_eq!(
            clock.heard(NOW + two_hours, NOW + 40),
            Some(ClockNews::Off(-two_hours + 40))
        );
        assert_eq!(clock.heard(NOW + two_hours + 100, NOW + 100), None);
        assert_eq!(gauge.get(), 1);
        assert_eq!(
            clock.logon_time(Some(NOW + two_hours - 60_000), NOW),
            Some(NOW - 60_000)
        );
        // Said again when it moves by a second or more.
        let mut later = None;
        for step in 0..SAMPLES as i64 {
            later = later.or(clock.heard(NOW + two_hours / 2 + step, NOW + step));
        }
        assert_eq!(later, Some(ClockNews::Off(-two_hours / 2)));
        // Set right: said once, no longer counted, logon times as sent.
        let mut back = Vec::new();
        for step in 0..SAMPLES as i64 {
            back.extend(clock.heard(NOW + step, NOW + step + 5));
        }
        assert_eq!(back, [ClockNews::Agrees]);
        assert_eq!(gauge.get(), 0);
        assert_eq!(clock.logon_time(Some(NOW - 10), NOW), Some(NOW - 10));
        // Behind: taken only when every one of a full window of measures says so.
        for _ in 0..SAMPLES - 1 {
            assert_eq!(clock.heard(NOW - 5_000, NOW), None);
        }
        assert_eq!(
            clock.heard(NOW - 5_000, NOW + 20),
            Some(ClockNews::Off(5_000))
        );
        assert_eq!(gauge.get(), 1);
        assert_eq!(
            clock.logon_time(Some(NOW - 65_000), NOW),
            Some(NOW - 60_000)
        );
        // The stream ends: no longer counted.
        drop(clock);
        assert_eq!(gauge.get(), 0);
    }

    /// A machine's next stream starts from its last one's measures: still behind, its RESYNC
    /// is dated right from the first message; set right meanwhile, that shows at once.
    #[test]
    fn a_machines_next_stream_takes_up_its_last_measures() {
        let memory = Arc::new(ClockMemory::default());
        let gauge = Gauge::default();
        let machine = Uuid::from_u128(7);
        // A stream the broker refused leaves nothing.
        let mut refused = AgentClock::new(gauge.clone(), memory.clone());
        refused.machine(machine);
        refused.heard(NOW + 7_200_000, NOW);
        drop(refused);
        let mut first = AgentClock::new(gauge.clone(), memory.clone());
        first.machine(machine);
        first.keep_for_next_stream();
        assert_eq!(first.heard(NOW - 10, NOW), None);
        for _ in 0..SAMPLES {
            first.heard(NOW - 7_200_000, NOW);
        }
        assert_eq!(gauge.get(), 1);
        drop(first);
        assert_eq!(gauge.get(), 0);

        let mut still_behind = AgentClock::new(gauge.clone(), memory.clone());
        still_behind.machine(machine);
        still_behind.keep_for_next_stream();
        assert_eq!(
            still_behind.heard(NOW - 7_200_000, NOW + 3),
            Some(ClockNews::Off(7_200_000))
        );
        assert_eq!(
            still_behind.logon_time(Some(NOW - 7_260_000), NOW),
            Some(NOW - 60_000)
        );
        drop(still_behind);

        let mut set_right = AgentClock::new(gauge.clone(), memory.clone());
        set_right.machine(machine);
        assert_eq!(set_right.heard(NOW, NOW + 3), None);
        assert_eq!(set_right.logon_time(Some(NOW - 10), NOW), Some(NOW - 10));
        assert_eq!(gauge.get(), 0);
        // Another machine starts afresh.
        let mut other = AgentClock::new(gauge.clone(), memory);
        other.machine(Uuid::from_u128(8));
        assert_eq!(other.heard(NOW - 7_200_000, NOW), None);
    }

    /// Whatever time a message claims (it comes from the network), nothing overflows.
    #[test]
    fn absurd_times_are_taken_without_overflow() {
        let mut clock = AgentClock::new(Gauge::default(), Arc::default());
        for sent_at in [i64::MAX, i64::MIN, 0, i64::MAX, i64::MIN] {
            clock.heard(sent_at, NOW);
            let logon = clock.logon_time(Some(i64::MIN), NOW);
            assert!(logon.is_some_and(|logon| logon <= NOW));
            assert!(clock.logon_time(Some(i64::MAX), NOW) <= Some(NOW));
        }
        for _ in 0..SAMPLES {
            clock.heard(i64::MIN, NOW);
        }
        clock.heard(i64::MAX, NOW);
    }

    #[test]
    fn late_messages_do_not_make_a_clock_behind() {
        let gauge = Gauge::default();
        let mut clock = AgentClock::new(gauge.clone(), Arc::default());
        // A broker busy for a while: the first messages (ADDED, RESYNC) arrive seconds late.
        assert_eq!(clock.heard(NOW - 9_000, NOW), None);
        assert_eq!(clock.heard(NOW - 7_000, NOW), None);
        for step in 0..SAMPLES as i64 {
            assert_eq!(clock.heard(NOW + step * 1000, NOW + step * 1000 + 30), None);
        }
        assert_eq!(gauge.get(), 0);
        assert_eq!(clock.logon_time(Some(NOW - 9_000), NOW), Some(NOW - 9_000));
    }
}
