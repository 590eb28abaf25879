//! A target that takes the TCP connection and ends it on the request without answering refused
//! the machine's part (its RDP service is down behind a front door) — unless the request is
//! one no RDP client sends: then the target refused that request, and the machine is not left
//! out of placements (a stranger's odd bytes must not keep new logons off healthy machines).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;

/// A server that reads a connection's first bytes and closes it unanswered, as an RDP service
/// does with a request it refuses; counts the connections it closed.
async fn closer() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let counted = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut first = [0u8; 512];
            let _ = stream.read(&mut first).await;
            counted.fetch_add(1, Ordering::SeqCst);
        }
    });
    (address, closed)
}

/// A TPKT packet carrying an X.224 Connection Request with `variable` as its variable part.
fn raw_request(variable: &[u8]) -> Vec<u8> {
    let total = u16::try_from(11 + variable.len()).unwrap();
    let mut packet = vec![3, 0];
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[
        u8::try_from(6 + variable.len()).unwrap(),
        0xE0,
        0,
        0,
        0,
        0,
        0,
    ]);
    packet.extend_from_slice(variable);
    packet
}

fn requests(harness: &Harness) -> Vec<pb::RedirectRequest> {
    harness
        .fake
        .with(|state| std::mem::take(&mut state.redirect_requests))
}

#[tokio::test]
async fn a_target_ending_an_odd_request_refuses_the_request_not_the_machine() {
    let mut harness = harness(Vec::new(), true).await;
    let (closing, closed) = closer().await;
    let (other_address, mut other) = echo_server().await;
    let odd_requests = [
        // No space after the colon: an unrecognized cookie line.
        build_connection_request(Some("Cookie:mstshash=evil"), Some(3)),
        // A second cookie line after the first: unknown bytes after the request.
        raw_request(b"Cookie: mstshash=evil\r\nCookie: mstshash=again\r\n"),
    ];
    for odd in &odd_requests {
        harness.place_on_then_on(&closing.to_string(), &other_address.to_string());
        let (_, back) = exchange(harness.front_door, odd).await;
        assert!(back.is_empty(), "{back:?}");
        nothing(&mut other).await;
        nothing(&mut harness.local).await;
        let asked = requests(&harness);
        assert_eq!(
            asked.len(),
            1,
            "placed again without the machine: {asked:?}"
        );
    }
    assert_eq!(closed.load(Ordering::SeqCst), 2);

    // The request RDP clients send, ended the same way: that machine refused, and the new
    // logon goes to the next candidate with it left out.
    harness.place_on_then_on(&closing.to_string(), &other_address.to_string());
    let usual = build_connection_request(Some("Cookie: mstshash=bob"), Some(3));
    exchange(harness.front_door, &usual).await;
    assert!(next(&mut other).await.ends_with(&usual));
    let asked = requests(&harness);
    assert_eq!(asked.len(), 2);
    assert_eq!(
        asked[1].exclude_machine_ids,
        [machine_id(FARM, "ts2.example").to_string()]
    );
    harness.shutdown.cancel();
}

#[tokio::test]
async fn this_machines_service_ending_an_odd_request_is_not_left_out_either() {
    let (closing, closed) = closer().await;
    let harness = harness_with_local(closing.to_string()).await;
    let (third_address, mut third) = echo_server().await;
    let place_here_then_there = || {
        let here = answer(
            NAME,
            &harness.front_door.to_string(),
            pb::RedirectReason::LoadBalanced,
        );
        let there = answer(
            "ts3.example",
            &third_address.to_string(),
            pb::RedirectReason::LoadBalanced,
        );
        harness
            .fake
            .with(|state| state.queued_answers = [Ok(here), Ok(there)].into());
    };
    place_here_then_there();
    let odd = build_connection_request(Some("Cookie: mstshash="), Some(3));
    let (_, back) = exchange(harness.front_door, &odd).await;
    assert!(back.is_empty(), "{back:?}");
    nothing(&mut third).await;
    assert_eq!(requests(&harness).len(), 1);
    assert_eq!(closed.load(Ordering::SeqCst), 1);

    place_here_then_there();
    let usual = build_connection_request(Some("Cookie: mstshash=bob"), Some(3));
    exchange(harness.front_door, &usual).await;
    assert!(next(&mut third).await.ends_with(&usual));
    let asked = requests(&harness);
    assert_eq!(asked.len(), 2);
    assert_eq!(
        asked[1].exclude_machine_ids,
        [machine_id(FARM, NAME).to_string()]
    );
    harness.shutdown.cancel();
}
