//! Real RDP programs from Debian's FreeRDP packages, for the end-to-end tests: X servers (`Xvfb`,
//! package `xvfb`), RDP servers (`freerdp-shadow-cli`, package `freerdp2-shadow-x11`, each
//! sharing its own Xvfb display) and RDP clients (`xfreerdp`, package `freerdp2-x11`, drawing on
//! an Xvfb display of their own).
//!
//! The servers require NLA (CredSSP over TLS) and authenticate users from a SAM file, so a
//! connection that completes has carried the whole TLS + CredSSP exchange through whatever sits
//! between client and server. Both programs log at DEBUG, and the tests read their logs: the
//! server logs the X.224 cookie it received (`received cookie [Cookie: mstshash=alice]`), both
//! sides log each connection state, ending in `CONNECTION_STATE_ACTIVE` once the session is up.

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::binaries::tool;
use crate::process::{ChildGuard, LogFile, free_port};

/// Every test user's password.
pub const PASSWORD: &str = "password";
/// The NT hash (MD4 of the UTF-16LE password) of [`PASSWORD`], as a SAM file holds it.
const PASSWORD_NT_HASH: &str = "8846f7eaee8fb117ad06bdd830b7586c";

/// Generous bounds for a loaded 2-core machine.
const XVFB_START: Duration = Duration::from_secs(15);
const SHADOW_START: Duration = Duration::from_secs(15);

/// The client's log line once the session is up (capabilities exchanged, finalization done).
pub const CLIENT_ACTIVE: &str =
    "rdp_client_transition_to_state CONNECTION_STATE_FINALIZATION --> CONNECTION_STATE_ACTIVE";
/// The server's log line once a session is up.
pub const SERVER_ACTIVE: &str =
    "rdp_server_transition_to_state CONNECTION_STATE_FINALIZATION --> CONNECTION_STATE_ACTIVE";
/// The client's log line when the security negotiation chose NLA (CredSSP).
pub const CLIENT_NLA: &str = "Negotiated NLA security";
/// The server's log line when the security negotiation chose NLA.
pub const SERVER_NLA: &str = "Negotiated Security: NLA:1 TLS:0 RDP:0";

fn install_hint(package: &str) -> String {
    format!("install Debian's {package} (apt-get install -y {package})")
}

/// `program` under `stdbuf -oL -eL`: FreeRDP logs through stdio, which holds back a whole
/// buffer when the output is a file; line buffering lets the tests read each line as it
/// happens.
fn line_buffered(program: &std::path::Path) -> Command {
    let stdbuf = tool("stdbuf", "install Debian's coreutils");
    let mut command = Command::new(stdbuf);
    command.args(["-oL", "-eL"]).arg(program);
    command
}

