//! Front-door connections whose user the front door could not tell, matched to the session a
//! local source reports, by elimination.
//!
//! xrdp has no disconnect hook: the table learns that a user left when the front-door
//! connection holding their session ends, and a connection holds a session only once the table
//! can tie the two. A client given a collection (`loadbalanceinfo`, `/load-balance-info`) or a
//! routing token sends no user cookie, and a cookie may name the user otherwise than PAM does
//! (an alias the directory service knows; `ann@example.com` for `ann` is matched by name in
//! `rules.rs`). When a local source (PAM's logon, xrdp's reconnect hook)
//! reports a session that no connection holds, the connection is one of those open to the RDP
//! service that could be it: one whose user is unknown, or the connection of a front-door logon
//! that nothing confirmed under its cookie's name. Every connection to the RDP service comes
//! through the front door (it listens on loopback only), so when exactly one connection could
//! be it, that one is. With two or more nothing is matched — never guessed — and the session
//! is disconnected once they have all ended (its client was one of them). A reconnection to a session that a
//! connection matched this way holds means a new client took it over (xrdp drops the old
//! one): the one open connection that could be the new client holds it from then on.
//!
//! A returning user's connection is tied by its cookie to the session the user had (the one
//! the broker sent them back to), but the RDP service may give the client another one: xrdp
//! starts a new session when the old one is an orphan of a restarted xrdp-sesman, or, under a
//! policy such as `Policy=UBD`, when the client's screen size differs from the disconnected
//! session's. A logon (or reconnection) of that user's another session that no
//! connection holds then takes over the connection the old session last attached, and the old
//! session is disconnected again (unless another client still holds it): else the new
//! session stayed ACTIVE with nobody to say its client left, and the old one took its state.

use tsbroker_common::model::SessionEventKind;

use super::rules::{LiveConnection, connection_left, is_users};
use super::{Origin, RecordState, Table};
use super::{cut_guess, late_reports};

/// Ties the one open connection that could hold `session_id` to it after a local source
/// reported `kind` for it; nothing when a connection holds it already (unless this is a
/// reconnection and the holders were matched by elimination too) or when none or several
/// could. Returns whether the session's client has left: no open connection holds or could
/// hold it, and one that could have ended moments ago without a report of its own (the
/// report is its, late: `late_reports.rs`).
pub(super) fn match_connection(
    table: &mut Table,
    session_id: u32,
    kind: SessionEventKind,
    now: i64,
) -> bool {
    let mut holders = table
        .live
        .values()
        .filter(|live| live.session_id == Some(session_id))
        .peekable();
    let held = holders.peek().is_some();
    if held && !(kind == SessionEventKind::Reconnect && holders.all(|live| live.matched)) {
        return false;
    }
    let candidates: Vec<u64> = table
        .live
        .iter()
        .filter(|(attachment, live)| could_hold(table, **attachment, live, session_id))
        .map(|(&attachment, _)| attachment)
        .collect();
    let [attachment] = candidates[..] else {
        if candidates.is_empty() {
            // The report may be late, its client already gone (not so for a reconnection
            // that a returning client's new device made: see above).
            return !held && late_reports::could_have_been(table, session_id, now);
        }
        tracing::debug!(
            session_id,
            candidates = candidates.len(),
            "several front-door connections could hold the session: none is matched, and \
             the session is disconnected once they have all ended"
        );
        table.unheld.insert(session_id, candidates);
        return false;
    };
    table.unheld.remove(&session_id);
    let Some(live) = table.live.get(&attachment).cloned() else {
        return false;
    };
    let live = &live;
    let moved_from = live.session_id;
    let guessed = cut_guess::could_be_instead(table, live, session_id);
    let (guess, address_restored) = match guessed {
        true => cut_guess::move_to(table, live, session_id),
        false => (None, false),
    };
    if let Some(other) = moved_from {
        let unconfirmed = table
            .sessions
            .get(&other)
            .is_some_and(|record| record.unconfirmed && record.origin == Origin::FrontDoor);
        if unconfirmed {
            // The logon opened under the cookie's name is this one, under PAM's name.
            if let Some(record) = table.sessions.remove(&other) {
                table.emit(SessionEventKind::Logoff, &record);
            }
        }
    }
    table.live.insert(
        attachment,
        LiveConnection {
            session_id: Some(session_id),
            pending_logon: false,
            matched: true,
            guess,
            ..live.clone()
        },
    );
    if let Some(other) = moved_from {
        let released = release(table, other, attachment);
        if address_restored && released != Some(true) {
            cut_guess::say_address(table, other);
        }
        if released.is_some() && !guessed {
            tracing::info!(
                session_id,
                previous_session_id = other,
                "the RDP service gave a returning client another session: its connection holds \
                 that one, and the session it came back for is disconnected again"
            );
        }
    }
    if let Some(record) = table.sessions.get_mut(&session_id) {
        record.attachment = attachment;
        // The front door saw the client; the RDP service behind it (and PAM) saw only the
        // front door. The broker finds a client that names no user by this address.
        if let Some(client) = live.client {
            record.client_address = client.to_string();
        }
        tracing::info!(
            session_id,
            user = %record.user_name,
            "the only front-door connection that could hold the session now does"
        );
    }
    false
}

