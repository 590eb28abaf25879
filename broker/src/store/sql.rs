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

pub(super) const DECLARE_FARM: &str = "INSERT INTO farms (name, created_at, policy) \
     VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET policy = excluded.policy";

pub(super) const SELECT_MACHINE_BY_ID: &str = concat!(machine_select!(), "WHERE m.id = $2");

/// The machines of a list of ids ($1 now; the caller appends a table of ids and `)`, see
/// `ingest::sql`).
pub(super) const SELECT_MACHINES_BY_IDS: &str =
    concat!(machine_select!(), "WHERE m.id IN (SELECT column1 FROM ");

/// Locks the farm's row (an UPDATE locks it on PostgreSQL; SQLite's write transaction is
/// already exclusive) and counts the placement transaction.
pub(super) const LOCK_FARM_FOR_PLACEMENT: &str = "UPDATE farms SET placements = placements + 1 \
     WHERE name = $1 RETURNING policy, placements";

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

/// A farm's machines ($1 farm) for a placement's whole read, with no logon in flight: the
/// counts come from [`SELECT_FARM_PENDING_COUNTS`] and are set in memory. Two statements, not a
/// join: a placement connection keeps the plan it made when the farm's logons in flight were
/// few, and a join planned for one pending row compared every machine with every pending logon
/// (0.7–1 s a read at 10,000 machines and a few thousand logons in flight).
pub(super) const SELECT_FARM_MACHINES: &str = "SELECT m.id, m.farm, m.name, m.address, \
     m.agent_weight, m.admin_weight, m.agent_session_limit, m.admin_session_limit, \
     m.single_session, m.agent_version, m.state, m.draining, m.connection_id, m.session_count, \
     m.load_cpu, m.load_memory, m.load_sessions, m.load_pending, m.last_seen_at, m.ready_since, \
     m.created_at, m.updated_at, m.front_door, CAST(0 AS BIGINT) AS pending_logons \
     FROM machines m WHERE m.farm = $1 ORDER BY m.name_key";

/// The farm's unexpired logons in flight per machine ($1 now, $2 farm), in one pass over them.
pub(super) const SELECT_FARM_PENDING_COUNTS: &str = "SELECT machine_id, count(*) \
     FROM pending_logons WHERE farm = $2 AND expires_at > $1 GROUP BY machine_id";

/// The farm's machines whose row changed at or after `$3` ($1 now, $2 farm), with their
/// unexpired pending logons.
pub(super) const SELECT_CHANGED_MACHINES: &str = concat!(
    machine_select!(),
    "WHERE m.farm = $2 AND m.updated_at >= $3"
);

pub(super) const DELETE_MACHINE_SESSIONS: &str = "DELETE FROM sessions WHERE machine_id = $1";

pub(super) const DELETE_PENDING_FOR_MACHINE: &str =
    "DELETE FROM pending_logons WHERE machine_id = $1";

pub(super) const DELETE_EXPIRED_PENDING: &str =
    "DELETE FROM pending_logons WHERE farm = $1 AND expires_at <= $2";

pub(super) const SET_UNREACHABLE: &str = "UPDATE machines SET state = 'unreachable', \
     updated_at = $3 WHERE id = $1 AND connection_id = $2 AND state IN ('joining', 'ready')";

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

pub(super) const SELECT_CLIENTS_WITH_PREFIX: &str = "SELECT user_key, client_address \
     FROM sessions WHERE farm = $1 AND user_key >= $2 AND user_key < $3 \
     AND client_address <> '' LIMIT $4";

