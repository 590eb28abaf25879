//! The table's rules: which session an event acts on, merging front-door logons with the
//! logons PAM reports, allocating ids, and the events the broker is sent for each change.
//!
//! The front door only knows the user from the client's cookie, a hint anyone can write. The
//! session it records for a new logon is *unconfirmed* until a local session source (the
//! control socket: PAM, the RDP service's scripts, `tsagent session …`) reports an event for
//! it, or until a front-door connection to it lasts the unconfirmed-logon grace. When the
//! connections of an unconfirmed logon all end sooner, the logon failed (NLA refused the
//! password, or the cookie named someone who never logged on): the session is removed and the
//! broker gets a LOGOFF, instead of keeping a disconnected session that would draw the user
//! back here. A reconnection to a session the user already had here is never removed.

use std::net::SocketAddr;
use std::time::Duration;

use tsbroker_common::model::{SessionEventKind, client_ip, upn_user_part, user_key};
use tsbroker_common::validate;

use super::cut_guess::{self, CutGuess};
use super::late_reports;
use super::{
    Attachment, DirectoryError, Origin, RecordState, SessionRecord, SessionRequest,
    TRUNCATED_COOKIE_LEN, Table,
};

/// The request with its names checked. A client address that is not an IP address is left
/// out (with a warning): the session event still counts, where refusing it would lose a logon
/// over an optional detail some PAM stack filled oddly.
pub(super) fn checked(request: SessionRequest) -> Result<SessionRequest, DirectoryError> {
    validate::user_name("user", &request.user_name)
        .map_err(|error| DirectoryError::Invalid(error.to_string()))?;
    checked_but_the_name(request)
}

/// [`checked`], for a front door's cookie: a name that may be cut may end in a space (`mary
/// ann ` of `mary ann lee`), kept to compare, not to name a new session.
pub(super) fn checked_cookie(request: SessionRequest) -> Result<SessionRequest, DirectoryError> {
    if cookie_may_be_cut(&request.user_name, &request.domain) {
        validate::cut_user_name("user", &request.user_name)
    } else {
        validate::user_name("user", &request.user_name)
    }
    .map_err(|error| DirectoryError::Invalid(error.to_string()))?;
    checked_but_the_name(request)
}

fn checked_but_the_name(mut request: SessionRequest) -> Result<SessionRequest, DirectoryError> {
    let invalid = |error: validate::ValidationError| DirectoryError::Invalid(error.to_string());
    validate::domain("domain", &request.domain).map_err(invalid)?;
    match validate::client_address("client_address", &request.client_address) {
        Ok(canonical) => request.client_address = canonical,
        Err(error) => {
            tracing::warn!(%error, user = %request.user_name, "client address left out");
            request.client_address.clear();
        }
    }
    Ok(request)
}

/// Records where a local source (PAM, the RDP service's scripts) says the session's client
/// connects from, unless that is a loopback address: behind the front door, the RDP service
/// (and PAM through it) sees every client as the front door's own connection from loopback,
/// which says nothing of the client (the broker tells users who share a cut cookie name, or
/// name none, apart by their clients' addresses: a loopback one would steer every client that
/// reaches a front door from this host to that session).
fn note_client_address(record: &mut SessionRecord, reported: &str) {
    if reported.is_empty() || is_loopback(reported) {
        return;
    }
    record.client_address = reported.to_owned();
}

/// Whether an address ("ip:port" or a bare IP) is a loopback one.
fn is_loopback(address: &str) -> bool {
    client_ip(address).is_some_and(|ip| ip.is_loopback())
}

/// The sessions a cookie names, narrowed to one user's when it names several users (a cut
/// cookie: `christoph`): those opened from `client`'s IP, when they are one user's. Also
/// whether the sessions are known to be one user's.
fn one_users_sessions<'a>(
    named: Vec<&'a SessionRecord>,
    client: &str,
) -> (Vec<&'a SessionRecord>, bool) {
    let one_user = |records: &[&SessionRecord]| {
        let first = records.first().map(|record| user_key(&record.user_name));
        records
            .iter()
            .all(|record| Some(user_key(&record.user_name)) == first)
    };
    if one_user(&named) {
        return (named, true);
    }
    let client = client_ip(client);
    let from_client: Vec<&SessionRecord> = named
        .iter()
        .copied()
        .filter(|record| client.is_some() && client_ip(&record.client_address) == client)
        .collect();
    if !from_client.is_empty() && one_user(&from_client) {
        return (from_client, true);
    }
    (named, false)
}

