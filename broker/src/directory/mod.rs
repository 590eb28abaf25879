//! The session directory in memory: every session of every farm, kept current from the store's
//! own commits (and, on PostgreSQL, from what other replicas announce), so a returning user's
//! redirect is answered without a database query. The database stays the truth: the directory
//! only ever answers "the user's session is there, on a machine that is alive" or "the
//! directory knows no session of the user"; anything else, and everything while the directory
//! first loads, is asked of the database. While it reads everything again (notifications may
//! have been missed) or cannot (the database is away), it answers from what it knows. A new
//! user's placement checks the database for a session under the farm's lock
//! (`PlacementRequest::check_sessions`), so a directory that has not heard of a session yet
//! can never open a second one.
//!
//! This broker's own commits reach the directory before the store answers them (the store
//! hands each commit's delta to the directory as a [`DirectorySink`]): once a write is
//! acknowledged, or visible through the API, the directory has it. Other replicas' commits
//! arrive by NOTIFY a few milliseconds later and are read by the sync task.
//!
//! - `index.rs`: the data (by farm and user, by machine), pure;
//! - `sync.rs`: the task that loads it, reads what other replicas changed, and refreshes the
//!   machines' leases;
//! - `wakefulness.rs`: whether this broker ran all along (after a pause of its process, the
//!   database answers until the directory has caught up).

mod index;
mod sync;
#[cfg(test)]
mod tests;
mod wakefulness;

use crate::store::{DirectoryDelta, DirectorySink, SessionRecord, Store};
use index::DirectoryIndex;
pub use index::FarmSessionCounts;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tsbroker_common::model;

pub use sync::LEASE_REFRESH;

/// Deltas kept while the directory loads; more, and the load starts over.
const MAX_QUEUED: usize = 65_536;

enum State {
    /// Reading everything for the first time; the commits meanwhile wait here, in order.
    Loading(Queue),
    /// Serving `index`. While everything is read again (`rereading`), it keeps serving — the
    /// database may be away, and what it knows is what returning users are sent back by — and
    /// the commits meanwhile go to it and wait for the new index too.
    Ready {
        index: DirectoryIndex,
        rereading: Option<Queue>,
    },
}

/// Commits made while an index is read, applied to it once it is in.
#[derive(Default)]
struct Queue {
    deltas: Vec<DirectoryDelta>,
    overflowed: bool,
}

impl Queue {
    fn push(&mut self, delta: DirectoryDelta) {
        if self.deltas.len() < MAX_QUEUED {
            self.deltas.push(delta);
        } else {
            self.overflowed = true;
        }
    }
}

/// What the sync task is asked to read.
enum Reload {
    Machines(Vec<uuid::Uuid>),
    Everything,
}

struct Shared {
    state: RwLock<State>,
    reloads: mpsc::UnboundedSender<Reload>,
    awake: Arc<wakefulness::Wakefulness>,
}

impl Shared {
    /// A read of everything begins: commits from now on wait for its index too.
    fn begin_reading(&self) {
        if let Ok(mut state) = self.state.write() {
            match &mut *state {
                State::Loading(queue) => *queue = Queue::default(),
                State::Ready { rereading, .. } => *rereading = Some(Queue::default()),
            }
        }
    }

    /// The read failed (the database is away): the index in use, if any, goes on serving
    /// what it knows until a read succeeds.
    fn reading_failed(&self) {
        if let Ok(mut state) = self.state.write()
            && let State::Ready { rereading, .. } = &mut *state
        {
            *rereading = None;
        }
    }

    /// Installs a freshly read index with the commits queued meanwhile; `false` (and nothing
    /// installed) when too many queued.
    fn install(&self, mut index: DirectoryIndex) -> bool {
        let Ok(mut state) = self.state.write() else {
            return false;
        };
        let queue = match &mut *state {
            State::Loading(queue) => std::mem::take(queue),
            State::Ready { rereading, .. } => rereading.take().unwrap_or_default(),
        };
        if queue.overflowed {
            return false;
        }
        for delta in queue.deltas {
            index.apply(delta);
        }
        *state = State::Ready {
            index,
            rereading: None,
        };
        true
    }

    fn update(&self, change: impl FnOnce(&mut DirectoryIndex)) {
        if let Ok(mut state) = self.state.write()
            && let State::Ready { index, .. } = &mut *state
        {
            change(index);
        }
    }

