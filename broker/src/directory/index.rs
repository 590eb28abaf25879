//! The in-memory index behind the session directory: every session of every farm by user (what
//! a redirect asks: a hash lookup, with the user keys also in order for prefix lookups) and by
//! machine (to apply deletes and machine reloads), and each machine's redirect details and
//! lease. Pure data, no I/O: `sync.rs` keeps it current.

use crate::store::{DirectoryDelta, DirectoryMachine, MachineLease, SessionRecord, SessionRow};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU64;
use std::ops::Bound;
use std::sync::Arc;
use tsbroker_common::model::{SessionState, client_ip};
use uuid::Uuid;

/// A session as the index keeps it (the user's key is the map's key). A million of these are
/// held: the user's name only when it differs from the key.
#[derive(Clone, Debug)]
struct SessionEntry {
    machine_id: Uuid,
    session_id: i64,
    user_name: Option<Box<str>>,
    domain: Box<str>,
    state: SessionState,
    /// Where the client connected from ([`client_key`] of the address's IP).
    client: Option<NonZeroU64>,
    logon_at: i64,
    state_changed_at: i64,
}

/// A machine's sessions: session id → the user key it is filed under (in the machine's farm).
#[derive(Debug)]
struct MachineSessions {
    farm: Arc<str>,
    users: HashMap<i64, Arc<str>>,
}

/// A farm's users: by key for the redirect's exact lookup (a hash and one comparison, where an
/// ordered map compares the key with dozens of others), and the keys in order for the rare
/// lookup of a truncated name by prefix.
#[derive(Default)]
struct FarmUsers {
    sessions: HashMap<Arc<str>, Vec<SessionEntry>>,
    ordered: BTreeSet<Arc<str>>,
    /// (client key, user key) → how many of the user's sessions came from that client: who
    /// a client that names no user, or a cut name several users share, can be. A B-tree, not
    /// a hash map of lists: ~45 bytes a session where that took ~130 (a million sessions
    /// from a million addresses: +145 MiB, past the 1 GiB the scale benchmark allows).
    by_client: BTreeMap<(u64, Arc<str>), u32>,
    /// How many of the farm's sessions are in each state (by [`state_slot`]), kept as
    /// sessions are filed and unfiled so that the metrics never walk a million sessions.
    by_state: [usize; 2],
}

/// The farm's session counts by state, as the metrics show them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FarmSessionCounts {
    pub farm: String,
    pub active: usize,
    pub disconnected: usize,
}

fn state_slot(state: SessionState) -> usize {
    match state {
        SessionState::Active => 0,
        SessionState::Disconnected => 1,
    }
}

#[derive(Default)]
pub struct DirectoryIndex {
    machines: HashMap<Uuid, DirectoryMachine>,
    /// Per machine: where each of its sessions is filed.
    by_machine: HashMap<Uuid, MachineSessions>,
    /// Per farm: user key → the user's sessions.
    farms: HashMap<Arc<str>, FarmUsers>,
    sessions: usize,
}

impl DirectoryIndex {
    pub fn session_count(&self) -> usize {
        self.sessions
    }

    /// The machine's name, when the index has it.
    pub fn machine_name(&self, id: Uuid) -> Option<&str> {
        self.machines.get(&id).map(|machine| machine.name.as_str())
    }

    pub fn machine_count(&self) -> usize {
        self.machines.len()
    }

    /// Every farm with sessions, with their count in each state.
    pub fn session_counts(&self) -> Vec<FarmSessionCounts> {
        self.farms
            .iter()
            .map(|(farm, users)| FarmSessionCounts {
                farm: farm.to_string(),
                active: users.by_state[state_slot(SessionState::Active)],
                disconnected: users.by_state[state_slot(SessionState::Disconnected)],
            })
            .collect()
    }

    /// Creates or replaces a session (absolute row: applying it again changes nothing).
    pub fn upsert_session(&mut self, row: SessionRow) {
        self.file_session(row, true);
    }

    /// Files a session of the full load: as [`Self::upsert_session`], but the user keys are put
    /// in order once, by [`Self::order_keys`] after the last row (a sort and a bulk build
    /// rather than one B-tree insertion per user: the B-tree was 9 % of a restarted broker's
    /// CPU while a million sessions loaded and 10,000 agents resynced).
    pub fn load_session(&mut self, row: SessionRow) {
        self.file_session(row, false);
    }