fn domains_match(record: &SessionRecord, domain: &str) -> bool {
    domains_agree(&record.domain, domain)
}

/// Two domains name the same users: equal but for case, or either not given.
pub(super) fn domains_agree(one: &str, other: &str) -> bool {
    one.is_empty() || other.is_empty() || one.eq_ignore_ascii_case(other)
}

/// Whether a cookie's user `name` (of `domain`) may be cut: mstsc cuts the whole cookie to 9
/// characters, so with a domain (`CORP\kwil` of `CORP\kwilliams`) the name is shorter by the
/// domain and its backslash.
fn cookie_may_be_cut(name: &str, domain: &str) -> bool {
    let user = name.chars().count();
    user == TRUNCATED_COOKIE_LEN
        || (!domain.is_empty() && domain.chars().count() + 1 + user == TRUNCATED_COOKIE_LEN)
}

/// A name from a client's cookie, ready to be compared with the names local sources report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CookieName {
    key: String,
    /// 9 characters: mstsc may have cut the name to this.
    may_be_cut: bool,
    /// The user part's key of a `user@domain` name.
    user_part_key: Option<String>,
}

impl CookieName {
    /// The cookie's user `name`, of `domain` when it came as `DOMAIN\name`.
    pub(super) fn new(name: &str, domain: &str) -> Self {
        CookieName {
            key: user_key(name),
            may_be_cut: cookie_may_be_cut(name, domain),
            user_part_key: upn_user_part(name).map(user_key),
        }
    }

    /// Whether the cookie names the user whose key is `key`: the same name, its first 9
    /// characters, or the name in `user@domain` form.
    pub(super) fn names(&self, key: &str) -> bool {
        self.key == key
            || (self.may_be_cut && key.starts_with(&self.key))
            || self.user_part_key.as_deref() == Some(key)
    }

    /// Whether mstsc may have cut the name: it may name several users.
    pub(super) fn may_be_cut(&self) -> bool {
        self.may_be_cut
    }
}

/// Whether the table holds a session that a connection would return to: one a cookie naming
/// `user_name` in `domain` attaches to, or, for a client that named no user, one opened from
/// `client`'s IP address.
pub(super) fn may_return_here(table: &Table, user: Option<(&str, &str)>, client: &str) -> bool {
    match user {
        Some((user_name, domain)) => {
            let cookie = CookieName::new(user_name, domain);
            table.sessions.values().any(|record| {
                domains_match(record, domain) && cookie.names(&user_key(&record.user_name))
            })
        }
        None => {
            let client = client_ip(client);
            client.is_some()
                && table
                    .sessions
                    .values()
                    .any(|record| client_ip(&record.client_address) == client)
        }
    }
}

/// The record is this user's: same name, or a front-door record whose cookie names the user.
pub(super) fn is_users(record: &SessionRecord, user_name: &str, domain: &str) -> bool {
    if !domains_match(record, domain) {
        return false;
    }
    let key = user_key(user_name);
    match record.origin {
        Origin::FrontDoor => CookieName::new(&record.user_name, &record.domain).names(&key),
        Origin::Control => user_key(&record.user_name) == key,
    }
}

/// The user's most recent session, preferring those in `preferred` state.
fn users_session(
    table: &Table,
    user_name: &str,
    domain: &str,
    preferred: Option<RecordState>,
    origin: Option<Origin>,
) -> Option<u32> {
    table
        .sessions
        .values()
        .filter(|record| is_users(record, user_name, domain))
        .filter(|record| origin.is_none_or(|origin| record.origin == origin))
        .max_by_key(|record| {
            (
                preferred.is_some_and(|state| record.state == state),
                record.changed_ms,
                record.session_id,
            )
        })
        .map(|record| record.session_id)
}

fn allocate_id(table: &mut Table) -> u32 {
    let mut candidate = table.next_session_id;
    while table.sessions.contains_key(&candidate) {
        candidate = candidate
            .checked_add(1)
            .unwrap_or(super::FIRST_ALLOCATED_SESSION_ID);
    }
    table.next_session_id = candidate
        .checked_add(1)
        .unwrap_or(super::FIRST_ALLOCATED_SESSION_ID);
    candidate
}

