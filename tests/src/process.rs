//! Outside processes for the end-to-end tests: a guard that never leaves one running (SIGTERM,
//! then SIGKILL, on drop), and log files to wait on and search.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

/// How long a process gets to stop on SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// A child process that is stopped when the guard is dropped.
pub struct ChildGuard {
    name: String,
    child: Child,
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    /// Starts `command` (standard input closed); panics with `name` when it cannot start.
    pub fn spawn(name: &str, mut command: Command) -> ChildGuard {
        command.stdin(Stdio::null());
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name} ({command:?}): {error}"));
        ChildGuard {
            name: name.to_owned(),
            child,
            exited: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's standard output, when it was piped (taken once).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The exit status, if the process has ended.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    pub fn is_running(&mut self) -> bool {
        self.exit_status().is_none()
    }

    /// Sends a signal by name ("TERM", "KILL", …) with kill(1).
    pub fn signal(&mut self, signal: &str) {
        if !self.is_running() {
            return;
        }
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Waits up to `limit` for the process to end.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then the exit status (panics if it does not end within `limit`).
    pub async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        self.signal("TERM");
        match self.wait_exit(limit).await {
            Some(status) => status,
            None => panic!("{} did not stop within {limit:?} of SIGTERM", self.name),
        }
    }

    /// SIGKILL, as a crash or a pulled cable would end it, and reaps it.
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    fn stop_blocking(&mut self) {
        if !self.is_running() {
            return;
        }
        self.signal("TERM");
        let deadline = std::time::Instant::now() + TERM_GRACE;
        while std::time::Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop_blocking();
    }
}

/// A process's log (standard output and error together), read as text while it runs.
#[derive(Clone, Debug)]
pub struct LogFile {
    path: PathBuf,
}

impl LogFile {
    /// Creates (truncates) the file.
    pub fn create(path: &Path) -> LogFile {
        std::fs::File::create(path)
            .unwrap_or_else(|error| panic!("create {}: {error}", path.display()));
        LogFile {
            path: path.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// For a child's standard output and error (both append to the file).
    pub fn stdio(&self) -> (Stdio, Stdio) {
        let open = || {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&self.path)
                .unwrap_or_else(|error| panic!("open {}: {error}", self.path.display()))
        };
        (Stdio::from(open()), Stdio::from(open()))
    }

    /// Everything written so far (some programs write binary junk: read lossily).
    pub fn text(&self) -> String {
        let bytes = std::fs::read(&self.path).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Lines containing `pattern`.
    pub fn lines_with(&self, pattern: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| line.contains(pattern))
            .map(str::to_owned)
            .collect()
    }

    pub fn count(&self, pattern: &str) -> usize {
        self.text().matches(pattern).count()
    }

    /// The last `lines` lines, for failure messages.
    pub fn tail(&self, lines: usize) -> String {
        let text = self.text();
        let all: Vec<&str> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until `pattern` occurs at least `times` times; `false` when `limit` passes or
    /// `process` (if given) ends first.
    pub async fn wait_for(
        &self,
        pattern: &str,
        times: usize,
        limit: Duration,
        mut process: Option<&mut ChildGuard>,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.count(pattern) >= times {
                return true;
            }
            if let Some(process) = process.as_deref_mut()
                && !process.is_running()
            {
                // One last look: it may have written the line just before it ended.
                return self.count(pattern) >= times;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago (callers that bind it
/// later retry when somebody else took it meanwhile). Taken below the kernel's ephemeral range
/// (32768-60999 on Linux): a port the kernel handed out and took back is the next source
/// port of some test's outgoing connection as often as not, and the listener meant for it
/// then fails with "address in use".
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const COUNT: u16 = 12_000;
    // Each test binary starts at its own place (the process id), then goes round.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = (std::process::id() % u32::from(COUNT)) as u16;
    for _ in 0..COUNT {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        let port = FIRST + (start + offset) % COUNT;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The `tsbroker` binary's process, serving on 127.0.0.1:`port` from an SQLite file in `dir`,
/// logging at info into a log file there, once it says its store is ready. `wrap` makes the
/// command that runs it from the binary's path and arguments (`Command::new` for the binary
/// itself, or a shell that sets limits first).
pub async fn broker_process(
    dir: &Path,
    port: u16,
    wrap: impl FnOnce(PathBuf, Vec<String>) -> Command,
) -> (ChildGuard, LogFile) {
    let log = LogFile::create(&dir.join("broker.log"));
    let (stdout, stderr) = log.stdio();
    let args = vec![
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--database-url".to_owned(),
        format!("sqlite://{}", dir.join("b.db").display()),
    ];
    let mut command = wrap(crate::binaries::workspace_binary("tsbroker"), args);
    command
        .env("RUST_LOG", "info")
        .stdout(stdout)
        .stderr(stderr);
    let mut broker = ChildGuard::spawn("tsbroker", command);
    assert!(
        log.wait_for("store ready", 1, Duration::from_secs(20), Some(&mut broker))
            .await,
        "{}",
        log.tail(20)
    );
    (broker, log)
}

/// A `wrap` for [`broker_process`]: a shell runs `setup` (`ulimit -n 64`, a `trap`), then
/// execs the binary with its arguments (the same process: its pid is the broker's).
pub fn in_shell(setup: &str, binary: PathBuf, args: Vec<String>) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(format!("{setup} && exec \"$0\" \"$@\""))
        .arg(binary)
        .args(args);
    command
}

/// [`broker_process`] running the binary as it is, with no other arguments.
pub async fn plain_broker_process(dir: &Path, port: u16) -> (ChildGuard, LogFile) {
    broker_process(dir, port, |binary, args| {
        let mut command = Command::new(binary);
        command.args(args);
        command
    })
    .await
}

/// Connects to the broker on `port` and opens a `Health/Watch` stream (a call that never ends
/// by itself, as an agent's stream), once it has said SERVING. Returns the connection too.
pub async fn watch_health(
    port: u16,
) -> (
    tonic::transport::Channel,
    tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let channel = connect(&format!("http://127.0.0.1:{port}")).await;
    let mut watch = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    (channel, watch)
}

/// A gRPC connection to `url` (panics when there is none).
pub async fn connect(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap_or_else(|error| panic!("connect to {url}: {error}"))
}
