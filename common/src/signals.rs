//! Stopping on SIGTERM or SIGINT: the first signal starts a clean stop; a second one (an
//! operator who will not wait for it, a second Ctrl-C) ends the process at once.

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
