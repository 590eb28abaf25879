//! Checks on names, addresses and numbers that arrive from the network, with the limits the
//! API documents (see `proto/tsbroker/v1/types.proto`).

use std::fmt;

pub const MAX_FARM_NAME: usize = 64;
pub const MAX_MACHINE_NAME: usize = 253;
pub const MAX_USER_NAME: usize = 256;
pub const MAX_DOMAIN: usize = 256;
pub const MAX_ADDRESS: usize = 300;
pub const MAX_AGENT_VERSION: usize = 64;
pub const MAX_WEIGHT: u32 = 10_000;
pub const DEFAULT_WEIGHT: u32 = 100;

/// A field that failed its check: becomes `INVALID_ARGUMENT` at the service boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    pub field: &'static str,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ValidationError {
            field,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ValidationError {}

impl From<ValidationError> for tonic::Status {
    fn from(error: ValidationError) -> Self {
        tonic::Status::invalid_argument(error.to_string())
    }
}

/// A farm name: 1..64 bytes of ASCII letters, digits, '-', '_' and '.'.
pub fn farm_name(field: &'static str, text: &str) -> Result<String, ValidationError> {
    if text.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if text.len() > MAX_FARM_NAME {
        return Err(ValidationError::new(
            field,
            format!("longer than {MAX_FARM_NAME} bytes"),
        ));
    }
    if let Some(bad) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(ValidationError::new(
            field,
            format!("character {bad:?} not allowed (ASCII letters, digits, '-', '_', '.')"),
        ));
    }
    Ok(text.to_owned())
}

