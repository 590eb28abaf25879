//! tsagent: runs on every terminal server, reports the machine and its sessions to the broker
//! over one long-lived stream, and redirects RDP clients through its front door.
#![forbid(unsafe_code)]

pub mod front_door;
