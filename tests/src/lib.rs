//! Helpers for the end-to-end tests: throwaway databases, brokers started in-process on
//! port 0, and a scripted agent that speaks the real `AgentGateway` stream.
#![forbid(unsafe_code)]

pub mod binaries;
pub mod database;
pub mod fake_agent;
pub mod spawn;

pub use database::{Backend, TestDatabase};
pub use fake_agent::FakeAgent;
pub use spawn::{TestBroker, spawn_broker};
