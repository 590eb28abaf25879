//! Assembles and runs the broker: health and reflection first (NOT_SERVING), then the store,
//! then SERVING; on shutdown, NOT_SERVING again, agents told to go, and a bounded drain.

use crate::config::BrokerConfig;
use crate::decision::policy::PolicyRegistry;
use crate::decision::{Decider, DecisionSettings};
use crate::directory::SessionDirectory;
use crate::metrics::{FarmSources, Metrics};
use crate::plugin::PluginHub;
use crate::service::admin_api::AdminApi;
use crate::service::auth::AccessGuard;
use crate::service::broker_api::BrokerApi;
use crate::service::gateway::{GatewayApi, GatewaySettings};
use crate::service::{Core, CoreCell};
use crate::store::reachability::Reachability;
use crate::store::{self, IngestWriter, Store};
use crate::tls::TlsListener;
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tsbroker_common::proto::FILE_DESCRIPTOR_SET;
use tsbroker_common::proto::v1::{admin_server, agent_gateway_server, broker_server};
use tsbroker_common::serve::accepted_connections;

/// Streams reset before the server took them, at most, on one connection (see the builder).
const PENDING_ACCEPT_RESETS: usize = 4096;
/// What one stream may send before the broker has read it (HTTP/2 flow control; hyper's
/// default is 1 MiB). An agent's stream is the one a broker reads at its own pace (a batch,
/// then its transaction), and h2 ends a connection (GOAWAY ENHANCE_YOUR_CALM, "too many small
/// DATA frames") once the frames it holds unread cost more than half the connection's window
/// in framing (256 bytes a frame, less its payload). A front door's burst sends its session
/// events a small frame each: at 1 MiB a few thousand connections overran that budget, and
/// the agent's stream, with every `Redirect` in flight on its connection, was cut (a machine
/// unreachable for a moment, its users' logons refused). 64 KiB is still ~1,300 session
/// events ahead of the broker, five of its batches.
const STREAM_WINDOW: u32 = 64 * 1024;
/// The connection's window, and so (halved) h2's budget for unread small frames: with
/// [`STREAM_WINDOW`] it covers a stream filled with the smallest messages an agent sends (a
/// load report, 8 bytes and more a frame).
const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// The service names the health service reports on ("" is the whole server).
const HEALTH_NAMES: [&str; 4] = [
    "",
    "tsbroker.v1.Broker",
    "tsbroker.v1.Admin",
    "tsbroker.v1.AgentGateway",
];

/// The services this server answers, the ones reflection lists. `tsbroker.v1.Plugin` (served
/// by plug-ins, not here) stays describable: every type of the descriptor sets is.
const SERVED_SERVICES: [&str; 6] = [
    broker_server::SERVICE_NAME,
    admin_server::SERVICE_NAME,
    agent_gateway_server::SERVICE_NAME,
    tonic_health::pb::health_server::SERVICE_NAME,
    tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
    tonic_reflection::pb::v1alpha::server_reflection_server::SERVICE_NAME,
];

fn reflection() -> tonic_reflection::server::Builder<'static> {
    SERVED_SERVICES.into_iter().fold(
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ),
        |builder, service| builder.with_service_name(service),
    )
}

const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// How often it is checked while it does not answer: new users wait for its return (up to
/// `decision::NEW_USER_HOLD`), and agents are let back in once it is seen back.
const HEALTH_RECHECK_INTERVAL: Duration = Duration::from_millis(200);

