//! End-to-end tests: real brokers over real gRPC, on SQLite and on PostgreSQL.

mod support;

mod binaries;
mod concurrency;
mod conformance;
mod policies;
mod query_plans;
mod stream;
