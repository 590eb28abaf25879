//! Parser for an RDP client's first packet: a TPKT header carrying an X.224 Connection Request
//! (MS-RDPBCGR 2.2.1.1), from which the front door takes its routing hint.
//!
//! Layout of the packet this module reads (all lengths are checked against each other):
//!
//! ```text
//! TPKT (RFC 1006)   03 00 LL LL              version 3, reserved 0, total length (big-endian)
//! X.224 CR TPDU     LI Ex DD DD SS SS CO     LI = bytes after LI; Ex = CR code 0xE, any CDT
//! variable part     [cookie or routing token line] CR LF      (optional)
//!                   [rdpNegReq: 01 flags 08 00 protocols(u32 LE)]  (optional)
//!                   [rdpCorrelationInfo: 06 flags 24 00 id(16) reserved(16)]  (optional)
//! ```
//!
//! Policy: strict about every length (TPKT length, length indicator, rdpNegReq and
//! rdpCorrelationInfo lengths) and about the fixed header; liberal about the text of the cookie
//! line (anything unknown becomes [`RoutingHint::Unrecognized`]) and about bytes that follow it
//! (unknown trailing bytes are accepted and counted in [`ConnectionRequest::trailing_bytes`]).
//!
//! Case: the `Cookie: ` prefix is matched case-sensitively, as MS-RDPBCGR and the
//! LoadBalanceInfo documentation spell it. The keys `mstshash=` and `msts=` and the
//! `tsv://MS Terminal Services Plugin.1.` prefix are matched ASCII-case-insensitively: some
//! clients and tools are known to write `MSTS=`, the values are only routing hints (the terminal
//! server still authenticates the user, and the agent only connects to machines of its farm), so
//! tolerance costs nothing while strictness would misroute such clients.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Largest TPKT length accepted; a larger one is rejected with [`X224Error::TooLarge`].
pub const MAX_REQUEST_LEN: usize = 4096;

/// `requestedProtocols` value for standard RDP security (no flag set).
pub const PROTOCOL_RDP: u32 = 0x0000_0000;
/// `requestedProtocols` flag: TLS.
pub const PROTOCOL_SSL: u32 = 0x0000_0001;
/// `requestedProtocols` flag: CredSSP (NLA), which implies TLS.
pub const PROTOCOL_HYBRID: u32 = 0x0000_0002;
/// `requestedProtocols` flag: RDSTLS.
pub const PROTOCOL_RDSTLS: u32 = 0x0000_0004;
/// `requestedProtocols` flag: CredSSP with the Early User Authorization Result PDU.
pub const PROTOCOL_HYBRID_EX: u32 = 0x0000_0008;
/// `requestedProtocols` flag: RDS AAD authentication.
pub const PROTOCOL_RDSAAD: u32 = 0x0000_0010;

/// TPKT version number (RFC 1006).
const TPKT_VERSION: u8 = 3;
/// Size of the TPKT header.
pub const TPKT_HEADER_LEN: usize = 4;
/// Size of the fixed part of a Connection Request TPDU, length indicator included.
const X224_CR_FIXED_LEN: usize = 7;
/// Smallest possible packet: TPKT header plus the fixed Connection Request part.
const MIN_PACKET_LEN: usize = TPKT_HEADER_LEN + X224_CR_FIXED_LEN;
/// Largest length indicator: X.224 reserves 255 for extensions.
const MAX_LENGTH_INDICATOR: u8 = 254;
/// TPDU code of a Connection Request, in the upper nibble (the lower one is the credit, CDT).
const TPDU_CONNECTION_REQUEST: u8 = 0xE0;
/// Type byte of an RDP Negotiation Request (MS-RDPBCGR 2.2.1.1.1).
const TYPE_RDP_NEG_REQ: u8 = 0x01;
/// Length of an RDP Negotiation Request.
const RDP_NEG_REQ_LEN: usize = 8;
/// rdpNegReq flag announcing that rdpCorrelationInfo follows.
const CORRELATION_INFO_PRESENT: u8 = 0x08;
/// Type byte of an RDP Correlation Info structure (MS-RDPBCGR 2.2.1.1.2).
const TYPE_RDP_CORRELATION_INFO: u8 = 0x06;
/// Length of an RDP Correlation Info structure.
const RDP_CORRELATION_INFO_LEN: usize = 36;
/// Prefix shared by user-name cookies and `msts` routing tokens (case-sensitive).
const COOKIE_PREFIX: &[u8] = b"Cookie: ";
/// Key of the user-name cookie, after [`COOKIE_PREFIX`] (case-insensitive).
const USER_NAME_KEY: &[u8] = b"mstshash=";
/// Key of the IP routing token, after [`COOKIE_PREFIX`] (case-insensitive).
const ROUTING_TOKEN_KEY: &[u8] = b"msts=";
/// Prefix of an RD Connection Broker collection token (case-insensitive).
const COLLECTION_PREFIX: &[u8] = b"tsv://MS Terminal Services Plugin.1.";
/// Longest text kept in [`RoutingHint::Unrecognized`], in characters.
const MAX_UNRECOGNIZED_CHARS: usize = 256;

/// A complete, valid Client X.224 Connection Request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionRequest {
    /// Bytes of the whole TPKT packet: exactly what the front door read and must replay.
    pub packet_len: usize,
    /// What the cookie or routing token line says about where the client should go.
    pub hint: RoutingHint,
    /// requestedProtocols of rdpNegReq when present (PROTOCOL_SSL=1, HYBRID=2, ...).
    pub requested_protocols: Option<u32>,
    /// Unknown bytes after the cookie line and negotiation structures (accepted, worth logging).
    pub trailing_bytes: usize,
}

/// The routing information carried by the cookie or routing token line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutingHint {
    /// No cookie or token at all.
    None,
    /// `Cookie: mstshash=NAME`: NAME as sent (mstsc truncates it to 9 characters; some clients
    /// send `DOMAIN\user`, see [`split_domain`]). Valid UTF-8 is kept as is; other bytes (an
    /// ANSI code page) are mapped one to one to U+0000..U+00FF (Latin-1), so nothing is lost.
    UserName(String),
    /// `Cookie: msts=IP.PORT.0000`, decoded to an IPv4 socket address.
    RoutingToken(SocketAddrV4),
    /// `tsv://MS Terminal Services Plugin.1.<collection>`: the collection (farm) name, decoded
    /// like [`RoutingHint::UserName`], without the trailing spaces clients pad with.
    Collection(String),
    /// A cookie or token line that is none of the above, or one of the above with an empty or
    /// undecodable value (kept for logging; lossily UTF-8 decoded, at most 256 characters).
    Unrecognized(String),
}

