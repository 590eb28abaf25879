//! The group-commit writer. Streams hand it their writes ([`IngestWriter::submit`] and its
//! typed helpers) and wait; a single task gathers whatever has queued — up to
//! [`IngestSettings::max_group_weight`] rows — into one group, applies it in one transaction
//! ([`IngestTarget::apply_ingest`]) and, only after the commit, hands each stream its own
//! result through a oneshot. While a group is in its transaction the next one fills up, so the
//! busier the streams, the larger the groups; an idle writer starts on a lone write at once.
//!
//! Failures: a group that hits a deadlock or serialization conflict is applied again (up to
//! `attempts`); a group that fails because the database is unavailable fails every one of its
//! writes with that error; a group that fails for any other reason (a constraint, bad data) is
//! applied again one write per transaction, so only the write at fault fails, as it would have
//! alone. Nothing is acknowledged that was not committed.

use super::{IngestItem, IngestOp, ItemResult};
use crate::store::reachability::Reachability;
use crate::store::{EventOutcome, MachineRecord, Store, StoreError, StoreResult};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tsbroker_common::model::{self, LoadReport, MachineDescription, SessionEvent, SessionInfo};
use uuid::Uuid;

/// What the writer applies its groups to: the store (or, in tests, a stand-in).
#[async_trait::async_trait]
pub trait IngestTarget: Send + Sync + 'static {
    /// Applies the items in one transaction: `Err` if nothing was committed, else one result
    /// per item, in order.
    async fn apply_ingest(&self, items: &[IngestItem], now: i64) -> StoreResult<Vec<ItemResult>>;

    /// Now, by the farm's clock (`crate::clock`).
    fn now(&self) -> i64 {
        model::now_millis()
    }
}

struct StoreTarget(Arc<dyn Store>);

#[async_trait::async_trait]
impl IngestTarget for StoreTarget {
    async fn apply_ingest(&self, items: &[IngestItem], now: i64) -> StoreResult<Vec<ItemResult>> {
        self.0.apply_ingest(items, now).await
    }

    fn now(&self) -> i64 {
        self.0.now()
    }
}

/// How the writer groups.
#[derive(Clone, Debug)]
pub struct IngestSettings {
    /// Most work in one transaction, in rows (events and resynced sessions; 1 for any other
    /// write). A single larger write still goes alone.
    pub max_group_weight: usize,
    /// Group transactions in flight at once. Each stream has one write in flight, so two
    /// transactions never hold writes of the same stream.
    pub concurrency: usize,
    /// Writes queued before streams wait to queue theirs.
    pub queue: usize,
    /// Attempts of a group that fails on a deadlock or a serialization conflict.
    pub attempts: u32,
}

impl IngestSettings {
    /// PostgreSQL overlaps two transactions (one is built while the other commits); SQLite
    /// has one writer anyway.
    pub fn for_backend(backend: &str) -> Self {
        IngestSettings {
            max_group_weight: 8_192,
            concurrency: if backend == "sqlite" { 1 } else { 2 },
            queue: 16_384,
            attempts: 3,
        }
    }
}

struct Request {
    item: IngestItem,
    reply: oneshot::Sender<ItemResult>,
}

/// The streams' handle on the writer; the writer stops once every handle is gone.
#[derive(Clone)]
pub struct IngestWriter {
    queue: mpsc::Sender<Request>,
}

impl IngestWriter {
    /// A writer over `store`, with the settings for its backend; it tells `reachability`
    /// when the agents' writes stop going through, and when they go through again.
    pub fn for_store(store: Arc<dyn Store>, reachability: Arc<Reachability>) -> Self {
        let settings = IngestSettings::for_backend(store.backend());
        Self::start(Arc::new(StoreTarget(store)), settings, reachability)
    }

    /// Starts the writer task.
    pub fn start(
        target: Arc<dyn IngestTarget>,
        settings: IngestSettings,
        reachability: Arc<Reachability>,
    ) -> Self {
        let (queue, requests) = mpsc::channel(settings.queue.max(1));
        let outcomes = Arc::new(Outcomes {
            reachability,
            last_written: AtomicI64::new(0),
        });
        tokio::spawn(run(target, settings, requests, outcomes));
        IngestWriter { queue }
    }

