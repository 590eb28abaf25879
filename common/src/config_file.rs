//! Reading a TOML settings file so that a refused value is named where the operator wrote it:
//! `line 3 (heartbeat_timeout = "abc"): expected number at 0`, not only the parser's reason.
//! A value is not repeated when its key may hold a secret (a token, a database URL with its
//! password; the parser's reason loses its quoted value too) or is unknown (a misspelled key
//! may be any of those).

/// Longest part of the offending line repeated in the error, in characters.
const LINE_EXCERPT: usize = 80;

/// `text` (a whole settings file) as `T`; the error names the line at fault.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|error| describe(text, &error))
}

fn describe(text: &str, error: &toml::de::Error) -> String {
    let reason = error.message().trim().replace('\n', " ");
    let Some(before) = error.span().and_then(|span| text.get(..span.start)) else {
        return reason;
    };
    let number = before.matches('\n').count() + 1;
    let line = text.lines().nth(number - 1).unwrap_or_default().trim();
    if line.is_empty() {
        return format!("line {number}: {reason}");
    }
    let unknown_key = reason.starts_with("unknown field");
    let (line, reason) = match line.split_once('=') {
        Some((key, _)) if may_be_secret(key) && !unknown_key => {
            (format!("{} = …", key.trim()), without_quoted(&reason))
        }
        Some((key, _)) if may_be_secret(key) || unknown_key => {
            (format!("{} = …", key.trim()), reason)
        }
        _ => (line.to_owned(), reason),
    };
    let shown: String = line.chars().take(LINE_EXCERPT).collect();
    let cut = if shown.len() < line.len() { "…" } else { "" };
    format!("line {number} ({shown}{cut}): {reason}")
}

fn may_be_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["token", "url", "pass", "secret", "dsn"]
        .iter()
        .any(|word| key.contains(word))
}

/// The parser's reason without what it quotes between backticks (the value, in "invalid type:
/// string `...`").
fn without_quoted(reason: &str) -> String {
    reason
        .split('`')
        .enumerate()
        .map(|(index, part)| if index % 2 == 1 { "…" } else { part })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Settings {
        listen: Option<std::net::SocketAddr>,
        weight: Option<u32>,
        admin_token: Option<String>,
    }

    #[test]
    fn a_secrets_value_is_not_repeated_even_by_the_parser() {
        let error = parse::<Settings>("admin_token = 1234567890123456789\n").unwrap_err();
        assert!(error.starts_with("line 1 (admin_token = …): "), "{error}");
        assert!(error.contains("invalid type"), "{error}");
        assert!(!error.contains("1234567890"), "{error}");
        assert_eq!(without_quoted("a `b` c `d`"), "a … c …");
    }

    #[test]
    fn a_refused_value_is_named_by_its_line() {
        let error = parse::<Settings>("weight = 5\n\nlisten = \"notanaddr\"\n").unwrap_err();
        assert!(
            error.starts_with("line 3 (listen = \"notanaddr\"): "),
            "{error}"
        );
        assert!(error.contains("invalid socket address syntax"), "{error}");
        let error = parse::<Settings>("wieght = 5\n").unwrap_err();
        assert!(error.starts_with("line 1 (wieght = …): "), "{error}");
        assert!(error.contains("unknown field `wieght`"), "{error}");
        assert!(parse::<Settings>("weight = 5\n").is_ok());
        // A misspelled key's value is not repeated (it may be a secret).
        let error = parse::<Settings>("database = \"postgres://u:pw@db/x\"\n").unwrap_err();
        assert!(error.starts_with("line 1 (database = …): "), "{error}");
        assert!(!error.contains("pw@"), "{error}");
        // Past the last line: no line to show.
        let error = parse::<Settings>("weight = 5\n[listen").unwrap_err();
        assert!(error.starts_with("line 2"), "{error}");
    }
}
