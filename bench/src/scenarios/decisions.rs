//! decisions: a farm of 1,000 machines holding 100,000 sessions (loaded through the agents'
//! RESYNC), then closed-loop Redirect at each concurrency for a fixed time, and in the same run
//! grpc.health.v1 Check at the same concurrency on the same server: decisions as a ratio of
//! that trivial RPC's rate. The user mix: `new_user_percent` of the calls are users never seen
//! (a placement: farm lock, pending logon recorded), the rest are users with a session
//! (half disconnected, half active).

use super::{FARM, channels, echo_load, redirect_load, seconds};
use crate::env::{Broker, CpuOf, CpuWindow, Database, micros_per};
use crate::report::Report;
use crate::sim::{SimFarm, base_user, farm_specs};
use crate::{Context, ProcessMode, StoreKind};
use rand::Rng;
use std::time::{Duration, Instant};

/// What sqlx names its SQLite connection threads (`sqlx-sqlite-worker-N`, cut to 15 bytes).
const SQLITE_THREADS: &str = "sqlx-sqlite-wor";

#[derive(Clone, Debug)]
pub struct Options {
    pub machines: usize,
    pub sessions: usize,
    pub concurrency: Vec<usize>,
    pub duration: Duration,
    pub warmup: Duration,
    pub new_user_percent: u32,
    /// HTTP/2 connections the load is spread over.
    pub connections: usize,
    /// Machines joining (RESYNC) at once during the bulk load.
    pub join_concurrency: usize,
    /// The broker's cap of logons in flight per machine (new users pile up as pending logons,
    /// since no agent logs them on).
    pub max_pending_logons_per_machine: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            machines: 1_000,
            sessions: 100_000,
            concurrency: vec![1, 16, 64],
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            new_user_percent: 10,
            connections: 4,
            join_concurrency: 64,
            max_pending_logons_per_machine: 100_000,
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
    let mut broker_options = context.broker_options(&database.url);
    broker_options.max_pending_logons_per_machine = Some(options.max_pending_logons_per_machine);
    let broker = Broker::start(context.mode, &broker_options, None).await?;
    context.progress(&format!("broker up at {}", broker.address));
    let loaded = Instant::now();
    let farm = SimFarm::start(
        &context.farm_settings(&broker.url(), FARM),
        farm_specs("ts", options.machines, options.sessions, false),
        Some(options.join_concurrency),
    )?;
    farm.wait_ready(options.machines, Duration::from_secs(1800))
        .await?;
    let load_time = loaded.elapsed();
    context.progress(&format!(
        "{} machines, {} sessions loaded through RESYNC in {load_time:?}",
        options.machines, options.sessions
    ));
    broker.past_start_hold().await;
    let channels = channels(&broker.url(), options.connections).await?;
    let mut reports = Vec::new();
    // The broker's CPU is read only when it runs as its own process.
    let broker_pid = broker
        .pid()
        .filter(|_| context.mode == ProcessMode::Process);
    for &concurrency in &options.concurrency {
        let echo_cpu = CpuWindow::start(vec![broker_pid], options.warmup, options.duration);
        let echo = echo_load(&channels, concurrency, options.warmup, options.duration).await;
        let echo_cpu = echo_cpu.seconds().await[0];
        // The whole broker, and its SQLite connection threads (placements and stream writes).
        let decisions_cpu = CpuWindow::of(
            vec![
                broker_pid.map(CpuOf::Process),
                broker_pid
                    .filter(|_| context.store == StoreKind::Sqlite)
                    .map(|pid| CpuOf::Threads(pid, SQLITE_THREADS)),
            ],
            options.warmup,
            options.duration,
        );
        let sessions = options.sessions.max(1);
        let new_percent = options.new_user_percent;
        let decisions = redirect_load(
            &channels,
            concurrency,
            options.warmup,
            options.duration,
            move |worker, iteration| {
                let mut rng = rand::rng();
                if rng.random_range(0..100) < new_percent {
                    format!("new-c{concurrency}-w{worker}-{iteration}")
                } else {
                    base_user(rng.random_range(0..sessions))
                }
            },
        )
        .await;
        let (decisions_cpu, sqlite_cpu) = match decisions_cpu.seconds().await[..] {
            [whole, sqlite] => (whole, sqlite),
            _ => (None, None),
        };
        let mut report = Report::new("decisions");
        report
            .set("store", context.store.name())
            .set("machines", options.machines as u64)
            .set("sessions", options.sessions as u64)
            .set("inflight", concurrency as u64)
            .set("new_user_pct", u64::from(options.new_user_percent))
            .num("decisions_per_s", decisions.rate(), 0)
            .latency("", &decisions.histogram)
            .set("errors", decisions.errors)
            .num("echo_per_s", echo.rate(), 0)
            .latency("echo_", &echo.histogram)
            .num("ratio_to_echo", decisions.rate() / echo.rate().max(1.0), 3)
            .num("load_s", seconds(load_time), 1);
        if let Some(busy) = decisions_cpu {
            report.num("broker_cpu_cores", busy / options.duration.as_secs_f64(), 2);
        }
        // The broker's CPU per call: what a decision costs it against what the echo does,
        // a ratio that moves far less than the rates with the rest of the machine's load.
        let per_decision = micros_per(decisions_cpu, decisions.ok + decisions.errors);
        let per_echo = micros_per(echo_cpu, echo.ok + echo.errors);
        if let (Some(per_decision), Some(per_echo)) = (per_decision, per_echo) {
            report
                .num("broker_cpu_us_per_decision", per_decision, 1)
                .num("broker_cpu_us_per_echo", per_echo, 1)
                .num(
                    "echo_to_decision_cpu",
                    per_echo / per_decision.max(0.001),
                    3,
                );
        }
        if let (Some(sqlite), Some(whole)) = (sqlite_cpu, decisions_cpu) {
            if let Some(per_decision) = micros_per(Some(sqlite), decisions.ok + decisions.errors) {
                report.num("broker_sqlite_cpu_us_per_decision", per_decision, 1);
            }
            report.num("broker_sqlite_cpu_share", sqlite / whole.max(0.001), 3);
        }
        if let Some(error) = decisions.top_error() {
            report.set("top_error", error.replace(' ', "_"));
        }
        context.progress(&report.line());
        reports.push(report);
    }
    drop(channels);
    farm.stop().await;
    broker.stop().await;
    Ok(reports)
}