/// Outcome of [`parse`] on the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The buffer is a valid beginning but incomplete: read until it holds at least
    /// `at_least` bytes in total (4 for the header, then the TPKT length), then parse again.
    NeedMore {
        /// Total buffer length needed before the next attempt can make progress.
        at_least: usize,
    },
    /// The whole request is in the buffer (which may hold more bytes after it).
    Complete(ConnectionRequest),
}

/// Why a buffer is not (the beginning of) a valid Client X.224 Connection Request.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum X224Error {
    /// The first bytes are not a TPKT header (version 3, reserved 0).
    #[error("not a tpkt packet (expected version 3 and a zero reserved byte)")]
    NotTpkt,
    /// The TPKT length exceeds [`MAX_REQUEST_LEN`].
    #[error("tpkt length {0} exceeds the limit of 4096 bytes")]
    TooLarge(usize),
    /// The TPKT length is too small to hold an X.224 Connection Request.
    #[error("tpkt length is too short for an x.224 connection request")]
    TooShort,
    /// The TPDU code is not a Connection Request (upper nibble 0xE); holds the code byte.
    #[error("x.224 tpdu code {0:#04x} is not a connection request")]
    NotConnectionRequest(u8),
    /// The X.224 length indicator is not the TPKT length minus 5, or is the reserved 255.
    #[error("x.224 length indicator does not match the tpkt length")]
    BadLengthIndicator,
    /// The variable part does not start with rdpNegReq and has no CR LF ending a cookie line.
    #[error("cookie or routing token is not terminated by cr lf")]
    MalformedCookie,
    /// rdpNegReq or rdpCorrelationInfo is truncated, has a wrong length, or is announced but
    /// missing.
    #[error("malformed rdp negotiation request or correlation info")]
    MalformedNegotiation,
}

/// Parses the start of a client connection: returns [`Parsed::NeedMore`] while `buf` is a valid
/// but incomplete beginning, the request once the whole TPKT packet is there, or an error as
/// soon as a byte received so far is invalid. Never looks past the TPKT length.
pub fn parse(buf: &[u8]) -> Result<Parsed, X224Error> {
    // Fixed header fields are checked as soon as they arrive, so that garbage (TLS, HTTP, a
    // scanner) is rejected without waiting for the length it claims.
    if buf.first().is_some_and(|&version| version != TPKT_VERSION) {
        return Err(X224Error::NotTpkt);
    }
    if buf.get(1).is_some_and(|&reserved| reserved != 0) {
        return Err(X224Error::NotTpkt);
    }
    let [_, _, len_hi, len_lo, ..] = *buf else {
        return Ok(Parsed::NeedMore {
            at_least: TPKT_HEADER_LEN,
        });
    };
    let packet_len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    if packet_len > MAX_REQUEST_LEN {
        return Err(X224Error::TooLarge(packet_len));
    }
    if packet_len < MIN_PACKET_LEN {
        return Err(X224Error::TooShort);
    }
    if let Some(&li) = buf.get(TPKT_HEADER_LEN)
        && (li > MAX_LENGTH_INDICATOR || usize::from(li) + TPKT_HEADER_LEN + 1 != packet_len)
    {
        return Err(X224Error::BadLengthIndicator);
    }
    if let Some(&code) = buf.get(TPKT_HEADER_LEN + 1)
        && code & 0xF0 != TPDU_CONNECTION_REQUEST
    {
        return Err(X224Error::NotConnectionRequest(code));
    }
    let Some(packet) = buf.get(..packet_len) else {
        return Ok(Parsed::NeedMore {
            at_least: packet_len,
        });
    };
    // DST-REF, SRC-REF and the class option are not checked: the terminal server behind the
    // front door receives the same bytes and judges them.
    let variable = packet.get(MIN_PACKET_LEN..).unwrap_or_default();
    let (hint, after_line) = parse_cookie_line(variable)?;
    let (requested_protocols, trailing_bytes) = parse_negotiation(after_line)?;
    Ok(Parsed::Complete(ConnectionRequest {
        packet_len,
        hint,
        requested_protocols,
        trailing_bytes,
    }))
}

/// Splits the optional cookie or routing token line off the variable part.
///
/// A variable part that is empty or starts with the rdpNegReq type byte has no line (text lines
/// never start with 0x01); anything else must contain CR LF.
fn parse_cookie_line(variable: &[u8]) -> Result<(RoutingHint, &[u8]), X224Error> {
    match variable.first() {
        None | Some(&TYPE_RDP_NEG_REQ) => Ok((RoutingHint::None, variable)),
        Some(_) => {
            let end = variable
                .windows(2)
                .position(|pair| pair == b"\r\n")
                .ok_or(X224Error::MalformedCookie)?;
            let (line, rest) = variable.split_at(end);
            let after = rest.get(2..).unwrap_or_default();
            Ok((classify_line(line), after))
        }
    }
}

/// Parses the optional rdpNegReq and rdpCorrelationInfo after the cookie line; returns the
/// requested protocols and the number of unknown bytes left after them.
fn parse_negotiation(bytes: &[u8]) -> Result<(Option<u32>, usize), X224Error> {
    if bytes.first() != Some(&TYPE_RDP_NEG_REQ) {
        // Not a negotiation request: unknown trailing data, tolerated.
        return Ok((None, bytes.len()));
    }
    let Some((neg, after)) = bytes.split_first_chunk::<RDP_NEG_REQ_LEN>() else {
        return Err(X224Error::MalformedNegotiation);
    };
    let [_, flags, len_lo, len_hi, p0, p1, p2, p3] = *neg;
    if usize::from(u16::from_le_bytes([len_lo, len_hi])) != RDP_NEG_REQ_LEN {
        return Err(X224Error::MalformedNegotiation);
    }
    let protocols = u32::from_le_bytes([p0, p1, p2, p3]);
    let trailing = if flags & CORRELATION_INFO_PRESENT != 0 {
        // Announced by the flag: it must be there and well formed.
        parse_correlation_info(after)
            .ok_or(X224Error::MalformedNegotiation)?
            .len()
    } else {
        // Not announced: consume a well-formed one anyway, otherwise count the bytes as trailing.
        parse_correlation_info(after).unwrap_or(after).len()
    };
    Ok((Some(protocols), trailing))
}

