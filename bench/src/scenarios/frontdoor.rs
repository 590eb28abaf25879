//! frontdoor: complete TCP connections carrying a real X.224 Connection Request, and bulk
//! transfers, to a stand-in RDP server: directly (the baseline), through HAProxy configured the
//! standard way (`mode tcp`, `tcp-request inspect-delay`, `balance rdp-cookie`,
//! `persist rdp-cookie`), and through a `tsagent` front door that asks the broker for every
//! connection, in two routes: to its own machine's RDP service (users whose sessions are on the
//! front door's machine) and to another machine of the farm (users whose sessions are there,
//! spliced straight to that machine's RDP service). All in the same run on the same machine.

mod burst;

pub use burst::Bursts;

use super::FARM;
use crate::Context;
use crate::env::{Broker, CpuWindow, Database, ProcessMode, free_port, micros_per, sibling_binary};
use crate::load::{LoadResult, closed_loop};
use crate::report::Report;
use crate::sim::{BaseSessions, MachineSpec, SimFarm, base_user};
use anyhow::{Context as _, bail};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tsagent::front_door::x224::build_connection_request;
use tsbroker_common::proto::v1 as pb;

/// The stand-in's X.224 Connection Confirm with an RDP Negotiation Response (standard RDP).
const CONNECTION_CONFIRM: [u8; 19] = [
    0x03, 0x00, 0x00, 0x13, 0x0e, 0xd0, 0x00, 0x00, 0x12, 0x34, 0x00, 0x02, 0x00, 0x08, 0x00, 0x00,
    0x00, 0x00, 0x00,
];

#[derive(Clone, Debug)]
pub struct Options {
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Users of each route (cycled through by the connections).
    pub users: usize,
    pub bulk_mib: usize,
    /// Leave HAProxy out (for a machine without it).
    pub skip_haproxy: bool,
    /// Bursts through the front door (local route) and HAProxy after the other measurements.
    pub bursts: Bursts,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            concurrency: 16,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            users: 100,
            bulk_mib: 512,
            skip_haproxy: false,
            bursts: Bursts::default(),
        }
    }
}

pub async fn run(context: &Context, options: &Options) -> anyhow::Result<Vec<Report>> {
    let database = Database::create(context.store).await?;
    let result = run_on(context, options, &database).await;
    database.drop_database().await;
    result
}

/// One path to the stand-in.
struct Route {
    name: &'static str,
    address: SocketAddr,
    /// The user names its connections carry.
    users: Arc<Vec<String>>,
    /// The processes whose CPU a connection costs: the proxy (HAProxy or the agent) and, for
    /// the front door, the broker it asks (`None` where not measured: in-process runs).
    proxy_pid: Option<u32>,
    broker_pid: Option<u32>,
}

/// What one path measured.
struct PathResult {
    name: &'static str,
    connections: LoadResult,
    bulk: Result<f64, String>,
    /// CPU microseconds per connection of the proxy and of the broker.
    proxy_cpu_us: Option<f64>,
    broker_cpu_us: Option<f64>,
}

