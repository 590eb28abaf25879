//! tsagent for the end-to-end tests: agents started in-process (`tsagent::start`) with a
//! temporary state directory, the real `tsagent` binary as a process, the `tsagent` command
//! line that speaks to an agent's control socket, and the broker's view of a machine's
//! sessions in the same shape as the agent's `tsagent session list`.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tsagent::{AgentConfig, BackoffSettings, FrontDoorBind, RunningAgent};
use tsbroker_common::proto::v1 as pb;
use tsbroker_common::proto::v1::broker_client::BrokerClient;

use crate::binaries::workspace_binary;
use crate::process::{ChildGuard, LogFile};

/// How long a command of the `tsagent` CLI may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// A tsagent running in this process, stopped when dropped.
pub struct TestAgent {
    pub name: String,
    pub farm: String,
    pub control_socket: PathBuf,
    /// Where its front door listens, when it has one.
    pub front_door: Option<SocketAddr>,
    pub state_dir: PathBuf,
    agent: Option<RunningAgent>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

/// The agent configuration the tests start from: farm `default`, the broker at `broker_url`,
/// a fresh state directory, no front door, advertised at 127.0.0.1:9 (nothing listens there),
/// quick reconnects and refreshes.
pub fn agent_config(broker_url: &str, name: &str, state_dir: &Path) -> AgentConfig {
    let mut config = AgentConfig::new(name, state_dir);
    config.broker_url = broker_url.to_owned();
    config.advertise = "127.0.0.1:9".to_owned();
    config.backoff = BackoffSettings {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(1),
        healthy_after: Duration::from_secs(30),
    };
    config.default_heartbeat = Duration::from_secs(1);
    config.machine_refresh = Duration::from_secs(1);
    config
}

impl TestAgent {
    /// Starts an agent without a front door; `adjust` changes its configuration.
    pub async fn start(
        broker_url: &str,
        name: &str,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> TestAgent {
        let dir = tempfile::tempdir().expect("temporary directory");
        let state_dir = dir.path().join("state");
        let mut config = agent_config(broker_url, name, &state_dir);
        adjust(&mut config);
        Self::start_with(config, dir).await
    }

    /// Starts an agent whose front door listens on 127.0.0.1 (a port of its own, advertised)
    /// and hands local connections to `local_rdp`.
    pub async fn start_with_front_door(
        broker_url: &str,
        name: &str,
        local_rdp: &str,
        adjust: impl FnOnce(&mut AgentConfig),
    ) -> TestAgent {
        let dir = tempfile::tempdir().expect("temporary directory");
        let state_dir = dir.path().join("state");
        let mut config = agent_config(broker_url, name, &state_dir);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a front door");
        config.advertise = listener
            .local_addr()
            .expect("front door address")
            .to_string();
        config.front_door = Some(FrontDoorBind::Listener(listener));
        config.local_rdp = local_rdp.to_owned();
        adjust(&mut config);
        Self::start_with(config, dir).await
    }

    async fn start_with(config: AgentConfig, dir: tempfile::TempDir) -> TestAgent {
        // RUST_LOG set: the agents' (and the broker's) log goes to standard error.
        if std::env::var_os("RUST_LOG").is_some() {
            tsbroker_common::telemetry::init_logging(Default::default());
        }
        let name = config.machine_name.clone();
        let farm = config.farm.clone();
        let state_dir = config.state_dir.clone();
        let shutdown = CancellationToken::new();
        let agent = tsagent::start(config, shutdown.clone())
            .await
            .unwrap_or_else(|error| panic!("agent {name} did not start: {error:#}"));
        assert!(
            agent.wait_until_connected(Duration::from_secs(20)).await,
            "agent {name} did not connect to the broker: {:?}",
            agent.link_status()
        );
        TestAgent {
            name,
            farm,
            control_socket: agent.control_socket.clone(),
            front_door: agent.front_door_addr,
            state_dir,
            agent: Some(agent),
            shutdown,
            _dir: dir,
        }
    }

    pub fn running(&self) -> &RunningAgent {
        self.agent.as_ref().expect("agent running")
    }

    pub fn machine_id(&self) -> String {
        self.running().machine_id.to_string()
    }

    pub fn front_door_port(&self) -> u16 {
        self.front_door.expect("agent has a front door").port()
    }

    /// The agent's sessions, as its table holds them.
    pub fn sessions(&self) -> Vec<ListedSession> {
        let mut sessions: Vec<ListedSession> = self
            .running()
            .directory()
            .list()
            .iter()
            .map(|record| ListedSession {
                session_id: record.session_id,
                user: qualified(&record.domain, &record.user_name),
                state: match record.state {
                    tsagent::directory::RecordState::Active => "active",
                    tsagent::directory::RecordState::Disconnected => "disconnected",
                }
                .to_owned(),
            })
            .collect();
        sessions.sort();
        sessions
    }

    /// Runs `tsagent <args> --control-socket <its socket>` (the real binary).
    pub async fn cli(&self, args: &[&str]) -> String {
        tsagent_cli(args, &self.control_socket).await
    }

    /// Stops the agent (its stream closed; REMOVED with `leave_on_stop`) and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(agent) = self.agent.take() {
            let stopped = tokio::time::timeout(Duration::from_secs(15), agent.wait()).await;
            stopped
                .expect("agent stops in time")
                .expect("agent ran without error");
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `DOMAIN\user`, or `user` without a domain (how `tsagent session list` shows users).
pub fn qualified(domain: &str, user: &str) -> String {
    if domain.is_empty() {
        user.to_owned()
    } else {
        format!("{domain}\\{user}")
    }
}

/// Runs the real `tsagent` with `args` followed by `--control-socket <socket>`; panics with its
/// error output unless it succeeds. Returns its standard output.
pub async fn tsagent_cli(args: &[&str], control_socket: &Path) -> String {
    let output = tsagent_cli_output(args, control_socket).await;
    assert!(
        output.status.success(),
        "tsagent {args:?} failed ({:?}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Like [`tsagent_cli`], whatever the outcome.
pub async fn tsagent_cli_output(args: &[&str], control_socket: &Path) -> std::process::Output {
    let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    args.extend([OsStr::new("--control-socket"), control_socket.as_os_str()]);
    tsagent_output(&args).await
}

/// Runs the real `tsagent` with exactly `args`, whatever the outcome.
pub async fn tsagent_output(args: &[&OsStr]) -> std::process::Output {
    let mut command = tokio::process::Command::new(workspace_binary("tsagent"));
    command.args(args).kill_on_drop(true);
    tokio::time::timeout(CLI_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("tsagent {args:?} did not finish within {CLI_TIMEOUT:?}"))
        .unwrap_or_else(|error| panic!("run tsagent {args:?}: {error}"))
}

/// One line of `tsagent session list`, or one session in the broker's directory, reduced to
/// what both know.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListedSession {
    pub session_id: u32,
    /// `DOMAIN\user` or `user`.
    pub user: String,
    /// `active` or `disconnected`.
    pub state: String,
}

impl ListedSession {
    pub fn new(session_id: u32, user: &str, state: &str) -> ListedSession {
        ListedSession {
            session_id,
            user: user.to_owned(),
            state: state.to_owned(),
        }
    }
}

/// Reads the table `tsagent session list` prints (ID USER STATE CLIENT LOGON SOURCE), sorted.
pub fn parse_session_list(text: &str) -> Vec<ListedSession> {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header
            .split_whitespace()
            .take(3)
            .eq(["ID", "USER", "STATE"]),
        "not a session list:\n{text}"
    );
    let mut sessions: Vec<ListedSession> = lines
        .filter(|line| !line.trim().is_empty() && line.trim() != "(no sessions)")
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert!(fields.len() >= 3, "unexpected session list line {line:?}");
            ListedSession {
                session_id: fields[0]
                    .parse()
                    .unwrap_or_else(|_| panic!("session id in {line:?}")),
                user: fields[1].to_owned(),
                state: fields[2].to_owned(),
            }
        })
        .collect();
    sessions.sort();
    sessions
}

/// The sessions the broker's directory holds for `machine_id`, sorted.
pub async fn broker_sessions(
    client: &mut BrokerClient<Channel>,
    machine_id: &str,
) -> Vec<ListedSession> {
    let listed = client
        .list_sessions(pb::ListSessionsRequest {
            machine_id: machine_id.to_owned(),
            ..Default::default()
        })
        .await
        .expect("ListSessions")
        .into_inner();
    let mut sessions: Vec<ListedSession> = listed.sessions.iter().map(listed_from_broker).collect();
    sessions.sort();
    sessions
}

pub fn listed_from_broker(session: &pb::Session) -> ListedSession {
    let state = match pb::SessionState::try_from(session.state) {
        Ok(pb::SessionState::Active) => "active",
        Ok(pb::SessionState::Disconnected) => "disconnected",
        _ => "unspecified",
    };
    ListedSession {
        session_id: session.session_id,
        user: qualified(&session.domain, &session.user_name),
        state: state.to_owned(),
    }
}

/// The real `tsagent` binary running as its own process, stopped when dropped.
pub struct AgentProcess {
    pub log: LogFile,
    pub control_socket: PathBuf,
    process: ChildGuard,
}

impl AgentProcess {
    /// Starts `tsagent <args>` with `--control-socket <control_socket>`, logging to `log`.
    pub fn spawn(args: &[String], control_socket: &Path, log: &Path) -> AgentProcess {
        AgentProcess::spawn_with_env(args, control_socket, log, &[])
    }