    /// The index in use, if any.
    /// See [`SessionDirectory::machine_label`].
    fn machine_label(&self, id: uuid::Uuid) -> String {
        let name = self.read(|index| index.machine_name(id).map(str::to_owned));
        match name {
            Some(name) => format!("{name} ({id})"),
            None => id.to_string(),
        }
    }

    fn read<R>(&self, answer: impl FnOnce(&DirectoryIndex) -> Option<R>) -> Option<R> {
        let state = self.state.read().ok()?;
        match &*state {
            State::Ready { index, .. } => answer(index),
            State::Loading(_) => None,
        }
    }
}

impl DirectorySink for Shared {
    fn apply(&self, mut delta: DirectoryDelta) {
        let reload = std::mem::take(&mut delta.reload);
        if delta.everything {
            let _ = self.reloads.send(Reload::Everything);
            return;
        }
        if let Ok(mut state) = self.state.write() {
            match &mut *state {
                State::Ready {
                    index,
                    rereading: None,
                } => index.apply(delta),
                State::Ready {
                    index,
                    rereading: Some(queue),
                } => {
                    index.apply(delta.clone());
                    queue.push(delta);
                }
                State::Loading(queue) => queue.push(delta),
            }
        }
        if !reload.is_empty() {
            let _ = self.reloads.send(Reload::Machines(reload));
        }
    }
}

/// Forwards the store's deltas to the shared state (the store holds this, not the state, so
/// the directory's task is not kept alive by the store).
struct Sink(std::sync::Weak<Shared>);

impl DirectorySink for Sink {
    fn apply(&self, delta: DirectoryDelta) {
        if let Some(shared) = self.0.upgrade() {
            shared.apply(delta);
        }
    }
}

/// The user's sessions as the directory knows them.
#[derive(Debug)]
pub struct DirectoryAnswer {
    /// The user's key (a truncated name resolved to the one user it can be).
    pub user_key: String,
    pub sessions: Vec<SessionRecord>,
}

/// Called with the machines another replica changed, once the directory has read them again
/// (the plug-ins' links resend them: `PluginHub::follow_other_replicas`).
pub type ChangedElsewhere = Arc<dyn Fn(Vec<uuid::Uuid>) + Send + Sync>;

/// A handle on the directory; its task stops with `stop`.
#[derive(Clone)]
pub struct SessionDirectory {
    shared: Arc<Shared>,
}

impl SessionDirectory {
    /// Attaches a directory to `store` and starts loading it; it follows the store's commits
    /// from this moment.
    pub fn start(
        store: Arc<dyn Store>,
        stop: CancellationToken,
        changed_elsewhere: Option<ChangedElsewhere>,
    ) -> Self {
        let (reloads, requests) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            state: RwLock::new(State::Loading(Queue::default())),
            reloads,
            awake: Arc::new(wakefulness::Wakefulness::new()),
        });
        tokio::spawn(shared.awake.clone().run(stop.clone()));
        store.attach_directory(Arc::new(Sink(Arc::downgrade(&shared))));
        tokio::spawn(sync::run(
            store,
            shared.clone(),
            requests,
            changed_elsewhere,
            stop,
        ));
        SessionDirectory { shared }
    }

    /// Whether the directory answers (loaded and current).
    pub fn is_loaded(&self) -> bool {
        self.shared.read(|_| Some(())).is_some()
    }

    /// How many sessions the directory holds (`None` while it is not loaded).
    pub fn session_count(&self) -> Option<usize> {
        self.shared.read(|index| Some(index.session_count()))
    }

    /// Each farm's sessions by state (`None` while the directory is not loaded).
    pub fn session_counts(&self) -> Option<Vec<FarmSessionCounts>> {
        self.shared.read(|index| Some(index.session_counts()))
    }

    /// The user's sessions in the farm; a name that may be cut from an `mstshash` cookie
    /// (`may_be_cut`: `decision::may_be_cut` judges it) and matches no user is taken as the
    /// prefix of the one user it can be (of several, the one with a session from the IP of
    /// `client_address`, read only then, when only one has), and a name in user principal form that matches no user
    /// (`ann@example.com`, as Windows clients send it) as its user part (`ann`, as PAM reports
    /// Linux logons) when that one has sessions. `None` when the directory is not loaded, or
    /// not trusted just after this broker was paused (`wakefulness.rs`).
    /// `id`'s machine as the log names it: its name and id (the id alone when the directory
    /// does not know it, or is loading).
    pub fn machine_label(&self, id: uuid::Uuid) -> String {
        self.shared.machine_label(id)
    }

    pub fn lookup(
        &self,
        farm: &str,
        user_name: &str,
        domain: &str,
        may_be_cut: bool,
        client_address: &str,
    ) -> Option<DirectoryAnswer> {
        if !self.shared.awake.trusted() {
            return None;
        }
        let name = UserName {
            user_name,
            domain,
            may_be_cut,
        };
        self.shared
            .read(|index| lookup_in(index, farm, &name, client_address))
    }

    /// The sessions of the one user with sessions in the farm from the client's IP (for a
    /// client that named no user); `None` when none or several users have, or the directory
    /// is not loaded or not trusted.
    pub fn client_user(&self, farm: &str, client: IpAddr) -> Option<DirectoryAnswer> {
        if !self.shared.awake.trusted() {
            return None;
        }
        self.shared.read(|index| {
            let user_key = only(index.users_from_client(farm, client, "", 2))?;
            let sessions = index.sessions_of(farm, &user_key);
            Some(DirectoryAnswer { user_key, sessions })
        })
    }
}