async fn run_on(
    context: &Context,
    options: &Options,
    database: &Database,
) -> anyhow::Result<Vec<Report>> {
    let stop = CancellationToken::new();
    let standin = TcpListener::bind("127.0.0.1:0").await?;
    let standin_address = standin.local_addr()?;
    tokio::spawn(stand_in(standin, stop.clone()));

    let broker = Broker::start(context.mode, &context.broker_options(&database.url), None).await?;
    // The other machine: a plain RDP service (the stand-in) holding sessions of `users`
    // users (and more, so it never looks emptier than the front door's machine).
    let remote_users = options.users.max(1);
    let remote = SimFarm::start(
        &context.farm_settings(&broker.url(), FARM),
        vec![MachineSpec {
            name: "remote1.bench.example".to_owned(),
            weight: 100,
            address: standin_address.to_string(),
            front_door: false,
            base: BaseSessions {
                index: 0,
                stride: 1,
                per_machine: remote_users,
            },
        }],
        None,
    )?;
    remote.wait_ready(1, Duration::from_secs(30)).await?;
    // New logons go to the front door's machine: the other one drains (reconnections to it
    // still go through).
    let mut admin = pb::admin_client::AdminClient::new(crate::env::channel(&broker.url()).await?);
    admin
        .drain_machine(pb::MachineRef {
            farm: FARM.to_owned(),
            machine_name: "remote1.bench.example".to_owned(),
            ..Default::default()
        })
        .await
        .context("drain the remote machine")?;

    let state = tempfile::Builder::new()
        .prefix("tsbroker-bench-fd-")
        .tempdir()?;
    let agent =
        FrontDoorAgent::start(context, &broker.url(), standin_address, state.path()).await?;
    wait_machine_ready(&broker.url(), "fd1.bench.example").await?;
    broker.past_start_hold().await;

    let local_users: Vec<String> = (0..options.users.max(1))
        .map(|k| format!("fdl{k}"))
        .collect();
    // The local users log on to the front door's machine the way PAM reports a logon (its
    // control socket); their connections through the front door are then reconnections.
    for user in &local_users {
        let request = tsagent::control::Request::Logon(tsagent::control::SessionArgs {
            user: user.clone(),
            ..Default::default()
        });
        tsagent::control::client::call(&agent.control_socket, &request)
            .await
            .with_context(|| format!("log {user} on through the agent's control socket"))?;
    }
    wait_sessions_on(&broker.url(), "fd1.bench.example", local_users.len()).await?;

    let haproxy = if options.skip_haproxy {
        None
    } else {
        Some(HaProxy::start(context, standin_address, state.path()).await?)
    };
    let remote_names: Vec<String> = (0..remote_users).map(base_user).collect();
    let (agent_pid, broker_pid) = match context.mode {
        ProcessMode::Process => (agent.pid(), broker.pid()),
        ProcessMode::InProcess => (None, None),
    };
    let mut paths = vec![Route {
        name: "direct",
        address: standin_address,
        users: Arc::new(local_users.clone()),
        proxy_pid: None,
        broker_pid: None,
    }];
    if let Some(haproxy) = &haproxy {
        paths.push(Route {
            name: "haproxy",
            address: haproxy.address,
            users: Arc::new(local_users.clone()),
            proxy_pid: haproxy.child.id(),
            broker_pid: None,
        });
    }
    paths.push(Route {
        name: "tsagent_local",
        address: agent.address,
        users: Arc::new(local_users.clone()),
        proxy_pid: agent_pid,
        broker_pid,
    });
    paths.push(Route {
        name: "tsagent_remote",
        address: agent.address,
        users: Arc::new(remote_names),
        proxy_pid: agent_pid,
        broker_pid,
    });

    let mut results = Vec::new();
    for path in &paths {
        context.progress(&format!("connections through {}", path.name));
        let cpu = CpuWindow::start(
            vec![path.proxy_pid, path.broker_pid],
            options.warmup,
            options.duration,
        );
        let connections = connection_load(path, options).await;
        let cpu = cpu.seconds().await;
        let counted = connections.ok + connections.errors;
        let bulk = bulk_transfer(path.address, &path.users[0], options.bulk_mib).await;
        results.push(PathResult {
            name: path.name,
            proxy_cpu_us: micros_per(cpu.first().copied().flatten(), counted),
            broker_cpu_us: micros_per(cpu.get(1).copied().flatten(), counted),
            connections,
            bulk,
        });
    }
    let direct_p50 = quantile_ms(&results[0].connections, 0.5);
    let direct_p99 = quantile_ms(&results[0].connections, 0.99);
    let mut reports = Vec::new();
    for result in &results {
        let PathResult {
            name,
            connections,
            bulk,
            ..
        } = result;
        let mut report = Report::new("frontdoor");
        report
            .set("store", context.store.name())
            .set("path", *name)
            .set("inflight", options.concurrency as u64)
            .num("conns_per_s", connections.rate(), 0)
            .latency("", &connections.histogram)
            .num(
                "added_p50_ms",
                quantile_ms(connections, 0.5) - direct_p50,
                3,
            )
            .num(
                "added_p99_ms",
                quantile_ms(connections, 0.99) - direct_p99,
                3,
            )
            .set("errors", connections.errors);
        match bulk {
            Ok(rate) => report.num("bulk_mib_per_s", *rate, 0),
            Err(error) => report.set("bulk_error", error.replace(' ', "_")),
        };
        if let Some(micros) = result.proxy_cpu_us {
            report.num("proxy_cpu_us_per_conn", micros, 1);
        }
        if let Some(micros) = result.broker_cpu_us {
            report.num("broker_cpu_us_per_conn", micros, 1);
        }
        if let Some(error) = connections.top_error() {
            report.set("top_error", error.replace(' ', "_"));
        }
        reports.push(report);
    }
    if let Some(haproxy) = results.iter().find(|result| result.name == "haproxy") {
        for result in results
            .iter()
            .filter(|result| result.name.starts_with("tsagent"))
        {
            let PathResult {
                name,
                connections,
                bulk,
                ..
            } = result;
            let mut report = Report::new("frontdoor_vs_haproxy");
            report
                .set("store", context.store.name())
                .set("path", *name)
                .num(
                    "conn_rate_ratio",
                    connections.rate() / haproxy.connections.rate().max(1.0),
                    3,
                )
                .num(
                    "p99_ratio",
                    quantile_ms(connections, 0.99)
                        / quantile_ms(&haproxy.connections, 0.99).max(0.001),
                    3,
                );
            if let (Ok(ours), Ok(theirs)) = (bulk, &haproxy.bulk) {
                report.num("bulk_ratio", ours / theirs.max(0.001), 3);
            }
            // CPU per connection against HAProxy's: the agent's alone, then with the
            // broker's answer to its Redirect.
            if let (Some(ours), Some(theirs)) = (result.proxy_cpu_us, haproxy.proxy_cpu_us) {
                let theirs = theirs.max(0.001);
                report.num("cpu_per_conn_ratio", ours / theirs, 3);
                if let Some(broker) = result.broker_cpu_us {
                    report.num(
                        "cpu_per_conn_with_broker_ratio",
                        (ours + broker) / theirs,
                        3,
                    );
                }
            }
            reports.push(report);
        }
    }
    if options.bursts.connections > 0 {
        for route in paths
            .iter()
            .filter(|route| matches!(route.name, "haproxy" | "tsagent_local"))
        {
            context.progress(&format!("bursts through {}", route.name));
            reports.push(burst::run(route, &options.bursts, context.store.name()).await);
        }
    }
    if let Some(haproxy) = haproxy {
        haproxy.stop().await;
    }
    agent.stop().await;
    remote.stop().await;
    broker.stop().await;
    stop.cancel();
    Ok(reports)
}

