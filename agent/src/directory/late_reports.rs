//! Reports that come after their client has left.
//!
//! xrdp runs its reconnect hook (and PAM its logon hook) a moment after the client's
//! connection reached it; a client that drops in that moment is gone before the report comes.
//! The report then names a session that no open front-door connection holds or could hold,
//! and it used to leave the session ACTIVE with nobody connected until its next event. When a
//! front-door connection that could have been that session's client ended shortly before (it
//! held the session, its user was unknown, or a cut cookie named the session's user), the
//! client was that connection: the session is reported, then disconnected at once. A
//! connection whose session a report named while it was open has no report to come and is not
//! remembered. When one open connection could hold the session too, it is matched by
//! elimination as before: a late report of a client that left can then take a connected
//! client's connection (two clients given a collection, the first drops and its logon is
//! reported before the second's), and the second's own report then finds its client gone. Not
//! matching then would cost every retry after a failed password (its connection ended
//! unreported) its match, which is what gives a client that names no user its way back.

use std::collections::VecDeque;

use tsbroker_common::model::user_key;

use super::Table;
use super::cut_guess::CutGuess;
use super::rules::LiveConnection;

/// How long after its end a connection may still be the client of a report (xrdp's hooks run
/// within seconds of the client's connection).
const LATE_REPORT_MS: i64 = 15_000;
/// At most this many ended connections are remembered (a burst of short connections).
const MAX_REMEMBERED: usize = 1_024;

/// A front-door connection that ended, as the matching of late reports needs it.
#[derive(Debug)]
pub(super) struct EndedConnection {
    ended_ms: i64,
    session_id: Option<u32>,
    guess: Option<Box<CutGuess>>,
}

/// A local source reported session `session_id` (a logon or reconnection): the connections
/// holding it have no report still to come.
pub(super) fn reported(table: &mut Table, session_id: u32) {
    for live in table.live.values_mut() {
        if live.session_id == Some(session_id) {
            live.reported = true;
        }
    }
}

/// Remembers connection `live`, which ended at `now`, for [`could_have_been`] — unless a report
/// for it came while it was open.
pub(super) fn remember(table: &mut Table, live: LiveConnection, now: i64) {
    forget_old(&mut table.ended, now);
    if live.reported {
        return;
    }
    if table.ended.len() == MAX_REMEMBERED {
        table.ended.pop_front();
    }
    table.ended.push_back(EndedConnection {
        ended_ms: now,
        session_id: live.session_id,
        guess: live.guess,
    });
}

fn forget_old(ended: &mut VecDeque<EndedConnection>, now: i64) {
    while ended
        .front()
        .is_some_and(|old| now - old.ended_ms > LATE_REPORT_MS)
    {
        ended.pop_front();
    }
}

/// Whether a front-door connection that could have been session `session_id`'s client (one
/// that held it, one whose user was unknown, or one whose cut cookie names its user) ended
/// shortly before `now`.
pub(super) fn could_have_been(table: &mut Table, session_id: u32, now: i64) -> bool {
    forget_old(&mut table.ended, now);
    let Some(record) = table.sessions.get(&session_id) else {
        return false;
    };
    let key = user_key(&record.user_name);
    table.ended.iter().any(|ended| match ended.session_id {
        None => true,
        Some(held) if held == session_id => true,
        Some(_) => ended
            .guess
            .as_ref()
            .is_some_and(|guess| guess.names(&key, &record.domain)),
    })
}