/// A free-form name (machine, user, domain): bounded length, no control characters or
/// surrounding whitespace. `allow_empty` is for optional fields such as the domain.
pub fn plain_name(
    field: &'static str,
    text: &str,
    max_len: usize,
    allow_empty: bool,
) -> Result<String, ValidationError> {
    if text.is_empty() {
        return if allow_empty {
            Ok(String::new())
        } else {
            Err(ValidationError::new(field, "must not be empty"))
        };
    }
    if text.len() > max_len {
        return Err(ValidationError::new(
            field,
            format!("longer than {max_len} bytes"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(ValidationError::new(field, "contains control characters"));
    }
    if text.trim() != text {
        return Err(ValidationError::new(
            field,
            "has leading or trailing whitespace",
        ));
    }
    Ok(text.to_owned())
}

/// A machine name (an FQDN): 1..253 bytes, no whitespace.
pub fn machine_name(field: &'static str, text: &str) -> Result<String, ValidationError> {
    let name = plain_name(field, text, MAX_MACHINE_NAME, false)?;
    if name.chars().any(char::is_whitespace) {
        return Err(ValidationError::new(field, "contains whitespace"));
    }
    Ok(name)
}

pub fn user_name(field: &'static str, text: &str) -> Result<String, ValidationError> {
    plain_name(field, text, MAX_USER_NAME, false)
}

/// A user name the front door flagged as possibly cut from mstsc's 9-character cookie: as
/// [`user_name`], but it may end in whitespace, where the cut fell just after a space
/// (`mary ann ` from `mary ann lee`); the whitespace is kept, as it is part of the prefix.
pub fn cut_user_name(field: &'static str, text: &str) -> Result<String, ValidationError> {
    plain_name(field, text.trim_end(), MAX_USER_NAME, false)?;
    Ok(text.to_owned())
}

pub fn domain(field: &'static str, text: &str) -> Result<String, ValidationError> {
    plain_name(field, text, MAX_DOMAIN, true)
}

/// A "host:port" address with a port in 1..65535; IPv6 hosts in brackets.
pub fn address(field: &'static str, text: &str) -> Result<String, ValidationError> {
    if text.is_empty() {
        return Err(ValidationError::new(field, "must not be empty (host:port)"));
    }
    if text.len() > MAX_ADDRESS {
        return Err(ValidationError::new(
            field,
            format!("longer than {MAX_ADDRESS} bytes"),
        ));
    }
    // `[::1]` or `::1` alone: an IPv6 address without its port.
    let bare_v6 = (text.starts_with('[') && text.ends_with(']'))
        || text.parse::<std::net::Ipv6Addr>().is_ok();
    let Some((host, port)) = text.rsplit_once(':').filter(|_| !bare_v6) else {
        return Err(ValidationError::new(
            field,
            "expected host:port (an IPv6 host in brackets: [::1]:3389)",
        ));
    };
    let port_ok = port.parse::<u16>().is_ok_and(|port| port != 0);
    if !port_ok {
        return Err(ValidationError::new(
            field,
            format!("port {port:?} is not in 1..65535"),
        ));
    }
    let host_ok = !host.is_empty()
        && !host.chars().any(|c| c.is_whitespace() || c.is_control())
        && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
    if !host_ok {
        return Err(ValidationError::new(
            field,
            format!("host {host:?} is not a host name or IP address"),
        ));
    }
    Ok(text.to_owned())
}

/// The IP of a "host:port" whose host is the unspecified address (`0.0.0.0`, `[::]`,
/// `[::ffff:0.0.0.0]`, or a short form the resolver takes for 0.0.0.0: `0`, `0.0`, `0x0`): an
/// address to listen on, never one to connect to.
pub fn unspecified_host(address: &str) -> Option<std::net::IpAddr> {
    let (host, _) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let zeros = host.contains('0') && host.chars().all(|c| matches!(c, '0' | '.' | 'x' | 'X'));
    if zeros {
        return Some(std::net::Ipv4Addr::UNSPECIFIED.into());
    }
    host.parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
        .filter(|ip| ip.is_unspecified())
}

/// A client's address as the front door and PAM give it: "ip:port", "[v6]:port" or a bare IP
/// address (empty: not known), in its canonical form
/// ([`crate::model::canonical_client_address`]). Clients are told apart by it, so what is not
/// an address is refused rather than kept as a string that matches nothing.
pub fn client_address(field: &'static str, text: &str) -> Result<String, ValidationError> {
    if text.is_empty() {
        return Ok(String::new());
    }
    if let Some(canonical) = crate::model::canonical_client_address(text) {
        return Ok(canonical);
    }
    Err(ValidationError::new(
        field,
        format!(
            "{} is not an IP address with a port (\"ip:port\", \"[v6]:port\") or a bare IP address",
            excerpt(text)
        ),
    ))
}

/// A weight in 1..10000; 0 means the default when `zero_is_default`.
pub fn weight(
    field: &'static str,
    value: u32,
    zero_is_default: bool,
) -> Result<u32, ValidationError> {
    match value {
        0 if zero_is_default => Ok(DEFAULT_WEIGHT),
        1..=MAX_WEIGHT => Ok(value),
        _ => Err(ValidationError::new(
            field,
            format!("{value} is not in 1..{MAX_WEIGHT}"),
        )),
    }
}

/// A machine id: a UUID in its usual text form.
pub fn machine_id(field: &'static str, text: &str) -> Result<uuid::Uuid, ValidationError> {
    uuid::Uuid::parse_str(text)
        .map_err(|_| ValidationError::new(field, format!("{} is not a UUID", excerpt(text))))
}

/// A duration in a setting (`100ms`, `30s`, `5m`, `1h 30m`); the error says what one looks
/// like, not only where the parser stopped.
pub fn duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|error| {
        format!(
            "{} is not a duration ({error}): write a number and a unit, such as \"100ms\", \"30s\" \
             or \"5m\"",
            excerpt(text)
        )
    })
}

/// Longest part of a refused value an error message repeats, in characters.
const EXCERPT_CHARS: usize = 64;

/// `text` quoted for an error message, cut to its first [`EXCERPT_CHARS`] characters with its
/// length in bytes after it when longer: a refused 3 MB value is not sent back whole.
pub fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &text[..cut], text.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit_and_say_so() {
        assert_eq!(duration("100ms"), Ok(std::time::Duration::from_millis(100)));
        assert_eq!(duration("1m 30s"), Ok(std::time::Duration::from_secs(90)));
        for bad in ["abc", "100", ""] {
            let error = duration(bad).unwrap_err();
            assert!(error.contains("such as \"100ms\""), "{error}");
        }
    }

    #[test]
    fn client_addresses_are_ip_addresses() {
        for good in ["", "10.0.0.5:4000", "10.0.0.5", "[2001:db8::1]:3389"] {
            assert_eq!(client_address("client_address", good).unwrap(), good);
        }
        // Each client one way, however it was written.
        for (given, canonical) in [
            ("::ffff:10.0.0.5", "10.0.0.5"),
            ("[::ffff:10.0.0.5]:1", "10.0.0.5:1"),
            ("2001:DB8::A", "2001:db8::a"),
            ("[fd00:0:0:0::2]:9", "[fd00::2]:9"),
            ("[fe80::1%2]:5", "[fe80::1%2]:5"),
        ] {
            assert_eq!(client_address("client_address", given).unwrap(), canonical);
        }
        for bad in [
            "garbage",
            "10.0.0.5:99999",
            "10.0.0.5:",
            ":5000",
            "[10.0.0.5]:5",
            "localhost:5000",
            " 10.0.0.5",
        ] {
            let error = client_address("client_address", bad).unwrap_err();
            assert!(
                error.to_string().contains("client_address"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn refused_values_are_repeated_only_in_part() {
        assert_eq!(excerpt("abc"), "\"abc\"");
        let long = "é".repeat(100);
        let shown = excerpt(&long);
        assert!(
            shown.starts_with(&format!("\"{}\"…", "é".repeat(EXCERPT_CHARS))),
            "{shown}"
        );
        assert!(shown.ends_with("(200 bytes)"), "{shown}");
        let error = machine_id("machine_id", &"a".repeat(3_000_000)).unwrap_err();
        assert!(error.to_string().len() < 200, "{error}");
    }

    #[test]
    fn farm_names() {
        assert!(farm_name("farm", "default").is_ok());
        assert!(farm_name("farm", "").is_err());
        assert!(farm_name("farm", "a b").is_err());
        assert!(farm_name("farm", &"x".repeat(65)).is_err());
    }

    #[test]
    fn addresses() {
        assert!(address("a", "ts1.example.com:3389").is_ok());
        assert!(address("a", "[::1]:3389").is_ok());
        assert!(address("a", "ts1").is_err());
        assert!(address("a", "ts1:0").is_err());
        assert!(address("a", "ts1:99999").is_err());
        assert!(address("a", "::1:3389").is_err());
        assert!(address("a", ":3389").is_err());
        for bare in ["[::1]", "::1", "[fd00::2]"] {
            let why = address("a", bare).unwrap_err().to_string();
            assert!(why.contains("expected host:port"), "{bare}: {why}");
        }
    }

    #[test]
    fn names_and_weights() {
        assert!(user_name("u", "alice").is_ok());
        assert!(user_name("u", "").is_err());
        assert!(user_name("u", "al\nice").is_err());
        assert!(user_name("u", " alice").is_err());
        assert_eq!(domain("d", "").unwrap(), "");
        assert!(machine_name("m", "ts 1").is_err());
        assert_eq!(weight("w", 0, true).unwrap(), DEFAULT_WEIGHT);
        assert!(weight("w", 0, false).is_err());
        assert!(weight("w", 10_001, true).is_err());
        assert!(machine_id("id", "nope").is_err());
    }
}
