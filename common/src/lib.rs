//! Code shared by `tsbroker` and `tsagent`: the generated gRPC API, the domain types the
//! services work with once input is validated, logging set-up, reading settings files, serving
//! gRPC on a bound listener, and the `/metrics` endpoint.
#![forbid(unsafe_code)]

pub mod cert_validity;
pub mod codec;
pub mod config_file;
pub mod metrics_http;
pub mod model;
pub mod pem;
pub mod proto;
pub mod renewal;
pub mod serve;
pub mod signals;
pub mod telemetry;
pub mod validate;
pub mod warning_limit;

pub use validate::ValidationError;
