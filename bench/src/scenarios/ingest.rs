//! ingest: `machines` simulated agents stream session events as fast as acknowledgements
//! allow (each keeps `window` events unacknowledged); the rate of acknowledged (durable)
//! events. In the same run, on the same database: the raw insert rate of equivalent rows
//! into a scratch table by a plain sqlx loop (one INSERT per row, `window` rows per
//! transaction, as many connections as the broker's pool), the baseline of the ratio.

use super::{FARM, seconds};
use crate::env::{Broker, Database, StoreKind, process_cpu_seconds};
use crate::report::Report;
use crate::sim::{IngestOrder, SimFarm, farm_specs};
use crate::{Context, ProcessMode};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Clone, Debug)]
pub struct Options {
    pub machines: usize,
    pub window: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Connections of the raw-insert baseline (0: the broker's pool size, 32 on PostgreSQL,
    /// 1 on SQLite, whose writes serialize anyway).
    pub baseline_connections: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            machines: 1_000,
            window: 32,
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(3),
            baseline_connections: 0,
        }
    }
}

pub async fn run(context: &Context, options: &Options) -> anyhow::Result<Vec<Report>> {
    let database = Database::create(context.store).await?;
    let result = run_on(context, options, &database).await;
    database.drop_database().await;
    result
}

async fn run_on(
    context: &Context,
    options: &Options,
    database: &Database,
) -> anyhow::Result<Vec<Report>> {
    let broker = Broker::start(context.mode, &context.broker_options(&database.url), None).await?;
    let farm = SimFarm::start(
        &context.farm_settings(&broker.url(), FARM),
        farm_specs("ingest", options.machines, 0, false),
        Some(64),
    )?;
    farm.wait_ready(options.machines, Duration::from_secs(600))
        .await?;
    context.progress(&format!("{} machines ready; ingesting", options.machines));
    let order = IngestOrder {
        window: options.window.max(1),
        acked: Arc::new(AtomicU64::new(0)),
        rejected: Arc::new(AtomicU64::new(0)),
        stop: CancellationToken::new(),
    };
    for machine in &farm.machines {
        machine.ingest(order.clone());
    }
    tokio::time::sleep(options.warmup).await;
    let ends_before = farm.counters.stream_ends.load(Ordering::Relaxed);
    let cpu_before = broker.pid().and_then(process_cpu_seconds);
    let acked_before = order.acked.load(Ordering::Relaxed);
    let measured = Instant::now();
    tokio::time::sleep(options.duration).await;
    let acked = order.acked.load(Ordering::Relaxed) - acked_before;
    let elapsed = measured.elapsed();
    let cpu_after = broker.pid().and_then(process_cpu_seconds);
    order.stop.cancel();
    let stream_ends = farm.counters.stream_ends.load(Ordering::Relaxed) - ends_before;
    // Let the last windows drain before the baseline runs on the same database.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rate = acked as f64 / elapsed.as_secs_f64();
    context.progress(&format!(
        "{rate:.0} durable events/s; raw insert baseline next"
    ));
    let connections = match (options.baseline_connections, context.store) {
        (0, StoreKind::Postgres) => 32,
        (0, StoreKind::Sqlite) => 1,
        (connections, _) => connections,
    };
    let raw = raw_insert_rate(
        database,
        connections,
        options.window.max(1),
        options.duration,
    )
    .await?;
    let mut report = Report::new("ingest");
    report
        .set("store", context.store.name())
        .set("machines", options.machines as u64)
        .set("window", options.window as u64)
        .num("duration_s", seconds(elapsed), 1)
        .set("acked_events", acked)
        .num("events_per_s", rate, 0)
        .set("rejected", order.rejected.load(Ordering::Relaxed))
        .set("stream_ends", stream_ends)
        .num("raw_rows_per_s", raw, 0)
        .set("raw_connections", connections as u64)
        .num("ratio_to_raw", rate / raw.max(1.0), 3);
    if context.mode == ProcessMode::Process
        && let (Some(before), Some(after)) = (cpu_before, cpu_after)
    {
        report.num(
            "broker_cpu_cores",
            (after - before) / elapsed.as_secs_f64(),
            2,
        );
    }
    farm.stop().await;
    broker.stop().await;
    Ok(vec![report])
}

