//! The directory's task: reads everything (streaming) and installs it with the commits that
//! queued meanwhile; then reads the machines other replicas announce (their row and sessions,
//! replacing what the index had), and on PostgreSQL, every second, every machine's lease
//! (other replicas' agents refresh theirs without telling anyone). This broker's own commits
//! never pass through here: the store hands them to the index directly.
//!
//! A failed read of changed machines, or a request to read everything (the store's listener
//! reconnected and may have missed notifications), starts over with a full read, retried every
//! second while it fails. The index in use keeps serving meanwhile (the commits of this broker
//! go to it and to the next one): while the database is away, what it knows is all that sends
//! returning users back to their sessions, and a new user's placement checks the database
//! under the farm's lock whatever it says. A failed lease refresh changes nothing either. (A
//! read of everything holds the old index and the new one together for its seconds.)

use super::index::DirectoryIndex;
use super::{ChangedElsewhere, Reload, Shared};
use crate::store::{Store, StoreResult};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How often the leases are read again on PostgreSQL.
pub const LEASE_REFRESH: Duration = Duration::from_secs(1);
/// Wait before starting over after a failed read.
const RETRY: Duration = Duration::from_secs(1);

pub(super) async fn run(
    store: Arc<dyn Store>,
    shared: Arc<Shared>,
    mut requests: mpsc::UnboundedReceiver<Reload>,
    changed_elsewhere: Option<ChangedElsewhere>,
    stop: CancellationToken,
) {
    // Said once a failing spell, not at every retry.
    let mut failing = false;
    loop {
        let outcome = tokio::select! {
            outcome = load_and_follow(store.as_ref(), &shared, &mut requests, changed_elsewhere.as_ref(), &mut failing) => outcome,
            _ = stop.cancelled() => return,
        };
        match outcome {
            Ok(()) => tracing::info!("session directory: reading everything again"),
            Err(error) => {
                shared.reading_failed();
                if std::mem::replace(&mut failing, true) {
                    tracing::debug!(%error, "session directory still cannot read the store");
                } else {
                    tracing::warn!(
                        %error,
                        "session directory could not read the store; retrying every second \
                         (what it knows still answers returning users)"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

/// Loads, then serves reload requests and lease refreshes; `Ok` when everything must be read
/// again.
async fn load_and_follow(
    store: &dyn Store,
    shared: &Shared,
    requests: &mut mpsc::UnboundedReceiver<Reload>,
    changed_elsewhere: Option<&ChangedElsewhere>,
    failing: &mut bool,
) -> StoreResult<()> {
    // Requests made before this read are answered by it.
    while requests.try_recv().is_ok() {}
    let started = std::time::Instant::now();
    shared.begin_reading();
    let index = read_everything(store).await?;
    *failing = false;
    let (machines, sessions) = (index.machine_count(), index.session_count());
    if !shared.install(index) {
        tracing::warn!("session directory: too many commits while loading");
        return Ok(());
    }
    tracing::info!(
        machines,
        sessions,
        took_ms = started.elapsed().as_millis() as u64,
        "session directory loaded"
    );
    let mut leases = tokio::time::interval(LEASE_REFRESH);
    leases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let refresh_leases = store.backend() == "postgres";
    let mut leases_failing = false;
    loop {
        tokio::select! {
            request = requests.recv() => {
                let Some(request) = request else {
                    return Ok(());
                };
                // Whatever else is waiting goes in the same read.
                let mut machines = Vec::new();
                let mut pending = Some(request);
                while let Some(request) = pending {
                    match request {
                        Reload::Everything => return Ok(()),
                        Reload::Machines(ids) => machines.extend(ids),
                    }
                    pending = requests.try_recv().ok();
                }
                let machines = reload(store, shared, machines).await?;
                if let Some(hook) = changed_elsewhere {
                    hook(machines);
                }
            }
            _ = leases.tick(), if refresh_leases => match store.machine_leases().await {
                Ok(leases) => {
                    if std::mem::take(&mut leases_failing) {
                        tracing::info!("session directory: machine leases read again");
                    }
                    shared.update(|index| {
                        for lease in leases {
                            index.set_lease(lease);
                        }
                    });
                }
                // The database is away: the index stays as it is (once the listener is back,
                // everything is read again).
                Err(error) => {
                    if !std::mem::replace(&mut leases_failing, true) {
                        tracing::warn!(%error, "session directory: cannot read machine leases; keeping what it knows");
                    }
                }
            },
        }
    }
}

async fn read_everything(store: &dyn Store) -> StoreResult<DirectoryIndex> {
    let mut index = DirectoryIndex::default();
    for machine in store.directory_machines(None).await? {
        index.set_machine(machine.id, Some(machine));
    }
    store
        .directory_sessions(None, &mut |row| index.load_session(row))
        .await?;
    index.order_keys();
    Ok(index)
}

/// Reads the machines and their sessions again and replaces what the index had of them.
/// Returns the machines read.
async fn reload(store: &dyn Store, shared: &Shared, mut ids: Vec<Uuid>) -> StoreResult<Vec<Uuid>> {
    ids.sort_unstable();
    ids.dedup();
    let rows = store.directory_machines(Some(&ids)).await?;
    let mut sessions = Vec::new();
    store
        .directory_sessions(Some(&ids), &mut |row| sessions.push(row))
        .await?;
    shared.update(|index| {
        for id in &ids {
            index.remove_machine(*id);
        }
        for machine in rows {
            index.set_machine(machine.id, Some(machine));
        }
        for row in sessions {
            index.upsert_session(row);
        }
    });
    Ok(ids)
}
