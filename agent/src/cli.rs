//! The `tsagent` command line: flags with `TSAGENT_*` environment variables, the `session`
//! and `status` subcommands that speak to a running agent's control socket.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// tsagent: reports this terminal server and its sessions to tsbroker, and redirects RDP
/// clients through its front door.
///
/// Settings come from flags, then TSAGENT_* environment variables, then the --config file
/// (TOML, the same names in snake_case: machine_name = "ts1.example.com"), then defaults.
#[derive(Debug, Parser)]
#[command(name = "tsagent", version, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub agent: AgentArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Settings of the agent itself (`tsagent` with no subcommand).
#[derive(Debug, Default, Args)]
pub struct AgentArgs {
    /// TOML file with any of these settings (keys in snake_case); flags and environment win
    /// (also taken after a subcommand, for the control socket it names)
    #[arg(long, env = "TSAGENT_CONFIG", value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// The broker's gRPC URL, http:// or https:// (TLS); for several replicas, their URLs
    /// separated by commas (a farm's agents spread over them, and an agent whose stream breaks
    /// tries the next) [default: http://127.0.0.1:50051]
    #[arg(long, env = "TSAGENT_BROKER", value_name = "URL")]
    pub broker: Option<String>,
    /// PEM CA certificate(s) to trust for an https:// broker [default: the system's roots]
    #[arg(long, env = "TSAGENT_BROKER_CA", value_name = "FILE")]
    pub broker_ca: Option<PathBuf>,
    /// PEM client certificate to present to an https:// broker that asks for one
    /// (--tls-client-ca on the broker) [default: none]
    #[arg(long, env = "TSAGENT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, env = "TSAGENT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// This machine's name in the farm [default: the host's FQDN, else its short name]
    #[arg(long, env = "TSAGENT_MACHINE_NAME", value_name = "NAME")]
    pub machine_name: Option<String>,
    /// The farm (collection) this machine belongs to [default: default]
    #[arg(long, env = "TSAGENT_FARM", value_name = "FARM")]
    pub farm: Option<String>,
    /// Where clients and other front doors reach this machine: its front door, or its RDP
    /// service where no front door runs; a name or an address of this host, not 0.0.0.0 or
    /// [::]; the farm's machines advertise addresses of one IP family
    /// [default: <machine-name>:<front door port, else 3389>]
    #[arg(long, env = "TSAGENT_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Relative capacity, 1..10000: weight 200 takes twice the sessions of weight 100
    /// [default: 100]
    #[arg(long, env = "TSAGENT_WEIGHT", value_name = "N")]
    pub weight: Option<u32>,
    /// Most sessions this machine hosts; 0 means no limit [default: 0]
    #[arg(long, env = "TSAGENT_SESSION_LIMIT", value_name = "N")]
    pub session_limit: Option<u32>,
    /// Single-session mode: at most one session on this machine [default: false]
    #[arg(long, env = "TSAGENT_SINGLE_SESSION", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub single_session: Option<bool>,
    /// On stopping, tell the broker this machine leaves the farm (it and its sessions are
    /// dropped from the directory, its drain and overrides with them): for machines that are
    /// destroyed after they stop. Without it a
    /// stop or restart only closes the stream, and the machine's users are still sent back to
    /// it for the broker's heartbeat timeout from the stop [default: false]
    #[arg(long, env = "TSAGENT_LEAVE_ON_STOP", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub leave_on_stop: Option<bool>,
    /// The local control socket that `tsagent session ...` (PAM, xrdp scripts) speaks to
    /// [default: /run/tsagent/control.sock]
    #[arg(long, env = "TSAGENT_CONTROL_SOCKET", value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Directory of the persisted session table, so a restart keeps the sessions still
    /// running [default: /var/lib/tsagent]
    #[arg(long, env = "TSAGENT_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Run the RDP front door on this address, e.g. 0.0.0.0:3389 (with the RDP service moved
    /// to --local-rdp) [default: no front door]
    #[arg(long, env = "TSAGENT_FRONT_DOOR", value_name = "ADDR")]
    pub front_door: Option<SocketAddr>,
    /// This machine's own RDP service, where the front door hands local connections
    /// [default: 127.0.0.1:3390]
    #[arg(long, env = "TSAGENT_LOCAL_RDP", value_name = "HOST:PORT")]
    pub local_rdp: Option<String>,
    /// How long a client may take to send its first packet before it is cut off [default: 10s]
    #[arg(long, env = "TSAGENT_CLIENT_TIMEOUT", value_name = "DURATION", value_parser = tsbroker_common::validate::duration)]
    pub client_timeout: Option<std::time::Duration>,
    /// Most client connections through the front door at once (each takes two file
    /// descriptors; the agent raises its soft open-files limit to fit, within the hard one,
    /// and lowers this to what that allows) [default: 10000]
    #[arg(long, env = "TSAGENT_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Most of those connections one client address holds at once: more from it are closed at
    /// once, so that one address cannot take every slot (other front doors of the farm are
    /// not limited; raise it for many users behind one NAT address) [default: 500]
    #[arg(long, env = "TSAGENT_MAX_CONNECTIONS_PER_CLIENT", value_name = "N")]
    pub max_connections_per_client: Option<usize>,
    /// A session the front door opened from the client's cookie, that nothing local (PAM,
    /// `tsagent session ...`) confirmed, is removed as a failed logon (wrong password, or a
    /// cookie naming anyone) when its connection ends sooner than this; a longer connection
    /// leaves it disconnected. 0 keeps every such session. Only until a local source reports a
    /// logon (PAM): from then on only its report keeps such a session [default: 30s]
    #[arg(long, env = "TSAGENT_UNCONFIRMED_LOGON_GRACE", value_name = "DURATION", value_parser = tsbroker_common::validate::duration)]
    pub unconfirmed_logon_grace: Option<std::time::Duration>,
    /// Token sent to the broker as `authorization: Bearer <token>`
    #[arg(
        long,
        env = "TSAGENT_AGENT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub agent_token: Option<String>,
    /// Log line format: plain or json [default: plain]
    #[arg(long, env = "TSAGENT_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Address to serve Prometheus metrics on (/metrics, plain HTTP), e.g. 127.0.0.1:9151
    /// [default: none]
    #[arg(long, env = "TSAGENT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Report a session event to the running agent, or list its sessions (what PAM's
    /// pam_exec and xrdp's session scripts call)
    Session {
        #[command(subcommand)]
        action: SessionCommand,
    },
    /// Show the running agent's machine and its link to the broker. Exit status: 0 connected
    /// to the broker, 3 running but not connected, 4 connected but unable to save its session
    /// table (the state directory cannot be written), 1 the agent could not be asked, 64 bad
    /// settings (an unreadable --config file)
    Status(SocketArg),
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// A user logged on (a new session)
    Logon(SessionEventArgs),
    /// The client went away; the session keeps running
    Disconnect(SessionEventArgs),
    /// A client attached to a disconnected session
    Reconnect(SessionEventArgs),
    /// The session ended
    Logoff(SessionEventArgs),
    /// For pam_exec: logon on open_session, logoff on close_session, from PAM_TYPE,
    /// PAM_USER, PAM_TTY (the X display ":N" is session N) and PAM_RHOST (a bare address)
    Pam(PamArgs),
    /// List the sessions the agent knows
    List(SocketArg),
}

