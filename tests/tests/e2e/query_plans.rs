//! The decision path's queries stay off full scans of the big tables: with 1,000 machines and
//! 100,000 sessions in PostgreSQL, EXPLAIN of each hot statement uses indexes on `sessions`
//! and `pending_logons` (with a realistic mix: few pending logons expired at any moment); a
//! batch's pending logons are found by the primary key on PostgreSQL, before and after the
//! tables have statistics, and on SQLite, which keeps none; and whether its users have
//! sessions, by (farm, user) for each of them, also in the plan a new database's first
//! placements cache (a logon storm on a new farm); the main pool's lookups are planned for the
//! size the tables have when they run; a machine's logons in flight are counted from one
//! index; a large farm's placement reads are not JIT-compiled; and the store's pools start
//! their connections with the settings these tests rely on, on an SQLite built the way
//! `.cargo/config.toml` says.

use sqlx::{Connection, Row};
use tsbroker::store::{self, HOT_QUERIES};
use tsbroker_tests::TestDatabase;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_queries_use_indexes_with_100k_sessions() {
    let database = TestDatabase::postgres().await;
    drop(store::open(&database.url).await.expect("migrate"));
    let pool = sqlx::PgPool::connect(&database.url).await.unwrap();
    for statement in [
        "INSERT INTO farms (name, created_at) VALUES ('big', 0)",
        "INSERT INTO machines (id, farm, name, name_key, address, agent_weight, agent_session_limit, \
         single_session, agent_version, state, session_count, last_seen_at, created_at, updated_at) \
         SELECT md5('m' || i)::uuid, 'big', 'ts' || i, 'ts' || i, 'ts' || i || ':3389', 100, 0, false, '', \
         'ready', 100, 0, 0, 0 FROM generate_series(1, 1000) AS i",
        "INSERT INTO sessions (machine_id, session_id, farm, user_name, user_key, domain, state, \
         client_address, logon_at, state_changed_at) \
         SELECT md5('m' || (i % 1000 + 1))::uuid, i, 'big', 'user' || i, 'user' || i, '', \
         CASE WHEN i % 3 = 0 THEN 'disconnected' ELSE 'active' END, '', i, i \
         FROM generate_series(1, 100000) AS i",
        "INSERT INTO pending_logons (farm, user_key, machine_id, created_at, expires_at) \
         SELECT 'big', 'pending' || i, md5('m' || (i % 1000 + 1))::uuid, 0, \
         CASE WHEN i <= 20 THEN 10 ELSE 100000 END FROM generate_series(1, 5000) AS i",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .unwrap();
    }
    // Before the tables have statistics (a new database, the first minute of a logon storm)
    // and after, a batch's pending logons are found by the primary key, not by reading the
    // farm's.
    assert_pending_found_by_primary_key(&pool, "without statistics").await;
    sqlx::query("ANALYZE").execute(&pool).await.unwrap();
    assert_pending_found_by_primary_key(&pool, "with statistics").await;
    let machine = uuid::Uuid::from_slice(&md5_of("m7")).unwrap();
    for (name, statement) in HOT_QUERIES {
        let explain = format!("EXPLAIN {statement}");
        let query = sqlx::query(sqlx::AssertSqlSafe(explain));
        let query = match *name {
            "user_sessions" => query.bind("big").bind("user4242"),
            "users_with_prefix" | "client_addresses_with_prefix" => query
                .bind("big")
                .bind("user424")
                .bind("user424\u{10FFFF}")
                .bind(2i64),
            "pending_of_users" => query
                .bind("big")
                .bind(5i64)
                .bind("pending17")
                .bind("pending18"),
            "pending_logon_machine" => query.bind(5i64).bind("big").bind("pending17"),
            "machine_by_id" => query.bind(5i64).bind(machine),
            "farm_machines" => query.bind("big"),
            "farm_pending_counts" => query.bind(5i64).bind("big"),
            "changed_machines" => query.bind(5i64).bind("big").bind(0i64),
            "expired_pending" => query.bind("big").bind(12i64),
            other => panic!("no parameters for hot query {other}: add them here"),
        };
        let plan: Vec<String> = query
            .fetch_all(&pool)
            .await
            .unwrap_or_else(|error| panic!("{name}: {error}"))
            .iter()
            .map(|row| row.get::<String, _>(0))
            .collect();
        let plan = plan.join("\n");
        // Counting a farm's logons in flight reads the farm's pending rows by design: that
        // table holds only logons in flight (here 5,000, nearly all in this farm).
        let tables: &[&str] = if *name == "farm_pending_counts" {
            &["sessions"]
        } else {
            &["sessions", "pending_logons"]
        };
        for table in tables {
            assert!(
                !plan.contains(&format!("Seq Scan on {table}")),
                "{name} scans all of {table}:\n{plan}"
            );
        }
    }
    pool.close().await;
    database.drop_database().await;
}

