//! Throwaway databases for the tests: a fresh PostgreSQL database on the server at
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`), or a fresh SQLite
//! file; the benchmark tool's `env::Database` under a test-friendly face. A test that needs
//! PostgreSQL fails when none answers: it is never skipped.

use tsbroker_bench::env::{Database, StoreKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database that exists for one test; PostgreSQL databases are dropped by `drop_database`.
pub struct TestDatabase {
    pub url: String,
    pub backend: Backend,
    database: Database,
}

impl TestDatabase {
    pub async fn new(backend: Backend) -> TestDatabase {
        match backend {
            Backend::Sqlite => Self::sqlite(),
            Backend::Postgres => Self::postgres().await,
        }
    }

    pub fn sqlite() -> TestDatabase {
        let database = Database::sqlite().expect("temporary SQLite database");
        TestDatabase {
            url: database.url.clone(),
            backend: Backend::Sqlite,
            database,
        }
    }

    /// Creates a fresh database on the server at `DATABASE_URL`.
    pub async fn postgres() -> TestDatabase {
        let database = Database::create(StoreKind::Postgres)
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "{error:#}; run the tests with scripts/test.sh, which starts a PostgreSQL, \
                     or set DATABASE_URL"
                )
            });
        TestDatabase {
            url: database.url.clone(),
            backend: Backend::Postgres,
            database,
        }
    }

    /// Drops the PostgreSQL database (after every pool on it is closed).
    pub async fn drop_database(self) {
        self.database.drop_database().await;
    }
}