fn quantile_ms(result: &LoadResult, quantile: f64) -> f64 {
    if result.histogram.is_empty() {
        return f64::NAN;
    }
    result.histogram.value_at_quantile(quantile) as f64 / 1000.0
}

/// A Connection Request with the user's `mstshash` cookie, asking for TLS and CredSSP.
fn packet(user: &str) -> Vec<u8> {
    build_connection_request(Some(&format!("Cookie: mstshash={user}")), Some(0x3))
}

async fn connection_load(path: &Route, options: &Options) -> LoadResult {
    let packets: Arc<Vec<Vec<u8>>> = Arc::new(path.users.iter().map(|user| packet(user)).collect());
    let address = path.address;
    let users = packets.len() as u64;
    let concurrency = options.concurrency;
    closed_loop(
        concurrency,
        options.warmup,
        options.duration,
        move |worker, iteration| {
            let packets = packets.clone();
            async move {
                let index = (iteration * concurrency as u64 + worker as u64) % users;
                connect_once(address, &packets[index as usize]).await
            }
        },
    )
    .await
}

/// Connect, send the Connection Request, read the Connection Confirm, close.
async fn connect_once(address: SocketAddr, request: &[u8]) -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(10), answered(address, request))
        .await
        .map_err(|_| "no connection confirm within 10s".to_owned())?
        .map(drop)
}

