//! A user name cut from an `mstshash` cookie: whether a name can be the start of a longer one,
//! and which user a cut name shared by several users is, told apart by where the client
//! connects from (mstsc cuts `christopher.jones` and `christopher.smith` both to `christoph`;
//! the one of them with a session opened from this client's address is the one coming back).

use crate::store::{SessionRecord, Store, StoreResult};
use tsbroker_common::model::client_ip;

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
