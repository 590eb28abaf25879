//! The agent's `/metrics`, read over HTTP as Prometheus would, after front-door connections of
//! every outcome: each counted once by what became of it, the broker's answers timed and its
//! failures named, the bytes each way, and the link's and the session table's state.

use super::*;

/// The agent's Prometheus text.
async fn scrape(harness: &Harness) -> String {
    let address = harness.agent.metrics_addr.expect("metrics served");
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    text
}

/// The value of the sample named exactly `series` (its name and labels as exposed).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

#[tokio::test]
async fn front_door_connections_are_counted_by_what_became_of_them() {
    let mut harness = harness(Vec::new(), true).await;
    harness.connected().await;
    let (remote_address, mut remote) = echo_server().await;
    let (_, local_bytes) = request_with_tail(Some("Cookie: mstshash=alice"));

    // To this machine's RDP service, twice: the broker's choice, then its fallback when the
    // broker cannot answer.
    harness.answer_with(answer(
        NAME,
        &harness.front_door.to_string(),
        pb::RedirectReason::LoadBalanced,
    ));
    exchange(harness.front_door, &local_bytes).await;
    assert_eq!(next(&mut harness.local).await, local_bytes);
    harness
        .fake
        .with(|state| state.redirect_answer = Some(Err(tonic::Code::Unavailable)));
    exchange(harness.front_door, &local_bytes).await;
    assert_eq!(next(&mut harness.local).await, local_bytes);

    // To another machine.
    harness.answer_with(answer(
        "ts2.example",
        &remote_address.to_string(),
        pb::RedirectReason::LoadBalanced,
    ));
    let (_, remote_bytes) = request_with_tail(Some("Cookie: mstshash=bob"));
    exchange(harness.front_door, &remote_bytes).await;
    next(&mut remote).await;

    // Refused: the user's session is on a machine that does not take the connection.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_address = closed.local_addr().unwrap().to_string();
    drop(closed);
    harness.answer_with(answer(
        "ts2.example",
        &closed_address,
        pb::RedirectReason::ExistingSession,
    ));
    exchange(harness.front_door, &remote_bytes).await;

    // Not RDP.
    exchange(harness.front_door, b"GET / HTTP/1.1\r\n\r\n").await;

    // Connections end behind the clients' backs: wait until none is open.
    let mut text = scrape(&harness).await;
    for _ in 0..50 {
        if sample(&text, "tsagent_front_door_open_connections") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = scrape(&harness).await;
    }
    assert_eq!(sample(&text, "tsagent_front_door_open_connections"), 0.0);
    for (outcome, count) in [
        ("local", 2.0),
        ("remote", 1.0),
        ("refused", 1.0),
        ("bad_request", 1.0),
    ] {
        let series = format!("tsagent_front_door_connections_total{{outcome=\"{outcome}\"}}");
        assert_eq!(sample(&text, &series), count, "{outcome}");
    }
    // Four connections asked the broker; one answer was a failure.
    assert_eq!(
        sample(&text, "tsagent_front_door_redirect_seconds_count"),
        4.0
    );
    assert_eq!(
        sample(
            &text,
            "tsagent_front_door_redirect_failures_total{cause=\"Unavailable\"}"
        ),
        1.0
    );
    // The clients' bytes, first packets included, and the echoes back (the PROXY header the
    // remote machine got is the front door's, not the client's).
    let sent = 2 * local_bytes.len() + remote_bytes.len();
    assert_eq!(
        sample(
            &text,
            "tsagent_front_door_bytes_total{direction=\"from_client\"}"
        ),
        sent as f64
    );
    let echoed = sample(
        &text,
        "tsagent_front_door_bytes_total{direction=\"to_client\"}",
    );
    assert!(echoed >= (2 * local_bytes.len()) as f64, "{echoed}");

    // Read at the scrape: the link, the drain, the table.
    assert_eq!(sample(&text, "tsagent_broker_connected"), 1.0);
    assert_eq!(sample(&text, "tsagent_draining"), 0.0);
    assert_eq!(sample(&text, "tsagent_session_table_save_failing"), 0.0);
    // alice's session, disconnected since her connections ended.
    assert_eq!(
        sample(&text, "tsagent_sessions{state=\"disconnected\"}"),
        1.0
    );
    assert_eq!(sample(&text, "tsagent_sessions{state=\"active\"}"), 0.0);
    harness.shutdown.cancel();
}

/// A connection that waits in a full farm's queue (RESOURCE_EXHAUSTED, asked again every half
/// second) and then gets a machine is one answer, its wait included, and no failure.
#[tokio::test]
async fn a_wait_in_a_full_farms_queue_is_one_answer_not_failures() {
    let harness = harness(Vec::new(), true).await;
    harness.connected().await;
    let (remote_address, mut remote) = echo_server().await;
    harness.full_twice_then_on(&remote_address.to_string());
    let (_, bytes) = request_with_tail(Some("Cookie: mstshash=queued"));
    exchange(harness.front_door, &bytes).await;
    assert!(next(&mut remote).await.ends_with(&bytes));
    assert_eq!(harness.fake.with(|state| state.redirect_requests.len()), 3);
    let text = scrape(&harness).await;
    assert_eq!(
        sample(&text, "tsagent_front_door_redirect_seconds_count"),
        1.0
    );
    let waited = sample(&text, "tsagent_front_door_redirect_seconds_sum");
    assert!(waited >= 0.9, "{waited}");
    assert!(
        !text.contains("tsagent_front_door_redirect_failures_total{"),
        "{text}"
    );
    harness.shutdown.cancel();
}
