//! PROXY protocol v2 headers (the `ppp` crate does the encoding and decoding): a front door
//! that sends a client on to another machine's front door prefixes the connection with one
//! carrying the client's address; the receiving front door reads it, and trusts it only from
//! front doors of its farm.
//!
//! A machine's address is not proof enough on a terminal server, where any logged-on user can
//! open a connection from it. With an agent token set (the secret every agent of the farm
//! shares with the broker), the header carries a signature in a TLV of its own (type
//! `SIGNATURE_TLV`): the time it was made and an HMAC-SHA256, keyed by the token, over the
//! addresses and that time. A receiver with the token refuses a header without a valid
//! signature, or one made more than `SIGNATURE_WINDOW_SECS` away from its own clock.

use std::net::{IpAddr, SocketAddr};

use ppp::v2;
use ring::hmac;

use super::route::canonical;

/// Bytes of the fixed part: 12-byte signature, version/command, family/protocol, length.
pub const FIXED_LEN: usize = 16;
/// Longest address-and-TLV part accepted (addresses take at most 216 bytes).
pub const MAX_PAYLOAD_LEN: usize = 1024;
/// The first byte of the signature; a TPKT packet starts with 3 instead.
pub const SIGNATURE_FIRST_BYTE: u8 = b'\r';
/// The TLV type of the signature: the first of the range the protocol leaves to applications
/// (`PP2_TYPE_MIN_CUSTOM`).
pub const SIGNATURE_TLV: u8 = 0xE0;
/// How far a signature's time may be from the receiver's clock (farm machines keep time with
/// NTP; the broker warns about a machine whose clock is off).
pub const SIGNATURE_WINDOW_SECS: u64 = 120;
const SIGNATURE_LEN: usize = 8 + 32;
/// Keeps these signatures apart from anything else the token might ever sign.
const SIGNATURE_CONTEXT: &[u8] = b"tsagent front door PROXY v2 header\0";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    #[error("not a proxy protocol v2 signature")]
    BadSignature,
    #[error("proxy header of {0} bytes is too long")]
    TooLong(usize),
    #[error("malformed proxy header: {0}")]
    Malformed(String),
}

/// Signs and checks headers with the farm's agent token.
pub struct HeaderKey {
    key: hmac::Key,
}

impl std::fmt::Debug for HeaderKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("HeaderKey(..)")
    }
}

impl HeaderKey {
    pub fn from_token(token: &str) -> Self {
        HeaderKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, token.as_bytes()),
        }
    }

    /// Whether `header` was signed with this key within the window around `now_secs`; the
    /// reason when not.
    pub fn check(&self, header: &ProxyHeader, now_secs: u64) -> Result<(), &'static str> {
        let (Some(source), Some(destination)) = (header.source, header.destination) else {
            return Err("no addresses");
        };
        let Some(signature) = &header.signature else {
            return Err("not signed (an agent without the farm's agent token?)");
        };
        if signature.len() != SIGNATURE_LEN {
            return Err("signature of the wrong length");
        }
        let (made_at, mac) = signature.split_at(8);
        let mut time = [0u8; 8];
        time.copy_from_slice(made_at);
        let made_at = u64::from_be_bytes(time);
        if made_at.abs_diff(now_secs) > SIGNATURE_WINDOW_SECS {
            return Err("signed too long ago or in the future (replayed, or a clock is off)");
        }
        hmac::verify(
            &self.key,
            &signed_message(source, destination, made_at),
            mac,
        )
        .map_err(|_| "signature does not match (another token?)")
    }
}

fn signed_message(source: SocketAddr, destination: SocketAddr, made_at: u64) -> Vec<u8> {
    let mut message = SIGNATURE_CONTEXT.to_vec();
    message.extend_from_slice(format!("{source}\0{destination}\0").as_bytes());
    message.extend_from_slice(&made_at.to_be_bytes());
    message
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// A header saying that `source` (the client) connected to `destination` (this front door),
/// signed with `key` (made at `now_secs`) when one is given.
pub fn encode(
    source: SocketAddr,
    destination: SocketAddr,
    key: Option<&HeaderKey>,
    now_secs: u64,
) -> Vec<u8> {
    let source = canonical(source);
    let mut destination = canonical(destination);
    if source.is_ipv4() != destination.is_ipv4() {
        // Both addresses must be of one family; the destination is only informative.
        destination = match source {
            SocketAddr::V4(_) => SocketAddr::new(IpAddr::from([0u8; 4]), 0),
            SocketAddr::V6(_) => SocketAddr::new(IpAddr::from([0u16; 8]), 0),
        };
    }
    let mut builder = v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (source, destination),
    );
    if let Some(key) = key {
        let mac = hmac::sign(&key.key, &signed_message(source, destination, now_secs));
        let mut value = now_secs.to_be_bytes().to_vec();
        value.extend_from_slice(mac.as_ref());
        // Writing to a Vec cannot fail.
        builder = match builder.write_tlv(SIGNATURE_TLV, &value) {
            Ok(builder) => builder,
            Err(_) => return Vec::new(),
        };
    }
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

/// What a header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The client's address; `None` for a LOCAL command or an address family other than
    /// IPv4 or IPv6.
    pub source: Option<SocketAddr>,
    /// The address the client connected to, at the front door that sent the header.
    pub destination: Option<SocketAddr>,
    /// The `SIGNATURE_TLV`'s value, if the header has one.
    pub signature: Option<Vec<u8>>,
}