/// A connection whose Connection Request the stand-in answered, kept open.
async fn answered(address: SocketAddr, request: &[u8]) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(request)
        .await
        .map_err(|error| format!("write: {error}"))?;
    let mut confirm = [0u8; CONNECTION_CONFIRM.len()];
    stream
        .read_exact(&mut confirm)
        .await
        .map_err(|error| format!("read confirm: {error}"))?;
    if confirm != CONNECTION_CONFIRM {
        return Err("unexpected connection confirm".to_owned());
    }
    Ok(stream)
}

/// One connection: Connection Request, then `mib` MiB to the stand-in, which answers with the
/// byte count once the client half-closes; MiB/s over the transfer.
async fn bulk_transfer(address: SocketAddr, user: &str, mib: usize) -> Result<f64, String> {
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|error| format!("connect: {error}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(&packet(user))
        .await
        .map_err(|error| error.to_string())?;
    let mut confirm = [0u8; CONNECTION_CONFIRM.len()];
    stream
        .read_exact(&mut confirm)
        .await
        .map_err(|error| error.to_string())?;
    let chunk = vec![0x5au8; 64 * 1024];
    let total = (mib * 1024 * 1024) as u64;
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        stream
            .write_all(&chunk)
            .await
            .map_err(|error| error.to_string())?;
        sent += chunk.len() as u64;
    }
    stream.shutdown().await.map_err(|error| error.to_string())?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .await
        .map_err(|error| format!("read count: {error}"))?;
    let elapsed = started.elapsed();
    let received = u64::from_be_bytes(count);
    if received != sent {
        return Err(format!("stand-in received {received} of {sent} bytes"));
    }
    Ok(sent as f64 / 1024.0 / 1024.0 / elapsed.as_secs_f64())
}

/// The stand-in RDP server: reads the TPKT-framed Connection Request, answers a Connection
/// Confirm, then counts what follows; at the client's end of data it sends the count (8 bytes,
/// big-endian) and closes.
async fn stand_in(listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let mut header = [0u8; 4];
            if stream.read_exact(&mut header).await.is_err() || header[0] != 3 {
                return;
            }
            let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
            let mut rest = vec![0u8; length.saturating_sub(4)];
            if stream.read_exact(&mut rest).await.is_err() {
                return;
            }
            if stream.write_all(&CONNECTION_CONFIRM).await.is_err() {
                return;
            }
            let mut buffer = vec![0u8; 256 * 1024];
            let mut count = 0u64;
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) => break,
                    Ok(read) => count += read as u64,
                    Err(_) => return,
                }
            }
            let _ = stream.write_all(&count.to_be_bytes()).await;
        });
    }
}

async fn wait_machine_ready(url: &str, name: &str) -> anyhow::Result<()> {
    let mut client = pb::broker_client::BrokerClient::new(crate::env::channel(url).await?);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = client
            .list_machines(pb::ListMachinesRequest {
                farm: FARM.to_owned(),
            })
            .await;
        // The farm is unknown (NOT_FOUND) until its first machine joins.
        let machines = match listed {
            Ok(listed) => listed.into_inner().machines,
            Err(status) if status.code() == tonic::Code::NotFound => Vec::new(),
            Err(status) => return Err(status.into()),
        };
        if machines
            .iter()
            .any(|machine| machine.name == name && machine.state == pb::MachineState::Ready as i32)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} not READY within 30s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_sessions_on(url: &str, name: &str, count: usize) -> anyhow::Result<()> {
    let channel = crate::env::channel(url).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sessions = super::list_all_sessions(channel.clone()).await?;
        let here = sessions
            .iter()
            .filter(|session| session.machine_name == name)
            .count();
        if here >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} has {here} of {count} sessions after 30s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The tsagent with its front door: the real binary, or `tsagent::start` in this process.
struct FrontDoorAgent {
    address: SocketAddr,
    control_socket: std::path::PathBuf,
    child: Option<tokio::process::Child>,
    stop: CancellationToken,
    running: Option<tsagent::RunningAgent>,
}

