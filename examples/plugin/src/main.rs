//! `tsbroker-plugin-example`: a complete load-balancing plug-in for tsbroker, the
//! IWTSSBPlugin model over gRPC (`tsbroker.v1.Plugin`, see `proto/tsbroker/v1/plugin.proto`).
//!
//! **Policy: fewest ACTIVE sessions per weight.** The broker's default counts every session; a
//! disconnected session holds memory but little CPU, so this plug-in ranks the candidates the
//! broker offers by (active sessions + logons in flight) / weight, and answers the lightest, or
//! an empty answer (keep the broker's pick) when the broker's pick is as good or the plug-in does
//! not know the farm well enough yet. See `policy.rs`.
//!
//! **Its own view of the farm.** It never reads the broker's database: it keeps the machines
//! (state, drain, weight) and their sessions (active or disconnected) from the broker's
//! notifications, cleared on every `Initialize` and rebuilt from the full RESYNC that follows
//! (ADDED, RESYNC in batches, CHANGED for each machine). See `view.rs`.
//!
//! **External sessions (optional).** With `--external FILE`, users listed in the file are sent
//! to a dedicated host outside the farm when they have no session in it
//! (`GetUserExternalSession`); see `external.rs` for the format:
//!
//! ```toml
//! [external]
//! alice = "vdi-alice.example.com:3389"
//! ```
//!
//! ## Running it beside the broker
//!
//! ```sh
//! cargo run --release -p tsbroker-plugin-example -- --listen 127.0.0.1:50070 --external external.toml
//! ```
//!
//! and name it in the farm's section of the broker's config file (`tsbroker --config FILE`):
//!
//! ```toml
//! [farms.default.plugin]
//! address = "http://127.0.0.1:50070"
//! deadline = "100ms"    # optional: later answers keep the broker's pick
//! batch_size = 25       # optional: session changes per notification
//! ```
//!
//! Start order does not matter: the broker keeps trying to reach the plug-in, and initializes
//! and resyncs it whenever it (re)appears; a restarted plug-in refuses notifications until it
//! has been initialized again, which makes the broker start over. While it is down, or when it
//! is late, errs or answers a machine that is not a candidate, the broker's own pick stands.
//!
//! `README.md` beside this crate has the operator's guide, and how to write a plug-in in another
//! language (a Python one is in `python/`).
//!
//! Flags: `--listen ADDR` (default `127.0.0.1:50070`), `--external FILE`, `--log-format
//! plain|json`; verbosity from `RUST_LOG` (default `info`: one line per decision; `debug` shows
//! every notification). Health (`grpc.health.v1.Health`) and server reflection are served, so
//! `grpcurl -plaintext 127.0.0.1:50070 list` works. A bad flag or file exits with code 64.
#![forbid(unsafe_code)]

mod external;
mod policy;
mod service;
mod view;

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use tsbroker_common::proto::FILE_DESCRIPTOR_SET;
use tsbroker_common::proto::v1::plugin_server::PluginServer;
use tsbroker_common::serve::accepted_connections;
use tsbroker_common::telemetry::{LogFormat, init_logging};

/// Exit code for a bad flag or file (EX_USAGE), as the broker's.
const EXIT_BAD_CONFIG: u8 = 64;

/// An example tsbroker plug-in: sends new logons to the candidate with the fewest active
/// sessions per weight, and optionally listed users to dedicated hosts outside the farm.
#[derive(Debug, Parser)]
#[command(name = "tsbroker-plugin-example", version)]
struct Cli {
    /// Address to serve tsbroker.v1.Plugin on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:50070")]
    listen: SocketAddr,
    /// TOML file mapping users to dedicated hosts (`[external] alice = "host:3389"`).
    #[arg(long, value_name = "FILE")]
    external: Option<PathBuf>,
    /// Log lines as `plain` text or `json`.
    #[arg(long, value_name = "FORMAT", default_value = "plain")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) if !error.use_stderr() => {
            let _ = error.print();
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let external = match &cli.external {
        Some(path) => match external::ExternalHosts::load(path) {
            Ok(hosts) => hosts,
            Err(error) => {
                eprintln!("tsbroker-plugin-example: {error:#}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        },
        None => external::ExternalHosts::default(),
    };
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tsbroker-plugin-example: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(cli.listen, external)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "plug-in stopped");
            ExitCode::FAILURE
        }
    }
}

/// Serves the plug-in, health and reflection on `listen` until SIGINT or SIGTERM.
async fn serve(listen: SocketAddr, external: external::ExternalHosts) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    let local_address = listener
        .local_addr()
        .context("read the listening address")?;
    let external_users = external.len();

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<PluginServer<service::ExamplePlugin>>()
        .await;
    // Reflection v1, and v1alpha for older clients (grpcurl among them), listing only what is
    // served here (the descriptor set holds the broker's services too).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("tsbroker.v1.Plugin")
            .with_service_name("grpc.health.v1.Health")
    };
    let reflection_v1 = reflection().build_v1().context("build reflection v1")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("build reflection v1alpha")?;

    tracing::info!(%local_address, external_users, "plug-in listening; waiting for the broker's Initialize");
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(PluginServer::new(service::ExamplePlugin::new(external)))
        .serve_with_incoming_shutdown(accepted_connections(listener), stop_signal())
        .await
        .context("serve grpc")
}

async fn stop_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("signal received; stopping");
}