/// A logon storm on a new database: each placement connection plans the batch's lookup once,
/// while the tables are nearly empty (never analysed, or analysed with a pilot's 60 sessions),
/// and keeps that plan while the storm fills them (autovacuum analyses them a minute later at
/// the earliest). With the placement connections' settings, the plan must still probe each
/// user's pending logon and sessions by key, not read the farm's rows and filter them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_databases_cached_lookup_probes_each_users_sessions() {
    let (database, mut connection) = new_farm(&[]).await;
    add_sessions(&mut connection, 1, 5).await;
    set_all(&mut connection, &store::PLACEMENT_SETTINGS).await;
    for analysed in [false, true] {
        if analysed {
            // Autovacuum analyses a table after 50 changes at the least: a pilot's sessions.
            add_sessions(&mut connection, 6, 60).await;
            sqlx::query("ANALYZE")
                .execute(&mut connection)
                .await
                .unwrap();
        }
        for keys in BATCH_KEYS {
            let name = format!("lookup_{keys}_{analysed}");
            let types = vec!["text"; keys].join(", ");
            let prepare = format!(
                "PREPARE {name} (text, bigint, {types}) AS {}",
                store::select_pending_of_users(keys, true)
            );
            sqlx::query(sqlx::AssertSqlSafe(prepare))
                .execute(&mut connection)
                .await
                .unwrap();
            let arguments: Vec<String> = (0..keys).map(|key| format!("'user{key}'")).collect();
            let explain = format!(
                "EXPLAIN EXECUTE {name} ('new', 5, {})",
                arguments.join(", ")
            );
            let lines = plan_lines(&mut connection, explain).await;
            // Every read of either table is an index probe by farm and user.
            let when = if analysed {
                "analysed"
            } else {
                "never analysed"
            };
            let plan = lines.join("\n");
            for (table, index) in [
                ("sessions", "sessions_by_farm_user"),
                ("pending_logons", "pending_logons_pkey"),
            ] {
                let reads: Vec<&[String]> = lines
                    .windows(2)
                    .filter(|pair| pair[0].contains(&format!(" on {table} ")))
                    .collect();
                assert!(
                    !reads.is_empty()
                        && reads.iter().all(|pair| {
                            pair[0].contains(&format!("using {index}"))
                                && pair[1].contains("Index Cond: ((farm = $1) AND (user_key = ")
                        }),
                    "{keys} users' {table}, tables {when}, cached plan:\n{plan}"
                );
            }
        }
    }
    drop(connection);
    database.drop_database().await;
}