/// Returns the bytes after a well-formed rdpCorrelationInfo at the start of `bytes`, if any.
/// Its flags, correlation id and reserved bytes are not checked.
fn parse_correlation_info(bytes: &[u8]) -> Option<&[u8]> {
    let (info, after) = bytes.split_first_chunk::<RDP_CORRELATION_INFO_LEN>()?;
    let well_formed = info[0] == TYPE_RDP_CORRELATION_INFO
        && usize::from(u16::from_le_bytes([info[2], info[3]])) == RDP_CORRELATION_INFO_LEN;
    well_formed.then_some(after)
}

/// Turns the text of a cookie or routing token line (without CR LF) into a hint.
fn classify_line(line: &[u8]) -> RoutingHint {
    if let Some(cookie) = line.strip_prefix(COOKIE_PREFIX) {
        if let Some(name) = strip_prefix_ignore_ascii_case(cookie, USER_NAME_KEY) {
            if !name.is_empty() {
                return RoutingHint::UserName(decode_text(name));
            }
        } else if let Some(token) = strip_prefix_ignore_ascii_case(cookie, ROUTING_TOKEN_KEY)
            && let Some(addr) = std::str::from_utf8(token)
                .ok()
                .and_then(decode_routing_token)
        {
            return RoutingHint::RoutingToken(addr);
        }
    } else if let Some(collection) = strip_prefix_ignore_ascii_case(line, COLLECTION_PREFIX) {
        let collection = trim_trailing_spaces(collection);
        if !collection.is_empty() {
            return RoutingHint::Collection(decode_text(collection));
        }
    }
    RoutingHint::Unrecognized(unrecognized_text(line))
}

/// `bytes` without `prefix`, compared ASCII-case-insensitively.
fn strip_prefix_ignore_ascii_case<'a>(bytes: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let (head, tail) = bytes.split_at_checked(prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then_some(tail)
}

/// `bytes` without the trailing ASCII spaces clients add to pad a load-balance string.
fn trim_trailing_spaces(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
    bytes.get(..end).unwrap_or_default()
}

/// Decodes a name: UTF-8 when valid, else each byte as the Latin-1 character of that value.
fn decode_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(_) => bytes.iter().map(|&b| char::from(b)).collect(),
    }
}

/// Lossy UTF-8 text of an unrecognized line, truncated to [`MAX_UNRECOGNIZED_CHARS`].
fn unrecognized_text(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .chars()
        .take(MAX_UNRECOGNIZED_CHARS)
        .collect()
}

/// Splits a `DOMAIN\user` name at its first backslash; a name without a domain (or with an
/// empty one, `\user`) gives `(None, user)`. Other forms such as `user@domain` are not split.
pub fn split_domain(name: &str) -> (Option<&str>, &str) {
    match name.split_once('\\') {
        Some(("", user)) => (None, user),
        Some((domain, user)) => (Some(domain), user),
        None => (None, name),
    }
}

/// The `msts=` cookie value for an address: `IP.PORT.0000`, where IP is the decimal of the
/// address's four bytes read as a little-endian u32 and PORT the decimal of the port with its two
/// bytes swapped (both are the network-order bytes read by a little-endian machine), e.g.
/// 172.31.249.216:3389 gives `3640205228.15629.0000`.
pub fn encode_routing_token(addr: SocketAddrV4) -> String {
    let ip = u32::from_le_bytes(addr.ip().octets());
    let port = addr.port().swap_bytes();
    format!("{ip}.{port}.0000")
}

/// Decodes an `msts=` cookie value (`IP.PORT.RESERVED`, see [`encode_routing_token`]).
/// RESERVED may be any digits or empty (the documentation calls the zeros optional but the last
/// dot required); trailing spaces (padding) are ignored; anything else gives `None`.
pub fn decode_routing_token(text: &str) -> Option<SocketAddrV4> {
    let mut parts = trim_token_padding(text).split('.');
    let ip = parts.next().and_then(parse_decimal::<u32>)?;
    let port = parts.next().and_then(parse_decimal::<u16>)?;
    let reserved = parts.next()?;
    if parts.next().is_some() || !reserved.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(SocketAddrV4::new(
        Ipv4Addr::from(ip.to_le_bytes()),
        port.swap_bytes(),
    ))
}

/// `text` without trailing spaces.
fn trim_token_padding(text: &str) -> &str {
    text.trim_end_matches(' ')
}

/// Parses a non-empty run of ASCII digits (no sign, no spaces) that fits in `T`.
fn parse_decimal<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// `packet` (a complete Connection Request, as [`parse`] accepted it) without its routing token
/// line when that line is a `tsv://` collection token; `None` when it has none. The front door
/// has used the collection (it plays the RD Connection Broker's part), and RDP servers built on
/// FreeRDP refuse a request whose line is not a `Cookie:` (they close the connection with
/// "Incorrect negotiation request type"). The TPKT length and the length indicator are adjusted;
/// every other byte is kept, so the negotiation request (and the protocols the server later
/// checks against the client's core data) is unchanged.
pub fn without_collection_token(packet: &[u8]) -> Option<Vec<u8>> {
    let Ok(Parsed::Complete(request)) = parse(packet) else {
        return None;
    };
    if !matches!(request.hint, RoutingHint::Collection(_)) {
        return None;
    }
    let variable = packet.get(MIN_PACKET_LEN..request.packet_len)?;
    let line_end = variable.windows(2).position(|pair| pair == b"\r\n")? + 2;
    let new_len = request.packet_len - line_end;
    let mut stripped = Vec::with_capacity(new_len);
    stripped.extend_from_slice(&packet[..MIN_PACKET_LEN]);
    stripped.extend_from_slice(&variable[line_end..]);
    let total = u16::try_from(new_len).ok()?;
    stripped[2..TPKT_HEADER_LEN].copy_from_slice(&total.to_be_bytes());
    stripped[TPKT_HEADER_LEN] = u8::try_from(new_len - TPKT_HEADER_LEN - 1).ok()?;
    Some(stripped)
}

