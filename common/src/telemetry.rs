//! Logging set-up shared by both binaries: plain or JSON lines to stderr, filtered by
//! `RUST_LOG` (default `info`), with panics routed through tracing.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "plain" | "text" => Ok(LogFormat::Plain),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected plain or json)"
            )),
        }
    }
}

/// The database library's lines that only repeat what the broker says itself (each pooled
/// connection's failed ping while the database is away; PostgreSQL's notices, at every start
/// that the migrations' table exists, and on every pooled connection when the server shuts
/// down (dozens at once, where the broker says the outage once); a warning with the whole statement for every statement slower
/// than a second, dozens a second after a replica was frozen or the database stalled, where the
/// broker's own warnings come once a minute; the same for a connection taken from the pool
/// after more than its slow threshold, as the database comes back): quieter, unless `RUST_LOG`
/// names that library.
const QUIET_LIBRARY: [&str; 4] = [
    "sqlx_core::pool::inner=warn",
    "sqlx::postgres::notice=error",
    "sqlx::query=error",
    "sqlx::pool::acquire=error",
];

/// The log filter without `RUST_LOG`: `info`, with [`QUIET_LIBRARY`].
const DEFAULT_FILTER: &str = "info";

/// `RUST_LOG`'s filter (or [`DEFAULT_FILTER`] without it, or when it does not parse), with
/// [`QUIET_LIBRARY`] unless it names `sqlx` itself: the shipped units and images set
/// `RUST_LOG=info`, which means the broker's lines, not the library's repetitions of them.
fn filter(rust_log: Option<&str>) -> EnvFilter {
    let given = rust_log.filter(|directives| !directives.trim().is_empty());
    let mut filter = given
        .and_then(|directives| EnvFilter::try_new(directives).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    if !given.is_some_and(|directives| directives.contains("sqlx")) {
        for directive in QUIET_LIBRARY {
            if let Ok(directive) = directive.parse() {
                filter = filter.add_directive(directive);
            }
        }
    }
    filter
}

/// Installs the global subscriber. Calling it twice is harmless (the second call is ignored).
pub fn init_logging(format: LogFormat) {
    let filter = filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if installed.is_ok() {
        std::panic::set_hook(Box::new(|info| {
            tracing::error!(panic = %info, "panic");
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_library_is_quieter_unless_rust_log_names_it() {
        for directive in QUIET_LIBRARY {
            directive
                .parse::<tracing_subscriber::filter::Directive>()
                .unwrap();
        }
        let quiet = "sqlx::query=error";
        for rust_log in [None, Some("info"), Some(""), Some("debug,tsbroker=trace")] {
            let shown = filter(rust_log).to_string();
            assert!(shown.contains(quiet), "{rust_log:?}: {shown}");
        }
        let shown = filter(Some("info,sqlx::query=warn")).to_string();
        assert!(!shown.contains(quiet), "{shown}");
    }
}
