//! The PostgreSQL store: what a production farm uses and what several broker replicas share.
//! Row locks serialize the changes that must not interleave — on machines `FOR NO KEY UPDATE`,
//! which never blocks the foreign-key checks of a placement recording a pending logon on the
//! machine (a `FOR UPDATE` there let a placement and a stream write wait for each other); changes made by
//! administrators reach every replica through LISTEN/NOTIFY, and so do the machines whose
//! sessions a replica changed (for the other replicas' in-memory directories).

use super::directory_feed::{self, DIRECTORY_CHANNEL, DirectoryDelta, SinkSlot};
use super::ingest;
use super::sql::{self, StoreHooks, WriteTurn};
use super::{
    BatchChooser, FarmCache, FarmRecord, MachineChange, MachineRecord, Placement, PlacementRequest,
    SessionFilter, SessionRecord, StoreError, StoreResult, StreamMachineState,
};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::broadcast;
use tsbroker_common::model::{self, LoadReport, MachineDescription, SessionInfo, SessionState};
use uuid::Uuid;

const CHANGE_CHANNEL: &str = "tsbroker_machine_changed";

/// Connections of the ingest pool: the writer's transactions in flight
/// (`IngestSettings::concurrency`) plus single writes made outside the writer.
const INGEST_CONNECTIONS: u32 = 4;

/// Connections of the placement pool: one placement transaction at a time per farm.
const PLACEMENT_CONNECTIONS: u32 = 8;
/// How long a placement waits for one of them.
const PLACEMENT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// A setting a pool's connections start with: name and value.
type Setting = (&'static str, &'static str);

/// Every pool's connections run without PostgreSQL's JIT compiler. The broker's statements
/// read and write a few rows by key in a millisecond or two, but a plan's estimate can pass
/// the JIT's cost thresholds (a large farm's read with a probe per machine; any plan with
/// sequential scans off), and compiling it with LLVM then costs ~100 ms per execution: a
/// placement batch's read of a 10,000-machine farm's changed machines took 100–150 ms instead
/// of 1–2 ms.
const NO_JIT: Setting = ("jit", "off");

/// A transaction left open longer than this without a statement is ended by the server, and
/// its locks let go: a replica frozen or cut off from the database in the middle of a placement
/// (a paused VM, a network split) would otherwise hold its farm's lock, stopping every
/// replica's new logons, until the server's TCP keepalive gave up (two hours by default). The
/// broker's transactions run their statements back to back, in milliseconds.
const IDLE_IN_TRANSACTION: Setting = ("idle_in_transaction_session_timeout", "5s");

/// [`IDLE_IN_TRANSACTION`] for placements, whose transaction holds the farm's lock: ended
/// sooner than the other replicas' placements give up waiting for it ([`LOCK_WAIT`]), so that
/// they go on and answer within a front door's wait for a `Redirect` (3 s): a replica frozen
/// in the middle of a placement then delays the farm's new logons by at most this, instead of
/// having every front door decide alone (a user connecting twice at once, through two front
/// doors, would get two sessions).
const PLACEMENT_IDLE_IN_TRANSACTION: Setting = ("idle_in_transaction_session_timeout", "1500ms");

/// The longest wait for a row or farm lock on placement and ingest connections; past it the
/// call fails as UNAVAILABLE (retry) instead of waiting on a lock until [`IDLE_IN_TRANSACTION`]
/// ends a frozen replica's transaction (a farm's lock, which replicas' placements hold, is let
/// go sooner: [`PLACEMENT_IDLE_IN_TRANSACTION`]), or for ever on another client's (an
/// operator's `psql` left in a transaction). Under load, locks are held for milliseconds.
const LOCK_WAIT: Setting = ("lock_timeout", "2s");

/// The ingest connections' settings. Every ingest statement finds its rows by key (a table of
/// ids joined with a primary key or index). Without statistics (a fresh farm: autovacuum has
/// not analysed the tables yet) or with a plan made while a table was small, the planner would
/// scan the whole table instead; with sequential scans off, each statement has one plan, made
/// once per connection, of index probes — right for a handful of keys and for thousands.
const INGEST_SETTINGS: [Setting; 5] = [
    ("enable_seqscan", "off"),
    ("plan_cache_mode", "force_generic_plan"),
    NO_JIT,
    IDLE_IN_TRANSACTION,
    LOCK_WAIT,
];

