//! The open connections that presented a client certificate, held to the TLS files as they are
//! now: when changed files load (a new revocation list, another client CA), each is checked
//! again with the new verifier, and one whose certificate it refuses for certain is shut down.
//! Revoking a machine's certificate so cuts it off within the files' check interval, instead of
//! at its next reconnection (an agent's stream lasts for days).
//!
//! A tracked connection keeps a duplicate of its socket's descriptor to shut it down from
//! outside (the gRPC server owns the stream); the duplicate is dropped with the connection.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// The connections with a client certificate that are open now.
#[derive(Default)]
pub struct LiveConnections {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Live>>,
}

struct Live {
    peer: SocketAddr,
    /// The client's certificate, then the intermediates it sent.
    chain: Vec<CertificateDer<'static>>,
    /// The same socket as the connection's, to shut it down.
    socket: std::net::TcpStream,
}

impl LiveConnections {
    /// `stream`, tracked while it is open when its client presented a certificate.
    /// `greeting` is what the listener already read from it, given to the server first.
    pub fn track(
        self: &Arc<Self>,
        stream: TlsStream<TcpStream>,
        peer: SocketAddr,
        greeting: Vec<u8>,
    ) -> Tracked {
        let chain = stream.get_ref().1.peer_certificates().map(<[_]>::to_vec);
        let socket = stream.get_ref().0.as_fd().try_clone_to_owned();
        let entry = match (chain, socket) {
            (Some(chain), Ok(socket)) if !chain.is_empty() => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let live = Live {
                    peer,
                    chain,
                    socket: socket.into(),
                };
                self.lock().insert(id, live);
                Some(Entry {
                    id,
                    connections: self.clone(),
                })
            }
            (Some(chain), Err(error)) if !chain.is_empty() => {
                // Out of descriptors: the connection works, but a revocation reaches it only
                // when it reconnects.
                tracing::warn!(%peer, %error, "cannot track a client's connection for revocation");
                None
            }
            _ => None,
        };
        Tracked {
            stream,
            greeting,
            greeting_given: 0,
            _entry: entry,
        }
    }

    /// Checks every tracked connection's certificate with `verifier` and shuts down those it
    /// refuses for certain (revoked, expired, not of a trusted CA); how many it shut down. A
    /// certificate the lists cannot settle (a list with a bad signature, an issuer without a
    /// list) keeps its connection, with a warning: a broken list file must not cut the farm
    /// off. The checks (a signature or more each) run outside the lock, so connections come
    /// and go meanwhile: call it off the runtime's threads.
    pub fn recheck(&self, verifier: &dyn ClientCertVerifier) -> usize {
        let now = UnixTime::now();
        let snapshot: Vec<(u64, Vec<CertificateDer<'static>>)> = self
            .lock()
            .iter()
            .map(|(id, live)| (*id, live.chain.clone()))
            .collect();
        let mut refused = Vec::new();
        let mut unsettled = (0, None);
        for (id, chain) in snapshot {
            let Some((end_entity, intermediates)) = chain.split_first() else {
                continue;
            };
            match verifier.verify_client_cert(end_entity, intermediates, now) {
                Ok(_) => {}
                Err(error) if refused_for_certain(&error) => refused.push((id, error)),
                Err(error) => {
                    unsettled.0 += 1;
                    unsettled.1.get_or_insert(error);
                }
            }
        }
        if let (count, Some(error)) = unsettled {
            tracing::warn!(
                connections = count,
                %error,
                "open connections kept: the TLS files cannot settle their client certificates"
            );
        }
        let mut open = self.lock();
        let mut cut = 0;
        for (id, error) in refused {
            // Gone meanwhile: nothing to cut.
            if let Some(live) = open.remove(&id) {
                tracing::info!(
                    peer = %live.peer,
                    %error,
                    "connection cut: its client certificate is refused now"
                );
                let _ = live.socket.shutdown(Shutdown::Both);
                cut += 1;
            }
        }
        cut
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        // A panic while holding it cannot leave the map half changed.
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Whether `error` says the certificate itself is not acceptable, rather than that the
/// revocation lists could not be used.
fn refused_for_certain(error: &rustls::Error) -> bool {
    matches!(
        error,
        rustls::Error::InvalidCertificate(reason)
            if *reason != rustls::CertificateError::UnknownRevocationStatus
    )
}

/// Removes its connection from the tracked ones when the connection is dropped.
struct Entry {
    id: u64,
    connections: Arc<LiveConnections>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.connections.lock().remove(&self.id);
    }
}

/// A TLS connection as the gRPC server gets it, tracked while open.
pub struct Tracked {
    stream: TlsStream<TcpStream>,
    /// The client's first bytes, read by the listener before the server took the connection.
    greeting: Vec<u8>,
    /// How many of them the server has read.
    greeting_given: usize,
    _entry: Option<Entry>,
}

impl Connected for Tracked {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let unread = &self.greeting[self.greeting_given..];
        if unread.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let given = unread.len().min(buf.remaining());
        buf.put_slice(&unread[..given]);
        self.greeting_given += given;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
