//! Joins a client to where it goes: connects, replays the bytes already read (behind a PROXY
//! header when the target is another front door; without a used `tsv://` collection token when
//! it is an RDP service), waits for the target's first answer (the X.224 Connection Confirm:
//! a target that closes without one refused the connection, and the front door can still try
//! another), then copies both ways untouched. Connections handed to the local RDP service are
//! reported to the session table.
//!
//! The copy buffers are allocated without being zeroed and only the pages a read fills are ever
//! touched: most connections that end right after the handshake (refused logons, probes, load
//! balancers' checks) cost a few pages, not two zero-filled buffers as with
//! `tokio::io::copy_bidirectional`, whose zeroing and page faults were a tenth of the front
//! door's CPU time per connection.

use std::borrow::Cow;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::FrontDoorShared;
use super::route::ConnectingUser;
use super::x224;
use super::{proxy_header, source_address};
use crate::directory::{Attachment, UnknownConnection};
use crate::metrics::ByteCounters;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a target has to answer the replayed request. RDP servers confirm at once; one
/// that takes the connection and says nothing (hung, overloaded) counts as refusing it, so a
/// new logon goes to the next candidate instead of waiting on it.
const FIRST_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Each direction's copy buffer (tokio's default is 8 KiB; bulk transfers want more). 32 KiB
/// measured best on a 2-vCPU Xeon: 64 KiB carried 0.72–0.92 of HAProxy's bulk rate where
/// 32 KiB carried 0.87–1.17 (BENCHMARKS.md, seventeenth run), and it halves what an idle
/// connection's buffers keep after a burst.
const COPY_BUFFER: usize = 32 * 1024;
/// Room for the target's first answer (an X.224 Connection Confirm is 19 bytes).
const ANSWER_BUFFER: usize = 4096;
/// Once one side has closed its sending half, how long the other has to close too. RDP does
/// not go on in one direction after the other ended: a peer that keeps its half open (gone
/// quiet, or holding a slot on purpose) is cut after this (HAProxy's `timeout client-fin`).
const HALF_CLOSED_LINGER: Duration = Duration::from_secs(30);
/// TCP keepalive on both sockets of a connection: an idle peer that vanished without a FIN
/// (a laptop's lid shut, a network gone) is found within about two minutes instead of never,
/// since a disconnected RDP session can stay idle for hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;
/// Data unacknowledged this long ends the connection (Linux's `TCP_USER_TIMEOUT`; without it
/// a peer that vanished mid-transfer is retried for about 15 minutes).
const UNACKNOWLEDGED_LIMIT: Duration = Duration::from_secs(120);

/// A target that took the replayed request.
pub struct Upstream {
    stream: TcpStream,
    /// What the target answered first, still to be sent to the client.
    answer: Vec<u8>,
    /// The client's bytes already sent on (its first packet), for the byte counters.
    request_len: u64,
}

/// Opens a TCP connection to "host:port" within a few seconds, from `source` where it suits
/// (`source_address::connect_from`).
pub async fn connect(
    address: &str,
    source: Option<&source_address::SourceAddress>,
) -> anyhow::Result<TcpStream> {
    let connecting = source_address::connect_from(address, source);
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| anyhow::anyhow!("connect to {address}: timed out"))?
        .with_context(|| format!("connect to {address}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Connects to `address`, replays `prefix` (the client's first packet, `request_len` bytes as
/// the client sent them, as the target should see it) and waits for the target's first
/// answer. An error means the target refused the connection: refused or timed out the TCP
/// connection, closed it without answering, or did not answer in time.
async fn open(
    address: &str,
    source: Option<&source_address::SourceAddress>,
    prefix: &[u8],
    request_len: usize,
) -> anyhow::Result<Upstream> {
    let mut stream = connect(address, source).await?;
    stream
        .write_all(prefix)
        .await
        .with_context(|| format!("replay the first packet to {address}"))?;
    let mut answer = Vec::with_capacity(ANSWER_BUFFER);
    match tokio::time::timeout(FIRST_ANSWER_TIMEOUT, stream.read_buf(&mut answer)).await {
        Ok(Ok(0)) => return Err(ClosedOnTheRequest(address.to_owned()).into()),
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            let address = address.to_owned();
            return Err(ResetOnTheRequest { address, error }.into());
        }
        Err(_) => anyhow::bail!(
            "{address} did not answer the connection request within {} s",
            FIRST_ANSWER_TIMEOUT.as_secs()
        ),
    }
    Ok(Upstream {
        stream,
        answer,
        request_len: request_len as u64,
    })
}

/// Opens this machine's RDP service with the request it should see.
pub async fn open_local(shared: &FrontDoorShared, packet: &[u8]) -> anyhow::Result<Upstream> {
    open(
        &shared.settings.local_rdp,
        None,
        &for_rdp_service(packet),
        packet.len(),
    )
    .await
}

/// Opens another machine, from this machine's advertised address where it is this host's:
/// its front door gets a PROXY v2 header with the client's address (signed with the agent
/// token's key, when there is one) and the request as the client sent it; an external target
/// (an RDP service, not a front door) gets the request as an RDP service should.
pub async fn open_remote(
    shared: &FrontDoorShared,
    address: &str,
    client: &TcpStream,
    client_address: SocketAddr,
    packet: &[u8],
    external: bool,
) -> anyhow::Result<Upstream> {
    let header_key = shared.header_key.as_ref();
    let mut prefix = Vec::with_capacity(packet.len() + 64);
    if external {
        prefix.extend_from_slice(&for_rdp_service(packet));
    } else {
        let local = client.local_addr().unwrap_or(client_address);
        prefix.extend_from_slice(&proxy_header::encode(
            client_address,
            local,
            header_key,
            proxy_header::now_secs(),
        ));
        prefix.extend_from_slice(packet);
    }
    let source = shared.settings.source.as_deref();
    let upstream = open(address, source, &prefix, packet.len()).await?;
    // Across the network the other machine can vanish too (the local service cannot).
    keep_alive(&upstream.stream);
    Ok(upstream)
}

/// A target that took the TCP connection and the replayed request, then closed without
/// answering: its RDP service is down behind a front door, or it refused that request.
#[derive(Debug, thiserror::Error)]
#[error("{0} closed the connection without answering")]
struct ClosedOnTheRequest(String);

/// A target that reset the connection after the replayed request, without answering.
#[derive(Debug, thiserror::Error)]
#[error("{address} reset the connection")]
struct ResetOnTheRequest {
    address: String,
    #[source]
    error: io::Error,
}

/// Whether the target took the TCP connection and ended it on the request without answering
/// (closed or reset), rather than refusing or timing out the connection or not answering in
/// time: the one refusal that may be the request's, not the machine's.
pub fn ended_on_the_request(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|cause| cause.is::<ClosedOnTheRequest>() || cause.is::<ResetOnTheRequest>())
}

