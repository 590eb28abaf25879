//! New logons of a farm are placed in batches. Each farm has one worker task: a placement is
//! queued to it and answered once the worker's transaction has committed. The worker takes
//! everything queued at once and places it in one transaction under the farm's lock (one read
//! of the farm's machines, one commit, each pick counting as load for the next), so the cost
//! of the lock and of reading the farm is shared by every placement waiting for it, and a
//! placement waiting its turn holds no database connection. Across broker replicas the farm's
//! lock in the database still orders the batches.
//!
//! Between batches the worker keeps the farm's machines as its last batch left them
//! ([`FarmCache`]): the next batch reuses them instead of reading the farm again while no
//! other broker placed in the farm (the farm's placement counter) and no admin change came;
//! a copy older than [`SNAPSHOT_MAX_AGE`] is refreshed with the machines whose row changed, and
//! read whole every ten ages. What agents report reaches placements about that late (a second
//! at worst); placements never miss one another.

use super::farm_settings::FarmBook;
use super::policy::{ChoiceContext, PolicyRegistry};
use super::{DecisionSettings, group_pool};
use crate::error::ApiError;
use crate::store::{
    Choice, FarmCache, MachineLoad, Placement, PlacementRequest, Store, StoreError,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot};
use uuid::Uuid;

/// Most placements one transaction makes.
const MAX_BATCH: usize = 256;
/// A farm's worker stops after this long without placements (and starts again on the next).
const IDLE_WORKER: Duration = Duration::from_secs(10);
/// How long a batch's copy of the farm's machines may serve the next batches.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_millis(100);

/// One new logon to place.
pub struct PlacementJob {
    pub user_key: String,
    /// Machines the caller could not connect to.
    pub excluded: Vec<Uuid>,
    /// The plug-in's pick, honoured if it is still a candidate.
    pub preferred: Option<Uuid>,
    /// See [`PlacementRequest::check_sessions`].
    pub check_sessions: bool,
}

/// A placement and how it was made.
pub struct Placed {
    pub placement: Placement,
    /// The policy that ran, if one did.
    pub policy: Option<&'static str>,
    /// The plug-in's pick was taken.
    pub by_plugin: bool,
}

struct Queued {
    job: PlacementJob,
    reply: oneshot::Sender<Result<Placed, ApiError>>,
}

/// What a farm's worker needs to place logons.
struct Placer {
    store: Arc<dyn Store>,
    settings: DecisionSettings,
    policies: PolicyRegistry,
    farms: FarmBook,
}

/// The farms' placement workers.
pub struct PlacementQueues {
    placer: Arc<Placer>,
    workers: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Queued>>>>,
}

impl PlacementQueues {
    pub fn new(
        store: Arc<dyn Store>,
        settings: DecisionSettings,
        policies: PolicyRegistry,
        farms: FarmBook,
    ) -> Self {
        PlacementQueues {
            placer: Arc::new(Placer {
                store,
                settings,
                policies,
                farms,
            }),
            workers: Arc::default(),
        }
    }

    /// Places one new logon in `farm`, with whatever else is waiting there.
    pub async fn place(&self, farm: &str, job: PlacementJob) -> Result<Placed, ApiError> {
        let (reply, answer) = oneshot::channel();
        {
            let mut workers = self.workers.lock().map_err(|_| worker_gone())?;
            let sender = workers
                .entry(farm.to_owned())
                .or_insert_with(|| self.start_worker(farm));
            if let Err(mpsc::error::SendError(queued)) = sender.send(Queued { job, reply }) {
                // The worker ended (it panicked): start another.
                let sender = self.start_worker(farm);
                let _ = sender.send(queued);
                workers.insert(farm.to_owned(), sender);
            }
        }
        answer.await.map_err(|_| worker_gone())?
    }

    fn start_worker(&self, farm: &str) -> mpsc::UnboundedSender<Queued> {
        let (sender, receiver) = mpsc::unbounded_channel();
        tokio::spawn(worker(
            farm.to_owned(),
            receiver,
            self.placer.clone(),
            self.workers.clone(),
        ));
        sender
    }
}

fn worker_gone() -> ApiError {
    ApiError::Store(StoreError::unavailable(
        "the farm's placement worker stopped",
    ))
}

