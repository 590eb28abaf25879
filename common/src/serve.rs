//! Accepting gRPC connections: `TCP_NODELAY` on each, silent ones closed, and a pause instead
//! of a busy loop when the process runs out of file descriptors (or memory) to accept with.

use std::io;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::warning_limit::WarningLimit;

/// The first pause after a failed accept; doubled with each failure in a row.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause: how late a freed descriptor can be noticed.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// How long a client has, once connected, to begin HTTP/2 (its 24-byte connection preface) or
/// to send anything else: a connection that stays silent longer is closed, so that idle TCP
/// connections cannot take the process's file descriptors (the server's own keepalive starts
/// only after the preface).
pub const GREETING_TIMEOUT: Duration = Duration::from_secs(10);

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
pub const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The connections `listener` accepts, each with `TCP_NODELAY` set, once its client has sent
/// the HTTP/2 preface (or something else, which the server answers itself) within
/// [`GREETING_TIMEOUT`], for tonic's `serve_with_incoming*`. The server builder's
/// `tcp_nodelay` reaches only a listener tonic binds itself; without it an answer written in
/// two pieces can wait for the client's delayed ACK (40 ms on Linux). A failed accept is
/// handled by [`AcceptPause`]: tonic's own loop would retry at once, which with no descriptor
/// left spins a core and logs nothing. Accepts until the stream is dropped.
pub fn accepted_connections(
    listener: TcpListener,
) -> impl Stream<Item = io::Result<TcpStream>> + Send + 'static {
    greeted_connections(listener, GREETING_TIMEOUT)
}

fn greeted_connections(
    listener: TcpListener,
    greeting_timeout: Duration,
) -> impl Stream<Item = io::Result<TcpStream>> + Send + 'static {
    let (ready, incoming) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, ready, greeting_timeout));
    futures::stream::unfold(incoming, |mut incoming| async move {
        incoming.recv().await.map(|stream| (Ok(stream), incoming))
    })
}

async fn accept_loop(
    listener: TcpListener,
    ready: mpsc::Sender<TcpStream>,
    greeting_timeout: Duration,
) {
    let mut pause = AcceptPause::new("gRPC");
    loop {
        let (stream, peer) = tokio::select! {
            () = ready.closed() => return,
            accepted = pause.next_connection(&listener) => accepted,
        };
        let ready = ready.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(greeting_timeout, greeted(&stream)).await {
                Ok(true) => {
                    let _ = ready.send(stream).await;
                }
                Ok(false) => tracing::debug!(%peer, "a connection closed before it sent anything"),
                Err(_) => closed_silent(peer, greeting_timeout),
            }
        });
    }
}

/// Logs a connection closed for not beginning HTTP/2 within `timeout` (silent, or stopped
/// part-way through the preface): at info at most once a minute (a scanner or a broken client
/// can open thousands), otherwise at debug.
pub fn closed_silent(peer: SocketAddr, timeout: Duration) {
    static SILENT: LazyLock<WarningLimit> = LazyLock::new(Default::default);
    match SILENT.warn_now() {
        Some(unsaid) => tracing::info!(
            %peer,
            since_last_said = unsaid,
            "closed a connection that did not begin HTTP/2 within {timeout:?} (said at most once a \
             minute)"
        ),
        None => tracing::debug!(%peer, "closed a connection that did not begin HTTP/2 in time"),
    }
}

/// Whether `first`, the first bytes a client sent, are enough to hand its connection to the
/// gRPC server: the whole HTTP/2 preface, or bytes that cannot begin it (which the server
/// answers itself).
pub fn greeting_complete(first: &[u8]) -> bool {
    first.len() >= HTTP2_PREFACE.len() || first != &HTTP2_PREFACE[..first.len()]
}

