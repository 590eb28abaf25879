//! The copy loop's ending rules and the sockets' keepalive.

use std::io;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::{HALF_CLOSED_LINGER, both_ways, keep_alive};

#[tokio::test(start_paused = true)]
async fn a_side_kept_half_open_is_cut_after_the_linger() {
    let start = Instant::now();
    let ended = both_ways(
        async { Ok(()) },
        std::future::pending::<io::Result<()>>(),
        HALF_CLOSED_LINGER,
    )
    .await;
    assert!(ended.is_ok(), "{ended:?}");
    assert_eq!(start.elapsed(), HALF_CLOSED_LINGER);

    // Either side.
    let start = Instant::now();
    both_ways(
        std::future::pending::<io::Result<()>>(),
        async { Ok(()) },
        HALF_CLOSED_LINGER,
    )
    .await
    .unwrap();
    assert_eq!(start.elapsed(), HALF_CLOSED_LINGER);
}

#[tokio::test(start_paused = true)]
async fn both_sides_closing_end_the_copy_when_the_second_does() {
    let start = Instant::now();
    both_ways(
        async { Ok(()) },
        async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok(())
        },
        HALF_CLOSED_LINGER,
    )
    .await
    .unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn a_failing_side_ends_the_copy_at_once_with_its_error() {
    let start = Instant::now();
    let ended = both_ways(
        std::future::pending::<io::Result<()>>(),
        async { Err(io::Error::from(io::ErrorKind::ConnectionReset)) },
        HALF_CLOSED_LINGER,
    )
    .await;
    assert_eq!(ended.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn accepted_connections_inherit_the_listeners_keepalive() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    keep_alive(&listener);
    let _client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    let socket = socket2::SockRef::from(&accepted);
    assert!(socket.keepalive().unwrap());
    assert_eq!(socket.tcp_keepalive_time().unwrap(), super::KEEPALIVE_IDLE);
    assert_eq!(
        socket.tcp_keepalive_interval().unwrap(),
        super::KEEPALIVE_INTERVAL
    );
    assert_eq!(
        socket.tcp_keepalive_retries().unwrap(),
        super::KEEPALIVE_PROBES
    );
    assert_eq!(
        socket.tcp_user_timeout().unwrap(),
        Some(super::UNACKNOWLEDGED_LIMIT)
    );
}

#[test]
fn running_out_of_descriptors_is_the_agents_shortage_not_a_refusal() {
    use anyhow::Context;
    let out_of_descriptors: anyhow::Result<()> =
        Err(io::Error::from_raw_os_error(24)).context("connect to 10.0.0.2:3389");
    assert!(super::is_local_shortage(&out_of_descriptors.unwrap_err()));
    let refused: anyhow::Result<()> =
        Err(io::Error::from(io::ErrorKind::ConnectionRefused)).context("connect to 10.0.0.2:3389");
    assert!(!super::is_local_shortage(&refused.unwrap_err()));
}

/// A connected pair of TCP sockets on loopback.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connecting = TcpStream::connect(listener.local_addr().unwrap());
    let (connected, accepted) = tokio::join!(connecting, listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

#[tokio::test]
async fn what_a_connection_carried_counts_its_first_packet_and_the_targets_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client, mut client_side) = tcp_pair().await;
    let (upstream_side, mut target) = tcp_pair().await;
    let upstream = super::Upstream {
        stream: upstream_side,
        answer: vec![3; 19],
        request_len: 43,
    };
    let metrics = crate::metrics::AgentMetrics::default();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let spliced = tokio::spawn(async move {
        super::splice(
            &mut client_side,
            upstream,
            metrics.byte_counters(),
            &shutdown,
        )
        .await
    });
    let mut answer = [0; 19];
    client.read_exact(&mut answer).await.unwrap();
    client.write_all(&[1; 100]).await.unwrap();
    let mut relayed = [0; 100];
    target.read_exact(&mut relayed).await.unwrap();
    target.write_all(&[2; 7]).await.unwrap();
    let mut back = [0; 7];
    client.read_exact(&mut back).await.unwrap();
    drop(client);
    drop(target);
    let carried = spliced.await.unwrap();
    assert!(carried.error.is_none(), "{:?}", carried.error);
    assert_eq!(carried.from_client, 43 + 100);
    assert_eq!(carried.to_client, 19 + 7);
}
