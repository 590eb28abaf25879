//! A TLS client that completes its handshake and then says nothing is closed as a silent TCP
//! connection is (10 s to begin HTTP/2): idle TLS connections cannot hold the broker's file
//! descriptors either. The real `tsbroker`, the real `openssl s_client` as the silent client.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tsbroker_tests::binaries::tool;
use tsbroker_tests::tls::TestCa;

use crate::tls::{ServingBroker, grpcurl};

/// `openssl s_client` connects and completes the handshake (it trusts the broker's CA), then
/// sends nothing: the broker closes the connection 10 s on, not at once and not never, and
/// says why in its log; an operator's call made meanwhile is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_silent_after_its_handshake_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "farm-ca");
    let server = ca.server("broker");
    let operator = ca.client("operator", "operator");
    let ServingBroker {
        port,
        listen,
        log: broker_log,
        ..
    } = &ServingBroker::start(dir.path(), &server, &ca.cert()).await;

    let mut silent = tokio::process::Command::new(tool("openssl", "apt-get install openssl"))
        .args(["s_client", "-brief", "-connect", listen, "-CAfile"])
        .arg(ca.cert())
        // Its standard input stays open and empty: it sends nothing after the handshake.
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run openssl s_client");
    let started = Instant::now();
    // Held open: `wait` would close it (and s_client would end at its end of input).
    let _input = silent.stdin.take();

    let (code, text) = grpcurl(
        *port,
        &ca.cert(),
        Some(&operator),
        None,
        &["grpc.health.v1.Health/Check"],
    )
    .await;
    assert!(
        code == 0 && text.contains("SERVING"),
        "an operator is served meanwhile: {text}"
    );

    let ended = tokio::time::timeout(Duration::from_secs(30), silent.wait()).await;
    let waited = started.elapsed();
    if ended.is_err() {
        let _ = silent.kill().await;
    }
    let mut said = String::new();
    if let Some(mut stderr) = silent.stderr.take() {
        let _ = stderr.read_to_string(&mut said).await;
    }
    assert!(
        ended.is_ok(),
        "still connected after {waited:?}: a silent client holds its connection\n{said}"
    );
    assert!(
        said.contains("CONNECTION ESTABLISHED"),
        "the handshake went through first: {said}"
    );
    assert!(
        waited >= Duration::from_secs(8),
        "closed after {waited:?}: a client has 10 s to begin\n{said}"
    );
    assert!(
        broker_log
            .wait_for(
                "did not begin HTTP/2 within 10s",
                1,
                Duration::from_secs(5),
                None
            )
            .await,
        "the broker says why it closed it: {}",
        broker_log.tail(20)
    );
}
