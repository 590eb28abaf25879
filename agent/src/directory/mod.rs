//! The agent's own session table: every session on this machine, from the control socket
//! (PAM, xrdp scripts) and from the front door's view; persisted so that an agent restart
//! keeps it; every change is numbered and sent to the stream task.
//!
//! Persistence is a group commit (`persist.rs`): a change is made and its event sent under the
//! table's lock, and the lock is let go before anything touches the disk; one writer thread
//! saves the latest table, so the changes made during one write are all covered by the next.
//! Durability differs by source:
//!
//! - **Control socket** ([`Directory::apply`]: PAM, xrdp's scripts, `tsagent session …`): the
//!   call returns only once a write covering the change has finished (waiters share it), so a
//!   logon or logoff the agent acknowledged survives a crash or power loss.
//! - **Front door** ([`Directory::front_door_attach`], [`Directory::front_door_detach`]): the
//!   connection does not wait for the disk; the writer saves the change right after (within
//!   one write's time). A crash in that window forgets the attach or detach of a connection
//!   — which a crash cuts anyway — and leaves the session as it was before: a front-door
//!   logon not yet on disk is simply unknown after the restart until PAM reports it, a detach
//!   not on disk leaves the session active until its next event. The broker hears of every
//!   change through the stream either way; only the agent's own copy after a crash can lag.
//! - **Agent stop** (SIGTERM): [`Directory::flush`] writes the latest table before the agent
//!   exits, and so does dropping the last handle.
//!
//! A failed write is logged and tried again on the next change (or after a pause); the
//! change stands in memory and reaches the broker regardless.

mod cut_guess;
#[cfg(test)]
mod cut_guess_tests;
mod late_reports;
#[cfg(test)]
mod late_reports_tests;
mod persist;
#[cfg(test)]
mod persist_tests;
mod rules;
mod store;
#[cfg(test)]
mod tests;
mod unknown;
#[cfg(test)]
mod unknown_tests;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tsbroker_common::model::{self, SessionEventKind, SessionInfo, SessionState};

use anyhow::Context;
use persist::{Pacing, Persister, Snapshot};
use store::TableFile;

/// Session ids the agent allocates itself (for a session whose real number it does not know)
/// start here, far above the display numbers xrdp uses.
pub const FIRST_ALLOCATED_SESSION_ID: u32 = 100_000;
/// mstsc cuts the `mstshash` cookie to this many characters.
pub const TRUNCATED_COOKIE_LEN: usize = 9;
/// A front-door logon not confirmed by a local session source counts as "in flight" this long.
const PENDING_LOGON_MS: i64 = 60_000;
/// How long a front-door connection must last for the logon it opened to count as real when
/// no local session source confirms it (see [`Directory::with_unconfirmed_logon_grace`]).
pub const DEFAULT_UNCONFIRMED_LOGON_GRACE: Duration = Duration::from_secs(30);
/// At most this many sessions that only the front door knows of (no local source reported
/// them) are kept disconnected; past it the one disconnected longest is dropped. Without a
/// local source nothing reports a logoff, and the cookie's name is anyone's to write: the
/// bound keeps the table, the broker's RESYNC and the machine's session count from growing
/// with every made-up name.
pub const MAX_FRONT_DOOR_SESSIONS: usize = 2_000;

/// Who told the agent about a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The control socket: PAM or the RDP service's own scripts.
    Control,
    /// The front door handed a connection for this user to the local RDP service; the user
    /// name may be a truncated cookie.
    FrontDoor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    Active,
    Disconnected,
}

impl From<RecordState> for SessionState {
    fn from(state: RecordState) -> Self {
        match state {
            RecordState::Active => SessionState::Active,
            RecordState::Disconnected => SessionState::Disconnected,
        }
    }
}

