//! Bursts through a proxy: many connections opened (each with its Connection Request answered
//! by the stand-in, so spliced through) and held together, then all closed; after each burst
//! and a pause, the proxy's resident memory. What a proxy keeps of bursts it no longer serves,
//! against HAProxy's after the same bursts in the same run.

use super::{Route, answered, packet};
use crate::env::process_memory_kib;
use crate::report::Report;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;
use tokio_util::sync::CancellationToken;

/// Longest a connection of a burst may take to be answered.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct Bursts {
    /// Connections held open together in each burst (0: no bursts).
    pub connections: usize,
    pub rounds: usize,
    /// Wait after a burst has closed before reading the proxy's memory.
    pub settle: Duration,
}

impl Default for Bursts {
    fn default() -> Self {
        Bursts {
            connections: 0,
            rounds: 4,
            settle: Duration::from_secs(12),
        }
    }
}

/// Runs the bursts through `route` and reports them (memory only where the proxy is a process
/// of its own).
pub async fn run(route: &Route, bursts: &Bursts, store: &str) -> Report {
    let request = Arc::new(packet(&route.users[0]));
    let before = route.proxy_pid.and_then(resident_mib);
    let mut after = Vec::new();
    let mut errors = 0u64;
    let mut first_error = None;
    for _ in 0..bursts.rounds {
        let outcomes = one_burst(route.address, &request, bursts.connections).await;
        for outcome in outcomes {
            if let Err(error) = outcome {
                errors += 1;
                first_error.get_or_insert(error);
            }
        }
        tokio::time::sleep(bursts.settle).await;
        if let Some(resident) = route.proxy_pid.and_then(resident_mib) {
            after.push(resident);
        }
    }
    let mut report = Report::new("frontdoor_burst");
    report
        .set("store", store)
        .set("path", route.name)
        .set("connections", bursts.connections as u64)
        .set("rounds", bursts.rounds as u64)
        .set("errors", errors);
    if let Some(before) = before {
        report.num("rss_mib_before", before, 1);
    }
    if !after.is_empty() {
        let list: Vec<String> = after.iter().map(|mib| format!("{mib:.1}")).collect();
        report.set("rss_mib_after_each", list.join(","));
        report.num("rss_mib_after_last", after[after.len() - 1], 1);
    }
    if let Some(error) = first_error {
        report.set("first_error", error.replace(' ', "_"));
    }
    report
}

/// Opens `count` connections, waits until every one is answered (or failed), then closes them
/// all at once.
async fn one_burst(
    address: SocketAddr,
    request: &Arc<Vec<u8>>,
    count: usize,
) -> Vec<Result<(), String>> {
    let all_open = Arc::new(Barrier::new(count + 1));
    let close = CancellationToken::new();
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let (all_open, close, request) = (all_open.clone(), close.clone(), request.clone());
            tokio::spawn(async move {
                let held = tokio::time::timeout(OPEN_TIMEOUT, answered(address, &request))
                    .await
                    .unwrap_or_else(|_| Err("not answered in time".to_owned()));
                all_open.wait().await;
                close.cancelled().await;
                held.map(drop)
            })
        })
        .collect();
    all_open.wait().await;
    close.cancel();
    let mut outcomes = Vec::with_capacity(count);
    for task in tasks {
        outcomes.push(task.await.unwrap_or_else(|error| Err(error.to_string())));
    }
    outcomes
}

fn resident_mib(pid: u32) -> Option<f64> {
    process_memory_kib(pid).map(|(resident, _)| resident as f64 / 1024.0)
}
