//! Reading an agent's stream a batch at a time. Whatever has already arrived is taken at once
//! (its session events then go to the store as one run, one transaction). Session events that
//! follow one another closely — a front door handing thousands of connections a second to the
//! local RDP service, two events each — are also gathered for up to [`EVENT_GATHER`], so that
//! they share a transaction instead of each paying for its own (BENCHMARKS.md, twenty-fourth
//! run). An event after a quiet spell of [`EVENT_GATHER`] or more is never held back, and
//! other messages never start a gathering.

use futures::{FutureExt, Stream, StreamExt};
use std::time::Duration;
use tokio::time::Instant;
use tonic::Status;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::agent_message::Body;

/// Most messages taken from a stream at once.
pub const MAX_BATCH: usize = 256;
/// Session events closer together than this are gathered for up to this long.
pub const EVENT_GATHER: Duration = Duration::from_millis(2);

/// How the stream ended while a batch was being read.
#[derive(Debug)]
pub enum InboundEnd {
    /// The agent closed its side.
    Closed,
    /// The transport failed.
    Failed(Status),
}

/// An agent's stream of messages, read in batches.
pub struct Inbound<S> {
    stream: S,
    /// When the last batch that held session events was complete.
    last_events: Option<Instant>,
}

impl<S> Inbound<S>
where
    S: Stream<Item = Result<pb::AgentMessage, Status>> + Unpin,
{
    pub fn new(stream: S) -> Self {
        Inbound {
            stream,
            last_events: None,
        }
    }

    /// The next message as it arrives (`None`: the agent closed its side). Cancel-safe.
    pub async fn next(&mut self) -> Option<Result<pb::AgentMessage, Status>> {
        self.stream.next().await
    }

    /// Whether the stream's end arrives within `wait` (what comes before it is read and
    /// dropped: for a stream that is ending anyway).
    pub async fn ends_within(&mut self, wait: Duration) -> bool {
        tokio::time::timeout(wait, async {
            loop {
                match self.stream.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return,
                }
            }
        })
        .await
        .is_ok()
    }

    /// `first` and what has already arrived after it (up to [`MAX_BATCH`] messages), and when
    /// they hold session events that follow the previous ones closely, what arrives within
    /// [`EVENT_GATHER`]; plus how the stream ended if it ended meanwhile.
    pub async fn batch(
        &mut self,
        first: pb::AgentMessage,
    ) -> (Vec<pb::AgentMessage>, Option<InboundEnd>) {
        let began = Instant::now();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match self.stream.next().now_or_never() {
                Some(Some(Ok(message))) => batch.push(message),
                Some(None) => return (batch, Some(InboundEnd::Closed)),
                Some(Some(Err(status))) => return (batch, Some(InboundEnd::Failed(status))),
                None => break,
            }
        }
        if !batch.iter().any(is_event) {
            return (batch, None);
        }
        let follows = self
            .last_events
            .is_some_and(|last| began.duration_since(last) < EVENT_GATHER);
        let mut end = None;
        if follows {
            let deadline = began + EVENT_GATHER;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, self.stream.next()).await {
                    Err(_) => break,
                    Ok(Some(Ok(message))) => batch.push(message),
                    Ok(None) => {
                        end = Some(InboundEnd::Closed);
                        break;
                    }
                    Ok(Some(Err(status))) => {
                        end = Some(InboundEnd::Failed(status));
                        break;
                    }
                }
            }
        }
        self.last_events = Some(Instant::now());
        (batch, end)
    }
}

