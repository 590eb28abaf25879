//! External plug-ins (`tsbroker.v1.Plugin`, the IWTSSBPlugin model over gRPC), configured per
//! farm. The hub owns one `PluginLink` per plug-in address (a plug-in may serve several farms)
//! and routes each farm's notifications and decisions to it. A slow or dead plug-in delays
//! nothing but its own notifications, and a decision never waits past the farm's deadline.

mod connection;
mod link;
pub mod notices;

pub use link::{PluginBudget, PluginLink, Suggestion};
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

    /// What the session directory calls with the machines other replicas changed (`None`
    /// without plug-ins): each is read again and queued whole for its farm's plug-in, in the
    /// order the changes came, by one task.
    pub fn follow_other_replicas(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
    ) -> Option<crate::directory::ChangedElsewhere> {
        if self.links.is_empty() {
            return None;
        }
        let (changes, mut changed) = tokio::sync::mpsc::unbounded_channel::<Vec<uuid::Uuid>>();
        let hub = self.clone();
        tokio::spawn(async move {
            while let Some(machines) = changed.recv().await {
                for id in machines {
                    hub.resync_changed_machine(store.as_ref(), id).await;
                }
            }
        });
        Some(Arc::new(move |machines| {
            let _ = changes.send(machines);
        }))
    }

    async fn resync_changed_machine(&self, store: &dyn Store, id: uuid::Uuid) {
        let machine = match store.get_machine(id).await {
            Ok(Some(machine)) => machine,
            Ok(None) => {
                // Gone: its plug-in hears REMOVED, as the replica that removed it told its own.
                let id = id.to_string();
                for link in &self.links {
                    link.machine_gone(&id);
                }
                return;
            }
            Err(error) => {
                tracing::debug!(%error, machine = %id, "cannot read a machine another replica changed; its plug-in's view waits for the next resync");
                return;
            }
        };
        let Some(link) = self.by_farm.get(&machine.farm) else {
            return;
        };
        if let Err(error) = link.queue_machine_resync(store, machine).await {
            tracing::debug!(%error, machine = %id, "cannot read the sessions of a machine another replica changed");
        }
    }

    /// Tells every plug-in the broker is stopping.
    pub async fn terminate(&self, reason: &str) {
        for link in &self.links {
            link.terminate(reason).await;
        }
    }
}