/// Whether `error` is this agent's own shortage — no file descriptor (`EMFILE`, `ENFILE`),
/// no buffer space or memory — rather than the target's refusal: a target must not be left
/// out of a placement for it.
pub fn is_local_shortage(error: &anyhow::Error) -> bool {
    // Linux's numbers: ENOMEM, ENFILE, EMFILE, ENOBUFS.
    const SHORTAGES: [i32; 4] = [12, 23, 24, 105];
    error.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
            .is_some_and(|code| SHORTAGES.contains(&code))
    })
}

/// Sets a socket to find a peer that went away silently (`KEEPALIVE_*`,
/// `UNACKNOWLEDGED_LIMIT`). On a listening socket, the connections it accepts inherit the
/// settings (Linux), at no cost per connection. Best effort: a socket that refuses keeps
/// working.
pub fn keep_alive(socket: &impl std::os::fd::AsFd) {
    let socket = socket2::SockRef::from(socket);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(error) = socket
        .set_tcp_keepalive(&keepalive)
        .and_then(|()| socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_LIMIT)))
    {
        tracing::debug!(%error, "TCP keepalive not set");
    }
}

/// What a connection carried each way, the first packet and the target's first answer
/// included, and what ended it when that was an error.
pub struct Carried {
    pub from_client: u64,
    pub to_client: u64,
    pub error: Option<anyhow::Error>,
}

/// Sends the target's first answer to the client, then copies both ways until both sides
/// have closed (the second given `HALF_CLOSED_LINGER` after the first) or the agent stops,
/// adding what it copies to `bytes` as it goes.
pub async fn splice(
    client: &mut TcpStream,
    mut upstream: Upstream,
    bytes: &ByteCounters,
    shutdown: &CancellationToken,
) -> Carried {
    let (mut up, mut down) = (upstream.request_len, 0);
    bytes.from_client.inc_by(upstream.request_len);
    if let Err(error) = client.write_all(&upstream.answer).await {
        return Carried {
            from_client: up,
            to_client: down,
            error: Some(anyhow::Error::new(error).context("send the target's answer")),
        };
    }
    down += upstream.answer.len() as u64;
    bytes.to_client.inc_by(upstream.answer.len() as u64);
    let (from_client, to_client) = client.split();
    let (from_upstream, to_upstream) = upstream.stream.split();
    let copied = tokio::select! {
        copied = both_ways(
            one_way(from_client, to_upstream, &bytes.from_client, &mut up),
            one_way(from_upstream, to_client, &bytes.to_client, &mut down),
            HALF_CLOSED_LINGER,
        ) => copied.context("copy"),
        () = shutdown.cancelled() => Ok(()),
    };
    Carried {
        from_client: up,
        to_client: down,
        error: copied.err(),
    }
}

