//! The SQL both backends share, and the one `Store` implementation that both expand.
//!
//! The queries use `$n` placeholders, `ON CONFLICT` and `RETURNING`, which PostgreSQL and
//! SQLite both understand. What differs lives in small hooks on each backend's struct:
//! how a write transaction starts, how a row is locked, how a change is announced.

/// Columns of a machine row plus its unexpired pending logons (`$1` is "now").
macro_rules! machine_select {
    () => {
        "SELECT m.id, m.farm, m.name, m.address, m.agent_weight, m.admin_weight, \
         m.agent_session_limit, m.admin_session_limit, m.single_session, m.agent_version, \
         m.state, m.draining, m.connection_id, m.session_count, m.load_cpu, m.load_memory, \
         m.load_sessions, m.load_pending, m.last_seen_at, m.ready_since, m.created_at, \
         m.updated_at, m.front_door, \
         (SELECT count(*) FROM pending_logons p WHERE p.machine_id = m.id AND p.expires_at > $1) \
         AS pending_logons \
         FROM machines m "
    };
}

/// Columns of a session row joined with its machine.
macro_rules! session_select {
    () => {
        "SELECT s.machine_id, m.name AS machine_name, m.address AS machine_address, \
         m.state AS machine_state, m.last_seen_at AS machine_last_seen_at, \
         m.front_door AS machine_front_door, s.farm, s.session_id, \
         s.user_name, s.domain, s.state, s.client_address, s.logon_at, s.state_changed_at \
         FROM sessions s JOIN machines m ON m.id = s.machine_id "
    };
}

pub(super) const INSERT_FARM: &str = "INSERT INTO farms (name, created_at, policy) \
     VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING";

pub(super) const DECLARE_FARM: &str = "INSERT INTO farms (name, created_at, policy) \
     VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET policy = excluded.policy";

pub(super) const UPSERT_MACHINE: &str = "INSERT INTO machines \
     (id, farm, name, name_key, address, agent_weight, agent_session_limit, single_session, \
      agent_version, state, connection_id, session_count, last_seen_at, created_at, updated_at, \
      front_door) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'joining', $10, 0, $11, $11, $11, $12) \
     ON CONFLICT (id) DO UPDATE SET name = excluded.name, address = excluded.address, \
     agent_weight = excluded.agent_weight, agent_session_limit = excluded.agent_session_limit, \
     single_session = excluded.single_session, agent_version = excluded.agent_version, \
     front_door = excluded.front_door, state = 'joining', connection_id = excluded.connection_id, \
     last_seen_at = excluded.last_seen_at, updated_at = excluded.updated_at";

pub(super) const SELECT_MACHINE_BY_ID: &str = concat!(machine_select!(), "WHERE m.id = $2");

/// The machine of the user's unexpired pending logon ($1 now, $2 farm, $3 user key).
pub(super) const SELECT_PENDING_LOGON_MACHINE: &str = concat!(
    machine_select!(),
    "WHERE m.id = (SELECT machine_id FROM pending_logons \
     WHERE farm = $2 AND user_key = $3 AND expires_at > $1)"
);

/// Only a farm's policy name ($1 farm), for callers that need nothing else.
pub(super) const SELECT_FARM_POLICY: &str = "SELECT policy FROM farms WHERE name = $1";

pub(super) const SELECT_MACHINE_BY_NAME: &str =
    concat!(machine_select!(), "WHERE m.farm = $2 AND m.name_key = $3");

pub(super) const SELECT_MACHINES: &str = concat!(
    machine_select!(),
    "WHERE ($2 IS NULL OR m.farm = $2) ORDER BY m.farm, m.name_key"
);

/// A farm's machines for a placement: the pending logons are counted in one grouped pass over
/// the farm's (few) pending rows, not by a probe per machine.
pub(super) const SELECT_FARM_MACHINES: &str = "SELECT m.id, m.farm, m.name, m.address, \
     m.agent_weight, m.admin_weight, m.agent_session_limit, m.admin_session_limit, \
     m.single_session, m.agent_version, m.state, m.draining, m.connection_id, m.session_count, \
     m.load_cpu, m.load_memory, m.load_sessions, m.load_pending, m.last_seen_at, m.ready_since, \
     m.created_at, m.updated_at, m.front_door, COALESCE(p.pending, 0) AS pending_logons \
     FROM machines m LEFT JOIN (SELECT machine_id, count(*) AS pending FROM pending_logons \
     WHERE farm = $2 AND expires_at > $1 GROUP BY machine_id) p ON p.machine_id = m.id \
     WHERE m.farm = $2 ORDER BY m.name_key";

