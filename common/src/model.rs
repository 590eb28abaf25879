//! Domain types: what the services work with once a message has passed validation.
//! Required fields are plain values, never `Option`; conversions from the wire check
//! every field and name the one that fails.

use crate::proto::v1 as pb;
use crate::validate::{self, ValidationError};
use uuid::Uuid;

/// Namespace for machine ids: the id of a machine is UUIDv5(namespace, "farm/name"), stable
/// across restarts, brokers and databases.
const MACHINE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f0c_5a3e_2b7d_4c1a_9e8f_5d6c_7b8a_9c0d);

/// The stable id of the machine `name` in `farm` (names compare case-insensitively).
pub fn machine_id(farm: &str, name: &str) -> Uuid {
    let key = format!(
        "{}/{}",
        farm.to_ascii_lowercase(),
        name.to_ascii_lowercase()
    );
    Uuid::new_v5(&MACHINE_ID_NAMESPACE, key.as_bytes())
}

/// The key users are matched by: user names compare case-insensitively.
pub fn user_key(user_name: &str) -> String {
    user_name.to_lowercase()
}

/// The user part of a name in user principal form (`ann@example.com` → `ann`), which is how
/// Linux logons (PAM) usually name the same user; `None` for other names.
pub fn upn_user_part(user_name: &str) -> Option<&str> {
    match user_name.split_once('@') {
        Some((user, suffix)) if !user.is_empty() && !suffix.is_empty() => Some(user),
        _ => None,
    }
}

/// The IP address of a client address as sessions and requests carry it: "ip:port",
/// "[v6]:port" or a bare IP (PAM's `PAM_RHOST`); an IPv4 address seen through a dual-stack
/// socket (`::ffff:10.0.0.5`) is that IPv4 address. `None` for anything else (a host name,
/// empty).
pub fn client_ip(address: &str) -> Option<std::net::IpAddr> {
    let ip = match address.parse::<std::net::SocketAddr>() {
        Ok(socket) => socket.ip(),
        Err(_) => address.parse::<std::net::IpAddr>().ok()?,
    };
    Some(ip.to_canonical())
}

/// `address` with an IPv4-mapped IPv6 address (`[::ffff:10.0.0.5]:3389`, as a dual-stack
/// socket sees an IPv4 peer) as the plain IPv4 address; any other address as it is.
pub fn canonical_socket_address(address: std::net::SocketAddr) -> std::net::SocketAddr {
    match address {
        std::net::SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => std::net::SocketAddr::new(v4.into(), v6.port()),
            None => address,
        },
        v4 => v4,
    }
}

