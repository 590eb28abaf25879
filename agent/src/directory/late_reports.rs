//! Reports that come after their client has left.
//!
//! xrdp runs its reconnect hook (and PAM its logon hook) a moment after the client's
//! connection reached it; a client that drops in that moment is gone before the report comes.
//! The report then names a session that no open front-door connection holds or could hold,
//! and it used to leave the session ACTIVE with nobody connected until its next event. When a
//! front-door connection that could have been that session's client ended shortly before (it
//! held the session, its user was unknown, or a cut cookie named the session's user), the
//! client was that connection: the session is reported, then disconnected at once.

use std::collections::VecDeque;

use tsbroker_common::model::user_key;

use super::Table;
use super::cut_guess::CutGuess;
use super::rules::LiveConnection;

/// How long after its end a connection may still be the client of a report.
const LATE_REPORT_MS: i64 = 30_000;
/// At most this many ended connections are remembered (a burst of short connections).
const MAX_REMEMBERED: usize = 1_024;

/// A front-door connection that ended, as the matching of late reports needs it.
#[derive(Debug)]
pub(super) struct EndedConnection {
    ended_ms: i64,
    session_id: Option<u32>,
    guess: Option<Box<CutGuess>>,
}

/// Remembers connection `live`, which ended at `now`, for [`client_left`].
pub(super) fn remember(table: &mut Table, live: LiveConnection, now: i64) {
    forget_old(&mut table.ended, now);
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

/// Whether session `session_id`, reported by a local source with no open connection that
/// holds or could hold it, had its client in a connection that ended shortly before.
pub(super) fn client_left(table: &mut Table, session_id: u32, now: i64) -> bool {
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
