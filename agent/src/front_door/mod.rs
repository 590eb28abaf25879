//! The RDP front door: reads a client's first packet, asks the broker where the user goes,
//! and splices the connection there.

pub mod broker_absence;
pub mod descriptors;
pub mod first_packet;
pub mod host_cache;
pub mod ip_families;
pub mod listener;
pub mod machines;
pub mod per_client;
pub mod proxy_header;
pub mod route;
pub mod source_address;
pub mod splice;
#[cfg(test)]
mod tests;
pub mod x224;

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::broker_link::BrokerLink;
use crate::directory::Directory;
use crate::metrics::AgentMetrics;
use crate::stream::SharedStatus;
use machines::MachineCache;

pub use listener::serve;

/// What the front door needs to know about its machine.
#[derive(Clone, Debug)]
pub struct FrontDoorSettings {
    pub farm: String,
    /// This machine's id (`model::machine_id(farm, name)`).
    pub machine_id: Uuid,
    /// "host:port" of this machine's RDP service.
    pub local_rdp: String,
    pub client_timeout: Duration,
    pub max_connections: usize,
    /// Most connections one client address holds (`per_client`).
    pub max_connections_per_client: usize,
    /// The advertised address, when it is this host's: connections to other machines leave
    /// from it (`source_address`).
    pub source: Option<Arc<source_address::SourceAddress>>,
}

/// Shared by every connection.
pub struct FrontDoorShared {
    pub settings: FrontDoorSettings,
    /// The broker's client, current with the TLS files.
    pub link: Arc<BrokerLink>,
    pub machines: MachineCache,
    pub directory: Directory,
    pub metrics: Arc<AgentMetrics>,
    /// Signs the PROXY headers this front door sends and checks those it receives: from the
    /// agent token, when one is set (see `proxy_header`).
    pub header_key: Option<proxy_header::HeaderKey>,
    /// Since when no broker answers (see `broker_absence`).
    pub broker_absence: broker_absence::BrokerAbsence,
    /// The machine's standing with the broker (whether it drains).
    pub status: SharedStatus,
}

impl FrontDoorShared {
    /// Whether a machine id the broker gave is this machine's.
    pub fn is_this_machine(&self, machine_id: &str) -> bool {
        Uuid::parse_str(machine_id).is_ok_and(|id| id == self.settings.machine_id)
    }

    /// Since when the agent's stream to the broker has been down (`None` while it is up).
    pub fn stream_down_since(&self) -> Option<std::time::Instant> {
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .down_since
    }

    /// Whether the broker last said this machine drains.
    pub fn draining(&self) -> bool {
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .draining
    }
}
