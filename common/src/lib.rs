//! Code shared by `tsbroker` and `tsagent`: the generated gRPC API, the domain types the
//! services work with once input is validated, and logging set-up.
#![forbid(unsafe_code)]

pub mod model;
pub mod proto;
pub mod telemetry;
pub mod validate;

pub use validate::ValidationError;
