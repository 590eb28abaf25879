//! The `tsbroker` binary: parse settings, set up logging, serve until SIGINT or SIGTERM (or,
//! with `--health-check`, ask a running broker whether it is serving).
#![forbid(unsafe_code)]

use clap::Parser;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;
use tsbroker::config::Cli;

/// jemalloc with its background threads for Rust's allocations (SQLite's own stay with the C
/// library's malloc: replacing malloc for the whole process deadlocked at start under an
/// `LD_PRELOAD` that wraps the clock, libfaketime). With glibc's malloc, at 10,000 machines and
/// a million sessions, the decisions after a restart's resync ran at a fifth of their rate
/// before it (1,600-2,100/s, p99 365-495 ms) and the agents' resync took 16-17 s; with
/// jemalloc, as many decisions after the restart as before and 65-155 MiB less once the
/// agents are back (BENCHMARKS.md, thirty-first run).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a bad setting (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            let rendered = error.to_string();
            let first_line = rendered.lines().next().unwrap_or("bad arguments");
            eprintln!(
                "tsbroker: {} (see tsbroker --help)",
                first_line.trim_start_matches("error: ")
            );
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let health_check = cli.health_check;
    let config = match cli.into_config() {
        Ok(config) => config,
        Err(reason) => {
            eprintln!("tsbroker: {reason}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if health_check {
        return check_health(&config);
    }
    tsbroker_common::telemetry::init_logging(config.log_format);
    // Every agent's stream and every client takes a descriptor: a shell's or a container's
    // default soft open-files limit (often 1024) is raised to the hard one.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(open_files_limit = limit, "open-files soft limit raised"),
        Err(error) => tracing::debug!(%error, "the open-files soft limit could not be raised"),
    }
    let runtime = match build_runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("tsbroker: cannot listen on {}: {error}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(tsbroker_common::signals::stop_on_signals(move || {
            stop.cancel()
        }));
        match tsbroker::run(config, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "tsbroker stopped");
                eprintln!("tsbroker: {error:#}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The runtime `builder` makes, with I/O and timers; the exit code when it cannot be built.
fn build_runtime(
    mut builder: tokio::runtime::Builder,
) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|error| {
        eprintln!("tsbroker: cannot start the runtime: {error}");
        ExitCode::FAILURE
    })
}

/// `--health-check`: 0 when the broker at the listen address is SERVING, 1 otherwise.
fn check_health(config: &tsbroker::BrokerConfig) -> ExitCode {
    // The check needs the broker's own certificate only: a client CA or revocation list being
    // renewed at that moment must not make a serving broker look down.
    let own = config.tls.as_ref().map(tsbroker::tls::TlsFiles::own_only);
    let tls = match own.as_ref().map(tsbroker::tls::ServerTls::load) {
        None => None,
        Some(Ok(tls)) => Some(tls),
        Some(Err(error)) => {
            eprintln!("tsbroker: health check: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    // A broker whose certificate every client refuses serves no one, whatever it answers.
    if let Some(refused) = tls.as_ref().and_then(|tls| tls.own_certificate_refused()) {
        eprintln!("tsbroker: health check: {refused}");
        return ExitCode::FAILURE;
    }
    let runtime = match build_runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(tsbroker::health_check::check(config.listen, tls.as_ref())) {
        Ok(status) => {
            println!("{}", status.as_str_name());
            if status == tonic_health::pb::health_check_response::ServingStatus::Serving {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(reason) => {
            eprintln!("tsbroker: health check: {reason}");
            ExitCode::FAILURE
        }
    }
}
