-- SQLite twin of migrations/postgres: UUIDs as 16-byte BLOBs, booleans as 0/1.
-- The session directory. Times are milliseconds since the Unix epoch (INTEGER) on both
-- backends; user_key and name_key are the lowercased names that lookups match on.

CREATE TABLE farms (
    name TEXT PRIMARY KEY,
    policy TEXT NOT NULL DEFAULT 'session-count',
    created_at INTEGER NOT NULL
);

CREATE TABLE machines (
    id BLOB PRIMARY KEY,
    farm TEXT NOT NULL REFERENCES farms (name),
    name TEXT NOT NULL,
    name_key TEXT NOT NULL,
    address TEXT NOT NULL,
    agent_weight INTEGER NOT NULL,
    admin_weight INTEGER,
    agent_session_limit INTEGER NOT NULL,
    admin_session_limit INTEGER,
    single_session INTEGER NOT NULL,
    agent_version TEXT NOT NULL,
    state TEXT NOT NULL,
    draining INTEGER NOT NULL DEFAULT 0,
    connection_id BLOB,
    session_count INTEGER NOT NULL DEFAULT 0,
    load_cpu REAL,
    load_memory REAL,
    load_sessions INTEGER,
    load_pending INTEGER,
    last_seen_at INTEGER NOT NULL,
    ready_since INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    UNIQUE (farm, name_key)
);

CREATE TABLE sessions (
    machine_id BLOB NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    session_id INTEGER NOT NULL,
    farm TEXT NOT NULL,
    user_name TEXT NOT NULL,
    user_key TEXT NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    client_address TEXT NOT NULL,
    logon_at INTEGER NOT NULL,
    state_changed_at INTEGER NOT NULL,
    PRIMARY KEY (machine_id, session_id)
);

-- Redirect's first question: this user's sessions in this farm (and prefix look-ups for
-- truncated names, hence the "C" collation).
CREATE INDEX sessions_by_farm_user ON sessions (farm, user_key);

CREATE TABLE pending_logons (
    farm TEXT NOT NULL REFERENCES farms (name),
    user_key TEXT NOT NULL,
    machine_id BLOB NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (farm, user_key)
);

CREATE INDEX pending_logons_by_expiry ON pending_logons (farm, expires_at);
CREATE INDEX pending_logons_by_machine ON pending_logons (machine_id);
