//! tsbroker: keeps the session directory of a farm of terminal servers and answers where a
//! connecting user should go.
//!
//! `server::run` assembles the gRPC services (`service`) over a `store`; the redirect
//! decision and its policies live in `decision`, the in-memory copy of the sessions it reads
//! first in `directory`, external plug-ins in `plugin`; `health_check` is the binary's probe
//! of a running broker.
#![forbid(unsafe_code)]

pub mod clock;
pub mod config;
pub mod decision;
pub mod directory;
pub mod error;
pub mod health_check;
pub mod metrics;
pub mod plugin;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;

pub use config::BrokerConfig;
pub use server::run;
