//! Stopping on SIGTERM or SIGINT: the first signal starts a clean stop; a second one (an
//! operator who will not wait for it, a second Ctrl-C) ends the process at once. SIGHUP (a
//! closed terminal, a habit of reloading daemons with it) is logged and otherwise ignored: its
//! default would end the process on the spot, cutting every connection without a clean stop.

use tokio::signal::unix::{SignalKind, signal};

/// Waits for SIGTERM or SIGINT and calls `stop`; then, on another one, exits with 128 + its
/// number, as a shell reports a process killed by it.
pub async fn stop_on_signals(stop: impl FnOnce()) {
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for signals");
        return;
    };
    match signal(SignalKind::hangup()) {
        Ok(mut hangup) => {
            tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    tracing::warn!(
                        "SIGHUP ignored: settings are read at start (restart to apply them); \
                         TLS files are taken up when they change"
                    );
                }
            });
        }
        Err(error) => tracing::warn!(%error, "cannot listen for SIGHUP"),
    }
    let (name, _) = tokio::select! {
        _ = terminate.recv() => ("SIGTERM", 15),
        _ = interrupt.recv() => ("SIGINT", 2),
    };
    tracing::info!(signal = name, "stopping");
    stop();
    let (name, number) = tokio::select! {
        _ = terminate.recv() => ("SIGTERM", 15),
        _ = interrupt.recv() => ("SIGINT", 2),
    };
    tracing::warn!(
        signal = name,
        "second signal while stopping: exiting without finishing the stop"
    );
    std::process::exit(128 + number);
}
