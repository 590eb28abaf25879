//! PROXY protocol v2 headers (the `ppp` crate does the encoding and decoding): a front door
//! that sends a client on to another machine's front door prefixes the connection with one
//! carrying the client's address; the receiving front door reads it, and trusts it only from
//! machines of its farm.

use std::net::{IpAddr, SocketAddr};

use ppp::v2;

/// Bytes of the fixed part: 12-byte signature, version/command, family/protocol, length.
pub const FIXED_LEN: usize = 16;
/// Longest address-and-TLV part accepted (addresses take at most 216 bytes).
pub const MAX_PAYLOAD_LEN: usize = 1024;
/// The first byte of the signature; a TPKT packet starts with 3 instead.
pub const SIGNATURE_FIRST_BYTE: u8 = b'\r';

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    #[error("not a proxy protocol v2 signature")]
    BadSignature,
    #[error("proxy header of {0} bytes is too long")]
    TooLong(usize),
    #[error("malformed proxy header: {0}")]
    Malformed(String),
}

fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// A header saying that `source` (the client) connected to `destination` (this front door).
pub fn encode(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let source = canonical(source);
    let mut destination = canonical(destination);
    if source.is_ipv4() != destination.is_ipv4() {
        // Both addresses must be of one family; the destination is only informative.
        destination = match source {
            SocketAddr::V4(_) => SocketAddr::new(IpAddr::from([0u8; 4]), 0),
            SocketAddr::V6(_) => SocketAddr::new(IpAddr::from([0u16; 8]), 0),
        };
    }
    let builder = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (source, destination),
    );
    // Writing to a Vec cannot fail.
    builder.build().unwrap_or_default()
}

/// Length of the part after the fixed 16 bytes, once those are read and checked.
pub fn payload_len(fixed: &[u8]) -> Result<usize, ProxyHeaderError> {
    if fixed.len() < FIXED_LEN || &fixed[..v2::PROTOCOL_PREFIX.len()] != v2::PROTOCOL_PREFIX {
        return Err(ProxyHeaderError::BadSignature);
    }
    let length = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if length > MAX_PAYLOAD_LEN {
        return Err(ProxyHeaderError::TooLong(length));
    }
    Ok(length)
}

/// The client address a complete header carries; `None` for a LOCAL command or an address
/// family other than IPv4 or IPv6.
pub fn source_address(header: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let parsed = v2::Header::try_from(header)
        .map_err(|error| ProxyHeaderError::Malformed(error.to_string()))?;
    if parsed.command != v2::Command::Proxy {
        return Ok(None);
    }
    Ok(match parsed.addresses {
        v2::Addresses::IPv4(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        v2::Addresses::IPv6(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let source: SocketAddr = "198.51.100.7:50123".parse().unwrap();
        let destination: SocketAddr = "10.1.2.3:3389".parse().unwrap();
        let header = encode(source, destination);
        assert_eq!(header[0], SIGNATURE_FIRST_BYTE);
        let length = payload_len(&header[..FIXED_LEN]).unwrap();
        assert_eq!(header.len(), FIXED_LEN + length);
        assert_eq!(source_address(&header).unwrap(), Some(source));
    }

    #[test]
    fn mixed_families_keep_the_source() {
        let source: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let destination: SocketAddr = "10.1.2.3:3389".parse().unwrap();
        assert_eq!(
            source_address(&encode(source, destination)).unwrap(),
            Some(source)
        );
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:4000".parse().unwrap();
        let header = encode(mapped, destination);
        assert_eq!(
            source_address(&header).unwrap(),
            Some("192.0.2.1:4000".parse().unwrap())
        );
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(payload_len(&[3u8; 16]), Err(ProxyHeaderError::BadSignature));
        let mut header = encode("1.2.3.4:5".parse().unwrap(), "5.6.7.8:9".parse().unwrap());
        header[14] = 0xff;
        assert!(matches!(
            payload_len(&header[..16]),
            Err(ProxyHeaderError::TooLong(_))
        ));
        let header = encode("1.2.3.4:5".parse().unwrap(), "5.6.7.8:9".parse().unwrap());
        assert!(source_address(&header[..20]).is_err());
    }
}