    /// Puts every farm's user keys in order (after [`Self::load_session`]).
    pub fn order_keys(&mut self) {
        for users in self.farms.values_mut() {
            users.ordered = users.sessions.keys().cloned().collect();
        }
    }

    fn file_session(&mut self, row: SessionRow, keep_order: bool) {
        self.delete_session(row.machine_id, row.session_id);
        let farm = self.intern_farm(&row.farm);
        let users = self.farms.entry(farm.clone()).or_default();
        let user_key: Arc<str> = match users.sessions.get_key_value(row.user_key.as_str()) {
            Some((key, _)) => key.clone(),
            None => {
                let key: Arc<str> = Arc::from(row.user_key.as_str());
                if keep_order {
                    users.ordered.insert(key.clone());
                }
                key
            }
        };
        let user_name = (row.user_name != row.user_key).then(|| row.user_name.into_boxed_str());
        let state = SessionState::parse(&row.state).unwrap_or(SessionState::Active);
        users.by_state[state_slot(state)] += 1;
        let client = client_ip(&row.client_address).map(client_key);
        if let Some(client) = client {
            *users
                .by_client
                .entry((client.get(), user_key.clone()))
                .or_default() += 1;
        }
        users
            .sessions
            .entry(user_key.clone())
            // Most users have one session: room for one, where a first push would make room
            // for four (240 bytes a user that a million of them never use).
            .or_insert_with(|| Vec::with_capacity(1))
            .push(SessionEntry {
                machine_id: row.machine_id,
                session_id: row.session_id,
                user_name,
                domain: row.domain.into_boxed_str(),
                state,
                client,
                logon_at: row.logon_at,
                state_changed_at: row.state_changed_at,
            });
        self.by_machine
            .entry(row.machine_id)
            .or_insert_with(|| MachineSessions {
                farm,
                users: HashMap::new(),
            })
            .users
            .insert(row.session_id, user_key);
        self.sessions += 1;
    }

    /// Forgets a session, if known.
    pub fn delete_session(&mut self, machine: Uuid, session_id: i64) {
        let Some(sessions) = self.by_machine.get_mut(&machine) else {
            return;
        };
        let Some(user_key) = sessions.users.remove(&session_id) else {
            return;
        };
        let farm = sessions.farm.clone();
        if sessions.users.is_empty() {
            self.by_machine.remove(&machine);
        }
        self.unfile(&farm, &user_key, machine, session_id);
    }

    /// Forgets every session of the machine.
    pub fn clear_machine_sessions(&mut self, machine: Uuid) {
        let Some(sessions) = self.by_machine.remove(&machine) else {
            return;
        };
        for (session_id, user_key) in sessions.users {
            self.unfile(&sessions.farm, &user_key, machine, session_id);
        }
    }

    /// The machine as stored now (`None`: it is gone).
    pub fn set_machine(&mut self, id: Uuid, machine: Option<DirectoryMachine>) {
        match machine {
            Some(machine) => {
                self.machines.insert(id, machine);
            }
            None => {
                self.machines.remove(&id);
            }
        }
    }

    /// The machine was heard from at `at`.
    pub fn seen(&mut self, id: Uuid, at: i64) {
        if let Some(machine) = self.machines.get_mut(&id) {
            machine.last_seen_at = machine.last_seen_at.max(at);
        }
    }

    /// The machine's state changed at `at`.
    pub fn set_state(&mut self, id: Uuid, state: &str, at: i64) {
        if let Some(machine) = self.machines.get_mut(&id) {
            state.clone_into(&mut machine.state);
            machine.updated_at = machine.updated_at.max(at);
        }
    }

    /// The machine's lease as stored; its state only if the row is not older than what the
    /// index already has (a lease read before a change applied since is stale).
    pub fn set_lease(&mut self, lease: MachineLease) {
        if let Some(machine) = self.machines.get_mut(&lease.id) {
            machine.last_seen_at = machine.last_seen_at.max(lease.last_seen_at);
            if lease.updated_at >= machine.updated_at {
                machine.state = lease.state;
                machine.updated_at = lease.updated_at;
            }
        }
    }

    /// The machine and its sessions are gone.
    pub fn remove_machine(&mut self, id: Uuid) {
        self.clear_machine_sessions(id);
        self.machines.remove(&id);
    }

