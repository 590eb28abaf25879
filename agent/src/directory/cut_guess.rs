//! Connections tied to a session by a cookie that may be cut: a guess, which a local source's
//! report of another session the cookie names moves.
//!
//! mstsc cuts the cookie to 9 characters, so `christoph` is both what `christopher.jones`
//! sends and the whole name of a user `christoph`. The front door ties such a connection to a
//! session the cookie names (the broker sent the client here to return to it; among several
//! users', the one opened from the client's address, else the newest), and the session shows
//! ACTIVE with the client's address. When a local source then reports a logon or reconnection
//! of another user the cookie names (`christoph`'s logon, `christopher.jones`'s reconnection)
//! for a session no connection holds, and the guessed connection is the only one open that
//! could be it (see `unknown.rs`), the guess was wrong: the connection holds that session, and
//! the session it was tied to gets back the address it had and goes back to DISCONNECTED
//! (unless another client still holds it). Without this the other user's session stayed ACTIVE
//! with the client's address while they were connected, and the client's own session stayed
//! ACTIVE after they left, with nothing to say so. The connection stays a guess where it was
//! moved to (a report of the first session may still move it back), until a local source
//! reports a reconnection of the session it holds.

use tsbroker_common::model::{SessionEventKind, user_key};

use super::rules::{CookieName, LiveConnection, domains_agree};
use super::{RecordState, SessionRecord, Table};

/// A connection's tie to a session made by a cookie that may be cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CutGuess {
    cookie: CookieName,
    domain: String,
    /// The session's client address before the connection lent it its own.
    replaced_address: String,
}

impl CutGuess {
    /// The guess in tying a connection with `cookie` (of `domain`) to a session it returns to,
    /// whose client address was `address`: `None` when the cookie cannot have been cut.
    pub(super) fn new(cookie: &CookieName, domain: &str, address: &str) -> Option<Box<Self>> {
        cookie.may_be_cut().then(|| {
            Box::new(CutGuess {
                cookie: cookie.clone(),
                domain: domain.to_owned(),
                replaced_address: address.to_owned(),
            })
        })
    }

    /// Whether the guess's cookie names the user whose key is `key`, of `domain`.
    pub(super) fn names(&self, key: &str, domain: &str) -> bool {
        domains_agree(&self.domain, domain) && self.cookie.names(key)
    }
}

/// Whether `live`, tied by a guess to a session, could be the connection of session
/// `session_id`, another user's, instead: its cookie names that user too.
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
        && guess.names(&new_key, &new.domain)
}

/// The guess of connection `live` moves to session `session_id` (which it could be instead):
/// the session it leaves gets back the address the connection replaced (when it still has the
/// connection's), and the guess remembers the address of the session it moves to. Returns the
/// moved guess and whether the left session's address changed.
pub(super) fn move_to(
    table: &mut Table,
    live: &LiveConnection,
    session_id: u32,
) -> (Option<Box<CutGuess>>, bool) {
    let Some(guess) = &live.guess else {
        return (None, false);
    };
    let moved = Box::new(CutGuess {
        replaced_address: table
            .sessions
            .get(&session_id)
            .map(|record| record.client_address.clone())
            .unwrap_or_default(),
        ..CutGuess::clone(guess)
    });
    let Some(left) = live.session_id.and_then(|id| table.sessions.get_mut(&id)) else {
        return (Some(moved), false);
    };
    let lent = live.client.map(|client| client.to_string());
    let restored = lent.as_deref() == Some(left.client_address.as_str())
        && left.client_address != guess.replaced_address;
    if restored {
        left.client_address.clone_from(&guess.replaced_address);
    }
    tracing::info!(
        session_id = left.session_id,
        user = %left.user_name,
        "a cookie that may be cut tied a connection to this session, but a local source \
         reported another user's session it names: the connection is that one's"
    );
    (Some(moved), restored)
}

/// The client address of `record` to keep in a new guess about it: the one it had before open
/// connections' guesses lent it theirs, when every connection holding it is such a guess
/// (several clients with one cut cookie), else the one it has.
pub(super) fn address_before_guesses(table: &Table, record: &SessionRecord) -> String {
    let mut guesses: Vec<(u64, &CutGuess)> = Vec::new();
    for (&attachment, live) in &table.live {
        match (&live.guess, live.session_id == Some(record.session_id)) {
            (_, false) => {}
            (Some(guess), true) => guesses.push((attachment, guess)),
            (None, true) => return record.client_address.clone(),
        }
    }
    guesses
        .into_iter()
        .min_by_key(|(attachment, _)| *attachment)
        .map_or_else(
            || record.client_address.clone(),
            |(_, guess)| guess.replaced_address.clone(),
        )
}

/// Connection `live` (number `attachment`), tied by a guess, is ending while a local source's
/// report of another session its cookie names could be its own (several connections could
/// be that one, so none was moved: `unknown.rs`): the guess is in doubt. When it is the last
/// connection holding its session and lent the session its address, the session gets back
/// the address it had before, which the disconnection then tells the broker: else the
/// address of a client that may have been a newcomer stayed on it, and sent that client back
/// to this session.
pub(super) fn give_back_address(table: &mut Table, attachment: u64, live: &LiveConnection) {
    let (Some(guess), Some(session_id)) = (&live.guess, live.session_id) else {
        return;
    };
    let in_doubt = table
        .unheld
        .values()
        .any(|candidates| candidates.contains(&attachment));
    let others_hold = table.is_held(session_id);
    if !in_doubt || others_hold {
        return;
    }
    let lent = live.client.map(|client| client.to_string());
    let Some(record) = table.sessions.get_mut(&session_id) else {
        return;
    };
    let disconnects = record.attachment == attachment && record.state == RecordState::Active;
    if disconnects && lent.as_deref() == Some(record.client_address.as_str()) {
        tracing::info!(
            session_id,
            user = %record.user_name,
            "a connection a cookie that may be cut tied to this session ended while another \
             session it names could have been its client's: the session's address before it \
             is given back"
        );
        record.client_address.clone_from(&guess.replaced_address);
    }
}

/// Tells the broker the session's address changed (after [`move_to`]), when nothing else did:
/// an event of the state it is in.
pub(super) fn say_address(table: &mut Table, session_id: u32) {
    let Some(record) = table.sessions.get(&session_id).cloned() else {
        return;
    };
    let kind = match record.state {
        RecordState::Active => SessionEventKind::Reconnect,
        RecordState::Disconnected => SessionEventKind::Disconnect,
    };
    table.emit(kind, &record);
}

/// A local source reported `session_id` reconnected: the one connection holding it, if tied
/// by a guess, was right — unless a guess tied another open connection elsewhere whose cookie
/// names this session's user too (two clients with one cut cookie came back at once, each
/// tied to the other's session: which one reconnected is not known). Returns the confirmed
/// connection's client address, when known.
pub(super) fn confirm(table: &mut Table, session_id: u32) -> Option<String> {
    let mut holders = table
        .live
        .iter()
        .filter(|(_, live)| live.session_id == Some(session_id));
    let (Some((&only, _)), None) = (holders.next(), holders.next()) else {
        return None;
    };
    let in_doubt = table
        .live
        .iter()
        .any(|(&attachment, live)| attachment != only && could_be_instead(table, live, session_id));
    if in_doubt {
        return None;
    }
    let only = table.live.get_mut(&only)?;
    only.guess = None;
    only.client.map(|client| client.to_string())
}
