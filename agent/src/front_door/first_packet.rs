//! Reads what a connection starts with, and nothing more: an optional PROXY v2 header (from
//! another front door), then the client's TPKT + X.224 Connection Request, reading exactly the
//! lengths the headers announce so that no byte of the RDP handshake after it is consumed.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::proxy_header::{self, ProxyHeader, ProxyHeaderError};
use super::x224::{self, ConnectionRequest, Parsed, X224Error};

/// The start of a connection.
#[derive(Debug)]
pub struct FirstPacket {
    /// The PROXY header, when one was sent.
    pub proxied: Option<ProxyHeader>,
    /// The X.224 packet's bytes, to replay to wherever the connection goes.
    pub packet: Vec<u8>,
    pub request: ConnectionRequest,
}

#[derive(Debug, thiserror::Error)]
pub enum FirstPacketError {
    #[error("client closed the connection before its first packet was complete")]
    Closed,
    #[error("read: {0}")]
    Io(std::io::Error),
    #[error(transparent)]
    X224(#[from] X224Error),
    #[error(transparent)]
    Proxy(#[from] ProxyHeaderError),
}

impl From<std::io::Error> for FirstPacketError {
    fn from(error: std::io::Error) -> Self {
        if error.kind() == std::io::ErrorKind::UnexpectedEof {
            FirstPacketError::Closed
        } else {
            FirstPacketError::Io(error)
        }
    }
}

/// Extends `buffer` to `target` bytes with exactly that many more from `stream`.
async fn fill<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut Vec<u8>,
    target: usize,
) -> Result<(), FirstPacketError> {
    let start = buffer.len();
    if target <= start {
        return Ok(());
    }
    buffer.resize(target, 0);
    stream.read_exact(&mut buffer[start..]).await?;
    Ok(())
}

/// Extends `buffer` with what `stream` has (at least one byte), never past `target` bytes.
async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut Vec<u8>,
    target: usize,
) -> Result<(), FirstPacketError> {
    let start = buffer.len();
    buffer.resize(target.max(start + 1), 0);
    let read = stream.read(&mut buffer[start..]).await;
    let read = match read {
        Ok(0) => Err(FirstPacketError::Closed),
        Ok(count) => Ok(count),
        Err(error) => Err(FirstPacketError::from(error)),
    };
    buffer.truncate(start + read.as_ref().copied().unwrap_or(0));
    read.map(|_| ())
}

/// Reads the first packet (the caller bounds the time it may take).
pub async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<FirstPacket, FirstPacketError> {
    let mut buffer = Vec::with_capacity(64);
    // Both a PROXY v2 header and a TPKT packet are longer than a TPKT header, whose four bytes
    // are enough for the parser to tell garbage or a length beyond the limit.
    fill(stream, &mut buffer, x224::TPKT_HEADER_LEN).await?;
    let mut proxied = None;
    if buffer[0] == proxy_header::SIGNATURE_FIRST_BYTE {
        fill(stream, &mut buffer, proxy_header::FIXED_LEN).await?;
        let payload = proxy_header::payload_len(&buffer)?;
        fill(stream, &mut buffer, proxy_header::FIXED_LEN + payload).await?;
        proxied = Some(proxy_header::parse(&buffer)?);
        buffer.clear();
    }
    loop {
        match x224::parse(&buffer)? {
            Parsed::NeedMore { at_least } => {
                // The parser refuses lengths beyond MAX_REQUEST_LEN; this only guards progress.
                let target = at_least.clamp(buffer.len() + 1, x224::MAX_REQUEST_LEN);
                // What has arrived, up to the packet's end: the fields after the TPKT header
                // (its length indicator first) are judged as soon as they come, not once the
                // whole length the header claims is in.
                read_some(stream, &mut buffer, target).await?;
            }
            Parsed::Complete(request) => {
                buffer.truncate(request.packet_len);
                return Ok(FirstPacket {
                    proxied,
                    packet: buffer,
                    request,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front_door::x224::{RoutingHint, build_connection_request};

    #[tokio::test]
    async fn reads_exactly_the_packet() {
        let packet = build_connection_request(Some("Cookie: mstshash=alice"), Some(3));
        let mut input = packet.clone();
        input.extend_from_slice(b"TLS CLIENT HELLO");
        let mut reader = &input[..];
        let first = read(&mut reader).await.unwrap();
        assert_eq!(first.packet, packet);
        assert_eq!(first.request.hint, RoutingHint::UserName("alice".into()));
        assert!(first.proxied.is_none());
        // What follows the packet was not consumed.
        assert_eq!(reader, b"TLS CLIENT HELLO");
    }

    #[tokio::test]
    async fn a_wrong_length_indicator_is_refused_without_waiting_for_the_claimed_length() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        // A TPKT header claiming 200 bytes, and a length indicator that cannot go with it;
        // the client then sends nothing more and keeps the connection open.
        tokio::io::AsyncWriteExt::write_all(&mut client, &[3, 0, 0, 200, 7])
            .await
            .unwrap();
        let read = tokio::time::timeout(std::time::Duration::from_secs(2), read(&mut server))
            .await
            .expect("refused at once, not after the client timeout");
        assert!(matches!(
            read,
            Err(FirstPacketError::X224(X224Error::BadLengthIndicator))
        ));
        drop(client);
    }

    #[tokio::test]
    async fn reads_a_proxy_header_first() {
        let client: std::net::SocketAddr = "203.0.113.9:41000".parse().unwrap();
        let packet = build_connection_request(None, None);
        let mut input = proxy_header::encode(client, "127.0.0.1:3389".parse().unwrap(), None, 0);
        input.extend_from_slice(&packet);
        input.extend_from_slice(b"rest");
        let mut reader = &input[..];
        let first = read(&mut reader).await.unwrap();
        assert_eq!(first.proxied.and_then(|header| header.source), Some(client));
        assert_eq!(first.packet, packet);
        assert_eq!(reader, b"rest");
    }

    #[tokio::test]
    async fn refuses_garbage_and_truncation() {
        let mut http = &b"GET / HTTP/1.1\r\n\r\n"[..];
        assert!(matches!(
            read(&mut http).await,
            Err(FirstPacketError::X224(_))
        ));
        let packet = build_connection_request(Some("Cookie: mstshash=alice"), None);
        let mut short = &packet[..packet.len() - 1];
        assert!(matches!(
            read(&mut short).await,
            Err(FirstPacketError::Closed)
        ));
        let mut oversized = &[3u8, 0, 0xff, 0xff][..];
        assert!(matches!(
            read(&mut oversized).await,
            Err(FirstPacketError::X224(_))
        ));
        let mut bad_proxy = &b"\r\n\r\n\0\r\nQUIX\n\x21\x11\x00\x0c"[..];
        assert!(matches!(
            read(&mut bad_proxy).await,
            Err(FirstPacketError::Proxy(_))
        ));
    }
}