    /// Queues the write and waits until its group is committed (or failed).
    pub async fn submit(&self, item: IngestItem) -> ItemResult {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Request { item, reply })
            .await
            .map_err(|_| writer_gone())?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// ADDED; see `Store::machine_added`.
    pub async fn machine_added(
        &self,
        description: MachineDescription,
        new_farm_policy: &str,
        connection: Uuid,
    ) -> StoreResult<MachineRecord> {
        self.submit(IngestItem::added(description, new_farm_policy, connection))
            .await?
            .into_machine()
    }

    /// RESYNC; see `Store::resync_sessions`.
    pub async fn resync(
        &self,
        machine: Uuid,
        connection: Uuid,
        sessions: Vec<SessionInfo>,
    ) -> StoreResult<()> {
        self.submit(item(machine, connection, IngestOp::Resync(sessions)))
            .await?
            .into_done()
    }

    /// READY; see `Store::set_machine_state`.
    pub async fn ready(&self, machine: Uuid, connection: Uuid) -> StoreResult<MachineRecord> {
        self.submit(item(machine, connection, IngestOp::Ready))
            .await?
            .into_machine()
    }

    /// A run of session events; see `Store::apply_session_events`.
    pub async fn events(
        &self,
        machine: Uuid,
        connection: Uuid,
        events: Vec<SessionEvent>,
    ) -> StoreResult<Vec<EventOutcome>> {
        self.submit(item(machine, connection, IngestOp::Events(events)))
            .await?
            .into_outcomes()
    }

    /// The stream's end; see `Store::mark_unreachable`.
    pub async fn unreachable(
        &self,
        machine: Uuid,
        connection: Uuid,
        agent_alive: bool,
    ) -> StoreResult<bool> {
        let op = match agent_alive {
            true => IngestOp::ClosedAlive,
            false => IngestOp::Unreachable,
        };
        self.submit(item(machine, connection, op))
            .await?
            .into_marked()
    }

    /// A load report; see `Store::record_load`.
    pub async fn load(&self, machine: Uuid, connection: Uuid, load: LoadReport) -> StoreResult<()> {
        self.submit(item(machine, connection, IngestOp::Load(load)))
            .await?
            .into_done()
    }
}

fn item(machine: Uuid, connection: Uuid, op: IngestOp) -> IngestItem {
    IngestItem {
        machine,
        connection,
        op,
    }
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable(sqlx::Error::PoolClosed)
}

/// Whether the groups go through, for the leases' cutoff: while they fail for want of the
/// database, no machine's lease is written, and none may be taken for gone for that.
struct Outcomes {
    reachability: Arc<Reachability>,
    /// When the last group committed (0: none yet).
    last_written: AtomicI64,
}

impl Outcomes {
    fn committed(&self, now: i64) {
        self.last_written.fetch_max(now, Ordering::Relaxed);
        self.reachability.writes_pass(now);
    }

    fn failed(&self, error: &StoreError, now: i64) {
        if matches!(error, StoreError::Unavailable(_)) {
            let last = self.last_written.load(Ordering::Relaxed);
            self.reachability
                .writes_failing(if last > 0 { last } else { now });
        }
    }
}

/// Gathers groups while a transaction slot is free; each group runs in its own task.
async fn run(
    target: Arc<dyn IngestTarget>,
    settings: IngestSettings,
    mut requests: mpsc::Receiver<Request>,
    outcomes: Arc<Outcomes>,
) {
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    loop {
        // Waiting for a slot first lets the queue fill while every slot is busy.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let Some(first) = requests.recv().await else {
            break;
        };
        let mut weight = first.item.weight();
        let mut group = vec![first];
        while weight < settings.max_group_weight {
            match requests.try_recv() {
                Ok(request) => {
                    weight += request.item.weight();
                    group.push(request);
                }
                Err(_) => break,
            }
        }
        let target = target.clone();
        let attempts = settings.attempts.max(1);
        let outcomes = outcomes.clone();
        tokio::spawn(async move {
            apply_group(target.as_ref(), group, attempts, &outcomes).await;
            drop(slot);
        });
    }
}