pub(super) const SELECT_SESSIONS: &str = concat!(
    session_select!(),
    "WHERE ($1 IS NULL OR s.farm = $1) AND ($2 IS NULL OR s.machine_id = $2) \
     AND ($3 IS NULL OR s.user_key = $3) AND ($4 IS NULL OR s.state = $4) \
     AND ($5 IS NULL OR s.machine_id > $5 OR (s.machine_id = $5 AND s.session_id > $6)) \
     AND ($8 IS NULL OR s.domain = '' OR lower(s.domain) = lower($8)) \
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

/// A backend's turn at writing, held by a write transaction until its commit (`None`: the
/// backend needs none).
pub(super) type WriteTurn = Option<tokio::sync::OwnedMutexGuard<()>>;

/// The upper bound of a prefix range: every string that starts with `prefix` sorts below it
/// (byte order, which is SQLite's and PostgreSQL's "C" collation).
pub(super) fn prefix_upper_bound(prefix: &str) -> String {
    format!("{prefix}{}", char::MAX)
}

/// How long a stopping broker waits for its database connections to close.
pub(super) const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Implements `Store` for a backend struct that has `pool`, `directory` (its `SinkSlot`),
/// `write_turn()`, `begin_write()`, `begin_placement()`, `announce_change(id)`,
/// `publish_directory(delta)`, `tell_other_replicas(ids)`, `release_database_file()`,
/// `close_database()`, `database_server_started_at()`,
/// `probe_database()` and the const `LOCK_OWNER`.
macro_rules! impl_store {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn backend(&self) -> &'static str {
                Self::BACKEND
            }

            async fn ping(&self) -> StoreResult<()> {
                self.probe_database().await
            }

            fn release_database(&self) {
                self.release_database_file();
            }

            async fn close(&self) {
                let closing = self.close_database();
                if tokio::time::timeout($crate::store::sql::CLOSE_WAIT, closing)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        "database connections still busy {:?} into the stop: left to the exit",
                        $crate::store::sql::CLOSE_WAIT
                    );
                }
            }

            fn clock(&self) -> &$crate::clock::Clock {
                &self.clock
            }

            async fn measure_clock(&self) -> StoreResult<Option<i64>> {
                self.measure_database_clock().await
            }

            async fn server_started_at(&self) -> StoreResult<Option<i64>> {
                self.database_server_started_at().await
            }

            async fn apply_ingest(
                &self,
                items: &[$crate::store::IngestItem],
                now: i64,
            ) -> StoreResult<Vec<$crate::store::ItemResult>> {
                self.ingest_group(items, now).await
            }

            async fn set_machine_state(
                &self,
                machine: Uuid,
                connection: Uuid,
                state: StreamMachineState,
                now: i64,
            ) -> StoreResult<MachineRecord> {
                if state == StreamMachineState::Ready {
                    let item = $crate::store::IngestItem {
                        machine,
                        connection,
                        op: $crate::store::IngestOp::Ready,
                    };
                    return self.apply_one(item, now).await?.into_machine();
                }
                let turn = self.write_turn().await;
                let mut tx = self.begin_write().await?;
                lock_owner::<$store>(&mut tx, machine, connection).await?;
                for statement in [
                    sql::DELETE_MACHINE_SESSIONS,
                    sql::DELETE_PENDING_FOR_MACHINE,
                ] {
                    sqlx::query(statement)
                        .bind(machine)
                        .execute(&mut *tx)
                        .await?;
                }
                // A machine that leaves is gone, as one an administrator removed: kept, those
                // of an autoscaled farm would pile up in every listing and farm read.
                let mut record = sqlx::query_as::<_, MachineRecord>(sql::SELECT_MACHINE_BY_ID)
                    .bind(now)
                    .bind(machine)
                    .fetch_one(&mut *tx)
                    .await?;
                sqlx::query(sql::DELETE_MACHINE)
                    .bind(machine)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                record.state = tsbroker_common::model::MachineState::Removed
                    .as_str()
                    .to_owned();
                record.session_count = 0;
                record.updated_at = now;
                drop(turn);
                // Farm copies kept for placements forget it now (a refresh reads changed rows).
                self.announce_change(machine).await;
                self.publish_directory($crate::store::DirectoryDelta::removed(vec![machine], now))
                    .await;
                Ok(record)
            }

            async fn mark_unreachable(
                &self,
                machine: Uuid,
                connection: Uuid,
                now: i64,
            ) -> StoreResult<bool> {
                let turn = self.write_turn().await;
                let result = sqlx::query(sql::SET_UNREACHABLE)
                    .bind(machine)
                    .bind(connection)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                drop(turn);
                let marked = result.rows_affected() > 0;
                if marked {
                    let delta = $crate::store::DirectoryDelta::state(machine, "unreachable", now);
                    self.publish_directory(delta).await;
                }
                Ok(marked)
            }

            async fn get_farm(&self, farm: &str) -> StoreResult<Option<FarmRecord>> {
                Ok(sqlx::query_as(sql::SELECT_FARM)
                    .bind(farm)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn declare_farm(&self, farm: &str, policy: &str, now: i64) -> StoreResult<()> {
                let _turn = self.write_turn().await;
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
                let turn = self.write_turn().await;
                let result = sqlx::query(sql::SET_FARM_POLICY)
                    .bind(farm)
                    .bind(policy)
                    .execute(&self.pool)
                    .await?;
                drop(turn);
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

            async fn client_addresses_with_prefix(
                &self,
                farm: &str,
                prefix: &str,
                limit: u32,
            ) -> StoreResult<Vec<(String, String)>> {
                Ok(sqlx::query_as(sql::SELECT_CLIENTS_WITH_PREFIX)
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

            async fn place_logons(
                &self,
                requests: &[PlacementRequest<'_>],
                choose: &BatchChooser<'_>,
                cache: &mut FarmCache,
            ) -> StoreResult<Vec<Placement>> {
                let Some(first) = requests.first() else {
                    return Ok(Vec::new());
                };
                let (farm, now) = (first.farm, first.now);
                let turn = self.write_turn().await;
                let mut tx = self.begin_placement().await?;
                let locked: Option<(String, i64)> = sqlx::query_as(sql::LOCK_FARM_FOR_PLACEMENT)
                    .bind(farm)
                    .fetch_optional(&mut *tx)
                    .await?;
                let Some((policy, counter)) = locked else {
                    cache.invalidate();
                    return Err(StoreError::NotFound(format!("farm {farm:?}")));
                };
                use $crate::store::{CachedFarm, FarmRead};
                let mut copy = cache.take(counter, now);
                if let CachedFarm::Refresh(machines, read) = copy {
                    // Only the machines whose row changed since, with their pending logons.
                    let changed: Vec<MachineRecord> = sqlx::query_as(sql::SELECT_CHANGED_MACHINES)
                        .bind(now)
                        .bind(farm)
                        .bind(read.changed_since())
                        .fetch_all(&mut *tx)
                        .await?;
                    let mut machines = machines;
                    copy = if crate::store::placement::merge_changed(&mut machines, changed) {
                        CachedFarm::Fresh(
                            machines,
                            FarmRead {
                                refreshed_at: now,
                                ..read
                            },
                        )
                    } else {
                        CachedFarm::Stale
                    };
                }
                let (mut machines, read) = match copy {
                    CachedFarm::Fresh(machines, read) => (machines, read),
                    CachedFarm::Refresh(..) | CachedFarm::Stale => {
                        sqlx::query(sql::DELETE_EXPIRED_PENDING)
                            .bind(farm)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        let mut machines: Vec<MachineRecord> =
                            sqlx::query_as(sql::SELECT_FARM_MACHINES)
                                .bind(farm)
                                .fetch_all(&mut *tx)
                                .await?;
                        let counts: Vec<(Uuid, i64)> =
                            sqlx::query_as(sql::SELECT_FARM_PENDING_COUNTS)
                                .bind(now)
                                .bind(farm)
                                .fetch_all(&mut *tx)
                                .await?;
                        crate::store::placement::set_pending_counts(&mut machines, counts);
                        let machines = machines.into_iter().map(std::sync::Arc::new).collect();
                        (machines, FarmRead::full(now))
                    }
                };
                // The users' pending logons, in one query (each user once); and when some
                // were looked up in memory only, in the same query, who has a session after all.
                let mut users: Vec<&str> =
                    requests.iter().map(|request| request.user_key).collect();
                users.sort_unstable();
                users.dedup();
                let keys = crate::store::placement::padded_keys(&users);
                let check_sessions = requests.iter().any(|request| request.check_sessions);
                let lookup =
                    crate::store::placement::select_pending_of_users(keys.len(), check_sessions);
                let mut query = sqlx::query_as(sqlx::AssertSqlSafe(lookup))
                    .bind(farm)
                    .bind(now);
                for user in keys {
                    query = query.bind(*user);
                }
                let found: Vec<(String, Option<Uuid>)> = query.fetch_all(&mut *tx).await?;
                let mut pending: std::collections::HashMap<String, Uuid> =
                    std::collections::HashMap::new();
                let mut with_sessions = std::collections::HashSet::new();
                for (user, machine) in found {
                    match machine {
                        Some(machine) => {
                            pending.insert(user, machine);
                        }
                        None => {
                            with_sessions.insert(user);
                        }
                    }
                }
                let planned = crate::store::placement::plan(
                    requests,
                    &policy,
                    choose,
                    &mut machines,
                    &mut pending,
                    &with_sessions,
                );
                if !planned.new_pending.is_empty() {
                    let upsert =
                        crate::store::placement::upsert_pending_rows(planned.new_pending.len());
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(upsert))
                        .bind(farm)
                        .bind(now)
                        .bind(now + first.pending_ttl_ms);
                    for (index, machine) in &planned.new_pending {
                        query = query.bind(requests[*index].user_key).bind(*machine);
                    }
                    query.execute(&mut *tx).await?;
                }
                let placements = planned.placements;
                tx.commit().await?;
                drop(turn);
                cache.keep(machines, counter, read);
                Ok(placements)
            }

            async fn get_machine(&self, machine: Uuid) -> StoreResult<Option<MachineRecord>> {
                Ok(sqlx::query_as(sql::SELECT_MACHINE_BY_ID)
                    .bind(self.now())
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
                    .bind(self.now())
                    .bind(farm)
                    .bind(name.to_ascii_lowercase())
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn list_machines(&self, farm: Option<&str>) -> StoreResult<Vec<MachineRecord>> {
                Ok(sqlx::query_as(sql::SELECT_MACHINES)
                    .bind(self.now())
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
                    .bind(filter.domain.as_deref())
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
                let turn = self.write_turn().await;
                let result = query.bind(now).execute(&self.pool).await?;
                drop(turn);
                if result.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!("machine {machine}")));
                }
                self.announce_change(machine).await;
                // Their plug-ins hear of an administrator's change through their directories.
                self.tell_other_replicas(&[machine]).await;
                self.get_machine(machine)
                    .await?
                    .ok_or_else(|| StoreError::NotFound(format!("machine {machine}")))
            }

            async fn remove_machine(&self, machine: Uuid) -> StoreResult<u64> {
                let turn = self.write_turn().await;
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
                drop(turn);
                self.announce_change(machine).await;
                self.publish_directory($crate::store::DirectoryDelta::removed(
                    vec![machine],
                    self.now(),
                ))
                .await;
                Ok(sessions.max(0) as u64)
            }

            fn subscribe_machine_changes(&self) -> tokio::sync::broadcast::Receiver<Uuid> {
                self.changes.subscribe()
            }

            fn attach_directory(&self, sink: std::sync::Arc<dyn $crate::store::DirectorySink>) {
                let _ = self.directory.set(sink);
            }

            async fn directory_machines(
                &self,
                ids: Option<&[Uuid]>,
            ) -> StoreResult<Vec<$crate::store::DirectoryMachine>> {
                use $crate::store::directory_feed as feed;
                let Some(ids) = ids else {
                    return Ok(sqlx::query_as(feed::SELECT_DIRECTORY_MACHINES)
                        .fetch_all(&self.pool)
                        .await?);
                };
                let mut machines = Vec::with_capacity(ids.len());
                for chunk in ids.chunks(sql::IDS_PER_STATEMENT) {
                    let statement =
                        feed::where_in(feed::SELECT_DIRECTORY_MACHINES, "id", chunk.len());
                    let mut query = sqlx::query_as(sqlx::AssertSqlSafe(statement));
                    for id in chunk {
                        query = query.bind(*id);
                    }
                    machines.extend(query.fetch_all(&self.pool).await?);
                }
                Ok(machines)
            }

            async fn directory_sessions(
                &self,
                ids: Option<&[Uuid]>,
                sink: &mut (dyn FnMut($crate::store::SessionRow) + Send),
            ) -> StoreResult<()> {
                use futures::TryStreamExt;
                use $crate::store::directory_feed as feed;
                let Some(ids) = ids else {
                    let mut rows =
                        sqlx::query_as(feed::SELECT_DIRECTORY_SESSIONS).fetch(&self.pool);
                    while let Some(row) = rows.try_next().await? {
                        sink(row);
                    }
                    return Ok(());
                };
                for chunk in ids.chunks(sql::IDS_PER_STATEMENT) {
                    let statement = feed::select_sessions_of_machines(chunk.len());
                    let mut query = sqlx::query_as(sqlx::AssertSqlSafe(statement));
                    for id in chunk {
                        query = query.bind(*id);
                    }
                    let mut rows = query.fetch(&self.pool);
                    while let Some(row) = rows.try_next().await? {
                        sink(row);
                    }
                }
                Ok(())
            }

            async fn machine_leases(&self) -> StoreResult<Vec<$crate::store::MachineLease>> {
                Ok(
                    sqlx::query_as($crate::store::directory_feed::SELECT_MACHINE_LEASES)
                        .fetch_all(&self.pool)
                        .await?,
                )
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

/// Most ids bound to one `IN (…)` list.
pub(super) const IDS_PER_STATEMENT: usize = 500;

/// The backend-specific SQL the shared implementation needs.
pub(super) trait StoreHooks {
    const BACKEND: &'static str;
    /// `SELECT connection_id, farm FROM machines WHERE id = $1`, locking the row if it can.
    const LOCK_OWNER: &'static str;
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

/// The statements on the decision and event paths, by name, for plan checks: the tests
/// EXPLAIN these very strings on PostgreSQL with a large directory.
/// `placement::select_pending_of_users(2, false)`, for the query-plan check.
pub const PENDING_OF_TWO_USERS: &str = "SELECT user_key, machine_id FROM (SELECT k.column1 \
     AS user_key, (SELECT CASE WHEN p.expires_at > $2 THEN p.machine_id END \
     FROM pending_logons p WHERE p.farm = $1 AND p.user_key = k.column1) AS machine_id \
     FROM (VALUES ($3), ($4)) AS k) AS found WHERE machine_id IS NOT NULL";

pub const HOT_QUERIES: &[(&str, &str)] = &[
    ("user_sessions", SELECT_USER_SESSIONS),
    ("users_with_prefix", SELECT_USERS_WITH_PREFIX),
    ("client_addresses_with_prefix", SELECT_CLIENTS_WITH_PREFIX),
    ("pending_of_users", PENDING_OF_TWO_USERS),
    ("pending_logon_machine", SELECT_PENDING_LOGON_MACHINE),
    ("machine_by_id", SELECT_MACHINE_BY_ID),
    ("farm_machines", SELECT_FARM_MACHINES),
    ("farm_pending_counts", SELECT_FARM_PENDING_COUNTS),
    ("changed_machines", SELECT_CHANGED_MACHINES),
    ("expired_pending", DELETE_EXPIRED_PENDING),
];
