//! Per-farm settings from the broker's configuration: the policy a farm starts with, the
//! resource policy's thresholds, slow start, user groups pinned to subsets of machines, and the
//! farm's plug-in. Farms not named in the configuration get `[farm_defaults]`.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tsbroker_common::model;
use wildmatch::WildMatch;

/// The longest a plug-in's deadline may be: a new logon waits for it.
const MAX_PLUGIN_DEADLINE: Duration = Duration::from_secs(2);
/// The most session changes in one notification to a plug-in.
const MAX_PLUGIN_BATCH: usize = 1000;

/// How a farm places new logons.
#[derive(Clone, Debug)]
pub struct FarmSettings {
    /// Set in the store at start; `Admin.SetFarmPolicy` changes it at run time.
    pub policy: Option<String>,
    /// CPU use (percent) at which a machine counts as fully loaded (resource policy).
    pub cpu_threshold: f32,
    /// Memory use (percent) at which a machine counts as fully loaded (resource policy).
    pub memory_threshold: f32,
    /// A machine that became READY less than this long ago takes a growing share of new
    /// logons, not all of them (zero turns slow start off).
    pub slow_start: Duration,
    pub groups: Vec<GroupRule>,
    pub plugin: Option<PluginSettings>,
}

impl Default for FarmSettings {
    fn default() -> Self {
        FarmSettings {
            policy: None,
            cpu_threshold: 90.0,
            memory_threshold: 90.0,
            slow_start: Duration::from_secs(60),
            groups: Vec::new(),
            plugin: None,
        }
    }
}

/// Users (by list or name pattern) who are placed on a named subset of the farm's machines.
#[derive(Clone, Debug)]
pub struct GroupRule {
    pub name: String,
    /// User names, lowercased.
    pub users: Vec<String>,
    /// Shell-style patterns (`*`, `?`) over lowercased user names.
    pub patterns: Vec<String>,
    /// Machine names, lowercased.
    pub machines: Vec<String>,
    /// When none of the group's machines can take the logon: use the rest of the farm (true),
    /// or refuse (false).
    pub fallback: bool,
}

impl GroupRule {
    pub fn matches(&self, user_key: &str) -> bool {
        self.users.iter().any(|user| user == user_key)
            || self
                .patterns
                .iter()
                .any(|pattern| WildMatch::new(pattern).matches(user_key))
    }

    pub fn includes_machine(&self, machine_name: &str) -> bool {
        self.machines
            .iter()
            .any(|name| name.eq_ignore_ascii_case(machine_name))
    }
}

/// An external plug-in (`tsbroker.v1.Plugin`) serving a farm.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginSettings {
    /// `http://host:port`, or `https://…` for TLS.
    pub address: String,
    /// How long a decision waits for the plug-in before it keeps the broker's own pick.
    pub deadline: Duration,
    /// Most sessions in one SessionChangeNotification.
    pub batch_size: usize,
    /// PEM file of the CA that signed the plug-in's certificate (https only).
    pub ca_file: Option<std::path::PathBuf>,
}

impl FarmSettings {
    /// The first group whose rule matches the user.
    pub fn group_of(&self, user_key: &str) -> Option<&GroupRule> {
        self.groups.iter().find(|group| group.matches(user_key))
    }
}

/// Settings of every farm, with defaults for the rest.
#[derive(Clone, Debug, Default)]
pub struct FarmBook {
    pub defaults: FarmSettings,
    pub farms: BTreeMap<String, FarmSettings>,
}

impl FarmBook {
    pub fn get(&self, farm: &str) -> &FarmSettings {
        self.farms.get(farm).unwrap_or(&self.defaults)
    }
}