/// A user as a redirect names them.
struct UserName<'a> {
    user_name: &'a str,
    domain: &'a str,
    may_be_cut: bool,
}

/// [`SessionDirectory::lookup`] in a loaded index.
fn lookup_in(
    index: &DirectoryIndex,
    farm: &str,
    name: &UserName,
    client_address: &str,
) -> Option<DirectoryAnswer> {
    {
        let may_be_cut = name.may_be_cut;
        let user_key = model::user_key(name.user_name);
        let answer = |user_key: String| {
            let sessions = index.sessions_of(farm, &user_key);
            Some(DirectoryAnswer { user_key, sessions })
        };
        // For a name mstsc may have cut: the one user it starts with who has a session from
        // the client's address. Among several longer names, that one is coming back; so it is
        // when it is a longer name and the name is also someone's whole name (`valentina`,
        // and the cut `valentina.r`).
        let from_client = may_be_cut
            .then(|| model::client_ip(client_address))
            .flatten()
            .and_then(|ip| only(index.users_from_client(farm, ip, &user_key, 2)));
        if let Some(full_key) = from_client.clone().filter(|key| *key != user_key) {
            return answer(full_key);
        }
        let sessions = index.sessions_of(farm, &user_key);
        if !sessions.is_empty() {
            return Some(or_user_part(index, farm, name, (user_key, sessions)));
        }
        if may_be_cut {
            let full_key = match index.users_with_prefix(farm, &user_key, 2).as_slice() {
                [full_key] => Some(full_key.clone()),
                [] => None,
                _ => from_client,
            };
            if let Some(full_key) = full_key {
                return answer(full_key);
            }
        }
        Some(or_user_part(index, farm, name, (user_key, sessions)))
    }
}

/// A name in user principal form whose sessions are none of the domain asked for (or who has
/// none): its user part's, when that one has sessions ([`upn_fallback`]).
fn or_user_part(
    index: &DirectoryIndex,
    farm: &str,
    name: &UserName,
    whole: (String, Vec<SessionRecord>),
) -> DirectoryAnswer {
    let in_domain = |sessions: &[SessionRecord]| {
        sessions
            .iter()
            .any(|session| session.is_of_domain(name.domain))
    };
    let (user_key, sessions) = match model::upn_user_part(name.user_name) {
        Some(user) if !in_domain(&whole.1) => {
            let short_key = model::user_key(user);
            let sessions = index.sessions_of(farm, &short_key);
            upn_fallback(whole, (short_key, sessions), in_domain)
        }
        _ => whole,
    };
    DirectoryAnswer { user_key, sessions }
}

/// Of a `user@domain` name's sessions (`whole`) with none of the domain asked for
/// (`in_domain`), and its user part's (`part`): the user part's when it has some of that
/// domain, or when the whole name has no session at all and the user part has some (a new
/// logon is then held under the user part's name); the whole name's otherwise.
pub fn upn_fallback<T>(
    whole: (String, Vec<T>),
    part: (String, Vec<T>),
    in_domain: impl Fn(&[T]) -> bool,
) -> (String, Vec<T>) {
    if in_domain(&part.1) || (whole.1.is_empty() && !part.1.is_empty()) {
        part
    } else {
        whole
    }
}

/// The one key of a list that has exactly one.
fn only(keys: Vec<String>) -> Option<String> {
    match <[String; 1]>::try_from(keys) {
        Ok([key]) => Some(key),
        Err(_) => None,
    }
}