/// A client address ("ip:port", "[v6]:port" or a bare IP) in the one form the front door
/// writes its own clients' addresses in: an IPv4-mapped address as IPv4, an IPv6 address in
/// its short lower-case form (`2001:db8::a`); `None` for what is not an address. One client
/// is then shown one way, wherever its address came from (the front door, PAM, a PROXY
/// header).
pub fn canonical_client_address(address: &str) -> Option<String> {
    if let Ok(socket) = address.parse::<std::net::SocketAddr>() {
        return Some(canonical_socket_address(socket).to_string());
    }
    let ip = address.parse::<std::net::IpAddr>().ok()?;
    Some(ip.to_canonical().to_string())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MachineState {
    Joining,
    Ready,
    Unreachable,
    Removed,
}

impl MachineState {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Joining => "joining",
            MachineState::Ready => "ready",
            MachineState::Unreachable => "unreachable",
            MachineState::Removed => "removed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "joining" => MachineState::Joining,
            "ready" => MachineState::Ready,
            "unreachable" => MachineState::Unreachable,
            "removed" => MachineState::Removed,
            _ => return None,
        })
    }

    pub fn to_proto(self) -> pb::MachineState {
        match self {
            MachineState::Joining => pb::MachineState::Joining,
            MachineState::Ready => pb::MachineState::Ready,
            MachineState::Unreachable => pb::MachineState::Unreachable,
            MachineState::Removed => pb::MachineState::Removed,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionState {
    Active,
    Disconnected,
}

impl SessionState {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Active => "active",
            SessionState::Disconnected => "disconnected",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "active" => Some(SessionState::Active),
            "disconnected" => Some(SessionState::Disconnected),
            _ => None,
        }
    }

    pub fn to_proto(self) -> pb::SessionState {
        match self {
            SessionState::Active => pb::SessionState::Active,
            SessionState::Disconnected => pb::SessionState::Disconnected,
        }
    }

    /// A wire value; `UNSPECIFIED` and unknown numbers are refused.
    pub fn from_proto(field: &'static str, value: i32) -> Result<Self, ValidationError> {
        match pb::SessionState::try_from(value) {
            Ok(pb::SessionState::Active) => Ok(SessionState::Active),
            Ok(pb::SessionState::Disconnected) => Ok(SessionState::Disconnected),
            _ => Err(ValidationError::new(
                field,
                format!("{value} is not ACTIVE or DISCONNECTED"),
            )),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionEventKind {
    Logon,
    Disconnect,
    Reconnect,
    Logoff,
}

impl SessionEventKind {
    pub fn from_proto(value: i32) -> Result<Self, ValidationError> {
        match pb::SessionEventType::try_from(value) {
            Ok(pb::SessionEventType::Logon) => Ok(SessionEventKind::Logon),
            Ok(pb::SessionEventType::Disconnect) => Ok(SessionEventKind::Disconnect),
            Ok(pb::SessionEventType::Reconnect) => Ok(SessionEventKind::Reconnect),
            Ok(pb::SessionEventType::Logoff) => Ok(SessionEventKind::Logoff),
            _ => Err(ValidationError::new(
                "type",
                format!("{value} is not LOGON, DISCONNECT, RECONNECT or LOGOFF"),
            )),
        }
    }

    pub fn to_proto(self) -> pb::SessionEventType {
        match self {
            SessionEventKind::Logon => pb::SessionEventType::Logon,
            SessionEventKind::Disconnect => pb::SessionEventType::Disconnect,
            SessionEventKind::Reconnect => pb::SessionEventType::Reconnect,
            SessionEventKind::Logoff => pb::SessionEventType::Logoff,
        }
    }

    /// The state a session is in after this event (`None` after a logoff).
    pub fn resulting_state(self) -> Option<SessionState> {
        match self {
            SessionEventKind::Logon | SessionEventKind::Reconnect => Some(SessionState::Active),
            SessionEventKind::Disconnect => Some(SessionState::Disconnected),
            SessionEventKind::Logoff => None,
        }
    }
}

/// A terminal server as its agent describes it, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineDescription {
    pub name: String,
    pub farm: String,
    pub address: String,
    pub weight: u32,
    /// 0 means no limit.
    pub session_limit: u32,
    pub single_session: bool,
    pub agent_version: String,
    /// The address is a tsagent front door (accepts PROXY v2 from the farm).
    pub front_door: bool,
}

impl TryFrom<pb::MachineDescription> for MachineDescription {
    type Error = ValidationError;

    fn try_from(description: pb::MachineDescription) -> Result<Self, Self::Error> {
        Ok(MachineDescription {
            name: validate::machine_name("name", &description.name)?,
            farm: validate::farm_name("farm", &description.farm)?,
            address: validate::address("address", &description.address)?,
            weight: validate::weight("weight", description.weight, true)?,
            session_limit: description.session_limit,
            single_session: description.single_session,
            agent_version: validate::plain_name(
                "agent_version",
                &description.agent_version,
                validate::MAX_AGENT_VERSION,
                true,
            )?,
            front_door: description.front_door,
        })
    }
}

impl From<&MachineDescription> for pb::MachineDescription {
    fn from(description: &MachineDescription) -> Self {
        pb::MachineDescription {
            name: description.name.clone(),
            farm: description.farm.clone(),
            address: description.address.clone(),
            weight: description.weight,
            session_limit: description.session_limit,
            single_session: description.single_session,
            agent_version: description.agent_version.clone(),
            front_door: description.front_door,
        }
    }
}

/// One session as an agent reports it, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub session_id: u32,
    pub user_name: String,
    pub domain: String,
    pub state: SessionState,
    pub client_address: String,
    /// Milliseconds since the Unix epoch; `None` when the agent does not know.
    pub logon_time_ms: Option<i64>,
}

impl TryFrom<pb::SessionInfo> for SessionInfo {
    type Error = ValidationError;

    fn try_from(session: pb::SessionInfo) -> Result<Self, Self::Error> {
        let client_address = if session.client_address.is_empty() {
            String::new()
        } else {
            let address = validate::plain_name(
                "client_address",
                &session.client_address,
                validate::MAX_ADDRESS,
                true,
            )?;
            // An agent of this version sends the canonical form already; an older one may not.
            canonical_client_address(&address).unwrap_or(address)
        };
        Ok(SessionInfo {
            session_id: session.session_id,
            user_name: validate::user_name("user_name", &session.user_name)?,
            domain: validate::domain("domain", &session.domain)?,
            state: SessionState::from_proto("state", session.state)?,
            client_address,
            logon_time_ms: session.logon_time.as_ref().map(timestamp_to_millis),
        })
    }
}

impl From<&SessionInfo> for pb::SessionInfo {
    fn from(session: &SessionInfo) -> Self {
        pb::SessionInfo {
            session_id: session.session_id,
            user_name: session.user_name.clone(),
            domain: session.domain.clone(),
            state: session.state.to_proto() as i32,
            client_address: session.client_address.clone(),
            logon_time: session.logon_time_ms.map(millis_to_timestamp),
        }
    }
}

/// A session event from an agent, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionEvent {
    pub kind: SessionEventKind,
    pub session: SessionInfo,
}