/// Reads a complete header.
pub fn parse(header: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    let parsed = v2::Header::try_from(header)
        .map_err(|error| ProxyHeaderError::Malformed(error.to_string()))?;
    let mut signature = None;
    for tlv in parsed.tlvs() {
        let tlv = tlv.map_err(|error| ProxyHeaderError::Malformed(error.to_string()))?;
        if tlv.kind == SIGNATURE_TLV {
            signature = Some(tlv.value.to_vec());
        }
    }
    let (source, destination) = match (parsed.command, parsed.addresses) {
        (v2::Command::Proxy, v2::Addresses::IPv4(ip)) => (
            Some(SocketAddr::from((ip.source_address, ip.source_port))),
            Some(SocketAddr::from((
                ip.destination_address,
                ip.destination_port,
            ))),
        ),
        // An IPv4 client given as IPv4-mapped IPv6 (by a sender other than `encode`, which
        // never writes one) is that IPv4 address, as a front door writes its own clients'.
        (v2::Command::Proxy, v2::Addresses::IPv6(ip)) => (
            Some(canonical(SocketAddr::from((
                ip.source_address,
                ip.source_port,
            )))),
            Some(canonical(SocketAddr::from((
                ip.destination_address,
                ip.destination_port,
            )))),
        ),
        _ => (None, None),
    };
    Ok(ProxyHeader {
        source,
        destination,
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn source_of(header: &[u8]) -> Option<SocketAddr> {
        parse(header).unwrap().source
    }

    #[test]
    fn header_round_trips() {
        let source: SocketAddr = "198.51.100.7:50123".parse().unwrap();
        let destination: SocketAddr = "10.1.2.3:3389".parse().unwrap();
        let header = encode(source, destination, None, NOW);
        assert_eq!(header[0], SIGNATURE_FIRST_BYTE);
        let length = payload_len(&header[..FIXED_LEN]).unwrap();
        assert_eq!(header.len(), FIXED_LEN + length);
        let parsed = parse(&header).unwrap();
        assert_eq!(parsed.source, Some(source));
        assert_eq!(parsed.destination, Some(destination));
        assert_eq!(parsed.signature, None);
    }

    #[test]
    fn mixed_families_keep_the_source() {
        let source: SocketAddr = "[2001:db8::1]:4000".parse().unwrap();
        let destination: SocketAddr = "10.1.2.3:3389".parse().unwrap();
        assert_eq!(
            source_of(&encode(source, destination, None, NOW)),
            Some(source)
        );
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:4000".parse().unwrap();
        let header = encode(mapped, destination, None, NOW);
        assert_eq!(source_of(&header), Some("192.0.2.1:4000".parse().unwrap()));
    }

    #[test]
    fn a_mapped_address_from_another_sender_is_read_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:4444".parse().unwrap();
        let door: SocketAddr = "[::ffff:10.9.9.9]:3389".parse().unwrap();
        let header = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (mapped, door),
        )
        .build()
        .unwrap();
        let parsed = parse(&header).unwrap();
        assert_eq!(parsed.source, Some("10.1.2.3:4444".parse().unwrap()));
        assert_eq!(parsed.destination, Some("10.9.9.9:3389".parse().unwrap()));
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(payload_len(&[3u8; 16]), Err(ProxyHeaderError::BadSignature));
        let address = |text: &str| text.parse::<SocketAddr>().unwrap();
        let mut header = encode(address("1.2.3.4:5"), address("5.6.7.8:9"), None, NOW);
        header[14] = 0xff;
        assert!(matches!(
            payload_len(&header[..16]),
            Err(ProxyHeaderError::TooLong(_))
        ));
        let header = encode(address("1.2.3.4:5"), address("5.6.7.8:9"), None, NOW);
        assert!(parse(&header[..20]).is_err());
    }

    #[test]
    fn a_signed_header_is_taken_only_with_the_same_token_in_the_window() {
        let key = HeaderKey::from_token("the-farm-agent-token");
        let source: SocketAddr = "198.51.100.7:50123".parse().unwrap();
        let destination: SocketAddr = "10.1.2.3:3389".parse().unwrap();
        let signed = parse(&encode(source, destination, Some(&key), NOW)).unwrap();
        assert_eq!(signed.source, Some(source));
        assert_eq!(key.check(&signed, NOW), Ok(()));
        assert_eq!(key.check(&signed, NOW + SIGNATURE_WINDOW_SECS), Ok(()));
        assert_eq!(key.check(&signed, NOW - SIGNATURE_WINDOW_SECS), Ok(()));
        assert!(key.check(&signed, NOW + SIGNATURE_WINDOW_SECS + 1).is_err());
        assert!(key.check(&signed, NOW - SIGNATURE_WINDOW_SECS - 1).is_err());
        // Another token, no signature, or another client address under the same signature.
        let other = HeaderKey::from_token("another-farms-token");
        assert!(other.check(&signed, NOW).is_err());
        let unsigned = parse(&encode(source, destination, None, NOW)).unwrap();
        assert!(key.check(&unsigned, NOW).is_err());
        let forged = ProxyHeader {
            source: Some("203.0.113.9:1".parse().unwrap()),
            ..signed.clone()
        };
        assert!(key.check(&forged, NOW).is_err());
        // A signature of another time does not stand for this one.
        let mut later = signed.clone();
        if let Some(signature) = &mut later.signature {
            signature[..8].copy_from_slice(&(NOW + 1).to_be_bytes());
        }
        assert!(key.check(&later, NOW).is_err());
    }
}
