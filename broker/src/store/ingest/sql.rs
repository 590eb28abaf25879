//! The group transaction, written once for both backends and expanded by `impl_ingest!` (as
//! `store/sql.rs` does for the rest of the store). Every statement reads its rows from one
//! table `k` (columns `column1`, `column2`, …) that the backend spells its own way (see
//! `statement.rs`): on PostgreSQL `unnest($1::uuid[], $2::int8[], …)`, one array parameter per
//! column, so each statement has one text whatever the number of rows and is planned once per
//! connection; on SQLite `(VALUES (?, ?), …)`, a parameter per value, a bounded number of rows
//! a statement.
//!
//! One round (see `ingest::rounds`: each machine at most once) goes: lock the round's machines
//! in id order and read their owners and states; ADDED (farms, then the machines); refuse the
//! items whose stream no longer owns its machine; RESYNC (read the machines' sessions,
//! `plan_resync`, delete and upsert only what differs, resolve pending logons, set the counts);
//! session events (read the touched rows, `plan_events`, one delete, one upsert, one delete of
//! resolved pending logons); READY; UNREACHABLE; load reports; each touched machine's session
//! count once; the machine records ADDED and READY answer with.

/// Locks the machines; the backend appends its row-lock clause.
pub(crate) const LOCK_MACHINES: &str =
    "SELECT id, connection_id, farm, state FROM machines WHERE id IN (SELECT column1 FROM ";
pub(crate) const LOCK_MACHINES_END: &str = ") ORDER BY id";
pub(crate) const LOCK_MACHINES_TYPES: &[&str] = &["uuid"];

pub(crate) const INSERT_FARMS: &str = "INSERT INTO farms (name, created_at, policy) \
     SELECT column1, $1, column2 FROM ";
/// (Only farms not there yet: inserting a farm that exists would wait for a placement holding
/// the farm's row, while that placement may wait for this transaction.)
pub(crate) const INSERT_FARMS_END: &str = " WHERE NOT EXISTS \
     (SELECT 1 FROM farms f WHERE f.name = k.column1) ON CONFLICT (name) DO NOTHING";
pub(crate) const INSERT_FARMS_TYPES: &[&str] = &["text", "text"];

/// ADDED ($1 now): the machine JOINING, bound to the stream's connection.
pub(crate) const UPSERT_MACHINES: &str = "INSERT INTO machines \
     (id, farm, name, name_key, address, agent_weight, agent_session_limit, single_session, \
      agent_version, state, connection_id, session_count, last_seen_at, created_at, updated_at, \
      front_door) \
     SELECT column1, column2, column3, column4, column5, column6, column7, column8, column9, \
     'joining', column10, 0, $1, $1, $1, column11 FROM ";
pub(crate) const UPSERT_MACHINES_END: &str = " WHERE true ON CONFLICT (id) DO UPDATE SET \
     name = excluded.name, address = excluded.address, \
     agent_weight = excluded.agent_weight, agent_session_limit = excluded.agent_session_limit, \
     single_session = excluded.single_session, agent_version = excluded.agent_version, \
     front_door = excluded.front_door, state = 'joining', connection_id = excluded.connection_id, \
     ready_since = CASE WHEN machines.state <> 'removed' \
     AND machines.last_seen_at >= excluded.last_seen_at - 60000 \
     THEN machines.ready_since ELSE NULL END, \
     last_seen_at = excluded.last_seen_at, updated_at = excluded.updated_at";
pub(crate) const UPSERT_MACHINES_TYPES: &[&str] = &[
    "uuid", "text", "text", "text", "text", "int8", "int8", "bool", "text", "uuid", "bool",
];

/// The end of every statement whose table is a list of machine ids.
pub(crate) const ID_LIST_END: &str = ")";
pub(crate) const ID_LIST_TYPES: &[&str] = &["uuid"];

/// The sessions of the machines, as stored.
pub(crate) const SELECT_SESSIONS_OF_MACHINES: &str = "SELECT s.machine_id, s.session_id, \
     s.farm, s.user_name, s.user_key, s.domain, s.state, s.client_address, s.logon_at, \
     s.state_changed_at FROM sessions s WHERE s.machine_id IN (SELECT column1 FROM ";