/// Serves the broker on `listener` until `shutdown` is cancelled. `main` and the tests share
/// this entry.
pub async fn run(
    config: BrokerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    let core = CoreCell::default();
    if let Some(address) = config.metrics_listen {
        let metrics_listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("listen for metrics on {address}"))?;
        let (scraped, core) = (metrics.clone(), core.clone());
        tokio::spawn(tsbroker_common::metrics_http::serve(
            move || {
                let (metrics, core) = (scraped.clone(), core.clone());
                async move {
                    let sources = core.get().ok().map(|core| FarmSources {
                        store: core.store.as_ref(),
                        lease_cutoff: core.decider.lease_cutoff(core.store.now()),
                        directory: core.decider.directory(),
                    });
                    metrics.scrape(sources).await
                }
            },
            metrics_listener,
            shutdown.clone().cancelled_owned(),
        ));
    }
    let policies = PolicyRegistry::default();
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;

    let reflection_v1 = reflection().build_v1().context("build reflection v1")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("build reflection v1alpha")?;

    let tls = config.tls.as_ref().map(TlsListener::open).transpose()?;
    let certificates_required = tls
        .as_ref()
        .is_some_and(|tls| tls.client_certificates_required());
    let agent_guard = AccessGuard::token(config.agent_token.clone(), false, "AgentGateway")
        .not_for(config.admin_token.clone())
        .client_certificate(certificates_required);
    let admin_guard = AccessGuard::token(config.admin_token.clone(), true, "Admin")
        .not_for(config.agent_token.clone())
        .client_certificate(certificates_required);
    // Redirect books logons in flight and the queries list users: once agents need a token,
    // so do they (the front doors send the agent token; operators, either).
    let broker_guard = AccessGuard::token(config.agent_token.clone(), false, "Broker")
        .or_token(config.admin_token.clone())
        .client_certificate(certificates_required);
    if config.agent_token.is_none() && !config.listen.ip().to_canonical().is_loopback() {
        tracing::warn!(
            listen = %config.listen,
            "no agent token configured: anyone who reaches this address can stream as an agent, \
             book logons through Redirect and list the sessions (set --agent-token)"
        );
    }
    if config.admin_token.is_none() {
        tracing::warn!(
            "no admin token configured: the Admin service answers loopback clients only"
        );
    }
    let gateway_settings = GatewaySettings {
        heartbeat_interval: config.heartbeat_interval(),
        heartbeat_timeout: config.heartbeat_timeout,
        machine_named_by_certificate: certificates_required,
    };
    let gateway = agent_gateway_server::AgentGatewayServer::with_interceptor(
        GatewayApi::new(core.clone(), gateway_settings, shutdown.clone()),
        move |request| agent_guard.check(request),
    );
    let admin = admin_server::AdminServer::with_interceptor(
        AdminApi::new(core.clone(), policies.clone()),
        move |request| admin_guard.check(request),
    );
    let broker = broker_server::BrokerServer::with_interceptor(
        BrokerApi::new(core.clone()),
        move |request| broker_guard.check(request),
    );

    let local_address = listener
        .local_addr()
        .context("read the listening address")?;
    let server_stop = CancellationToken::new();
    let tls_mode = tls_mode(tls.as_deref());
    let router = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // h2 ends a connection (GOAWAY) on which more than 20 streams were reset before the
        // server took them: what a broker finds after a freeze of a few seconds (a paused VM)
        // when front doors gave up on their calls meanwhile, and that connection also carries
        // the agent's stream. Still bounded, against a client doing it on purpose.
        .http2_max_pending_accept_reset_streams(Some(PENDING_ACCEPT_RESETS))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(broker)
        .add_service(admin)
        .add_service(gateway);
    let stopped = server_stop.clone().cancelled_owned();
    let mut server_task =
        match tls {
            Some(tls) => tokio::spawn(router.serve_with_incoming_shutdown(
                tls.connections(listener, server_stop.clone()),
                stopped,
            )),
            None => tokio::spawn(
                router.serve_with_incoming_shutdown(accepted_connections(listener), stopped),
            ),
        };
    tracing::info!(
        %local_address,
        database = %redact_url(&config.database_url),
        tls = tls_mode,
        "tsbroker listening (health NOT_SERVING until its database is open)"
    );

    let store = tokio::select! {
        store = open_store(&config.database_url) => store,
        _ = shutdown.cancelled() => {
            server_stop.cancel();
            return Ok(());
        }
    };
    let store = match store {
        Ok(store) => store,
        Err(error) => {
            server_stop.cancel();
            return Err(error);
        }
    };
    // The database's clock, measured before anything is stamped with the broker's time, then
    // every minute.
    let clock_warned = crate::clock::measure(store.as_ref(), &metrics, false).await;
    tokio::spawn(crate::clock::follow(
        store.clone(),
        metrics.clone(),
        clock_warned,
        shutdown.clone(),
    ));
    let database = Arc::new(Reachability::new(config.heartbeat_timeout));
    restart_grace(store.as_ref(), &database, config.heartbeat_timeout).await;
    let decision_settings = DecisionSettings {
        heartbeat_timeout: config.heartbeat_timeout,
        pending_logon_ttl: config.pending_logon_ttl,
        max_pending_logons_per_machine: config.max_pending_logons_per_machine,
        database: database.clone(),
    };
    declare_farms(store.as_ref(), &config).await?;
    let plugins = PluginHub::start(
        &config.farms,
        store.clone(),
        &decision_settings,
        metrics.clone(),
        shutdown.clone(),
    )?;
    let decider = Arc::new(Decider::new(
        store.clone(),
        decision_settings,
        policies,
        config.farms.clone(),
        plugins.clone(),
        metrics.clone(),
        SessionDirectory::start(
            store.clone(),
            shutdown.child_token(),
            plugins.follow_other_replicas(store.clone()),
        ),
    ));
    core.set(Core {
        store: store.clone(),
        ingest: IngestWriter::for_store(store.clone(), database.clone()),
        changes: crate::service::changes::ChangeRouter::start(store.as_ref()),
        decider,
        plugins: plugins.clone(),
        metrics,
        database: database.clone(),
    });
    // The same check as the health monitor's, before saying SERVING (on SQLite a write: a
    // database that opened but takes no writes is not served).
    let checked = tokio::time::timeout(HEALTH_CHECK_INTERVAL, store.ping()).await;
    let serving = matches!(checked, Ok(Ok(())));
    if serving {
        set_health(&health, ServingStatus::Serving).await;
        tracing::info!(backend = store.backend(), "store ready; serving");
    } else {
        let why = match checked {
            Ok(Err(error)) => error.to_string(),
            _ => format!("no answer within {HEALTH_CHECK_INTERVAL:?}"),
        };
        tracing::error!(backend = store.backend(), %why, "store opened, but it does not answer (or, SQLite, take a write): not serving");
    }
    let monitor = tokio::spawn(monitor_store(
        store.clone(),
        health.clone(),
        database,
        serving,
        shutdown.clone(),
    ));

    let served = tokio::select! {
        _ = shutdown.cancelled() => None,
        served = &mut server_task => Some(served),
    };
    monitor.abort();
    if let Some(served) = served {
        store.release_database();
        return served.context("server task")?.context("serve grpc");
    }
    tracing::info!("shutting down");
    set_health(&health, ServingStatus::NotServing).await;
    plugins.terminate("broker shutting down").await;
    // Agent streams watch `shutdown` and are ending now; then the server drains its calls.
    server_stop.cancel();
    let served = tokio::time::timeout(config.shutdown_grace, server_task).await;
    store.close().await;
    // Another broker may open the database now (a restart in the same process).
    store.release_database();
    match served {
        Ok(served) => served.context("server task")?.context("serve grpc")?,
        Err(_) => {
            tracing::warn!(grace = %humantime::format_duration(config.shutdown_grace), "calls still open after the grace period; closing")
        }
    }
    tracing::info!("tsbroker stopped");
    Ok(())
}