fn is_event(message: &pb::AgentMessage) -> bool {
    matches!(message.body, Some(Body::SessionEvent(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;

    type Sender = mpsc::UnboundedSender<Result<pb::AgentMessage, Status>>;

    fn inbound() -> (
        Sender,
        Inbound<UnboundedReceiverStream<Result<pb::AgentMessage, Status>>>,
    ) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (sender, Inbound::new(UnboundedReceiverStream::new(receiver)))
    }

    fn event(seq: u64) -> pb::AgentMessage {
        pb::AgentMessage {
            seq,
            sent_at: None,
            body: Some(Body::SessionEvent(pb::SessionEvent::default())),
        }
    }

    fn load(seq: u64) -> pb::AgentMessage {
        pb::AgentMessage {
            seq,
            sent_at: None,
            body: Some(Body::Load(pb::LoadReport::default())),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_end_that_comes_within_the_wait_is_seen() {
        let wait = Duration::from_millis(300);
        let (sender, mut open) = inbound();
        sender.send(Ok(load(1))).unwrap();
        later(&sender, Duration::from_millis(100), load(2));
        assert!(!open.ends_within(wait).await);
        let (sender, mut closing) = inbound();
        sender.send(Ok(load(1))).unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(sender);
        });
        assert!(closing.ends_within(wait).await);
        let (sender, mut failed) = inbound();
        sender.send(Err(Status::cancelled("reset"))).unwrap();
        assert!(failed.ends_within(wait).await);
    }

    fn seqs(batch: &[pb::AgentMessage]) -> Vec<u64> {
        batch.iter().map(|message| message.seq).collect()
    }

    /// Sends `message` after `delay`.
    fn later(sender: &Sender, delay: Duration, message: pb::AgentMessage) {
        let sender = sender.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = sender.send(Ok(message));
        });
    }

    #[tokio::test(start_paused = true)]
    async fn what_has_arrived_is_taken_at_once_and_a_lone_event_is_not_held() {
        let (sender, mut inbound) = inbound();
        sender.send(Ok(event(2))).unwrap();
        sender.send(Ok(load(3))).unwrap();
        later(&sender, Duration::from_millis(1), event(4));
        let start = Instant::now();
        let (batch, end) = inbound.batch(event(1)).await;
        assert_eq!(seqs(&batch), [1, 2, 3]);
        assert!(end.is_none());
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the first events are not held"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn events_in_quick_succession_are_gathered_for_a_while() {
        let (sender, mut inbound) = inbound();
        inbound.batch(event(1)).await;
        tokio::time::sleep(Duration::from_millis(1)).await;
        later(&sender, Duration::from_millis(1), event(3));
        later(&sender, Duration::from_millis(3), event(4));
        let start = Instant::now();
        let (batch, end) = inbound.batch(event(2)).await;
        assert_eq!(
            seqs(&batch),
            [2, 3],
            "what came within the window, not after"
        );
        assert!(end.is_none());
        assert_eq!(start.elapsed(), EVENT_GATHER);
        // The next one follows closely too; the stream closing ends the gathering.
        let first = inbound.next().await.unwrap().unwrap();
        drop(sender);
        let start = Instant::now();
        let (batch, end) = inbound.batch(first).await;
        assert_eq!(seqs(&batch), [4]);
        assert!(matches!(end, Some(InboundEnd::Closed)), "{end:?}");
        assert!(start.elapsed() < EVENT_GATHER);
    }

    #[tokio::test(start_paused = true)]
    async fn events_after_a_quiet_spell_and_other_messages_are_not_held() {
        let (sender, mut inbound) = inbound();
        inbound.batch(event(1)).await;
        tokio::time::sleep(EVENT_GATHER).await;
        later(&sender, Duration::from_millis(1), event(4));
        let start = Instant::now();
        let (batch, _) = inbound.batch(event(2)).await;
        assert_eq!(seqs(&batch), [2]);
        // A load report right after an event does not wait for more.
        let (batch, _) = inbound.batch(load(3)).await;
        assert_eq!(seqs(&batch), [3]);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_closing_while_gathering_ends_it_at_once() {
        let (sender, mut inbound) = inbound();
        inbound.batch(event(1)).await;
        later(&sender, Duration::ZERO, event(3));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            drop(sender);
        });
        let start = Instant::now();
        let (batch, end) = inbound.batch(event(2)).await;
        assert_eq!(seqs(&batch), [2, 3]);
        assert!(matches!(end, Some(InboundEnd::Closed)), "{end:?}");
        assert!(start.elapsed() < EVENT_GATHER, "not the whole window");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_while_gathering_is_reported_with_the_batch() {
        let (sender, mut inbound) = inbound();
        inbound.batch(event(1)).await;
        later(&sender, Duration::ZERO, event(3));
        let failing = sender.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            let _ = failing.send(Err(Status::unavailable("gone")));
        });
        let (batch, end) = inbound.batch(event(2)).await;
        assert_eq!(seqs(&batch), [2, 3]);
        assert!(matches!(end, Some(InboundEnd::Failed(_))), "{end:?}");
    }
}
