//! A user name cut from an `mstshash` cookie: whether a name can be the start of a longer one,
//! and which user a cut name shared by several users is, told apart by where the client
//! connects from (mstsc cuts `christopher.jones` and `christopher.smith` both to `christoph`;
//! the one of them with a session opened from this client's address is the one coming back).

use std::borrow::Cow;

use super::RedirectQuery;
use crate::store::{SessionRecord, Store, StoreResult};
use tsbroker_common::model::{self, client_ip};

/// mstsc cuts the `mstshash` cookie to this many characters.
const TRUNCATED_COOKIE_CHARS: usize = 9;

/// Most sessions of the users sharing a cut name read to tell them apart by the client's
/// address (a bound on a request's work; a cut name is 9 characters long).
const MAX_SESSIONS_READ: u32 = 10_000;

/// Whether a user name the front door flagged as possibly cut can be the start of a longer
/// one: mstsc (and FreeRDP) cut the whole cookie, so with a domain (`CORP\pmil` from
/// `CORP\pmiller`) the name is shorter by the domain and its backslash.
pub fn may_be_cut(user_name: &str, domain: &str, flagged: bool) -> bool {
    let user = user_name.chars().count();
    flagged
        && (user == TRUNCATED_COOKIE_CHARS
            || (!domain.is_empty() && domain.chars().count() + 1 + user == TRUNCATED_COOKIE_CHARS))
}

/// The key a new logon of `user_key` (the user the decision found for `query`) is held under
/// while in flight: the user's own — but for a name flagged as possibly cut that is no known
/// user's, the cut name with the client's IP. People who share a cut name (everyone of a
/// domain of 9 characters or more: mstsc sends `CORPORATE\jsmith` as `CORPORATE`) are then
/// not taken for one user's retries and all sent to the first one's machine, while one
/// client's retries still are.
pub fn logon_key<'a>(query: &RedirectQuery, user_key: &'a str) -> Cow<'a, str> {
    let unresolved_cut = may_be_cut(
        &query.user_name,
        &query.domain,
        query.user_name_may_be_truncated,
    ) && user_key == model::user_key(&query.user_name);
    match unresolved_cut.then(|| client_ip(&query.client_address)) {
        Some(Some(ip)) => Cow::Owned(cut_logon_key(user_key, ip)),
        _ => Cow::Borrowed(user_key),
    }
}

/// [`logon_key`] of a cut name that is no known user's, from the client's `ip`.
fn cut_logon_key(user_key: &str, ip: std::net::IpAddr) -> String {
    format!("{user_key} from {ip}")
}

/// The key a logon in flight may be held under for a session of `user_name` (of `domain`)
/// opened from `client_address`, besides the user's own: a front door hands a new user whose
/// cookie may be cut to its RDP service and reports the session under that cut name, which
/// must end the logon in flight [`logon_key`] holds for it (else it would hold a place in the
/// machine's cap of logons in flight for its whole time to live). `None` for a name that
/// cannot be cut, or without the client's address.
pub fn cut_logon_key_of_session(
    user_name: &str,
    domain: &str,
    client_address: &str,
) -> Option<String> {
    if !may_be_cut(user_name, domain, true) {
        return None;
    }
    let ip = client_ip(client_address)?;
    Some(cut_logon_key(&model::user_key(user_name), ip))
}

/// The one user whose key starts with the cut `prefix` and who has a session opened (or last
/// reconnected) from `client` (an "ip:port"), with that user's sessions. `None` when the
/// client's address is unknown, or when no user or several have such a session.
pub async fn user_by_client(
    store: &dyn Store,
    farm: &str,
    prefix: &str,
    client: &str,
) -> StoreResult<Option<(String, Vec<SessionRecord>)>> {
    let Some(ip) = client_ip(client) else {
        return Ok(None);
    };
    let addresses = store
        .client_addresses_with_prefix(farm, prefix, MAX_SESSIONS_READ)
        .await?;
    let mut found: Option<String> = None;
    for (user_key, _) in addresses
        .into_iter()
        .filter(|(_, address)| client_ip(address) == Some(ip))
    {
        match &found {
            Some(seen) if *seen != user_key => return Ok(None),
            Some(_) => {}
            None => found = Some(user_key),
        }
    }
    let Some(user_key) = found else {
        return Ok(None);
    };
    let sessions = store.user_sessions(farm, &user_key).await?;
    Ok(Some((user_key, sessions)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_name_that_is_no_users_is_held_with_the_clients_address() {
        let query = |user: &str, flagged: bool, client: &str| RedirectQuery {
            user_name: user.into(),
            user_name_may_be_truncated: flagged,
            client_address: client.into(),
            ..Default::default()
        };
        let cut = query("CORPORATE", true, "10.0.0.7:50123");
        assert_eq!(logon_key(&cut, "corporate"), "corporate from 10.0.0.7");
        // Resolved to a user: that user's.
        assert_eq!(logon_key(&cut, "corporate.jones"), "corporate.jones");
        // Not flagged, or no address to tell clients apart: the name's.
        assert_eq!(
            logon_key(&query("CORPORATE", false, "10.0.0.7:1"), "corporate"),
            "corporate"
        );
        assert_eq!(
            logon_key(&query("CORPORATE", true, ""), "corporate"),
            "corporate"
        );
    }

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
}