/// The TOML shape of `[farm_defaults]` and `[farms.<name>]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FarmFileSettings {
    pub policy: Option<String>,
    pub cpu_threshold: Option<f32>,
    pub memory_threshold: Option<f32>,
    #[serde(default, with = "crate::config::humantime_option")]
    pub slow_start: Option<Duration>,
    #[serde(default)]
    pub groups: Vec<GroupFileSettings>,
    pub plugin: Option<PluginFileSettings>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupFileSettings {
    pub name: String,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
    pub machines: Vec<String>,
    #[serde(default = "yes")]
    pub fallback: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginFileSettings {
    pub address: String,
    #[serde(default, with = "crate::config::humantime_option")]
    pub deadline: Option<Duration>,
    pub batch_size: Option<usize>,
    pub ca_file: Option<std::path::PathBuf>,
}

impl FarmFileSettings {
    /// These settings over `base`, checked.
    pub fn resolve(&self, base: &FarmSettings, farm: &str) -> Result<FarmSettings, String> {
        let threshold = |name: &str, value: Option<f32>, default: f32| match value {
            None => Ok(default),
            Some(value) if value > 0.0 && value <= 100.0 => Ok(value),
            Some(value) => Err(format!("farm {farm:?}: {name} {value} is not in (0, 100]")),
        };
        let groups = self
            .groups
            .iter()
            .map(|group| {
                if group.users.is_empty() && group.patterns.is_empty() {
                    return Err(format!(
                        "farm {farm:?}: group {:?} names no users and no patterns",
                        group.name
                    ));
                }
                if group.machines.is_empty() {
                    return Err(format!(
                        "farm {farm:?}: group {:?} names no machines",
                        group.name
                    ));
                }
                Ok(GroupRule {
                    name: group.name.clone(),
                    users: group
                        .users
                        .iter()
                        .map(|user| model::user_key(user))
                        .collect(),
                    patterns: group
                        .patterns
                        .iter()
                        .map(|pattern| model::user_key(pattern))
                        .collect(),
                    machines: group
                        .machines
                        .iter()
                        .map(|name| name.to_ascii_lowercase())
                        .collect(),
                    fallback: group.fallback,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let plugin = match &self.plugin {
            None => base.plugin.clone(),
            Some(plugin) => {
                let scheme_ok =
                    plugin.address.starts_with("http://") || plugin.address.starts_with("https://");
                if !scheme_ok {
                    return Err(format!(
                        "farm {farm:?}: plugin address must start with http:// or https://"
                    ));
                }
                let deadline = plugin.deadline.unwrap_or(Duration::from_millis(100));
                if deadline < Duration::from_millis(1) || deadline > MAX_PLUGIN_DEADLINE {
                    return Err(format!(
                        "farm {farm:?}: plugin deadline must be from 1ms to {MAX_PLUGIN_DEADLINE:?} \
                         (every new logon waits for it; a front door waits 3s for its answer)"
                    ));
                }
                let batch_size = plugin.batch_size.unwrap_or(25);
                if !(1..=MAX_PLUGIN_BATCH).contains(&batch_size) {
                    return Err(format!(
                        "farm {farm:?}: plugin batch_size must be from 1 to {MAX_PLUGIN_BATCH}"
                    ));
                }
                if plugin.ca_file.is_some() && !plugin.address.starts_with("https://") {
                    return Err(format!(
                        "farm {farm:?}: plugin ca_file is only used with an https:// address"
                    ));
                }
                Some(PluginSettings {
                    // `http://host:port/` is `http://host:port`: one plug-in, one link.
                    address: plugin.address.trim_end_matches('/').to_owned(),
                    deadline,
                    batch_size,
                    ca_file: plugin.ca_file.clone(),
                })
            }
        };
        Ok(FarmSettings {
            policy: self.policy.clone().or_else(|| base.policy.clone()),
            cpu_threshold: threshold("cpu_threshold", self.cpu_threshold, base.cpu_threshold)?,
            memory_threshold: threshold(
                "memory_threshold",
                self.memory_threshold,
                base.memory_threshold,
            )?,
            slow_start: self.slow_start.unwrap_or(base.slow_start),
            groups: if groups.is_empty() {
                base.groups.clone()
            } else {
                groups
            },
            plugin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_match_by_list_and_pattern() {
        let file: FarmFileSettings = toml::from_str(
            r#"
            policy = "resource"
            [[groups]]
            name = "finance"
            users = ["Alice"]
            patterns = ["fin-*"]
            machines = ["TS1"]
            "#,
        )
        .unwrap();
        let settings = file.resolve(&FarmSettings::default(), "f").unwrap();
        let group = &settings.groups[0];
        assert!(group.matches("alice") && group.matches("fin-bob") && !group.matches("bob"));
        assert!(group.includes_machine("ts1") && group.fallback);
        assert_eq!(settings.policy.as_deref(), Some("resource"));
        assert_eq!(settings.cpu_threshold, 90.0);
    }

    #[test]
    fn bad_farm_settings_say_why() {
        let bad: FarmFileSettings = toml::from_str("cpu_threshold = 150.0").unwrap();
        assert!(
            bad.resolve(&FarmSettings::default(), "f")
                .unwrap_err()
                .contains("cpu_threshold")
        );
        for (bad, says) in [
            ("deadline = \"0ms\"", "deadline"),
            ("deadline = \"5s\"", "deadline"),
            ("batch_size = 0", "batch_size"),
            ("batch_size = 100000", "batch_size"),
            ("ca_file = \"/etc/ca.pem\"", "https://"),
        ] {
            let file = format!("[plugin]\naddress = \"http://127.0.0.1:50070\"\n{bad}");
            let bad: FarmFileSettings = toml::from_str(&file).unwrap();
            let error = bad.resolve(&FarmSettings::default(), "f").unwrap_err();
            assert!(error.contains(says), "{file}: {error}");
        }
        let bad: FarmFileSettings = toml::from_str("[plugin]\naddress = \"tcp://x\"").unwrap();
        assert!(
            bad.resolve(&FarmSettings::default(), "f")
                .unwrap_err()
                .contains("http://")
        );
    }
}
