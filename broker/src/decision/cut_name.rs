//! A user name cut from an `mstshash` cookie: whether a name can be the start of a longer one,
//! and which user a cut name shared by several users is, told apart by where the client
//! connects from (mstsc cuts `christopher.jones` and `christopher.smith` both to `christoph`;
//! the one of them with a session opened from this client's address is the one coming back).

use crate::store::{SessionRecord, Store, StoreResult};
use std::net::{IpAddr, SocketAddr};

/// mstsc cuts the `mstshash` cookie to this many characters.
const TRUNCATED_COOKIE_CHARS: usize = 9;

/// Most users sharing a cut name that are told apart by the client's address; with more, the
/// name stays ambiguous (each candidate costs one read of its sessions).
const MAX_CANDIDATES: usize = 32;

/// How many users with a cut name's prefix to read: one more than [`MAX_CANDIDATES`], to see
/// that there are too many.
pub const PREFIX_MATCHES_READ: u32 = MAX_CANDIDATES as u32 + 1;

/// Whether a user name the front door flagged as possibly cut can be the start of a longer
/// one: mstsc (and FreeRDP) cut the whole cookie, so with a domain (`CORP\pmil` from
/// `CORP\pmiller`) the name is shorter by the domain and its backslash.
pub fn may_be_cut(user_name: &str, domain: &str, flagged: bool) -> bool {
    let user = user_name.chars().count();
    flagged
        && (user == TRUNCATED_COOKIE_CHARS
            || (!domain.is_empty() && domain.chars().count() + 1 + user == TRUNCATED_COOKIE_CHARS))
}

/// The IP address of an address as sessions and requests carry it: "ip:port", "[v6]:port" or
/// a bare IP (PAM's `PAM_RHOST`); an IPv4 address seen through a dual-stack socket
/// (`::ffff:10.0.0.5`) is that IPv4 address. `None` for anything else (a host name, empty).
pub fn client_ip(address: &str) -> Option<IpAddr> {
    let ip = match address.parse::<SocketAddr>() {
        Ok(socket) => socket.ip(),
        Err(_) => address.parse::<IpAddr>().ok()?,
    };
    Some(ip.to_canonical())
}

/// Of `candidates`, the users whose keys start with a cut name (more than one, as
/// `users_with_prefix` read them with [`PREFIX_MATCHES_READ`]), the one user with a session
/// opened from `client` (an "ip:port"), with that user's sessions. `None` when the client's
/// address is unknown, when no user or several have a session from it, or when there are more
/// than [`MAX_CANDIDATES`].
pub async fn user_by_client(
    store: &dyn Store,
    farm: &str,
    candidates: &[String],
    client: &str,
) -> StoreResult<Option<(String, Vec<SessionRecord>)>> {
    let Some(ip) = client_ip(client) else {
        return Ok(None);
    };
    if candidates.len() > MAX_CANDIDATES {
        return Ok(None);
    }
    let mut found = None;
    for user_key in candidates {
        let sessions = store.user_sessions(farm, user_key).await?;
        if !sessions_from(&sessions, ip) {
            continue;
        }
        if found.is_some() {
            return Ok(None);
        }
        found = Some((user_key.clone(), sessions));
    }
    Ok(found)
}

/// Whether any of the sessions was opened (or last reconnected) from `ip`.
fn sessions_from(sessions: &[SessionRecord], ip: IpAddr) -> bool {
    sessions
        .iter()
        .any(|session| client_ip(&session.client_address) == Some(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flagged_name_may_be_cut_only_at_the_cookies_length() {
        assert!(may_be_cut("alexander", "", true));
        assert!(may_be_cut("pmil", "CORP", true));
        assert!(may_be_cut("alexander", "CORP", true));
        assert!(!may_be_cut("pmil", "", true));
        assert!(!may_be_cut("pmill", "CORP", true));
        assert!(!may_be_cut("alexander", "", false));
        assert!(!may_be_cut("pmil", "CORP", false));
    }

    #[test]
    fn client_addresses_are_compared_by_ip() {
        let v4: IpAddr = "10.0.0.5".parse().unwrap();
        assert_eq!(client_ip("10.0.0.5:51234"), Some(v4));
        assert_eq!(client_ip("10.0.0.5"), Some(v4));
        assert_eq!(client_ip("[::ffff:10.0.0.5]:3389"), Some(v4));
        assert_eq!(client_ip("::ffff:10.0.0.5"), Some(v4));
        assert_eq!(
            client_ip("[2001:db8::7]:40000"),
            Some("2001:db8::7".parse().unwrap())
        );
        assert_eq!(client_ip(""), None);
        assert_eq!(client_ip("laptop.example.com:3389"), None);
    }
}
