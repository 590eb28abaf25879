//! A broker frozen for a moment (a paused VM, a stalled host) or busy, while its clients go on:
//! when it resumes it finds many streams reset before it took them, or an agent's stream full
//! of small messages it has not read. Neither may end the connection, which an agent's stream
//! shares with its front door's calls.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::agent_gateway_client::AgentGatewayClient;
use tsbroker_common::proto::v1::agent_message::Body;
use tsbroker_common::proto::v1::broker_client::BrokerClient;
use tsbroker_common::proto::v1::broker_message::Body as Reply;
use tsbroker_tests::fake_agent::machine;
use tsbroker_tests::process::{free_port, plain_broker_process, watch_health};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_given_up_while_the_broker_was_frozen_do_not_end_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut broker, log) = plain_broker_process(dir.path(), port).await;
    // A long-lived stream on the connection, as an agent's is.
    let (channel, mut watch) = watch_health(port).await;

    broker.signal("STOP");
    // Calls the client gives up on (a front door's Redirect waits 3 s), more than h2's
    // default allowance of 20 streams reset before the server took them.
    let calls: Vec<_> = (0..60)
        .map(|index| {
            let mut client = BrokerClient::new(channel.clone());
            tokio::spawn(async move {
                let request = pb::RedirectRequest {
                    farm: "default".into(),
                    user_name: format!("user{index}"),
                    ..Default::default()
                };
                let _ = tokio::time::timeout(Duration::from_millis(300), client.redirect(request))
                    .await;
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    broker.signal("CONT");

    // The stream is still there: nothing arrives (the broker stays SERVING), and no error.
    let next = tokio::time::timeout(Duration::from_secs(3), watch.message()).await;
    assert!(
        next.is_err(),
        "the long-lived stream ended when the broker resumed: {next:?}\n{}",
        log.tail(10)
    );
}

/// Thousands of small messages (a front door's burst of session events, one HTTP/2 frame each)
/// that a broker has not read yet: h2 ends a connection whose unread small frames cost more
/// than its budget for framing, and with hyper's default windows an agent's stream could hold
/// many times that budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stream_full_of_small_unread_messages_goes_on() {
    const MESSAGES: u64 = 6_000;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut broker, log) = plain_broker_process(dir.path(), port).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Room for one message: each is taken (and so framed) on its own, as a front door's
    // events are when they come one connection at a time.
    let (sender, receiver) = mpsc::channel(1);
    let mut replies = AgentGatewayClient::new(channel)
        .connect(ReceiverStream::new(receiver))
        .await
        .unwrap()
        .into_inner();
    let (acked, mut last_acked) = watch::channel(0u64);
    let reader = tokio::spawn(async move {
        loop {
            match replies.message().await {
                Ok(Some(pb::BrokerMessage {
                    body: Some(Reply::Ack(ack)),
                })) => {
                    let _ = acked.send(ack.seq);
                }
                Ok(Some(pb::BrokerMessage {
                    body: Some(Reply::Reject(reject)),
                })) => return format!("rejected: {reject:?}"),
                Ok(Some(_)) => {}
                Ok(None) => return "the broker ended the stream".to_owned(),
                Err(status) => return format!("the stream failed: {status}"),
            }
        }
    });
    let opening = [
        Body::Added(machine("ts-small", "default", 1)),
        Body::Resync(pb::SessionResync::default()),
        Body::Ready(pb::MachineReady {}),
    ];
    let mut seq = 0;
    for body in opening {
        seq += 1;
        sender
            .send(pb::AgentMessage {
                seq,
                sent_at: None,
                body: Some(body),
            })
            .await
            .unwrap();
    }
    wait_for_ack(&mut last_acked, seq, Duration::from_secs(10)).await;

    broker.signal("STOP");
    let producer = tokio::spawn(async move {
        for seq in seq + 1..=seq + MESSAGES {
            let load = pb::LoadReport {
                session_count: 1,
                ..Default::default()
            };
            let message = pb::AgentMessage {
                seq,
                sent_at: None,
                body: Some(Body::Load(load)),
            };
            if sender.send(message).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        sender
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.signal("CONT");

    let last = seq + MESSAGES;
    let reached = matches!(
        tokio::time::timeout(
            Duration::from_secs(60),
            last_acked.wait_for(|acked| *acked >= last),
        )
        .await,
        Ok(Ok(_))
    );
    let acknowledged = *last_acked.borrow();
    let _sender = producer.await.unwrap();
    if !reached {
        let ended = match tokio::time::timeout(Duration::from_secs(2), reader).await {
            Ok(ended) => ended.unwrap(),
            Err(_) => "still open".to_owned(),
        };
        panic!(
            "acknowledged up to {} of {last}; stream: {ended}\n{}",
            acknowledged,
            log.tail(10)
        );
    }
}

async fn wait_for_ack(last_acked: &mut watch::Receiver<u64>, seq: u64, wait: Duration) {
    tokio::time::timeout(wait, last_acked.wait_for(|acked| *acked >= seq))
        .await
        .expect("acknowledged in time")
        .expect("stream open");
}
