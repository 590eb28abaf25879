//! The `/metrics` endpoint both binaries serve (`--metrics-listen`): Prometheus text over plain
//! HTTP/1.1, encoded from the caller's registry at each scrape (after whatever reading the
//! caller's `render` does first: the broker reads its farms' state).

use std::future::Future;
use std::net::SocketAddr;

/// Serves `/metrics` on `listener` until `shutdown` completes; `render` gives the text.
pub async fn serve<F, Text>(
    render: F,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) where
    F: Fn() -> Text + Clone + Send + Sync + 'static,
    Text: Future<Output = String> + Send + 'static,
{
    let address: Option<SocketAddr> = listener.local_addr().ok();
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
