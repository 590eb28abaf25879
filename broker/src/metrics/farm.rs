//! The farms' state as gauges, read at each scrape: machines by state as operators see them in
//! `ListMachines` (a READY machine whose lease ran out counts as UNREACHABLE), machines
//! draining, logons in flight, and sessions by state from the session directory in memory.
//! Every replica of a farm shows the whole farm (they share its database): aggregate replicas
//! with `max`, not `sum`.

use crate::directory::SessionDirectory;
use crate::store::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::time::Duration;
use tsbroker_common::model::MachineState;

/// A scrape waits this long for the database; past it the machines' gauges are left out (a
/// scrape must not hang on a database that went away; the health check reports that).
const READ_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FarmLabels {
    pub farm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FarmStateLabels {
    pub farm: String,
    pub state: &'static str,
}

/// The machine states a gauge is kept for (REMOVED machines are not counted).
const MACHINE_STATES: [MachineState; 3] = [
    MachineState::Joining,
    MachineState::Ready,
    MachineState::Unreachable,
];

#[derive(Default)]
pub struct FarmGauges {
    machines: Family<FarmStateLabels, Gauge>,
    draining: Family<FarmLabels, Gauge>,
    pending_logons: Family<FarmLabels, Gauge>,
    sessions: Family<FarmStateLabels, Gauge>,
    /// One scrape reads and renders at a time (a read clears the families before it fills them).
    pub(super) scraping: tokio::sync::Mutex<()>,
}

/// What a scrape reads the farms from.
pub struct FarmSources<'a> {
    pub store: &'a dyn Store,
    /// Leases that ran out before this count as UNREACHABLE (as `ListMachines` shows them).
    pub lease_cutoff: i64,
    pub directory: &'a SessionDirectory,
}

impl FarmGauges {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "machines",
            "Machines by farm and state (joining, ready, unreachable), as ListMachines shows them",
            self.machines.clone(),
        );
        registry.register(
            "machines_draining",
            "Machines of the farm that take no new logons (drained by an administrator)",
            self.draining.clone(),
        );
        registry.register(
            "pending_logons",
            "Logons in flight: users sent to a machine whose logon has not shown up yet",
            self.pending_logons.clone(),
        );
        registry.register(
            "sessions",
            "Sessions by farm and state (active, disconnected), from the session directory",
            self.sessions.clone(),
        );
    }

    /// Reads the farms again. What cannot be read now (the database away, the directory still
    /// loading) is left out of this scrape rather than shown with old values.
    pub async fn refresh(&self, sources: FarmSources<'_>) {
        self.machines.clear();
        self.draining.clear();
        self.pending_logons.clear();
        self.sessions.clear();
        let read = async {
            let farms = sources.store.list_farms().await?;
            let machines = sources.store.list_machines(None).await?;
            Ok::<_, crate::store::StoreError>((farms, machines))
        };
        let farms: Vec<String> = match tokio::time::timeout(READ_TIMEOUT, read).await {
            Ok(Ok((farms, machines))) => {
                let farms: Vec<String> = farms.into_iter().map(|farm| farm.name).collect();
                self.set_machines(&farms, &machines, sources.lease_cutoff);
                farms
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "metrics: the farms' machines could not be read");
                Vec::new()
            }
            Err(_) => {
                tracing::debug!("metrics: the farms' machines were not read in time");
                Vec::new()
            }
        };
        if let Some(counts) = sources.directory.session_counts() {
            let mut by_farm: BTreeMap<String, (usize, usize)> =
                farms.into_iter().map(|farm| (farm, (0, 0))).collect();
            for count in counts {
                by_farm.insert(count.farm, (count.active, count.disconnected));
            }
            for (farm, (active, disconnected)) in by_farm {
                set_farm_state(&self.sessions, &farm, "active", active);
                set_farm_state(&self.sessions, &farm, "disconnected", disconnected);
            }
        }
    }

    fn set_machines(
        &self,
        farms: &[String],
        machines: &[crate::store::MachineRecord],
        lease_cutoff: i64,
    ) {
        #[derive(Default)]
        struct Tally {
            states: [usize; MACHINE_STATES.len()],
            draining: usize,
            pending: i64,
        }
        let mut tallies: BTreeMap<&str, Tally> = farms
            .iter()
            .map(|farm| (farm.as_str(), Tally::default()))
            .collect();
        for record in machines {
            let seen = record.state_seen(lease_cutoff);
            let Some(slot) = MACHINE_STATES.iter().position(|state| *state == seen) else {
                continue;
            };
            let tally = tallies.entry(record.farm.as_str()).or_default();
            tally.states[slot] += 1;
            tally.draining += usize::from(record.draining);
            tally.pending += record.pending_logons.max(0);
        }
        for (farm, tally) in tallies {
            for (state, count) in MACHINE_STATES.iter().zip(tally.states) {
                set_farm_state(&self.machines, farm, state.as_str(), count);
            }
            let labels = FarmLabels {
                farm: farm.to_owned(),
            };
            self.draining
                .get_or_create(&labels)
                .set(tally.draining as i64);
            self.pending_logons
                .get_or_create(&labels)
                .set(tally.pending);
        }
    }
}

fn set_farm_state(
    family: &Family<FarmStateLabels, Gauge>,
    farm: &str,
    state: &'static str,
    count: usize,
) {
    family
        .get_or_create(&FarmStateLabels {
            farm: farm.to_owned(),
            state,
        })
        .set(i64::try_from(count).unwrap_or(i64::MAX));
}
