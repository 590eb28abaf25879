//! The decision path's queries stay off full scans of the big tables: with 1,000 machines and
//! 100,000 sessions in PostgreSQL, EXPLAIN of each hot statement uses indexes on `sessions`
//! and `pending_logons` (with a realistic mix: few pending logons expired at any moment).

use sqlx::Row;
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
        "ANALYZE",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&pool)
            .await
            .unwrap();
    }
    let machine = uuid::Uuid::from_slice(&md5_of("m7")).unwrap();
    for (name, statement) in HOT_QUERIES {
        let explain = format!("EXPLAIN {statement}");
        let query = sqlx::query(sqlx::AssertSqlSafe(explain));
        let query = match *name {
            "user_sessions" => query.bind("big").bind("user4242"),
            "users_with_prefix" => query
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
            "farm_machines" => query.bind(5i64).bind("big"),
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
        let tables: &[&str] = if *name == "farm_machines" {
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

/// The 16 bytes PostgreSQL's `md5(text)::uuid` makes of `text`.
fn md5_of(text: &str) -> [u8; 16] {
    md5::compute(text.as_bytes()).0
}