/// Moves a front-door record under the id and full name a local source reports; the broker
/// is told the old one ended when the id changes.
fn adopt(table: &mut Table, old_id: u32, request: &SessionRequest) -> Option<u32> {
    let mut record = table.sessions.remove(&old_id)?;
    let new_id = request.session_id.unwrap_or(old_id);
    if new_id != old_id {
        table.emit(SessionEventKind::Logoff, &record);
        // The front-door connections to it follow it: their end disconnects it under its id.
        for live in table.live.values_mut() {
            if live.session_id == Some(old_id) {
                live.session_id = Some(new_id);
            }
        }
    }
    if let Some(displaced) = table.sessions.remove(&new_id) {
        tracing::warn!(session_id = new_id, user = %displaced.user_name, "session replaced by a new logon");
        table.emit(SessionEventKind::Logoff, &displaced);
    }
    record.session_id = new_id;
    record.user_name = request.user_name.clone();
    if !request.domain.is_empty() {
        record.domain = request.domain.clone();
    }
    note_client_address(&mut record, &request.client_address);
    record.origin = Origin::Control;
    record.unconfirmed = false;
    table.sessions.insert(new_id, record);
    Some(new_id)
}

fn new_record(table: &mut Table, request: &SessionRequest, origin: Origin, now: i64) -> u32 {
    let session_id = match request.session_id {
        Some(session_id) => session_id,
        None => allocate_id(table),
    };
    if let Some(displaced) = table.sessions.remove(&session_id) {
        tracing::warn!(session_id, user = %displaced.user_name, "session replaced by a new logon");
        table.emit(SessionEventKind::Logoff, &displaced);
    }
    let record = SessionRecord {
        session_id,
        user_name: request.user_name.clone(),
        domain: request.domain.clone(),
        state: RecordState::Active,
        // The front door's view of its client is the client's; a local source's loopback
        // address is the front door's (see `note_client_address`).
        client_address: if origin == Origin::Control && is_loopback(&request.client_address) {
            String::new()
        } else {
            request.client_address.clone()
        },
        logon_time_ms: now,
        changed_ms: now,
        origin,
        attachment: 0,
        unconfirmed: origin == Origin::FrontDoor,
    };
    table.sessions.insert(session_id, record);
    session_id
}

/// Applies a control-socket event; returns the session after it.
pub(super) fn apply(
    table: &mut Table,
    kind: SessionEventKind,
    request: SessionRequest,
    now: i64,
) -> Result<SessionRecord, DirectoryError> {
    if kind == SessionEventKind::Logon {
        // PAM (or a script) reports logons here: it would have reported a front-door logon
        // that really happened. A reconnect hook alone does not say so.
        table.local_source_seen = true;
    }
    // Find the session the event is about.
    let existing = match request.session_id {
        Some(session_id) => table.sessions.get(&session_id).map(|record| {
            if is_users(record, &request.user_name, &request.domain) {
                Ok(session_id)
            } else {
                Err(DirectoryError::WrongUser {
                    session_id,
                    owner: record.user_name.clone(),
                    user: request.user_name.clone(),
                })
            }
        }),
        None if kind == SessionEventKind::Logon => None,
        None => {
            let preferred = match kind {
                SessionEventKind::Disconnect => Some(RecordState::Active),
                SessionEventKind::Reconnect => Some(RecordState::Disconnected),
                _ => None,
            };
            users_session(table, &request.user_name, &request.domain, preferred, None).map(Ok)
        }
    };
    let session_id = match existing {
        // A logon naming another user's session id: that session is over.
        Some(Err(DirectoryError::WrongUser { .. })) if kind == SessionEventKind::Logon => {
            new_record(table, &request, Origin::Control, now)
        }
        Some(Err(error)) => return Err(error),
        Some(Ok(session_id)) => match table.sessions.get(&session_id) {
            Some(record) if record.origin == Origin::FrontDoor => {
                adopt(table, session_id, &request).unwrap_or(session_id)
            }
            _ => session_id,
        },
        None => {
            // A session the front door saw for this user is the same session: merge into it.
            let front_door = users_session(
                table,
                &request.user_name,
                &request.domain,
                None,
                Some(Origin::FrontDoor),
            );
            match front_door.and_then(|old_id| adopt(table, old_id, &request)) {
                Some(session_id) => session_id,
                None if kind == SessionEventKind::Logoff => {
                    return Err(DirectoryError::NoSuchSession(describe(&request)));
                }
                None if request.known_only => {
                    return Err(DirectoryError::NotKnown(describe(&request)));
                }
                None => {
                    // A session the agent never saw start: it exists now.
                    let session_id = new_record(table, &request, Origin::Control, now);
                    if kind != SessionEventKind::Logon
                        && let Some(record) = table.sessions.get(&session_id).cloned()
                    {
                        table.emit(SessionEventKind::Logon, &record);
                    }
                    session_id
                }
            }
        }
    };
    let client_left = matches!(kind, SessionEventKind::Logon | SessionEventKind::Reconnect)
        && super::unknown::match_connection(table, session_id, kind, now);
    let record = change(table, session_id, kind, &request.client_address, now)
        .ok_or_else(|| DirectoryError::NoSuchSession(describe(&request)))?;
    if client_left && connection_left(table, session_id, now) {
        tracing::info!(
            session_id,
            user = %record.user_name,
            "reported after its client's front-door connection ended: disconnected"
        );
        return table
            .sessions
            .get(&session_id)
            .cloned()
            .ok_or_else(|| DirectoryError::NoSuchSession(describe(&request)));
    }
    Ok(record)
}