/// Runs both directions of a connection until both have ended; once one has, the other is
/// given `linger` to end too and is cut after it (not an error: the connection is over).
async fn both_ways(
    first: impl Future<Output = io::Result<()>>,
    second: impl Future<Output = io::Result<()>>,
    linger: Duration,
) -> io::Result<()> {
    tokio::pin!(first, second);
    let first_ended = tokio::select! {
        ended = &mut first => { ended?; true }
        ended = &mut second => { ended?; false }
    };
    let rest = if first_ended {
        tokio::time::timeout(linger, &mut second).await
    } else {
        tokio::time::timeout(linger, &mut first).await
    };
    match rest {
        Ok(ended) => ended,
        Err(_) => {
            tracing::debug!(
                linger_s = linger.as_secs(),
                "one side closed and the other kept its half open: cut"
            );
            Ok(())
        }
    }
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s sending side (what
/// `copy_bidirectional` does in each direction, with a buffer that is not zero-filled),
/// adding what it copies to `copied` as it goes.
async fn one_way<R, W>(
    mut from: R,
    mut to: W,
    counter: &Counter,
    copied: &mut u64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = Vec::with_capacity(COPY_BUFFER);
    loop {
        buffer.clear();
        if from.read_buf(&mut buffer).await? == 0 {
            break;
        }
        to.write_all(&buffer).await?;
        *copied += buffer.len() as u64;
        counter.inc_by(buffer.len() as u64);
    }
    to.shutdown().await
}

/// The first packet as an RDP service gets it: the client's exact bytes, except that a
/// `tsv://` collection token, which the front door has used, is taken out (RDP servers built on
/// FreeRDP refuse a request that carries one).
fn for_rdp_service(packet: &[u8]) -> Cow<'_, [u8]> {
    match x224::without_collection_token(packet) {
        Some(stripped) => {
            tracing::debug!(
                removed_bytes = packet.len() - stripped.len(),
                "collection token taken out of the connection request"
            );
            Cow::Owned(stripped)
        }
        None => Cow::Borrowed(packet),
    }
}

/// Hands the connection to this machine's RDP service (`upstream`, from [`open_local`]),
/// reporting it to the session table.
pub async fn to_local(
    shared: &FrontDoorShared,
    client: &mut TcpStream,
    upstream: Upstream,
    client_address: SocketAddr,
    user: Option<ConnectingUser>,
    shutdown: &CancellationToken,
) {
    // The table's lock is held briefly; the disk is written behind the connection's back.
    let attachment = user.and_then(|user| {
        shared.directory.front_door_attach_as(
            &user.user_name,
            &user.domain,
            &client_address.to_string(),
            user.cookie_name.as_deref(),
        )
    });
    let held = match attachment {
        Some(attachment) => {
            tracing::debug!(
                session_id = attachment.session_id,
                "connection handed to the local rdp service"
            );
            Held::Session(attachment)
        }
        None => {
            tracing::debug!("connection handed to the local rdp service (user unknown)");
            Held::Unknown(
                shared
                    .directory
                    .front_door_attach_unknown(Some(client_address)),
            )
        }
    };
    let started = tokio::time::Instant::now();
    let carried = splice(client, upstream, shared.metrics.byte_counters(), shutdown);
    let carried = match &held {
        // A connection that lasts the grace confirms its logon when it has, not only at its
        // end: an agent that crashes meanwhile sees no end. (No timer for a session confirmed
        // already, or where only a local source confirms one.)
        Held::Session(attachment) if attachment.may_confirm => {
            tokio::pin!(carried);
            let grace = shared.directory.unconfirmed_logon_grace();
            tokio::select! {
                carried = &mut carried => carried,
                () = tokio::time::sleep(grace) => {
                    shared.directory.front_door_outlasted_grace(attachment);
                    carried.await
                }
            }
        }
        Held::Session(_) | Held::Unknown(_) => carried.await,
    };
    log_end(carried, started);
    // How long the connection lasted tells a logon that failed from one that happened; a
    // connection the agent cut because it is stopping tells only whether it had lasted the
    // grace.
    let cut = shutdown.is_cancelled();
    let lasted = (!cut).then(|| started.elapsed());
    match held {
        Held::Session(attachment) if cut => shared
            .directory
            .front_door_cut(attachment, started.elapsed()),
        Held::Session(attachment) => shared.directory.front_door_detach(attachment, lasted),
        Held::Unknown(connection) => shared
            .directory
            .front_door_detach_unknown(connection, lasted),
    }
}

/// What a local connection is in the session table.
enum Held {
    /// A session, from the user the client named.
    Session(Attachment),
    /// Nothing yet: the user is unknown until a local source's report matches it.
    Unknown(UnknownConnection),
}

/// Sends the connection on to another machine (`upstream`, from [`open_remote`]).
pub async fn to_remote(
    shared: &FrontDoorShared,
    client: &mut TcpStream,
    upstream: Upstream,
    shutdown: &CancellationToken,
) {
    let started = tokio::time::Instant::now();
    let carried = splice(client, upstream, shared.metrics.byte_counters(), shutdown).await;
    log_end(carried, started);
}

/// One line per connection at its end: how long it lasted and what it carried each way.
fn log_end(carried: Carried, started: tokio::time::Instant) {
    let lasted_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let Carried {
        from_client,
        to_client,
        error,
    } = carried;
    match error {
        None => tracing::info!(lasted_ms, from_client, to_client, "connection ended"),
        Some(error) => tracing::info!(
            lasted_ms,
            from_client,
            to_client,
            error = format!("{error:#}"),
            "connection ended"
        ),
    }
}

#[cfg(test)]
#[path = "splice_tests.rs"]
mod tests;