pub(super) const DELETE_MACHINE_SESSIONS: &str = "DELETE FROM sessions WHERE machine_id = $1";

pub(super) const INSERT_SESSIONS_PREFIX: &str = "INSERT INTO sessions \
     (machine_id, session_id, farm, user_name, user_key, domain, state, client_address, \
      logon_at, state_changed_at) ";

/// Sessions per multi-row insert in a RESYNC (10 parameters each, well under SQLite's and
/// PostgreSQL's limits on parameters per statement).
pub(super) const RESYNC_CHUNK: usize = 500;

pub(super) const UPSERT_SESSION: &str = "INSERT INTO sessions \
     (machine_id, session_id, farm, user_name, user_key, domain, state, client_address, \
      logon_at, state_changed_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ON CONFLICT (machine_id, session_id) DO UPDATE SET user_name = excluded.user_name, \
     user_key = excluded.user_key, domain = excluded.domain, state = excluded.state, \
     client_address = CASE WHEN excluded.client_address = '' THEN sessions.client_address \
                           ELSE excluded.client_address END, \
     logon_at = CASE WHEN sessions.user_key = excluded.user_key THEN sessions.logon_at \
                     ELSE excluded.logon_at END, \
     state_changed_at = excluded.state_changed_at";

pub(super) const SELECT_SESSION_USER: &str =
    "SELECT user_key FROM sessions WHERE machine_id = $1 AND session_id = $2";

pub(super) const DELETE_SESSION: &str =
    "DELETE FROM sessions WHERE machine_id = $1 AND session_id = $2";

pub(super) const REFRESH_SESSION_COUNT: &str = "UPDATE machines SET \
     session_count = (SELECT count(*) FROM sessions s WHERE s.machine_id = $1), \
     last_seen_at = $2, updated_at = $2 WHERE id = $1";

pub(super) const DELETE_RESOLVED_PENDING_FOR_MACHINE: &str = "DELETE FROM pending_logons \
     WHERE machine_id = $1 AND user_key IN (SELECT user_key FROM sessions WHERE machine_id = $1)";

pub(super) const DELETE_PENDING_FOR_USER: &str =
    "DELETE FROM pending_logons WHERE farm = $1 AND user_key = $2";

pub(super) const DELETE_PENDING_FOR_MACHINE: &str =
    "DELETE FROM pending_logons WHERE machine_id = $1";

pub(super) const DELETE_EXPIRED_PENDING: &str =
    "DELETE FROM pending_logons WHERE farm = $1 AND expires_at <= $2";

pub(super) const SELECT_PENDING_MACHINE: &str =
    "SELECT machine_id FROM pending_logons WHERE farm = $1 AND user_key = $2 AND expires_at > $3";

pub(super) const UPSERT_PENDING: &str = "INSERT INTO pending_logons \
     (farm, user_key, machine_id, created_at, expires_at) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (farm, user_key) DO UPDATE SET machine_id = excluded.machine_id, \
     created_at = excluded.created_at, expires_at = excluded.expires_at";

pub(super) const SET_READY: &str = "UPDATE machines SET state = 'ready', ready_since = $3, \
     last_seen_at = $3, updated_at = $3 WHERE id = $1 AND connection_id = $2";

pub(super) const SET_REMOVED: &str = "UPDATE machines SET state = 'removed', session_count = 0, \
     connection_id = NULL, updated_at = $2 WHERE id = $1";

pub(super) const SET_UNREACHABLE: &str = "UPDATE machines SET state = 'unreachable', \
     updated_at = $3 WHERE id = $1 AND connection_id = $2 AND state IN ('joining', 'ready')";

pub(super) const RECORD_LOAD: &str = "UPDATE machines SET load_cpu = $3, load_memory = $4, \
     load_sessions = $5, load_pending = $6, last_seen_at = $7, updated_at = $7 \
     WHERE id = $1 AND connection_id = $2";

