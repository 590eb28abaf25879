//! tsbroker-bench: the benchmark tool of issue 5. Each scenario starts what it needs (a fresh
//! database, brokers, simulated agents speaking the real stream, HAProxy and a stand-in RDP
//! server) and returns one or more result lines. `main.rs` is the command line; the end-to-end
//! test suite runs every scenario at tiny sizes through the same functions.
#![forbid(unsafe_code)]

pub mod env;
pub mod load;
pub mod report;
pub mod scenarios;
pub mod sim;
pub mod tls;

use std::path::PathBuf;

pub use env::{ProcessMode, StoreKind};
pub use report::Report;

/// What every scenario shares.
#[derive(Clone, Debug)]
pub struct Context {
    pub store: StoreKind,
    /// Brokers (and the front door's agent) as real processes or in this process.
    pub mode: ProcessMode,
    /// Where broker, agent and HAProxy logs go.
    pub log_dir: PathBuf,
    /// Simulated agent streams that share one HTTP/2 connection.
    pub streams_per_connection: usize,
    /// Print progress lines to stderr.
    pub verbose: bool,
    /// The broker serves TLS with these files (`--tls`).
    pub tls: Option<tsbroker::tls::TlsFiles>,
}

impl Context {
    pub fn new(store: StoreKind, mode: ProcessMode) -> Self {
        Context {
            store,
            mode,
            log_dir: std::env::temp_dir().join("tsbroker-bench-logs"),
            streams_per_connection: 100,
            verbose: false,
            tls: None,
        }
    }

    pub fn progress(&self, message: &str) {
        if self.verbose {
            eprintln!("[{}] {message}", self.store.name());
        }
    }

    pub fn broker_options(&self, database_url: &str) -> env::BrokerOptions {
        env::BrokerOptions {
            database_url: database_url.to_owned(),
            max_pending_logons_per_machine: None,
            heartbeat_timeout: None,
            slow_start_off: false,
            log_dir: self.log_dir.clone(),
            tls: self.tls.clone(),
        }
    }

    pub fn farm_settings(&self, url: &str, farm: &str) -> sim::FarmSettings {
        sim::FarmSettings {
            url: url.to_owned(),
            farm: farm.to_owned(),
            streams_per_connection: self.streams_per_connection,
            backoff: tsagent::BackoffSettings::default(),
        }
    }
}