/// The placement connections' settings: commits that do not wait for the disk (see
/// `begin_placement`), and the ingest connections' one plan of index probes per statement — a
/// batch's lookups probe keys, but a plan made on a new farm's nearly empty tables (no
/// statistics yet, or a pilot's 50 rows) reads them whole, and each connection would keep it
/// while a logon storm fills them (autovacuum analyses them a minute later at the earliest).
pub const PLACEMENT_SETTINGS: [Setting; 6] = [
    ("synchronous_commit", "off"),
    ("enable_seqscan", "off"),
    ("plan_cache_mode", "force_generic_plan"),
    NO_JIT,
    PLACEMENT_IDLE_IN_TRANSACTION,
    LOCK_WAIT,
];

/// The main pool's settings. Its statements are rare next to the placements and agents' events
/// (administrators' calls, agents' settings, a decision read from the database while the
/// directory loads, another replica's sessions read again), so each is planned when it runs,
/// with the tables' current sizes: PostgreSQL's default keeps a plan after five executions,
/// and one made while a new farm's tables held a pilot's rows reads them whole until
/// autovacuum analyses them again (a minute or more into a logon storm). The directory's
/// whole-table loads keep their sequential scans.
pub const MAIN_SETTINGS: [Setting; 3] = [
    ("plan_cache_mode", "force_custom_plan"),
    NO_JIT,
    IDLE_IN_TRANSACTION,
];

pub struct PostgresStore {
    /// Everything but placements and agents' events, with [`MAIN_SETTINGS`].
    pool: sqlx::PgPool,
    /// The group-commit writer's own connections (see `ingest`), with [`INGEST_SETTINGS`]:
    /// placements waiting on a farm's lock hold connections of `pool`, never these.
    ingest_pool: sqlx::PgPool,
    /// The placements' connections, with [`PLACEMENT_SETTINGS`].
    placement_pool: sqlx::PgPool,
    changes: broadcast::Sender<Uuid>,
    directory: SinkSlot,
    /// This store's id in directory notifications (its own are not applied twice).
    instance: Uuid,
    listener: tokio::task::JoinHandle<()>,
    /// The database server's clock, as measured from here.
    clock: crate::clock::Clock,
}

