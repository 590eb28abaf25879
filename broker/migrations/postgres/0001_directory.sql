-- The session directory. Times are milliseconds since the Unix epoch (BIGINT) on both
-- backends; user_key and name_key are the lowercased names that lookups match on.

CREATE TABLE farms (
    name TEXT PRIMARY KEY,
    policy TEXT NOT NULL DEFAULT 'session-count',
    created_at BIGINT NOT NULL
);

CREATE TABLE machines (
    id UUID PRIMARY KEY,
    farm TEXT NOT NULL REFERENCES farms (name),
    name TEXT NOT NULL,
    name_key TEXT NOT NULL,
    address TEXT NOT NULL,
    agent_weight BIGINT NOT NULL,
    admin_weight BIGINT,
    agent_session_limit BIGINT NOT NULL,
    admin_session_limit BIGINT,
    single_session BOOLEAN NOT NULL,
    agent_version TEXT NOT NULL,
    state TEXT NOT NULL,
    draining BOOLEAN NOT NULL DEFAULT FALSE,
    connection_id UUID,
    session_count BIGINT NOT NULL DEFAULT 0,
    load_cpu DOUBLE PRECISION,
    load_memory DOUBLE PRECISION,
    load_sessions BIGINT,
    load_pending BIGINT,
    last_seen_at BIGINT NOT NULL,
    ready_since BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    UNIQUE (farm, name_key)
);

CREATE TABLE sessions (
    machine_id UUID NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    session_id BIGINT NOT NULL,
    farm TEXT NOT NULL,
    user_name TEXT NOT NULL,
    user_key TEXT COLLATE "C" NOT NULL,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    client_address TEXT NOT NULL,
    logon_at BIGINT NOT NULL,
    state_changed_at BIGINT NOT NULL,
    PRIMARY KEY (machine_id, session_id)
);

-- Redirect's first question: this user's sessions in this farm (and prefix look-ups for
-- truncated names, hence the "C" collation).
CREATE INDEX sessions_by_farm_user ON sessions (farm, user_key);

CREATE TABLE pending_logons (
    farm TEXT NOT NULL REFERENCES farms (name),
    user_key TEXT NOT NULL,
    machine_id UUID NOT NULL REFERENCES machines (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (farm, user_key)
);

CREATE INDEX pending_logons_by_expiry ON pending_logons (farm, expires_at);
CREATE INDEX pending_logons_by_machine ON pending_logons (machine_id);
