//! Dedicated hosts outside the farm (`GetUserExternalSession`), from an optional TOML file:
//!
//! ```toml
//! [external]
//! alice = "vdi-alice.example.com:3389"
//! 'CORP\bob' = "10.0.8.15:3389"      # only bob of domain CORP
//! ```
//!
//! A key is a user name, or `DOMAIN\user` for one domain only; both compare case-insensitively,
//! and a `DOMAIN\user` entry wins over a plain `user` one. Values are `host:port` (IPv6 hosts in
//! brackets). The broker asks only for users with no session in the farm, and only when
//! `Initialize` answered that the plug-in supports external sessions, which this plug-in does
//! when the file has at least one entry. The file is read at start; restart the plug-in to
//! change it (the broker initializes it again when it comes back).

use anyhow::Context;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tsbroker_common::model::user_key;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExternalFile {
    #[serde(default)]
    external: BTreeMap<String, String>,
}

/// Users mapped to their dedicated host.
#[derive(Debug, Default)]
pub struct ExternalHosts {
    /// By `user` or `domain\user`, lowercased.
    hosts: HashMap<String, String>,
}

impl ExternalHosts {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> anyhow::Result<ExternalHosts> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        ExternalHosts::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<ExternalHosts> {
        let file: ExternalFile = toml::from_str(text).context("parse the TOML")?;
        let mut hosts = HashMap::with_capacity(file.external.len());
        for (user, address) in file.external {
            let (domain, name) = match user.split_once('\\') {
                Some((domain, name)) => (Some(domain), name),
                None => (None, user.as_str()),
            };
            if name.is_empty() || domain.is_some_and(str::is_empty) {
                anyhow::bail!("external.{user:?}: expected a user name or DOMAIN\\user");
            }
            tsbroker_common::validate::address("address", &address)
                .with_context(|| format!("external.{user:?}"))?;
            hosts.insert(key(domain.unwrap_or(""), name), address);
        }
        Ok(ExternalHosts { hosts })
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The user's host as `(address, host name)`, if the file names one.
    pub fn lookup(&self, user_name: &str, domain: &str) -> Option<(&str, &str)> {
        let address = (!domain.is_empty())
            .then(|| self.hosts.get(&key(domain, user_name)))
            .flatten()
            .or_else(|| self.hosts.get(&key("", user_name)))?;
        Some((address, host_of(address)))
    }
}

fn key(domain: &str, user_name: &str) -> String {
    if domain.is_empty() {
        user_key(user_name)
    } else {
        format!("{}\\{}", user_key(domain), user_key(user_name))
    }
}

/// `host` of `host:port` (without the brackets of an IPv6 host).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_map_to_their_hosts() {
        let hosts = ExternalHosts::parse(
            "[external]\nalice = \"vdi-alice.example.com:3389\"\n'CORP\\bob' = \"[2001:db8::5]:3390\"\nbob = \"bob-any:3389\"\n",
        )
        .unwrap();
        assert_eq!(hosts.len(), 3);
        assert_eq!(
            hosts.lookup("Alice", "anything"),
            Some(("vdi-alice.example.com:3389", "vdi-alice.example.com"))
        );
        assert_eq!(
            hosts.lookup("bob", "corp"),
            Some(("[2001:db8::5]:3390", "2001:db8::5"))
        );
        assert_eq!(
            hosts.lookup("bob", "OTHER"),
            Some(("bob-any:3389", "bob-any"))
        );
        assert_eq!(hosts.lookup("bob", ""), Some(("bob-any:3389", "bob-any")));
        assert_eq!(hosts.lookup("carol", ""), None);
    }

    #[test]
    fn an_empty_file_supports_nothing() {
        assert!(ExternalHosts::parse("").unwrap().is_empty());
        assert!(ExternalHosts::parse("[external]\n").unwrap().is_empty());
    }

    #[test]
    fn bad_entries_are_refused_with_their_key() {
        let error = ExternalHosts::parse("[external]\nalice = \"no-port\"\n").unwrap_err();
        assert!(format!("{error:#}").contains("alice"), "{error:#}");
        assert!(ExternalHosts::parse("[external]\n'\\\\bob' = \"h:1\"\n").is_err());
        assert!(
            ExternalHosts::parse("[externals]\nalice = \"h:1\"\n").is_err(),
            "typo in the table name"
        );
    }
}