/// One session as the table keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub session_id: u32,
    pub user_name: String,
    #[serde(default)]
    pub domain: String,
    pub state: RecordState,
    #[serde(default)]
    pub client_address: String,
    /// Milliseconds since the Unix epoch.
    pub logon_time_ms: i64,
    /// When the state last changed (ms since the epoch).
    pub changed_ms: i64,
    pub origin: Origin,
    /// Which front-door connection is attached, so that only its own end disconnects it.
    #[serde(default)]
    pub attachment: u64,
    /// The front door created this session from the client's cookie (a routing hint, not an
    /// identity) and nothing has vouched for it yet: no control-socket event for it, and no
    /// front-door connection to it that outlasted the unconfirmed-logon grace. Absent in
    /// tables written before the flag existed: those sessions count as confirmed.
    #[serde(default)]
    pub unconfirmed: bool,
}

impl SessionRecord {
    pub fn to_info(&self) -> SessionInfo {
        SessionInfo {
            session_id: self.session_id,
            user_name: self.user_name.clone(),
            domain: self.domain.clone(),
            state: self.state.into(),
            client_address: self.client_address.clone(),
            logon_time_ms: Some(self.logon_time_ms),
        }
    }
}

/// A change for the broker, numbered in the order the table made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumberedEvent {
    pub version: u64,
    pub kind: SessionEventKind,
    pub session: SessionInfo,
}

/// What a session source asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionRequest {
    pub user_name: String,
    /// Empty matches sessions of any domain.
    pub domain: String,
    /// `None`: a logon gets a new id; other events act on the user's most recent session.
    pub session_id: Option<u32>,
    /// Empty when unknown.
    pub client_address: String,
    /// Only for a session the table holds: an event for another is refused, not taken for a
    /// session the agent never saw start (what xrdp's reconnect hook asks: any local user can
    /// run it, and must not make sessions up).
    pub known_only: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DirectoryError {
    #[error("{0}")]
    Invalid(String),
    #[error("no session {0}")]
    NoSuchSession(String),
    #[error(
        "no session {0} known here (--known-only: not taken for a session that started unseen)"
    )]
    NotKnown(String),
    #[error("session {session_id} belongs to {owner:?}, not {user:?}")]
    WrongUser {
        session_id: u32,
        owner: String,
        user: String,
    },
}

/// A front-door connection attached to a local session; give it back with
/// [`Directory::front_door_detach`] when the connection ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// The session when the connection was attached. A local source may renumber it later
    /// (PAM reports the display number); the table follows the session, not this number.
    pub session_id: u32,
    pub attachment: u64,
    /// This connection opened the session (a new logon), or joined one that another
    /// connection opened and that is still unconfirmed: its short end may mean the logon never
    /// happened. False for a reconnection to a session the user already had here.
    pub pending_logon: bool,
    /// The session was unconfirmed when the connection attached, on a machine where how long
    /// a connection lasts confirms it (no local source seen): the front door then watches
    /// whether this one lasts the grace ([`Directory::front_door_outlasted_grace`]).
    pub may_confirm: bool,
}

/// A front-door connection whose user is unknown (see [`Directory::front_door_attach_unknown`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownConnection {
    attachment: u64,
}

pub(crate) struct Table {
    sessions: BTreeMap<u32, SessionRecord>,
    next_session_id: u32,
    version: u64,
    attachments: u64,
    /// Front-door connections still open, by attachment number.
    live: BTreeMap<u64, rules::LiveConnection>,
    /// Sessions a local source reported that several open connections could hold (none was
    /// matched): the connections, whose ends all together disconnect the session (`unknown.rs`).
    unheld: BTreeMap<u32, Vec<u64>>,
    /// Front-door connections that ended lately (`late_reports.rs`).
    ended: std::collections::VecDeque<late_reports::EndedConnection>,
    events: mpsc::UnboundedSender<NumberedEvent>,
    /// Counts the changes to save (not only those with an event): the writer's generation.
    generation: u64,
    /// A local session source (PAM, a logon script) has reported a logon since the agent
    /// started. Then only such a report confirms a front-door logon, not how long its
    /// connection lasted. (Not read from the table at start: a session left from a one-off
    /// `tsagent session logon` must not switch a machine without PAM to this rule for good.)
    local_source_seen: bool,
}