impl FrontDoorAgent {
    async fn start(
        context: &Context,
        broker_url: &str,
        local_rdp: SocketAddr,
        state: &Path,
    ) -> anyhow::Result<FrontDoorAgent> {
        let stop = CancellationToken::new();
        let name = "fd1.bench.example";
        match context.mode {
            ProcessMode::Process => {
                let address = free_port().await?;
                std::fs::create_dir_all(&context.log_dir)?;
                let log = std::fs::File::create(context.log_dir.join("tsagent.log"))?;
                let child = tokio::process::Command::new(sibling_binary("tsagent")?)
                    .arg("--broker")
                    .arg(broker_url)
                    .arg("--machine-name")
                    .arg(name)
                    .arg("--farm")
                    .arg(FARM)
                    .arg("--advertise")
                    .arg(address.to_string())
                    .arg("--front-door")
                    .arg(address.to_string())
                    .arg("--local-rdp")
                    .arg(local_rdp.to_string())
                    .arg("--state-dir")
                    .arg(state.join("agent"))
                    .arg("--control-socket")
                    .arg(state.join("control.sock"))
                    .stdin(std::process::Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .kill_on_drop(true)
                    .spawn()
                    .context("start tsagent")?;
                let deadline = Instant::now() + Duration::from_secs(30);
                while TcpStream::connect(address).await.is_err() {
                    if Instant::now() > deadline {
                        bail!("tsagent front door not listening on {address}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(FrontDoorAgent {
                    address,
                    control_socket: state.join("control.sock"),
                    child: Some(child),
                    stop,
                    running: None,
                })
            }
            ProcessMode::InProcess => {
                let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
                let address = listener.local_addr()?;
                let mut config = tsagent::AgentConfig::new(name, state.join("agent"));
                config.broker_url = broker_url.to_owned();
                config.farm = FARM.to_owned();
                config.advertise = address.to_string();
                config.front_door = Some(tsagent::FrontDoorBind::Listener(listener));
                config.local_rdp = local_rdp.to_string();
                config.control_socket = state.join("control.sock");
                let running = tsagent::start(config, stop.clone()).await?;
                Ok(FrontDoorAgent {
                    address,
                    control_socket: state.join("control.sock"),
                    child: None,
                    stop,
                    running: Some(running),
                })
            }
        }
    }

    /// The agent's process id (when it runs as its own process).
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    async fn stop(self) {
        self.stop.cancel();
        if let Some(running) = self.running {
            let _ = tokio::time::timeout(Duration::from_secs(10), running.wait()).await;
        }
        if let Some(mut child) = self.child {
            if let Some(pid) = child.id() {
                let _ = tokio::process::Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status()
                    .await;
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// HAProxy in front of the stand-in, configured the standard way for RDP.
struct HaProxy {
    address: SocketAddr,
    child: tokio::process::Child,
}

impl HaProxy {
    async fn start(context: &Context, backend: SocketAddr, dir: &Path) -> anyhow::Result<HaProxy> {
        let address = free_port().await?;
        let config = format!(
            "global\n    maxconn 8000\n\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\n\
             frontend rdp\n    bind {address}\n    tcp-request inspect-delay 5s\n\
             \x20   tcp-request content accept if RDP_COOKIE\n    default_backend farm\n\n\
             backend farm\n    balance rdp-cookie\n    persist rdp-cookie\n\
             \x20   server ts1 {backend}\n"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let binary = [
            "/usr/sbin/haproxy",
            "/usr/local/sbin/haproxy",
            "/usr/bin/haproxy",
        ]
        .into_iter()
        .find(|candidate| Path::new(candidate).is_file())
        .unwrap_or("haproxy");
        std::fs::create_dir_all(&context.log_dir)?;
        let log = std::fs::File::create(context.log_dir.join("haproxy.log"))?;
        let child = tokio::process::Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {binary} (Debian package haproxy)"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(address).await.is_err() {
            if Instant::now() > deadline {
                bail!("haproxy not listening on {address}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(HaProxy { address, child })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