/// Whether the client greeted: sent the whole HTTP/2 preface, or bytes that cannot begin it;
/// false once it closed (or failed) first. Reads nothing: the server reads it all again.
async fn greeted(stream: &TcpStream) -> bool {
    let mut first = [0u8; HTTP2_PREFACE.len()];
    loop {
        match stream.peek(&mut first).await {
            Ok(0) | Err(_) => return false,
            Ok(read) if greeting_complete(&first[..read]) => return true,
            // Part of the preface: peeking again would return at once with the same bytes.
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// What an accept loop does after an accept fails. An error about one connection (reset or
/// aborted before it was accepted) is passed over at once. Anything else — no file descriptor
/// left (`EMFILE`, `ENFILE`), no memory — would fail again at once while the waiting connection
/// stays queued, so the loop waits: 5 ms, doubled each failure in a row up to 1 s. One warning
/// starts such a run of failures and one line ends it, so a long shortage does not flood the log.
#[derive(Debug)]
pub struct AcceptPause {
    listener: &'static str,
    next_pause: Duration,
    run: Option<FailureRun>,
}

#[derive(Debug)]
struct FailureRun {
    started: Instant,
    failures: u64,
}

impl AcceptPause {
    /// For the accept loop of `listener` (named in the log: "gRPC", "front door", ...).
    pub fn new(listener: &'static str) -> Self {
        Self {
            listener,
            next_pause: FIRST_PAUSE,
            run: None,
        }
    }

    /// The next connection `listener` accepts, with `TCP_NODELAY` set, pausing after failed
    /// accepts as [`AcceptPause::after_error`] says. Cancel-safe.
    pub async fn next_connection(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    self.after_success();
                    let _ = stream.set_nodelay(true);
                    return (stream, peer);
                }
                Err(error) => self.after_error(&error).await,
            }
        }
    }

    /// After a failed accept: returns at once for an error that concerns only the connection
    /// being accepted, otherwise after this run of failures' next pause.
    pub async fn after_error(&mut self, error: &io::Error) {
        if concerns_one_connection(error) {
            tracing::debug!(listener = self.listener, %error, "a connection went away before it was accepted");
            return;
        }
        let pause = self.next_pause;
        match &mut self.run {
            Some(run) => run.failures += 1,
            None => {
                tracing::warn!(
                    listener = self.listener,
                    %error,
                    "cannot accept connections; retrying at most a second apart until it can (for too many open files, raise the process's limit: LimitNOFILE= in its systemd unit, `ulimit -n`)"
                );
                self.run = Some(FailureRun {
                    started: Instant::now(),
                    failures: 1,
                });
            }
        }
        self.next_pause = (pause * 2).min(LONGEST_PAUSE);
        tokio::time::sleep(pause).await;
    }

    /// After an accepted connection: ends a run of failures, saying how long it lasted.
    pub fn after_success(&mut self) {
        if let Some(run) = self.run.take() {
            tracing::warn!(
                listener = self.listener,
                failed_accepts = run.failures,
                lasted_ms = u64::try_from(run.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "accepting connections again"
            );
            self.next_pause = FIRST_PAUSE;
        }
    }

    /// Whether the last accept failed (a run of failures is going on).
    #[cfg(test)]
    fn is_failing(&self) -> bool {
        self.run.is_some()
    }
}

fn concerns_one_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_stream::StreamExt;

    use super::AcceptPause;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_to_coalesce_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let incoming = super::accepted_connections(listener);
        tokio::pin!(incoming);
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client.write_all(super::HTTP2_PREFACE).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_and_never_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let incoming = super::greeted_connections(listener, Duration::from_millis(300));
        tokio::pin!(incoming);
        let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
        // Half of the preface, then nothing more.
        let mut halting = tokio::net::TcpStream::connect(address).await.unwrap();
        halting
            .write_all(&super::HTTP2_PREFACE[..10])
            .await
            .unwrap();
        // Not HTTP/2 at all: served, for the server to answer as it does.
        let mut stranger = tokio::net::TcpStream::connect(address).await.unwrap();
        stranger.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client.write_all(super::HTTP2_PREFACE).await.unwrap();
        let mut served = Vec::new();
        for _ in 0..2 {
            let accepted = tokio::time::timeout(Duration::from_secs(5), incoming.next())
                .await
                .expect("served")
                .unwrap()
                .unwrap();
            served.push(accepted.peer_addr().unwrap());
        }
        served.sort();
        let mut expected = vec![stranger.local_addr().unwrap(), client.local_addr().unwrap()];
        expected.sort();
        assert_eq!(served, expected);
        for connection in [&mut silent, &mut halting] {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(5), connection.read(&mut byte))
                .await
                .expect("closed by the server");
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
        let more = tokio::time::timeout(Duration::from_millis(200), incoming.next()).await;
        assert!(more.is_err(), "the silent connections are never served");
    }

    #[tokio::test(start_paused = true)]
    async fn running_out_of_descriptors_pauses_longer_each_time_up_to_a_second() {
        let mut pause = AcceptPause::new("test");
        let emfile = io::Error::from_raw_os_error(24);
        let mut waited = Vec::new();
        for _ in 0..10 {
            let start = tokio::time::Instant::now();
            pause.after_error(&emfile).await;
            waited.push(start.elapsed().as_millis());
        }
        assert_eq!(waited, [5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert!(pause.is_failing());

        pause.after_success();
        assert!(!pause.is_failing());
        let start = tokio::time::Instant::now();
        pause.after_error(&emfile).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(5),
            "a new run starts short"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_reset_before_accept_is_passed_over_at_once() {
        let mut pause = AcceptPause::new("test");
        let start = tokio::time::Instant::now();
        pause
            .after_error(&io::Error::from(io::ErrorKind::ConnectionAborted))
            .await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(!pause.is_failing());
    }
}
