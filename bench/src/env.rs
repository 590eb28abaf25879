//! What a scenario runs on: throwaway databases, brokers (in this process or as the real
//! `tsbroker` binary), and facts about the machine.

use anyhow::{Context, bail};
use sqlx::Connection;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// A database made for one run: a new PostgreSQL database on the server at `DATABASE_URL`, or
/// an SQLite file in a temporary directory. `drop_database` removes the PostgreSQL one.
pub struct Database {
    pub url: String,
    pub kind: StoreKind,
    admin_url: Option<String>,
    name: String,
    dir: Option<tempfile::TempDir>,
}

impl Database {
    pub async fn create(kind: StoreKind) -> anyhow::Result<Database> {
        match kind {
            StoreKind::Sqlite => Self::sqlite(),
            StoreKind::Postgres => {
                let admin_url = std::env::var("DATABASE_URL")
                    .unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
                let mut admin =
                    sqlx::PgConnection::connect(&admin_url)
                        .await
                        .with_context(|| {
                            format!("PostgreSQL does not answer at {admin_url}; set DATABASE_URL")
                        })?;
                let name = format!("tsbroker_throwaway_{}", uuid::Uuid::new_v4().simple());
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await
                    .context("create a throwaway database")?;
                let _ = admin.close().await;
                Ok(Database {
                    url: with_database(&admin_url, &name),
                    kind,
                    admin_url: Some(admin_url),
                    name,
                    dir: None,
                })
            }
        }
    }

    /// An SQLite file in a new temporary directory (no server, so no waiting).
    pub fn sqlite() -> anyhow::Result<Database> {
        let dir = tempfile::Builder::new()
            .prefix("tsbroker-")
            .tempdir()
            .context("temporary directory")?;
        let url = format!("sqlite://{}", dir.path().join("tsbroker.db").display());
        Ok(Database {
            url,
            kind: StoreKind::Sqlite,
            admin_url: None,
            name: String::new(),
            dir: Some(dir),
        })
    }

    /// The temporary directory of an SQLite database.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(tempfile::TempDir::path)
    }

    /// Drops the PostgreSQL database (closing whatever still uses it).
    pub async fn drop_database(self) {
        let Some(admin_url) = &self.admin_url else {
            return;
        };
        if let Ok(mut admin) = sqlx::PgConnection::connect(admin_url).await {
            let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            let _ = sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut admin)
                .await;
        }
    }
}

/// The same server URL naming another database (a query string is kept).
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |index| index + 3);
    let host_end = base[authority_start..]
        .find('/')
        .map_or(base.len(), |index| index + authority_start);
    match query {
        Some(query) => format!("{}/{database}?{query}", &base[..host_end]),
        None => format!("{}/{database}", &base[..host_end]),
    }
}

/// How brokers (and the front door's agent) are run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProcessMode {
    /// The real binaries (`tsbroker`, `tsagent`) next to this one, as child processes.
    Process,
    /// `tsbroker::run` / `tsagent::start` inside this process.
    InProcess,
}

/// Broker settings a scenario may change.
#[derive(Clone, Debug)]
pub struct BrokerOptions {
    pub database_url: String,
    pub max_pending_logons_per_machine: Option<u32>,
    pub heartbeat_timeout: Option<Duration>,
    /// Turns the farms' slow start off (`[farm_defaults] slow_start = "0s"`): a machine that
    /// just became READY then takes its full share of new logons at once.
    pub slow_start_off: bool,
    /// Where the process writes its log (process mode).
    pub log_dir: PathBuf,
    /// Serve TLS with these files (`--tls`).
    pub tls: Option<tsbroker::tls::TlsFiles>,
}

/// A running broker.
pub struct Broker {
    pub address: SocketAddr,
    pub mode: ProcessMode,
    /// Serves TLS: its URL is https://.
    tls: bool,
    kind: BrokerKind,
    /// When it was first found SERVING.
    serving_since: tokio::time::Instant,
}

enum BrokerKind {
    InProcess {
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    },
    Process {
        child: tokio::process::Child,
    },
}

