//! Throwaway databases: a fresh PostgreSQL database on the server at `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`), or a fresh SQLite file. A test that needs
//! PostgreSQL fails when none answers: it is never skipped.

use sqlx::Connection;
use std::path::PathBuf;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database that exists for one test; PostgreSQL databases are dropped by `drop_database`.
pub struct TestDatabase {
    pub url: String,
    pub backend: Backend,
    admin_url: Option<String>,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    pub async fn new(backend: Backend) -> TestDatabase {
        match backend {
            Backend::Sqlite => Self::sqlite(),
            Backend::Postgres => Self::postgres().await,
        }
    }

    pub fn sqlite() -> TestDatabase {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path: PathBuf = dir.path().join("tsbroker.db");
        TestDatabase {
            url: format!("sqlite://{}", path.display()),
            backend: Backend::Sqlite,
            admin_url: None,
            name: String::new(),
            _dir: Some(dir),
        }
    }

    /// Creates `tsbroker_test_<uuid>` on the server at `DATABASE_URL`.
    pub async fn postgres() -> TestDatabase {
        let admin_url =
            std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
        let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|error| {
            panic!(
                "PostgreSQL does not answer at {admin_url} ({error}); run the tests with scripts/test.sh, \
                 which starts one, or set DATABASE_URL"
            )
        });
        let name = format!("tsbroker_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let _ = admin.close().await;
        let url = replace_database(&admin_url, &name);
        TestDatabase {
            url,
            backend: Backend::Postgres,
            admin_url: Some(admin_url),
            name,
            _dir: None,
        }
    }

    /// Drops the PostgreSQL database (after every pool on it is closed).
    pub async fn drop_database(self) {
        let Some(admin_url) = &self.admin_url else {
            return;
        };
        if let Ok(mut admin) = sqlx::PgConnection::connect(admin_url).await {
            let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            let _ = sqlx::query(sqlx::AssertSqlSafe(statement))
                .execute(&mut admin)
                .await;
        }
    }
}

/// The same URL naming another database (query string kept).
fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |index| index + 3);
    let path_start = base[scheme_end..].find('/').map(|index| index + scheme_end);
    let host_part = match path_start {
        Some(index) => &base[..index],
        None => base,
    };
    match query {
        Some(query) => format!("{host_part}/{database}?{query}"),
        None => format!("{host_part}/{database}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_names_are_replaced() {
        assert_eq!(
            super::replace_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            super::replace_database("postgres://u@h:5432", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            super::replace_database("postgres://u@h/postgres?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}
