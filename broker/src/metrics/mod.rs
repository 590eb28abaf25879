//! Prometheus metrics, one registry per broker (no globals, so several brokers can run in one
//! test process), served as text on `--metrics-listen` at `/metrics`. Every name starts with
//! `tsbroker_`. The farms' state is read at each scrape (`farm.rs`).

mod farm;

pub use farm::FarmSources;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    /// existing_session, pending_logon, load_balanced, plugin, external.
    pub reason: &'static str,
    /// The policy that placed a new logon; "none" for the other reasons.
    pub policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginCallLabels {
    pub plugin: String,
    pub method: &'static str,
    /// ok, error, timeout.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginMethodLabels {
    pub plugin: String,
    pub method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginFallbackLabels {
    pub plugin: String,
    /// error, timeout, not_candidate, down.
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub decisions: Family<DecisionLabels, Counter>,
    pub redirect_errors: Family<CodeLabels, Counter>,
    pub plugin_calls: Family<PluginCallLabels, Counter>,
    pub plugin_call_seconds: Family<PluginMethodLabels, Histogram>,
    pub plugin_fallbacks: Family<PluginFallbackLabels, Counter>,
    pub plugin_resyncs: Family<PluginLabels, Counter>,
    pub agent_streams: Gauge,
    /// Agent streams whose agent's clock is a second or more off this broker's.
    pub agent_clocks_off: Gauge,
    pub agent_messages: Family<KindLabels, Counter>,
    /// kind: memory (the session directory answered), database, or memory_degraded.
    pub session_lookups: Family<KindLabels, Counter>,
    /// The database server's clock minus this machine's (PostgreSQL), as last measured.
    pub clock_offset_seconds: Gauge<f64, AtomicU64>,
    /// Streams taken over by a newer connection while their agent was still reporting.
    pub live_takeovers: Counter,
    /// Each Redirect call's time in the broker, failures included.
    pub redirect_seconds: Histogram,
    farms: farm::FarmGauges,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tsbroker");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Redirect decisions by reason and policy",
            decisions.clone(),
        );
        let redirect_errors = Family::<CodeLabels, Counter>::default();
        registry.register(
            "redirect_errors",
            "Redirect calls that failed, by gRPC code",
            redirect_errors.clone(),
        );
        let plugin_calls = Family::<PluginCallLabels, Counter>::default();
        registry.register(
            "plugin_calls",
            "Calls to plug-ins by method and outcome",
            plugin_calls.clone(),
        );
        let plugin_call_seconds =
            Family::<PluginMethodLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 14))
            });
        registry.register(
            "plugin_call_seconds",
            "Latency of plug-in calls",
            plugin_call_seconds.clone(),
        );
        let plugin_fallbacks = Family::<PluginFallbackLabels, Counter>::default();
        registry.register(
            "plugin_fallbacks",
            "Decisions that kept the broker's pick because the plug-in failed, was late or answered a non-candidate",
            plugin_fallbacks.clone(),
        );
        let plugin_resyncs = Family::<PluginLabels, Counter>::default();
        registry.register(
            "plugin_resyncs",
            "Full resyncs sent to plug-ins",
            plugin_resyncs.clone(),
        );
        let agent_streams = Gauge::default();
        registry.register(
            "agent_streams",
            "Agent streams open on this broker",
            agent_streams.clone(),
        );
        let agent_clocks_off = Gauge::default();
        registry.register(
            "agent_clocks_off",
            "Agent streams on this broker whose machine's clock is a second or more off the \
             broker's (the database server's, on PostgreSQL): their logon times are corrected, \
             and the log names them",
            agent_clocks_off.clone(),
        );
        let agent_messages = Family::<KindLabels, Counter>::default();
        registry.register(
            "agent_messages",
            "Agent messages applied, by kind",
            agent_messages.clone(),
        );
        let session_lookups = Family::<KindLabels, Counter>::default();
        registry.register(
            "session_lookups",
            "Where Redirect found a user's sessions: memory (the session directory), database \
             (the directory loading, or sessions only on machines that look gone) or \
             memory_degraded (the database unavailable: the last known session)",
            session_lookups.clone(),
        );
        let clock_offset_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "clock_offset_seconds",
            "The database server's clock minus this machine's, as last measured (PostgreSQL; the \
             broker keeps the farm's times by the database's clock)",
            clock_offset_seconds.clone(),
        );
        let live_takeovers = Counter::default();
        registry.register(
            "live_takeovers",
            "Agent streams a newer connection for the same machine took over while their agent \
             was still reporting: two servers using one machine name",
            live_takeovers.clone(),
        );
        let redirect_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "redirect_seconds",
            "Time the broker took to answer each Redirect, failures included",
            redirect_seconds.clone(),
        );
        let farms = farm::FarmGauges::default();
        farms.register(&mut registry);
        Metrics {
            registry,
            redirect_seconds,
            farms,
            clock_offset_seconds,
            live_takeovers,
            decisions,
            redirect_errors,
            plugin_calls,
            plugin_call_seconds,
            plugin_fallbacks,
            plugin_resyncs,
            agent_streams,
            agent_clocks_off,
            agent_messages,
            session_lookups,
        }
    }
}

impl Metrics {
    /// Reads the farms' state from `sources` (none until the broker's store is open), then
    /// renders every metric.
    pub async fn scrape(&self, sources: Option<FarmSources<'_>>) -> String {
        let _one_at_a_time = self.farms.scraping.lock().await;
        if let Some(sources) = sources {
            self.farms.refresh(sources).await;
        }
        self.render()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            tracing::error!("could not encode metrics");
        }
        text
    }
}