/// A placement connection's whole read of a farm (every tenth of a second's refresh reads only
/// changed machines; every second it reads the farm), planned once while the farm was new — 100
/// machines, no logon in flight — and kept (generic plans) while the farm grows to 2,000
/// machines with 1,000 logons in flight: the rows it looks at stay in proportion to the rows
/// there are. (A join planned for one pending row compared every machine with every pending
/// logon: 0.7–1 s a read at 10,000 machines.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_farm_read_planned_on_a_new_farm_stays_linear_as_it_grows() {
    let (database, mut connection) = new_farm(&[
        "ALTER TABLE machines SET (autovacuum_enabled = false)",
        "ALTER TABLE pending_logons SET (autovacuum_enabled = false)",
    ])
    .await;
    set_all(&mut connection, &store::PLACEMENT_SETTINGS).await;
    let reads: Vec<&str> = HOT_QUERIES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| name.starts_with("farm_"))
        .collect();
    assert!(!reads.is_empty());
    for name in &reads {
        prepare_placement_read(&mut connection, name).await;
        sqlx::query(sqlx::AssertSqlSafe(execute_placement_read(name)))
            .execute(&mut connection)
            .await
            .unwrap();
    }
    add_machines(&mut connection, 101, 2_000).await;
    sqlx::query(
        "INSERT INTO pending_logons (farm, user_key, machine_id, created_at, expires_at) \
         SELECT 'new', 'pending' || i, md5('m' || i)::uuid, 0, 100000 \
         FROM generate_series(1, 1000) AS i",
    )
    .execute(&mut connection)
    .await
    .unwrap();
    for name in &reads {
        let explain = format!(
            "EXPLAIN (ANALYZE, TIMING OFF) {}",
            execute_placement_read(name)
        );
        let plan = plan_lines(&mut connection, explain).await;
        let discarded: u64 = plan
            .iter()
            .filter_map(|line| line.split_once("Rows Removed by ")?.1.split_once(": "))
            .map(|(_, count)| count.trim().parse::<u64>().unwrap())
            .sum();
        assert!(
            discarded <= 3_000,
            "{name} discarded {discarded} rows for 2,000 machines and 1,000 logons in flight:\n{}",
            plan.join("\n")
        );
    }
    drop(connection);
    database.drop_database().await;
}

/// A machine's logons in flight — the count each read of changed machines makes for every
/// machine it returns — are found through one index on (machine, expiry), never by combining
/// the machine's index with the expiry index: a generic plan that did (a BitmapAnd) read every
/// unexpired logon of the farm once per machine, 0.2–1.5 s a read after a broker restart at
/// 10,000 machines with 17,000 logons in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machines_logons_in_flight_are_counted_from_one_index() {
    let (database, mut connection) = new_farm(&[]).await;
    add_pending_logons(&mut connection, 1, 5_000).await;
    sqlx::query("ANALYZE")
        .execute(&mut connection)
        .await
        .unwrap();
    set_all(&mut connection, &store::PLACEMENT_SETTINGS).await;
    prepare_placement_read(&mut connection, "changed_machines").await;
    // Every machine of the farm changed since 0.
    let explain =
        "EXPLAIN (ANALYZE, TIMING OFF) EXECUTE changed_machines (5, 'new', 0)".to_string();
    let plan = plan_lines(&mut connection, explain).await;
    let one_index = plan.iter().any(|line| {
        line.contains("Index Cond:")
            && line.contains("machine_id = m.id")
            && line.contains("expires_at > $1")
    });
    assert!(
        one_index && !plan.iter().any(|line| line.contains("BitmapAnd")),
        "a machine's logons in flight are not counted from one index:\n{}",
        plan.join("\n")
    );
    drop(connection);
    database.drop_database().await;
}

/// No read of a placement batch is compiled by PostgreSQL's JIT. A batch reads the farm's
/// changed machines ten times a second, each with a probe of its logons in flight; at 10,000
/// machines with tens of logons in flight each, the generic plan's estimate passed the JIT's
/// thresholds, and compiling the statement with LLVM added ~100 ms to each read of a few
/// milliseconds (the scale scenario's decisions after a restart: 1,300/s, p99 230–350 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_farms_reads_are_not_jit_compiled() {
    let (database, mut connection) = new_farm(&[]).await;
    add_machines(&mut connection, 101, 10_000).await;
    for statement in [
        "INSERT INTO pending_logons (farm, user_key, machine_id, created_at, expires_at) \
         SELECT 'new', 'pending' || i, md5('m' || (i % 10000 + 1))::uuid, 0, 100000 \
         FROM generate_series(1, 500000) AS i",
        "ANALYZE",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut connection)
            .await
            .unwrap();
    }
    set_all(&mut connection, &store::PLACEMENT_SETTINGS).await;
    let reads = ["changed_machines", "farm_machines", "farm_pending_counts"];
    for name in reads {
        prepare_placement_read(&mut connection, name).await;
        let explain = format!(
            "EXPLAIN (ANALYZE, TIMING OFF) {}",
            execute_placement_read(name)
        );
        let plan = plan_lines(&mut connection, explain).await;
        assert!(
            !plan.iter().any(|line| line.starts_with("JIT:")),
            "{name} is JIT-compiled:\n{}",
            plan.join("\n")
        );
    }
    drop(connection);
    database.drop_database().await;
}