/// Whether `live` (connection `attachment`) could be the connection of session `session_id`:
/// its user is unknown, it is the logon of another name that nothing confirmed, it was tied to
/// another user's session by a cut cookie that names this session's user too, or it is the
/// connection that last came back to another session of the same user.
fn could_hold(table: &Table, attachment: u64, live: &LiveConnection, session_id: u32) -> bool {
    let Some(other) = live.session_id else {
        return true;
    };
    if other == session_id {
        return false;
    }
    if cut_guess::could_be_instead(table, live, session_id) {
        return true;
    }
    let Some(record) = table.sessions.get(&other) else {
        return false;
    };
    if record.unconfirmed && record.origin == Origin::FrontDoor {
        return live.pending_logon;
    }
    record.attachment == attachment
        && table
            .sessions
            .get(&session_id)
            .is_some_and(|new| is_users(record, &new.user_name, &new.domain))
}

/// Connection `attachment` ended: a session that it and other connections could have held
/// (none matched: see [`match_connection`]), still ACTIVE and held by no connection, is
/// disconnected once the last of them has ended (its client was one of them). Returns whether
/// the table changed.
pub(super) fn candidate_ended(table: &mut Table, attachment: u64, now: i64) -> bool {
    if table.unheld.is_empty() {
        return false;
    }
    let mut settled = Vec::new();
    for (session_id, candidates) in &mut table.unheld {
        candidates.retain(|candidate| *candidate != attachment);
        if candidates.is_empty() {
            settled.push(*session_id);
        }
    }
    let mut changed = false;
    for session_id in settled {
        table.unheld.remove(&session_id);
        let held = table.is_held(session_id);
        let active = table
            .sessions
            .get(&session_id)
            .is_some_and(|record| record.state == RecordState::Active);
        if active && !held {
            tracing::info!(
                session_id,
                "every front-door connection that could hold the session has ended: disconnected"
            );
            changed |= connection_left(table, session_id, now);
        }
    }
    changed
}

/// Session `session_id` is no longer held by connection `attachment` (it holds another one
/// now): see `rules::connection_left`. Returns `None` when it was not this connection's, else
/// whether the session changed (and the broker was told).
fn release(table: &mut Table, session_id: u32, attachment: u64) -> Option<bool> {
    let held = table.sessions.get(&session_id).is_some_and(|record| {
        record.attachment == attachment && record.state == RecordState::Active
    });
    held.then(|| connection_left(table, session_id, tsbroker_common::model::now_millis()))
}
