//! The local control socket: newline-delimited JSON, one request and one response per
//! connection. PAM (`pam_exec`) and the RDP service's scripts report sessions through it via
//! `tsagent session …`; `tsagent session list` and `tsagent status` read from it.

pub mod client;
pub mod pam;
pub mod server;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::directory::SessionRecord;
use crate::stream::LinkStatus;

/// Longest request or response line accepted.
pub const MAX_LINE: usize = 1 << 20;

/// Which session a session event names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionArgs {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
    /// Only for a session the agent knows (`--known-only`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub known_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Logon(SessionArgs),
    Disconnect(SessionArgs),
    Reconnect(SessionArgs),
    Logoff(SessionArgs),
    List,
    Status,
}

impl Request {
    /// Whether sending the request again after the agent may already have applied it leaves
    /// things as once would: a read, or an event that names its session. An event without a
    /// session number picks the user's session (a logon makes a new one), so a second copy
    /// could end or make another.
    pub fn may_be_repeated(&self) -> bool {
        match self {
            Request::List | Request::Status => true,
            Request::Logon(args)
            | Request::Disconnect(args)
            | Request::Reconnect(args)
            | Request::Logoff(args) => args.session_id.is_some(),
        }
    }
}

/// The machine and its link to the broker, for `tsagent status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub machine_name: String,
    pub farm: String,
    pub advertise: String,
    pub front_door: Option<String>,
    pub link: LinkStatus,
    /// The last save of the session table failed (the writer keeps trying).
    #[serde(default)]
    pub session_table_unsaved: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Session {
        session: SessionRecord,
        /// The event ended the session (a logoff).
        #[serde(default)]
        ended: bool,
        /// The session table could not be saved (the event stands in memory and reaches the
        /// broker; a restart of the agent before a save succeeds loses it).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        unsaved: bool,
    },
    Sessions {
        sessions: Vec<SessionRecord>,
    },
    Status {
        status: Box<AgentStatus>,
    },
    Error {
        message: String,
    },
}
