//! Starts the agent's parts (session table, control socket, broker stream, front door) and
//! stops them together: the one entry `main` and the end-to-end tests share.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tsbroker_common::model::{self, MachineDescription};
use uuid::Uuid;

use crate::broker_client::BearerToken;
use crate::broker_link::{BrokerLink, TLS_FILES_CHECK_INTERVAL};
use crate::config::{AgentConfig, FrontDoorBind};
use crate::control::server::{self as control_server, ControlHandler};
use crate::directory::Directory;
use crate::front_door::machines::MachineCache;
use crate::front_door::{self, FrontDoorSettings, FrontDoorShared};
use crate::metrics::AgentMetrics;
use crate::stream::{self, LinkStatus, SharedStatus, StreamContext, StreamExit};

/// How long the parts get to finish once the agent stops.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A started agent.
pub struct RunningAgent {
    /// Where the front door listens, when it runs.
    pub front_door_addr: Option<SocketAddr>,
    /// Where `/metrics` is served, when it is.
    pub metrics_addr: Option<SocketAddr>,
    pub control_socket: PathBuf,
    /// This machine's id in the directory.
    pub machine_id: Uuid,
    directory: Directory,
    status: SharedStatus,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningAgent {
    /// The session table (tests report sessions through it directly).
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The agent's standing with the broker.
    pub fn link_status(&self) -> LinkStatus {
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Waits until the broker acknowledged READY (the machine is a candidate); false if `limit`
    /// passes first.
    pub async fn wait_until_connected(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.link_status().connected {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Waits until the agent has stopped (shutdown, or removal by the broker).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("agent task")?
    }
}

/// Runs the agent until `shutdown` is cancelled (or the broker removes the machine).
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(config, shutdown).await?.wait().await
}

/// Starts the agent and returns once every listener is bound.
pub async fn start(
    config: AgentConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningAgent> {
    config.validate().map_err(|reason| anyhow!(reason))?;
    let description = MachineDescription {
        name: config.machine_name.clone(),
        farm: config.farm.clone(),
        address: config.advertise.clone(),
        weight: config.weight,
        session_limit: config.session_limit,
        single_session: config.single_session,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        front_door: config.front_door.is_some(),
    };
    let machine_id = model::machine_id(&config.farm, &config.machine_name);
    let this_machine = format!("{}/{}", config.farm, config.machine_name);
    let (directory, events) = Directory::open_for(&config.state_dir, this_machine.clone())?;
    let directory = directory.with_unconfirmed_logon_grace(config.unconfirmed_logon_grace);
    if !config.unconfirmed_logon_grace.is_zero() {
        let (directory, grace) = (directory.clone(), config.unconfirmed_logon_grace);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            directory.settle_undecided();
        });
    }
    let token = BearerToken::new(config.agent_token.as_deref())?;
    // A farm's agents start on different replicas when several are given.
    let first = usize::try_from(machine_id.as_u128() % 1_000_003).unwrap_or(0);
    let link = BrokerLink::new(&config.broker_urls(), first, &config.broker_tls, token)?;
    let status: SharedStatus = Arc::new(Mutex::new(LinkStatus {
        weight: config.weight,
        session_limit: config.session_limit,
        single_session: config.single_session,
        ..LinkStatus::default()
    }));
    // Until a broker answers, the settings it sent last (a drained machine stays drained).
    let saved_settings = Arc::new(stream::saved_settings::SettingsFile::new(
        &config.state_dir,
        this_machine,
    ));
    if let Some(saved) = saved_settings.load() {
        tracing::info!(
            draining = saved.draining,
            weight = saved.weight,
            session_limit = saved.session_limit,
            "machine settings as the broker last sent them, until it answers"
        );
        stream::set_status(&status, &saved);
    }

    let front_door_listener = match config.front_door {
        None => None,
        Some(FrontDoorBind::Address(address)) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("bind front door {address}"))?,
        ),
        Some(FrontDoorBind::Listener(listener)) => {
            listener
                .set_nonblocking(true)
                .context("front door listener")?;
            Some(tokio::net::TcpListener::from_std(listener).context("front door listener")?)
        }
    };
    let front_door_addr = match &front_door_listener {
        Some(listener) => Some(listener.local_addr().context("front door address")?),
        None => None,
    };
    let metrics_listener = match config.metrics_listen {
        Some(address) => Some(
            tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("listen for metrics on {address}"))?,
        ),
        None => None,
    };
    let metrics_addr = match &metrics_listener {
        Some(listener) => Some(listener.local_addr().context("metrics address")?),
        None => None,
    };
    let control_listener = control_server::bind(&config.control_socket)?;
    let metrics = Arc::new(AgentMetrics::default());

    let stop = shutdown.child_token();
    let mut parts: Vec<JoinHandle<()>> = Vec::new();
    let handler = ControlHandler {
        directory: directory.clone(),
        status: status.clone(),
        machine_name: config.machine_name.clone(),
        farm: config.farm.clone(),
        advertise: config.advertise.clone(),
        front_door: front_door_addr.map(|address| address.to_string()),
    };
    parts.push(tokio::spawn(
        link.clone().watch(TLS_FILES_CHECK_INTERVAL, stop.clone()),
    ));
    if let Some(listener) = metrics_listener {
        let (metrics, status, directory) = (metrics.clone(), status.clone(), directory.clone());
        parts.push(tokio::spawn(tsbroker_common::metrics_http::serve(
            move || std::future::ready(metrics.render(&status, &directory)),
            listener,
            stop.clone().cancelled_owned(),
        )));
    }
    parts.push(tokio::spawn(control_server::serve(
        control_listener,
        config.control_socket.clone(),
        handler,
        stop.clone(),
    )));
    if let Some(listener) = front_door_listener {
        let machines =
            MachineCache::new(link.clone(), config.farm.clone()).of_machine(machine_id.to_string());
        parts.push(tokio::spawn(
            machines
                .clone()
                .refresh_every(config.machine_refresh, stop.clone()),
        ));
        let shared = Arc::new(FrontDoorShared {
            settings: FrontDoorSettings {
                farm: config.farm.clone(),
                machine_id,
                local_rdp: config.local_rdp.clone(),
                client_timeout: config.client_timeout,
                max_connections: front_door::descriptors::connections_allowed(
                    config.max_connections,
                ),
                max_connections_per_client: config.max_connections_per_client,
                source: front_door::source_address::advertised_local_ip(&config.advertise)
                    .await
                    .map(|ip| Arc::new(front_door::source_address::SourceAddress::new(ip))),
            },
            link: link.clone(),
            machines,
            directory: directory.clone(),
            metrics: metrics.clone(),
            header_key: config
                .agent_token
                .as_deref()
                .map(front_door::proxy_header::HeaderKey::from_token),
            broker_absence: Default::default(),
            status: status.clone(),
        });
        parts.push(tokio::spawn(front_door::serve(
            listener,
            shared,
            stop.clone(),
        )));
    }
    let context = StreamContext {
        description,
        link: link.clone(),
        backoff: config.backoff,
        default_heartbeat: config.default_heartbeat,
        welcome_timeout: config.welcome_timeout,
        displaced_check: config.displaced_check,
        home_check: config.home_check,
        directory: directory.clone(),
        status: status.clone(),
        saved_settings,
        leave_on_stop: config.leave_on_stop,
    };
    tracing::info!(
        machine = %config.machine_name,
        farm = %config.farm,
        %machine_id,
        advertise = %config.advertise,
        front_door = %front_door_addr.map_or_else(|| "off".to_owned(), |address| address.to_string()),
        metrics = %metrics_addr.map_or_else(|| "off".to_owned(), |address| address.to_string()),
        control_socket = %config.control_socket.display(),
        "agent started"
    );
    // The stream stops last: the front door's cut connections leave sessions DISCONNECTED,
    // and the stream tells the broker so before it closes.
    let stream_stop = CancellationToken::new();
    let mut stream_task = tokio::spawn(stream::run(context, events, stream_stop.clone()));
    let table = directory.clone();
    let task = tokio::spawn(async move {
        let ended = tokio::select! {
            () = stop.cancelled() => None,
            exit = &mut stream_task => Some(exit),
        };
        if let Some(Ok(StreamExit::Removed)) = ended {
            tracing::warn!("machine removed by the broker: agent stopping");
        }
        stop.cancel();
        let all_parts = futures::future::join_all(parts);
        if tokio::time::timeout(STOP_GRACE, all_parts).await.is_err() {
            tracing::warn!("some parts did not stop in time");
        }
        let ended = match ended {
            Some(ended) => Some(ended),
            None => {
                stream_stop.cancel();
                let stopped = tokio::time::timeout(STOP_GRACE, &mut stream_task).await;
                if stopped.is_err() {
                    stream_task.abort();
                    tracing::warn!("the broker stream did not stop in time");
                }
                stopped.ok()
            }
        };
        // Front-door changes are saved behind the connections' backs: the latest table
        // (with the connections the stop cut) goes to disk before the agent exits.
        let flushed = tokio::task::spawn_blocking(move || table.flush()).await;
        if !matches!(flushed, Ok(true)) {
            // A failed stop: the next start reads an older table and reports it as the truth.
            anyhow::bail!(
                "the session table could not be saved before stopping: the next start reads \
                 an older one (free space or fix the permissions of the state directory; keep \
                 its sessions.json: an agent that starts without one tells the broker this \
                 machine has no sessions)"
            );
        }
        if let Some(Err(failed)) = ended {
            anyhow::bail!("the broker stream failed: {failed}");
        }
        tracing::info!("agent stopped");
        Ok(())
    });
    Ok(RunningAgent {
        front_door_addr,
        metrics_addr,
        control_socket: config.control_socket,
        machine_id,
        directory,
        status,
        task,
    })
}
