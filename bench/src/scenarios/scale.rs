//! scale: a farm of 10,000 machines and 1,000,000 sessions (`--machines/--sessions` scale it
//! down). Loaded through the agents' RESYNC; then the broker's resident memory, Redirect
//! latency at that size, and the restart: the broker process is killed (SIGKILL), a new one
//! starts on the same database and address, and the time until every machine is READY again
//! (agents reconnect with the real agent's backoff and resync everything they hold).

use super::{FARM, channels, redirect_load, seconds};
use crate::Context;
use crate::env::{Broker, Database};
use crate::report::Report;
use crate::sim::{SimFarm, base_user, farm_specs};
use rand::Rng;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Options {
    pub machines: usize,
    pub sessions: usize,
    pub join_concurrency: usize,
    pub concurrency: usize,
    pub duration: Duration,
    pub new_user_percent: u32,
    /// Longest wait for every machine to be READY (initial load and after the restart).
    pub ready_limit: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            machines: 10_000,
            sessions: 1_000_000,
            join_concurrency: 64,
            concurrency: 16,
            duration: Duration::from_secs(10),
            new_user_percent: 10,
            ready_limit: Duration::from_secs(3600),
        }
    }
}

pub async fn run(context: &Context, options: &Options) -> anyhow::Result<Vec<Report>> {
    let database = Database::create(context.store).await?;
    let result = run_on(context, options, &database).await;
    database.drop_database().await;
    result
}

fn memory_mib(broker: &Broker) -> (f64, f64) {
    broker
        .memory_kib()
        .map_or((f64::NAN, f64::NAN), |(rss, hwm)| {
            (rss as f64 / 1024.0, hwm as f64 / 1024.0)
        })
}

async fn run_on(
    context: &Context,
    options: &Options,
    database: &Database,
) -> anyhow::Result<Vec<Report>> {
    let mut broker_options = context.broker_options(&database.url);
    broker_options.max_pending_logons_per_machine = Some(100_000);
    let broker = Broker::start(context.mode, &broker_options, None).await?;
    let address = broker.address;
    let (idle_rss, _) = memory_mib(&broker);
    let loading = Instant::now();
    let farm = SimFarm::start(
        &context.farm_settings(&broker.url(), FARM),
        farm_specs("scale", options.machines, options.sessions, false),
        Some(options.join_concurrency),
    )?;
    farm.wait_ready(options.machines, options.ready_limit)
        .await?;
    let load_time = loading.elapsed();
    context.progress(&format!("loaded in {load_time:?}"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (loaded_rss, loaded_hwm) = memory_mib(&broker);
    let sessions = options.sessions.max(1);
    let new_percent = options.new_user_percent;
    let pick = move |worker: usize, iteration: u64| {
        let mut rng = rand::rng();
        if rng.random_range(0..100) < new_percent {
            format!("new-w{worker}-{iteration}-{}", rng.random::<u32>())
        } else {
            base_user(rng.random_range(0..sessions))
        }
    };
    let before = {
        let channels = channels(&broker.url(), 4).await?;
        redirect_load(
            &channels,
            options.concurrency,
            Duration::from_secs(1),
            options.duration,
            pick,
        )
        .await
    };
    context.progress("killing the broker");
    let ends_before = farm.counters.stream_ends.load(Ordering::Relaxed);
    let killed = Instant::now();
    broker.kill().await;
    farm.wait_not_ready(options.machines, Duration::from_secs(60))
        .await?;
    let broker = Broker::start(context.mode, &broker_options, Some(address)).await?;
    let serving = Instant::now();
    let broker_start = serving - killed;
    let resync = farm
        .wait_ready(options.machines, options.ready_limit)
        .await?;
    let restart_total = killed.elapsed();
    let reconnect_failures = farm.counters.stream_ends.load(Ordering::Relaxed) - ends_before;
    context.progress(&format!("resynced in {resync:?}"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (resynced_rss, resynced_hwm) = memory_mib(&broker);
    let after = {
        let channels = channels(&broker.url(), 4).await?;
        redirect_load(
            &channels,
            options.concurrency,
            Duration::from_secs(1),
            options.duration,
            pick,
        )
        .await
    };
    let mut report = Report::new("scale");
    report
        .set("store", context.store.name())
        .set("machines", options.machines as u64)
        .set("sessions", options.sessions as u64)
        .num("load_s", seconds(load_time), 1)
        .num("rss_idle_mib", idle_rss, 0)
        .num("rss_loaded_mib", loaded_rss, 0)
        .num("rss_peak_load_mib", loaded_hwm, 0)
        .set("inflight", options.concurrency as u64)
        .num("decisions_per_s", before.rate(), 0)
        .latency("", &before.histogram)
        .set("errors", before.errors)
        .num("broker_start_s", seconds(broker_start), 2)
        .num("resync_s", seconds(resync), 2)
        .num("kill_to_all_ready_s", seconds(restart_total), 2)
        .set("stream_failures", reconnect_failures)
        .num("rss_resynced_mib", resynced_rss, 0)
        .num("rss_peak_after_restart_mib", resynced_hwm, 0)
        .num("after_restart_decisions_per_s", after.rate(), 0)
        .latency("after_restart_", &after.histogram)
        .set("after_restart_errors", after.errors);
    if let Some(error) = before.top_error().or_else(|| after.top_error()) {
        report.set("top_error", error.replace(' ', "_"));
    }
    farm.stop().await;
    broker.stop().await;
    Ok(vec![report])
}
