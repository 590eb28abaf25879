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
//! Case: the `Cookie: ` prefix (as MS-RDPBCGR and the LoadBalanceInfo documentation spell it),
//! the keys `mstshash=` and `msts=` and the `tsv://MS Terminal Services Plugin.1.` prefix are
//! all matched ASCII-case-insensitively, as xrdp does: some clients and tools are known to write
//! `MSTS=` or `cookie:`, the values are only routing hints (the terminal server still
//! authenticates the user, and the agent only connects to machines of its farm), so tolerance
//! costs nothing while strictness would misroute such clients.

use std::net::{Ipv4Addr, SocketAddrV4};

/// Largest TPKT length accepted: the TPKT header and a length indicator of at most 254 with
/// the byte it counts from. A larger one is rejected with [`X224Error::TooLarge`] from the
/// header alone, without waiting for the bytes it announces.
pub const MAX_REQUEST_LEN: usize = TPKT_HEADER_LEN + 1 + MAX_LENGTH_INDICATOR as usize;

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
/// The user-name cookie's and the routing token's beginnings as MS-RDPBCGR spells them.
const USER_NAME_PREFIX: &[u8] = b"Cookie: mstshash=";
const ROUTING_TOKEN_PREFIX: &[u8] = b"Cookie: msts=";
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
    /// The cookie's or token's fixed words in another case than MS-RDPBCGR spells them
    /// (`cookie: MSTSHASH=`): understood here, refused by some RDP servers.
    pub unusual_case: bool,
}

impl ConnectionRequest {
    /// What about this request, if anything, no RDP client sends: an unrecognized cookie or
    /// routing token line (`Cookie:mstshash=x`, an empty name), or unknown bytes after it (a
    /// second cookie line). Parsed liberally, such a request is sent on, and an RDP service
    /// may close the connection on it without answering while it answers every client's
    /// (FreeRDP's servers close on a cookie spelled in another case).
    pub fn oddity(&self) -> Option<&'static str> {
        if matches!(self.hint, RoutingHint::Unrecognized(_)) {
            Some("an unrecognized cookie or routing token line")
        } else if self.unusual_case {
            Some("a cookie or token spelled in another case than the protocol's")
        } else if self.trailing_bytes > 0 {
            Some("unknown bytes after its cookie and negotiation request")
        } else {
            None
        }
    }
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
    #[error("not a tpkt packet (expected version 3 and a zero reserved byte){0}")]
    NotTpkt(LooksLike),
    /// The TPKT length exceeds [`MAX_REQUEST_LEN`].
    #[error("tpkt length {0} exceeds 259 bytes, the most an x.224 connection request can have")]
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
    /// The cookie or routing token line holds a control character (a lone LF, an escape
    /// sequence, NUL): no client sends one, and it must not reach a log or the broker.
    #[error("cookie or routing token holds a control character")]
    ControlCharacterInCookie,
    /// rdpNegReq or rdpCorrelationInfo is truncated, has a wrong length, or is announced but
    /// missing.
    #[error("malformed rdp negotiation request or correlation info")]
    MalformedNegotiation,
}

/// What a first packet that is not TPKT looks like, said with the error: the two mistakes an
/// operator can fix (a client, gateway or check that speaks TLS or HTTP to the front door).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LooksLike {
    /// A TLS record header (0x16): TLS from the first byte, where RDP starts in the clear.
    TlsHandshake,
    /// An ASCII letter: an HTTP request (a browser, an HTTP health check, an RD Gateway
    /// client), or a PROXY v1 header.
    Text,
    /// Anything else.
    Other,
}

impl LooksLike {
    fn of(buf: &[u8]) -> Self {
        match buf.first() {
            Some(0x16) => LooksLike::TlsHandshake,
            Some(byte) if byte.is_ascii_alphabetic() => LooksLike::Text,
            _ => LooksLike::Other,
        }
    }
}

impl std::fmt::Display for LooksLike {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            LooksLike::TlsHandshake => {
                ": it starts a tls handshake (rdp begins in the clear, and tls follows the \
                 connection request)"
            }
            LooksLike::Text => ": it is text (an http request, or a proxy v1 header?)",
            LooksLike::Other => "",
        })
    }
}

/// Parses the start of a client connection: returns [`Parsed::NeedMore`] while `buf` is a valid
/// but incomplete beginning, the request once the whole TPKT packet is there, or an error as
/// soon as a byte received so far is invalid. Never looks past the TPKT length.
pub fn parse(buf: &[u8]) -> Result<Parsed, X224Error> {
    // Fixed header fields are checked as soon as they arrive, so that garbage (TLS, HTTP, a
    // scanner) is rejected without waiting for the length it claims.
    if buf.first().is_some_and(|&version| version != TPKT_VERSION) {
        return Err(X224Error::NotTpkt(LooksLike::of(buf)));
    }
    if buf.get(1).is_some_and(|&reserved| reserved != 0) {
        return Err(X224Error::NotTpkt(LooksLike::Other));
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
    let unusual_case = match hint {
        RoutingHint::UserName(_) | RoutingHint::RoutingToken(_) | RoutingHint::Collection(_) => {
            ![USER_NAME_PREFIX, ROUTING_TOKEN_PREFIX, COLLECTION_PREFIX]
                .iter()
                .any(|prefix| variable.starts_with(prefix))
        }
        RoutingHint::None | RoutingHint::Unrecognized(_) => false,
    };
    let (requested_protocols, trailing_bytes) = parse_negotiation(after_line)?;
    Ok(Parsed::Complete(ConnectionRequest {
        packet_len,
        hint,
        requested_protocols,
        trailing_bytes,
        unusual_case,
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
            if line.iter().any(u8::is_ascii_control) {
                return Err(X224Error::ControlCharacterInCookie);
            }
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
    if let Some(cookie) = strip_prefix_ignore_ascii_case(line, COOKIE_PREFIX) {
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

/// Decodes a name: UTF-8 when valid — also when only its last character is incomplete after
/// others that are UTF-8's own (a client cut the cookie's bytes inside a character), which is
/// then dropped — else each byte as the Latin-1 character of that value (`jos\xe9` is `josé`).
fn decode_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_owned(),
        Err(error)
            if error.error_len().is_none()
                && bytes
                    .get(..error.valid_up_to())
                    .is_some_and(|whole| !whole.is_ascii()) =>
        {
            let whole = bytes.get(..error.valid_up_to()).unwrap_or_default();
            String::from_utf8_lossy(whole).into_owned()
        }
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
mod tests;