impl Broker {
    /// Starts a broker on `address` (or a free port) and waits until it is SERVING.
    pub async fn start(
        mode: ProcessMode,
        options: &BrokerOptions,
        address: Option<SocketAddr>,
    ) -> anyhow::Result<Broker> {
        let broker = match mode {
            ProcessMode::InProcess => {
                let mut config = tsbroker::BrokerConfig {
                    database_url: options.database_url.clone(),
                    shutdown_grace: Duration::from_secs(3),
                    ..tsbroker::BrokerConfig::default()
                };
                if let Some(cap) = options.max_pending_logons_per_machine {
                    config.max_pending_logons_per_machine = cap;
                }
                if let Some(timeout) = options.heartbeat_timeout {
                    config.heartbeat_timeout = timeout;
                }
                if options.slow_start_off {
                    config.farms.defaults.slow_start = Duration::ZERO;
                }
                config.tls = options.tls.clone();
                let bind = address.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
                let listener = tokio::net::TcpListener::bind(bind)
                    .await
                    .with_context(|| format!("bind {bind}"))?;
                let address = listener.local_addr()?;
                config.listen = address;
                let shutdown = CancellationToken::new();
                let task = tokio::spawn(tsbroker::run(config, listener, shutdown.clone()));
                Broker {
                    address,
                    mode,
                    tls: options.tls.is_some(),
                    kind: BrokerKind::InProcess { shutdown, task },
                    serving_since: tokio::time::Instant::now(),
                }
            }
            ProcessMode::Process => {
                let address = match address {
                    Some(address) => address,
                    None => free_port().await?,
                };
                let binary = sibling_binary("tsbroker")?;
                std::fs::create_dir_all(&options.log_dir)?;
                let log_path = options
                    .log_dir
                    .join(format!("tsbroker-{}.log", address.port()));
                let log = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log_path)
                    .with_context(|| format!("open {}", log_path.display()))?;
                let mut command = tokio::process::Command::new(&binary);
                command
                    .arg("--listen")
                    .arg(address.to_string())
                    .arg("--database-url")
                    .arg(&options.database_url)
                    .arg("--shutdown-grace")
                    .arg("3s")
                    .stdin(std::process::Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .kill_on_drop(true);
                if let Some(cap) = options.max_pending_logons_per_machine {
                    command
                        .arg("--max-pending-logons-per-machine")
                        .arg(cap.to_string());
                }
                if let Some(timeout) = options.heartbeat_timeout {
                    command
                        .arg("--heartbeat-timeout")
                        .arg(format!("{}ms", timeout.as_millis()));
                }
                if let Some(tls) = &options.tls {
                    command
                        .arg("--tls-cert")
                        .arg(&tls.cert)
                        .arg("--tls-key")
                        .arg(&tls.key);
                    if let Some(ca) = &tls.client_ca {
                        command.arg("--tls-client-ca").arg(ca);
                    }
                    if let Some(crl) = &tls.client_crl {
                        command.arg("--tls-client-crl").arg(crl);
                    }
                }
                if options.slow_start_off {
                    let path = options
                        .log_dir
                        .join(format!("tsbroker-{}.toml", address.port()));
                    std::fs::write(&path, "[farm_defaults]\nslow_start = \"0s\"\n")?;
                    command.arg("--config").arg(path);
                }
                let child = command
                    .spawn()
                    .with_context(|| format!("start {}", binary.display()))?;
                Broker {
                    address,
                    mode,
                    tls: options.tls.is_some(),
                    kind: BrokerKind::Process { child },
                    serving_since: tokio::time::Instant::now(),
                }
            }
        };
        let mut broker = broker;
        broker.wait_until_serving(Duration::from_secs(60)).await?;
        broker.serving_since = tokio::time::Instant::now();
        Ok(broker)
    }