/// The shared handle to the table; cheap to clone.
#[derive(Clone)]
pub struct Directory {
    shared: Arc<Shared>,
    unconfirmed_logon_grace: Duration,
}

/// What the handles share. Dropped with the last handle: the writer flushes and ends.
struct Shared {
    table: Arc<Mutex<Table>>,
    persister: Persister,
    /// Front-door logons the previous agent process left unconfirmed: settled once, the
    /// grace after the start ([`Directory::settle_undecided`]).
    undecided: Mutex<Vec<u32>>,
}

/// The receiving end of the table's changes, owned by the stream task.
pub type DirectoryEvents = mpsc::UnboundedReceiver<NumberedEvent>;

impl Directory {
    /// Loads the table of `state_dir` (creating the directory if needed).
    pub fn open(state_dir: &Path) -> anyhow::Result<(Directory, DirectoryEvents)> {
        Self::open_paced(state_dir, None, Pacing::default())
    }

    /// [`Directory::open`] for machine `machine` (`farm/name`), which the file then names: a
    /// table another machine's agent wrote (a state directory shared or copied by mistake) is
    /// refused rather than reported to the broker as this machine's sessions.
    pub fn open_for(
        state_dir: &Path,
        machine: String,
    ) -> anyhow::Result<(Directory, DirectoryEvents)> {
        Self::open_paced(state_dir, Some(machine), Pacing::default())
    }

    /// [`Directory::open`] with the writer's pacing given (tests).
    fn open_paced(
        state_dir: &Path,
        machine: Option<String>,
        pacing: Pacing,
    ) -> anyhow::Result<(Directory, DirectoryEvents)> {
        let file = TableFile::open(state_dir)?.of_machine(machine.clone());
        file.lock_directory()?;
        let stored = file.load()?;
        // A table that does not name this machine yet (an older agent's) is written at once
        // with its name.
        let name_it = machine.is_some() && stored.machine.is_none();
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut sessions = BTreeMap::new();
        let mut clients_lost = 0;
        let mut undecided = Vec::new();
        let now = model::now_millis();
        for mut record in stored.sessions {
            // What the broker would refuse in a RESYNC (a hand-edited or restored file): one
            // such record would keep the machine from ever being READY.
            let checked = tsbroker_common::proto::v1::SessionInfo::from(&record.to_info());
            if let Err(error) = SessionInfo::try_from(checked) {
                tracing::warn!(session_id = record.session_id, %error, "session in the table file dropped: not valid");
                continue;
            }
            if model::user_key(&record.user_name).is_empty() {
                continue;
            }
            // No front-door connection survives a restart: a session one still held (the
            // agent ended without cutting it, as a crash does) lost its client with it.
            if record.attachment != 0 && record.state == RecordState::Active {
                record.state = RecordState::Disconnected;
                record.changed_ms = now;
                clients_lost += 1;
            }
            record.attachment = 0;
            if record.unconfirmed {
                undecided.push(record.session_id);
            }
            sessions.insert(record.session_id, record);
        }
        tracing::info!(path = %file.path().display(), sessions = sessions.len(), "session table loaded");
        if clients_lost > 0 {
            tracing::warn!(
                sessions = clients_lost,
                "sessions whose front-door connection ended with the previous agent process are disconnected"
            );
        }
        let table = Table {
            local_source_seen: false,
            sessions,
            next_session_id: stored.next_session_id.max(FIRST_ALLOCATED_SESSION_ID),
            version: 0,
            attachments: 0,
            live: BTreeMap::new(),
            unheld: BTreeMap::new(),
            ended: Default::default(),
            events: sender,
            generation: 0,
        };
        let writable = file.check_writable();
        let table = Arc::new(Mutex::new(table));
        let persister = Persister::start(
            file,
            0,
            {
                let table = table.clone();
                Box::new(move || {
                    let table = lock(&table);
                    Snapshot {
                        generation: table.generation,
                        next_session_id: table.next_session_id,
                        sessions: table.sessions.values().cloned().collect(),
                    }
                })
            },
            pacing,
        )
        .context("start the session table's writer")?;
        if let Err(error) = writable {
            // Said now rather than at the first logon; the writer keeps trying, and the
            // control socket's answers and `tsagent status` say so until it succeeds.
            tracing::error!(
                error = format!("{error:#}"),
                "the state directory cannot be written: session events will not survive a \
                 restart of the agent until it can"
            );
            persister.changed(lock(&table).changed());
        } else if name_it {
            persister.changed(lock(&table).changed());
        }
        let directory = Directory {
            shared: Arc::new(Shared {
                table,
                persister,
                undecided: Mutex::new(undecided),
            }),
            unconfirmed_logon_grace: DEFAULT_UNCONFIRMED_LOGON_GRACE,
        };
        Ok((directory, receiver))
    }