/// The main pool's lookups by key on a new farm's database: its statements run rarely, but a
/// plan PostgreSQL kept after five executions on a pilot's analysed tables (60 sessions) would
/// read them whole while a logon storm fills them. With the main pool's settings, each is
/// planned for the tables' size when it runs: every read of either table is an index probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_main_pools_lookups_follow_a_new_farms_growth() {
    // No analysis in the middle of the test: the storm outruns autovacuum.
    let (database, mut connection) = new_farm(&[
        "ALTER TABLE sessions SET (autovacuum_enabled = false)",
        "ALTER TABLE pending_logons SET (autovacuum_enabled = false)",
    ])
    .await;
    add_sessions(&mut connection, 1, 60).await;
    add_pending_logons(&mut connection, 1, 60).await;
    sqlx::query("ANALYZE")
        .execute(&mut connection)
        .await
        .unwrap();
    set_all(&mut connection, &store::MAIN_SETTINGS).await;
    let machine = "md5('m7')::uuid";
    let lookups = [
        ("user_sessions", "text, text", "'new', 'user7'".to_string()),
        (
            "users_with_prefix",
            "text, text, text, bigint",
            "'new', 'user7', 'user8', 2".to_string(),
        ),
        (
            "pending_logon_machine",
            "bigint, text, text",
            "5, 'new', 'pending7'".to_string(),
        ),
        ("machine_by_id", "bigint, uuid", format!("5, {machine}")),
    ];
    let mut prepared = Vec::new();
    for (name, types, arguments) in lookups {
        let statement = HOT_QUERIES
            .iter()
            .find(|(hot, _)| *hot == name)
            .map(|(_, statement)| statement.to_string())
            .unwrap_or_else(|| panic!("no hot query {name}"));
        prepared.push((name, types, statement, arguments));
    }
    prepared.push((
        "sessions_of_machines",
        "uuid, uuid",
        store::directory_feed::select_sessions_of_machines(2),
        format!("{machine}, md5('m8')::uuid"),
    ));
    for (name, types, statement, arguments) in &prepared {
        let prepare = format!("PREPARE {name} ({types}) AS {statement}");
        sqlx::query(sqlx::AssertSqlSafe(prepare))
            .execute(&mut connection)
            .await
            .unwrap();
        // PostgreSQL's default keeps a generic plan after five executions.
        for _ in 0..6 {
            sqlx::query(sqlx::AssertSqlSafe(format!("EXECUTE {name} ({arguments})")))
                .execute(&mut connection)
                .await
                .unwrap();
        }
    }
    add_sessions(&mut connection, 61, 10_000).await;
    add_pending_logons(&mut connection, 61, 10_000).await;
    for (name, _, _, arguments) in &prepared {
        let explain = format!("EXPLAIN EXECUTE {name} ({arguments})");
        let plan = plan_lines(&mut connection, explain).await.join("\n");
        for table in ["sessions", "pending_logons"] {
            assert!(
                !plan.contains(&format!("Seq Scan on {table}")),
                "{name} reads all of {table} after the storm:\n{plan}"
            );
        }
    }
    drop(connection);
    database.drop_database().await;
}

/// The plan tests above SET the settings on their own connection; the store's pools must start
/// every connection with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stores_connections_carry_their_settings() {
    let database = TestDatabase::postgres().await;
    let store = store::PostgresStore::open(&database.url)
        .await
        .expect("open the store");
    let wrong = store
        .settings_not_in_effect()
        .await
        .expect("read the settings back");
    assert!(wrong.is_empty(), "settings not in effect: {wrong:?}");
    drop(store);
    database.drop_database().await;
}

