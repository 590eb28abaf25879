//! A broker that answers slowly while it answers the front door's other calls is busy, not
//! away: a call past the front door's usual wait (3 s) waits on for its answer, where deciding
//! alone would send a returning user to a second session; a broker that answers nothing still
//! has its clients sent to the local RDP service after that wait.

use super::*;

#[tokio::test]
async fn a_busy_broker_is_waited_for_and_a_silent_one_is_not() {
    let mut harness = harness(Vec::new(), true).await;
    let (remote_address, mut remote) = echo_server().await;
    harness.answer_with(answer(
        "ts2.example",
        &remote_address.to_string(),
        pb::RedirectReason::ExistingSession,
    ));
    harness.fake.with(|state| {
        state.slow_users = vec!["slowpoke".to_owned()];
        state.slow_answer = Duration::from_secs(4);
    });

    // Other clients are answered at once meanwhile.
    let front_door = harness.front_door;
    let others = tokio::spawn(async move {
        let (_, bytes) = request_with_tail(Some("Cookie: mstshash=quick"));
        for _ in 0..25 {
            exchange(front_door, &bytes).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=slowpoke"));
    let started = tokio::time::Instant::now();
    exchange_waiting(harness.front_door, &bytes, Duration::from_secs(15)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(3900),
        "{:?}",
        started.elapsed()
    );
    others.await.unwrap();
    let mut slowpoke_went_remote = false;
    while let Ok(Some(seen)) = tokio::time::timeout(Duration::from_millis(100), remote.recv()).await
    {
        slowpoke_went_remote |= seen.ends_with(&bytes);
    }
    assert!(slowpoke_went_remote, "the busy broker's answer was taken");
    nothing(&mut harness.local).await;

    // Answered by nothing else: the usual wait, then this machine's RDP service.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = tokio::time::Instant::now();
    exchange_waiting(harness.front_door, &bytes, Duration::from_secs(15)).await;
    assert_eq!(next(&mut harness.local).await, bytes);
    assert!(
        started.elapsed() < Duration::from_millis(3900),
        "{:?}",
        started.elapsed()
    );
    harness.shutdown.cancel();
}