async fn worker(
    farm: String,
    mut queue: mpsc::UnboundedReceiver<Queued>,
    placer: Arc<Placer>,
    workers: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Queued>>>>,
) {
    let mut cache = FarmCache::new(SNAPSHOT_MAX_AGE.as_millis() as i64);
    let mut admin_changes = placer.store.subscribe_machine_changes();
    loop {
        let first = match tokio::time::timeout(IDLE_WORKER, queue.recv()).await {
            Ok(Some(first)) => first,
            Ok(None) => return,
            Err(_) => {
                // Idle: leave, unless a placement arrived meanwhile. Senders send while
                // holding the map's lock, so nothing can be queued after this check.
                let Ok(mut map) = workers.lock() else { return };
                match queue.try_recv() {
                    Ok(first) => first,
                    Err(_) => {
                        map.remove(&farm);
                        return;
                    }
                }
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(queued) => batch.push(queued),
                Err(_) => break,
            }
        }
        // A drain, a weight, a removal: read the farm again.
        let mut changed = false;
        while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = admin_changes.try_recv()
        {
            changed = true;
        }
        if changed {
            cache.invalidate();
        }
        if let Err(error) = placer.place_batch(&farm, batch, &mut cache).await {
            // The database is away: what queued during the attempt fails with it, at once,
            // instead of each batch waiting out its own connection timeout. The next placement
            // tries again.
            while let Ok(queued) = queue.try_recv() {
                let _ = queued.reply.send(Err(ApiError::Store(same_error(&error))));
            }
        }
    }
}

impl Placer {
    /// Places a batch in one transaction and answers each placement; the error when the
    /// database was unavailable.
    async fn place_batch(
        &self,
        farm: &str,
        batch: Vec<Queued>,
        cache: &mut FarmCache,
    ) -> Result<(), StoreError> {
        let now = self.store.now();
        let farm_settings = self.farms.get(farm);
        let requests: Vec<PlacementRequest<'_>> = batch
            .iter()
            .map(|queued| PlacementRequest {
                farm,
                user_key: &queued.job.user_key,
                now,
                lease_cutoff: self.settings.lease_cutoff(now),
                pending_ttl_ms: self.settings.pending_logon_ttl.as_millis() as i64,
                max_pending_per_machine: self.settings.max_pending_logons_per_machine,
                slow_start_ms: farm_settings.slow_start.as_millis() as i64,
                excluded: &queued.job.excluded,
                check_sessions: queued.job.check_sessions,
            })
            .collect();
        // What each pick used: the policy's name, and whether the plug-in's pick was taken.
        let used: Vec<Mutex<(Option<&'static str>, bool)>> =
            batch.iter().map(|_| Mutex::new((None, false))).collect();
        let choose = |index: usize, policy_name: &str, candidates: &[MachineLoad]| {
            let Some(queued) = batch.get(index) else {
                return Choice::Nothing;
            };
            let job = &queued.job;
            let policy = self.policies.get_or_default(policy_name);
            let pool = group_pool(farm_settings.group_of(&job.user_key), candidates);
            let by_plugin = job
                .preferred
                .filter(|id| pool.iter().any(|load| load.machine.id == *id));
            if let Ok(mut used) = used[index].lock() {
                *used = (Some(policy.name()), by_plugin.is_some());
            }
            if let Some(preferred) = by_plugin {
                return Choice::Machine(preferred);
            }
            if pool.is_empty() {
                return Choice::Nothing;
            }
            let context = ChoiceContext {
                farm,
                user_key: &job.user_key,
                settings: farm_settings,
            };
            policy
                .choose(&context, &pool)
                .map_or(Choice::Nothing, Choice::Machine)
        };
        let had_copy = cache.loaded_at().is_some();
        let started = std::time::Instant::now();
        let mut outcome = self.store.place_logons(&requests, &choose, cache).await;
        if had_copy && matches!(outcome, Err(ref error) if !is_unavailable(error)) {
            // The copy may name a machine removed since: once more, reading the farm.
            cache.invalidate();
            outcome = self.store.place_logons(&requests, &choose, cache).await;
        }
        drop(requests);
        tracing::debug!(
            farm,
            placements = batch.len(),
            had_copy,
            took_ms = started.elapsed().as_secs_f64() * 1000.0,
            ok = outcome.is_ok(),
            "placement batch"
        );
        match outcome {
            Ok(placements) => {
                for ((queued, placement), used) in batch.into_iter().zip(placements).zip(used) {
                    let (policy, by_plugin) = used.into_inner().unwrap_or_default();
                    let _ = queued.reply.send(Ok(Placed {
                        placement,
                        policy,
                        by_plugin,
                    }));
                }
            }
            Err(error) => {
                for queued in batch {
                    let _ = queued.reply.send(Err(ApiError::Store(same_error(&error))));
                }
                if is_unavailable(&error) {
                    return Err(error);
                }
            }
        }
        Ok(())
    }
}

fn is_unavailable(error: &StoreError) -> bool {
    matches!(error, StoreError::Unavailable(_))
}

/// The batch's error, for each of its placements.
fn same_error(error: &StoreError) -> StoreError {
    match error {
        StoreError::NotFound(what) => StoreError::NotFound(what.clone()),
        StoreError::Superseded => StoreError::Superseded,
        StoreError::Conflict(what) => StoreError::Conflict(what.clone()),
        StoreError::Unavailable(error) => {
            StoreError::unavailable(crate::store::describe_with_code(error))
        }
        StoreError::Internal(error) => {
            StoreError::Internal(sqlx::Error::Protocol(error.to_string()))
        }
    }
}
