//! The `tsagent` binary: parses the command line, then runs the agent or speaks to a running
//! one through its control socket.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tsagent::cli::{AgentArgs, Cli, Command, SessionCommand, SessionEventArgs};
use tsagent::control::{Request, Response, SessionArgs, client, pam};

/// jemalloc with its background threads for Rust's allocations, not the system's malloc: after a
/// burst of thousands of connections through the front door glibc kept the memory they had
/// freed (resident memory 140–340 MB after bursts of 7,000–9,000 connections, growing with each
/// burst and never given back while idle), where jemalloc's background threads give it back within
/// seconds, idle or not (about 25 MB after each burst: BENCHMARKS.md, thirty-first run).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status for bad settings (EX_USAGE).
const EXIT_BAD_SETTINGS: u8 = 64;
/// `tsagent status`: the agent runs but is not connected to the broker (health checks).
const EXIT_NOT_CONNECTED: u8 = 3;
/// `tsagent status`: the agent runs and is connected, but cannot save its session table.
const EXIT_TABLE_UNSAVED: u8 = 4;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            // --help and --version.
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            let text = error.to_string();
            let reason = text.lines().next().unwrap_or_default();
            eprintln!("tsagent: {}", reason.trim_start_matches("error: "));
            return ExitCode::from(EXIT_BAD_SETTINGS);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tsagent: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(command) => runtime.block_on(control_command(command, &cli.agent)),
        None => run_agent(runtime, cli),
    }
}

fn run_agent(runtime: tokio::runtime::Runtime, cli: Cli) -> ExitCode {
    let (config, log_format) = match tsagent::settings::agent_config(cli.agent) {
        Ok(settings) => settings,
        Err(reason) => {
            eprintln!("tsagent: {reason}");
            return ExitCode::from(EXIT_BAD_SETTINGS);
        }
    };
    tsbroker_common::telemetry::init_logging(log_format);
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(tsbroker_common::signals::stop_on_signals(move || {
            stop.cancel()
        }));
        match tsagent::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "agent failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// The socket, the event and how long to wait for an agent that is not running.
fn session_args(args: SessionEventArgs) -> (Option<PathBuf>, SessionArgs, Duration) {
    let request = SessionArgs {
        user: args.user,
        domain: args.domain,
        session_id: args.session_id,
        client_address: args.client_address,
        known_only: args.known_only,
    };
    (args.socket.control_socket, request, *args.wait.wait)
}

async fn control_command(command: Command, agent: &AgentArgs) -> ExitCode {
    // Questions are answered by a running agent or not at all; session events wait for one
    // that is restarting.
    let (socket, request, wait) = match command {
        Command::Status(socket) => (socket.control_socket, Request::Status, Duration::ZERO),
        Command::Session { action } => match action {
            SessionCommand::List(socket) => (socket.control_socket, Request::List, Duration::ZERO),
            SessionCommand::Pam(args) => match pam::request(|name| std::env::var(name).ok()) {
                Ok(Some(request)) => (args.socket.control_socket, request, *args.wait.wait),
                // auth, account, password: nothing to report.
                Ok(None) => return ExitCode::SUCCESS,
                Err(reason) => {
                    eprintln!("tsagent: {reason}");
                    return ExitCode::from(EXIT_BAD_SETTINGS);
                }
            },
            SessionCommand::Logon(args) => {
                let (socket, args, wait) = session_args(args);
                (socket, Request::Logon(args), wait)
            }
            SessionCommand::Disconnect(args) => {
                let (socket, args, wait) = session_args(args);
                (socket, Request::Disconnect(args), wait)
            }
            SessionCommand::Reconnect(args) => {
                let (socket, args, wait) = session_args(args);
                (socket, Request::Reconnect(args), wait)
            }
            SessionCommand::Logoff(args) => {
                let (socket, args, wait) = session_args(args);
                (socket, Request::Logoff(args), wait)
            }
        },
    };
    let socket = match tsagent::settings::control_socket(socket, agent) {
        Ok(socket) => socket,
        Err(reason) => {
            eprintln!("tsagent: {reason}");
            return ExitCode::from(EXIT_BAD_SETTINGS);
        }
    };
    let response = match client::call_waiting(&socket, &request, wait).await {
        Ok(response) => response,
        Err(error) => {
            eprintln!("tsagent: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    match client::render(&response) {
        Ok(text) => {
            // Not println!, which panics when the reader went away (`tsagent status | head -1`):
            // a closed pipe is the reader's choice, and the exit status still tells.
            let _ = writeln!(std::io::stdout(), "{text}");
            match response {
                Response::Status { status } if !status.link.connected => {
                    ExitCode::from(EXIT_NOT_CONNECTED)
                }
                Response::Status { status } if status.session_table_unsaved => {
                    ExitCode::from(EXIT_TABLE_UNSAVED)
                }
                _ => ExitCode::SUCCESS,
            }
        }
        Err(message) => {
            eprintln!("tsagent: {message}");
            ExitCode::FAILURE
        }
    }
}