    /// Applies what a commit did (everything but `reload`, which needs a read).
    pub fn apply(&mut self, delta: DirectoryDelta) {
        for id in delta.removed {
            self.remove_machine(id);
        }
        for machine in delta.machines {
            self.set_machine(machine.id, Some(machine));
        }
        for (id, state) in &delta.states {
            self.set_state(*id, state, delta.at);
        }
        for (machine, session_id) in delta.deletes {
            self.delete_session(machine, session_id);
        }
        for row in delta.upserts {
            self.upsert_session(row);
        }
        for id in delta.seen {
            self.seen(id, delta.at);
        }
    }

    /// The user's sessions in the farm, with their machines. A session whose machine the index
    /// does not know comes with machine state "unknown" (never reachable): the caller asks the
    /// database. The client address is not kept (only a key of its IP): empty.
    pub fn sessions_of(&self, farm: &str, user_key: &str) -> Vec<SessionRecord> {
        let Some(entries) = self
            .farms
            .get(farm)
            .and_then(|users| users.sessions.get(user_key))
        else {
            return Vec::new();
        };
        entries
            .iter()
            .map(|entry| {
                let machine = self.machines.get(&entry.machine_id);
                SessionRecord {
                    machine_id: entry.machine_id,
                    machine_name: machine.map(|m| m.name.clone()).unwrap_or_default(),
                    machine_address: machine.map(|m| m.address.clone()).unwrap_or_default(),
                    machine_state: machine.map_or_else(|| "unknown".into(), |m| m.state.clone()),
                    machine_last_seen_at: machine.map_or(i64::MIN, |m| m.last_seen_at),
                    machine_front_door: machine.is_some_and(|m| m.front_door),
                    farm: farm.to_owned(),
                    session_id: entry.session_id,
                    user_name: entry.user_name.as_deref().unwrap_or(user_key).to_owned(),
                    domain: entry.domain.to_string(),
                    state: entry.state.as_str().to_owned(),
                    client_address: String::new(),
                    logon_at: entry.logon_at,
                    state_changed_at: entry.state_changed_at,
                }
            })
            .collect()
    }

    /// Distinct user keys with a session in the farm that start with `prefix` (at most
    /// `limit`, in order).
    pub fn users_with_prefix(&self, farm: &str, prefix: &str, limit: usize) -> Vec<String> {
        let Some(users) = self.farms.get(farm) else {
            return Vec::new();
        };
        users
            .ordered
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|key| key.starts_with(prefix))
            .take(limit)
            .map(|key| key.to_string())
            .collect()
    }

    /// The keys of the users with a session in the farm from `ip` that start with `prefix`
    /// (`""`: any), each once, at most `limit` of them (an office behind one NAT address can
    /// have thousands).
    pub fn users_from_client(
        &self,
        farm: &str,
        ip: IpAddr,
        prefix: &str,
        limit: usize,
    ) -> Vec<String> {
        let Some(users) = self.farms.get(farm) else {
            return Vec::new();
        };
        let client = client_key(ip).get();
        let from = (client, Arc::<str>::from(prefix));
        users
            .by_client
            .range((Bound::Included(from), Bound::Unbounded))
            .take_while(|((key, user), _)| *key == client && user.starts_with(prefix))
            .take(limit)
            .map(|((_, user), _)| user.to_string())
            .collect()
    }

    fn intern_farm(&mut self, farm: &str) -> Arc<str> {
        match self.farms.get_key_value(farm) {
            Some((key, _)) => key.clone(),
            None => Arc::from(farm),
        }
    }

    fn unfile(&mut self, farm: &str, user_key: &Arc<str>, machine: Uuid, session_id: i64) {
        let Some(users) = self.farms.get_mut(farm) else {
            return;
        };
        let Some(entries) = users.sessions.get_mut(user_key) else {
            return;
        };
        // One entry at most: filing a session unfiles its earlier row first.
        let Some(position) = entries
            .iter()
            .position(|entry| entry.machine_id == machine && entry.session_id == session_id)
        else {
            return;
        };
        let entry = entries.remove(position);
        let count = &mut users.by_state[state_slot(entry.state)];
        *count = count.saturating_sub(1);
        self.sessions -= 1;
        if entries.is_empty() {
            users.sessions.remove(user_key);
            users.ordered.remove(user_key);
        }
        if let Some(client) = entry.client {
            let key = (client.get(), user_key.clone());
            if let Some(count) = users.by_client.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    users.by_client.remove(&key);
                }
            }
        }
        if users.sessions.is_empty() {
            self.farms.remove(farm);
        }
    }
}

