//! The generated `tsbroker.v1` API and the descriptor set that server reflection serves.
#![allow(clippy::all, missing_docs)]

/// Messages and services of package `tsbroker.v1`.
pub mod v1 {
    tonic::include_proto!("tsbroker.v1");
}

/// The encoded `FileDescriptorSet` of every `.proto` file, so grpcurl can use the API
/// through server reflection with no `.proto` files at hand.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tsbroker_descriptor");