/// Builds a well-formed Connection Request (for tests, benchmarks and the test RDP tools), with
/// an optional cookie line text without its CR LF (e.g. `"Cookie: mstshash=alice"`) and an
/// optional rdpNegReq with flags 0 and the given requested protocols.
///
/// # Panics
///
/// If `cookie_line` contains CR LF or starts with byte 0x01 (it would not read back as one
/// line), or is too long for the one-byte length indicator (more than 246 bytes, or 238 with
/// rdpNegReq).
pub fn build_connection_request(
    cookie_line: Option<&str>,
    requested_protocols: Option<u32>,
) -> Vec<u8> {
    let mut variable = Vec::new();
    if let Some(line) = cookie_line {
        assert!(!line.contains("\r\n"), "cookie line must not contain cr lf");
        assert!(
            !line.starts_with('\u{1}'),
            "cookie line must not start with byte 0x01"
        );
        variable.extend_from_slice(line.as_bytes());
        variable.extend_from_slice(b"\r\n");
    }
    if let Some(protocols) = requested_protocols {
        variable.extend_from_slice(&[TYPE_RDP_NEG_REQ, 0, RDP_NEG_REQ_LEN as u8, 0]);
        variable.extend_from_slice(&protocols.to_le_bytes());
    }
    let li = u8::try_from(X224_CR_FIXED_LEN - 1 + variable.len())
        .ok()
        .filter(|&li| li <= MAX_LENGTH_INDICATOR)
        .expect("cookie line too long for an x.224 connection request");
    let total = u16::from(li) + (TPKT_HEADER_LEN as u16) + 1;
    let mut packet = Vec::with_capacity(usize::from(total));
    packet.extend_from_slice(&[TPKT_VERSION, 0]);
    packet.extend_from_slice(&total.to_be_bytes());
    packet.extend_from_slice(&[li, TPDU_CONNECTION_REQUEST, 0, 0, 0, 0, 0]);
    packet.extend_from_slice(&variable);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The annotated dump of MS-RDPBCGR 4.1.1 (cookie `mstshash=eltons`, PROTOCOL_RDP).
    const SPEC_EXAMPLE: [u8; 44] = [
        0x03, 0x00, 0x00, 0x2c, 0x27, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x43, 0x6f, 0x6f, 0x6b,
        0x69, 0x65, 0x3a, 0x20, 0x6d, 0x73, 0x74, 0x73, 0x68, 0x61, 0x73, 0x68, 0x3d, 0x65, 0x6c,
        0x74, 0x6f, 0x6e, 0x73, 0x0d, 0x0a, 0x01, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    /// Wraps a variable part in a valid TPKT header and Connection Request fixed part.
    fn packet_with_variable(variable: &[u8]) -> Vec<u8> {
        let li = u8::try_from(6 + variable.len()).expect("variable part fits");
        let total = u16::from(li) + 5;
        let mut packet = vec![3, 0];
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&[li, 0xE0, 0, 0, 0, 0, 0]);
        packet.extend_from_slice(variable);
        packet
    }

    #[test]
    fn a_collection_token_is_removed_and_nothing_else() {
        for protocols in [None, Some(PROTOCOL_SSL | PROTOCOL_HYBRID)] {
            let with = build_connection_request(
                Some("tsv://MS Terminal Services Plugin.1.Sales   "),
                protocols,
            );
            let without = without_collection_token(&with).expect("a collection token");
            assert_eq!(without, build_connection_request(None, protocols));
            let Ok(Parsed::Complete(request)) = parse(&without) else {
                panic!("the result parses");
            };
            assert_eq!(request.hint, RoutingHint::None);
            assert_eq!(request.requested_protocols, protocols);
        }
        // Correlation info after the negotiation request is kept.
        let mut variable = b"tsv://MS Terminal Services Plugin.1.f\r\n".to_vec();
        let mut rest = vec![TYPE_RDP_NEG_REQ, CORRELATION_INFO_PRESENT, 8, 0, 3, 0, 0, 0];
        rest.extend(correlation_info(TYPE_RDP_CORRELATION_INFO, 36));
        variable.extend_from_slice(&rest);
        let without = without_collection_token(&packet_with_variable(&variable)).unwrap();
        assert_eq!(without, packet_with_variable(&rest));
        // Other lines, no line, and anything that is not a complete request: left alone.
        for line in [
            Some("Cookie: mstshash=alice"),
            Some("Cookie: msts=3640205228.15629.0000"),
            Some("tsv://something else"),
            None,
        ] {
            let packet = build_connection_request(line, Some(PROTOCOL_SSL));
            assert_eq!(without_collection_token(&packet), None, "{line:?}");
        }
        let packet = build_connection_request(Some("tsv://MS Terminal Services Plugin.1.f"), None);
        assert_eq!(without_collection_token(&packet[..packet.len() - 1]), None);
        assert_eq!(without_collection_token(b"GET / HTTP/1.1"), None);
    }

    /// A correlation info structure with the given type and length fields.
    fn correlation_info(kind: u8, len: u16) -> Vec<u8> {
        let mut info = vec![kind, 0];
        info.extend_from_slice(&len.to_le_bytes());
        info.extend((1..=16).map(|i| i as u8)); // correlationId
        info.extend([0; 16]); // reserved
        info
    }

    /// An rdpNegReq with the given flags and protocols.
    fn neg_req(flags: u8, protocols: u32) -> Vec<u8> {
        let mut neg = vec![0x01, flags, 0x08, 0x00];
        neg.extend_from_slice(&protocols.to_le_bytes());
        neg
    }

    /// Parses and expects a complete request.
    fn complete(buf: &[u8]) -> ConnectionRequest {
        match parse(buf) {
            Ok(Parsed::Complete(req)) => req,
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    /// The hint of a packet built with the given cookie line and no rdpNegReq.
    fn hint_of(line: &str) -> RoutingHint {
        complete(&build_connection_request(Some(line), None)).hint
    }

    /// The spec's own example parses to its user name and PROTOCOL_RDP.
    #[test]
    fn spec_example() {
        let req = complete(&SPEC_EXAMPLE);
        assert_eq!(
            req,
            ConnectionRequest {
                packet_len: 44,
                hint: RoutingHint::UserName("eltons".into()),
                requested_protocols: Some(PROTOCOL_RDP),
                trailing_bytes: 0,
            }
        );
    }

    /// The builder reproduces the spec example byte for byte.
    #[test]
    fn builder_matches_spec_example() {
        let built = build_connection_request(Some("Cookie: mstshash=eltons"), Some(PROTOCOL_RDP));
        assert_eq!(built, SPEC_EXAMPLE);
    }

    /// A bare Connection Request: no cookie, no negotiation.
    #[test]
    fn no_cookie_no_negotiation() {
        let packet = build_connection_request(None, None);
        assert_eq!(packet.len(), 11);
        let req = complete(&packet);
        assert_eq!(req.hint, RoutingHint::None);
        assert_eq!(req.requested_protocols, None);
        assert_eq!(req.packet_len, 11);
        assert_eq!(req.trailing_bytes, 0);
    }

    /// rdpNegReq directly after the fixed part, without a cookie line.
    #[test]
    fn negotiation_without_cookie() {
        let req = complete(&build_connection_request(
            None,
            Some(PROTOCOL_SSL | PROTOCOL_HYBRID),
        ));
        assert_eq!(req.hint, RoutingHint::None);
        assert_eq!(req.requested_protocols, Some(3));
    }

    /// A user name cookie.
    #[test]
    fn user_name() {
        assert_eq!(
            hint_of("Cookie: mstshash=alice"),
            RoutingHint::UserName("alice".into())
        );
    }

    /// A DOMAIN\user cookie is kept raw.
    #[test]
    fn user_name_with_domain_is_raw() {
        assert_eq!(
            hint_of("Cookie: mstshash=CORP\\bob"),
            RoutingHint::UserName("CORP\\bob".into())
        );
    }

    /// The keys are matched case-insensitively, the `Cookie: ` prefix is not.
    #[test]
    fn key_case() {
        assert_eq!(
            hint_of("Cookie: MSTSHASH=Alice"),
            RoutingHint::UserName("Alice".into())
        );
        assert_eq!(
            hint_of("Cookie: MSTS=3640205228.15629.0000"),
            RoutingHint::RoutingToken("172.31.249.216:3389".parse().unwrap())
        );
        assert_eq!(
            hint_of("cookie: mstshash=alice"),
            RoutingHint::Unrecognized("cookie: mstshash=alice".into())
        );
        assert_eq!(
            hint_of("Cookie:mstshash=alice"),
            RoutingHint::Unrecognized("Cookie:mstshash=alice".into())
        );
    }

    /// A user name that is not UTF-8 (an ANSI code page) is mapped byte by byte.
    #[test]
    fn user_name_latin1() {
        let mut line = b"Cookie: mstshash=j".to_vec();
        line.push(0xFC); // 'ü' in Windows-1252 and Latin-1
        line.extend_from_slice(b"rgen\r\n");
        let req = complete(&packet_with_variable(&line));
        assert_eq!(req.hint, RoutingHint::UserName("jürgen".into()));
    }

    /// A UTF-8 user name is kept as is.
    #[test]
    fn user_name_utf8() {
        assert_eq!(
            hint_of("Cookie: mstshash=jürgen"),
            RoutingHint::UserName("jürgen".into())
        );
    }

    /// An empty user name is not a usable hint.
    #[test]
    fn empty_user_name() {
        assert_eq!(
            hint_of("Cookie: mstshash="),
            RoutingHint::Unrecognized("Cookie: mstshash=".into())
        );
    }

    /// An IP routing token, with and without the optional reserved digits and padding.
    #[test]
    fn routing_token() {
        let addr: SocketAddrV4 = "172.31.249.216:3389".parse().unwrap();
        for line in [
            "Cookie: msts=3640205228.15629.0000",
            "Cookie: msts=3640205228.15629.",
            "Cookie: msts=3640205228.15629.0000 ",
        ] {
            assert_eq!(hint_of(line), RoutingHint::RoutingToken(addr), "{line}");
        }
    }

    /// A routing token that does not decode is kept as unrecognized.
    #[test]
    fn bad_routing_token() {
        for line in [
            "Cookie: msts=",
            "Cookie: msts=3640205228.15629",
            "Cookie: msts=4294967296.15629.0000",
            "Cookie: msts=1.65536.0000",
            "Cookie: msts=abc.def.0000",
        ] {
            assert_eq!(hint_of(line), RoutingHint::Unrecognized(line.into()));
        }
    }

    /// A connection broker collection, with padding and any case of the prefix.
    #[test]
    fn collection() {
        assert_eq!(
            hint_of("tsv://MS Terminal Services Plugin.1.Sales"),
            RoutingHint::Collection("Sales".into())
        );
        assert_eq!(
            hint_of("tsv://MS Terminal Services Plugin.1.Sales_Farm "),
            RoutingHint::Collection("Sales_Farm".into())
        );
        assert_eq!(
            hint_of("TSV://ms terminal services plugin.1.Sales"),
            RoutingHint::Collection("Sales".into())
        );
        assert_eq!(
            hint_of("tsv://MS Terminal Services Plugin.1."),
            RoutingHint::Unrecognized("tsv://MS Terminal Services Plugin.1.".into())
        );
        assert_eq!(
            hint_of("tsv://VMResource.1.Pool"),
            RoutingHint::Unrecognized("tsv://VMResource.1.Pool".into())
        );
    }

    /// Other lines are unrecognized; invalid UTF-8 is replaced.
    #[test]
    fn unrecognized() {
        assert_eq!(
            hint_of("Cookie: other=1"),
            RoutingHint::Unrecognized("Cookie: other=1".into())
        );
        assert_eq!(hint_of(""), RoutingHint::Unrecognized(String::new()));
        let req = complete(&packet_with_variable(b"x\xFFy\r\n"));
        assert_eq!(req.hint, RoutingHint::Unrecognized("x\u{FFFD}y".into()));
    }

    /// Unrecognized text is truncated to 256 characters (unreachable through a one-byte LI,
    /// but the limit is part of the contract).
    #[test]
    fn unrecognized_truncation() {
        let long = "é".repeat(300);
        assert_eq!(unrecognized_text(long.as_bytes()).chars().count(), 256);
        assert_eq!(unrecognized_text(b"short"), "short");
    }

    /// A CR inside the line is kept; the first CR LF ends it.
    #[test]
    fn first_crlf_ends_line() {
        let req = complete(&build_connection_request(
            Some("Cookie: mstshash=a\rb\r"),
            Some(1),
        ));
        assert_eq!(req.hint, RoutingHint::UserName("a\rb\r".into()));
        assert_eq!(req.requested_protocols, Some(1));
    }

    /// rdpNegReq followed by an announced rdpCorrelationInfo.
    #[test]
    fn negotiation_with_correlation_info() {
        let mut variable = b"Cookie: mstshash=alice\r\n".to_vec();
        variable.extend(neg_req(CORRELATION_INFO_PRESENT, PROTOCOL_HYBRID_EX));
        variable.extend(correlation_info(0x06, 36));
        let packet = packet_with_variable(&variable);
        let req = complete(&packet);
        assert_eq!(req.requested_protocols, Some(PROTOCOL_HYBRID_EX));
        assert_eq!(req.trailing_bytes, 0);
        assert_eq!(req.packet_len, packet.len());
    }

    /// A correlation info without the flag is still recognized.
    #[test]
    fn unannounced_correlation_info() {
        let mut variable = neg_req(0, PROTOCOL_SSL);
        variable.extend(correlation_info(0x06, 36));
        let req = complete(&packet_with_variable(&variable));
        assert_eq!(req.requested_protocols, Some(PROTOCOL_SSL));
        assert_eq!(req.trailing_bytes, 0);
    }

    /// Without the flag, a malformed correlation info is only trailing data.
    #[test]
    fn unannounced_bad_correlation_info_is_trailing() {
        let mut variable = neg_req(0, PROTOCOL_SSL);
        variable.extend(correlation_info(0x06, 35));
        let req = complete(&packet_with_variable(&variable));
        assert_eq!(req.requested_protocols, Some(PROTOCOL_SSL));
        assert_eq!(req.trailing_bytes, 36);
    }

    /// An announced correlation info must be present and well formed.
    #[test]
    fn announced_correlation_info_is_strict() {
        let bad = [
            Vec::new(),
            correlation_info(0x06, 35),
            correlation_info(0x07, 36),
            correlation_info(0x06, 36)[..35].to_vec(),
        ];
        for info in bad {
            let mut variable = neg_req(CORRELATION_INFO_PRESENT, PROTOCOL_SSL);
            variable.extend(&info);
            assert_eq!(
                parse(&packet_with_variable(&variable)),
                Err(X224Error::MalformedNegotiation),
                "{info:?}"
            );
        }
    }

    /// Bytes after the correlation info are counted as trailing.
    #[test]
    fn trailing_after_correlation_info() {
        let mut variable = neg_req(CORRELATION_INFO_PRESENT, 0);
        variable.extend(correlation_info(0x06, 36));
        variable.extend(b"xyz");
        let req = complete(&packet_with_variable(&variable));
        assert_eq!(req.trailing_bytes, 3);
    }

    /// Unknown bytes after the cookie line are accepted and counted.
    #[test]
    fn trailing_after_cookie_line() {
        let req = complete(&packet_with_variable(b"Cookie: mstshash=bob\r\nextra\r\n"));
        assert_eq!(req.hint, RoutingHint::UserName("bob".into()));
        assert_eq!(req.requested_protocols, None);
        assert_eq!(req.trailing_bytes, 7);
    }

    /// Unknown bytes after rdpNegReq are accepted and counted.
    #[test]
    fn trailing_after_negotiation() {
        let mut variable = neg_req(0, 3);
        variable.extend([0xAA, 0xBB]);
        let req = complete(&packet_with_variable(&variable));
        assert_eq!(req.requested_protocols, Some(3));
        assert_eq!(req.trailing_bytes, 2);
    }

    /// rdpNegReq with a wrong length field or truncated is rejected.
    #[test]
    fn malformed_negotiation() {
        let mut wrong_len = neg_req(0, 3);
        wrong_len[2] = 9;
        let mut wrong_len_hi = neg_req(0, 3);
        wrong_len_hi[3] = 1;
        let truncated = neg_req(0, 3)[..7].to_vec();
        for neg in [wrong_len, wrong_len_hi, truncated] {
            assert_eq!(
                parse(&packet_with_variable(&neg)),
                Err(X224Error::MalformedNegotiation)
            );
            let mut after_cookie = b"Cookie: mstshash=bob\r\n".to_vec();
            after_cookie.extend(&neg);
            assert_eq!(
                parse(&packet_with_variable(&after_cookie)),
                Err(X224Error::MalformedNegotiation)
            );
        }
    }

    /// The flags byte of rdpNegReq is not restricted.
    #[test]
    fn negotiation_flags_accepted() {
        let req = complete(&packet_with_variable(&neg_req(0x03, PROTOCOL_HYBRID)));
        assert_eq!(req.requested_protocols, Some(PROTOCOL_HYBRID));
    }

    /// A text line without CR LF is a malformed cookie.
    #[test]
    fn missing_crlf() {
        for variable in [
            &b"Cookie: mstshash=alice"[..],
            b"Cookie: mstshash=alice\r",
            b"Cookie: mstshash=alice\n",
            b"\x06",
        ] {
            assert_eq!(
                parse(&packet_with_variable(variable)),
                Err(X224Error::MalformedCookie)
            );
        }
    }

    /// Any credit (CDT) nibble is accepted, and references and class are not checked.
    #[test]
    fn any_credit_and_references() {
        let mut packet = build_connection_request(Some("Cookie: mstshash=x"), None);
        packet[5] = 0xEF;
        packet[6..11].copy_from_slice(&[1, 2, 3, 4, 5]);
        assert_eq!(complete(&packet).hint, RoutingHint::UserName("x".into()));
    }

    /// Every strict prefix of a valid packet asks for more, with the right amount.
    #[test]
    fn every_prefix_needs_more() {
        let mut variable = b"Cookie: msts=3640205228.15629.0000\r\n".to_vec();
        variable.extend(neg_req(CORRELATION_INFO_PRESENT, 11));
        variable.extend(correlation_info(0x06, 36));
        for packet in [
            SPEC_EXAMPLE.to_vec(),
            packet_with_variable(&variable),
            build_connection_request(None, None),
        ] {
            for n in 0..packet.len() {
                let expected = if n < 4 { 4 } else { packet.len() };
                assert_eq!(
                    parse(&packet[..n]),
                    Ok(Parsed::NeedMore { at_least: expected }),
                    "prefix of {n} bytes"
                );
            }
            assert!(matches!(parse(&packet), Ok(Parsed::Complete(_))));
        }
    }

    /// Bytes after the packet are neither read nor counted.
    #[test]
    fn ignores_bytes_after_packet() {
        let mut buf = SPEC_EXAMPLE.to_vec();
        buf.extend_from_slice(b"\x16\x03\x01garbage");
        let req = complete(&buf);
        assert_eq!(req.packet_len, 44);
        assert_eq!(req, complete(&SPEC_EXAMPLE));
    }

    /// A wrong version or reserved byte is rejected as soon as it is seen.
    #[test]
    fn not_tpkt() {
        assert_eq!(parse(&[2]), Err(X224Error::NotTpkt));
        assert_eq!(parse(&[0x16, 0x03, 0x01]), Err(X224Error::NotTpkt));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(X224Error::NotTpkt));
        assert_eq!(parse(&[3, 1]), Err(X224Error::NotTpkt));
        let mut packet = SPEC_EXAMPLE;
        packet[1] = 0x80;
        assert_eq!(parse(&packet), Err(X224Error::NotTpkt));
    }

    /// A TPKT length above the limit is rejected from the header alone.
    #[test]
    fn too_large() {
        assert_eq!(parse(&[3, 0, 0x10, 0x01]), Err(X224Error::TooLarge(4097)));
        assert_eq!(
            parse(&[3, 0, 0xFF, 0xFF, 0xFA]),
            Err(X224Error::TooLarge(65535))
        );
        // At the limit the header alone is fine, but no length indicator can match it.
        assert_eq!(
            parse(&[3, 0, 0x10, 0x00]),
            Ok(Parsed::NeedMore { at_least: 4096 })
        );
        assert_eq!(
            parse(&[3, 0, 0x10, 0x00, 0xFF]),
            Err(X224Error::BadLengthIndicator)
        );
    }

    /// A TPKT length below the Connection Request minimum is rejected.
    #[test]
    fn too_short() {
        for len in 0u16..11 {
            let mut header = vec![3, 0];
            header.extend_from_slice(&len.to_be_bytes());
            assert_eq!(parse(&header), Err(X224Error::TooShort), "length {len}");
        }
    }

    /// The length indicator must be the TPKT length minus 5, and not 255.
    #[test]
    fn bad_length_indicator() {
        for li in [0x26, 0x28, 0x00, 0xFF] {
            let mut packet = SPEC_EXAMPLE;
            packet[4] = li;
            assert_eq!(parse(&packet), Err(X224Error::BadLengthIndicator));
            assert_eq!(parse(&packet[..5]), Err(X224Error::BadLengthIndicator));
        }
        // TPKT length 260 would need the reserved LI 255.
        let mut packet = vec![3, 0, 1, 4, 0xFF, 0xE0];
        packet.resize(260, b'a');
        assert_eq!(parse(&packet), Err(X224Error::BadLengthIndicator));
    }

    /// Other TPDU codes (connection confirm, data, disconnect) are rejected.
    #[test]
    fn wrong_tpdu_code() {
        for code in [0xD0, 0xF0, 0x80, 0x00, 0x70] {
            let mut packet = SPEC_EXAMPLE;
            packet[5] = code;
            assert_eq!(parse(&packet), Err(X224Error::NotConnectionRequest(code)));
            assert_eq!(
                parse(&packet[..6]),
                Err(X224Error::NotConnectionRequest(code))
            );
        }
    }

    /// Error messages are lowercase.
    #[test]
    fn error_messages_lowercase() {
        for err in [
            X224Error::NotTpkt,
            X224Error::TooLarge(5000),
            X224Error::TooShort,
            X224Error::NotConnectionRequest(0xD0),
            X224Error::BadLengthIndicator,
            X224Error::MalformedCookie,
            X224Error::MalformedNegotiation,
        ] {
            let msg = err.to_string();
            assert_eq!(msg, msg.to_lowercase());
        }
        assert_eq!(
            X224Error::NotConnectionRequest(0xD0).to_string(),
            "x.224 tpdu code 0xd0 is not a connection request"
        );
    }

    /// Documented routing token examples.
    #[test]
    fn routing_token_known_examples() {
        // LoadBalanceInfo documentation (IMsRdpClientAdvancedSettings::LoadBalanceInfo).
        let addr: SocketAddrV4 = "172.31.249.216:3389".parse().unwrap();
        assert_eq!(encode_routing_token(addr), "3640205228.15629.0000");
        assert_eq!(decode_routing_token("3640205228.15629.0000"), Some(addr));
        // mstsc source comment: 1.2.3.4 port 3389 (F5 cookie format).
        let addr: SocketAddrV4 = "1.2.3.4:3389".parse().unwrap();
        assert_eq!(encode_routing_token(addr), "67305985.15629.0000");
        assert_eq!(decode_routing_token("67305985.15629.0000"), Some(addr));
        // Derived from the same rule: 10.0.0.1 = 0x0100000A little-endian.
        let addr: SocketAddrV4 = "10.0.0.1:3389".parse().unwrap();
        assert_eq!(encode_routing_token(addr), "16777226.15629.0000");
    }

    /// Routing token decoding accepts the documented variants and rejects the rest.
    #[test]
    fn routing_token_decoding() {
        let addr: SocketAddrV4 = "172.31.249.216:3389".parse().unwrap();
        for ok in [
            "3640205228.15629.",
            "3640205228.15629.0",
            "3640205228.15629.0000  ",
            "03640205228.015629.0000",
        ] {
            assert_eq!(decode_routing_token(ok), Some(addr), "{ok}");
        }
        for bad in [
            "",
            "3640205228",
            "3640205228.15629",
            "3640205228.15629.0000.1",
            "3640205228.15629.00a0",
            "+3640205228.15629.0000",
            " 3640205228.15629.0000",
            "3640205228.-1.0000",
            "4294967296.15629.0000",
            "1.65536.0000",
            ".15629.0000",
            "1..0000",
            "1.2.0000\r\n",
        ] {
            assert_eq!(decode_routing_token(bad), None, "{bad:?}");
        }
        assert_eq!(
            decode_routing_token("4294967295.65535.0000"),
            Some("255.255.255.255:65535".parse().unwrap())
        );
        assert_eq!(
            decode_routing_token("0.0.0000"),
            Some("0.0.0.0:0".parse().unwrap())
        );
    }

    /// Domain splitting.
    #[test]
    fn split_domain_cases() {
        assert_eq!(split_domain("CORP\\alice"), (Some("CORP"), "alice"));
        assert_eq!(split_domain("alice"), (None, "alice"));
        assert_eq!(split_domain("\\alice"), (None, "alice"));
        assert_eq!(split_domain("CORP\\"), (Some("CORP"), ""));
        assert_eq!(split_domain("A\\B\\c"), (Some("A"), "B\\c"));
        assert_eq!(
            split_domain("alice@corp.example"),
            (None, "alice@corp.example")
        );
        assert_eq!(split_domain(""), (None, ""));
    }

    /// The builder refuses a line that is too long for the length indicator.
    #[test]
    #[should_panic(expected = "too long")]
    fn builder_rejects_long_line() {
        let line = format!("Cookie: mstshash={}", "a".repeat(230));
        build_connection_request(Some(&line), Some(0));
    }

    /// The longest accepted lines still parse.
    #[test]
    fn builder_longest_lines() {
        let with_neg = "a".repeat(238);
        let packet = build_connection_request(Some(&with_neg), Some(0));
        assert_eq!(packet.len(), 259);
        assert_eq!(complete(&packet).hint, RoutingHint::Unrecognized(with_neg));
        let without = "b".repeat(246);
        let packet = build_connection_request(Some(&without), None);
        assert_eq!(packet.len(), 259);
        assert_eq!(complete(&packet).hint, RoutingHint::Unrecognized(without));
    }

    /// The builder refuses a line containing CR LF.
    #[test]
    #[should_panic(expected = "cr lf")]
    fn builder_rejects_crlf() {
        build_connection_request(Some("a\r\nb"), None);
    }

    /// A hint together with the cookie line that should produce it.
    fn hint_and_line() -> impl Strategy<Value = (RoutingHint, Option<String>)> {
        prop_oneof![
            Just((RoutingHint::None, None)),
            "[A-Za-z0-9._\\\\@-]{1,64}".prop_map(|name| (
                RoutingHint::UserName(name.clone()),
                Some(format!("Cookie: mstshash={name}"))
            )),
            (any::<u32>(), any::<u16>()).prop_map(|(ip, port)| {
                let addr = SocketAddrV4::new(Ipv4Addr::from(ip), port);
                (
                    RoutingHint::RoutingToken(addr),
                    Some(format!("Cookie: msts={}", encode_routing_token(addr))),
                )
            }),
            "[A-Za-z0-9_ -]{0,60}[A-Za-z0-9_-]".prop_map(|name| (
                RoutingHint::Collection(name.clone()),
                Some(format!("tsv://MS Terminal Services Plugin.1.{name}"))
            )),
            // Starts with a lowercase letter and has no '/': never one of the known forms.
            "[a-z][a-z0-9 =:.]{0,100}"
                .prop_map(|text| (RoutingHint::Unrecognized(text.clone()), Some(text))),
        ]
    }

    proptest! {
        /// parse never panics, and a complete result fits in the buffer.
        #[test]
        fn parse_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Parsed::Complete(req)) = parse(&buf) {
                prop_assert!(req.packet_len <= buf.len());
                prop_assert_eq!(req.packet_len, usize::from(u16::from_be_bytes([buf[2], buf[3]])));
            }
        }

        /// With a valid header, any variable part parses or fails cleanly, and the result only
        /// depends on the bytes within the TPKT length.
        #[test]
        fn arbitrary_variable_part(
            variable in proptest::collection::vec(any::<u8>(), 0..248),
            extra in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let packet = packet_with_variable(&variable);
            let result = parse(&packet);
            if let Err(err) = result {
                prop_assert!(matches!(
                    err,
                    X224Error::MalformedCookie | X224Error::MalformedNegotiation
                ));
            }
            let mut longer = packet.clone();
            longer.extend(&extra);
            prop_assert_eq!(parse(&longer), result);
        }

        /// build_connection_request then parse gives back the hint and protocols.
        #[test]
        fn build_parse_round_trip(
            (hint, line) in hint_and_line(),
            protocols in proptest::option::of(any::<u32>()),
        ) {
            let packet = build_connection_request(line.as_deref(), protocols);
            let req = complete(&packet);
            prop_assert_eq!(req, ConnectionRequest {
                packet_len: packet.len(),
                hint,
                requested_protocols: protocols,
                trailing_bytes: 0,
            });
            for n in 0..packet.len() {
                let prefix = parse(&packet[..n]);
                prop_assert!(matches!(prefix, Ok(Parsed::NeedMore { .. })), "prefix {}: {:?}", n, prefix);
            }
        }

        /// Routing tokens round-trip for every address.
        #[test]
        fn routing_token_round_trip(ip in any::<u32>(), port in any::<u16>()) {
            let addr = SocketAddrV4::new(Ipv4Addr::from(ip), port);
            let text = encode_routing_token(addr);
            prop_assert_eq!(decode_routing_token(&text), Some(addr));
            prop_assert!(text.ends_with(".0000"));
        }

        /// Decoding never panics, and what decodes re-encodes to the canonical form.
        #[test]
        fn routing_token_decode_arbitrary(text in "[0-9. ]{0,30}|\\PC{0,30}") {
            if let Some(addr) = decode_routing_token(&text) {
                prop_assert_eq!(decode_routing_token(&encode_routing_token(addr)), Some(addr));
            }
        }
    }
}
