//! The parser against the specification's example, packets captured from real clients, hand-built
//! packets and arbitrary bytes.

use super::*;
use proptest::prelude::*;

/// The annotated dump of MS-RDPBCGR 4.1.1 (cookie `mstshash=eltons`, PROTOCOL_RDP).
const SPEC_EXAMPLE: [u8; 44] = [
    0x03, 0x00, 0x00, 0x2c, 0x27, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x43, 0x6f, 0x6f, 0x6b, 0x69,
    0x65, 0x3a, 0x20, 0x6d, 0x73, 0x74, 0x73, 0x68, 0x61, 0x73, 0x68, 0x3d, 0x65, 0x6c, 0x74, 0x6f,
    0x6e, 0x73, 0x0d, 0x0a, 0x01, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00,
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
            unusual_case: false,
        }
    );
}

/// The builder reproduces the spec example byte for byte.
#[test]
fn builder_matches_spec_example() {
    let built = build_connection_request(Some("Cookie: mstshash=eltons"), Some(PROTOCOL_RDP));
    assert_eq!(built, SPEC_EXAMPLE);
}

/// First packets captured from Debian 12's clients (a listener that saved what they sent):
/// rdesktop 1.9.0 keeps `-u DOMAIN\user` raw and never truncates; xfreerdp 2.11 splits the
/// domain off `/u:DOMAIN\user` but sends `/u:user@domain` whole, and given `/load-balance-info`
/// sends that line instead of any user cookie. Each asks for TLS and CredSSP, and the builder
/// reproduces each byte for byte.
#[test]
fn captured_client_packets() {
    let tls_and_credssp = PROTOCOL_SSL | PROTOCOL_HYBRID;
    let captured: [(&str, &[u8], &str, RoutingHint); 5] = [
        (
            "rdesktop -u 'CORP\\alice'",
            b"\x03\x00\x00\x30\x2b\xe0\x00\x00\x00\x00\x00Cookie: mstshash=CORP\\alice\r\n\
              \x01\x00\x08\x00\x03\x00\x00\x00",
            "Cookie: mstshash=CORP\\alice",
            RoutingHint::UserName("CORP\\alice".into()),
        ),
        (
            "rdesktop -d CORP -u averyveryverylongusername",
            b"\x03\x00\x00\x3f\x3a\xe0\x00\x00\x00\x00\x00\
              Cookie: mstshash=averyveryverylongusername\r\n\x01\x00\x08\x00\x03\x00\x00\x00",
            "Cookie: mstshash=averyveryverylongusername",
            RoutingHint::UserName("averyveryverylongusername".into()),
        ),
        (
            "xfreerdp /u:'CORP\\alice'",
            b"\x03\x00\x00\x2b\x26\xe0\x00\x00\x00\x00\x00Cookie: mstshash=alice\r\n\
              \x01\x00\x08\x00\x03\x00\x00\x00",
            "Cookie: mstshash=alice",
            RoutingHint::UserName("alice".into()),
        ),
        (
            "xfreerdp /u:alice@corp.example.com",
            b"\x03\x00\x00\x3c\x37\xe0\x00\x00\x00\x00\x00\
              Cookie: mstshash=alice@corp.example.com\r\n\x01\x00\x08\x00\x03\x00\x00\x00",
            "Cookie: mstshash=alice@corp.example.com",
            RoutingHint::UserName("alice@corp.example.com".into()),
        ),
        (
            "xfreerdp /u:alice /d:CORP /load-balance-info:'tsv://MS Terminal Services Plugin.1.Sales'",
            b"\x03\x00\x00\x3e\x39\xe0\x00\x00\x00\x00\x00\
              tsv://MS Terminal Services Plugin.1.Sales\r\n\x01\x00\x08\x00\x03\x00\x00\x00",
            "tsv://MS Terminal Services Plugin.1.Sales",
            RoutingHint::Collection("Sales".into()),
        ),
    ];
    for (client, packet, line, hint) in captured {
        let req = complete(packet);
        assert_eq!(req.hint, hint, "{client}");
        assert_eq!(req.requested_protocols, Some(tls_and_credssp), "{client}");
        assert_eq!(req.packet_len, packet.len(), "{client}");
        assert_eq!(req.trailing_bytes, 0, "{client}");
        assert_eq!(
            build_connection_request(Some(line), Some(tls_and_credssp)),
            packet,
            "{client}"
        );
    }
}

