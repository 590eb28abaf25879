//! Helpers for the end-to-end tests: throwaway databases, brokers started in-process on
//! port 0, a scripted agent that speaks the real `AgentGateway` stream, real agents (in-process
//! and as the `tsagent` binary), and the RDP programs the front door is tested with.
#![forbid(unsafe_code)]

pub mod binaries;
pub mod database;
pub mod fake_agent;
pub mod process;
pub mod rdp;
pub mod spawn;
pub mod spawn_agent;
pub mod tls;

pub use database::{Backend, TestDatabase};
pub use fake_agent::FakeAgent;
pub use spawn::{TestBroker, spawn_broker, spawn_broker_at};
pub use spawn_agent::{AgentProcess, TestAgent};
