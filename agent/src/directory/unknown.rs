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
//! be it, that one is. With two or more nothing is matched — the session's leaving is then
//! seen only at its next event, as before — never guessed. A reconnection to a session that a
//! connection matched this way holds means a new client took it over (xrdp drops the old
//! one): the one open connection that could be the new client holds it from then on.

use tsbroker_common::model::SessionEventKind;

use super::rules::LiveConnection;
use super::{Origin, Table};

/// Ties the one open connection that could hold `session_id` to it after a local source
/// reported `kind` for it; nothing when a connection holds it already (unless this is a
/// reconnection and the holders were matched by elimination too) or when none or several
/// could.
pub(super) fn match_connection(table: &mut Table, session_id: u32, kind: SessionEventKind) {
    let mut holders = table
        .live
        .values()
        .filter(|live| live.session_id == Some(session_id))
        .peekable();
    if holders.peek().is_some()
        && !(kind == SessionEventKind::Reconnect && holders.all(|live| live.matched))
    {
        return;
    }
    let candidates: Vec<(u64, LiveConnection)> = table
        .live
        .iter()
        .filter(|(_, live)| could_hold(table, live, session_id))
        .map(|(&attachment, &live)| (attachment, live))
        .take(2)
        .collect();
    let [(attachment, live)] = candidates[..] else {
        if candidates.len() > 1 {
            tracing::debug!(
                session_id,
                "several front-door connections could hold the session: none is matched"
            );
        }
        return;
    };
    if let Some(unconfirmed) = live.session_id {
        // The logon opened under the cookie's name is this one, under PAM's name.
        if let Some(record) = table.sessions.remove(&unconfirmed) {
            table.emit(SessionEventKind::Logoff, &record);
        }
    }
    table.live.insert(
        attachment,
        LiveConnection {
            session_id: Some(session_id),
            pending_logon: false,
            matched: true,
            ..live
        },
    );
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
}

/// Whether `live` could be the connection of session `session_id`: its user is unknown, or it
/// is the logon of another name that nothing confirmed.
fn could_hold(table: &Table, live: &LiveConnection, session_id: u32) -> bool {
    match live.session_id {
        None => true,
        Some(other) => {
            other != session_id
                && live.pending_logon
                && table
                    .sessions
                    .get(&other)
                    .is_some_and(|record| record.unconfirmed && record.origin == Origin::FrontDoor)
        }
    }
}
