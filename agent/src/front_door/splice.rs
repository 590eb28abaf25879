//! Joins a client to where it goes: connects, replays the bytes already read (behind a PROXY
//! header when the target is another front door; without a used `tsv://` collection token when
//! it is an RDP service), then copies both ways untouched. Connections handed to the local RDP
//! service are reported to the session table.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::FrontDoorShared;
use super::proxy_header;
use super::route::ConnectingUser;
use super::x224;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a TCP connection to "host:port" within a few seconds.
pub async fn connect(address: &str) -> anyhow::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| anyhow::anyhow!("connect to {address}: timed out"))?
        .with_context(|| format!("connect to {address}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Writes `prefix` to `upstream`, then copies both ways until either side closes or the
/// agent stops. Returns the bytes copied (client to upstream, upstream to client).
pub async fn splice(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    prefix: &[u8],
    shutdown: &CancellationToken,
) -> anyhow::Result<(u64, u64)> {
    upstream
        .write_all(prefix)
        .await
        .context("replay first packet")?;
    tokio::select! {
        copied = tokio::io::copy_bidirectional(client, upstream) => copied.context("copy"),
        () = shutdown.cancelled() => Ok((0, 0)),
    }
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

/// Hands the connection to this machine's RDP service, reporting it to the session table.
pub async fn to_local(
    shared: &FrontDoorShared,
    client: &mut TcpStream,
    client_address: SocketAddr,
    packet: &[u8],
    user: Option<ConnectingUser>,
    shutdown: &CancellationToken,
) {
    let mut upstream = match connect(&shared.settings.local_rdp).await {
        Ok(upstream) => upstream,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "local rdp service unreachable, closing"
            );
            return;
        }
    };
    // The table is saved to disk (fsync) on every change: off the async threads.
    let attachment = match user {
        Some(user) => {
            let directory = shared.directory.clone();
            let client_address = client_address.to_string();
            tokio::task::spawn_blocking(move || {
                directory.front_door_attach(&user.user_name, &user.domain, &client_address)
            })
            .await
            .ok()
            .flatten()
        }
        None => None,
    };
    if let Some(attachment) = attachment {
        tracing::info!(
            session_id = attachment.session_id,
            "connection handed to the local rdp service"
        );
    } else {
        tracing::info!("connection handed to the local rdp service (user unknown)");
    }
    let packet = for_rdp_service(packet);
    let started = tokio::time::Instant::now();
    match splice(client, &mut upstream, &packet, shutdown).await {
        Ok((sent, received)) => tracing::debug!(sent, received, "connection ended"),
        Err(error) => tracing::debug!(error = format!("{error:#}"), "connection ended"),
    }
    if let Some(attachment) = attachment {
        // How long the connection lasted tells a logon that failed from one that happened;
        // a connection the agent cut because it is stopping tells nothing.
        let lasted = (!shutdown.is_cancelled()).then(|| started.elapsed());
        let directory = shared.directory.clone();
        let _ =
            tokio::task::spawn_blocking(move || directory.front_door_detach(attachment, lasted))
                .await;
    }
}

/// Sends the connection on to another machine's front door (with the client's address in a
/// PROXY v2 header) or, for an external target, as it is.
pub async fn to_remote(
    client: &mut TcpStream,
    mut upstream: TcpStream,
    client_address: SocketAddr,
    packet: &[u8],
    external: bool,
    shutdown: &CancellationToken,
) {
    let mut prefix = Vec::with_capacity(packet.len() + 64);
    if external {
        // An RDP service, not a front door.
        prefix.extend_from_slice(&for_rdp_service(packet));
    } else {
        // Another front door reads the request as the client sent it.
        let local = client.local_addr().unwrap_or(client_address);
        prefix.extend_from_slice(&proxy_header::encode(client_address, local));
        prefix.extend_from_slice(packet);
    }
    match splice(client, &mut upstream, &prefix, shutdown).await {
        Ok((sent, received)) => tracing::debug!(sent, received, "connection ended"),
        Err(error) => tracing::debug!(error = format!("{error:#}"), "connection ended"),
    }
}