impl PostgresStore {
    /// Connects, runs the migrations and starts listening for other replicas' changes.
    pub async fn open(database_url: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        let options =
            PgConnectOptions::from_str(database_url).context("parse the postgresql url")?;
        let pool = connect_pool(
            PgPoolOptions::new()
                .max_connections(32)
                .acquire_timeout(Duration::from_secs(5)),
            options.clone().options(MAIN_SETTINGS),
        )
        .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .context("migrate the postgresql database")?;
        let ingest_pool = connect_pool(
            PgPoolOptions::new()
                .max_connections(INGEST_CONNECTIONS)
                .acquire_timeout(Duration::from_secs(10)),
            options.clone().options(INGEST_SETTINGS),
        )
        .await?;
        let placement_pool = connect_pool(
            PgPoolOptions::new()
                .max_connections(PLACEMENT_CONNECTIONS)
                // A batch holds one for milliseconds, so a longer wait means the database is
                // away: the caller hears UNAVAILABLE before a front door stops waiting (3 s)
                // and sends the user to its own RDP service.
                .acquire_timeout(PLACEMENT_ACQUIRE_TIMEOUT),
            options.options(PLACEMENT_SETTINGS),
        )
        .await?;
        let (changes, _) = broadcast::channel(1024);
        let directory = SinkSlot::default();
        let instance = Uuid::new_v4();
        let listener = tokio::spawn(forward_notifications(
            pool.clone(),
            changes.clone(),
            directory.clone(),
            instance,
        ));
        let store = PostgresStore {
            pool,
            ingest_pool,
            placement_pool,
            changes,
            directory,
            instance,
            listener,
            clock: crate::clock::Clock::default(),
        };
        match store.settings_not_in_effect().await {
            Ok(wrong) => {
                for setting in wrong {
                    tracing::warn!(
                        setting,
                        "a postgresql connection setting did not take effect (a connection pooler \
                         that drops startup options?): lookups may plan poorly on a growing farm"
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "could not read the connections' settings back"),
        }
        Ok(store)
    }

    /// The settings a connection of each pool does not have as this store asked (as
    /// "pool: name = value, not expected"); empty when all took effect. They are sent as startup
    /// options, which a connection pooler in between may drop or refuse.
    pub async fn settings_not_in_effect(&self) -> Result<Vec<String>, sqlx::Error> {
        let pools: [(&str, &sqlx::PgPool, &[Setting]); 3] = [
            ("main", &self.pool, &MAIN_SETTINGS),
            ("ingest", &self.ingest_pool, &INGEST_SETTINGS),
            ("placement", &self.placement_pool, &PLACEMENT_SETTINGS),
        ];
        let mut wrong = Vec::new();
        for (pool_name, pool, settings) in pools {
            let mut connection = pool.acquire().await?;
            for (name, expected) in settings {
                let value: String = sqlx::query_scalar("SELECT current_setting($1)")
                    .bind(*name)
                    .fetch_one(&mut *connection)
                    .await?;
                if value != *expected {
                    wrong.push(format!("{pool_name}: {name} = {value}, not {expected}"));
                }
            }
        }
        Ok(wrong)
    }

    /// Whether the database answers, with this broker's schema in it, and takes its writes: a
    /// database dropped and made again under the running broker (or restored without it)
    /// answers `SELECT 1` but has no tables, and one read-only (a standby after a failover,
    /// `default_transaction_read_only`) or whose tables the broker's role may no longer write
    /// (a REVOKE) answers reads, while every logon, event and lease fails. The writes touch no
    /// row (`WHERE false`); the server checks the transaction's mode and the privileges all the
    /// same. A table another client holds locked (a long migration) is not an outage: the
    /// probe waits for its lock at most a second, and a database that answers that is healthy.
    async fn probe_database(&self) -> StoreResult<()> {
        let probed = async {
            let mut transaction = self.pool.begin().await?;
            sqlx::query("SET LOCAL lock_timeout = '1s'")
                .execute(&mut *transaction)
                .await?;
            sqlx::raw_sql(WRITE_PROBE)
                .execute(&mut *transaction)
                .await?;
            transaction.rollback().await
        };
        match probed.await {
            Ok(()) => Ok(()),
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("55P03") => Ok(()),
            Err(sqlx::Error::PoolTimedOut) => Err(self.why_no_connection().await),
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("42P01") => {
                Err(StoreError::unavailable(
                    "the database has no tsbroker tables (dropped and made again, or restored \
                     without them, while the broker ran): restart the broker to create them",
                ))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The pool only says it waited in vain for a connection: a connection of the probe's own
    /// says why (the server's or the role's connection limit, authentication), or that the
    /// server takes connections and the pool's are all busy.
    async fn why_no_connection(&self) -> StoreError {
        use sqlx::Connection;
        let options = self.pool.connect_options();
        match sqlx::PgConnection::connect_with(&options).await {
            Err(error) => StoreError::unavailable(format!(
                "no connection from the pool in time; a new connection is refused: {}",
                crate::store::describe_with_code(&error)
            )),
            Ok(connection) => {
                let _ = connection.close().await;
                StoreError::unavailable(
                    "no connection from the pool in time: all of its connections are busy \
                     (long statements, or locks they wait for), though the server takes new ones",
                )
            }
        }
    }

    /// Nothing to release: PostgreSQL is shared by every replica.
    fn release_database_file(&self) {}

    /// `pg_postmaster_start_time()`: another after a crash and restart, or a failover.
    async fn database_server_started_at(&self) -> StoreResult<Option<i64>> {
        let started: i64 = sqlx::query_scalar(
            "SELECT (extract(epoch FROM pg_postmaster_start_time()) * 1000)::int8",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Some(started))
    }

    /// Says goodbye on every connection (the server logs no connection lost).
    async fn close_database(&self) {
        self.listener.abort();
        self.placement_pool.close().await;
        self.ingest_pool.close().await;
        self.pool.close().await;
    }

    /// The server's clock against this machine's (see `crate::clock`): the offset, taken up.
    async fn measure_database_clock(&self) -> StoreResult<Option<i64>> {
        let before = model::now_millis();
        let server: i64 =
            sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8")
                .fetch_one(&self.pool)
                .await?;
        let after = model::now_millis();
        if after - before > crate::clock::MAX_ROUND_TRIP_MS {
            return Ok(None);
        }
        let offset = server - (before + after) / 2;
        self.clock.adjust(offset);
        Ok(Some(offset))
    }

    /// PostgreSQL orders writers by row locks: no turn to take in the process.
    async fn write_turn(&self) -> WriteTurn {
        None
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    /// A placement's transaction. Its commit does not wait for the WAL flush
    /// (`synchronous_commit=off`): it is visible to every replica at once, and only a crash of
    /// the database server can forget the last fraction of a second of placements — pending
    /// logons, hints that live 30 seconds. Agents' events keep waiting for the flush.
    async fn begin_placement(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.placement_pool.begin().await
    }

    async fn begin_ingest(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.ingest_pool.begin().await
    }

    /// `announce_change` of many machines in one statement.
    async fn announce_changes(&self, machines: &[Uuid]) {
        for machine in machines {
            let _ = self.changes.send(*machine);
        }
        let ids: Vec<String> = machines.iter().map(Uuid::to_string).collect();
        let sent = sqlx::query("SELECT pg_notify($1, id) FROM unnest($2::text[]) AS id")
            .bind(CHANGE_CHANNEL)
            .bind(ids)
            .execute(&self.ingest_pool)
            .await;
        if let Err(error) = sent {
            tracing::warn!(machines = machines.len(), %error, "could not announce machine changes");
        }
    }

    /// Hands the delta to this broker's directory and tells the other replicas which machines
    /// to read again.
    async fn publish_directory(&self, delta: DirectoryDelta) {
        if delta.is_empty() {
            return;
        }
        let changed = delta.changed_machines();
        directory_feed::hand_over(&self.directory, delta);
        self.tell_other_replicas(&changed).await;
    }

    /// Asks the other replicas' directories to read these machines again (and so their
    /// plug-in links to resend them).
    async fn tell_other_replicas(&self, changed: &[Uuid]) {
        if changed.is_empty() {
            return;
        }
        let payloads = directory_feed::notification_payloads(self.instance, changed);
        let sent = sqlx::query("SELECT pg_notify($1, payload) FROM unnest($2::text[]) AS payload")
            .bind(DIRECTORY_CHANNEL)
            .bind(payloads)
            .execute(&self.ingest_pool)
            .await;
        if let Err(error) = sent {
            // The others' periodic refresh still catches states; their sessions of these
            // machines stay as they were until the next change is announced.
            tracing::warn!(machines = changed.len(), %error, "could not announce directory changes");
        }
    }

    /// Tells every replica (this one included, through its listener) that the machine changed.
    async fn announce_change(&self, machine: Uuid) {
        // This broker's own streams and placements hear it before the call is answered (the
        // notification comes back through the listener only later: a logon placed right
        // after a drain went to the drained machine).
        let _ = self.changes.send(machine);
        let sent = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGE_CHANNEL)
            .bind(machine.to_string())
            .execute(&self.pool)
            .await;
        if let Err(error) = sent {
            tracing::warn!(%machine, %error, "could not announce a machine change");
        }
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl StoreHooks for PostgresStore {
    const BACKEND: &'static str = "postgres";
    const LOCK_OWNER: &'static str =
        "SELECT connection_id, farm FROM machines WHERE id = $1 FOR NO KEY UPDATE";
}

/// A pool, connected. When the pool only says it timed out (it retries a refused connection
/// until then, and keeps the cause to itself), one direct attempt tells the operator why:
/// "connection refused", "password authentication failed", "database ... does not exist" (the
/// server's message once, without its source file's line).
async fn connect_pool(
    pool: PgPoolOptions,
    options: PgConnectOptions,
) -> anyhow::Result<sqlx::PgPool> {
    use sqlx::Connection;
    match pool.connect_with(options.clone()).await {
        Ok(pool) => Ok(pool),
        Err(sqlx::Error::PoolTimedOut) => {
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                sqlx::PgConnection::connect_with(&options),
            )
            .await;
            let cause = match attempt {
                Ok(Err(error)) => cause(&error),
                Ok(Ok(_)) => {
                    "no connection within the pool's time, though one answers now".to_owned()
                }
                Err(_) => "no answer (the host or a firewall drops the packets?)".to_owned(),
            };
            anyhow::bail!("connect to postgresql: {cause}")
        }
        Err(error) => anyhow::bail!("connect to postgresql: {}", cause(&error)),
    }
}

fn cause(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(database) => match database.code() {
            Some(code) => format!("{} (SQLSTATE {code})", database.message()),
            None => database.message().to_owned(),
        },
        other => other.to_string(),
    }
}

/// [`PostgresStore::probe_database`]'s statements: a read of `machines` first (its absence is
/// told apart), then a write of each kind to every table the broker writes, none touching a row.
const WRITE_PROBE: &str = "SELECT 1 FROM machines LIMIT 0; \
    INSERT INTO farms SELECT * FROM farms WHERE false; \
    UPDATE farms SET name = name WHERE false; DELETE FROM farms WHERE false; \
    INSERT INTO machines SELECT * FROM machines WHERE false; \
    UPDATE machines SET id = id WHERE false; DELETE FROM machines WHERE false; \
    INSERT INTO sessions SELECT * FROM sessions WHERE false; \
    UPDATE sessions SET farm = farm WHERE false; DELETE FROM sessions WHERE false; \
    INSERT INTO pending_logons SELECT * FROM pending_logons WHERE false; \
    UPDATE pending_logons SET farm = farm WHERE false; DELETE FROM pending_logons WHERE false";

/// Forwards NOTIFY payloads to the in-process channels, reconnecting as needed: machine ids
/// of changed machines, and other replicas' directory changes (as deltas to read again). After
/// a reconnection (the listener's own, or one made after an error) the directory is told to
/// read everything again and every machine counts as changed (notifications may have been
/// missed meanwhile).
async fn forward_notifications(
    pool: sqlx::PgPool,
    changes: broadcast::Sender<Uuid>,
    directory: SinkSlot,
    instance: Uuid,
) {
    let mut first = true;
    loop {
        let listened = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener
                .listen_all([CHANGE_CHANNEL, DIRECTORY_CHANNEL])
                .await?;
            if !std::mem::take(&mut first) {
                missed_meanwhile(&directory, &changes);
            }
            loop {
                // `recv` would reconnect without a word when the connection drops: the
                // notifications sent meanwhile would be lost unnoticed.
                let Some(notification) = listener.try_recv().await? else {
                    // Lost, and made again with its LISTENs (`eager_reconnect`).
                    tracing::info!("machine-change listener reconnected");
                    missed_meanwhile(&directory, &changes);
                    continue;
                };
                if notification.channel() == DIRECTORY_CHANNEL {
                    if let Some(machines) =
                        directory_feed::parse_notification(notification.payload(), instance)
                    {
                        directory_feed::hand_over(&directory, DirectoryDelta::reload(machines));
                    }
                    continue;
                }
                match Uuid::parse_str(notification.payload()) {
                    Ok(machine) => {
                        let _ = changes.send(machine);
                    }
                    Err(_) => tracing::warn!(
                        payload = notification.payload(),
                        "ignoring a malformed machine-change notification"
                    ),
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        if let Err(error) = listened.await {
            // Every few seconds while the database is away: once a minute, with the count.
            static LOST: std::sync::LazyLock<tsbroker_common::warning_limit::WarningLimit> =
                std::sync::LazyLock::new(Default::default);
            crate::error::warn_limited(
                &LOST,
                &error,
                "machine-change listener lost its connection; retrying",
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Notifications may have been missed (the listener was away): the directory reads everything
/// again, and every machine counts as changed (the nil id).
fn missed_meanwhile(directory: &SinkSlot, changes: &broadcast::Sender<Uuid>) {
    directory_feed::hand_over(directory, DirectoryDelta::reload_everything());
    let _ = changes.send(Uuid::nil());
}

sql::impl_store!(PostgresStore, sqlx::Postgres);
ingest::sql::impl_ingest!(PostgresStore, sqlx::Postgres, pg, " FOR NO KEY UPDATE");
