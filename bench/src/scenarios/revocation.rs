//! revocation (beside issue 5's five): what checking open connections against a new revocation
//! list costs the broker. `--connections` TLS connections, each with a client certificate (one
//! HTTP/2 connection apiece, as agents make them), are held open; then the broker's list file
//! is replaced twice: re-issued revoking nothing (every connection checked again and kept),
//! then revoking the clients' certificate (every connection cut). Reported: the broker's memory
//! and descriptors with the connections open, its CPU per connection in the window after each
//! replacement against an idle window of the same length before, and how long after the
//! replacement the connections were cut (the broker looks at its files every 10 s).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tsbroker::tls::TlsFiles;

use super::seconds;
use crate::Context;
use crate::env::{Broker, Database, process_cpu_seconds, process_memory_kib};
use crate::report::Report;
use crate::tls::{Ca, CertifiedKey};

#[derive(Clone, Debug)]
pub struct Options {
    pub connections: usize,
    /// Each CPU window; longer than the broker's 10 s file check.
    pub window: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connections: 5_000,
            window: Duration::from_secs(12),
        }
    }
}

pub async fn run(context: &Context, options: &Options) -> anyhow::Result<Vec<Report>> {
    let Some(server) = context.tls.clone() else {
        bail!("revocation needs the tool's TLS set-up");
    };
    let dir = tempfile::Builder::new()
        .prefix("tsbroker-bench-revocation-")
        .tempdir()?;
    let ca = Ca::new(dir.path(), "clients")?;
    let client = ca.client("client", "bench-client")?;
    let list = dir.path().join("clients.crl");
    replace(&ca.revocation_list("list-0.crl")?, &list)?;
    let database = Database::create(context.store).await?;
    let mut broker_options = context.broker_options(&database.url);
    broker_options.tls = Some(TlsFiles {
        client_ca: Some(ca.cert()),
        client_crl: Some(list.clone()),
        ..server
    });
    let result = match Broker::start(context.mode, &broker_options, None).await {
        Ok(broker) => {
            let result = measure(context, options, &broker, &ca, &client, &list).await;
            broker.stop().await;
            result
        }
        Err(error) => Err(error),
    };
    database.drop_database().await;
    result
}

/// Replaces `to` with a copy of `from` in one rename, as an operator's update should.
fn replace(from: &Path, to: &Path) -> anyhow::Result<()> {
    let staged = to.with_extension("new");
    std::fs::copy(from, &staged)?;
    std::fs::rename(&staged, to)?;
    Ok(())
}

async fn measure(
    context: &Context,
    options: &Options,
    broker: &Broker,
    ca: &Ca,
    client: &CertifiedKey,
    list: &Path,
) -> anyhow::Result<Vec<Report>> {
    let pid = broker.pid().context("the broker's process id")?;
    let connector = connector(client)?;
    let (closed_tx, mut closed) = mpsc::unbounded_channel();
    let started = Instant::now();
    for _ in 0..options.connections {
        hold(&connector, broker, closed_tx.clone()).await?;
    }
    let open_s = started.elapsed();
    context.progress(&format!("{} connections open", options.connections));
    let (rss_kib, _) = process_memory_kib(pid).unwrap_or_default();
    let descriptors = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or_default();

    let cpu_over = |window: Duration| async move {
        let before = process_cpu_seconds(pid);
        tokio::time::sleep(window).await;
        Some(process_cpu_seconds(pid)? - before?)
    };
    let idle = cpu_over(options.window).await;
    replace(&ca.revocation_list("list-1.crl")?, list)?;
    let kept = cpu_over(options.window).await;
    if closed.try_recv().is_ok() {
        bail!("a connection was closed with nothing revoked");
    }

    ca.revoke(&client.cert)?;
    let revoked_list = ca.revocation_list("list-2.crl")?;
    let before = process_cpu_seconds(pid);
    let replaced = Instant::now();
    replace(&revoked_list, list)?;
    let mut first_cut = None;
    let mut last_cut = replaced;
    for count in 0..options.connections {
        let wait = tokio::time::timeout(options.window * 2, closed.recv());
        match wait.await {
            Ok(Some(at)) => {
                first_cut.get_or_insert(at);
                last_cut = at;
            }
            _ => bail!("{count} of {} connections were cut", options.connections),
        }
    }
    let cut_cpu = process_cpu_seconds(pid)
        .zip(before)
        .map(|(after, before)| after - before);
    let cut_window = replaced.elapsed();
    // The CPU a window took beyond what the same time took the idle broker, per connection.
    let idle_per_s = idle.unwrap_or(0.0) / options.window.as_secs_f64();
    let per_connection = |cpu: Option<f64>, window: Duration| {
        cpu.map_or(f64::NAN, |cpu| {
            (cpu - idle_per_s * window.as_secs_f64()).max(0.0) * 1e6 / options.connections as f64
        })
    };
    let mut report = Report::new("revocation");
    report
        .set("store", context.store.name())
        .set("connections", options.connections as u64)
        .num("open_s", seconds(open_s), 3)
        .num("broker_rss_mib", rss_kib as f64 / 1024.0, 1)
        .set("broker_fds", descriptors as u64)
        .num("idle_cpu_s", idle.unwrap_or(f64::NAN), 3)
        .num(
            "recheck_kept_cpu_us_per_conn",
            per_connection(kept, options.window),
            1,
        )
        .num(
            "recheck_cut_cpu_us_per_conn",
            per_connection(cut_cpu, cut_window),
            1,
        )
        .num(
            "cut_after_s",
            seconds(first_cut.unwrap_or(replaced) - replaced),
            3,
        )
        .num(
            "cut_spread_ms",
            (last_cut - first_cut.unwrap_or(replaced)).as_secs_f64() * 1e3,
            1,
        );
    Ok(vec![report])
}

/// A TLS client presenting `client`'s certificate, trusting the broker's CA, speaking HTTP/2.
fn connector(client: &CertifiedKey) -> anyhow::Result<TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = crate::tls::broker_ca_pem().context("the broker's CA")?;
    for certificate in rustls::pki_types::pem::PemObject::pem_slice_iter(ca) {
        roots.add(certificate?)?;
    }
    let (chain, key) = tsbroker_common::pem::read_key_pair(&client.cert, &client.key)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain.certificates, key.key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Opens one HTTP/2 connection over TLS and holds it (answering the broker's pings) until the
/// broker closes it, then sends the moment it closed.
async fn hold(
    connector: &TlsConnector,
    broker: &Broker,
    closed: mpsc::UnboundedSender<Instant>,
) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(broker.address).await?;
    tcp.set_nodelay(true)?;
    let tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await
        .context("TLS handshake")?;
    let (sender, connection) = h2::client::handshake(tls).await.context("HTTP/2")?;
    tokio::spawn(async move {
        let _sender = sender;
        let _ = connection.await;
        let _ = closed.send(Instant::now());
    });
    Ok(())
}
