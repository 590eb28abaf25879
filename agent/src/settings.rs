//! Layers the agent's settings: flags and environment (from clap), then the TOML file, then
//! defaults; the result is an [`AgentConfig`], checked.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tsbroker_common::telemetry::LogFormat;

use crate::cli::AgentArgs;
use crate::config::{self, AgentConfig, BrokerTls, FrontDoorBind};

/// The `--config` file: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub broker: Option<String>,
    pub broker_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub machine_name: Option<String>,
    pub farm: Option<String>,
    pub advertise: Option<String>,
    pub weight: Option<u32>,
    pub session_limit: Option<u32>,
    pub single_session: Option<bool>,
    pub leave_on_stop: Option<bool>,
    pub control_socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub front_door: Option<SocketAddr>,
    pub local_rdp: Option<String>,
    /// A duration such as "10s".
    pub client_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<usize>,
    /// A duration such as "30s"; "0s" keeps unconfirmed front-door sessions.
    pub unconfirmed_logon_grace: Option<String>,
    pub agent_token: Option<String>,
    pub log_format: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
}

pub fn read_file(path: &Path) -> Result<FileSettings, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("--config: cannot read {}: {error}", path.display()))?;
    tsbroker_common::config_file::parse(&text)
        .map_err(|error| format!("--config: {}: {error}", path.display()))
}

/// This host's name: the FQDN its short name resolves to, else the short name.
pub fn default_machine_name() -> Option<String> {
    let short = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| dns_lookup::get_hostname().ok())?;
    if short.contains('.') {
        return Some(short);
    }
    Some(resolve_fqdn(&short).unwrap_or(short))
}

fn resolve_fqdn(short: &str) -> Option<String> {
    // AI_CANONNAME (the same value in glibc and musl).
    const AI_CANONNAME: i32 = 0x0002;
    let hints = dns_lookup::AddrInfoHints {
        flags: AI_CANONNAME,
        address: 0,
        socktype: 1, // SOCK_STREAM: one answer per address, not one per socket type
        protocol: 0,
    };
    dns_lookup::getaddrinfo(Some(short), None, Some(hints))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|info| info.canonname)
        .find(|name| name.contains('.') && !name.eq_ignore_ascii_case("localhost.localdomain"))
}

/// Whether `local_rdp` ("host:port") would reach the front door bound at `front_door`.
fn is_same_listener(front_door: SocketAddr, local_rdp: &str) -> bool {
    let Ok(local) = local_rdp.parse::<SocketAddr>() else {
        return false;
    };
    local.port() == front_door.port()
        && (front_door.ip().is_unspecified() || front_door.ip() == local.ip())
}

/// The control socket a subcommand (`session ...`, `status`) speaks to: its own
/// `--control-socket`, else the one given to `tsagent` before the subcommand, else the
/// `--config` file's, else the default: where the agent started with the same settings listens.
pub fn control_socket(subcommand: Option<PathBuf>, agent: &AgentArgs) -> Result<PathBuf, String> {
    if let Some(path) = subcommand.or_else(|| agent.control_socket.clone()) {
        return Ok(path);
    }
    let from_file = match &agent.config {
        Some(path) => read_file(path)?.control_socket,
        None => None,
    };
    Ok(from_file.unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONTROL_SOCKET)))
}

