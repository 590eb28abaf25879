//! storm: `users` distinct users log on within `over`: each is sent to Redirect at its
//! scheduled instant (open loop), and the machine it names (a simulated agent) then sends a
//! LOGON event on its stream, as the terminal server would once the user logs on. Afterwards
//! ListSessions must show every user exactly once, and the farm evenly loaded.

use super::{FARM, channels, list_all_sessions, redirect_request, seconds};
use crate::Context;
use crate::env::{Broker, Database};
use crate::report::{Report, histogram, record};
use crate::sim::{SimFarm, farm_specs};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tsbroker_common::proto::v1::broker_client::BrokerClient;
use uuid::Uuid;

#[derive(Clone, Debug)]
pub struct Options {
    pub machines: usize,
    pub users: usize,
    pub over: Duration,
    /// Weights alternate 100 and 200 (spread is then measured per 100 of weight).
    pub mixed_weights: bool,
    pub connections: usize,
    /// Wait this long after every machine is READY before the storm (lets a farm's
    /// slow-start period pass).
    pub settle: Duration,
    /// Turn the farm's slow start off. With it on (60 s by default), machines that became
    /// READY moments apart take shares of a storm in proportion to how long they have been
    /// READY, so a storm right after the farm joined is uneven by design.
    pub slow_start_off: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            machines: 100,
            users: 10_000,
            over: Duration::from_secs(10),
            mixed_weights: true,
            connections: 4,
            settle: Duration::ZERO,
            slow_start_off: true,
        }
    }
}

pub async fn run(context: &Context, options: &Options) -> anyhow::Result<Vec<Report>> {
    let database = Database::create(context.store).await?;
    let result = run_on(context, options, &database).await;
    database.drop_database().await;
    result
}

enum Outcome {
    Ok,
    RedirectFailed(String),
    UnknownMachine,
    LogonFailed(String),
}

async fn run_on(
    context: &Context,
    options: &Options,
    database: &Database,
) -> anyhow::Result<Vec<Report>> {
    let mut broker_options = context.broker_options(&database.url);
    broker_options.slow_start_off = options.slow_start_off;
    let broker = Broker::start(context.mode, &broker_options, None).await?;
    let farm = Arc::new(SimFarm::start(
        &context.farm_settings(&broker.url(), FARM),
        farm_specs("storm", options.machines, 0, options.mixed_weights),
        None,
    )?);
    farm.wait_ready(options.machines, Duration::from_secs(300))
        .await?;
    tokio::time::sleep(options.settle).await;
    broker.past_start_hold().await;
    context.progress(&format!(
        "{} machines ready; storm of {} users",
        options.machines, options.users
    ));
    let channels = channels(&broker.url(), options.connections).await?;
    let interval = options.over.as_secs_f64() / options.users.max(1) as f64;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(options.users);
    for index in 0..options.users {
        let at = started + Duration::from_secs_f64(interval * index as f64);
        let mut client = BrokerClient::new(channels[index % channels.len()].clone());
        let farm = farm.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let user = format!("storm-{index}");
            let began = Instant::now();
            let answer = client.redirect(redirect_request(user.clone())).await;
            let latency = began.elapsed();
            let answer = match answer {
                Ok(answer) => answer.into_inner(),
                Err(status) => {
                    return (
                        latency,
                        Outcome::RedirectFailed(format!("{:?}", status.code())),
                    );
                }
            };
            let Some(machine) = Uuid::parse_str(&answer.machine_id)
                .ok()
                .and_then(|id| farm.machine(&id))
            else {
                return (latency, Outcome::UnknownMachine);
            };
            match machine.logon(&user).await {
                Ok(_) => (latency, Outcome::Ok),
                Err(error) => (latency, Outcome::LogonFailed(error)),
            }
        }));
    }
    let mut latencies = histogram();
    let mut errors = 0u64;
    let mut error_kinds: BTreeMap<String, u64> = BTreeMap::new();
    for task in tasks {
        let (latency, outcome) = task.await?;
        record(&mut latencies, latency);
        let kind = match outcome {
            Outcome::Ok => continue,
            Outcome::RedirectFailed(code) => format!("redirect_{code}"),
            Outcome::UnknownMachine => "unknown_machine".to_owned(),
            Outcome::LogonFailed(error) => format!("logon_{}", error.replace(' ', "_")),
        };
        errors += 1;
        *error_kinds.entry(kind).or_insert(0) += 1;
    }
    let elapsed = started.elapsed();
    let sessions = list_all_sessions(channels[0].clone()).await?;
    let mut per_user: HashMap<&str, u32> = HashMap::new();
    let mut per_machine: HashMap<Uuid, u64> = HashMap::new();
    for session in &sessions {
        *per_user.entry(session.user_name.as_str()).or_insert(0) += 1;
        if let Ok(id) = Uuid::parse_str(&session.machine_id) {
            *per_machine.entry(id).or_insert(0) += 1;
        }
    }
    let duplicates = per_user.values().filter(|count| **count > 1).count() as u64;
    let missing = (0..options.users)
        .filter(|index| !per_user.contains_key(format!("storm-{index}").as_str()))
        .count() as u64;
    let loads: Vec<f64> = farm
        .machines
        .iter()
        .map(|machine| {
            let count = per_machine.get(&machine.id).copied().unwrap_or(0);
            count as f64 * 100.0 / f64::from(machine.weight)
        })
        .collect();
    let max = loads.iter().copied().fold(f64::MIN, f64::max);
    let min = loads.iter().copied().fold(f64::MAX, f64::min);
    let mut report = Report::new("storm");
    report
        .set("store", context.store.name())
        .set("machines", options.machines as u64)
        .set("users", options.users as u64)
        .set(
            "slow_start",
            if options.slow_start_off {
                "off"
            } else {
                "default"
            },
        )
        .num("settle_s", seconds(options.settle), 0)
        .num("over_s", seconds(options.over), 1)
        .num("elapsed_s", seconds(elapsed), 2)
        .set("errors", errors)
        .set("duplicates", duplicates)
        .set("missing", missing)
        .set("sessions", sessions.len() as u64)
        .num("spread", max - min, 2)
        .num("max_per_100w", max, 2)
        .num("min_per_100w", min, 2)
        .latency("redirect_", &latencies)
        .num("redirect_max_ms", latencies.max() as f64 / 1000.0, 1);
    if let Some((kind, count)) = error_kinds.iter().max_by_key(|(_, count)| **count) {
        report.set("top_error", format!("{count}x_{kind}"));
    }
    drop(channels);
    if let Ok(farm) = Arc::try_unwrap(farm) {
        farm.stop().await;
    }
    broker.stop().await;
    Ok(vec![report])
}