macro_rules! farm_select {
    () => {
        "SELECT f.name, f.policy, \
         (SELECT count(*) FROM machines m WHERE m.farm = f.name) AS machine_count, \
         (SELECT count(*) FROM machines m WHERE m.farm = f.name AND m.state = 'ready') \
         AS ready_machine_count, \
         (SELECT CAST(coalesce(sum(m.session_count), 0) AS BIGINT) FROM machines m \
          WHERE m.farm = f.name) AS session_count \
         FROM farms f "
    };
}

pub(super) const SELECT_FARM: &str = concat!(farm_select!(), "WHERE f.name = $1");

pub(super) const SELECT_FARMS: &str = concat!(farm_select!(), "ORDER BY f.name");

pub(super) const SET_FARM_POLICY: &str = "UPDATE farms SET policy = $2 WHERE name = $1";

pub(super) const SELECT_USER_SESSIONS: &str =
    concat!(session_select!(), "WHERE s.farm = $1 AND s.user_key = $2");

pub(super) const SELECT_USERS_WITH_PREFIX: &str = "SELECT DISTINCT user_key FROM sessions \
     WHERE farm = $1 AND user_key >= $2 AND user_key < $3 ORDER BY user_key LIMIT $4";

pub(super) const SELECT_SESSIONS: &str = concat!(
    session_select!(),
    "WHERE ($1 IS NULL OR s.farm = $1) AND ($2 IS NULL OR s.machine_id = $2) \
     AND ($3 IS NULL OR s.user_key = $3) AND ($4 IS NULL OR s.state = $4) \
     AND ($5 IS NULL OR s.machine_id > $5 OR (s.machine_id = $5 AND s.session_id > $6)) \
     ORDER BY s.machine_id, s.session_id LIMIT $7"
);

pub(super) const SET_DRAINING: &str =
    "UPDATE machines SET draining = $2, updated_at = $3 WHERE id = $1";

pub(super) const SET_ADMIN_WEIGHT: &str =
    "UPDATE machines SET admin_weight = $2, updated_at = $3 WHERE id = $1";

pub(super) const SET_ADMIN_SESSION_LIMIT: &str =
    "UPDATE machines SET admin_session_limit = $2, updated_at = $3 WHERE id = $1";

pub(super) const COUNT_MACHINE_SESSIONS: &str =
    "SELECT count(*) FROM sessions WHERE machine_id = $1";

pub(super) const DELETE_MACHINE: &str = "DELETE FROM machines WHERE id = $1";

/// The upper bound of a prefix range: every string that starts with `prefix` sorts below it
/// (byte order, which is SQLite's and PostgreSQL's "C" collation).
pub(super) fn prefix_upper_bound(prefix: &str) -> String {
    format!("{prefix}{}", char::MAX)
}

/// The last entry wins when an agent lists a session id twice.
pub(super) fn dedup_sessions(
    sessions: &[tsbroker_common::model::SessionInfo],
) -> Vec<&tsbroker_common::model::SessionInfo> {
    let mut by_id = std::collections::BTreeMap::new();
    for session in sessions {
        by_id.insert(session.session_id, session);
    }
    by_id.into_values().collect()
}

