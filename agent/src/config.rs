//! The agent's settings once parsed and checked: what `run` needs, with defaults that suit tests.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tsbroker_common::validate;

pub const DEFAULT_BROKER_URL: &str = "http://127.0.0.1:50051";
pub const DEFAULT_FARM: &str = "default";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/tsagent/control.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tsagent";
pub const DEFAULT_LOCAL_RDP: &str = "127.0.0.1:3390";
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Most front-door connections one client address holds at once.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 500;
pub const DEFAULT_UNCONFIRMED_LOGON_GRACE: Duration =
    crate::directory::DEFAULT_UNCONFIRMED_LOGON_GRACE;

/// Where the front door listens: an address to bind, or a listener the caller bound already
/// (tests bind `127.0.0.1:0` and pass the listener in).
#[derive(Debug)]
pub enum FrontDoorBind {
    Address(SocketAddr),
    Listener(std::net::TcpListener),
}

/// How the agent reconnects to the broker: exponential backoff with full jitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackoffSettings {
    pub base: Duration,
    pub cap: Duration,
    /// A stream that stayed up this long resets the backoff to `base`.
    pub healthy_after: Duration,
}

impl Default for BackoffSettings {
    fn default() -> Self {
        BackoffSettings {
            base: Duration::from_millis(500),
            // A broker back from a restart has the farm again within 5 s: new logons go only
            // to machines whose stream is up. Refused connections cost it next to nothing.
            cap: Duration::from_secs(5),
            healthy_after: Duration::from_secs(30),
        }
    }
}

/// TLS to an https:// broker: the CA to trust (else the system's roots) and the client
/// certificate to present, if any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BrokerTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// Everything the agent runs with. Build one with [`AgentConfig::new`] and set fields.
pub struct AgentConfig {
    /// One URL, or several (a broker's replicas) separated by commas.
    pub broker_url: String,
    pub broker_tls: BrokerTls,
    /// The machine's name (FQDN), unique in its farm.
    pub machine_name: String,
    pub farm: String,
    /// "host:port" that clients and other front doors are sent to.
    pub advertise: String,
    pub weight: u32,
    /// 0 means no limit.
    pub session_limit: u32,
    pub single_session: bool,
    /// Stopping sends REMOVED (the machine leaves the farm, its sessions dropped) instead of
    /// only closing the stream.
    pub leave_on_stop: bool,
    pub control_socket: PathBuf,
    /// Holds the persisted session table.
    pub state_dir: PathBuf,
    /// `None`: no front door (sessions come from the control socket only).
    pub front_door: Option<FrontDoorBind>,
    /// "host:port" of this machine's own RDP service.
    pub local_rdp: String,
    /// How long a client may take to send its first packet.
    pub client_timeout: Duration,
    /// A session the front door opened for a cookie's user, that no local session source
    /// confirmed, is removed (a failed logon) when its connection ends sooner than this.
    /// Zero keeps such sessions (disconnected) whatever their connection lasted.
    pub unconfirmed_logon_grace: Duration,
    /// Sent as `authorization: Bearer <token>` on every call to the broker.
    pub agent_token: Option<String>,
    pub max_connections: usize,
    /// Most of them one client address holds (other front doors of the farm excepted).
    pub max_connections_per_client: usize,
    /// Where `/metrics` is served; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    pub backoff: BackoffSettings,
    /// Load report interval used until the broker's Welcome names one.
    pub default_heartbeat: Duration,
    /// How often the front door refreshes its list of the farm's machines (each refresh is
    /// a `ListMachines` of the whole farm, which the broker reads from its database); a lookup
    /// that misses refreshes it at once, so a machine that joins or comes back is found
    /// without waiting for this.
    pub machine_refresh: Duration,
    /// How long the stream waits for the broker's Welcome after ADDED.
    pub welcome_timeout: Duration,
    /// How often an agent displaced by another one using its machine name asks the broker
    /// whether the machine is free again.
    pub displaced_check: Duration,
    /// How often an agent whose stream is on another replica than its own asks whether its
    /// own serves again (to move back).
    pub home_check: Duration,
}

