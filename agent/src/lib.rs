//! tsagent: runs on every terminal server, reports the machine and its sessions to the broker
//! over one long-lived stream, and redirects RDP clients through its front door.
//!
//! Start one in-process with [`start`] (or [`run`]) and an [`AgentConfig`]; tests pass a
//! pre-bound front-door listener (`FrontDoorBind::Listener`) and a temporary state directory.
#![forbid(unsafe_code)]

mod agent;
pub mod backoff;
pub mod broker_client;
pub mod broker_link;
pub mod cli;
pub mod config;
pub mod control;
pub mod directory;
pub mod front_door;
pub mod load;
pub mod metrics;
pub mod settings;
pub mod state_file;
pub mod stream;
#[cfg(test)]
mod test_support;

pub use agent::{RunningAgent, run, start};
pub use config::{AgentConfig, BackoffSettings, FrontDoorBind};
