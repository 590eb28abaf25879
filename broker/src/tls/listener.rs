//! Serves TLS on the broker's listener with the files as they are now: handshakes run side by
//! side within a time limit (a slow or silent client holds up no one), a client then has as long
//! to begin HTTP/2 as a plaintext one (else it is closed), and the files are looked
//! at every [`FILES_CHECK_INTERVAL`] (and the certificate's standing against the clock said
//! when it changes, `cert_validity`). Renewed files that load are used from the next handshake
//! on; connections already open keep theirs, except that one whose client certificate the new
//! files refuse (revoked, or of a CA no longer trusted) is cut (`live.rs`). Files that do not
//! load yet (a renewal half written, a key that does not match) are logged and the previous
//! ones kept.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tsbroker_common::cert_validity::Reminder;
use tsbroker_common::renewal::{Renewable, check_every};
use tsbroker_common::serve::{
    AcceptPause, GREETING_TIMEOUT, HTTP2_PREFACE, closed_silent, greeting_complete,
};

use super::live::{LiveConnections, Tracked};
use super::{ServerTls, TlsFiles};

/// How often the files are looked at (their size and modification time).
pub const FILES_CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections through their handshake, waiting for the gRPC server to take them.
const READY_QUEUE: usize = 64;

pub struct TlsListener {
    files: TlsFiles,
    tls: Renewable<ServerTls>,
    live: Arc<LiveConnections>,
    /// Says the broker's own certificate's expiry as it nears, and when it comes.
    own_certificate: Reminder,
}

impl TlsListener {
    /// Reads the files now: a bad one is an error at start.
    pub fn open(files: &TlsFiles) -> anyhow::Result<Arc<TlsListener>> {
        let tls = Renewable::new(files.paths(), || ServerTls::load(files))?;
        let own_certificate = Reminder::new("--tls-cert");
        tls.with(|tls| tls.remind_with(&own_certificate));
        Ok(Arc::new(TlsListener {
            files: files.clone(),
            tls,
            live: Arc::default(),
            own_certificate,
        }))
    }

    /// Whether calls must come with a client certificate the client CA signed.
    pub fn client_certificates_required(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// Whether client certificates are checked against revocation lists.
    pub fn revocation_checked(&self) -> bool {
        self.files.client_crl.is_some()
    }

    /// Loads the files again when one changed since it was last read. Whether it did.
    pub fn reload_if_changed(&self) -> bool {
        let renewed = self.tls.renew_if_changed(|| ServerTls::load(&self.files));
        if renewed {
            self.tls.with(|tls| tls.remind_with(&self.own_certificate));
        }
        renewed
    }

    /// The connections `listener` accepts, through their TLS handshake (with `TCP_NODELAY`,
    /// as `tsbroker_common::serve::accepted_connections`), until `stop`; the files are watched
    /// meanwhile.
    pub fn connections(
        self: Arc<Self>,
        listener: TcpListener,
        stop: CancellationToken,
    ) -> ReceiverStream<io::Result<Tracked>> {
        let (ready, connections) = mpsc::channel(READY_QUEUE);
        tokio::spawn(self.clone().accept(listener, ready, stop.clone()));
        tokio::spawn(self.watch(stop));
        ReceiverStream::new(connections)
    }

    async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        ready: mpsc::Sender<io::Result<Tracked>>,
        stop: CancellationToken,
    ) {
        let mut pause = AcceptPause::new("gRPC over TLS");
        loop {
            let (tcp, peer) = tokio::select! {
                () = stop.cancelled() => return,
                () = ready.closed() => return,
                accepted = pause.next_connection(&listener) => accepted,
            };
            let acceptor = TlsAcceptor::from(self.tls.with(|tls| tls.config.clone()));
            let (ready, live) = (ready.clone(), self.live.clone());
            tokio::spawn(async move {
                let Some(mut stream) = handshake(&acceptor, tcp, peer).await else {
                    return;
                };
                if let Some(greeting) = greeting(&mut stream, peer).await {
                    let _ = ready.send(Ok(live.track(stream, peer, greeting))).await;
                }
            });
        }
    }

    async fn watch(self: Arc<Self>, stop: CancellationToken) {
        check_every(FILES_CHECK_INTERVAL, stop.cancelled(), || {
            self.own_certificate.look_again(SystemTime::now());
            if self.reload_if_changed() {
                let listener = self.clone();
                // A signature check or more per open connection: off the runtime's threads.
                tokio::task::spawn_blocking(move || listener.recheck_open_connections());
            }
        })
        .await;
    }

