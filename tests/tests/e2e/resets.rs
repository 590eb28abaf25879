//! A broker frozen for a moment (a paused VM, a stalled host) while its clients give up on
//! their calls: when it resumes it finds many streams reset before it took them. That must not
//! end the connection, which an agent's stream shares with its front door's calls.

use std::process::Command;
use std::time::Duration;

use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::broker_client::BrokerClient;
use tsbroker_tests::process::{broker_process, free_port, watch_health};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_given_up_while_the_broker_was_frozen_do_not_end_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (mut broker, log) = broker_process(dir.path(), port, |binary, args| {
        let mut command = Command::new(binary);
        command.args(args);
        command
    })
    .await;
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
