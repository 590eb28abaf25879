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

/// The log filter without `RUST_LOG`: `info`, but for the database library's lines that only
/// repeat what the broker says itself (each pooled connection's failed ping while the database
/// is away; PostgreSQL's notice at every start that the migrations' table exists; a warning
/// with the whole statement for every statement slower than a second, dozens a second after a
/// replica was frozen or the database stalled, where the broker's own warnings come once a
/// minute).
pub const DEFAULT_FILTER: &str =
    "info,sqlx_core::pool::inner=warn,sqlx::postgres::notice=warn,sqlx::query=error";

/// Installs the global subscriber. Calling it twice is harmless (the second call is ignored).
pub fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
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
    #[test]
    fn the_default_filter_parses() {
        tracing_subscriber::EnvFilter::try_new(super::DEFAULT_FILTER).unwrap();
    }
}