impl AgentConfig {
    /// The broker's URLs, in the order given (`broker_url` split at commas).
    pub fn broker_urls(&self) -> Vec<String> {
        self.broker_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// A configuration with every default, for machine `machine_name` keeping its state in
    /// `state_dir` (the control socket goes there too, as `control.sock`).
    pub fn new(machine_name: impl Into<String>, state_dir: impl Into<PathBuf>) -> Self {
        let machine_name = machine_name.into();
        let state_dir = state_dir.into();
        AgentConfig {
            broker_url: DEFAULT_BROKER_URL.to_owned(),
            broker_tls: BrokerTls::default(),
            advertise: format!("{machine_name}:3389"),
            machine_name,
            farm: DEFAULT_FARM.to_owned(),
            weight: validate::DEFAULT_WEIGHT,
            session_limit: 0,
            single_session: false,
            leave_on_stop: false,
            control_socket: state_dir.join("control.sock"),
            state_dir,
            front_door: None,
            local_rdp: DEFAULT_LOCAL_RDP.to_owned(),
            client_timeout: DEFAULT_CLIENT_TIMEOUT,
            unconfirmed_logon_grace: DEFAULT_UNCONFIRMED_LOGON_GRACE,
            agent_token: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            metrics_listen: None,
            backoff: BackoffSettings::default(),
            default_heartbeat: Duration::from_secs(5),
            machine_refresh: Duration::from_secs(30),
            welcome_timeout: Duration::from_secs(10),
            displaced_check: Duration::from_secs(10),
            home_check: Duration::from_secs(30),
        }
    }

    /// Checks every field; the error is one line naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        let named = |setting: &str, error: validate::ValidationError| {
            format!("--{setting}: {}", error.reason)
        };
        validate::machine_name("machine_name", &self.machine_name)
            .map_err(|e| named("machine-name", e))?;
        validate::farm_name("farm", &self.farm).map_err(|e| named("farm", e))?;
        validate::address("advertise", &self.advertise).map_err(|e| named("advertise", e))?;
        if let Some(ip) = validate::unspecified_host(&self.advertise) {
            return Err(format!(
                "--advertise: {ip} is no address another machine can reach this one at (it \
                 means every address of this host, as --front-door may listen on it): give \
                 this machine's own address or name"
            ));
        }
        validate::weight("weight", self.weight, false).map_err(|e| named("weight", e))?;
        validate::address("local_rdp", &self.local_rdp).map_err(|e| named("local-rdp", e))?;
        if self.single_session && self.session_limit > 1 {
            return Err("--session-limit: more than 1 with --single-session".to_owned());
        }
        let urls = self.broker_urls();
        if urls.is_empty() {
            return Err("--broker: no URL".to_owned());
        }
        let https = urls[0].starts_with("https://");
        for url in &urls {
            let url_ok = (url.starts_with("https://") || url.starts_with("http://"))
                && tonic::transport::Endpoint::from_shared(url.clone()).is_ok();
            if !url_ok {
                // `http://::1:50051`: an IPv6 host without its brackets.
                let bare_v6 = url
                    .split_once("://")
                    .is_some_and(|(_, rest)| !rest.contains('[') && rest.matches(':').count() > 1);
                let hint = if bare_v6 {
                    " (an IPv6 host in brackets: http://[::1]:50051)"
                } else {
                    ""
                };
                return Err(format!(
                    "--broker: {url:?} is not an http:// or https:// URL{hint}"
                ));
            }
            if url.starts_with("https://") != https {
                return Err("--broker: all https:// or all http://, not both".to_owned());
            }
        }
        let tls = &self.broker_tls;
        if !https && (tls.ca.is_some() || tls.cert.is_some()) {
            return Err(format!(
                "--broker-ca/--tls-cert: only for an https:// broker, not {:?}",
                self.broker_url
            ));
        }
        match (&tls.cert, &tls.key) {
            (Some(_), None) => return Err("--tls-cert: needs --tls-key".to_owned()),
            (None, Some(_)) => return Err("--tls-key: needs --tls-cert".to_owned()),
            _ => {}
        }
        if let Some(token) = &self.agent_token {
            if token.is_empty() {
                return Err(
                    "--agent-token: is empty: give the broker's agent token, or leave \
                            the setting out (an empty value does not mean none)"
                        .to_owned(),
                );
            }
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err("--agent-token: must be printable ASCII with no spaces".to_owned());
            }
        }
        if self.client_timeout.is_zero() {
            return Err("--client-timeout: must be more than zero".to_owned());
        }
        if self.max_connections == 0 {
            return Err("max_connections: must be more than zero".to_owned());
        }
        if self.max_connections_per_client == 0 {
            return Err("max_connections_per_client: must be more than zero".to_owned());
        }
        if self.control_socket.as_os_str().is_empty() {
            return Err("--control-socket: must not be empty".to_owned());
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err("--state-dir: must not be empty".to_owned());
        }
        Ok(())
    }
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("AgentConfig")
            .field("broker_url", &self.broker_url)
            .field("broker_tls", &self.broker_tls)
            .field("machine_name", &self.machine_name)
            .field("farm", &self.farm)
            .field("advertise", &self.advertise)
            .field("weight", &self.weight)
            .field("session_limit", &self.session_limit)
            .field("single_session", &self.single_session)
            .field("leave_on_stop", &self.leave_on_stop)
            .field("control_socket", &self.control_socket)
            .field("state_dir", &self.state_dir)
            .field("front_door", &self.front_door)
            .field("local_rdp", &self.local_rdp)
            .field("client_timeout", &self.client_timeout)
            .field("unconfirmed_logon_grace", &self.unconfirmed_logon_grace)
            .field(
                "agent_token",
                &self.agent_token.as_ref().map(|_| "<redacted>"),
            )
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_client",
                &self.max_connections_per_client,
            )
            .field("metrics_listen", &self.metrics_listen)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_token_is_redacted() {
        let mut config = AgentConfig::new("ts1.example.com", "/tmp/x");
        assert!(config.validate().is_ok());
        assert_eq!(config.advertise, "ts1.example.com:3389");
        config.agent_token = Some("s3cret".into());
        assert!(!format!("{config:?}").contains("s3cret"));
        config.agent_token = Some(String::new());
        assert!(config.validate().unwrap_err().contains("is empty"));
        config.agent_token = Some("two words".into());
        assert!(config.validate().unwrap_err().contains("no spaces"));
        config.agent_token = None;
        config.broker_url = "grpc://x".into();
        assert!(config.validate().unwrap_err().starts_with("--broker"));
    }

    #[test]
    fn several_broker_urls_are_separated_by_commas() {
        let mut config = AgentConfig::new("ts1.example.com", "/tmp/x");
        config.broker_url = "http://b1.example.com:50051, http://b2.example.com:50051,".into();
        assert!(config.validate().is_ok());
        assert_eq!(
            config.broker_urls(),
            ["http://b1.example.com:50051", "http://b2.example.com:50051"]
        );
        config.broker_url = "http://b1.example.com:50051,https://b2.example.com:50051".into();
        assert!(config.validate().unwrap_err().contains("not both"));
        config.broker_url = "http://b1.example.com:50051,b2".into();
        assert!(config.validate().unwrap_err().contains("\"b2\""));
        config.broker_url = " , ".into();
        assert!(config.validate().unwrap_err().starts_with("--broker"));
    }

    #[test]
    fn tls_settings_go_with_an_https_broker() {
        let mut config = AgentConfig::new("ts1.example.com", "/tmp/x");
        config.broker_tls.ca = Some("/etc/tsagent/ca.pem".into());
        assert!(config.validate().unwrap_err().starts_with("--broker-ca"));
        config.broker_url = "https://broker.example.com:50051".into();
        assert!(config.validate().is_ok());
        config.broker_tls.cert = Some("/etc/tsagent/agent.pem".into());
        assert!(config.validate().unwrap_err().starts_with("--tls-cert"));
        config.broker_tls.key = Some("/etc/tsagent/agent.key".into());
        assert!(config.validate().is_ok());
        config.broker_tls.cert = None;
        assert!(config.validate().unwrap_err().starts_with("--tls-key"));
    }

    #[test]
    fn a_broker_url_with_a_bare_ipv6_host_says_how_to_write_it() {
        let mut config = AgentConfig::new("ts1", "/tmp/x");
        config.broker_url = "http://::1:50051".into();
        let error = config.validate().unwrap_err();
        assert!(error.contains("in brackets: http://[::1]:50051"), "{error}");
        config.broker_url = "ftp://broker:50051".into();
        let error = config.validate().unwrap_err();
        assert!(!error.contains("brackets"), "{error}");
        config.broker_url = "http://[::1]:50051".into();
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn an_advertised_address_must_be_one_others_reach() {
        let unspecified = [
            "0.0.0.0:3389",
            "[::]:3389",
            "[0:0::0]:3389",
            "[::ffff:0.0.0.0]:3389",
            "0:3389",
            "0.0:3389",
            "0x0:3389",
        ];
        for unspecified in unspecified {
            let mut config = AgentConfig::new("ts1", "/tmp/x");
            config.advertise = unspecified.into();
            let error = config.validate().unwrap_err();
            assert!(error.starts_with("--advertise"), "{error}");
            assert!(error.contains("this machine's own address"), "{error}");
        }
        let reachable = [
            "10.0.0.1:3389",
            "[fd00::2]:3389",
            "ts1.example.com:3389",
            "10.0.0.0:3389",
        ];
        for reachable in reachable {
            let mut config = AgentConfig::new("ts1", "/tmp/x");
            config.advertise = reachable.into();
            assert_eq!(config.validate(), Ok(()), "{reachable}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let mut config = AgentConfig::new("ts1", "/tmp/x");
        config.weight = 0;
        assert!(config.validate().unwrap_err().starts_with("--weight"));
        let mut config = AgentConfig::new("ts1", "/tmp/x");
        config.advertise = "nope".into();
        assert!(config.validate().unwrap_err().starts_with("--advertise"));
        let mut config = AgentConfig::new("ts 1", "/tmp/x");
        config.advertise = "ts1:3389".into();
        assert!(config.validate().unwrap_err().starts_with("--machine-name"));
    }
}