#[derive(Debug, Args)]
pub struct SocketArg {
    /// The agent's control socket [default: tsagent's own --control-socket (or
    /// TSAGENT_CONTROL_SOCKET), else the control_socket of its --config file, else
    /// /run/tsagent/control.sock]
    // No `env` here: the environment is read once, as tsagent's own flag's, so that a flag
    // given before the subcommand wins over it.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SessionEventArgs {
    /// The session's user
    #[arg(long, value_name = "USER")]
    pub user: String,
    /// The user's domain
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// The session's number on this machine (for xrdp, the display number); without it a
    /// logon gets a new number and other events act on the user's most recent session
    #[arg(long, value_name = "N")]
    pub session_id: Option<u32>,
    /// The client's IP address ("ip:port", "[v6]:port" or a bare IP), when known; a loopback
    /// address is not kept (behind the front door it is the front door's, not the client's)
    #[arg(long, value_name = "ADDRESS", value_parser = client_address)]
    pub client_address: Option<String>,
    /// Only for a session the agent knows: an event for another is refused rather than taken
    /// for a session that started unseen (xrdp's reconnect hook, which any local user can run
    /// through sudo, passes it)
    #[arg(long)]
    pub known_only: bool,
    #[command(flatten)]
    pub socket: SocketArg,
    #[command(flatten)]
    pub wait: WaitArg,
}

#[derive(Debug, Args)]
pub struct PamArgs {
    #[command(flatten)]
    pub socket: SocketArg,
    #[command(flatten)]
    pub wait: WaitArg,
}

#[derive(Debug, Args)]
pub struct WaitArg {
    /// How long to wait for an agent that is not running (restarting: the unit restarts a
    /// failed agent after 5 s) before giving up; an event the agent never gets is lost (a
    /// missed logoff leaves a session that never ends). 0s: do not wait
    #[arg(long, value_name = "DURATION", default_value = "8s")]
    pub wait: humantime::Duration,
}

/// `--client-address`: an IP address, with a port or without.
fn client_address(text: &str) -> Result<String, String> {
    tsbroker_common::validate::client_address("--client-address", text)
        .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "tsagent",
            "--farm",
            "f1",
            "--single-session",
            "--client-timeout",
            "3s",
            "--unconfirmed-logon-grace",
            "5s",
            "--front-door",
            "0.0.0.0:3389",
        ])
        .unwrap();
        assert_eq!(cli.agent.farm.as_deref(), Some("f1"));
        assert_eq!(cli.agent.single_session, Some(true));
        assert_eq!(
            cli.agent.client_timeout.unwrap(),
            std::time::Duration::from_secs(3)
        );
        assert_eq!(
            cli.agent.unconfirmed_logon_grace.unwrap(),
            std::time::Duration::from_secs(5)
        );
        let cli = Cli::try_parse_from([
            "tsagent",
            "session",
            "logoff",
            "--user",
            "alice",
            "--session-id",
            "12",
            "--control-socket",
            "/tmp/x.sock",
        ])
        .unwrap();
        let Some(Command::Session {
            action: SessionCommand::Logoff(args),
        }) = cli.command
        else {
            panic!("expected session logoff");
        };
        assert_eq!((args.user.as_str(), args.session_id), ("alice", Some(12)));
        assert_eq!(*args.wait.wait, std::time::Duration::from_secs(8));
        assert_eq!(
            args.socket.control_socket,
            Some(PathBuf::from("/tmp/x.sock"))
        );
        // --config after the subcommand, as --control-socket is taken.
        let cli = Cli::try_parse_from([
            "tsagent",
            "session",
            "list",
            "--config",
            "/etc/tsagent/tsagent.toml",
        ])
        .unwrap();
        assert_eq!(
            cli.agent.config,
            Some(PathBuf::from("/etc/tsagent/tsagent.toml"))
        );
    }
}
