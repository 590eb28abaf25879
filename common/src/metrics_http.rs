//! The `/metrics` endpoint both binaries serve (`--metrics-listen`): Prometheus text over plain
//! HTTP/1.1, encoded from the caller's registry at each scrape (after whatever reading the
//! caller's `render` does first: the broker reads its farms' state). At most
//! [`MAX_CONNECTIONS`] are open at once, and one idle for [`IDLE_LIMIT`] is closed: idle
//! connections held open would otherwise take the process's file descriptors from its real
//! work (the front door, the gRPC port).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections open at once; one more is closed as soon as it is accepted.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection that sends nothing for this long is closed (a scraper that keeps its
/// connection between scrapes opens another).
pub const IDLE_LIMIT: Duration = Duration::from_secs(30);

/// Serves `/metrics` on `listener` until `shutdown` completes; `render` gives the text.
pub async fn serve<F, Text>(
    render: F,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    F: Fn() -> Text + Clone + Send + Sync + 'static,
    Text: Future<Output = String> + Send + 'static,
{
    let listener = BoundedListener::new(listener, MAX_CONNECTIONS, IDLE_LIMIT);
    serve_on(render, listener, shutdown).await;
}

async fn serve_on<F, Text>(
    render: F,
    listener: BoundedListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    F: Fn() -> Text + Clone + Send + Sync + 'static,
    Text: Future<Output = String> + Send + 'static,
{
    let address: Option<SocketAddr> = listener.inner.local_addr().ok();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    // What prometheus-client writes: OpenMetrics text (`# EOF` at the end,
                    // counters' samples named `_total`), so Prometheus parses it as such.
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render().await,
                )
            }
        }),
    );
    tracing::info!(?address, "serving metrics on /metrics");
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::error!(%error, "metrics server stopped");
    }
}

/// The metrics port: at most [`MAX_CONNECTIONS`] open, each closed once idle for
/// [`IDLE_LIMIT`].
struct BoundedListener {
    inner: tokio::net::TcpListener,
    permits: Arc<Semaphore>,
    most: usize,
    idle_limit: Duration,
    refused: crate::warning_limit::WarningLimit,
}

impl BoundedListener {
    fn new(inner: tokio::net::TcpListener, most: usize, idle_limit: Duration) -> Self {
        BoundedListener {
            inner,
            permits: Arc::new(Semaphore::new(most)),
            most,
            idle_limit,
            refused: crate::warning_limit::WarningLimit::default(),
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, peer) = axum::serve::Listener::accept(&mut self.inner).await;
            match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(permit) => {
                    return (
                        BoundedConnection::new(stream, permit, self.idle_limit),
                        peer,
                    );
                }
                Err(_) => {
                    if let Some(unsaid) = self.refused.warn_now() {
                        tracing::warn!(
                            %peer,
                            open = self.most,
                            since_last_warning = unsaid,
                            "metrics connection closed: as many are open as the endpoint takes (said at most once a minute)"
                        );
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A metrics connection: its read fails once nothing has come for [`IDLE_LIMIT`], which closes
/// it; its place among the [`MAX_CONNECTIONS`] is given back when it is dropped.
struct BoundedConnection {
    stream: tokio::net::TcpStream,
    idle_limit: Duration,
    idle_until: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl BoundedConnection {
    fn new(
        stream: tokio::net::TcpStream,
        permit: OwnedSemaphorePermit,
        idle_limit: Duration,
    ) -> Self {
        BoundedConnection {
            stream,
            idle_limit,
            idle_until: Box::pin(tokio::time::sleep(idle_limit)),
            _permit: permit,
        }
    }
}

impl AsyncRead for BoundedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buffer.filled().len();
        match Pin::new(&mut self.stream).poll_read(context, buffer) {
            Poll::Ready(Ok(())) => {
                if buffer.filled().len() > before {
                    let next = tokio::time::Instant::now() + self.idle_limit;
                    self.idle_until.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match self.idle_until.as_mut().poll(context) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "metrics connection idle",
                ))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for BoundedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(context, data)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(context)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const MOST: usize = 4;
    const IDLE: Duration = Duration::from_millis(500);

    async fn scrape(address: SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer)).await;
        answer
    }

    /// Whether the server closed `stream` within a second.
    async fn closed(stream: &mut tokio::net::TcpStream) -> bool {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut byte)).await;
        matches!(read, Ok(Ok(0)) | Ok(Err(_)))
    }

    /// Idle connections cannot hold the endpoint (nor the process's descriptors): past the
    /// limit a connection is closed at once, and each idle one once idle long enough.
    #[tokio::test]
    async fn idle_connections_are_bounded_and_closed() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = tcp.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let listener = BoundedListener::new(tcp, MOST, IDLE);
        tokio::spawn(serve_on(
            || async { "# EOF\n".to_owned() },
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        assert!(scrape(address).await.contains("# EOF"));
        let mut idle = Vec::new();
        for _ in 0..MOST {
            idle.push(tokio::net::TcpStream::connect(address).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut extra = tokio::net::TcpStream::connect(address).await.unwrap();
        assert!(
            closed(&mut extra).await,
            "one past the limit is closed at once"
        );
        // Idle past the limit: closed, and their places free for a scrape.
        tokio::time::sleep(IDLE).await;
        for stream in &mut idle {
            assert!(closed(stream).await);
        }
        assert!(scrape(address).await.contains("# EOF"));
        let _ = stop.send(());
    }
}
