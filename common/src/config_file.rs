//! Reading a TOML settings file so that a refused value is named where the operator wrote it:
//! `line 3 (heartbeat_timeout = "abc"): expected number at 0`, not only the parser's reason.
//! The value of a key that may hold a secret (a token, a database URL with its password) is
//! not repeated.

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
    let line = match line.split_once('=') {
        Some((key, _)) if may_be_secret(key) => format!("{} = …", key.trim()),
        _ => line.to_owned(),
    };
    let shown: String = line.chars().take(LINE_EXCERPT).collect();
    let cut = if shown.len() < line.len() { "…" } else { "" };
    format!("line {number} ({shown}{cut}): {reason}")
}

fn may_be_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["token", "url", "password", "secret"]
        .iter()
        .any(|word| key.contains(word))
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
        assert!(error.starts_with("line 1 (wieght = 5): "), "{error}");
        assert!(error.contains("unknown field `wieght`"), "{error}");
        assert!(parse::<Settings>("weight = 5\n").is_ok());
        // A secret is not repeated.
        let error = parse::<Settings>("admin_token = 1234567890123456789\n").unwrap_err();
        assert!(error.starts_with("line 1 (admin_token = …): "), "{error}");
        assert!(!error.contains("1234567890"), "{error}");
    }
}