/// A client IP as the index keys it, in 8 bytes: an IPv4 address itself (above 2^32, so never
/// zero), an IPv6 one hashed (top bit set: never equal to an IPv4 key). Two IPv6 clients whose
/// keys collide (about one chance in 10^7 among a million of them) would share their users,
/// which only sends a client that named no user on to a machine where it logs on as itself.
fn client_key(ip: IpAddr) -> NonZeroU64 {
    let key = match ip {
        IpAddr::V4(v4) => (1 << 32) | u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            v6.hash(&mut hasher);
            hasher.finish() | (1 << 63)
        }
    };
    NonZeroU64::new(key).unwrap_or(NonZeroU64::MIN)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::directory) fn row(
        machine: u128,
        session_id: i64,
        user: &str,
        state: &str,
    ) -> SessionRow {
        SessionRow {
            machine_id: Uuid::from_u128(machine),
            session_id,
            farm: "f".into(),
            user_name: user.to_uppercase(),
            user_key: user.into(),
            domain: String::new(),
            state: state.into(),
            client_address: "10.0.0.1:5000".into(),
            logon_at: 10,
            state_changed_at: 20,
        }
    }

    pub(in crate::directory) fn machine(id: u128) -> DirectoryMachine {
        DirectoryMachine {
            id: Uuid::from_u128(id),
            farm: "f".into(),
            name: format!("ts{id}"),
            address: format!("ts{id}:3389"),
            front_door: false,
            state: "ready".into(),
            last_seen_at: 100,
            updated_at: 100,
        }
    }

    #[test]
    fn sessions_are_found_by_user_with_their_machine() {
        let mut index = DirectoryIndex::default();
        index.set_machine(Uuid::from_u128(1), Some(machine(1)));
        index.upsert_session(row(1, 7, "alice", "disconnected"));
        index.upsert_session(row(2, 3, "alice", "active"));
        let sessions = index.sessions_of("f", "alice");
        assert_eq!(sessions.len(), 2);
        let on_known = sessions.iter().find(|s| s.session_id == 7).unwrap();
        assert_eq!(on_known.machine_address, "ts1:3389");
        assert_eq!(on_known.user_name, "ALICE");
        assert_eq!(on_known.state, "disconnected");
        assert!(on_known.machine_takes_its_users_back(50));
        let on_unknown = sessions.iter().find(|s| s.session_id == 3).unwrap();
        assert!(!on_unknown.machine_takes_its_users_back(i64::MIN));
        assert!(index.sessions_of("f", "bob").is_empty());
        assert!(index.sessions_of("g", "alice").is_empty());
    }

    #[test]
    fn a_user_with_one_session_takes_room_for_one() {
        let mut index = DirectoryIndex::default();
        index.upsert_session(row(1, 7, "alice", "active"));
        index.load_session(row(1, 8, "bob", "active"));
        index.order_keys();
        let room = |user: &str| index.farms["f"].sessions[user].capacity();
        assert_eq!((room("alice"), room("bob")), (1, 1));
        index.upsert_session(row(2, 9, "alice", "disconnected"));
        assert_eq!(index.sessions_of("f", "alice").len(), 2);
    }

    #[test]
    fn upserts_replace_and_follow_a_reused_session_id() {
        let mut index = DirectoryIndex::default();
        index.upsert_session(row(1, 7, "alice", "active"));
        index.upsert_session(row(1, 7, "alice", "disconnected"));
        assert_eq!(index.session_count(), 1);
        assert_eq!(index.sessions_of("f", "alice")[0].state, "disconnected");
        // The session id now belongs to bob: alice has nothing left.
        index.upsert_session(row(1, 7, "bob", "active"));
        assert!(index.sessions_of("f", "alice").is_empty());
        assert_eq!(index.sessions_of("f", "bob").len(), 1);
        assert_eq!(index.session_count(), 1);
    }

    #[test]
    fn deletes_and_machine_clears_forget_sessions() {
        let mut index = DirectoryIndex::default();
        index.upsert_session(row(1, 1, "alice", "active"));
        index.upsert_session(row(1, 2, "bob", "active"));
        index.upsert_session(row(2, 1, "carol", "active"));
        index.delete_session(Uuid::from_u128(1), 1);
        index.delete_session(Uuid::from_u128(9), 1);
        assert!(index.sessions_of("f", "alice").is_empty());
        index.clear_machine_sessions(Uuid::from_u128(1));
        assert!(index.sessions_of("f", "bob").is_empty());
        assert_eq!(index.sessions_of("f", "carol").len(), 1);
        assert_eq!(index.session_count(), 1);
    }

    #[test]
    fn a_user_whose_sessions_are_gone_is_no_longer_found_by_prefix() {
        let mut index = DirectoryIndex::default();
        index.upsert_session(row(1, 1, "alexander", "active"));
        index.upsert_session(row(1, 2, "alexandra", "active"));
        index.upsert_session(row(2, 3, "alexandra", "active"));
        index.delete_session(Uuid::from_u128(1), 1);
        assert_eq!(index.users_with_prefix("f", "alexand", 2), ["alexandra"]);
        // One of alexandra's two sessions gone: she is still found.
        index.clear_machine_sessions(Uuid::from_u128(1));
        assert_eq!(index.users_with_prefix("f", "alexand", 2), ["alexandra"]);
        index.remove_machine(Uuid::from_u128(2));
        assert!(index.users_with_prefix("f", "alexand", 2).is_empty());
        assert_eq!(index.session_count(), 0);
    }

    #[test]
    fn a_full_load_orders_the_keys_at_the_end() {
        let mut loaded = DirectoryIndex::default();
        for (session_id, user) in ["alexandra", "bob", "alexander", "alexandra"]
            .into_iter()
            .enumerate()
        {
            loaded.load_session(row(1, session_id as i64, user, "active"));
        }
        // A later row for session 1 (bob's) replaces it: bob has nothing left.
        loaded.load_session(row(1, 1, "alexandrb", "active"));
        loaded.order_keys();
        assert_eq!(loaded.session_count(), 4);
        assert_eq!(
            loaded.users_with_prefix("f", "alexand", 3),
            ["alexander", "alexandra", "alexandrb"]
        );
        assert!(loaded.users_with_prefix("f", "bo", 3).is_empty());
        // Live changes after the load keep the order.
        loaded.upsert_session(row(2, 1, "alexandr", "active"));
        loaded.delete_session(Uuid::from_u128(1), 2);
        assert_eq!(
            loaded.users_with_prefix("f", "alexand", 3),
            ["alexandr", "alexandra", "alexandrb"]
        );
    }

    #[test]
    fn prefixes_and_leases() {
        let mut index = DirectoryIndex::default();
        for (session_id, user) in ["alexander", "alexandra", "bob", "alexandrb"]
            .into_iter()
            .enumerate()
        {
            index.upsert_session(row(1, session_id as i64, user, "active"));
        }
        assert_eq!(
            index.users_with_prefix("f", "alexand", 2),
            ["alexander", "alexandra"]
        );
        assert_eq!(
            index.users_with_prefix("f", "alexanda", 2),
            Vec::<String>::new()
        );
        assert_eq!(index.users_with_prefix("f", "bob", 2), ["bob"]);

        let id = Uuid::from_u128(1);
        index.set_machine(id, Some(machine(1)));
        index.seen(id, 500);
        index.set_lease(MachineLease {
            id,
            state: "unreachable".into(),
            last_seen_at: 300,
            updated_at: 300,
        });
        let session = &index.sessions_of("f", "bob")[0];
        assert_eq!(session.machine_last_seen_at, 500);
        assert_eq!(session.machine_state, "unreachable");
        // A state applied since wins over a lease read before it.
        index.set_state(id, "ready", 400);
        index.set_lease(MachineLease {
            id,
            state: "unreachable".into(),
            last_seen_at: 350,
            updated_at: 350,
        });
        assert_eq!(index.sessions_of("f", "bob")[0].machine_state, "ready");
        index.remove_machine(id);
        assert_eq!(index.machine_count(), 0);
        assert!(index.sessions_of("f", "bob").is_empty());
    }

    #[test]
    fn client_addresses_follow_every_change() {
        let mut index = DirectoryIndex::default();
        let from = |address: &str, row: SessionRow| SessionRow {
            client_address: address.into(),
            ..row
        };
        let ip = |ip: &str| ip.parse::<IpAddr>().unwrap();
        index.upsert_session(row(1, 1, "ann", "active"));
        index.upsert_session(from("10.0.0.2:1", row(1, 2, "bob", "active")));
        assert_eq!(index.users_from_client("f", ip("10.0.0.1"), "", 2), ["ann"]);
        // Two sessions of one user from one address: one user, until both are gone.
        index.upsert_session(row(2, 9, "ann", "active"));
        index.delete_session(Uuid::from_u128(2), 9);
        assert_eq!(index.users_from_client("f", ip("10.0.0.1"), "", 2), ["ann"]);
        // IPv6 clients have their own keys.
        index.upsert_session(from("[2001:db8::1]:4000", row(3, 1, "dave", "active")));
        assert_eq!(
            index.users_from_client("f", ip("2001:db8::1"), "", 2),
            ["dave"]
        );
        assert!(
            index
                .users_from_client("f", ip("2001:db8::2"), "", 2)
                .is_empty()
        );
        index.clear_machine_sessions(Uuid::from_u128(3));
        // Ann reconnects from elsewhere; session 2 is reused by carol, from there too.
        index.upsert_session(from("10.0.0.3", row(1, 1, "ann", "active")));
        index.upsert_session(from("[::ffff:10.0.0.3]:7", row(1, 2, "carol", "active")));
        assert!(
            index
                .users_from_client("f", ip("10.0.0.1"), "", 2)
                .is_empty()
        );
        assert!(
            index
                .users_from_client("f", ip("10.0.0.2"), "", 2)
                .is_empty()
        );
        let mut both = index.users_from_client("f", ip("10.0.0.3"), "", 2);
        both.sort();
        assert_eq!(both, ["ann", "carol"]);
        assert_eq!(index.users_from_client("f", ip("10.0.0.3"), "", 1).len(), 1);
        assert_eq!(
            index.users_from_client("f", ip("10.0.0.3"), "car", 2),
            ["carol"]
        );
        assert!(
            index
                .users_from_client("g", ip("10.0.0.3"), "", 2)
                .is_empty()
        );
        index.delete_session(Uuid::from_u128(1), 1);
        assert_eq!(
            index.users_from_client("f", ip("10.0.0.3"), "", 2),
            ["carol"]
        );
        index.clear_machine_sessions(Uuid::from_u128(1));
        assert!(
            index
                .users_from_client("f", ip("10.0.0.3"), "", 2)
                .is_empty()
        );
        assert!(index.farms.is_empty());
    }

    #[test]
    fn session_counts_follow_every_change() {
        let mut index = DirectoryIndex::default();
        let counts = |index: &DirectoryIndex| {
            let mut counts = index.session_counts();
            counts.sort_by(|a, b| a.farm.cmp(&b.farm));
            counts
                .into_iter()
                .map(|c| (c.farm, c.active, c.disconnected))
                .collect::<Vec<_>>()
        };
        index.upsert_session(row(1, 1, "alice", "active"));
        index.upsert_session(row(1, 2, "bob", "disconnected"));
        index.upsert_session(row(2, 1, "carol", "active"));
        let mut other = row(3, 1, "dave", "active");
        other.farm = "g".into();
        index.upsert_session(other);
        assert_eq!(counts(&index), [("f".into(), 2, 1), ("g".into(), 1, 0)]);
        // A state change is a new row for the same session: counted once, in its new state.
        index.upsert_session(row(1, 1, "alice", "disconnected"));
        assert_eq!(counts(&index)[0], ("f".into(), 1, 2));
        index.delete_session(Uuid::from_u128(1), 2);
        index.delete_session(Uuid::from_u128(1), 2);
        assert_eq!(counts(&index)[0], ("f".into(), 1, 1));
        index.clear_machine_sessions(Uuid::from_u128(1));
        assert_eq!(counts(&index)[0], ("f".into(), 1, 0));
        index.remove_machine(Uuid::from_u128(3));
        assert_eq!(counts(&index), [("f".into(), 1, 0)]);
        assert_eq!(index.session_count(), 1);
    }
}
