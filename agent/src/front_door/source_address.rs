//! Where the front door's connections to other machines come from: the address this machine
//! advertises, when it is one of this host's. A front door trusts a PROXY header only from a
//! machine of the farm, known by the address the connection comes from; on a host with several
//! addresses (a second network card, an address added for the farm) the kernel may pick
//! another one as the source, and every connection between front doors would be refused.
//! A loopback address is used only towards loopback targets (Debian's /etc/hosts names the
//! host 127.0.1.1, which other machines cannot answer).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

/// How long the advertised name may take to resolve at start.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Targets whose kernel-chosen source is remembered (a farm's machines; more are forgotten).
const REMEMBERED_TARGETS: usize = 4096;

/// This machine's advertised address, and for each target whether the kernel would pick
/// another source for it. Binding costs: a connection bound before it connects takes its port
/// from a search of the whole range that TIME_WAIT sockets slow down (+500 us of CPU and a 50 ms
/// p99 per connection at 2,000 a second), so it is done only where the kernel's choice is
/// wrong, which one look at the routing table per target tells (a UDP socket's connect sends
/// nothing).
#[derive(Debug)]
pub struct SourceAddress {
    ip: IpAddr,
    kernel_picks_it: Mutex<HashMap<IpAddr, bool>>,
}

impl SourceAddress {
    pub fn new(ip: IpAddr) -> Self {
        SourceAddress {
            ip,
            kernel_picks_it: Mutex::new(HashMap::new()),
        }
    }

    /// The address to bind to for `target`, where the kernel would not pick it itself.
    fn to_bind_for(&self, target: SocketAddr) -> Option<IpAddr> {
        let suits = self.ip.is_ipv4() == target.is_ipv4()
            && self.ip.is_loopback() == target.ip().is_loopback();
        if !suits {
            return None;
        }
        let mut known = self
            .kernel_picks_it
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let picks_it = match known.get(&target.ip()) {
            Some(picks_it) => *picks_it,
            None => {
                let picks_it = kernel_source(target).is_some_and(|source| source == self.ip);
                if known.len() >= REMEMBERED_TARGETS {
                    known.clear();
                }
                known.insert(target.ip(), picks_it);
                picks_it
            }
        };
        (!picks_it).then_some(self.ip)
    }
}

/// The source address the kernel's routing picks for `target`.
fn kernel_source(target: SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let probe = UdpSocket::bind(any).ok()?;
    probe.connect(target).ok()?;
    Some(probe.local_addr().ok()?.ip().to_canonical())
}

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
/// and loopback only to loopback) and the kernel would pick another, trying each address the
/// name has in turn.
pub async fn connect_from(address: &str, source: Option<&SourceAddress>) -> io::Result<TcpStream> {
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

async fn connect_one(target: SocketAddr, source: &SourceAddress) -> io::Result<TcpStream> {
    let Some(ip) = source.to_bind_for(target) else {
        return TcpStream::connect(target).await;
    };
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Err(error) = socket.bind(SocketAddr::new(ip, 0)) {
        // The address went away since the start: the kernel's choice, as without one.
        tracing::debug!(%error, %ip, "connecting from the kernel's choice of address");
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
        let source = SourceAddress::new(advertised.unwrap());
        let outgoing = connect_from(&target, Some(&source)).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), "127.0.0.7".parse::<IpAddr>().unwrap());
        drop(outgoing);
        let _plain = connect_from(&target, None).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        // A non-loopback source is not used towards a loopback target.
        let elsewhere = SourceAddress::new("192.0.2.1".parse().unwrap());
        let _kernel = connect_from(&target, Some(&elsewhere)).await.unwrap();
        let (_, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        // Where the kernel picks the advertised address itself, the socket is not bound.
        let kernels = SourceAddress::new("127.0.0.1".parse().unwrap());
        let to = listener.local_addr().unwrap();
        assert_eq!(kernels.to_bind_for(to), None);
        assert_eq!(source.to_bind_for(to), Some("127.0.0.7".parse().unwrap()));
    }
}