    /// Checks the open connections' client certificates with the files as they are now, and
    /// cuts those refused. How many it cut.
    fn recheck_open_connections(&self) -> usize {
        match self.tls.with(|tls| tls.client_verifier.clone()) {
            Some(verifier) => self.live.recheck(verifier.as_ref()),
            None => 0,
        }
    }
}

/// The client's TLS handshake, within [`HANDSHAKE_TIMEOUT`]; `None` (and logged) when it fails.
async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(error)) if refused_certificate(&error) => {
            // Refused agents keep asking (every 30 s each; a farm's certificates may all
            // expire the same day): said at info once a minute, with how many since.
            static REFUSED: std::sync::LazyLock<tsbroker_common::warning_limit::WarningLimit> =
                std::sync::LazyLock::new(Default::default);
            match REFUSED.warn_now() {
                Some(unsaid) => tracing::info!(
                    %peer, %error, since_last_said = unsaid,
                    "a client certificate was refused (said at most once a minute)"
                ),
                None => tracing::debug!(%peer, %error, "a client certificate was refused"),
            }
        }
        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
    None
}

/// [`read_greeting`] within [`GREETING_TIMEOUT`]; `None` (and logged) when the client closed
/// first or stayed silent.
async fn greeting(stream: &mut TlsStream<TcpStream>, peer: SocketAddr) -> Option<Vec<u8>> {
    match tokio::time::timeout(GREETING_TIMEOUT, read_greeting(stream)).await {
        Ok(Ok(Some(greeting))) => return Some(greeting),
        Ok(Ok(None) | Err(_)) => {
            tracing::debug!(%peer, "a TLS connection closed before it sent anything");
        }
        Err(_) => closed_silent(peer, GREETING_TIMEOUT),
    }
    None
}

/// The first bytes the client sent through its TLS connection, read until they are enough to
/// hand it to the gRPC server (as `tsbroker_common::serve` waits for a plaintext client's);
/// `None` when the client closed first. The server reads them again from [`Tracked`]: without
/// this, a client silent after its handshake would hold its connection for good (the server's
/// keepalive starts only after the HTTP/2 preface).
async fn read_greeting(stream: &mut TlsStream<TcpStream>) -> io::Result<Option<Vec<u8>>> {
    let mut greeting = Vec::with_capacity(HTTP2_PREFACE.len());
    let mut chunk = [0u8; HTTP2_PREFACE.len()];
    while !greeting_complete(&greeting) {
        let read = stream
            .read(&mut chunk[..HTTP2_PREFACE.len() - greeting.len()])
            .await?;
        if read == 0 {
            return Ok(None);
        }
        greeting.extend_from_slice(&chunk[..read]);
    }
    Ok(Some(greeting))
}

/// Whether a handshake failed on the client's certificate (not signed by the client CA,
/// revoked, expired) or on a revocation list that cannot be used: worth an operator's
/// attention, unlike scanners and dropped connections.
fn refused_certificate(error: &io::Error) -> bool {
    matches!(
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::InvalidCertRevocationList(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = include_str!("../../../common/testdata/ts1-example-com.pem");
    const KEY: &str = include_str!("../../../common/testdata/ts1-example-com.key");

    #[test]
    fn renewed_files_are_taken_up_and_broken_ones_are_not() {
        let dir = std::env::temp_dir().join(format!("tsbroker-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles {
            cert: dir.join("broker.pem"),
            key: dir.join("broker.key"),
            client_ca: None,
            client_crl: None,
        };
        std::fs::write(&files.cert, CERT).unwrap();
        std::fs::write(&files.key, KEY).unwrap();
        let listener = TlsListener::open(&files).unwrap();
        assert!(!listener.reload_if_changed(), "nothing changed");
        // A renewal half written: the previous settings stay.
        std::fs::write(&files.key, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        assert!(!listener.reload_if_changed());
        assert!(!listener.client_certificates_required());
        // Written in full: taken up once.
        std::fs::write(&files.key, format!("{KEY}\n")).unwrap();
        assert!(listener.reload_if_changed());
        assert!(!listener.reload_if_changed());
        // A file gone is a change that does not load.
        std::fs::remove_file(&files.cert).unwrap();
        assert!(!listener.reload_if_changed());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