/// After the broker was away (stopped, crashed, its host down), the machines its agents were
/// reporting count alive for two heartbeat timeouts from its start (see
/// `Reachability::started_after`): time for agents to reconnect through their backoff. On a
/// store that knows no machine, new logons wait for the agents' resyncs
/// (`Reachability::started_empty`).
async fn restart_grace(store: &dyn Store, database: &Reachability, heartbeat_timeout: Duration) {
    let Ok(machines) = store.list_machines(None).await else {
        return;
    };
    let last_heard = machines
        .iter()
        .filter(|machine| machine.machine_state() != tsbroker_common::model::MachineState::Removed)
        .map(|machine| machine.last_seen_at)
        .max();
    match last_heard {
        Some(last_heard) => database.started_after(
            last_heard,
            store.now(),
            2 * heartbeat_timeout,
            heartbeat_timeout,
        ),
        None => {
            tracing::info!(
                "the store knows no machine (a new database, or one made again): machines and \
                 their sessions come back as their agents connect; drains, weights, session \
                 limits and policies set through Admin are not in it"
            );
            database.started_empty(store.now());
        }
    }
}

/// Sets the policy of every farm the configuration names one for.
async fn declare_farms(store: &dyn Store, config: &BrokerConfig) -> anyhow::Result<()> {
    for (farm, settings) in &config.farms.farms {
        if let Some(policy) = &settings.policy {
            store
                .declare_farm(farm, policy, store.now())
                .await
                .with_context(|| format!("set the policy of farm {farm:?}"))?;
            tracing::info!(%farm, %policy, "farm policy from the configuration");
        }
    }
    Ok(())
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        health.set_service_status(name, status).await;
    }
}