const RAW_INSERT: &str = "INSERT INTO bench_raw_sessions (machine_id, session_id, farm, \
     user_name, user_key, domain, state, client_address, logon_at, state_changed_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";

/// `connections` workers insert rows into `bench_raw_sessions` through `$pool`, `batch` rows
/// per transaction begun by `$begin`, until `duration` is over; evaluates to rows per second.
macro_rules! raw_insert_loop {
    ($pool:expr, |$p:ident| $begin:expr, $connections:expr, $batch:expr, $duration:expr) => {{
        let rows = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + $duration;
        let started = Instant::now();
        let mut workers = Vec::new();
        for worker in 0..$connections {
            let pool = $pool.clone();
            let rows = rows.clone();
            workers.push(tokio::spawn(async move {
                let machine = uuid::Uuid::new_v4();
                let mut n = 0i64;
                while Instant::now() < deadline {
                    let $p = &pool;
                    let mut tx = $begin.await?;
                    for _ in 0..$batch {
                        n += 1;
                        let user = format!("raw{worker}-{n}");
                        sqlx::query(RAW_INSERT)
                            .bind(machine)
                            .bind(n)
                            .bind(FARM)
                            .bind(&user)
                            .bind(&user)
                            .bind("")
                            .bind("active")
                            // A client address, as the simulated agents' sessions have.
                            .bind(format!("10.0.{}.{}:40000", (n >> 8) & 255, n & 255))
                            .bind(n)
                            .bind(n)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    rows.fetch_add($batch as u64, Ordering::Relaxed);
                }
                Ok::<(), sqlx::Error>(())
            }));
        }
        for worker in workers {
            worker.await??;
        }
        rows.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
    }};
}

/// Rows per second that a plain sqlx loop inserts into a scratch table shaped like `sessions`.
async fn raw_insert_rate(
    database: &Database,
    connections: usize,
    batch: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    match database.kind {
        StoreKind::Postgres => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(connections as u32)
                .connect(&database.url)
                .await?;
            sqlx::query(
                "CREATE TABLE bench_raw_sessions (machine_id uuid NOT NULL, session_id bigint NOT NULL, \
                 farm text NOT NULL, user_name text NOT NULL, user_key text NOT NULL, domain text NOT NULL, \
                 state text NOT NULL, client_address text NOT NULL, logon_at bigint NOT NULL, \
                 state_changed_at bigint NOT NULL)",
            )
            .execute(&pool)
            .await?;
            let rate = raw_insert_loop!(pool, |p| p.begin(), connections, batch, duration);
            pool.close().await;
            Ok(rate)
        }
        StoreKind::Sqlite => {
            use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
            use std::str::FromStr;
            // The broker's own settings: WAL, synchronous FULL, BEGIN IMMEDIATE.
            let options = SqliteConnectOptions::from_str(&database.url)?
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10));
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(connections as u32)
                .connect_with(options)
                .await?;
            sqlx::query(
                "CREATE TABLE bench_raw_sessions (machine_id BLOB NOT NULL, session_id INTEGER NOT NULL, \
                 farm TEXT NOT NULL, user_name TEXT NOT NULL, user_key TEXT NOT NULL, domain TEXT NOT NULL, \
                 state TEXT NOT NULL, client_address TEXT NOT NULL, logon_at INTEGER NOT NULL, \
                 state_changed_at INTEGER NOT NULL)",
            )
            .execute(&pool)
            .await?;
            let rate = raw_insert_loop!(
                pool,
                |p| p.begin_with("BEGIN IMMEDIATE"),
                connections,
                batch,
                duration
            );
            pool.close().await;
            Ok(rate)
        }
    }
}
