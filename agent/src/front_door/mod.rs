//! The RDP front door: reads a client's first packet, asks the broker where the user goes,
//! and splices the connection there.

pub mod x224;
