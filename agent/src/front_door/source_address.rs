//! Where the front door's connections to other machines come from: the address this machine
//! advertises, when it is one of this host's. A front door trusts a PROXY header only from a
//! machine of the farm, known by the address the connection comes from; on a host with several
//! addresses (a second network card, an address added for the farm) the kernel may pick
//! another one as the source, and every connection between front doors would be refused.
//! A loopback address is used only towards loopback targets (Debian's /etc/hosts names the
//! host 127.0.1.1, which other machines cannot answer).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// How long the advertised name may take to resolve at start.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// The advertised address ("host:port") if it is one of this host's (it can be bound).
pub async fn advertised_local_ip(advertise: &str) -> Option<IpAddr> {
    let found = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(advertise)).await;
    let addresses: Vec<SocketAddr> = match found {
        Ok(Ok(addresses)) => addresses.collect(),
        Ok(Err(error)) => {
            tracing::debug!(%error, advertise, "advertised address not resolved");
            return None;
        }
        Err(_) => return None,
    };
    addresses
        .into_iter()
        .map(|address| address.ip().to_canonical())
        .find(|ip| bindable(*ip))
}

fn bindable(ip: IpAddr) -> bool {
    let socket = match ip {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    };
    socket
        .and_then(|socket| socket.bind(SocketAddr::new(ip, 0)))
        .is_ok()
}

/// Connects to `address` ("host:port"), from `source` where it suits the target (same family,
/// and loopback only to loopback), trying each address the name has in turn.
pub async fn connect_from(address: &str, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(address).await;
    };
    let mut last_error = None;
    for target in tokio::net::lookup_host(address).await? {
        let target = SocketAddr::new(target.ip().to_canonical(), target.port());
        match connect_one(target, source).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{address} resolves to no address"),
        )
    }))
}

async fn connect_one(target: SocketAddr, source: IpAddr) -> io::Result<TcpStream> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if source.is_ipv4() == target.is_ipv4()
        && source.is_loopback() == target.ip().is_loopback()
        && let Err(error) = socket.bind(SocketAddr::new(source, 0))
    {
        // The address went away since the start: the kernel's choice, as without one.
        tracing::debug!(%error, %source, "connecting from the kernel's choice of address");
    }
    socket.connect(target).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_leave_from_the_advertised_address_when_it_is_this_hosts() {
        // All of 127/8 is this host's on Linux: 127.0.0.7 stands for a second address.
        let advertised = advertised_local_ip("127.0.0.7:3389").await;
        assert_eq!(advertised, Some("127.0.0.7".parse().unwrap()));
        assert_eq!(advertised_local_ip("192.0.2.1:3389").await, None);
        assert_eq!(advertised_local_ip("no-such-host.invalid:3389").await, None);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let outgoing = connect_from(&target, advertised).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), "127.0.0.7".parse::<IpAddr>().unwrap());
        drop(outgoing);
        let _plain = connect_from(&target, None).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        // A non-loopback source is not used towards a loopback target.
        let _kernel = connect_from(&target, Some("192.0.2.1".parse().unwrap()))
            .await
            .unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}
