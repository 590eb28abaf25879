//! The generated `tsbroker.v1` API and the descriptor set that server reflection serves.
#![allow(clippy::all, missing_docs)]

/// Messages and services of package `tsbroker.v1`.
pub mod v1 {
    tonic::include_proto!("tsbroker.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto` file, so grpcurl can use the API
/// through server reflection with no `.proto` files at hand.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tsbroker_descriptor");

/// Response metadata on an UNAVAILABLE that the broker itself gives (its database is away): how
/// many milliseconds to wait before trying again. The broker is up, so agents come back this
/// soon instead of after their growing backoff, and are connected again moments after the
/// database returns.
pub const RETRY_AFTER_MS_METADATA: &str = "tsbroker-retry-after-ms";

/// Response metadata on the UNAVAILABLE a broker gives while it starts (its database not open
/// yet): the broker process is coming back, so a front door asks again rather than sending a
/// returning user to its own RDP service (a second session).
pub const BROKER_STARTING_METADATA: &str = "tsbroker-starting";
