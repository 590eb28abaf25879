//! Prometheus metrics of one agent (`--metrics-listen`, `/metrics`; every name starts with
//! `tsagent_`): what its front door did with each connection, how long the broker took to
//! answer it, the bytes it carried; and, read at each scrape, the broker link, the sessions
//! and whether the session table is being saved. One registry per agent, no globals, so that
//! several agents can run in one test process.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::directory::Directory;
use crate::stream::SharedStatus;

/// What the front door did with a connection, once it knew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Handed to this machine's RDP service.
    Local,
    /// Sent on to another machine.
    Remote,
    /// Came from another front door (PROXY header) and went to this machine's RDP service.
    ProxiedIn,
    /// Closed without being handed anywhere: the broker or every target refused it.
    Refused,
    /// Closed before routing: no valid first packet within the client timeout.
    BadRequest,
}

impl Outcome {
    /// Every outcome, in declaration order (an outcome's index is `outcome as usize`).
    const ALL: [Outcome; 5] = [
        Outcome::Local,
        Outcome::Remote,
        Outcome::ProxiedIn,
        Outcome::Refused,
        Outcome::BadRequest,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Local => "local",
            Outcome::Remote => "remote",
            Outcome::ProxiedIn => "proxied_in",
            Outcome::Refused => "refused",
            Outcome::BadRequest => "bad_request",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    /// The gRPC code the broker answered with, or `timeout`.
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// The agent's metrics.
pub struct AgentMetrics {
    registry: Registry,
    /// Each outcome's counter, in `Outcome::ALL`'s order: taken from their family once, so a
    /// connection costs an atomic add, not a lookup (and every outcome shows, at 0 at first).
    connections: Vec<Counter>,
    open_connections: Gauge,
    redirect_seconds: Histogram,
    redirect_failures: Family<CauseLabels, Counter>,
    bytes: ByteCounters,
    broker_connected: Gauge,
    draining: Gauge,
    sessions: Family<StateLabels, Gauge>,
    save_failing: Gauge,
}

/// The byte counters of the two directions.
#[derive(Clone)]
pub struct ByteCounters {
    pub from_client: Counter,
    pub to_client: Counter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tsagent");
        let connection_family = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "front_door_connections",
            "Front-door connections by what became of them: local (this machine's RDP service), \
             remote (another machine), proxied_in (from another front door), refused, bad_request",
            connection_family.clone(),
        );
        let connections = Outcome::ALL
            .iter()
            .map(|outcome| {
                connection_family
                    .get_or_create(&OutcomeLabels {
                        outcome: outcome.label(),
                    })
                    .clone()
            })
            .collect();
        let open_connections = Gauge::default();
        registry.register(
            "front_door_open_connections",
            "Front-door connections open now",
            open_connections.clone(),
        );
        let redirect_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "front_door_redirect_seconds",
            "How long each connection waited for the broker's answer (its wait in a full farm's \
             queue included), failures included",
            redirect_seconds.clone(),
        );
        let redirect_failures = Family::<CauseLabels, Counter>::default();
        registry.register(
            "front_door_redirect_failures",
            "Connections the broker gave no machine, by its last answer's gRPC code or timeout \
             (the connection then goes to this machine's RDP service, or is refused)",
            redirect_failures.clone(),
        );
        let byte_family = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "front_door_bytes",
            "Bytes the front door carried, by direction (from_client, to_client)",
            byte_family.clone(),
        );
        let direction = |direction| {
            byte_family
                .get_or_create(&DirectionLabels { direction })
                .clone()
        };
        let bytes = ByteCounters {
            from_client: direction("from_client"),
            to_client: direction("to_client"),
        };
        let broker_connected = Gauge::default();
        registry.register(
            "broker_connected",
            "1 while the broker's stream is up and READY was acknowledged (the machine is a \
             candidate), else 0",
            broker_connected.clone(),
        );
        let draining = Gauge::default();
        registry.register(
            "draining",
            "1 while the broker drains this machine (no new logons), else 0",
            draining.clone(),
        );
        let sessions = Family::<StateLabels, Gauge>::default();
        registry.register(
            "sessions",
            "Sessions on this machine by state",
            sessions.clone(),
        );
        let save_failing = Gauge::default();
        registry.register(
            "session_table_save_failing",
            "1 while the last save of the session table to --state-dir failed (the disk full \
             or not writable; retried), else 0",
            save_failing.clone(),
        );
        AgentMetrics {
            registry,
            connections,
            open_connections,
            redirect_seconds,
            redirect_failures,
            bytes,
            broker_connected,
            draining,
            sessions,
            save_failing,
        }
    }
}

impl AgentMetrics {
    /// Counts a connection's outcome.
    pub fn connection(&self, outcome: Outcome) {
        self.connections[outcome as usize].inc();
    }

    /// A connection opened; the guard counts it closed when dropped.
    pub fn open_connection(&self) -> OpenConnection {
        self.open_connections.inc();
        OpenConnection(self.open_connections.clone())
    }

    /// How long one connection waited for the broker's answer (the calls of a full farm's
    /// queue together), and its failure (a gRPC code's name, or `timeout`) if it gave no
    /// machine.
    pub fn redirect(&self, seconds: f64, failure: Option<String>) {
        self.redirect_seconds.observe(seconds);
        if let Some(cause) = failure {
            self.redirect_failures
                .get_or_create(&CauseLabels { cause })
                .inc();
        }
    }

    /// The counters a connection's copy adds its bytes to.
    pub fn byte_counters(&self) -> &ByteCounters {
        &self.bytes
    }

    /// The Prometheus text, with the link's and the table's state read now.
    pub fn render(&self, status: &SharedStatus, directory: &Directory) -> String {
        let (connected, draining) = {
            let status = status
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            (status.connected, status.draining)
        };
        self.broker_connected.set(i64::from(connected));
        self.draining.set(i64::from(draining));
        let (active, disconnected) = directory.state_counts();
        for (state, count) in [("active", active), ("disconnected", disconnected)] {
            let count = i64::try_from(count).unwrap_or(i64::MAX);
            self.sessions
                .get_or_create(&StateLabels { state })
                .set(count);
        }
        self.save_failing.set(i64::from(directory.save_failing()));
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            tracing::error!("could not encode metrics");
        }
        text
    }
}

/// Counts one open front-door connection while it lives.
pub struct OpenConnection(Gauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}