/// Implements `Store` for a backend struct that has `pool`, `begin_write()`,
/// `announce_change(id)` and the consts `LOCK_OWNER` and `LOCK_FARM`.
macro_rules! impl_store {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn backend(&self) -> &'static str {
                Self::BACKEND
            }

            async fn ping(&self) -> StoreResult<()> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn machine_added(
                &self,
                description: &MachineDescription,
                new_farm_policy: &str,
                connection: Uuid,
                now: i64,
            ) -> StoreResult<MachineRecord> {
                let id = model::machine_id(&description.farm, &description.name);
                let mut tx = self.begin_write().await?;
                sqlx::query(sql::INSERT_FARM)
                    .bind(&description.farm)
                    .bind(now)
                    .bind(new_farm_policy)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(sql::UPSERT_MACHINE)
                    .bind(id)
                    .bind(&description.farm)
                    .bind(&description.name)
                    .bind(description.name.to_ascii_lowercase())
                    .bind(&description.address)
                    .bind(i64::from(description.weight))
                    .bind(i64::from(description.session_limit))
                    .bind(description.single_session)
                    .bind(&description.agent_version)
                    .bind(connection)
                    .bind(now)
                    .bind(description.front_door)
                    .execute(&mut *tx)
                    .await?;
                let machine = sqlx::query_as::<_, MachineRecord>(sql::SELECT_MACHINE_BY_ID)
                    .bind(now)
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                // A stream that owned the machine before learns that it was taken over.
                self.announce_change(id).await;
                Ok(machine)
            }

            async fn resync_sessions(
                &self,
                machine: Uuid,
                connection: Uuid,
                sessions: &[SessionInfo],
                now: i64,
            ) -> StoreResult<()> {
                let mut tx = self.begin_write().await?;
                let farm = lock_owner::<$store>(&mut tx, machine, connection).await?;
                sqlx::query(sql::DELETE_MACHINE_SESSIONS)
                    .bind(machine)
                    .execute(&mut *tx)
                    .await?;
                // Multi-row inserts: one statement for up to RESYNC_CHUNK sessions.
                for chunk in sql::dedup_sessions(sessions).chunks(sql::RESYNC_CHUNK) {
                    let mut insert = sqlx::QueryBuilder::<$db>::new(sql::INSERT_SESSIONS_PREFIX);
                    insert.push_values(chunk, |mut row, session| {
                        row.push_bind(machine)
                            .push_bind(i64::from(session.session_id))
                            .push_bind(farm.clone())
                            .push_bind(session.user_name.clone())
                            .push_bind(model::user_key(&session.user_name))
                            .push_bind(session.domain.clone())
                            .push_bind(session.state.as_str())
                            .push_bind(session.client_address.clone())
                            .push_bind(session.logon_time_ms.unwrap_or(now))
                            .push_bind(now);
                    });
                    insert.build().execute(&mut *tx).await?;
                }
                sqlx::query(sql::DELETE_RESOLVED_PENDING_FOR_MACHINE)
                    .bind(machine)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(sql::REFRESH_SESSION_COUNT)
                    .bind(machine)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            async fn set_machine_state(
                &self,
                machine: Uuid,
                connection: Uuid,
                state: StreamMachineState,
                now: i64,
            ) -> StoreResult<MachineRecord> {
                let mut tx = self.begin_write().await?;
                lock_owner::<$store>(&mut tx, machine, connection).await?;
                match state {
                    StreamMachineState::Ready => {
                        sqlx::query(sql::SET_READY)
                            .bind(machine)
                            .bind(connection)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                    }
                    StreamMachineState::Removed => {
                        for statement in [
                            sql::DELETE_MACHINE_SESSIONS,
                            sql::DELETE_PENDING_FOR_MACHINE,
                        ] {
                            sqlx::query(statement)
                                .bind(machine)
                                .execute(&mut *tx)
                                .await?;
                        }
                        sqlx::query(sql::SET_REMOVED)
                            .bind(machine)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
                let record = sqlx::query_as::<_, MachineRecord>(sql::SELECT_MACHINE_BY_ID)
                    .bind(now)
                    .bind(machine)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(record)
            }

            async fn mark_unreachable(
                &self,
                machine: Uuid,
                connection: Uuid,
                now: i64,
            ) -> StoreResult<bool> {
                let result = sqlx::query(sql::SET_UNREACHABLE)
                    .bind(machine)
                    .bind(connection)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                Ok(result.rows_affected() > 0)
            }

            async fn apply_session_events(
                &self,
                machine: Uuid,
                connection: Uuid,
                events: &[SessionEvent],
                now: i64,
            ) -> StoreResult<Vec<EventOutcome>> {
                let mut tx = self.begin_write().await?;
                let farm = lock_owner::<$store>(&mut tx, machine, connection).await?;
                let mut outcomes = Vec::with_capacity(events.len());
                for event in events {
                    let session = &event.session;
                    let session_id = i64::from(session.session_id);
                    let user_key = model::user_key(&session.user_name);
                    let known_user: Option<String> = sqlx::query_scalar(sql::SELECT_SESSION_USER)
                        .bind(machine)
                        .bind(session_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                    let outcome = match (event.kind.resulting_state(), known_user) {
                        (None, None) => {
                            EventOutcome::Ignored("logoff of a session the broker does not know")
                        }
                        (None, Some(_)) => {
                            sqlx::query(sql::DELETE_SESSION)
                                .bind(machine)
                                .bind(session_id)
                                .execute(&mut *tx)
                                .await?;
                            EventOutcome::Applied
                        }
                        (Some(state), known_user) => {
                            sqlx::query(sql::UPSERT_SESSION)
                                .bind(machine)
                                .bind(session_id)
                                .bind(&farm)
                                .bind(&session.user_name)
                                .bind(&user_key)
                                .bind(&session.domain)
                                .bind(state.as_str())
                                .bind(&session.client_address)
                                .bind(session.logon_time_ms.unwrap_or(now))
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                            if state == SessionState::Active {
                                sqlx::query(sql::DELETE_PENDING_FOR_USER)
                                    .bind(&farm)
                                    .bind(&user_key)
                                    .execute(&mut *tx)
                                    .await?;
                            }
                            session_event_outcome(event.kind, known_user.as_deref(), &user_key)
                        }
                    };
                    outcomes.push(outcome);
                }
                sqlx::query(sql::REFRESH_SESSION_COUNT)
                    .bind(machine)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(outcomes)
            }

            async fn record_load(
                &self,
                machine: Uuid,
                connection: Uuid,
                load: &LoadReport,
                now: i64,
            ) -> StoreResult<()> {
                let result = sqlx::query(sql::RECORD_LOAD)
                    .bind(machine)
                    .bind(connection)
                    .bind(f64::from(load.cpu_percent))
                    .bind(f64::from(load.memory_percent))
                    .bind(i64::from(load.session_count))
                    .bind(i64::from(load.pending_logons))
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                if result.rows_affected() == 0 {
                    return Err(StoreError::Superseded);
                }
                Ok(())
            }

            async fn get_farm(&self, farm: &str) -> StoreResult<Option<FarmRecord>> {
                Ok(sqlx::query_as(sql::SELECT_FARM)
                    .bind(farm)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn declare_farm(&self, farm: &str, policy: &str, now: i64) -> StoreResult<()> {
                sqlx::query(sql::DECLARE_FARM)
                    .bind(farm)
                    .bind(now)
                    .bind(policy)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }

            async fn farm_policy(&self, farm: &str) -> StoreResult<Option<String>> {
                Ok(sqlx::query_scalar(sql::SELECT_FARM_POLICY)
                    .bind(farm)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn list_farms(&self) -> StoreResult<Vec<FarmRecord>> {
                Ok(sqlx::query_as(sql::SELECT_FARMS)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn set_farm_policy(&self, farm: &str, policy: &str) -> StoreResult<FarmRecord> {
                let result = sqlx::query(sql::SET_FARM_POLICY)
                    .bind(farm)
                    .bind(policy)
                    .execute(&self.pool)
                    .await?;
                if result.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!("farm {farm:?}")));
                }
                self.get_farm(farm)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("farm {farm:?}")))
            }

            async fn user_sessions(
                &self,
                farm: &str,
                user_key: &str,
            ) -> StoreResult<Vec<SessionRecord>> {
                Ok(sqlx::query_as(sql::SELECT_USER_SESSIONS)
                    .bind(farm)
                    .bind(user_key)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn users_with_prefix(
                &self,
                farm: &str,
                prefix: &str,
                limit: u32,
            ) -> StoreResult<Vec<String>> {
                Ok(sqlx::query_scalar(sql::SELECT_USERS_WITH_PREFIX)
                    .bind(farm)
                    .bind(prefix)
                    .bind(sql::prefix_upper_bound(prefix))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn pending_logon(
                &self,
                farm: &str,
                user_key: &str,
                now: i64,
            ) -> StoreResult<Option<MachineRecord>> {
                Ok(sqlx::query_as(sql::SELECT_PENDING_LOGON_MACHINE)
                    .bind(now)
                    .bind(farm)
                    .bind(user_key)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn place_logon(
                &self,
                request: &PlacementRequest<'_>,
                choose: &Chooser<'_>,
            ) -> StoreResult<Placement> {
                let mut tx = self.begin_write().await?;
                let policy: Option<String> = sqlx::query_scalar(Self::LOCK_FARM)
                    .bind(request.farm)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some(policy) = policy else {
                    return Err(StoreError::NotFound(format!("farm {:?}", request.farm)));
                };
                sqlx::query(sql::DELETE_EXPIRED_PENDING)
                    .bind(request.farm)
                    .bind(request.now)
                    .execute(&mut *tx)
                    .await?;
                let pending: Option<Uuid> = sqlx::query_scalar(sql::SELECT_PENDING_MACHINE)
                    .bind(request.farm)
                    .bind(request.user_key)
                    .bind(request.now)
                    .fetch_optional(&mut *tx)
                    .await?;
                let machines: Vec<MachineRecord> = sqlx::query_as(sql::SELECT_FARM_MACHINES)
                    .bind(request.now)
                    .bind(request.farm)
                    .fetch_all(&mut *tx)
                    .await?;
                if let Some(pending) = pending {
                    let target = machines.iter().find(|machine| machine.id == pending);
                    if let Some(target) = target.filter(|target| {
                        target.is_reachable(request.lease_cutoff)
                            && !request.excluded.contains(&target.id)
                    }) {
                        return Ok(Placement::AlreadyPending(target.clone()));
                    }
                }
                let loads = classify(machines, request);
                let candidates: Vec<MachineLoad> = loads
                    .iter()
                    .filter(|load| load.ineligible.is_none())
                    .cloned()
                    .collect();
                let chosen = match choose(&policy, &candidates) {
                    Choice::Machine(id) => {
                        candidates.into_iter().find(|load| load.machine.id == id)
                    }
                    Choice::Nothing => None,
                };
                let Some(chosen) = chosen else {
                    return Ok(Placement::NoCandidate(loads));
                };
                sqlx::query(sql::UPSERT_PENDING)
                    .bind(request.farm)
                    .bind(request.user_key)
                    .bind(chosen.machine.id)
                    .bind(request.now)
                    .bind(request.now + request.pending_ttl_ms)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                let mut machine = chosen.machine;
                machine.pending_logons += 1;
                Ok(Placement::Placed(machine))
            }

            async fn get_machine(&self, machine: Uuid) -> StoreResult<Option<MachineRecord>> {
                Ok(sqlx::query_as(sql::SELECT_MACHINE_BY_ID)
                    .bind(model::now_millis())
                    .bind(machine)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn find_machine(
                &self,
                farm: &str,
                name: &str,
            ) -> StoreResult<Option<MachineRecord>> {
                Ok(sqlx::query_as(sql::SELECT_MACHINE_BY_NAME)
                    .bind(model::now_millis())
                    .bind(farm)
                    .bind(name.to_ascii_lowercase())
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn list_machines(&self, farm: Option<&str>) -> StoreResult<Vec<MachineRecord>> {
                Ok(sqlx::query_as(sql::SELECT_MACHINES)
                    .bind(model::now_millis())
                    .bind(farm)
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn list_sessions(
                &self,
                filter: &SessionFilter,
            ) -> StoreResult<Vec<SessionRecord>> {
                let (after_machine, after_session) = match filter.after {
                    Some((machine, session)) => (Some(machine), session),
                    None => (None, 0),
                };
                Ok(sqlx::query_as(sql::SELECT_SESSIONS)
                    .bind(filter.farm.as_deref())
                    .bind(filter.machine)
                    .bind(filter.user_key.as_deref())
                    .bind(filter.state.map(SessionState::as_str))
                    .bind(after_machine)
                    .bind(after_session)
                    .bind(i64::from(filter.limit))
                    .fetch_all(&self.pool)
                    .await?)
            }

            async fn change_machine(
                &self,
                machine: Uuid,
                change: MachineChange,
                now: i64,
            ) -> StoreResult<MachineRecord> {
                let statement = match change {
                    MachineChange::Drain(_) => sql::SET_DRAINING,
                    MachineChange::Weight(_) => sql::SET_ADMIN_WEIGHT,
                    MachineChange::SessionLimit(_) => sql::SET_ADMIN_SESSION_LIMIT,
                };
                let query = sqlx::query(statement).bind(machine);
                let query = match change {
                    MachineChange::Drain(draining) => query.bind(draining),
                    MachineChange::Weight(weight) => query.bind(weight.map(i64::from)),
                    MachineChange::SessionLimit(limit) => query.bind(limit.map(i64::from)),
                };
                let result = query.bind(now).execute(&self.pool).await?;
                if result.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!("machine {machine}")));
                }
                self.announce_change(machine).await;
                self.get_machine(machine)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("machine {machine}")))
            }

            async fn remove_machine(&self, machine: Uuid) -> StoreResult<u64> {
                let mut tx = self.begin_write().await?;
                let sessions: i64 = sqlx::query_scalar(sql::COUNT_MACHINE_SESSIONS)
                    .bind(machine)
                    .fetch_one(&mut *tx)
                    .await?;
                let result = sqlx::query(sql::DELETE_MACHINE)
                    .bind(machine)
                    .execute(&mut *tx)
                    .await?;
                if result.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!("machine {machine}")));
                }
                tx.commit().await?;
                self.announce_change(machine).await;
                Ok(sessions.max(0) as u64)
            }

            fn subscribe_machine_changes(&self) -> tokio::sync::broadcast::Receiver<Uuid> {
                self.changes.subscribe()
            }
        }

        /// Locks the machine's row for this transaction (where the backend can) and checks that
        /// `connection` still owns it; returns the machine's farm.
        async fn lock_owner<S: StoreHooks>(
            tx: &mut sqlx::Transaction<'static, $db>,
            machine: Uuid,
            connection: Uuid,
        ) -> StoreResult<String> {
            let owner: Option<(Option<Uuid>, String)> = sqlx::query_as(S::LOCK_OWNER)
                .bind(machine)
                .fetch_optional(&mut **tx)
                .await?;
            match owner {
                None => Err(StoreError::NotFound(format!("machine {machine}"))),
                Some((Some(owner), farm)) if owner == connection => Ok(farm),
                Some(_) => Err(StoreError::Superseded),
            }
        }
    };
}

pub(super) use impl_store;

/// The backend-specific SQL the shared implementation needs.
pub(super) trait StoreHooks {
    const BACKEND: &'static str;
    /// `SELECT connection_id, farm FROM machines WHERE id = $1`, locking the row if it can.
    const LOCK_OWNER: &'static str;
    /// `SELECT policy FROM farms WHERE name = $1`, locking the farm for this transaction.
    const LOCK_FARM: &'static str;
}

/// How an upsert-style session event is described in the outcome.
pub(super) fn session_event_outcome(
    kind: tsbroker_common::model::SessionEventKind,
    known_user: Option<&str>,
    user_key: &str,
) -> super::EventOutcome {
    use super::EventOutcome;
    use tsbroker_common::model::SessionEventKind;
    match (kind, known_user) {
        (SessionEventKind::Logon, None) => EventOutcome::Applied,
        (SessionEventKind::Logon, Some(known)) if known == user_key => {
            EventOutcome::Repaired("logon of a session the broker already had: state updated")
        }
        (_, Some(known)) if known != user_key => {
            EventOutcome::Repaired("session id reused by another user: session replaced")
        }
        (_, None) => EventOutcome::Repaired("session the broker did not know: created"),
        (_, Some(_)) => EventOutcome::Applied,
    }
}

pub(super) use super::records::classify_machines as classify;

/// The statements on the decision and event paths, by name, for plan checks: the tests
/// EXPLAIN these very strings on PostgreSQL with a large directory.
pub const HOT_QUERIES: &[(&str, &str)] = &[
    ("user_sessions", SELECT_USER_SESSIONS),
    ("users_with_prefix", SELECT_USERS_WITH_PREFIX),
    ("pending_machine", SELECT_PENDING_MACHINE),
    ("pending_logon_machine", SELECT_PENDING_LOGON_MACHINE),
    ("machine_by_id", SELECT_MACHINE_BY_ID),
    ("farm_machines", SELECT_FARM_MACHINES),
    ("refresh_session_count", REFRESH_SESSION_COUNT),
    ("expired_pending", DELETE_EXPIRED_PENDING),
    ("session_user", SELECT_SESSION_USER),
];