    /// As [`AgentProcess::spawn`], with `env` set in its environment.
    pub fn spawn_with_env(
        args: &[String],
        control_socket: &Path,
        log: &Path,
        env: &[(&str, &Path)],
    ) -> AgentProcess {
        let log = LogFile::create(log);
        let (stdout, stderr) = log.stdio();
        let mut command = Command::new(workspace_binary("tsagent"));
        command
            .args(args)
            .envs(env.iter().copied())
            .arg("--control-socket")
            .arg(control_socket)
            .env("RUST_LOG", "info")
            .stdout(stdout)
            .stderr(stderr);
        AgentProcess {
            log,
            control_socket: control_socket.to_owned(),
            process: ChildGuard::spawn("tsagent", command),
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGTERM; the exit status (panics if it does not stop within `limit`).
    pub async fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        self.process.terminate(limit).await
    }

    /// SIGKILL, as a crash ends it.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Waits until `tsagent status` says the agent is connected to the broker.
    pub async fn wait_until_connected(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            assert!(
                self.process.is_running(),
                "tsagent ended: {:?}\n{}",
                self.process.exit_status(),
                self.log.tail(30)
            );
            let output = tsagent_cli_output(&["status"], &self.control_socket).await;
            if output.status.success()
                && String::from_utf8_lossy(&output.stdout).contains("broker: connected")
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tsagent did not connect within {limit:?}; its log ends:\n{}",
                self.log.tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