    /// Waits out the hold of new logons that a broker started on a store without machines
    /// keeps for its agents' resyncs (`SETTLE_AFTER_OUTAGE` from its start; a database lost
    /// and made again looks so), so that what is measured next is its steady state.
    pub async fn past_start_hold(&self) {
        let hold = tsbroker::store::reachability::SETTLE_AFTER_OUTAGE;
        tokio::time::sleep_until(self.serving_since + hold + Duration::from_millis(100)).await;
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.address)
    }

    /// The broker's process id (this process for an in-process broker).
    pub fn pid(&self) -> Option<u32> {
        match &self.kind {
            BrokerKind::InProcess { .. } => Some(std::process::id()),
            BrokerKind::Process { child } => child.id(),
        }
    }

    /// Resident memory now and at its peak, in KiB.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        process_memory_kib(self.pid()?)
    }

    async fn wait_until_serving(&self, limit: Duration) -> anyhow::Result<()> {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Ok(channel) = endpoint(&self.url())?.connect().await {
                let answer = HealthClient::new(channel)
                    .check(HealthCheckRequest::default())
                    .await;
                if answer
                    .is_ok_and(|answer| answer.get_ref().status == ServingStatus::Serving as i32)
                {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "broker at {} did not become SERVING within {limit:?}",
                    self.address
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ends the broker at once: SIGKILL for a process (no goodbye to its agents). An
    /// in-process broker cannot be killed apart from this process: it is stopped.
    pub async fn kill(self) {
        match self.kind {
            BrokerKind::InProcess { shutdown, task } => {
                shutdown.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            }
            BrokerKind::Process { mut child } => {
                let _ = child.kill().await;
            }
        }
    }

    /// Stops the broker as SIGTERM would and waits for it.
    pub async fn stop(self) {
        match self.kind {
            BrokerKind::InProcess { shutdown, task } => {
                shutdown.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            }
            BrokerKind::Process { mut child } => {
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
}

/// A channel (one HTTP/2 connection) to `url`.
pub async fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(endpoint(url)?.tcp_nodelay(true).connect().await?)
}

/// `url`'s endpoint, with the tool's TLS settings for an https:// URL (`--tls`).
fn endpoint(url: &str) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned())?;
    match crate::tls::client_config() {
        Some(tls) if url.starts_with("https://") => Ok(endpoint.tls_config(tls)?),
        _ => Ok(endpoint),
    }
}

/// A lazily connected channel (one HTTP/2 connection, reconnected when it breaks).
pub fn lazy_channel(url: &str) -> anyhow::Result<Channel> {
    Ok(endpoint(url)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// A loopback address with a port that was free a moment ago.
pub async fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?)
}

/// A binary built with this one (`target/<profile>/NAME`), for process mode.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("path of this program")?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(candidate_dir) = dir {
        let candidate = candidate_dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        // Test binaries live one level down, in deps/.
        if candidate_dir
            .file_name()
            .is_some_and(|dir_name| dir_name == "deps")
        {
            dir = candidate_dir.parent().map(Path::to_path_buf);
        } else {
            break;
        }
    }
    bail!(
        "{name} not found next to {}: build it first with \
         `cargo build --release -p tsbroker -p tsagent -p tsbroker-bench`, or use --mode in-process",
        exe.display()
    )
}

/// VmRSS and VmHWM of a process, in KiB.
pub fn process_memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) a process has used so far, from /proc/<pid>/stat.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(std::path::Path::new(&format!("/proc/{pid}/stat")))
}

/// CPU seconds (user + system) of a process's threads whose name starts with `prefix` (Linux
/// keeps 15 bytes of a thread's name), e.g. the broker's SQLite connection threads; `Some(0.0)`
/// when none is named so.
pub fn threads_cpu_seconds(pid: u32, prefix: &str) -> Option<f64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0.0;
    for task in tasks.flatten() {
        let path = task.path();
        let named = std::fs::read_to_string(path.join("comm"))
            .is_ok_and(|name| name.trim_end().starts_with(prefix));
        if named {
            // A thread that ended since the listing simply adds nothing.
            total += stat_cpu_seconds(&path.join("stat")).unwrap_or(0.0);
        }
    }
    Some(total)
}

/// User + system CPU seconds from a `/proc/…/stat` file.
fn stat_cpu_seconds(path: &std::path::Path) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let after_name = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let user: f64 = fields.get(11)?.parse().ok()?;
    let system: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on Linux.
    Some((user + system) / 100.0)
}

/// The CPU time that processes use during a closed-loop load's measured window (after its
/// warm-up): started with the load, it reads each process's CPU time when the warm-up ends and
/// when the window does. Divided by the operations counted in the window, it gives a cost per
/// operation that, unlike a rate, hardly moves with what else the machine runs.
pub struct CpuWindow {
    task: tokio::task::JoinHandle<Vec<Option<f64>>>,
}