    /// Sets how long a front-door connection must last for the session it opened to stay when
    /// nothing else confirms it: a shorter one that ends is a logon that failed (wrong password,
    /// or a cookie naming anyone), and its session is removed rather than left disconnected.
    /// Zero keeps every such session. Only while no local session source reports to the agent:
    /// once one does, a front-door logon it did not confirm is removed when its connections
    /// end, however long they lasted.
    pub fn with_unconfirmed_logon_grace(mut self, grace: Duration) -> Self {
        self.unconfirmed_logon_grace = grace;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        lock(&self.shared.table)
    }

    /// Applies an event from a session source (the control socket). Blocks until the change
    /// is on disk (or its write failed, which is logged): call it off the async threads.
    pub fn apply(
        &self,
        kind: SessionEventKind,
        request: SessionRequest,
    ) -> Result<SessionRecord, DirectoryError> {
        let request = rules::checked(request)?;
        let (result, generation) = {
            let mut table = self.lock();
            let result = rules::apply(&mut table, kind, request, model::now_millis());
            let generation = result.is_ok().then(|| table.changed());
            (result, generation)
        };
        if let Some(generation) = generation {
            self.shared.persister.wait_for(generation);
        }
        result
    }

    /// Whether a connection for `user` (name and domain; `None`: a client that named no user)
    /// from `client` has a session here to return to.
    pub fn may_return_here(&self, user: Option<(&str, &str)>, client: &str) -> bool {
        rules::may_return_here(&self.lock(), user, client)
    }

    /// The front door handed a connection for `user_name` to the local RDP service: a
    /// reconnection to the user's session here, or a new logon. `None` when the name is not
    /// usable as a user name.
    pub fn front_door_attach(
        &self,
        user_name: &str,
        domain: &str,
        client_address: &str,
    ) -> Option<Attachment> {
        self.front_door_attach_as(user_name, domain, client_address, None)
    }

    /// [`Self::front_door_attach`] for a user the broker named `user_name` from a cookie that
    /// carried `cookie_name` (a cut name it resolved to the full one): the tie to that user's
    /// session is a guess, moved if a local source reports another session of a user the
    /// cookie names (`cut_guess.rs`).
    pub fn front_door_attach_as(
        &self,
        user_name: &str,
        domain: &str,
        client_address: &str,
        cookie_name: Option<&str>,
    ) -> Option<Attachment> {
        let request = rules::checked_cookie(SessionRequest {
            user_name: user_name.to_owned(),
            domain: domain.to_owned(),
            session_id: None,
            client_address: client_address.to_owned(),
            known_only: false,
        })
        .ok()?;
        let (attachment, generation) = {
            let mut table = self.lock();
            // A cut name ending in a space (`mary ann `) finds its session, but names no new
            // one: the connection is then an unknown user's, named by its logon.
            if request.user_name.trim_end() != request.user_name
                && !rules::may_return_here(&table, Some((user_name, domain)), client_address)
            {
                return None;
            }
            let now = model::now_millis();
            let attachment = rules::front_door_attach(&mut table, request, cookie_name, now);
            (attachment, table.changed())
        };
        // Saved soon by the writer; the connection does not wait for the disk.
        self.shared.persister.changed(generation);
        Some(attachment)
    }