/// Pending logons of the machines whose user now has a session there. (`EXISTS` on the
/// `(farm, user_key)` index: one probe per pending logon, not a read of the machine's sessions.)
pub(crate) const DELETE_RESOLVED_PENDING_OF_MACHINES: &str = "DELETE FROM pending_logons \
     WHERE EXISTS (SELECT 1 FROM sessions s WHERE s.farm = pending_logons.farm \
     AND s.user_key = pending_logons.user_key AND s.machine_id = pending_logons.machine_id) \
     AND machine_id IN (SELECT column1 FROM ";

/// Session rows, as `plan::SessionRow` has them (with `UPSERT_SESSIONS_END`).
pub(crate) const INSERT_SESSIONS: &str = "INSERT INTO sessions (machine_id, session_id, farm, \
     user_name, user_key, domain, state, client_address, logon_at, state_changed_at) \
     SELECT column1, column2, column3, column4, column5, column6, column7, column8, column9, \
     column10 FROM ";
pub(crate) const SESSION_TYPES: &[&str] = &[
    "uuid", "int8", "text", "text", "text", "text", "text", "text", "int8", "int8",
];

/// Sessions as `plan_events` left them: every column absolute.
pub(crate) const UPSERT_SESSIONS_END: &str = " WHERE true \
     ON CONFLICT (machine_id, session_id) DO UPDATE \
     SET user_name = excluded.user_name, user_key = excluded.user_key, \
     domain = excluded.domain, state = excluded.state, \
     client_address = excluded.client_address, logon_at = excluded.logon_at, \
     state_changed_at = excluded.state_changed_at";

/// Touched sessions as stored: joined with a table of (machine id, session id).
pub(crate) const SELECT_TOUCHED_SESSIONS: &str = "SELECT s.machine_id, s.session_id, s.farm, \
     s.user_name, s.user_key, s.domain, s.state, s.client_address, s.logon_at, \
     s.state_changed_at FROM sessions s JOIN ";
pub(crate) const SELECT_TOUCHED_SESSIONS_END: &str =
    " ON s.machine_id = k.column1 AND s.session_id = k.column2";
pub(crate) const SESSION_KEY_TYPES: &[&str] = &["uuid", "int8"];

/// (A list of keys is a subquery: SQLite searches the index for `(a, b) IN (SELECT …)`, but
/// scans the table for `(a, b) IN (VALUES …)`.)
pub(crate) const DELETE_SESSIONS: &str = "DELETE FROM sessions \
     WHERE (machine_id, session_id) IN (SELECT column1, column2 FROM ";

pub(crate) const DELETE_PENDING_FOR_USERS: &str = "DELETE FROM pending_logons \
     WHERE (farm, user_key) IN (SELECT column1, column2 FROM ";
pub(crate) const USER_TYPES: &[&str] = &["text", "text"];

/// $1 now. A machine whose agent comes back within a minute of its last word (its stream
/// moved to another replica, or the agent restarted) keeps when it became READY, and with it
/// its place in slow start: its server did not restart (the ADDED upsert keeps `ready_since`
/// only then, and clears it otherwise).
pub(crate) const SET_READY: &str = "UPDATE machines SET state = 'ready', \
     ready_since = COALESCE(ready_since, $1), \
     last_seen_at = $1, updated_at = $1 WHERE id IN (SELECT column1 FROM ";

/// $1 now; the machines' owners checked, each JOINING or READY.
pub(crate) const SET_UNREACHABLE: &str = "UPDATE machines SET state = 'unreachable', \
     updated_at = $1 WHERE id IN (SELECT column1 FROM ";
/// As [`SET_UNREACHABLE`], for machines whose agent was alive when the stream ended.
pub(crate) const SET_UNREACHABLE_HEARD: &str = "UPDATE machines SET state = 'unreachable', \
     last_seen_at = $1, updated_at = $1 WHERE id IN (SELECT column1 FROM ";

/// $1 now; rows (id, cpu, memory, sessions, pending).
pub(crate) const RECORD_LOADS: &str = "UPDATE machines SET load_cpu = k.column2, \
     load_memory = k.column3, load_sessions = k.column4, load_pending = k.column5, \
     last_seen_at = $1, updated_at = $1 FROM ";
pub(crate) const RECORD_LOADS_END: &str = " WHERE machines.id = k.column1";
pub(crate) const LOAD_TYPES: &[&str] = &["uuid", "float8", "float8", "int8", "int8"];

/// $1 now; rows (id, session count): the count a RESYNC left.
pub(crate) const SET_SESSION_COUNTS: &str = "UPDATE machines SET session_count = k.column2, \
     last_seen_at = $1, updated_at = $1 FROM ";