/// First packets of FreeRDP 3.10's xfreerdp3 (Debian 12's bookworm-backports), captured as
/// above: for `/u:`, `/d:`, `/u:DOMAIN\user`, `/u:user@domain` and `/load-balance-info` the
/// same bytes as xfreerdp 2.11. Without `/u:` it sends the local account's name; `/sec:tls`
/// asks for TLS alone, and `/sec:rdp` sends no rdpNegReq at all (Standard RDP Security).
#[test]
fn captured_freerdp3_packets() {
    let captured: [(&str, &[u8], RoutingHint, Option<u32>); 3] = [
        (
            "xfreerdp3 /p:x (as root)",
            b"\x03\x00\x00\x2a\x25\xe0\x00\x00\x00\x00\x00Cookie: mstshash=root\r\n\
              \x01\x00\x08\x00\x03\x00\x00\x00",
            RoutingHint::UserName("root".into()),
            Some(PROTOCOL_SSL | PROTOCOL_HYBRID),
        ),
        (
            "xfreerdp3 /u:alice /sec:tls",
            b"\x03\x00\x00\x2b\x26\xe0\x00\x00\x00\x00\x00Cookie: mstshash=alice\r\n\
              \x01\x00\x08\x00\x01\x00\x00\x00",
            RoutingHint::UserName("alice".into()),
            Some(PROTOCOL_SSL),
        ),
        (
            "xfreerdp3 /u:alice /sec:rdp",
            b"\x03\x00\x00\x23\x1e\xe0\x00\x00\x00\x00\x00Cookie: mstshash=alice\r\n",
            RoutingHint::UserName("alice".into()),
            None,
        ),
    ];
    for (client, packet, hint, protocols) in captured {
        let req = complete(packet);
        assert_eq!(req.hint, hint, "{client}");
        assert_eq!(req.requested_protocols, protocols, "{client}");
        assert_eq!(req.packet_len, packet.len(), "{client}");
        assert_eq!(req.trailing_bytes, 0, "{client}");
    }
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

/// The `Cookie: ` prefix and the keys are matched case-insensitively (as xrdp does); the
/// space after the colon is required.
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
        RoutingHint::UserName("alice".into())
    );
    assert_eq!(
        hint_of("COOKIE: msts=3640205228.15629.0000"),
        RoutingHint::RoutingToken("172.31.249.216:3389".parse().unwrap())
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

/// A UTF-8 name whose bytes were cut inside its last character loses that character only;
/// one ANSI byte after ASCII is still Latin-1.
#[test]
fn user_name_utf8_cut_inside_a_character() {
    let mut line = b"Cookie: mstshash=".to_vec();
    line.extend_from_slice(&"Александров".as_bytes()[..9]);
    line.extend_from_slice(b"\r\n");
    let req = complete(&packet_with_variable(&line));
    assert_eq!(req.hint, RoutingHint::UserName("Алек".into()));
    let mut line = b"Cookie: mstshash=jos".to_vec();
    line.push(0xE9); // 'é' in Windows-1252, a UTF-8 lead byte
    line.extend_from_slice(b"\r\n");
    let req = complete(&packet_with_variable(&line));
    assert_eq!(req.hint, RoutingHint::UserName("josé".into()));
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

/// The first CR LF ends the line; a lone CR inside it is a control character.
#[test]
fn first_crlf_ends_line() {
    let req = complete(&build_connection_request(
        Some("Cookie: mstshash=ab"),
        Some(1),
    ));
    assert_eq!(req.hint, RoutingHint::UserName("ab".into()));
    assert_eq!(req.requested_protocols, Some(1));
    let packet = build_connection_request(Some("Cookie: mstshash=a\rb\r"), Some(1));
    assert_eq!(
        parse(&packet).map(|_| ()),
        Err(X224Error::ControlCharacterInCookie)
    );
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
    let other = Err(X224Error::NotTpkt(LooksLike::Other));
    assert_eq!(parse(&[2]), other);
    let tls = parse(&[0x16, 0x03, 0x01]);
    assert_eq!(tls, Err(X224Error::NotTpkt(LooksLike::TlsHandshake)));
    assert!(tls.unwrap_err().to_string().contains("tls handshake"));
    let http = parse(b"GET / HTTP/1.1\r\n");
    assert_eq!(http, Err(X224Error::NotTpkt(LooksLike::Text)));
    assert!(http.unwrap_err().to_string().contains("http request"));
    assert_eq!(parse(&[3, 1]), other);
    let mut packet = SPEC_EXAMPLE;
    packet[1] = 0x80;
    assert_eq!(parse(&packet), other);
}

/// A TPKT length above the limit is rejected from the header alone.
#[test]
fn too_large() {
    assert_eq!(parse(&[3, 0, 0x10, 0x01]), Err(X224Error::TooLarge(4097)));
    assert_eq!(parse(&[3, 0, 0x01, 0x04]), Err(X224Error::TooLarge(260)));
    assert_eq!(
        parse(&[3, 0, 0xFF, 0xFF, 0xFA]),
        Err(X224Error::TooLarge(65535))
    );
    // At the limit the header alone is fine; the length indicator must then be 254.
    assert_eq!(
        parse(&[3, 0, 0x01, 0x03]),
        Ok(Parsed::NeedMore { at_least: 259 })
    );
    assert_eq!(
        parse(&[3, 0, 0x01, 0x03, 200]),
        Err(X224Error::BadLengthIndicator)
    );
    assert_eq!(
        parse(&[3, 0, 0x01, 0x03, 0xFF]),
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
    // TPKT length 260 would need the reserved LI 255: refused from the header alone.
    let mut packet = vec![3, 0, 1, 4, 0xFF, 0xE0];
    packet.resize(260, b'a');
    assert_eq!(parse(&packet), Err(X224Error::TooLarge(260)));
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
        X224Error::NotTpkt(LooksLike::TlsHandshake),
        X224Error::NotTpkt(LooksLike::Text),
        X224Error::TooLarge(5000),
        X224Error::TooShort,
        X224Error::NotConnectionRequest(0xD0),
        X224Error::BadLengthIndicator,
        X224Error::MalformedCookie,
        X224Error::ControlCharacterInCookie,
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
                X224Error::MalformedCookie
                    | X224Error::ControlCharacterInCookie
                    | X224Error::MalformedNegotiation
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
            unusual_case: false,
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

/// A control character in the cookie line (a lone LF that would start a forged log line, an
/// escape sequence, NUL, TAB) makes the request invalid: no client sends one.
#[test]
fn control_characters_in_the_cookie_line() {
    for line in [
        &b"Cookie: mstshash=x\nFORGED LINE\r\n"[..],
        b"Cookie: mstshash=ali\x1b[31mce\r\n",
        b"Cookie: mstshash=al\x00ice\r\n",
        b"Cookie: mstshash=al\tice\r\n",
        b"Cookie: msts=168624255.24024.0000\x7f\r\n",
        b"tsv://MS Terminal Services Plugin.1.farm\x07\r\n",
    ] {
        assert_eq!(
            parse(&packet_with_variable(line)).map(|_| ()),
            Err(X224Error::ControlCharacterInCookie),
            "{line:?}"
        );
    }
}

#[test]
fn requests_no_client_sends_have_an_oddity() {
    let oddity = |packet: &[u8]| match parse(packet).unwrap() {
        Parsed::Complete(request) => request.oddity(),
        Parsed::NeedMore { .. } => panic!("incomplete"),
    };
    let usual = [
        build_connection_request(Some("Cookie: mstshash=alice"), Some(PROTOCOL_HYBRID)),
        build_connection_request(Some("Cookie: msts=16777343.15629.0000"), None),
        build_connection_request(Some("tsv://MS Terminal Services Plugin.1.farm"), Some(3)),
        build_connection_request(None, Some(PROTOCOL_SSL)),
        build_connection_request(None, None),
    ];
    for packet in &usual {
        assert_eq!(oddity(packet), None, "{packet:?}");
    }
    let unrecognized = build_connection_request(Some("Cookie:mstshash=x"), Some(3));
    assert!(oddity(&unrecognized).unwrap().contains("unrecognized"));
    let empty_name = build_connection_request(Some("Cookie: mstshash="), Some(3));
    assert!(oddity(&empty_name).unwrap().contains("unrecognized"));
    for other_case in [
        "cookie: mstshash=alice",
        "Cookie: MSTSHASH=alice",
        "COOKIE: msts=16777343.15629.0000",
        "TSV://MS Terminal Services Plugin.1.farm",
    ] {
        let packet = build_connection_request(Some(other_case), Some(3));
        assert!(
            oddity(&packet).unwrap().contains("another case"),
            "{other_case}"
        );
    }
    let mut two_lines = build_connection_request(Some("Cookie: mstshash=a"), None);
    two_lines.extend_from_slice(b"Cookie: mstshash=b\r\n");
    let total = u16::try_from(two_lines.len()).unwrap();
    two_lines[2..4].copy_from_slice(&total.to_be_bytes());
    two_lines[4] = u8::try_from(two_lines.len() - 5).unwrap();
    assert!(oddity(&two_lines).unwrap().contains("unknown bytes"));
}