/// Whose CPU time a [`CpuWindow`] reads.
#[derive(Clone, Copy, Debug)]
pub enum CpuOf {
    /// A whole process.
    Process(u32),
    /// A process's threads whose name starts with the prefix.
    Threads(u32, &'static str),
}

impl CpuOf {
    fn seconds(self) -> Option<f64> {
        match self {
            CpuOf::Process(pid) => process_cpu_seconds(pid),
            CpuOf::Threads(pid, prefix) => threads_cpu_seconds(pid, prefix),
        }
    }
}

impl CpuWindow {
    /// The CPU of whole processes (`None`: not read).
    pub fn start(pids: Vec<Option<u32>>, warmup: Duration, duration: Duration) -> Self {
        let sources = pids.into_iter().map(|pid| pid.map(CpuOf::Process));
        Self::of(sources.collect(), warmup, duration)
    }

    /// The CPU of each source (`None`: not read).
    pub fn of(sources: Vec<Option<CpuOf>>, warmup: Duration, duration: Duration) -> Self {
        let task = tokio::spawn(async move {
            let read = |sources: &[Option<CpuOf>]| -> Vec<Option<f64>> {
                sources
                    .iter()
                    .map(|source| source.and_then(CpuOf::seconds))
                    .collect()
            };
            tokio::time::sleep(warmup).await;
            let before = read(&sources);
            tokio::time::sleep(duration).await;
            let after = read(&sources);
            before
                .into_iter()
                .zip(after)
                .map(|(before, after)| Some(after? - before?))
                .collect()
        });
        CpuWindow { task }
    }

    /// CPU seconds of each process (in the order given; `None` where it could not be read).
    pub async fn seconds(self) -> Vec<Option<f64>> {
        self.task.await.unwrap_or_default()
    }
}

/// Microseconds of CPU per operation, when both are known and there were operations.
pub fn micros_per(cpu_seconds: Option<f64>, operations: u64) -> Option<f64> {
    let seconds = cpu_seconds?;
    (operations > 0).then(|| seconds * 1e6 / operations as f64)
}

/// nproc, CPU model, memory and load average, for the report's first line.
pub fn machine_report() -> crate::report::Report {
    let mut report = crate::report::Report::new("machine");
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    report.set("nproc", cores as u64);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map_or("unknown", |(_, model)| model.trim());
    report.set("cpu", model.replace(' ', "_"));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_kib = meminfo
        .lines()
        .find(|line| line.starts_with("MemTotal:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(0);
    report.num("mem_gib", total_kib as f64 / 1024.0 / 1024.0, 1);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    report.set("loadavg", load.join(","));
    report
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_cpu_window_sees_the_work_done_in_it() {
        let busy = Arc::new(AtomicBool::new(true));
        let spinner = {
            let busy = busy.clone();
            std::thread::Builder::new()
                .name("cpu-probe-spin".into())
                .spawn(move || {
                    let mut spins = 0u64;
                    while busy.load(Ordering::Relaxed) {
                        spins = std::hint::black_box(spins.wrapping_add(1));
                    }
                })
                .unwrap()
        };
        use super::CpuOf::{Process, Threads};
        let own = std::process::id();
        // No process has pid 0's /proc entry: a process that cannot be read gives `None`.
        let window = super::CpuWindow::of(
            vec![
                Some(Process(own)),
                Some(Process(0)),
                Some(Threads(own, "cpu-probe")),
                Some(Threads(own, "no-such-thread")),
                None,
            ],
            Duration::from_millis(50),
            Duration::from_millis(400),
        );
        let seconds = window.seconds().await;
        busy.store(false, Ordering::Relaxed);
        spinner.join().unwrap();
        // The spinning thread had at least a fraction of a core however busy the machine.
        let whole = seconds[0].expect("this process's CPU time");
        assert!(
            whole >= 0.04,
            "{whole} s of CPU in a 0.4 s window with a thread spinning"
        );
        assert_eq!(seconds[1], None);
        let spinning = seconds[2].expect("the spinning thread's CPU time");
        // Both are read in clock ticks (10 ms), the thread's a moment after the process's.
        assert!(
            spinning >= 0.04 && spinning <= whole + 0.05,
            "{spinning} of {whole}"
        );
        assert_eq!(seconds[3], Some(0.0));
        assert_eq!(seconds[4], None);
        assert_eq!(super::micros_per(Some(0.5), 1000), Some(500.0));
        assert_eq!(super::micros_per(Some(0.5), 0), None);
        assert_eq!(super::micros_per(None, 10), None);
    }

    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            super::with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            super::with_database("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            super::with_database("postgres://u@h/p?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
