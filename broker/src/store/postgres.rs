//! The PostgreSQL store: what a production farm uses and what several broker replicas share.
//! Row locks (`FOR UPDATE`) serialize the changes that must not interleave; changes made by
//! administrators reach every replica through LISTEN/NOTIFY.

use super::sql::{self, StoreHooks, classify, session_event_outcome};
use super::{
    Choice, Chooser, EventOutcome, FarmRecord, MachineChange, MachineLoad, MachineRecord,
    Placement, PlacementRequest, SessionFilter, SessionRecord, StoreError, StoreResult,
    StreamMachineState,
};
use sqlx::postgres::{PgListener, PgPoolOptions};
use std::time::Duration;
use tokio::sync::broadcast;
use tsbroker_common::model::{
    self, LoadReport, MachineDescription, SessionEvent, SessionInfo, SessionState,
};
use uuid::Uuid;

const CHANGE_CHANNEL: &str = "tsbroker_machine_changed";

pub struct PostgresStore {
    pool: sqlx::PgPool,
    changes: broadcast::Sender<Uuid>,
    listener: tokio::task::JoinHandle<()>,
}

impl PostgresStore {
    /// Connects, runs the migrations and starts listening for other replicas' changes.
    pub async fn open(database_url: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        let pool = PgPoolOptions::new()
            .max_connections(32)
            .acquire_timeout(Duration::from_secs(5))
            .connect(database_url)
            .await
            .context("connect to postgresql")?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .context("migrate the postgresql database")?;
        let (changes, _) = broadcast::channel(1024);
        let listener = tokio::spawn(forward_notifications(pool.clone(), changes.clone()));
        Ok(PostgresStore {
            pool,
            changes,
            listener,
        })
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    /// Tells every replica (this one included, through its listener) that the machine changed.
    async fn announce_change(&self, machine: Uuid) {
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
        "SELECT connection_id, farm FROM machines WHERE id = $1 FOR UPDATE";
    const LOCK_FARM: &'static str = "SELECT policy FROM farms WHERE name = $1 FOR UPDATE";
}

/// Forwards NOTIFY payloads (machine ids) to the in-process channel, reconnecting as needed.
async fn forward_notifications(pool: sqlx::PgPool, changes: broadcast::Sender<Uuid>) {
    loop {
        let listened = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANGE_CHANNEL).await?;
            loop {
                let notification = listener.recv().await?;
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
            tracing::warn!(%error, "machine-change listener lost its connection; retrying");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

sql::impl_store!(PostgresStore, sqlx::Postgres);
