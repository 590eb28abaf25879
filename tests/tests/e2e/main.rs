//! End-to-end tests: real brokers over real gRPC, on SQLite and on PostgreSQL.

mod support;

mod agent;
mod bench_smoke;
mod binaries;
mod clock;
mod concurrency;
mod config_examples;
mod conformance;
mod crash;
mod descriptors;
mod directory;
mod directory_reread;
mod displaced;
mod farm_metrics;
mod front_doors;
mod frozen_replica;
mod full_disk;
mod hooks;
mod ingest_conformance;
mod outage;
mod plugins;
mod policies;
mod queries;
mod query_plans;
mod rdp;
mod read_only_database;
mod resets;
mod restart;
mod stopping;
mod stream;
mod tls;
mod tls_expiry;
mod tls_revocation;
mod tls_silence;
mod user_hints;