/// Opens the store. PostgreSQL is retried with a growing pause, since the database may start
/// after the broker; SQLite too while its disk is full, read-only or failing (conditions that
/// clear up), and fails at once for the rest (a wrong path or permission, another broker on
/// the file: the operator's to fix).
async fn open_store(database_url: &str) -> anyhow::Result<Arc<dyn Store>> {
    let mut pause = Duration::from_millis(200);
    loop {
        let attempt = std::time::Instant::now();
        match store::open(database_url).await {
            Ok(store) => return Ok(store),
            Err(error) if database_url.starts_with("postgres") => {
                // The attempt itself may have waited (a server that does not answer): both are
                // said, so that the time to the next attempt is plain.
                tracing::warn!(
                    error = format!("{error:#}"),
                    attempt_took = %humantime::format_duration(round_to_ms(attempt.elapsed())),
                    retry_in = %humantime::format_duration(pause),
                    "database not ready"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(error) if store::sqlite_may_clear_up(&error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    retry_in = %humantime::format_duration(pause),
                    "the sqlite database cannot be opened for writing (a full disk or quota, a \
                     read-only file system, an I/O error, or a directory this user may not \
                     write its -wal and -shm files in): retrying, NOT_SERVING meanwhile"
                );
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(error) => return Err(error),
        }
    }
}

fn round_to_ms(duration: Duration) -> Duration {
    Duration::from_millis(duration.as_millis() as u64)
}

/// Asks when the database server started (`Reachability::server_seen`): one restarted between
/// two looks, or another that took over, is said, and taken as a return.
async fn server_seen(store: &dyn Store, database: &Reachability, now: i64, after_outage: bool) {
    let asked = tokio::time::timeout(HEALTH_CHECK_INTERVAL, store.server_started_at()).await;
    if let Ok(Ok(Some(started))) = asked
        && database.server_seen(started, now, after_outage)
        && !after_outage
    {
        tracing::warn!(
            "the database server restarted (or another took over) since the last look, unseen \
             away: the agents' streams here ask for their sessions again, in case it lost \
             changes it had acknowledged"
        );
    }
}

/// Flips health to NOT_SERVING (and `database` to away) while the database does not answer,
/// and back; checks every second while it is away, so that agents come back soon.
async fn monitor_store(
    store: Arc<dyn Store>,
    health: HealthReporter,
    database: Arc<Reachability>,
    mut serving: bool,
    shutdown: CancellationToken,
) {
    // The last check that found the database answering: an outage began after it.
    let mut last_up = store.now();
    // The server serving now, to tell another later.
    server_seen(store.as_ref(), &database, last_up, true).await;
    loop {
        let interval = if serving {
            HEALTH_CHECK_INTERVAL
        } else {
            HEALTH_RECHECK_INTERVAL
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let checked = tokio::time::timeout(HEALTH_CHECK_INTERVAL, store.ping()).await;
        let healthy = matches!(checked, Ok(Ok(())));
        let now = store.now();
        let back = healthy && !serving;
        if healthy {
            server_seen(store.as_ref(), &database, now, back).await;
        }
        if healthy != serving {
            serving = healthy;
            if healthy {
                database.came_back(now);
                tracing::info!(
                    "database answers again: serving (the agents' streams here ask for their \
                     sessions again, in case it lost changes it had acknowledged)"
                );
                set_health(&health, ServingStatus::Serving).await;
            } else {
                database.went_away(last_up);
                let why = match checked {
                    Ok(Err(error)) => error.to_string(),
                    _ => format!("no answer within {HEALTH_CHECK_INTERVAL:?}"),
                };
                tracing::error!(%why, "database does not answer, takes no write or is damaged: not serving");
                set_health(&health, ServingStatus::NotServing).await;
            }
        }
        if !healthy && serving == healthy && database.is_up() {
            // A request found it back (see `decision::wait_for_the_agents`), but it is away
            // again.
            database.went_away(last_up);
        }
        if healthy {
            last_up = now;
        }
    }
}

/// How the gRPC port is protected, for the start-up log line.
fn tls_mode(tls: Option<&TlsListener>) -> &'static str {
    match tls {
        None => "off",
        Some(tls) if tls.revocation_checked() => {
            "on, client certificates required, revocation checked"
        }
        Some(tls) if tls.client_certificates_required() => "on, client certificates required",
        Some(_) => "on",
    }
}

/// The URL without its password, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact_url("postgres://app:secret@db:5432/ts"),
            "postgres://app:***@db:5432/ts"
        );
        assert_eq!(
            super::redact_url("sqlite://tsbroker.db"),
            "sqlite://tsbroker.db"
        );
    }
}
