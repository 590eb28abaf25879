//! `tsbroker-bench SCENARIO [--store sqlite|postgres] [size flags]`: runs the scenario on each
//! store asked for (both by default) and prints one line of results per scenario step, after a
//! line describing the machine. See BENCHMARKS.md for the commands behind the published numbers.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;
use tsbroker_bench::scenarios::{decisions, frontdoor, ingest, revocation, scale, storm};
use tsbroker_bench::{Context, ProcessMode, Report, StoreKind};

/// Benchmarks of tsbroker and tsagent (issue 5).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Stores to run on (repeat the flag for both) [default: sqlite and postgres]. PostgreSQL
    /// comes from DATABASE_URL (a fresh database is created per run and dropped after).
    #[arg(long, value_enum, global = true)]
    store: Vec<StoreKind>,
    /// Brokers and the front door's agent as the real binaries next to this one (process) or
    /// inside this process.
    #[arg(long, value_enum, global = true, default_value = "process")]
    mode: ProcessMode,
    /// Print JSON objects instead of key=value lines.
    #[arg(long, global = true)]
    json: bool,
    /// Progress lines on stderr.
    #[arg(long, short, global = true)]
    verbose: bool,
    /// Simulated agent streams per HTTP/2 connection.
    #[arg(long, global = true, default_value_t = 100)]
    streams_per_connection: usize,
    /// The broker serves gRPC over TLS (certificates made with `openssl` for the run) and the
    /// tool's clients use it: what TLS costs. Not for frontdoor (its agent speaks plaintext);
    /// revocation always runs over TLS.
    #[arg(long, global = true)]
    tls: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// Redirect throughput and latency at 1, 16, 64 in flight against the echo RPC.
    Decisions {
        #[arg(long, default_value_t = 1_000)]
        machines: usize,
        #[arg(long, default_value_t = 100_000)]
        sessions: usize,
        /// Calls in flight, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        concurrency: Vec<usize>,
        /// Measured time per concurrency and per RPC.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Percent of calls for users never seen (placements); the rest have a session.
        #[arg(long, default_value_t = 10)]
        new_user_percent: u32,
        #[arg(long, default_value_t = 4)]
        connections: usize,
    },
    /// A logon storm through Redirect and the agents' streams.
    Storm {
        #[arg(long, default_value_t = 100)]
        machines: usize,
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        over: Duration,
        /// Every machine of weight 100 (default: weights alternate 100 and 200).
        #[arg(long)]
        equal_weights: bool,
        /// Wait after every machine is READY before the storm starts.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        settle: Duration,
        /// Keep the broker's default slow start (60 s) instead of turning it off.
        #[arg(long)]
        slow_start: bool,
    },
    /// Durable session events per second from many agents, against raw inserts.
    Ingest {
        #[arg(long, default_value_t = 1_000)]
        machines: usize,
        /// Unacknowledged events per stream.
        #[arg(long, default_value_t = 32)]
        window: usize,
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Memory, restart resync time and decision latency at 10,000 machines / 1,000,000 sessions.
    Scale {
        #[arg(long, default_value_t = 10_000)]
        machines: usize,
        #[arg(long, default_value_t = 1_000_000)]
        sessions: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Machines joining at once during the initial load (reconnects after the restart are
        /// not paced, as in a real farm).
        #[arg(long, default_value_t = 64)]
        join_concurrency: usize,
    },
    /// The tsagent front door against HAProxy and a direct connection.
    Frontdoor {
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 100)]
        users: usize,
        #[arg(long, default_value_t = 512)]
        bulk_mib: usize,
        /// Then bursts of this many connections held open together through the front door
        /// and through HAProxy, each proxy's resident memory read after each burst has closed
        /// (0: none).
        #[arg(long, default_value_t = 0)]
        burst: usize,
        #[arg(long, default_value_t = 4)]
        burst_rounds: usize,
    },
    /// What checking open TLS connections against a new revocation list costs the broker.
    Revocation {
        /// TLS connections with a client certificate held open.
        #[arg(long, default_value_t = 5_000)]
        connections: usize,
        /// Each CPU window (longer than the broker's 10 s file check).
        #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
        window: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tsbroker-bench: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

/// With `--tls`, the broker's certificate files in a directory kept for the run.
fn tls_files(cli: &Cli) -> anyhow::Result<Option<(tempfile::TempDir, tsbroker::tls::TlsFiles)>> {
    if !cli.tls && !matches!(cli.scenario, Scenario::Revocation { .. }) {
        return Ok(None);
    }
    if matches!(cli.scenario, Scenario::Frontdoor { .. }) {
        anyhow::bail!("frontdoor does not run with TLS");
    }
    let dir = tempfile::Builder::new()
        .prefix("tsbroker-bench-tls-")
        .tempdir()?;
    let files = tsbroker_bench::tls::set_up(dir.path())?;
    Ok(Some((dir, files)))
}

fn print(report: &Report, json: bool) {
    if json {
        println!("{}", report.json());
    } else {
        println!("{}", report.line());
    }
}

async fn run(cli: Cli) -> ExitCode {
    let stores = if cli.store.is_empty() {
        vec![StoreKind::Sqlite, StoreKind::Postgres]
    } else {
        cli.store.clone()
    };
    print(&tsbroker_bench::env::machine_report(), cli.json);
    // Kept until the run ends: the broker reads its files from there.
    let tls_dir = match tls_files(&cli) {
        Ok(made) => made,
        Err(error) => {
            eprintln!("tsbroker-bench: --tls: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for store in stores {
        let mut context = Context::new(store, cli.mode);
        context.verbose = cli.verbose;
        context.streams_per_connection = cli.streams_per_connection;
        context.tls = tls_dir.as_ref().map(|(_, files)| files.clone());
        let result = match &cli.scenario {
            Scenario::Decisions {
                machines,
                sessions,
                concurrency,
                duration,
                new_user_percent,
                connections,
            } => {
                let options = decisions::Options {
                    machines: *machines,
                    sessions: *sessions,
                    concurrency: concurrency.clone(),
                    duration: *duration,
                    new_user_percent: *new_user_percent,
                    connections: *connections,
                    ..decisions::Options::default()
                };
                decisions::run(&context, &options).await
            }
            Scenario::Storm {
                machines,
                users,
                over,
                equal_weights,
                settle,
                slow_start,
            } => {
                let options = storm::Options {
                    machines: *machines,
                    users: *users,
                    over: *over,
                    mixed_weights: !equal_weights,
                    settle: *settle,
                    slow_start_off: !slow_start,
                    ..storm::Options::default()
                };
                storm::run(&context, &options).await
            }
            Scenario::Ingest {
                machines,
                window,
                duration,
            } => {
                let options = ingest::Options {
                    machines: *machines,
                    window: *window,
                    duration: *duration,
                    ..ingest::Options::default()
                };
                ingest::run(&context, &options).await
            }
            Scenario::Scale {
                machines,
                sessions,
                concurrency,
                duration,
                join_concurrency,
            } => {
                let options = scale::Options {
                    machines: *machines,
                    sessions: *sessions,
                    concurrency: *concurrency,
                    duration: *duration,
                    join_concurrency: *join_concurrency,
                    ..scale::Options::default()
                };
                scale::run(&context, &options).await
            }
            Scenario::Frontdoor {
                concurrency,
                duration,
                users,
                bulk_mib,
                burst,
                burst_rounds,
            } => {
                let options = frontdoor::Options {
                    concurrency: *concurrency,
                    duration: *duration,
                    users: *users,
                    bulk_mib: *bulk_mib,
                    bursts: frontdoor::Bursts {
                        connections: *burst,
                        rounds: *burst_rounds,
                        ..frontdoor::Bursts::default()
                    },
                    ..frontdoor::Options::default()
                };
                frontdoor::run(&context, &options).await
            }
            Scenario::Revocation {
                connections,
                window,
            } => {
                let options = revocation::Options {
                    connections: *connections,
                    window: *window,
                };
                revocation::run(&context, &options).await
            }
        };
        match result {
            Ok(reports) => {
                for mut report in reports {
                    if cli.tls {
                        report.set("tls", "on");
                    }
                    print(&report, cli.json);
                }
            }
            Err(error) => {
                eprintln!(
                    "tsbroker-bench: {} on {}: {error:#}",
                    scenario_name(&cli.scenario),
                    store.name()
                );
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn scenario_name(scenario: &Scenario) -> &'static str {
    match scenario {
        Scenario::Decisions { .. } => "decisions",
        Scenario::Storm { .. } => "storm",
        Scenario::Ingest { .. } => "ingest",
        Scenario::Scale { .. } => "scale",
        Scenario::Frontdoor { .. } => "frontdoor",
        Scenario::Revocation { .. } => "revocation",
    }
}