    /// The front-door connection ended after `lasted` (`None`: cut by the agent stopping, which
    /// says nothing about the logon): the session is disconnected, unless it was logged off
    /// meanwhile or another connection took it over; a logon this connection opened that
    /// nothing confirmed and that lasted less than the unconfirmed-logon grace failed, and its
    /// session is removed.
    pub fn front_door_detach(&self, attachment: Attachment, lasted: Option<Duration>) {
        self.connection_ended(
            attachment.attachment,
            attachment.pending_logon,
            lasted,
            Duration::ZERO,
        );
    }

    /// The front-door connection `attachment` is still open after the unconfirmed-logon grace
    /// ([`Self::unconfirmed_logon_grace`]): its logon is confirmed now, as its end would
    /// confirm it, and saved (a crash must not leave it for [`Self::settle_undecided`]).
    pub fn front_door_outlasted_grace(&self, attachment: &Attachment) {
        let generation = {
            let mut table = self.lock();
            rules::front_door_outlasted_grace(&mut table, attachment.attachment)
                .then(|| table.changed())
        };
        if let Some(generation) = generation {
            self.shared.persister.changed(generation);
        }
    }

    /// How long a front-door connection lasts before it confirms its logon.
    pub fn unconfirmed_logon_grace(&self) -> Duration {
        self.unconfirmed_logon_grace
    }

    /// The agent cut the connection (stopping) after `after`: as [`Self::front_door_detach`]
    /// with `None`, except that a connection that had lasted the grace confirms its logon as
    /// one that ended would. A logon it leaves undecided is settled after the next start
    /// ([`Self::settle_undecided`]).
    pub fn front_door_cut(&self, attachment: Attachment, after: Duration) {
        self.connection_ended(attachment.attachment, attachment.pending_logon, None, after);
    }

    /// The front door handed a connection whose user it could not tell (no cookie, or one
    /// that is not a user name) to the local RDP service. A local source's report may match it
    /// to a session later (`unknown.rs`); until then its end changes nothing.
    pub fn front_door_attach_unknown(
        &self,
        client: Option<std::net::SocketAddr>,
    ) -> UnknownConnection {
        let attachment = self.lock().open_connection(rules::LiveConnection {
            session_id: None,
            pending_logon: false,
            matched: false,
            reported: false,
            client,
            guess: None,
        });
        UnknownConnection { attachment }
    }

    /// A connection of [`Directory::front_door_attach_unknown`] ended: as
    /// [`Directory::front_door_detach`] for the session it was matched to, if any.
    pub fn front_door_detach_unknown(
        &self,
        connection: UnknownConnection,
        lasted: Option<Duration>,
    ) {
        self.connection_ended(connection.attachment, false, lasted, Duration::ZERO);
    }

    fn connection_ended(
        &self,
        attachment: u64,
        pending_logon: bool,
        lasted: Option<Duration>,
        cut_after: Duration,
    ) {
        let end = rules::ConnectionEnd {
            attachment,
            pending_logon,
            lasted,
            cut_after,
            grace: self.unconfirmed_logon_grace,
        };
        let generation = {
            let mut table = self.lock();
            rules::front_door_detach(&mut table, end, model::now_millis()).then(|| table.changed())
        };
        if let Some(generation) = generation {
            // Saved soon by the writer; the connection does not wait for the disk.
            self.shared.persister.changed(generation);
        }
    }

