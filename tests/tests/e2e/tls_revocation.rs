//! Revoking a client certificate (`tsbroker --tls-client-crl`), as an operator does it: the
//! real binaries, a CA kept by the real `openssl ca`, the broker's list file replaced while it
//! runs, the machine removed with the real grpcurl.

use std::process::Command;
use std::time::Duration;

use tsbroker_tests::binaries::workspace_binary;
use tsbroker_tests::process::{LogFile, free_port};
use tsbroker_tests::spawn_agent::AgentProcess;
use tsbroker_tests::tls::TestCa;

use crate::support::eventually;
use crate::tls::{agent_args, broker_link, grpcurl, start_broker, tls_flags, wait_until_serving};

/// A broker with revocation lists refuses to start without a list from each client CA (one
/// of another CA's, a file with none), and serves with an empty one; once a machine's
/// certificate is revoked and the list file replaced, the running broker takes it up without a
/// restart: an operator's revoked certificate is refused at its next handshake (grpcurl), the
/// machine's stream, open since before, is cut and its agent's reconnections refused (and it
/// says why, whether it checks the broker with --broker-ca or the system's CAs), while the
/// farm's other machine keeps its stream; the operator then removes the machine. A list
/// that cannot be used (signed by another key) refuses new handshakes but cuts no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_without_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let ca = TestCa::new(dir.path(), "farm-ca");
    let server = ca.server("broker");
    let (ts1, ts2) = (
        ca.client("ts1", "ts1.tls.test"),
        ca.client("ts2", "ts2.tls.test"),
    );
    let (operator, auditor) = (
        ca.client("operator", "operator"),
        ca.client("auditor", "auditor"),
    );
    let ca_cert = ca.cert();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut flags = tls_flags(&server, &ca_cert);
    flags.push("--tls-client-crl".to_owned());

    // Lists that would refuse every client stop the broker, saying why.
    let foreign = TestCa::new(dir.path(), "other-ca").revocation_list("other.crl");
    std::fs::write(path("empty.crl"), "").unwrap();
    for (list, why) in [
        (
            &foreign,
            "no revocation list issued by certificate 1 of --tls-client-ca",
        ),
        (&path("empty.crl"), "no revocation list in it"),
    ] {
        let refused = Command::new(workspace_binary("tsbroker"))
            .args(["--listen", &listen, "--database-url"])
            .arg(format!("sqlite://{}", path("unused.db").display()))
            .args(&flags)
            .arg(list)
            .env_remove("TSBROKER_DATABASE_URL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "started with {list:?}");
        assert!(stderr.contains(why), "{stderr}");
    }

    // The file an operator's CA publishes to, replaced whole on each update.
    let installed = path("farm.crl");
    // Replaced whole, in one rename, as an operator's update should.
    let install = |list: &std::path::Path| {
        std::fs::copy(list, path("farm.crl.new")).unwrap();
        std::fs::rename(path("farm.crl.new"), &installed).unwrap();
    };
    install(&ca.revocation_list("farm-0.crl"));
    flags.push(installed.display().to_string());
    let log = LogFile::create(&path("broker.log"));
    let _broker = start_broker(&listen, &path("broker.db"), &flags, &log);
    wait_until_serving(&listen, &flags).await;
    assert!(
        log.text().contains("revocation checked"),
        "{}",
        log.tail(20)
    );
    // The health check needs only the broker's own files: a list being replaced (here, gone)
    // does not make a serving broker look down.
    let mut gone = flags.clone();
    *gone.last_mut().unwrap() = path("missing.crl").display().to_string();
    let check = Command::new(workspace_binary("tsbroker"))
        .args(["--listen", &listen, "--health-check"])
        .args(&gone)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&check.stdout).trim(),
        "SERVING",
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let spawn = |name: &str, cert: &tsbroker_tests::tls::CertifiedKey| {
        AgentProcess::spawn(
            &agent_args(
                port,
                &format!("{name}.tls.test"),
                &path(name),
                &[&ca_cert, &cert.cert, &cert.key],
                &[],
            ),
            &path(&format!("{name}.sock")),
            &path(&format!("{name}.log")),
        )
    };
    let mut first = spawn("ts1", &ts1);
    // ts2 trusts the broker through the system's CAs (no --broker-ca; SSL_CERT_FILE names
    // them), as with a broker certificate of a public CA.
    let mut second = AgentProcess::spawn_with_env(
        &agent_args(
            port,
            "ts2.tls.test",
            &path("ts2"),
            &[],
            &[
                "--tls-cert".to_owned(),
                ts2.cert.display().to_string(),
                "--tls-key".to_owned(),
                ts2.key.display().to_string(),
            ],
        ),
        &path("ts2.sock"),
        &path("ts2.log"),
        &[("SSL_CERT_FILE", &ca_cert)],
    );
    first.wait_until_connected(Duration::from_secs(30)).await;
    second.wait_until_connected(Duration::from_secs(30)).await;
    let list_machines = || crate::tls::list_machines(port, &ca_cert, &operator);
    let auditor_lists = || crate::tls::list_machines(port, &ca_cert, &auditor);
    let (code, listed) = auditor_lists().await;
    assert_eq!(code, 0, "{listed}");
    assert!(listed.contains("ts2.tls.test"), "{listed}");

    ca.revoke(&ts2.cert);
    ca.revoke(&auditor.cert);
    let renewed = ca.revocation_list("farm-1.crl");
    install(&renewed);
    // Taken up within the broker's file check (10 s), without a restart.
    eventually(25, || async { auditor_lists().await.0 != 0 }).await;
    assert!(log.text().contains("TLS files changed"), "{}", log.tail(20));
    eventually(5, || async {
        log.text().contains(
            "a client certificate was refused (said at most once a minute) peer=127.0.0.1",
        )
    })
    .await;
    assert!(log.text().contains("Revoked"), "{}", log.tail(20));
    let (code, listed) = list_machines().await;
    assert_eq!(
        code, 0,
        "the operator's certificate is not revoked: {listed}"
    );

    // The revoked machine's stream, open since before the revocation, is cut, and its agent's
    // reconnections are refused; the other machine's stream goes on.
    eventually(15, || async {
        log.text()
            .contains("connection cut: its client certificate is refused now")
            && broker_link(&second)
                .await
                .starts_with("broker: not connected")
    })
    .await;
    // Its agent's first reconnection, within a second of the cut, is refused: its stream went
    // down twice (the cut, the refusal), and the broker logged a revoked certificate since.
    eventually(20, || async {
        let text = log.text();
        let downs =
            second.log.count("broker stream down") + second.log.count("broker refuses this agent");
        downs >= 2
            && text
                .find("connection cut")
                .is_some_and(|cut| text[cut..].contains("Revoked"))
    })
    .await;
    // The agent says why, in its log and its status, and asks again only now and then (as for
    // a refused token): the broker's alert often comes after the client took the handshake
    // for done, and its next attempts then saw a closed connection only.
    let refused = second.log.lines_with("broker refuses this agent");
    assert!(
        refused
            .first()
            .is_some_and(|line| line.contains("CertificateRevoked")),
        "{}",
        second.log.tail(20)
    );
    assert!(
        broker_link(&second).await.contains("CertificateRevoked"),
        "{}",
        second.log.tail(20)
    );
    assert!(
        broker_link(&second)
            .await
            .starts_with("broker: not connected")
    );
    // (A grpcurl call with the auditor's certificate may have been open then, and cut too.)
    let cuts = log.text().matches("connection cut").count();
    assert!(broker_link(&first).await.starts_with("broker: connected"));
    assert_eq!(
        first.log.count("connected to the broker"),
        1,
        "ts1's stream was cut: {}",
        first.log.tail(20)
    );

    // The operator forgets the machine.
    let (code, removed) = grpcurl(
        port,
        &ca_cert,
        Some(&operator),
        Some(r#"{"machine": {"farm": "default", "machine_name": "ts2.tls.test"}, "force": true}"#),
        &["tsbroker.v1.Admin/RemoveMachine"],
    )
    .await;
    assert_eq!(code, 0, "{removed}");
    let (_, listed) = list_machines().await;
    assert!(listed.contains("ts1.tls.test"), "{listed}");
    assert!(!listed.contains("ts2.tls.test"), "{listed}");

    // A list under the CA's name but signed by another key (the CA made again): it settles no
    // certificate, so new handshakes are refused, saying why, but no open connection is cut.
    std::fs::create_dir(path("remade")).unwrap();
    let remade = TestCa::new(&path("remade"), "farm-ca").revocation_list("farm.crl");
    install(&remade);
    eventually(25, || async {
        log.text()
            .contains("open connections kept: the TLS files cannot settle")
    })
    .await;
    let (code, refused) = list_machines().await;
    assert_ne!(code, 0, "{refused}");
    eventually(5, || async {
        log.text()
            .contains("invalid certificate revocation list: BadSignature")
    })
    .await;
    assert_eq!(
        log.text().matches("connection cut").count(),
        cuts,
        "{}",
        log.tail(20)
    );
    assert!(broker_link(&first).await.starts_with("broker: connected"));
    assert_eq!(first.log.count("connected to the broker"), 1);
}
