//! The plug-in's connection, counted: tonic's channel connects again by itself when a
//! connection ends, so a plug-in that restarted between two calls (and lost everything it was
//! told) would otherwise be called as if nothing happened. Every connection made is counted;
//! the link compares the count with the one its `Initialize` went over. The count outlives a
//! channel: a channel built again (a changed CA file) counts on from where the last one was.

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::net::TcpStream;
use tonic::transport::Uri;

/// Connects as tonic's own connector does (TCP, no delay; TLS is added by the endpoint) and
/// counts the connections made.
#[derive(Clone)]
pub struct CountingConnector {
    inner: HttpConnector,
    made: Arc<AtomicU64>,
}

impl CountingConnector {
    /// A connector that adds the connections it makes to `count`.
    pub fn counting_into(count: &ConnectionCount) -> CountingConnector {
        let mut inner = HttpConnector::new();
        // The scheme may be https: the endpoint's TLS layer wraps this connection.
        inner.enforce_http(false);
        inner.set_nodelay(true);
        CountingConnector {
            inner,
            made: count.0.clone(),
        }
    }
}

/// How many connections the connectors counting into it have made so far.
#[derive(Clone, Debug, Default)]
pub struct ConnectionCount(Arc<AtomicU64>);

impl ConnectionCount {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

type ConnectError = Box<dyn std::error::Error + Send + Sync>;
type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TcpStream>, ConnectError>> + Send>>;

impl tower_service::Service<Uri> for CountingConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Connecting;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context).map_err(Into::into)
    }

    fn call(&mut self, destination: Uri) -> Self::Future {
        let connecting = self.inner.call(destination);
        let made = self.made.clone();
        Box::pin(async move {
            let connection = connecting.await?;
            made.fetch_add(1, Ordering::AcqRel);
            Ok(connection)
        })
    }
}
