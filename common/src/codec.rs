//! The codec of the generated API: prost's encoding with smaller starting buffers. tonic gives
//! every call an 8 KiB buffer to encode into and another to decode from, kept for the call's
//! life; a broker holds two for each agent's stream (156 MiB at 10,000 agents), where most
//! messages of a stream are a few bytes (acknowledgements, load reports). These start at 1 KiB
//! and grow, as tonic's do, when a message needs more: an agent's RESYNC of 100 sessions takes
//! its stream's decode buffer to ~7.5 KiB, where it stays (BENCHMARKS.md, thirty-third run).

use prost::Message;
use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

/// Where each call's encode and decode buffers start.
const BUFFER_SIZE: usize = 1024;

/// How many encoded bytes are gathered before they are handed to the transport (tonic's own).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`BUFFER_SIZE`] buffers; `common/build.rs` names it as the codec of every
/// generated service and client.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(buffer_settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(buffer_settings())
    }
}