impl TryFrom<pb::SessionEvent> for SessionEvent {
    type Error = ValidationError;

    fn try_from(event: pb::SessionEvent) -> Result<Self, Self::Error> {
        let kind = SessionEventKind::from_proto(event.r#type)?;
        let mut wire_session = event
            .session
            .ok_or_else(|| ValidationError::new("session", "missing"))?;
        // The state after the event follows from the event; agents may leave it unset.
        if let Some(state) = kind.resulting_state() {
            wire_session.state = state.to_proto() as i32;
        } else if wire_session.state == 0 {
            wire_session.state = pb::SessionState::Active as i32;
        }
        Ok(SessionEvent {
            kind,
            session: SessionInfo::try_from(wire_session)?,
        })
    }
}

/// A load report, validated (percentages clamped to 0..100, NaN refused).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadReport {
    pub session_count: u32,
    pub cpu_percent: f32,
    pub memory_percent: f32,
    pub pending_logons: u32,
}

impl TryFrom<pb::LoadReport> for LoadReport {
    type Error = ValidationError;

    fn try_from(load: pb::LoadReport) -> Result<Self, Self::Error> {
        let percent = |field: &'static str, value: f32| {
            if value.is_finite() {
                Ok(value.clamp(0.0, 100.0))
            } else {
                Err(ValidationError::new(field, "not a number"))
            }
        };
        Ok(LoadReport {
            session_count: load.session_count,
            cpu_percent: percent("cpu_percent", load.cpu_percent)?,
            memory_percent: percent("memory_percent", load.memory_percent)?,
            pending_logons: load.pending_logons,
        })
    }
}

impl From<&LoadReport> for pb::LoadReport {
    fn from(load: &LoadReport) -> Self {
        pb::LoadReport {
            session_count: load.session_count,
            cpu_percent: load.cpu_percent,
            memory_percent: load.memory_percent,
            pending_logons: load.pending_logons,
        }
    }
}

pub fn timestamp_to_millis(timestamp: &prost_types::Timestamp) -> i64 {
    timestamp
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(timestamp.nanos.clamp(0, 999_999_999) / 1_000_000))
}