/// The embedded SQLite is compiled without its memory statistics (`.cargo/config.toml`): with
/// them, every allocation of every connection's thread takes one process-wide mutex.
#[tokio::test]
async fn the_embedded_sqlite_keeps_no_memory_statistics() {
    let mut connection = sqlx::SqliteConnection::connect("sqlite::memory:")
        .await
        .unwrap();
    let options: Vec<String> = sqlx::query_scalar("PRAGMA compile_options")
        .fetch_all(&mut connection)
        .await
        .unwrap();
    assert!(
        options.iter().any(|option| option == "DEFAULT_MEMSTATUS=0"),
        "{options:?}"
    );
}

/// A new database with farm `new` of 100 ready machines `ts1`…`ts100` (after `first`
/// statements), and a connection to it.
async fn new_farm(first: &[&str]) -> (TestDatabase, sqlx::PgConnection) {
    let database = TestDatabase::postgres().await;
    drop(store::open(&database.url).await.expect("migrate"));
    let mut connection = sqlx::PgConnection::connect(&database.url).await.unwrap();
    let farm = "INSERT INTO farms (name, created_at) VALUES ('new', 0)";
    for statement in first.iter().chain([&farm]) {
        sqlx::query(sqlx::AssertSqlSafe(*statement))
            .execute(&mut connection)
            .await
            .unwrap();
    }
    add_machines(&mut connection, 1, 100).await;
    (database, connection)
}

/// Machines `ts<first>`…`ts<last>` of farm `new`, ready, each last changed at time `i`.
async fn add_machines(connection: &mut sqlx::PgConnection, first: i32, last: i32) {
    insert_series(
        connection,
        "INSERT INTO machines (id, farm, name, name_key, address, agent_weight, \
         agent_session_limit, single_session, agent_version, state, session_count, last_seen_at, \
         created_at, updated_at) SELECT md5('m' || i)::uuid, 'new', 'ts' || i, 'ts' || i, \
         'ts' || i || ':3389', 100, 0, false, '', 'ready', 0, 0, 0, i \
         FROM generate_series($1::int, $2::int) AS i",
        first,
        last,
    )
    .await;
}

/// A placement batch's read of farm `new` from [`HOT_QUERIES`]: its parameters' types, and
/// the values its tests run it with (now 5; changed since 9,990).
fn placement_read_parameters(name: &str) -> (&'static str, &'static str) {
    match name {
        "changed_machines" => ("bigint, text, bigint", "5, 'new', 9990"),
        "farm_machines" => ("text", "'new'"),
        "farm_pending_counts" => ("bigint, text", "5, 'new'"),
        other => panic!("no parameters for placement read {other}: add them here"),
    }
}

/// PREPAREs the placement read `name` under its own name (a generic plan, with the placement
/// connections' settings).
async fn prepare_placement_read(connection: &mut sqlx::PgConnection, name: &str) {
    let (_, statement) = HOT_QUERIES
        .iter()
        .find(|(hot, _)| *hot == name)
        .unwrap_or_else(|| panic!("{name} in HOT_QUERIES"));
    let (types, _) = placement_read_parameters(name);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PREPARE {name} ({types}) AS {statement}"
    )))
    .execute(connection)
    .await
    .unwrap();
}

/// EXECUTE of the prepared placement read `name` with its test values.
fn execute_placement_read(name: &str) -> String {
    format!("EXECUTE {name} ({})", placement_read_parameters(name).1)
}

/// The lines of an EXPLAIN's plan.
async fn plan_lines(connection: &mut sqlx::PgConnection, explain: String) -> Vec<String> {
    sqlx::query(sqlx::AssertSqlSafe(explain))
        .fetch_all(connection)
        .await
        .unwrap()
        .iter()
        .map(|row| row.get::<String, _>(0))
        .collect()
}

/// The connection takes a pool's `settings`.
async fn set_all(connection: &mut sqlx::PgConnection, settings: &[(&str, &str)]) {
    for (setting, value) in settings {
        sqlx::query(sqlx::AssertSqlSafe(format!("SET {setting} = '{value}'")))
            .execute(&mut *connection)
            .await
            .unwrap();
    }
}

/// Pending logons `first..=last` of farm `new`, user `pending<i>` on machine `ts<i % 100 + 1>`.
async fn add_pending_logons(connection: &mut sqlx::PgConnection, first: i32, last: i32) {
    insert_series(
        connection,
        "INSERT INTO pending_logons (farm, user_key, machine_id, created_at, expires_at) \
         SELECT 'new', 'pending' || i, md5('m' || (i % 100 + 1))::uuid, 0, 100000 \
         FROM generate_series($1::int, $2::int) AS i",
        first,
        last,
    )
    .await;
}