/// Sets the state the event leaves the session in and tells the broker.
fn change(
    table: &mut Table,
    session_id: u32,
    kind: SessionEventKind,
    client_address: &str,
    now: i64,
) -> Option<SessionRecord> {
    if kind == SessionEventKind::Logoff {
        let record = table.sessions.remove(&session_id)?;
        table.emit(kind, &record);
        return Some(record);
    }
    // The one front-door connection holding a session reported reconnected is its client's:
    // a guess that tied it is confirmed, and the session takes its address.
    let holders_client = match kind {
        SessionEventKind::Reconnect => cut_guess::confirm(table, session_id),
        _ => None,
    };
    if matches!(kind, SessionEventKind::Logon | SessionEventKind::Reconnect) {
        late_reports::reported(table, session_id);
    }
    let record = table.sessions.get_mut(&session_id)?;
    let state = match kind {
        SessionEventKind::Disconnect => RecordState::Disconnected,
        _ => RecordState::Active,
    };
    if record.state != state {
        record.changed_ms = now;
    }
    record.state = state;
    // A local session source knows this session: it is real.
    record.unconfirmed = false;
    note_client_address(record, client_address);
    if let Some(client) = holders_client {
        record.client_address = client;
    }
    let record = record.clone();
    table.emit(kind, &record);
    Some(record)
}

fn describe(request: &SessionRequest) -> String {
    match request.session_id {
        Some(session_id) => format!("{session_id} for user {:?}", request.user_name),
        None => format!("for user {:?}", request.user_name),
    }
}

