//! Riding out a broker restart. A `Redirect` that fails because the broker process is away (the
//! call never reached a broker: connection refused or broken; or the broker is still starting)
//! is asked again every [`RETRY_PAUSE`] within the redirect's time, as long as the absence is
//! younger than [`RIDE_OUT`]: a broker restarted by its service manager (kill and start again:
//! 2-3 s) then answers these clients, where sending them to this machine's RDP service would
//! give a returning user a second session, or put a new logon on a drained machine. Clients of
//! a broker away longer go to the local RDP service at once, as the design's fallback says.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tsbroker_common::proto::BROKER_STARTING_METADATA;

/// How long after the first failure clients are still held for the broker's return.
pub const RIDE_OUT: Duration = Duration::from_secs(10);
/// The pause between two attempts.
pub const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// When the broker was first found away, and when one last answered (shared by the front
/// door's connections).
#[derive(Debug, Default)]
pub struct BrokerAbsence {
    since: Mutex<Option<Instant>>,
    last_answer: Mutex<Option<Instant>>,
    /// A call's whole wait ran out with no answer, and none came since.
    unanswered: Mutex<bool>,
}

impl BrokerAbsence {
    /// A call found the broker away at `now`: whether it may ask again (the absence is younger
    /// than [`RIDE_OUT`]). The absence began when the agent's stream went down, when it is down
    /// (after a quiet hour, the first client need not wait for a broker gone for minutes), else
    /// now.
    pub fn away(&self, now: Instant, stream_down_since: Option<Instant>) -> bool {
        let mut since = self
            .since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let began = stream_down_since.filter(|&down| down <= now).unwrap_or(now);
        let start = *since.get_or_insert(began);
        now.saturating_duration_since(start) < RIDE_OUT
    }

    /// A broker answered (whatever it said): it is there.
    pub fn answered(&self) {
        *self
            .since
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        *self
            .last_answer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now());
        *self
            .unanswered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = false;
    }

    /// A call's whole wait ran out, with no answer from any broker.
    pub fn went_unanswered(&self) {
        *self
            .unanswered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = true;
    }

    /// Whether the brokers are silent, not slow: the agent's stream has been down for
    /// [`RIDE_OUT`] (since `stream_down_since`) and the last call that waited its whole time
    /// had no answer, none since. (Packets dropped on the way, as in a network partition, make
    /// no refused connection that [`BrokerAbsence::away`] would count.)
    pub fn silent(&self, now: Instant, stream_down_since: Option<Instant>) -> bool {
        let unanswered = *self
            .unanswered
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        unanswered
            && stream_down_since.is_some_and(|down| now.saturating_duration_since(down) >= RIDE_OUT)
    }

    /// Whether a broker answered one of the front door's calls within the last `moment`.
    pub fn answered_within(&self, moment: Duration) -> bool {
        self.last_answer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some_and(|at| at.elapsed() < moment)
    }
}

/// Whether `status` says no broker answered: an error below gRPC (tonic keeps it as the
/// status's source; a status a server sent has none), or a broker still starting.
pub fn broker_away(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_some()
        || status.metadata().contains_key(BROKER_STARTING_METADATA)
}

/// Whether `status` says this replica cannot answer now, so that another one is asked: no
/// broker answered ([`broker_away`]), or one did with its retry hint (its database away, or a
/// farm's lock held too long): another replica, on a database it reaches, may decide.
pub fn replica_cannot_answer(status: &tonic::Status) -> bool {
    broker_away(status)
        || (status.code() == tonic::Code::Unavailable
            && status
                .metadata()
                .contains_key(tsbroker_common::proto::RETRY_AFTER_MS_METADATA))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_absence_is_ridden_out_until_it_is_old_and_forgotten_once_a_broker_answers() {
        let absence = BrokerAbsence::default();
        let start = Instant::now();
        assert!(absence.away(start, None));
        assert!(absence.away(start + RIDE_OUT - Duration::from_millis(1), None));
        assert!(!absence.away(start + RIDE_OUT, None));
        absence.answered();
        // A new absence starts its own clock.
        assert!(absence.away(start + RIDE_OUT * 3, None));
    }

    #[test]
    fn an_absence_begins_when_the_agents_stream_went_down() {
        let absence = BrokerAbsence::default();
        let down = Instant::now();
        // The first client after a quiet 20 s: the broker has been away for longer than the
        // ride-out, so nobody waits.
        assert!(!absence.away(down + RIDE_OUT * 2, Some(down)));
        absence.answered();
        // The stream went down a moment ago: ridden out from then.
        assert!(absence.away(down + Duration::from_secs(1), Some(down)));
        assert!(!absence.away(down + RIDE_OUT, Some(down)));
    }

    #[test]
    fn brokers_are_silent_once_the_stream_is_long_down_and_a_call_went_unanswered() {
        let absence = BrokerAbsence::default();
        let down = Instant::now();
        let later = down + RIDE_OUT;
        assert!(
            !absence.silent(later, Some(down)),
            "no call has gone unanswered"
        );
        absence.went_unanswered();
        assert!(!absence.silent(down + Duration::from_secs(1), Some(down)));
        assert!(!absence.silent(later, None), "the stream is up");
        assert!(absence.silent(later, Some(down)));
        absence.answered();
        assert!(!absence.silent(later, Some(down)));
    }

    #[tokio::test]
    async fn a_refused_connection_and_a_starting_broker_are_away_and_a_broker_s_answer_is_not() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let channel = tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect_lazy();
        let mut broker = tsbroker_common::proto::v1::broker_client::BrokerClient::new(channel);
        let refused = broker
            .redirect(tsbroker_common::proto::v1::RedirectRequest::default())
            .await
            .unwrap_err();
        assert!(broker_away(&refused), "{refused:?}");

        let mut starting = tonic::Status::unavailable("broker starting");
        starting.metadata_mut().insert(
            BROKER_STARTING_METADATA,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        assert!(broker_away(&starting));
        // What a running broker says (no machine ready, its database away) is an answer.
        let nothing_ready = tonic::Status::unavailable("no machine is ready");
        assert!(!broker_away(&nothing_ready));
        // Of which its database away, with its retry hint, sends the question to another
        // replica; nothing ready is the farm's state, the same at every replica.
        let mut database_away = tonic::Status::unavailable("the broker's database is unavailable");
        database_away.metadata_mut().insert(
            tsbroker_common::proto::RETRY_AFTER_MS_METADATA,
            tonic::metadata::MetadataValue::from(1000u64),
        );
        assert!(!broker_away(&database_away));
        assert!(replica_cannot_answer(&database_away));
        assert!(!replica_cannot_answer(&nothing_ready));
        assert!(replica_cannot_answer(&refused));
    }
}