pub(crate) const SET_SESSION_COUNTS_END: &str = " WHERE machines.id = k.column1";
pub(crate) const SESSION_COUNT_TYPES: &[&str] = &["uuid", "int8"];

/// $1 now.
pub(crate) const REFRESH_SESSION_COUNTS: &str = "UPDATE machines SET \
     session_count = (SELECT count(*) FROM sessions s WHERE s.machine_id = machines.id), \
     last_seen_at = $1, updated_at = $1 WHERE id IN (SELECT column1 FROM ";

/// Implements `ingest_group` (the body of `Store::apply_ingest`) for a backend struct that has
/// `write_turn()`, `begin_ingest()` and `announce_changes(ids)`; `$dialect` is `pg` or
/// `sqlite`, `$lock` the backend's row-lock clause.
macro_rules! impl_ingest {
    ($store:ty, $db:ty, $dialect:ident, $lock:expr) => {
        impl $store {
            /// Applies the items in one transaction; see `Store::apply_ingest`.
            async fn ingest_group(
                &self,
                items: &[$crate::store::ingest::IngestItem],
                now: i64,
            ) -> StoreResult<Vec<$crate::store::ingest::ItemResult>> {
                use $crate::store::ingest;
                let mut results: Vec<Option<ingest::ItemResult>> =
                    items.iter().map(|_| None).collect();
                let mut announce = Vec::new();
                let mut delta = $crate::store::DirectoryDelta {
                    at: now,
                    ..Default::default()
                };
                let turn = self.write_turn().await;
                let mut tx = self.begin_ingest().await?;
                // Which stream arrived first is judged now, not when the batch began: it may
                // have waited seconds for a connection while its agent's next stream got in.
                let checked_at = now.max($crate::store::Store::now(self));
                for round in ingest::rounds(items) {
                    ingest_round(
                        &mut tx,
                        items,
                        &round,
                        (now, checked_at),
                        &mut results,
                        &mut announce,
                        &mut delta,
                    )
                    .await?;
                }
                tx.commit().await?;
                drop(turn);
                if !announce.is_empty() {
                    // A stream that owned a machine before learns that it was taken over.
                    self.announce_changes(&announce).await;
                }
                self.publish_directory(delta).await;
                Ok(results
                    .into_iter()
                    .map(|result| {
                        result.unwrap_or_else(|| {
                            Err(StoreError::Internal(sqlx::Error::Protocol(
                                "ingest: an item was left without a result".into(),
                            )))
                        })
                    })
                    .collect())
            }
        }

        /// One round of a group: each machine at most once (see the module's documentation).
        async fn ingest_round(
            tx: &mut sqlx::Transaction<'static, $db>,
            items: &[$crate::store::ingest::IngestItem],
            round: &[usize],
            (now, checked_at): (i64, i64),
            results: &mut [Option<$crate::store::ingest::ItemResult>],
            announce: &mut Vec<Uuid>,
            delta: &mut $crate::store::DirectoryDelta,
        ) -> StoreResult<()> {
            use std::collections::HashMap;
            use $crate::store::ingest::plan::{self, MachineEvents, SessionRow};
            use $crate::store::ingest::sql as isql;
            use $crate::store::ingest::statement::{Statement, bind_now, bind_rows, dialect};
            use $crate::store::ingest::{IngestOp, IngestReply};
            let chunk_rows = dialect!($dialect).rows_per_statement();

            // Lock the round's machines in id order and read who owns them.
            let mut ids: Vec<Uuid> = round.iter().map(|&index| items[index].machine).collect();
            ids.sort_unstable();
            ids.dedup();
            let mut owners: HashMap<Uuid, (Option<Uuid>, String, String)> = HashMap::new();
            for chunk in ids.chunks(chunk_rows) {
                let mut statement = Statement::new(isql::LOCK_MACHINES, 0);
                statement
                    .table(dialect!($dialect), chunk.len(), isql::LOCK_MACHINES_TYPES)
                    .push(isql::LOCK_MACHINES_END)
                    .push($lock);
                let mut query = sqlx::query_as::<$db, (Uuid, Option<Uuid>, String, String)>(
                    sqlx::AssertSqlSafe(statement.finish()),
                );
                bind_rows!($dialect, query, chunk, |id| *id);
                for (id, owner, farm, state) in query.fetch_all(&mut **tx).await? {
                    owners.insert(id, (owner, farm, state));
                }
            }

            // ADDED: farms first (the first item's policy for a new farm), then the machines,
            // but for a stream that arrived before the one holding the machine.
            let mut added: Vec<(usize, &MachineDescription, &str)> = Vec::new();
            for &index in round {
                let IngestOp::Added {
                    description,
                    new_farm_policy,
                } = &items[index].op
                else {
                    continue;
                };
                let owner = owners.get(&items[index].machine).and_then(|owner| owner.0);
                if $crate::store::ingest::held_by_newer(owner, items[index].connection, checked_at)
                {
                    results[index] = Some(Err(StoreError::Superseded));
                } else {
                    added.push((index, description, new_farm_policy.as_str()));
                }
            }
            let mut farms: Vec<(&str, &str)> = Vec::new();
            for (_, description, policy) in &added {
                if !farms.iter().any(|(farm, _)| *farm == description.farm) {
                    farms.push((&description.farm, policy));
                }
            }
            for chunk in farms.chunks(chunk_rows) {
                let mut statement = Statement::new(isql::INSERT_FARMS, 1);
                statement
                    .table(dialect!($dialect), chunk.len(), isql::INSERT_FARMS_TYPES)
                    .push(isql::INSERT_FARMS_END);
                let mut query = sqlx::query::<$db>(sqlx::AssertSqlSafe(statement.finish()));
                bind_now!($dialect, first, query, now);
                bind_rows!($dialect, query, chunk, |farm| farm.0, farm.1);
                bind_now!($dialect, last, query, now);
                query.execute(&mut **tx).await?;
            }
            for chunk in added.chunks(chunk_rows) {
                let mut statement = Statement::new(isql::UPSERT_MACHINES, 1);
                statement
                    .table(dialect!($dialect), chunk.len(), isql::UPSERT_MACHINES_TYPES)
                    .push(isql::UPSERT_MACHINES_END);
                let mut query = sqlx::query::<$db>(sqlx::AssertSqlSafe(statement.finish()));
                bind_now!($dialect, first, query, now);
                bind_rows!(
                    $dialect,
                    query,
                    chunk,
                    |added| items[added.0].machine,
                    added.1.farm.as_str(),
                    added.1.name.as_str(),
                    added.1.name.to_ascii_lowercase(),
                    added.1.address.as_str(),
                    i64::from(added.1.weight),
                    i64::from(added.1.session_limit),
                    added.1.single_session,
                    added.1.agent_version.as_str(),
                    items[added.0].connection,
                    added.1.front_door,
                );
                bind_now!($dialect, last, query, now);
                query.execute(&mut **tx).await?;
            }
            let mut answer_with_record: Vec<usize> =
                added.iter().map(|(index, ..)| *index).collect();
            announce.extend(added.iter().map(|&(index, ..)| items[index].machine));
            delta
                .machines
                .extend(added.iter().map(|&(index, description, _)| {
                    $crate::store::DirectoryMachine {
                        id: items[index].machine,
                        farm: description.farm.clone(),
                        name: description.name.clone(),
                        address: description.address.clone(),
                        front_door: description.front_door,
                        state: "joining".to_owned(),
                        last_seen_at: now,
                        updated_at: now,
                    }
                }));

            // The other items, once their stream is known to own the machine.
            let mut resyncs: Vec<(usize, &str, &[SessionInfo])> = Vec::new();
            let mut runs: Vec<(usize, MachineEvents<'_>)> = Vec::new();
            let mut readies: Vec<Uuid> = Vec::new();
            let mut loads: Vec<(usize, &LoadReport)> = Vec::new();
            let mut unreachable: Vec<Uuid> = Vec::new();
            let mut closed_alive: Vec<Uuid> = Vec::new();
            for &index in round {
                let item = &items[index];
                if matches!(item.op, IngestOp::Added { .. }) {
                    continue;
                }
                if matches!(item.op, IngestOp::Unreachable | IngestOp::ClosedAlive) {
                    // Only the owner marks, and only a JOINING or READY machine.
                    let marks = owners.get(&item.machine).is_some_and(|(owner, _, state)| {
                        *owner == Some(item.connection)
                            && matches!(state.as_str(), "joining" | "ready")
                    });
                    if marks && matches!(item.op, IngestOp::ClosedAlive) {
                        closed_alive.push(item.machine);
                    } else if marks {
                        unreachable.push(item.machine);
                    }
                    results[index] = Some(Ok(IngestReply::Marked(marks)));
                    continue;
                }
                let farm = match owners.get(&item.machine) {
                    None => {
                        results[index] = Some(Err(StoreError::NotFound(format!(
                            "machine {}",
                            item.machine
                        ))));
                        continue;
                    }
                    Some((Some(owner), farm, _)) if *owner == item.connection => farm.as_str(),
                    Some(_) => {
                        results[index] = Some(Err(StoreError::Superseded));
                        continue;
                    }
                };
                match &item.op {
                    IngestOp::Added { .. } | IngestOp::Unreachable | IngestOp::ClosedAlive => {}
                    IngestOp::Resync(sessions) => resyncs.push((index, farm, sessions)),
                    IngestOp::Events(events) => runs.push((
                        index,
                        MachineEvents {
                            machine: item.machine,
                            farm,
                            events,
                        },
                    )),
                    IngestOp::Ready => {
                        readies.push(item.machine);
                        answer_with_record.push(index);
                    }
                    IngestOp::Load(load) => loads.push((index, load)),
                }
            }
            let mut recount: Vec<Uuid> = Vec::new();

            // RESYNC: the machines' sessions become what the agents listed; only what differs
            // from the stored rows is written. Then their pending logons are resolved.
            if !resyncs.is_empty() {
                let machines: Vec<Uuid> = resyncs
                    .iter()
                    .map(|&(index, ..)| items[index].machine)
                    .collect();
                let mut stored: HashMap<Uuid, HashMap<i64, SessionRow>> = HashMap::new();
                for chunk in machines.chunks(chunk_rows) {
                    let mut statement = Statement::new(isql::SELECT_SESSIONS_OF_MACHINES, 0);
                    statement
                        .table(dialect!($dialect), chunk.len(), isql::ID_LIST_TYPES)
                        .push(isql::ID_LIST_END);
                    let mut query =
                        sqlx::query_as::<$db, SessionRow>(sqlx::AssertSqlSafe(statement.finish()));
                    bind_rows!($dialect, query, chunk, |id| *id);
                    for row in query.fetch_all(&mut **tx).await? {
                        stored
                            .entry(row.machine_id)
                            .or_default()
                            .insert(row.session_id, row);
                    }
                }
                let mut upserts: Vec<SessionRow> = Vec::new();
                let mut deletes: Vec<(Uuid, i64)> = Vec::new();
                let mut counts: Vec<(Uuid, i64)> = Vec::new();
                for &(index, farm, sessions) in &resyncs {
                    let machine = items[index].machine;
                    let existing = stored.remove(&machine).unwrap_or_default();
                    let (machine_upserts, machine_deletes) =
                        plan::plan_resync(machine, farm, sessions, existing, now);
                    upserts.extend(machine_upserts);
                    deletes.extend(machine_deletes);
                    let distinct: std::collections::BTreeSet<u32> =
                        sessions.iter().map(|session| session.session_id).collect();
                    counts.push((machine, distinct.len() as i64));
                    results[index] = Some(Ok(IngestReply::Done));
                }
                delete_sessions(tx, &deletes).await?;
                write_sessions(tx, &upserts).await?;
                delta.deletes.extend(deletes);
                delta.upserts.extend(upserts);
                delta.seen.extend(machines.iter().copied());
                execute_id_list(
                    tx,
                    isql::DELETE_RESOLVED_PENDING_OF_MACHINES,
                    None,
                    &machines,
                )
                .await?;
                for chunk in counts.chunks(chunk_rows) {
                    let mut statement = Statement::new(isql::SET_SESSION_COUNTS, 1);
                    statement
                        .table(dialect!($dialect), chunk.len(), isql::SESSION_COUNT_TYPES)
                        .push(isql::SET_SESSION_COUNTS_END);
                    let mut query = sqlx::query::<$db>(sqlx::AssertSqlSafe(statement.finish()));
                    bind_now!($dialect, first, query, now);
                    bind_rows!($dialect, query, chunk, |count| count.0, count.1);
                    bind_now!($dialect, last, query, now);
                    query.execute(&mut **tx).await?;
                }
            }

            // Session events: read what they touch, apply them in memory, write each once.
            if !runs.is_empty() {
                let machine_runs: Vec<MachineEvents<'_>> = runs
                    .iter()
                    .map(|(_, run)| MachineEvents {
                        machine: run.machine,
                        farm: run.farm,
                        events: run.events,
                    })
                    .collect();
                let touched = plan::touched_sessions(&machine_runs);
                let mut existing = HashMap::with_capacity(touched.len());
                for chunk in touched.chunks(chunk_rows) {
                    let mut statement = Statement::new(isql::SELECT_TOUCHED_SESSIONS, 0);
                    statement
                        .table(dialect!($dialect), chunk.len(), isql::SESSION_KEY_TYPES)
                        .push(isql::SELECT_TOUCHED_SESSIONS_END);
                    let mut query =
                        sqlx::query_as::<$db, SessionRow>(sqlx::AssertSqlSafe(statement.finish()));
                    bind_rows!($dialect, query, chunk, |key| key.0, key.1);
                    for row in query.fetch_all(&mut **tx).await? {
                        existing.insert((row.machine_id, row.session_id), row);
                    }
                }
                let mut event_plan = plan::plan_events(&machine_runs, existing, now);
                delete_sessions(tx, &event_plan.deletes).await?;
                write_sessions(tx, &event_plan.upserts).await?;
                delta.deletes.append(&mut event_plan.deletes);
                delta.upserts.append(&mut event_plan.upserts);
                for chunk in event_plan.resolved_pending.chunks(chunk_rows) {
                    let mut statement = Statement::new(isql::DELETE_PENDING_FOR_USERS, 0);
                    statement
                        .table(dialect!($dialect), chunk.len(), isql::USER_TYPES)
                        .push(isql::ID_LIST_END);
                    let mut query = sqlx::query::<$db>(sqlx::AssertSqlSafe(statement.finish()));
                    bind_rows!(
                        $dialect,
                        query,
                        chunk,
                        |user| user.0.as_str(),
                        user.1.as_str()
                    );
                    query.execute(&mut **tx).await?;
                }
                for ((index, run), outcomes) in runs.iter().zip(event_plan.outcomes) {
                    results[*index] = Some(Ok(IngestReply::Outcomes(outcomes)));
                    recount.push(run.machine);
                }
            }

            // READY, and the streams that ended.
            execute_id_list(tx, isql::SET_READY, Some(now), &readies).await?;
            execute_id_list(tx, isql::SET_UNREACHABLE, Some(now), &unreachable).await?;
            execute_id_list(tx, isql::SET_UNREACHABLE_HEARD, Some(now), &closed_alive).await?;
            delta
                .states
                .extend(readies.iter().map(|id| (*id, "ready".to_owned())));
            delta.states.extend(
                unreachable
                    .iter()
                    .chain(&closed_alive)
                    .map(|id| (*id, "unreachable".to_owned())),
            );
            delta.seen.extend(readies.iter().copied());
            delta.seen.extend(closed_alive.iter().copied());

            // Load reports (a machine has at most one in a round).
            for chunk in loads.chunks(chunk_rows) {
                let mut statement = Statement::new(isql::RECORD_LOADS, 1);
                statement
                    .table(dialect!($dialect), chunk.len(), isql::LOAD_TYPES)
                    .push(isql::RECORD_LOADS_END);
                let mut query = sqlx::query::<$db>(sqlx::AssertSqlSafe(statement.finish()));
                bind_now!($dialect, first, query, now);
                bind_rows!(
                    $dialect,
                    query,
                    chunk,
                    |load| items[load.0].machine,
                    f64::from(load.1.cpu_percent),
                    f64::from(load.1.memory_percent),
                    i64::from(load.1.session_count),
                    i64::from(load.1.pending_logons),
                );
                bind_now!($dialect, last, query, now);
                query.execute(&mut **tx).await?;
                for &(index, _) in chunk {
                    results[index] = Some(Ok(IngestReply::Done));
                }
            }

            // Each machine whose sessions changed: its count, once (also the lease).
            recount.sort_unstable();
            recount.dedup();
            delta.seen.extend(recount.iter().copied());
            delta
                .seen
                .extend(loads.iter().map(|&(index, _)| items[index].machine));
            execute_id_list(tx, isql::REFRESH_SESSION_COUNTS, Some(now), &recount).await?;

            // ADDED and READY answer with the machine as it is now.
            if !answer_with_record.is_empty() {
                let machines: Vec<Uuid> = answer_with_record
                    .iter()
                    .map(|&index| items[index].machine)
                    .collect();
                let mut records: HashMap<Uuid, MachineRecord> = HashMap::new();
                for chunk in machines.chunks(chunk_rows) {
                    let mut statement = Statement::new(sql::SELECT_MACHINES_BY_IDS, 1);
                    statement
                        .table(dialect!($dialect), chunk.len(), isql::ID_LIST_TYPES)
                        .push(isql::ID_LIST_END);
                    let mut query = sqlx::query_as::<$db, MachineRecord>(sqlx::AssertSqlSafe(
                        statement.finish(),
                    ));
                    bind_now!($dialect, first, query, now);
                    bind_rows!($dialect, query, chunk, |id| *id);
                    bind_now!($dialect, last, query, now);
                    for record in query.fetch_all(&mut **tx).await? {
                        records.insert(record.id, record);
                    }
                }
                for index in answer_with_record {
                    let machine = items[index].machine;
                    results[index] = Some(match records.get(&machine) {
                        Some(record) => Ok(IngestReply::Machine(Box::new(record.clone()))),
                        None => Err(StoreError::NotFound(format!("machine {machine}"))),
                    });
                }
            }
            Ok(())
        }

        /// Runs `prefix` + the table of `ids` + `)`, `now` as `$1` when given; nothing when
        /// there are no ids.
        async fn execute_id_list(
            tx: &mut sqlx::Transaction<'static, $db>,
            prefix: &'static str,
            now: Option<i64>,
            ids: &[Uuid],
        ) -> StoreResult<()> {
            use $crate::store::ingest::sql as isql;
            use $crate::store::ingest::statement::{Statement, bind_now, bind_rows, dialect};
            for chunk in ids.chunks(dialect!($dialect).rows_per_statement()) {
                let mut statement = Statement::new(prefix, usize::from(now.is_some()));
                statement
                    .table(dialect!($dialect), chunk.len(), isql::ID_LIST_TYPES)
                    .push(isql::ID_LIST_END);
                let mut query = sqlx::query::<$db>(sqlx::AssertSqlSafe(statement.finish()));
                if let Some(now) = now {
                    bind_now!($dialect, first, query, now);
                }
                bind_rows!($dialect, query, chunk, |id| *id);
                if let Some(now) = now {
                    bind_now!($dialect, last, query, now);
                }
                query.execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Deletes sessions by (machine id, session id).
        async fn delete_sessions(
            tx: &mut sqlx::Transaction<'static, $db>,
            keys: &[(Uuid, i64)],
        ) -> StoreResult<()> {
            use $crate::store::ingest::sql as isql;
            use $crate::store::ingest::statement::{Statement, bind_rows, dialect};
            for chunk in keys.chunks(dialect!($dialect).rows_per_statement()) {
                let mut statement = Statement::new(isql::DELETE_SESSIONS, 0);
                statement
                    .table(dialect!($dialect), chunk.len(), isql::SESSION_KEY_TYPES)
                    .push(isql::ID_LIST_END);
                let mut query = sqlx::query::<$db>(sqlx::AssertSqlSafe(statement.finish()));
                bind_rows!($dialect, query, chunk, |key| key.0, key.1);
                query.execute(&mut **tx).await?;
            }
            Ok(())
        }

        /// Writes session rows as they are (created or replaced).
        async fn write_sessions(
            tx: &mut sqlx::Transaction<'static, $db>,
            rows: &[$crate::store::ingest::plan::SessionRow],
        ) -> StoreResult<()> {
            use $crate::store::ingest::sql as isql;
            use $crate::store::ingest::statement::{Statement, bind_rows, dialect};
            for chunk in rows.chunks(dialect!($dialect).rows_per_statement()) {
                let mut statement = Statement::new(isql::INSERT_SESSIONS, 0);
                statement
                    .table(dialect!($dialect), chunk.len(), isql::SESSION_TYPES)
                    .push(isql::UPSERT_SESSIONS_END);
                let mut query = sqlx::query::<$db>(sqlx::AssertSqlSafe(statement.finish()));
                bind_rows!(
                    $dialect,
                    query,
                    chunk,
                    |row| row.machine_id,
                    row.session_id,
                    row.farm.as_str(),
                    row.user_name.as_str(),
                    row.user_key.as_str(),
                    row.domain.as_str(),
                    row.state.as_str(),
                    row.client_address.as_str(),
                    row.logon_at,
                    row.state_changed_at,
                );
                query.execute(&mut **tx).await?;
            }
            Ok(())
        }
    };
}

pub(crate) use impl_ingest;