pub fn millis_to_timestamp(millis: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        nanos: (millis.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_are_compared_by_ip() {
        let v4: std::net::IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(client_ip("10.0.0.5:51234"), Some(v4));
        assert_eq!(client_ip("10.0.0.5"), Some(v4));
        assert_eq!(client_ip("[::ffff:10.0.0.5]:3389"), Some(v4));
        assert_eq!(client_ip("::ffff:10.0.0.5"), Some(v4));
        assert_eq!(
            client_ip("[2001:db8::7]:40000"),
            Some("2001:db8::7".parse().unwrap())
        );
        assert_eq!(client_ip(""), None);
        assert_eq!(client_ip("laptop.example.com:3389"), None);
    }

    #[test]
    fn a_sessions_client_address_is_kept_in_its_canonical_form() {
        let session = |client_address: &str| pb::SessionInfo {
            session_id: 1,
            user_name: "ann".into(),
            state: pb::SessionState::Active as i32,
            client_address: client_address.into(),
            ..Default::default()
        };
        for (given, kept) in [
            ("[::ffff:10.0.0.5]:4000", "10.0.0.5:4000"),
            ("2001:DB8::A", "2001:db8::a"),
            ("10.0.0.5:4000", "10.0.0.5:4000"),
            ("", ""),
            // Not an address: kept as it is, as before (it matches no client).
            ("laptop.example.com", "laptop.example.com"),
        ] {
            let session = SessionInfo::try_from(session(given)).unwrap();
            assert_eq!(session.client_address, kept, "{given}");
        }
    }

    #[test]
    fn principal_names_have_a_user_part() {
        assert_eq!(upn_user_part("ann@example.com"), Some("ann"));
        assert_eq!(upn_user_part("ann@examp"), Some("ann"));
        for name in ["ann", "@example.com", "ann@", "CORP\\ann"] {
            assert_eq!(upn_user_part(name), None, "{name}");
        }
    }

    #[test]
    fn machine_ids_are_stable_and_case_insensitive() {
        assert_eq!(
            machine_id("Farm", "TS1.example"),
            machine_id("farm", "ts1.example")
        );
        assert_ne!(machine_id("farm", "ts1"), machine_id("farm", "ts2"));
        assert_ne!(machine_id("a", "ts1"), machine_id("b", "ts1"));
    }

    #[test]
    fn timestamps_round_trip() {
        for millis in [0, 1, 999, 1_700_000_000_123, -1500] {
            assert_eq!(timestamp_to_millis(&millis_to_timestamp(millis)), millis);
        }
    }

    #[test]
    fn description_defaults_weight_and_rejects_bad_fields() {
        let wire = pb::MachineDescription {
            name: "ts1".into(),
            farm: "default".into(),
            address: "ts1:3389".into(),
            ..Default::default()
        };
        assert_eq!(
            MachineDescription::try_from(wire.clone()).unwrap().weight,
            100
        );
        let bad = pb::MachineDescription {
            weight: 20_000,
            ..wire.clone()
        };
        assert_eq!(
            MachineDescription::try_from(bad).unwrap_err().field,
            "weight"
        );
        let bad = pb::MachineDescription {
            address: "nowhere".into(),
            ..wire
        };
        assert_eq!(
            MachineDescription::try_from(bad).unwrap_err().field,
            "address"
        );
    }

    #[test]
    fn events_take_state_from_their_kind() {
        let event = pb::SessionEvent {
            r#type: pb::SessionEventType::Disconnect as i32,
            session: Some(pb::SessionInfo {
                session_id: 3,
                user_name: "alice".into(),
                ..Default::default()
            }),
        };
        let event = SessionEvent::try_from(event).unwrap();
        assert_eq!(event.session.state, SessionState::Disconnected);
        let no_type = pb::SessionEvent {
            r#type: 0,
            session: None,
        };
        assert!(SessionEvent::try_from(no_type).is_err());
    }
}