/// The agent's configuration from the command line (flags, environment) and its file.
pub fn agent_config(args: AgentArgs) -> Result<(AgentConfig, LogFormat), String> {
    let file = match &args.config {
        Some(path) => read_file(path)?,
        None => FileSettings::default(),
    };
    let log_format = match args.log_format.or(file.log_format) {
        Some(text) => text
            .parse::<LogFormat>()
            .map_err(|e| format!("--log-format: {e}"))?,
        None => LogFormat::default(),
    };
    let machine_name = match args.machine_name.or(file.machine_name) {
        Some(name) => name,
        None => {
            default_machine_name().ok_or("--machine-name: cannot tell this host's name, set it")?
        }
    };
    let state_dir = args
        .state_dir
        .or(file.state_dir)
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_STATE_DIR));
    let mut config = AgentConfig::new(machine_name.clone(), state_dir);
    config.control_socket = args
        .control_socket
        .or(file.control_socket)
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONTROL_SOCKET));
    if let Some(broker) = args.broker.or(file.broker) {
        config.broker_url = broker;
    }
    config.broker_tls = BrokerTls {
        ca: args.broker_ca.or(file.broker_ca),
        cert: args.tls_cert.or(file.tls_cert),
        key: args.tls_key.or(file.tls_key),
    };
    if let Some(farm) = args.farm.or(file.farm) {
        config.farm = farm;
    }
    if let Some(weight) = args.weight.or(file.weight) {
        config.weight = weight;
    }
    if let Some(limit) = args.session_limit.or(file.session_limit) {
        config.session_limit = limit;
    }
    if let Some(leave) = args.leave_on_stop.or(file.leave_on_stop) {
        config.leave_on_stop = leave;
    }
    if let Some(single) = args.single_session.or(file.single_session) {
        config.single_session = single;
    }
    let front_door = args.front_door.or(file.front_door);
    // Clients reach this machine where its front door listens, else on the RDP port.
    let advertised_port = front_door.map_or(3389, |address| address.port());
    config.advertise = args
        .advertise
        .or(file.advertise)
        .unwrap_or_else(|| format!("{machine_name}:{advertised_port}"));
    config.front_door = front_door.map(FrontDoorBind::Address);
    if let Some(local_rdp) = args.local_rdp.or(file.local_rdp) {
        config.local_rdp = local_rdp;
    }
    if let Some(front_door) = front_door
        && is_same_listener(front_door, &config.local_rdp)
    {
        return Err(format!(
            "--local-rdp: {} is the front door itself; move the rdp service to another port",
            config.local_rdp
        ));
    }
    if let Some(max) = args.max_connections.or(file.max_connections) {
        config.max_connections = max;
    }
    if let Some(max) = args
        .max_connections_per_client
        .or(file.max_connections_per_client)
    {
        config.max_connections_per_client = max;
    }
    if let Some(timeout) = args.client_timeout {
        config.client_timeout = timeout;
    } else if let Some(text) = file.client_timeout {
        config.client_timeout = tsbroker_common::validate::duration(&text)
            .map_err(|error| format!("--client-timeout: {error}"))?;
    }
    if let Some(grace) = args.unconfirmed_logon_grace {
        config.unconfirmed_logon_grace = grace;
    } else if let Some(text) = file.unconfirmed_logon_grace {
        config.unconfirmed_logon_grace = tsbroker_common::validate::duration(&text)
            .map_err(|error| format!("--unconfirmed-logon-grace: {error}"))?;
    }
    config.agent_token = args.agent_token.or(file.agent_token);
    config.metrics_listen = args.metrics_listen.or(file.metrics_listen);
    config.validate()?;
    Ok((config, log_format))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file_which_wins_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tsagent.toml");
        std::fs::write(
            &path,
            "machine_name = \"ts9.example\"\nfarm = \"filefarm\"\nweight = 300\nclient_timeout = \"3s\"\nunconfirmed_logon_grace = \"7s\"\n",
        )
        .unwrap();
        let args = AgentArgs {
            config: Some(path),
            farm: Some("flagfarm".into()),
            ..Default::default()
        };
        let (config, format) = agent_config(args).unwrap();
        assert_eq!(config.machine_name, "ts9.example");
        assert_eq!(config.farm, "flagfarm");
        assert_eq!(config.weight, 300);
        assert_eq!(config.client_timeout, std::time::Duration::from_secs(3));
        assert_eq!(
            config.unconfirmed_logon_grace,
            std::time::Duration::from_secs(7)
        );
        assert_eq!(config.advertise, "ts9.example:3389");
        assert_eq!(
            config.control_socket,
            PathBuf::from(config::DEFAULT_CONTROL_SOCKET)
        );
        assert_eq!(format, LogFormat::Plain);
    }

    #[test]
    fn bad_settings_are_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "machine_nmae = \"x\"\n").unwrap();
        let args = AgentArgs {
            config: Some(path),
            ..Default::default()
        };
        let error = agent_config(args).unwrap_err();
        assert!(error.starts_with("--config"), "{error}");
        assert!(!error.contains('\n'), "{error}");
        let args = AgentArgs {
            machine_name: Some("ts1".into()),
            weight: Some(0),
            ..Default::default()
        };
        assert!(agent_config(args).unwrap_err().starts_with("--weight"));
    }

    #[test]
    fn front_door_sets_the_advertised_port_and_must_not_be_the_rdp_service() {
        let args = AgentArgs {
            machine_name: Some("ts1".into()),
            front_door: Some("0.0.0.0:4000".parse().unwrap()),
            ..Default::default()
        };
        let (config, _) = agent_config(args).unwrap();
        assert_eq!(config.advertise, "ts1:4000");
        let args = AgentArgs {
            machine_name: Some("ts1".into()),
            front_door: Some("0.0.0.0:3389".parse().unwrap()),
            local_rdp: Some("127.0.0.1:3389".into()),
            ..Default::default()
        };
        assert!(agent_config(args).unwrap_err().starts_with("--local-rdp"));
    }

    #[test]
    fn subcommands_find_the_socket_the_agent_was_given() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tsagent.toml");
        std::fs::write(&path, "control_socket = \"/run/file.sock\"\n").unwrap();
        let with_file = AgentArgs {
            config: Some(path),
            ..Default::default()
        };
        let socket = |sub: Option<&str>, agent: &AgentArgs| {
            control_socket(sub.map(PathBuf::from), agent).unwrap()
        };
        assert_eq!(socket(None, &with_file), PathBuf::from("/run/file.sock"));
        assert_eq!(
            socket(Some("/run/sub.sock"), &with_file),
            PathBuf::from("/run/sub.sock")
        );
        let with_flag = AgentArgs {
            control_socket: Some("/run/flag.sock".into()),
            ..with_file
        };
        assert_eq!(socket(None, &with_flag), PathBuf::from("/run/flag.sock"));
        assert_eq!(
            socket(None, &AgentArgs::default()),
            PathBuf::from(config::DEFAULT_CONTROL_SOCKET)
        );
        let missing = AgentArgs {
            config: Some(dir.path().join("missing.toml")),
            ..Default::default()
        };
        let error = control_socket(None, &missing).unwrap_err();
        assert!(error.starts_with("--config"), "{error}");
    }

    #[test]
    fn this_host_has_a_name() {
        assert!(default_machine_name().is_some_and(|name| !name.is_empty()));
    }
}
