//! A broker started with an expired certificate: every client refuses it, so the broker says so
//! at start (an error naming the file and the date) and its health check fails with the same
//! words rather than answering SERVING; a renewed certificate is taken up and clears both. One
//! that expires while the broker runs is said when it does, not only at the next start.

use tsbroker_tests::binaries::workspace_binary;
use tsbroker_tests::process::{LogFile, free_port};
use tsbroker_tests::tls::{CertifiedKey, TestCa};

use crate::tls::{ServingBroker, start_broker, tls_flags, wait_until_serving};

/// common/testdata/README.md says what they are: valid in January 2020 only.
const EXPIRED_CERT: &str = include_str!("../../../common/testdata/expired-localhost.pem");
const EXPIRED_KEY: &str = include_str!("../../../common/testdata/expired-localhost.key");

/// `tsbroker --health-check` with `flags`: its exit code and standard error.
async fn health_check(listen: &str, flags: &[String]) -> (Option<i32>, String) {
    let output = tokio::process::Command::new(workspace_binary("tsbroker"))
        .args(["--listen", listen, "--health-check"])
        .args(flags)
        .output()
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_said_at_start_and_fails_the_health_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let ca = TestCa::new(dir.path(), "farm-ca");
    let installed = CertifiedKey {
        cert: path("broker.pem"),
        key: path("broker.key"),
    };
    std::fs::write(&installed.cert, EXPIRED_CERT).unwrap();
    std::fs::write(&installed.key, EXPIRED_KEY).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let flags = tls_flags(&installed, &ca.cert());
    let log = LogFile::create(&path("broker.log"));
    let _broker = start_broker(&listen, &path("broker.db"), &flags, &log);
    let expired = format!(
        "--tls-cert {}: the certificate expired at 2020-02-01T00:00:00Z",
        installed.cert.display()
    );
    assert!(
        log.wait_for(&expired, 1, std::time::Duration::from_secs(20), None)
            .await,
        "{}",
        log.tail(20)
    );
    assert!(
        log.lines_with(&expired)[0].contains("ERROR"),
        "{}",
        log.tail(20)
    );
    let (code, stderr) = health_check(&listen, &flags).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&expired) && stderr.contains("peers refuse it"),
        "{stderr}"
    );

    // Renewed in place: served from the next handshake, and the check passes again.
    let renewed = ca.server("renewed");
    std::fs::copy(&renewed.cert, &installed.cert).unwrap();
    std::fs::copy(&renewed.key, &installed.key).unwrap();
    wait_until_serving(&listen, &flags).await;
    assert_eq!(log.count("expired at"), 1, "{}", log.tail(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_while_the_broker_runs_is_said_when_it_does() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "farm-ca");
    let not_after = std::time::SystemTime::now() + std::time::Duration::from_secs(12);
    let installed = ca.server_until("broker", not_after);
    let ServingBroker {
        listen, flags, log, ..
    } = &ServingBroker::start(dir.path(), &installed, &ca.cert()).await;
    let file = format!("--tls-cert {}: the certificate", installed.cert.display());
    let soon = log.lines_with(&format!("{file} expires at"));
    assert_eq!(soon.len(), 1, "{}", log.tail(20));
    assert!(soon[0].contains("WARN"), "{}", soon[0]);
    // The broker looks at its files every 10 s: the end is said within that of coming.
    let expired = format!("{file} expired at");
    assert!(
        log.wait_for(&expired, 1, std::time::Duration::from_secs(40), None)
            .await,
        "{}",
        log.tail(20)
    );
    assert!(log.lines_with(&expired)[0].contains("ERROR"));
    let (code, stderr) = health_check(listen, flags).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(log.count("expired at"), 1, "said once, not at every look");
}