/// Applies one group and answers each of its writes.
async fn apply_group(
    target: &dyn IngestTarget,
    group: Vec<Request>,
    attempts: u32,
    outcomes: &Outcomes,
) {
    let (items, replies): (Vec<IngestItem>, Vec<oneshot::Sender<ItemResult>>) = group
        .into_iter()
        .map(|request| (request.item, request.reply))
        .unzip();
    let started = std::time::Instant::now();
    let applied = apply_with_retries(target, &items, attempts).await;
    match &applied {
        Ok(_) => outcomes.committed(target.now()),
        Err(error) => outcomes.failed(error, target.now()),
    }
    tracing::debug!(
        writes = items.len(),
        rows = items.iter().map(IngestItem::weight).sum::<usize>(),
        ms = started.elapsed().as_secs_f64() * 1e3,
        ok = applied.is_ok(),
        "group of stream writes"
    );
    match applied {
        Ok(results) if results.len() == items.len() => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Ok(results) => {
            tracing::error!(
                items = items.len(),
                results = results.len(),
                "the store answered a group with the wrong number of results"
            );
            let error = StoreError::Internal(sqlx::Error::Protocol(
                "ingest: wrong number of results".into(),
            ));
            for reply in replies {
                let _ = reply.send(Err(replicate(&error)));
            }
        }
        Err(error) if items.len() > 1 && !matches!(error, StoreError::Unavailable(_)) => {
            tracing::warn!(%error, writes = items.len(), "a group of stream writes failed; applying them one by one");
            for (item, reply) in items.into_iter().zip(replies) {
                let result =
                    match apply_with_retries(target, std::slice::from_ref(&item), attempts).await {
                        Ok(mut results) if results.len() == 1 => results.remove(0),
                        Ok(_) => Err(StoreError::Internal(sqlx::Error::Protocol(
                            "ingest: wrong number of results".into(),
                        ))),
                        Err(error) => Err(error),
                    };
                let _ = reply.send(result);
            }
        }
        Err(error) => {
            // While the database is away every group fails: one warning a minute.
            static FAILED_GROUPS: std::sync::LazyLock<
                tsbroker_common::warning_limit::WarningLimit,
            > = std::sync::LazyLock::new(Default::default);
            crate::error::warn_limited(&FAILED_GROUPS, &error, "a group of stream writes failed");
            for reply in replies {
                let _ = reply.send(Err(replicate(&error)));
            }
        }
    }
}

