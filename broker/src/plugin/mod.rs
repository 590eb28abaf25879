//! External plug-ins (`tsbroker.v1.Plugin`, the IWTSSBPlugin model over gRPC), configured per
//! farm. The hub owns one `PluginLink` per plug-in address (a plug-in may serve several farms)
//! and routes each farm's notifications and decisions to it. A slow or dead plug-in delays
//! nothing but its own notifications, and a decision never waits past the farm's deadline.

mod connection;
mod link;
pub mod notices;

pub use link::{PluginLink, Suggestion};
pub use notices::Notice;

use crate::decision::DecisionSettings;
use crate::decision::farm_settings::FarmBook;
use crate::metrics::Metrics;
use crate::store::Store;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
pub struct PluginHub {
    by_farm: HashMap<String, Arc<PluginLink>>,
    links: Vec<Arc<PluginLink>>,
}

impl PluginHub {
    /// Starts a link task for every plug-in the farms name.
    pub fn start(
        farms: &FarmBook,
        store: Arc<dyn Store>,
        decision: &DecisionSettings,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<PluginHub>> {
        let mut farms_by_plugin: BTreeMap<
            String,
            (crate::decision::farm_settings::PluginSettings, Vec<String>),
        > = BTreeMap::new();
        for (farm, settings) in &farms.farms {
            if let Some(plugin) = &settings.plugin {
                let entry = farms_by_plugin
                    .entry(plugin.address.clone())
                    .or_insert_with(|| (plugin.clone(), Vec::new()));
                entry.1.push(farm.clone());
            }
        }
        if farms.defaults.plugin.is_some() {
            tracing::warn!(
                "a plug-in in [farm_defaults] is ignored: name the farms it serves under [farms.NAME]"
            );
        }
        let broker_id = uuid::Uuid::new_v4().to_string();
        let mut hub = PluginHub::default();
        for (address, (settings, served)) in farms_by_plugin {
            let (link, receiver) =
                PluginLink::new(settings, served.clone(), decision.clone(), metrics.clone())?;
            tokio::spawn(link.clone().run(
                receiver,
                store.clone(),
                broker_id.clone(),
                shutdown.clone(),
            ));
            tracing::info!(plugin = %address, farms = ?served, "plug-in configured");
            for farm in served {
                hub.by_farm.insert(farm, link.clone());
            }
            hub.links.push(link);
        }
        Ok(Arc::new(hub))
    }

    pub fn for_farm(&self, farm: &str) -> Option<&Arc<PluginLink>> {
        self.by_farm.get(farm)
    }

    /// Queues a notification for the farm's plug-in, if it has one.
    pub fn notify(&self, farm: &str, notice: Notice) {
        if let Some(link) = self.by_farm.get(farm) {
            link.notify(notice);
        }
    }

    /// Queues a RESYNC of a machine's sessions, in the plug-in's batch size.
    pub fn resync_sessions(
        &self,
        farm: &str,
        machine_id: &str,
        sessions: Vec<tsbroker_common::proto::v1::Session>,
    ) {
        if let Some(link) = self.by_farm.get(farm) {
            for notice in notices::sessions_resync(machine_id, sessions, link.settings.batch_size) {
                link.notify(notice);
            }
        }
    }

    /// Tells every plug-in the broker is stopping.
    pub async fn terminate(&self, reason: &str) {
        for link in &self.links {
            link.terminate(reason).await;
        }
    }
}