/// A front-door connection to the local RDP service for `request.user_name`.
pub(super) fn front_door_attach(
    table: &mut Table,
    request: SessionRequest,
    cookie_name: Option<&str>,
    now: i64,
) -> Attachment {
    let cookie = CookieName::new(&request.user_name, &request.domain);
    let named: Vec<&SessionRecord> = table
        .sessions
        .values()
        .filter(|record| domains_match(record, &request.domain))
        .filter(|record| cookie.names(&user_key(&record.user_name)))
        .collect();
    let (candidates, whose_known) = one_users_sessions(named, &request.client_address);
    let found = candidates
        .into_iter()
        .max_by_key(|record| {
            (
                record.state == RecordState::Disconnected,
                record.changed_ms,
                record.session_id,
            )
        })
        .map(|record| record.session_id);
    let (session_id, kind, pending_logon) = match found {
        // A session still in an unconfirmed logon that only that logon's connections hold:
        // this connection is one more attempt at that logon, not a return to a session.
        Some(session_id) => {
            let mut holders = table
                .live
                .values()
                .filter(|live| live.session_id == Some(session_id))
                .peekable();
            let pending = table
                .sessions
                .get(&session_id)
                .is_some_and(|record| record.unconfirmed)
                && holders.peek().is_some()
                && holders.all(|live| live.pending_logon);
            (session_id, SessionEventKind::Reconnect, pending)
        }
        None => {
            drop_oldest_front_door_sessions(table, super::MAX_FRONT_DOOR_SESSIONS - 1);
            (
                new_record(table, &request, Origin::FrontDoor, now),
                SessionEventKind::Logon,
                true,
            )
        }
    };
    // A return to a session by a cookie that may be cut (as the client sent it, before the
    // broker resolved it): a guess, moved if a local source then reports another session
    // of a user the cookie names (`cut_guess.rs`).
    let guess = match kind {
        SessionEventKind::Reconnect => table.sessions.get(&session_id).and_then(|record| {
            let sent = cookie_name.map(|name| CookieName::new(name, &request.domain));
            let cookie = sent.as_ref().unwrap_or(&cookie);
            let address = cut_guess::address_before_guesses(table, record);
            CutGuess::new(cookie, &request.domain, &address)
        }),
        _ => None,
    };
    let attachment = table.open_connection(LiveConnection {
        session_id: Some(session_id),
        pending_logon,
        matched: false,
        reported: false,
        client: request.client_address.parse().ok(),
        guess,
    });
    let local_source = table.local_source_seen;
    let mut may_confirm = false;
    if let Some(record) = table.sessions.get_mut(&session_id) {
        may_confirm = record.unconfirmed && !local_source;
        record.attachment = attachment;
        if kind == SessionEventKind::Reconnect && record.state != RecordState::Active {
            record.state = RecordState::Active;
            record.changed_ms = now;
        }
        // The front door's own view of the client (its peer, or the PROXY header's source)
        // is the client's address, loopback or not; but a guess among several users must
        // not lend one of them this client's address.
        if whose_known && !request.client_address.is_empty() {
            record.client_address.clone_from(&request.client_address);
        }
        let record = record.clone();
        table.emit(kind, &record);
    }
    Attachment {
        session_id,
        attachment,
        pending_logon,
        may_confirm,
    }
}

/// Drops the sessions only the front door knows of that have been disconnected longest until
/// at most `keep` such sessions are left (those a connection holds are never dropped).
fn drop_oldest_front_door_sessions(table: &mut Table, keep: usize) {
    let front_door_only = |record: &&SessionRecord| record.origin == Origin::FrontDoor;
    // Counted first: on every new front-door logon, and almost always under the bound.
    let count = table.sessions.values().filter(front_door_only).count();
    if count <= keep {
        return;
    }
    let excess = count - keep;
    let mut droppable: Vec<(i64, u32)> = table
        .sessions
        .values()
        .filter(front_door_only)
        .filter(|record| record.state == RecordState::Disconnected)
        .map(|record| (record.changed_ms, record.session_id))
        .collect();
    droppable.sort_unstable();
    for &(_, session_id) in droppable.iter().take(excess) {
        if let Some(record) = table.sessions.remove(&session_id) {
            tracing::info!(
                session_id,
                user = %record.user_name,
                limit = super::MAX_FRONT_DOOR_SESSIONS,
                "too many sessions only the front door knows of: the one disconnected longest is dropped"
            );
            table.emit(SessionEventKind::Logoff, &record);
        }
    }
}

/// A front-door connection that is still open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LiveConnection {
    /// The session it holds; `None` while the user is unknown (see `unknown.rs`).
    pub session_id: Option<u32>,
    pub pending_logon: bool,
    /// Tied to its session by elimination (`unknown.rs`), not by the user it named.
    pub matched: bool,
    /// A local source reported the session it holds (a logon or reconnection) while it was
    /// open: its client has no report still to come (`late_reports.rs`).
    pub reported: bool,
    /// Where its client connects from, as the front door saw it.
    pub client: Option<SocketAddr>,
    /// Tied to its session by a cookie that may be cut, a guess (`cut_guess.rs`).
    pub guess: Option<Box<CutGuess>>,
}

/// How a front-door connection ended.
#[derive(Clone, Copy, Debug)]
pub(super) struct ConnectionEnd {
    /// The connection's attachment number.
    pub attachment: u64,
    /// Whether it opened (or joined) a logon nothing had confirmed when it was attached.
    pub pending_logon: bool,
    /// How long the connection lasted; `None` when the agent cut it (stopping).
    pub lasted: Option<Duration>,
    /// How long a connection the agent cut had lasted (zero when not known).
    pub cut_after: Duration,
    /// The unconfirmed-logon grace.
    pub grace: Duration,
}