/// An Xvfb X server on a display it chose itself (`-displayfd`), so that tests running at the
/// same time, or anything else on the machine, never share one.
pub struct Xvfb {
    pub display: u32,
    process: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Xvfb {
    pub async fn start() -> Xvfb {
        let xvfb = tool("Xvfb", &install_hint("xvfb"));
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = LogFile::create(&dir.path().join("xvfb.log"));
        let mut command = Command::new(xvfb);
        command
            // -noreset: the server stays as it is when its last client leaves (a reset
            // while the next client connects makes that client fail to open the display).
            .args(["-displayfd", "1", "-screen", "0", "640x480x24"])
            .args(["-nolisten", "tcp", "-noreset"])
            .stdout(Stdio::piped())
            .stderr(log.stdio().1);
        let mut process = ChildGuard::spawn("Xvfb", command);
        let mut stdout = process.take_stdout().expect("piped stdout");
        // Xvfb writes the display number once it accepts clients.
        let reading = tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            let mut byte = [0u8; 1];
            while stdout.read(&mut byte).is_ok_and(|read| read == 1) && byte[0] != b'\n' {
                text.push(char::from(byte[0]));
            }
            text
        });
        let text = match tokio::time::timeout(XVFB_START, reading).await {
            Ok(Ok(text)) => text,
            _ => panic!(
                "Xvfb did not say its display within {XVFB_START:?}:\n{}",
                log.tail(20)
            ),
        };
        let display = text.trim().parse().unwrap_or_else(|_| {
            panic!(
                "Xvfb did not start (it wrote {text:?} as its display):\n{}",
                log.tail(20)
            )
        });
        let mut xvfb = Xvfb {
            display,
            process,
            _dir: dir,
        };
        // Several X servers starting at once may announce a display a moment before it
        // serves clients: wait until an X11 connection setup succeeds.
        let deadline = tokio::time::Instant::now() + XVFB_START;
        loop {
            let answer = tokio::task::spawn_blocking(move || x11_setup(display))
                .await
                .expect("X11 probe");
            match answer {
                Ok(()) => return xvfb,
                Err(error) => {
                    assert!(
                        xvfb.is_running() && tokio::time::Instant::now() < deadline,
                        "Xvfb display :{display} does not accept X11 clients ({error}); Xvfb running: {}\n{}",
                        xvfb.is_running(),
                        log.tail(20)
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// The value of `DISPLAY` for programs that draw here.
    pub fn display_env(&self) -> String {
        format!(":{}", self.display)
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

/// Opens an X11 connection to display `display` (its Unix socket) and checks that the server
/// accepts the connection setup (no authorization: Xvfb lets local clients in).
fn x11_setup(display: u32) -> std::io::Result<()> {
    use std::io::Write;
    let path = format!("/tmp/.X11-unix/X{display}");
    let mut stream = std::os::unix::net::UnixStream::connect(&path)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    // Byte order 'l' (little-endian), protocol 11.0, no authorization name or data.
    stream.write_all(&[b'l', 0, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0])?;
    let mut status = [0u8; 1];
    stream.read_exact(&mut status)?;
    match status[0] {
        1 => Ok(()),
        other => Err(std::io::Error::other(format!(
            "connection setup answered {other} instead of 1 (success)"
        ))),
    }
}

/// A `freerdp-shadow-cli` RDP server on 127.0.0.1, sharing an Xvfb display of its own,
/// requiring NLA, knowing the given users (all with [`PASSWORD`]).
pub struct ShadowServer {
    pub port: u16,
    pub log: LogFile,
    process: ChildGuard,
    _xvfb: Xvfb,
    _dir: tempfile::TempDir,
}

impl ShadowServer {
    pub async fn start(users: &[&str]) -> ShadowServer {
        let program = tool("freerdp-shadow-cli", &install_hint("freerdp2-shadow-x11"));
        let mut xvfb = Xvfb::start().await;
        let dir = tempfile::tempdir().expect("temporary directory");
        let sam = dir.path().join("sam");
        let entries: String = users
            .iter()
            .map(|user| format!("{user}:::{PASSWORD_NT_HASH}:::\n"))
            .collect();
        std::fs::write(&sam, entries).expect("write the SAM file");
        for attempt in 1..=3 {
            let port = free_port();
            let log = LogFile::create(&dir.path().join(format!("shadow-{attempt}.log")));
            let (stdout, stderr) = log.stdio();
            let mut command = line_buffered(&program);
            command
                .arg(format!("/port:{port}"))
                .arg("/bind-address:127.0.0.1")
                .arg("+auth")
                .arg("/sec:nla")
                .arg(format!("/sam-file:{}", sam.display()))
                .env("DISPLAY", xvfb.display_env())
                .env("WLOG_LEVEL", "DEBUG")
                // Its certificate and settings go here, not in the user's home.
                .env("HOME", dir.path())
                .env("XDG_CONFIG_HOME", dir.path().join("config"))
                .stdout(stdout)
                .stderr(stderr);
            let mut process = ChildGuard::spawn("freerdp-shadow-cli", command);
            let listening = log
                .wait_for("Listening on", 1, SHADOW_START, Some(&mut process))
                .await;
            if listening && process.is_running() {
                return ShadowServer {
                    port,
                    log,
                    process,
                    _xvfb: xvfb,
                    _dir: dir,
                };
            }
            // Somebody took the port meanwhile, or the display was not ready: again.
            let port_taken = log.count("Problem creating TCP listener") > 0;
            let no_display = log.count("failed to open display") > 0;
            drop(process);
            if no_display {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            assert!(
                (port_taken || no_display) && attempt < 3,
                "freerdp-shadow-cli did not start listening on port {port} (X display {}, Xvfb running: {}):\n{}",
                xvfb.display_env(),
                xvfb.is_running(),
                log.tail(30)
            );
        }
        unreachable!("the loop returns or panics");
    }

    /// "127.0.0.1:port", for an agent's `local_rdp`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Connections that reached this server with `Cookie: mstshash=<user>`.
    pub fn connections_of(&self, user: &str) -> usize {
        self.log
            .count(&format!("received cookie [Cookie: mstshash={user}]"))
    }

    /// Every connection that reached this server's security negotiation (whatever its X.224
    /// request carried).
    pub fn connections(&self) -> usize {
        self.log.count("Client Security: ")
    }

    /// Sessions that reached the active state on this server.
    pub fn sessions_activated(&self) -> usize {
        self.log.count(SERVER_ACTIVE)
    }

    /// Connections that negotiated NLA (CredSSP).
    pub fn nla_negotiations(&self) -> usize {
        self.log.count(SERVER_NLA)
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }
}

/// An `xfreerdp` client connected (or connecting) to `127.0.0.1:<port>` as a user.
pub struct RdpClient {
    pub user: String,
    pub log: LogFile,
    process: ChildGuard,
    _dir: tempfile::TempDir,
}

impl RdpClient {
    /// Starts `xfreerdp /v:127.0.0.1:<port> /u:<user> /p:password /cert:ignore`, drawing on
    /// `display`.
    pub fn connect(display: &Xvfb, port: u16, user: &str) -> RdpClient {
        Self::connect_with(display, port, user, &[])
    }

    /// Like [`RdpClient::connect`], with more arguments for xfreerdp (for instance
    /// `/load-balance-info:…`, which replaces the `mstshash` cookie in the X.224 request).
    pub fn connect_with(display: &Xvfb, port: u16, user: &str, extra: &[&str]) -> RdpClient {
        let program = tool("xfreerdp", &install_hint("freerdp2-x11"));
        let dir = tempfile::tempdir().expect("temporary directory");
        let log = LogFile::create(&dir.path().join("xfreerdp.log"));
        let (stdout, stderr) = log.stdio();
        let mut command = line_buffered(&program);
        command
            .arg(format!("/v:127.0.0.1:{port}"))
            .arg(format!("/u:{user}"))
            .arg(format!("/p:{PASSWORD}"))
            .arg("/cert:ignore")
            .arg("/size:640x480")
            .arg("-clipboard")
            .arg("/audio-mode:2")
            .args(extra)
            .env("DISPLAY", display.display_env())
            .env("WLOG_LEVEL", "DEBUG")
            .env("HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .stdout(stdout)
            .stderr(stderr);
        RdpClient {
            user: user.to_owned(),
            process: ChildGuard::spawn("xfreerdp", command),
            log,
            _dir: dir,
        }
    }

    /// Waits until the client says the session is active; panics with its log if it ends or
    /// `limit` passes first.
    pub async fn wait_active(&mut self, limit: Duration) {
        let active = self
            .log
            .wait_for(CLIENT_ACTIVE, 1, limit, Some(&mut self.process))
            .await;
        if !active {
            let status = self.process.exit_status();
            panic!(
                "xfreerdp ({}) did not reach the active state within {limit:?} (exit status {status:?}); its log ends:\n{}",
                self.user,
                self.log.tail(40)
            );
        }
    }

    pub fn negotiated_nla(&self) -> bool {
        self.log.count(CLIENT_NLA) > 0
    }

    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// Waits up to `limit` for the client to end by itself; its exit status.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.process.wait_exit(limit).await
    }

    /// The client's TCP connections: (local, remote) addresses, from `/proc`.
    pub fn connections(&self) -> Vec<(SocketAddr, SocketAddr)> {
        tcp_connections_of(self.process.pid())
    }

    /// Kills the client (SIGKILL): the user's connection drops without a logoff.
    pub fn kill(mut self) {
        self.process.kill();
    }
}

/// The IPv4 TCP connections of process `pid`: its socket inodes (`/proc/PID/fd`) looked up in
/// `/proc/net/tcp`.
pub fn tcp_connections_of(pid: u32) -> Vec<(SocketAddr, SocketAddr)> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: Vec<String> = entries
        .flatten()
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(9)?;
            if !inodes.iter().any(|known| known == inode) {
                return None;
            }
            Some((
                proc_net_address(fields.get(1)?)?,
                proc_net_address(fields.get(2)?)?,
            ))
        })
        .collect()
}

/// "0100007F:1F90" (the IPv4 address as the kernel's native-endian u32 in hex, the port in
/// hex) to 127.0.0.1:8080.
fn proc_net_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddr::from((ip.to_ne_bytes(), port)))
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_endian = "little")]
    fn proc_net_addresses_decode() {
        assert_eq!(
            super::proc_net_address("0100007F:1F90"),
            Some("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(super::proc_net_address("zz"), None);
    }
}