async fn apply_with_retries(
    target: &dyn IngestTarget,
    items: &[IngestItem],
    attempts: u32,
) -> StoreResult<Vec<ItemResult>> {
    let mut attempt = 1;
    loop {
        match target.apply_ingest(items, target.now()).await {
            Err(error) if attempt < attempts && is_conflict(&error) => {
                tracing::debug!(%error, attempt, "group of stream writes conflicted; again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A deadlock or a serialization failure: the transaction may simply be run again.
fn is_conflict(error: &StoreError) -> bool {
    match error {
        StoreError::Unavailable(sqlx::Error::Database(database_error)) => {
            matches!(database_error.code().as_deref(), Some("40P01" | "40001"))
        }
        _ => false,
    }
}

/// The same error for another waiter (a `sqlx::Error` cannot be cloned): the same kind, so
/// the same gRPC status, with the original's text.
fn replicate(error: &StoreError) -> StoreError {
    match error {
        StoreError::NotFound(what) => StoreError::NotFound(what.clone()),
        StoreError::Superseded => StoreError::Superseded,
        StoreError::Conflict(what) => StoreError::Conflict(what.clone()),
        StoreError::Unavailable(sqlx::Error::PoolTimedOut) => {
            StoreError::Unavailable(sqlx::Error::PoolTimedOut)
        }
        StoreError::Unavailable(sqlx::Error::PoolClosed) => {
            StoreError::Unavailable(sqlx::Error::PoolClosed)
        }
        StoreError::Unavailable(error) => StoreError::unavailable(error.to_string()),
        StoreError::Internal(error) => {
            StoreError::Internal(sqlx::Error::Protocol(error.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ingest::IngestReply;
    use std::sync::Mutex;
    use tokio::sync::Notify;

    /// Records each group's machines; holds the first group until released; fails groups as
    /// `fail` says.
    struct Fake {
        groups: Mutex<Vec<Vec<u128>>>,
        gate: Notify,
        gated: std::sync::atomic::AtomicBool,
        fail: fn(&[IngestItem]) -> Option<StoreError>,
    }

    impl Fake {
        fn new(fail: fn(&[IngestItem]) -> Option<StoreError>) -> Arc<Fake> {
            Arc::new(Fake {
                groups: Mutex::new(Vec::new()),
                gate: Notify::new(),
                gated: std::sync::atomic::AtomicBool::new(true),
                fail,
            })
        }

        fn groups(&self) -> Vec<Vec<u128>> {
            self.groups.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl IngestTarget for Fake {
        async fn apply_ingest(
            &self,
            items: &[IngestItem],
            _now: i64,
        ) -> StoreResult<Vec<ItemResult>> {
            if self.gated.swap(false, std::sync::atomic::Ordering::SeqCst) {
                self.gate.notified().await;
            }
            self.groups
                .lock()
                .unwrap()
                .push(items.iter().map(|item| item.machine.as_u128()).collect());
            if let Some(error) = (self.fail)(items) {
                return Err(error);
            }
            Ok(items.iter().map(|_| Ok(IngestReply::Done)).collect())
        }
    }

    fn settings() -> IngestSettings {
        IngestSettings {
            max_group_weight: 100,
            concurrency: 1,
            queue: 100,
            attempts: 3,
        }
    }

    fn load(machine: u128) -> IngestItem {
        item(
            Uuid::from_u128(machine),
            Uuid::nil(),
            IngestOp::Load(LoadReport::default()),
        )
    }

    /// Submits machine 0's write (held at the gate), then the others, then opens the gate.
    async fn submit_all(fake: &Arc<Fake>, machines: &[u128]) -> Vec<ItemResult> {
        let writer = IngestWriter::start(fake.clone(), settings(), Default::default());
        let first = tokio::spawn({
            let writer = writer.clone();
            async move { writer.submit(load(0)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let rest: Vec<_> = machines
            .iter()
            .map(|&machine| {
                let writer = writer.clone();
                tokio::spawn(async move { writer.submit(load(machine)).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        fake.gate.notify_one();
        let mut results = vec![first.await.unwrap()];
        for task in rest {
            results.push(task.await.unwrap());
        }
        results
    }

    #[tokio::test]
    async fn writes_that_queue_meanwhile_share_one_transaction() {
        let fake = Fake::new(|_| None);
        let results = submit_all(&fake, &[1, 2, 3, 4]).await;
        assert!(results.iter().all(|result| result.is_ok()), "{results:?}");
        let groups = fake.groups();
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!(groups[0], vec![0]);
        let mut second = groups[1].clone();
        second.sort_unstable();
        assert_eq!(second, vec![1, 2, 3, 4]);
    }

    /// Writes failing for want of the database hold the leases' cutoff at the last commit
    /// (no machine is taken for gone for it) until writes go through again.
    #[tokio::test]
    async fn failing_writes_hold_the_leases_until_writes_pass_again() {
        let fake = Fake::new(|items| {
            items
                .iter()
                .any(|item| item.machine.as_u128() == 7)
                .then_some(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
        });
        fake.gated.store(false, std::sync::atomic::Ordering::SeqCst);
        let reachability = Arc::new(Reachability::default());
        let writer = IngestWriter::start(fake.clone(), settings(), reachability.clone());
        let timeout = std::time::Duration::from_secs(15);
        writer.submit(load(1)).await.unwrap();
        let committed = model::now_millis();
        assert!(writer.submit(load(7)).await.is_err());
        let an_hour_later = committed + 3_600_000;
        assert!(reachability.lease_cutoff(an_hour_later, timeout) <= committed - 15_000);
        writer.submit(load(2)).await.unwrap();
        let passed = model::now_millis();
        assert!(reachability.lease_cutoff(passed + 60_000, timeout) >= passed + 45_000);
        // A write refused for its own fault is no outage.
        let refused = Fake::new(|_| Some(StoreError::Conflict("bad".into())));
        refused
            .gated
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let untouched = Arc::new(Reachability::default());
        let writer = IngestWriter::start(refused, settings(), untouched.clone());
        assert!(writer.submit(load(3)).await.is_err());
        let now = model::now_millis();
        assert_eq!(untouched.lease_cutoff(now, timeout), now - 15_000);
    }

    #[tokio::test]
    async fn an_unavailable_database_fails_every_write_of_the_group() {
        let fake = Fake::new(|items| {
            (items.len() > 1).then_some(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
        });
        let results = submit_all(&fake, &[1, 2, 3]).await;
        assert!(results[0].is_ok());
        for result in &results[1..] {
            assert!(
                matches!(result, Err(StoreError::Unavailable(_))),
                "{result:?}"
            );
        }
        assert_eq!(
            fake.groups().len(),
            2,
            "no retry of an unavailable database"
        );
    }

    #[tokio::test]
    async fn a_bad_write_fails_alone() {
        // Machine 2's write breaks any transaction it is in.
        let fake = Fake::new(|items| {
            items
                .iter()
                .any(|item| item.machine.as_u128() == 2)
                .then(|| StoreError::Conflict("bad".into()))
        });
        let results = submit_all(&fake, &[1, 2, 3]).await;
        assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok());
        assert!(
            matches!(results[2], Err(StoreError::Conflict(_))),
            "{results:?}"
        );
        // The group, then each of its writes alone.
        assert_eq!(fake.groups().len(), 5, "{:?}", fake.groups());
    }

    #[tokio::test]
    async fn group_weight_is_bounded() {
        let fake = Fake::new(|_| None);
        let writer = IngestWriter::start(
            fake.clone(),
            IngestSettings {
                max_group_weight: 10,
                ..settings()
            },
            Default::default(),
        );
        let first = tokio::spawn({
            let writer = writer.clone();
            async move { writer.submit(load(0)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let events = |machine: u128| {
            item(
                Uuid::from_u128(machine),
                Uuid::nil(),
                IngestOp::Events(vec![
                    SessionEvent {
                        kind: model::SessionEventKind::Logon,
                        session: SessionInfo {
                            session_id: 1,
                            user_name: "u".into(),
                            domain: String::new(),
                            state: model::SessionState::Active,
                            client_address: String::new(),
                            logon_time_ms: None,
                        },
                    };
                    4
                ]),
            )
        };
        let rest: Vec<_> = (1..=6)
            .map(|machine| {
                let writer = writer.clone();
                let item = events(machine);
                tokio::spawn(async move { writer.submit(item).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        fake.gate.notify_one();
        assert!(first.await.unwrap().is_ok());
        for task in rest {
            assert!(task.await.unwrap().is_ok());
        }
        // Four events each, at most ten rows a group: three writes, then three.
        let sizes: Vec<usize> = fake.groups().iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1, 3, 3]);
    }

    #[test]
    fn replicated_errors_keep_their_kind() {
        assert!(matches!(
            replicate(&StoreError::Unavailable(sqlx::Error::PoolTimedOut)),
            StoreError::Unavailable(sqlx::Error::PoolTimedOut)
        ));
        assert!(matches!(
            replicate(&StoreError::Internal(sqlx::Error::RowNotFound)),
            StoreError::Internal(_)
        ));
        assert!(matches!(
            replicate(&StoreError::Superseded),
            StoreError::Superseded
        ));
    }
}
