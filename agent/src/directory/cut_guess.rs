//! Connections tied to a session by a cookie that may be cut: a guess, undone when a local
//! source shows the client was someone else.
//!
//! mstsc cuts the cookie to 9 characters, so `christoph` is both what `christopher` sends and
//! the whole name of a user `christoph`. The front door ties such a connection to the session
//! the cookie may name (`christopher`'s: the broker sent the client here to return to it), and
//! the session shows ACTIVE with the client's address. When a local source (PAM) then reports
//! a logon of another user the cookie also names (`christoph`) that no connection holds, the
//! guess was wrong: the connection is that logon's (it is the only one open that could be, see
//! `unknown.rs`), and the session it was tied to goes back to the address it had and to
//! DISCONNECTED (unless another client still holds it). Without this the other user's session
//! stayed ACTIVE with the newcomer's address while they were connected, and the newcomer's
//! own session stayed ACTIVE after they left, with nothing to say so.

use tsbroker_common::model::user_key;

use super::Table;
use super::rules::{CookieName, LiveConnection, domains_match};

/// A connection's tie to another user's session made by a cut cookie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CutGuess {
    cookie: CookieName,
    domain: String,
    /// The session's client address before the connection lent it its own.
    replaced_address: String,
}

impl CutGuess {
    /// The guess in tying a connection with `cookie` (of `domain`) to the session of
    /// `user_name` whose client address was `address`: `None` when the cookie names that user
    /// in full (not a guess).
    pub(super) fn new(
        cookie: &CookieName,
        domain: &str,
        user_name: &str,
        address: &str,
    ) -> Option<Box<Self>> {
        cookie.names_only_by_prefix(&user_key(user_name)).then(|| {
            Box::new(CutGuess {
                cookie: cookie.clone(),
                domain: domain.to_owned(),
                replaced_address: address.to_owned(),
            })
        })
    }
}

/// Whether `live`, tied by a guess to another user's session, could be the connection of
/// session `session_id` of a third user instead: its cookie names that session's user too.
pub(super) fn could_be_instead(table: &Table, live: &LiveConnection, session_id: u32) -> bool {
    let (Some(guess), Some(guessed), Some(new)) = (
        &live.guess,
        live.session_id.and_then(|id| table.sessions.get(&id)),
        table.sessions.get(&session_id),
    ) else {
        return false;
    };
    let new_key = user_key(&new.user_name);
    live.session_id != Some(session_id)
        && user_key(&guessed.user_name) != new_key
        && domains_match(new, &guess.domain)
        && guess.cookie.names(&new_key)
}

/// The guess that tied a connection to session `session_id` was wrong: the session gets back
/// the client address the connection replaced (when it still has the connection's).
pub(super) fn undo(table: &mut Table, session_id: u32, live: &LiveConnection) {
    let (Some(guess), Some(record)) = (&live.guess, table.sessions.get_mut(&session_id)) else {
        return;
    };
    let lent = live.client.map(|client| client.to_string());
    if lent.as_deref() == Some(record.client_address.as_str()) {
        record.client_address.clone_from(&guess.replaced_address);
    }
    tracing::info!(
        session_id,
        user = %record.user_name,
        "a cut cookie tied a connection to this session, but a local source reported the \
         logon of another user it names: the connection is that user's"
    );
}

/// A local source reported `session_id` reconnected: the one connection holding it, if tied
/// by a guess, was right.
pub(super) fn confirm(table: &mut Table, session_id: u32) {
    let mut holders = table
        .live
        .values_mut()
        .filter(|live| live.session_id == Some(session_id));
    if let (Some(only), None) = (holders.next(), holders.next()) {
        only.guess = None;
    }
}