    /// Removes the front-door logons the previous agent process left undecided (unconfirmed:
    /// their connection cut by its stop before lasting the grace, or never confirmed by the
    /// local source it had) that nothing confirmed since either, and that no connection holds
    /// now. Called once, the unconfirmed-logon grace after the start: a client that was really
    /// logged on has reconnected by then (or PAM reported it); without this such a session
    /// stayed, disconnected, for good, and its user was sent back to it.
    pub fn settle_undecided(&self) {
        let undecided = std::mem::take(
            &mut *self
                .shared
                .undecided
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        let settled = {
            let mut table = self.lock();
            let mut removed = Vec::new();
            for session_id in undecided {
                let held = table.is_held(session_id);
                let unconfirmed = table
                    .sessions
                    .get(&session_id)
                    .is_some_and(|record| record.unconfirmed);
                if unconfirmed
                    && !held
                    && let Some(record) = table.sessions.remove(&session_id)
                {
                    table.emit(SessionEventKind::Logoff, &record);
                    removed.push(record.user_name);
                }
            }
            (!removed.is_empty()).then(|| (table.changed(), removed))
        };
        if let Some((generation, users)) = settled {
            tracing::info!(
                ?users,
                "front-door logons the previous agent left unconfirmed were not confirmed \
                 since the start: treated as failed logons, sessions removed"
            );
            self.shared.persister.changed(generation);
        }
    }

    /// Writes every change made so far to disk (again, if a write failed) and waits for it:
    /// the agent's stop. False when the write failed (logged).
    pub fn flush(&self) -> bool {
        self.shared.persister.flush()
    }

    /// How many times the table was written (tests).
    #[cfg(test)]
    fn writes(&self) -> u64 {
        self.shared.persister.writes()
    }

    /// Holds the writer back, or lets it go (tests).
    #[cfg(test)]
    fn hold_writes(&self, held: bool) {
        self.shared.persister.hold(held);
    }

    /// Every session with the version of the latest change they include.
    pub fn snapshot(&self) -> (u64, Vec<SessionInfo>) {
        let table = self.lock();
        let sessions = table
            .sessions
            .values()
            .map(SessionRecord::to_info)
            .collect();
        (table.version, sessions)
    }

    /// Every session as the table keeps it.
    pub fn list(&self) -> Vec<SessionRecord> {
        self.lock().sessions.values().cloned().collect()
    }

    /// (active, disconnected) sessions.
    pub fn state_counts(&self) -> (usize, usize) {
        let table = self.lock();
        let active = table
            .sessions
            .values()
            .filter(|record| record.state == RecordState::Active)
            .count();
        (active, table.sessions.len() - active)
    }

    /// Whether the last save of the table failed (it is tried again; see `persist`).
    pub fn save_failing(&self) -> bool {
        self.shared.persister.failing()
    }

    /// (sessions, front-door logons not yet confirmed by a local session source).
    pub fn counts(&self) -> (u32, u32) {
        let table = self.lock();
        let now = model::now_millis();
        let pending = table
            .sessions
            .values()
            .filter(|record| {
                record.origin == Origin::FrontDoor
                    && now.saturating_sub(record.logon_time_ms) < PENDING_LOGON_MS
            })
            .count();
        (clamp_u32(table.sessions.len()), clamp_u32(pending))
    }
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // A panic while holding the lock cannot leave the map half-written: keep going.
    table
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn clamp_u32(count: usize) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

impl Table {
    /// Numbers a front-door connection that just opened and keeps it among the live ones;
    /// returns its attachment number.
    fn open_connection(&mut self, connection: rules::LiveConnection) -> u64 {
        self.attachments += 1;
        self.live.insert(self.attachments, connection);
        self.attachments
    }

    /// Whether an open front-door connection holds session `session_id`.
    fn is_held(&self, session_id: u32) -> bool {
        self.live
            .values()
            .any(|live| live.session_id == Some(session_id))
    }

    /// Counts a change for the writer; returns its generation.
    fn changed(&mut self) -> u64 {
        self.generation += 1;
        self.generation
    }

    /// Numbers a change and hands it to the stream task (which may be away: the change is
    /// in the table regardless, and the next RESYNC carries it).
    fn emit(&mut self, kind: SessionEventKind, record: &SessionRecord) {
        self.version += 1;
        let _ = self.events.send(NumberedEvent {
            version: self.version,
            kind,
            session: record.to_info(),
        });
    }
}