/// Active sessions `first..=last` of farm `new`, user `user<i>` on machine `ts<i % 100 + 1>`.
async fn add_sessions(connection: &mut sqlx::PgConnection, first: i32, last: i32) {
    insert_series(
        connection,
        "INSERT INTO sessions (machine_id, session_id, farm, user_name, user_key, domain, state, \
         client_address, logon_at, state_changed_at) \
         SELECT md5('m' || (i % 100 + 1))::uuid, i, 'new', 'user' || i, 'user' || i, '', \
         'active', '', i, i FROM generate_series($1::int, $2::int) AS i",
        first,
        last,
    )
    .await;
}

/// Runs an INSERT … SELECT over `generate_series($1::int, $2::int) AS i`, for `first..=last`.
async fn insert_series(
    connection: &mut sqlx::PgConnection,
    statement: &'static str,
    first: i32,
    last: i32,
) {
    sqlx::query(statement)
        .bind(first)
        .bind(last)
        .execute(connection)
        .await
        .unwrap();
}

/// SQLite keeps no statistics: its plan for a batch's pending logons must take the primary key
/// by itself, with the farm's pending logons in the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_finds_pending_logons_by_primary_key() {
    let database = TestDatabase::sqlite();
    drop(store::open(&database.url).await.expect("migrate"));
    let pool = sqlx::SqlitePool::connect(&database.url).await.unwrap();
    for statement in [
        "INSERT INTO farms (name, created_at) VALUES ('big', 0)",
        "INSERT INTO machines (id, farm, name, name_key, address, agent_weight, \
         agent_session_limit, single_session, agent_version, state, session_count, last_seen_at, \
         created_at, updated_at) VALUES (x'00000000000000000000000000000007', 'big', 'ts7', \
         'ts7', 'ts7:3389', 100, 0, 0, '', 'ready', 0, 0, 0, 0)",
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000) \
         INSERT INTO pending_logons (farm, user_key, machine_id, created_at, expires_at) \
         SELECT 'big', 'pending' || i, x'00000000000000000000000000000007', 0, 100000 FROM n",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .unwrap();
    }
    for keys in BATCH_KEYS {
        let explain = format!(
            "EXPLAIN QUERY PLAN {}",
            store::select_pending_of_users(keys, true)
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(explain))
            .bind("big")
            .bind(5i64);
        for key in 0..keys {
            query = query.bind(format!("pending{key}"));
        }
        let plan: Vec<String> = query
            .fetch_all(&pool)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>(3))
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("USING INDEX sqlite_autoindex_pending_logons_1 (farm=? AND user_key=?)"),
            "{keys} keys:\n{plan}"
        );
    }
    pool.close().await;
}

/// Keys in batches' lookups, from a lone logon to a busy batch (a batch's keys are padded to a
/// power of two).
const BATCH_KEYS: [usize; 4] = [1, 2, 8, 64];

/// EXPLAIN of batches' lookups of pending logons (and sessions), as placements run them: each
/// takes the primary key.
async fn assert_pending_found_by_primary_key(pool: &sqlx::PgPool, when: &str) {
    for keys in BATCH_KEYS {
        let explain = format!("EXPLAIN {}", store::select_pending_of_users(keys, true));
        let mut query = sqlx::query(sqlx::AssertSqlSafe(explain))
            .bind("big")
            .bind(5i64);
        for key in 0..keys {
            query = query.bind(format!("pending{key}"));
        }
        let rows = query.fetch_all(pool).await.unwrap();
        let plan: Vec<String> = rows.iter().map(|row| row.get::<String, _>(0)).collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("pending_logons_pkey"),
            "pending logons of {keys} users, {when}:\n{plan}"
        );
    }
}

/// The 16 bytes PostgreSQL's `md5(text)::uuid` makes of `text`.
fn md5_of(text: &str) -> [u8; 16] {
    md5::compute(text.as_bytes()).0
}