/// A front-door connection still open has lasted the unconfirmed-logon grace: as its end would
/// after that long, it confirms the logon of the session it holds (unless local sources
/// confirm logons here). Confirmed now, not at its end, so that a crash of the agent with the
/// client still connected does not leave the session unconfirmed, to be removed after the
/// restart. Returns whether the table changed.
pub(super) fn front_door_outlasted_grace(table: &mut Table, attachment: u64) -> bool {
    let Some(Some(session_id)) = table.live.get(&attachment).map(|live| live.session_id) else {
        return false;
    };
    if table.local_source_seen {
        return false;
    }
    match table.sessions.get_mut(&session_id) {
        Some(record) if record.unconfirmed => {
            record.unconfirmed = false;
            true
        }
        _ => false,
    }
}

/// Returns whether the table changed.
pub(super) fn front_door_detach(table: &mut Table, end: ConnectionEnd, now: i64) -> bool {
    let Some(live) = table.live.remove(&end.attachment) else {
        return false;
    };
    cut_guess::give_back_address(table, end.attachment, &live);
    let changed = live
        .session_id
        .is_some_and(|session_id| detach_held(table, session_id, end, now));
    let changed = super::unknown::candidate_ended(table, end.attachment, now) || changed;
    late_reports::remember(table, live, now);
    changed
}

/// [`front_door_detach`] for session `session_id`, which the connection held when it ended (a
/// local source may have renumbered it, `adopt`, or matched a connection of an unknown user
/// to it, `unknown.rs`).
fn detach_held(table: &mut Table, session_id: u32, end: ConnectionEnd, now: i64) -> bool {
    let ConnectionEnd {
        attachment,
        pending_logon,
        ..
    } = end;
    let others_open = table.is_held(session_id);
    let local_source = table.local_source_seen;
    let Some(record) = table.sessions.get_mut(&session_id) else {
        return false;
    };
    let mut changed = false;
    let short = end.lasted.is_some_and(|lasted| lasted < end.grace);
    // A connection the agent cut had lasted the grace or not: that much is known of it.
    let outlasted_grace = match end.lasted {
        Some(_) => !short,
        None => end.cut_after >= end.grace,
    };
    if record.unconfirmed && outlasted_grace && !local_source {
        // The RDP service kept this connection past the grace, and no local source would
        // have confirmed it: the logon happened.
        record.unconfirmed = false;
        changed = true;
    }
    let failed = end.lasted.is_some() && (short || local_source);
    if record.unconfirmed && pending_logon && failed && !others_open {
        // Every connection of this logon ended, soon or with a local source that never
        // confirmed it: it failed.
        tracing::info!(
            session_id,
            user = %record.user_name,
            lasted_ms = end.lasted.map_or(0, |lasted| {
                u64::try_from(lasted.as_millis()).unwrap_or(u64::MAX)
            }),
            confirmed_by_local_sources_only = local_source,
            "front-door logon never confirmed and its connections ended: \
             treated as a failed logon, session removed"
        );
        if let Some(record) = table.sessions.remove(&session_id) {
            table.emit(SessionEventKind::Logoff, &record);
        }
        return true;
    }
    if record.attachment != attachment || record.state != RecordState::Active {
        return changed;
    }
    connection_left(table, session_id, now) || changed
}

/// The connection that held session `session_id` (ACTIVE) no longer does. Another connection
/// still to it (this one was a second client that gave up, a probe) holds it: the user is
/// still connected, through the newest of the others (a RECONNECT when its client is another).
/// Else the session is disconnected. Returns whether the table changed.
pub(super) fn connection_left(table: &mut Table, session_id: u32, now: i64) -> bool {
    let holder = table
        .live
        .iter()
        .filter(|(_, live)| live.session_id == Some(session_id))
        .max_by_key(|(attachment, _)| **attachment)
        .map(|(attachment, live)| (*attachment, live.client));
    let Some(record) = table.sessions.get_mut(&session_id) else {
        return false;
    };
    if let Some((holder, client)) = holder {
        record.attachment = holder;
        let client = client.map(|client| client.to_string());
        if let Some(client) = client.filter(|client| *client != record.client_address) {
            record.client_address = client;
            let record = record.clone();
            table.emit(SessionEventKind::Reconnect, &record);
            return true;
        }
        return false;
    }
    record.attachment = 0;
    record.state = RecordState::Disconnected;
    record.changed_ms = now;
    let record = record.clone();
    table.emit(SessionEventKind::Disconnect, &record);
    true
}
