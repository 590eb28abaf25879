//! Accepting connections: `TCP_NODELAY` on each, and a pause instead of a busy loop when the
//! process runs out of file descriptors (or memory) to accept with.

use std::io;
use std::time::{Duration, Instant};

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};

/// The first pause after a failed accept; doubled with each failure in a row.
const FIRST_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause: how late a freed descriptor can be noticed.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);

/// The connections `listener` accepts, each with `TCP_NODELAY` set, for tonic's
/// `serve_with_incoming*`. The server builder's `tcp_nodelay` reaches only a listener tonic
/// binds itself; without it an answer written in two pieces can wait for the client's delayed
/// ACK (40 ms on Linux). A failed accept is handled by [`AcceptPause`]: tonic's own loop would
/// retry at once, which with no descriptor left spins a core and logs nothing.
pub fn accepted_connections(
    listener: TcpListener,
) -> impl Stream<Item = io::Result<TcpStream>> + Send + 'static {
    let pause = AcceptPause::new("gRPC");
    futures::stream::unfold((listener, pause), |(listener, mut pause)| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    pause.after_success();
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(stream), (listener, pause)));
                }
                Err(error) => pause.after_error(&error).await,
            }
        }
    })
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

    use tokio::net::TcpListener;
    use tokio_stream::StreamExt;

    use super::AcceptPause;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_to_coalesce_writes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let incoming = super::accepted_connections(listener);
        tokio::pin!(incoming);
        let _client = tokio::net::TcpStream::connect(address).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
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
