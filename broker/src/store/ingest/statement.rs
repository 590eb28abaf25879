//! Statement text for the group transaction: how each backend spells a table of rows
//! (`Dialect`), the placeholders (`Statement`), and how the rows and "now" are bound in the same
//! order (`bind_rows!`, `bind_now!`).

use std::fmt::Write;

/// How a backend spells a table of rows in a statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// `unnest` of one array per column.
    Postgres,
    /// `VALUES`, one parameter per value.
    Sqlite,
}

impl Dialect {
    /// Most rows of one statement: arrays on PostgreSQL (their size does not matter), and on
    /// SQLite at most 16 columns × 500 rows, far below its 32,766 parameters a statement.
    pub fn rows_per_statement(self) -> usize {
        match self {
            Dialect::Postgres => 20_000,
            Dialect::Sqlite => 500,
        }
    }
}

/// Statement text with its placeholders. On PostgreSQL they are numbered (`$1` is "now" when
/// the prefix uses it, the arrays follow). On SQLite the table's values are anonymous `?`s and
/// "now" becomes the one named parameter, numbered after them (and bound last): SQLite finds a
/// named parameter's name by walking the list of names, once per parameter bound, so thousands
/// of named parameters would cost quadratic time.
pub(crate) struct Statement {
    text: String,
    next: usize,
    fixed: usize,
    anonymous: usize,
}

impl Statement {
    /// `prefix` may use `$1` ("now") when `fixed` is 1.
    pub fn new(prefix: &str, fixed: usize) -> Self {
        Statement {
            text: prefix.to_owned(),
            next: fixed + 1,
            fixed,
            anonymous: 0,
        }
    }

    /// The text to run.
    pub fn finish(self) -> String {
        if self.fixed == 1 && self.anonymous > 0 {
            self.text.replace("$1", &format!("${}", self.anonymous + 1))
        } else {
            self.text
        }
    }

    pub fn push(&mut self, text: &str) -> &mut Self {
        self.text.push_str(text);
        self
    }

    fn param(&mut self) {
        let _ = write!(self.text, "${}", self.next);
        self.next += 1;
    }

    /// The table `k` of `rows` rows whose columns have the PostgreSQL `types` (see the
    /// module's documentation). Bind with `bind_rows!` in the same dialect.
    pub fn table(&mut self, dialect: Dialect, rows: usize, types: &[&str]) -> &mut Self {
        match dialect {
            Dialect::Postgres => {
                self.text.push_str("unnest(");
                for (index, kind) in types.iter().enumerate() {
                    if index > 0 {
                        self.text.push_str(", ");
                    }
                    self.param();
                    let _ = write!(self.text, "::{kind}[]");
                }
                self.text.push_str(") AS k(");
                for index in 1..=types.len() {
                    if index > 1 {
                        self.text.push_str(", ");
                    }
                    let _ = write!(self.text, "column{index}");
                }
                self.text.push(')');
            }
            Dialect::Sqlite => {
                self.text.push_str("(VALUES ");
                for row in 0..rows {
                    self.text.push_str(if row > 0 { ", (" } else { "(" });
                    for column in 0..types.len() {
                        if column > 0 {
                            self.text.push_str(", ");
                        }
                        self.text.push('?');
                        self.anonymous += 1;
                    }
                    self.text.push(')');
                }
                self.text.push_str(") AS k");
            }
        }
        self
    }
}

/// Binds a table's rows in the order `Statement::table` numbered them: `pg` one array per
/// column, `sqlite` row by row.
macro_rules! bind_rows {
    (pg, $query:ident, $rows:expr, |$row:ident| $($column:expr),+ $(,)?) => {
        $(
            $query = $query.bind($rows.iter().map(|$row| $column).collect::<Vec<_>>());
        )+
    };
    (sqlite, $query:ident, $rows:expr, |$row:ident| $($column:expr),+ $(,)?) => {
        for $row in $rows.iter() {
            $(
                $query = $query.bind($column);
            )+
        }
    };
}

pub(crate) use bind_rows;

/// Binds "now" where `Statement` put it: `first` (PostgreSQL: `$1`, before the arrays) or
/// `last` (SQLite: after the table's values); the other position binds nothing.
macro_rules! bind_now {
    (pg, first, $query:ident, $now:expr) => {
        $query = $query.bind($now);
    };
    (sqlite, last, $query:ident, $now:expr) => {
        $query = $query.bind($now);
    };
    ($dialect:ident, $position:ident, $query:ident, $now:expr) => {
        let _ = $now;
    };
}

pub(crate) use bind_now;

/// The `Dialect` of `pg` / `sqlite`.
macro_rules! dialect {
    (pg) => {
        $crate::store::ingest::statement::Dialect::Postgres
    };
    (sqlite) => {
        $crate::store::ingest::statement::Dialect::Sqlite
    };
}

pub(crate) use dialect;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_arrays_on_postgres_and_values_on_sqlite() {
        let mut statement = Statement::new("UPDATE t SET a = $1, b = $1 FROM ", 1);
        statement
            .table(Dialect::Postgres, 3, &["uuid", "int8"])
            .push(" WHERE t.id = k.column1");
        assert_eq!(
            statement.finish(),
            "UPDATE t SET a = $1, b = $1 FROM unnest($2::uuid[], $3::int8[]) \
             AS k(column1, column2) WHERE t.id = k.column1"
        );
        // SQLite: anonymous values, "now" named after them (bound last).
        let mut statement = Statement::new("UPDATE t SET a = $1, b = $1 FROM ", 1);
        statement
            .table(Dialect::Sqlite, 2, &["uuid", "int8"])
            .push(" WHERE t.id = k.column1");
        assert_eq!(
            statement.finish(),
            "UPDATE t SET a = $5, b = $5 FROM (VALUES (?, ?), (?, ?)) AS k WHERE t.id = k.column1"
        );
    }
}
