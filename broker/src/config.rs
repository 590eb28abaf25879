//! The broker's settings: typed, with defaults, layered file → environment → flags, and
//! checked before anything starts. Secrets never show in `Debug`.

use crate::decision::farm_settings::{FarmBook, FarmFileSettings};
use crate::decision::policy::PolicyRegistry;
use crate::tls::TlsFiles;
use clap::Parser;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tsbroker_common::telemetry::LogFormat;

/// A token that `Debug` prints as `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("<redacted>")
    }
}

/// The longest any of the broker's durations may be: an hour is already far past what a
/// heartbeat, a logon in flight or a shutdown takes (and agents get the heartbeat's times as
/// 32-bit milliseconds).
const MAX_DURATION: Duration = Duration::from_secs(3600);

/// Everything `run` needs.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    pub listen: SocketAddr,
    pub database_url: String,
    pub heartbeat_timeout: Duration,
    pub pending_logon_ttl: Duration,
    pub max_pending_logons_per_machine: u32,
    pub admin_token: Option<Secret>,
    pub agent_token: Option<Secret>,
    pub log_format: LogFormat,
    /// How long shutdown waits for streams and calls to finish.
    pub shutdown_grace: Duration,
    /// Where Prometheus scrapes `/metrics`; none serves no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Per-farm policy settings, groups and plug-ins (config file only).
    pub farms: FarmBook,
    /// TLS on the gRPC port; none serves plaintext.
    pub tls: Option<TlsFiles>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            database_url: "sqlite://tsbroker.db".to_owned(),
            heartbeat_timeout: Duration::from_secs(15),
            pending_logon_ttl: Duration::from_secs(30),
            max_pending_logons_per_machine: 20,
            admin_token: None,
            agent_token: None,
            log_format: LogFormat::Plain,
            shutdown_grace: Duration::from_secs(10),
            metrics_listen: None,
            farms: FarmBook::default(),
            tls: None,
        }
    }
}

impl BrokerConfig {
    /// How often agents are asked to report: a third of the timeout, so two reports may be
    /// lost before a machine is declared unreachable.
    pub fn heartbeat_interval(&self) -> Duration {
        (self.heartbeat_timeout / 3).max(Duration::from_millis(100))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_timeout < Duration::from_millis(300) {
            return Err("heartbeat_timeout must be at least 300ms".into());
        }
        if self.pending_logon_ttl.is_zero() {
            return Err("pending_logon_ttl must be more than zero".into());
        }
        for (name, value) in [
            ("heartbeat_timeout", self.heartbeat_timeout),
            ("pending_logon_ttl", self.pending_logon_ttl),
            ("shutdown_grace", self.shutdown_grace),
        ] {
            if value > MAX_DURATION {
                return Err(format!(
                    "{name} must be at most {} (got {})",
                    humantime::format_duration(MAX_DURATION),
                    humantime::format_duration(value)
                ));
            }
        }
        if self.max_pending_logons_per_machine == 0 {
            return Err("max_pending_logons_per_machine must be at least 1".into());
        }
        let known_scheme = ["sqlite:", "postgres://", "postgresql://"]
            .iter()
            .any(|scheme| self.database_url.starts_with(scheme));
        if !known_scheme {
            return Err(format!(
                "database_url {:?} must start with sqlite:// or postgres://",
                self.database_url
            ));
        }
        let policies = PolicyRegistry::default();
        let named = std::iter::once(("farm_defaults".to_owned(), &self.farms.defaults)).chain(
            self.farms
                .farms
                .iter()
                .map(|(name, settings)| (format!("farms.{name}"), settings)),
        );
        for (section, settings) in named {
            let unknown = settings
                .policy
                .as_deref()
                .filter(|policy| policies.get(policy).is_none());
            if let Some(policy) = unknown {
                return Err(format!(
                    "{section}: unknown policy {policy:?} (known: {})",
                    policies.names().join(", ")
                ));
            }
        }
        for farm in self.farms.farms.keys() {
            tsbroker_common::validate::farm_name("farms", farm)
                .map_err(|error| format!("{error} (farm {farm:?})"))?;
        }
        for (name, token) in [
            ("admin_token", &self.admin_token),
            ("agent_token", &self.agent_token),
        ] {
            match token.as_ref().map(|token| token.0.chars().count()) {
                // `TSBROKER_AGENT_TOKEN=` in an env file: taken for none, it would turn the
                // check off (and override the file's token) without a word.
                Some(0) => {
                    return Err(format!(
                        "{name} is empty: give one of at least 16 characters, or leave the \
                         setting out (an empty value does not mean none)"
                    ));
                }
                Some(1..16) => return Err(format!("{name} must be at least 16 characters")),
                _ => {}
            }
        }
        Ok(())
    }
}

/// tsbroker: the session broker for farms of RDP terminal servers.
///
/// Every setting can also come from the environment (TSBROKER_<NAME>) or a TOML file
/// (--config, keys in snake_case); flags win over the environment, which wins over the file.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// TOML file with settings (keys as the flags, in snake_case).
    #[arg(long, env = "TSBROKER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on [default: 127.0.0.1:50051].
    #[arg(long, env = "TSBROKER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Where the directory lives: sqlite://FILE (embedded) or postgres://USER@HOST/DB
    /// [default: sqlite://tsbroker.db].
    #[arg(long, env = "TSBROKER_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Silence after which a machine's agent is declared unreachable, e.g. 15s [default: 15s].
    #[arg(long, env = "TSBROKER_HEARTBEAT_TIMEOUT", value_parser = tsbroker_common::validate::duration)]
    pub heartbeat_timeout: Option<Duration>,
    /// How long a placed logon counts as pending (same user, same machine) [default: 30s].
    #[arg(long, env = "TSBROKER_PENDING_LOGON_TTL", value_parser = tsbroker_common::validate::duration)]
    pub pending_logon_ttl: Option<Duration>,
    /// Most logons in flight to one machine [default: 20].
    #[arg(long, env = "TSBROKER_MAX_PENDING_LOGONS_PER_MACHINE")]
    pub max_pending_logons_per_machine: Option<u32>,
    /// Bearer token (16 characters or more) the Admin service requires; without one, Admin
    /// answers loopback clients only.
    #[arg(long, env = "TSBROKER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Bearer token (16 characters or more) agents must present on their stream; with one, the
    /// Broker service (Redirect, the queries) also needs a token, the agent's or the admin's.
    /// Without one, any agent may connect and anyone may call Redirect.
    #[arg(long, env = "TSBROKER_AGENT_TOKEN", hide_env_values = true)]
    pub agent_token: Option<String>,
    /// Log format: plain or json [default: plain]. Verbosity: RUST_LOG (default info).
    #[arg(long, env = "TSBROKER_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// How long shutdown waits for streams and calls to finish [default: 10s].
    #[arg(long, env = "TSBROKER_SHUTDOWN_GRACE", value_parser = tsbroker_common::validate::duration)]
    pub shutdown_grace: Option<Duration>,
    /// Address to serve Prometheus metrics on (/metrics), e.g. 127.0.0.1:9150 [default: none].
    #[arg(long, env = "TSBROKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// PEM certificate (then any intermediates) to serve gRPC over TLS with [default: none:
    /// plaintext].
    #[arg(long, env = "TSBROKER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TSBROKER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA whose certificates agents and other callers must present (health checks and
    /// reflection excepted); an agent's must name its machine in its subjectAltName
    /// [default: none: no client certificates asked for].
    #[arg(long, env = "TSBROKER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM certificate revocation lists (CRLs) of --tls-client-ca: a revoked certificate
    /// cannot connect, and its open connections are cut when a changed file is read (within
    /// 10 s). Each CA of --tls-client-ca (and each intermediate below it) needs its current CRL
    /// in the file, else the certificates it issued are refused [default: none: no revocation
    /// checks].
    #[arg(long, env = "TSBROKER_TLS_CLIENT_CRL")]
    pub tls_client_crl: Option<PathBuf>,
    /// Serve nothing: ask the broker at the listen address (on loopback when that is every
    /// interface) whether it is SERVING, over TLS when --tls-cert is set, print its answer, and
    /// exit 0 if it is, 1 if not or if it cannot be asked. For container health checks.
    #[arg(long)]
    pub health_check: bool,
}

/// The TOML file's shape: every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    database_url: Option<String>,
    #[serde(default, with = "humantime_option")]
    heartbeat_timeout: Option<Duration>,
    #[serde(default, with = "humantime_option")]
    pending_logon_ttl: Option<Duration>,
    max_pending_logons_per_machine: Option<u32>,
    admin_token: Option<Secret>,
    agent_token: Option<Secret>,
    log_format: Option<String>,
    #[serde(default, with = "humantime_option")]
    shutdown_grace: Option<Duration>,
    metrics_listen: Option<SocketAddr>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    tls_client_crl: Option<PathBuf>,
    /// Settings for every farm not listed under `farms`.
    farm_defaults: Option<FarmFileSettings>,
    #[serde(default)]
    farms: BTreeMap<String, FarmFileSettings>,
}

/// Durations written as "15s", "100ms" in the TOML file.
pub(crate) mod humantime_option {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        text.map(|text| {
            tsbroker_common::validate::duration(&text).map_err(serde::de::Error::custom)
        })
        .transpose()
    }
}

impl Cli {
    /// Layers flags and environment (already merged by clap) over the file over the defaults.
    pub fn into_config(self) -> Result<BrokerConfig, String> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    format!("cannot read config file {}: {error}", path.display())
                })?;
                tsbroker_common::config_file::parse::<FileConfig>(&text)
                    .map_err(|error| format!("config file {}: {error}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let defaults = BrokerConfig::default();
        let file_log_format = file
            .log_format
            .as_deref()
            .map(str::parse::<LogFormat>)
            .transpose()?;
        let config = BrokerConfig {
            listen: self.listen.or(file.listen).unwrap_or(defaults.listen),
            database_url: self
                .database_url
                .or(file.database_url)
                .unwrap_or(defaults.database_url),
            heartbeat_timeout: self
                .heartbeat_timeout
                .or(file.heartbeat_timeout)
                .unwrap_or(defaults.heartbeat_timeout),
            pending_logon_ttl: self
                .pending_logon_ttl
                .or(file.pending_logon_ttl)
                .unwrap_or(defaults.pending_logon_ttl),
            max_pending_logons_per_machine: self
                .max_pending_logons_per_machine
                .or(file.max_pending_logons_per_machine)
                .unwrap_or(defaults.max_pending_logons_per_machine),
            admin_token: self.admin_token.map(Secret).or(file.admin_token),
            agent_token: self.agent_token.map(Secret).or(file.agent_token),
            log_format: self.log_format.or(file_log_format).unwrap_or_default(),
            shutdown_grace: self
                .shutdown_grace
                .or(file.shutdown_grace)
                .unwrap_or(defaults.shutdown_grace),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            farms: farm_book(file.farm_defaults.as_ref(), &file.farms)?,
            tls: tls_files(
                self.tls_cert.or(file.tls_cert),
                self.tls_key.or(file.tls_key),
                self.tls_client_ca.or(file.tls_client_ca),
                self.tls_client_crl.or(file.tls_client_crl),
            )?,
        };
        config.validate()?;
        Ok(config)
    }
}

/// TLS needs a certificate and its key together; a client CA only means something with them,
/// and revocation lists only with a client CA.
fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    client_crl: Option<PathBuf>,
) -> Result<Option<TlsFiles>, String> {
    if client_crl.is_some() && client_ca.is_none() {
        return Err(
            "tls_client_crl needs tls_client_ca (it revokes certificates that CA issued)".into(),
        );
    }
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert,
            key,
            client_ca,
            client_crl,
        })),
        (Some(_), None) => Err("tls_cert needs tls_key (the certificate's private key)".into()),
        (None, Some(_)) => Err("tls_key needs tls_cert (the certificate it is the key of)".into()),
        (None, None) if client_ca.is_some() => {
            Err("tls_client_ca needs tls_cert and tls_key (client certificates need TLS)".into())
        }
        (None, None) => Ok(None),
    }
}

/// Resolves `[farm_defaults]` over the built-in defaults and each `[farms.<name>]` over those.
fn farm_book(
    defaults: Option<&FarmFileSettings>,
    farms: &BTreeMap<String, FarmFileSettings>,
) -> Result<FarmBook, String> {
    if defaults.is_some_and(|defaults| defaults.plugin.is_some()) {
        // It would serve only the farms listed under [farms.NAME] (which take it over), never
        // the others: a plug-in names the farms it serves at `Initialize`.
        return Err(
            "[farm_defaults.plugin]: a plug-in serves the farms named in the file; put \
                    it under [farms.NAME] for each farm it serves"
                .into(),
        );
    }
    let builtin = crate::decision::farm_settings::FarmSettings::default();
    let defaults = match defaults {
        Some(file) => file.resolve(&builtin, "farm_defaults")?,
        None => builtin,
    };
    let farms = farms
        .iter()
        .map(|(name, file)| Ok((name.clone(), file.resolve(&defaults, name)?)))
        .collect::<Result<BTreeMap<_, _>, String>>()?;
    one_setting_per_plugin(&farms)?;
    Ok(FarmBook { defaults, farms })
}

/// Farms that name one plug-in address share its link, and so its deadline, batch size and CA:
/// different ones would hold for one of them only, so they are refused.
fn one_setting_per_plugin(
    farms: &BTreeMap<String, crate::decision::farm_settings::FarmSettings>,
) -> Result<(), String> {
    let mut seen: BTreeMap<&str, (&str, &crate::decision::farm_settings::PluginSettings)> =
        BTreeMap::new();
    for (farm, settings) in farms {
        let Some(plugin) = &settings.plugin else {
            continue;
        };
        match seen.get(plugin.address.as_str()) {
            Some((first, theirs)) if *theirs != plugin => {
                return Err(format!(
                    "farms {first:?} and {farm:?} name the plug-in {:?} with different \
                     deadline, batch_size or ca_file: farms that share a plug-in share its \
                     settings (give them the same, or give the plug-in a second address)",
                    plugin.address
                ));
            }
            Some(_) => {}
            None => {
                seen.insert(&plugin.address, (farm, plugin));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_settings_file_error_does_not_repeat_a_secret() {
        for (text, secret) in [
            ("admin_token = 1234567890123456789\n", "1234567890"),
            ("agent_token = [\"s3cret-s3cret-s3cret\"]\n", "s3cret"),
            ("database_url = 5e3\n", "5e3"),
            ("databse_url = \"postgres://u:pw@db/x\"\n", "pw@"),
        ] {
            let error = tsbroker_common::config_file::parse::<FileConfig>(text).unwrap_err();
            assert!(error.starts_with("line 1 ("), "{error}");
            assert!(!error.contains(secret), "{text}: {error}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let config = Cli::parse_from(["tsbroker"]).into_config().unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.database_url, "sqlite://tsbroker.db");
        assert_eq!(config.heartbeat_interval(), Duration::from_secs(5));
    }

    #[test]
    fn durations_past_an_hour_are_refused_by_name() {
        for (flag, value, name) in [
            ("--heartbeat-timeout", "1000d", "heartbeat_timeout"),
            ("--pending-logon-ttl", "100000h", "pending_logon_ttl"),
            ("--shutdown-grace", "2h", "shutdown_grace"),
        ] {
            let error = Cli::parse_from(["tsbroker", flag, value])
                .into_config()
                .unwrap_err();
            assert!(
                error.starts_with(name) && error.contains("at most 1h"),
                "{error}"
            );
        }
        let config = Cli::parse_from(["tsbroker", "--heartbeat-timeout", "1h"]).into_config();
        assert!(config.is_ok(), "{config:?}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = std::env::temp_dir().join(format!("tsbroker-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broker.toml");
        std::fs::write(
            &path,
            "listen = \"0.0.0.0:6000\"\nheartbeat_timeout = \"20s\"\n",
        )
        .unwrap();
        let path_text = path.to_str().unwrap();
        let config = Cli::parse_from([
            "tsbroker",
            "--config",
            path_text,
            "--listen",
            "127.0.0.1:7000",
        ])
        .into_config()
        .unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:7000");
        assert_eq!(config.heartbeat_timeout, Duration::from_secs(20));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn farms_come_from_the_file() {
        let dir = std::env::temp_dir().join(format!("tsbroker-farms-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broker.toml");
        std::fs::write(
            &path,
            "[farm_defaults]\ncpu_threshold = 80.0\n[farms.sales]\npolicy = \"round-robin\"\n",
        )
        .unwrap();
        let config = Cli::parse_from(["tsbroker", "--config", path.to_str().unwrap()])
            .into_config()
            .unwrap();
        let sales = config.farms.get("sales");
        assert_eq!(
            (sales.policy.as_deref(), sales.cpu_threshold),
            (Some("round-robin"), 80.0)
        );
        assert_eq!(config.farms.get("other").cpu_threshold, 80.0);
        // The file's error, for a file that is refused.
        let refused = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Cli::parse_from(["tsbroker", "--config", path.to_str().unwrap()])
                .into_config()
                .unwrap_err()
        };
        let error = refused("[farms.sales]\npolicy = \"fastest\"\n");
        assert!(error.contains("unknown policy"), "{error}");
        // A plug-in in [farm_defaults] would serve no farm the file does not list.
        let error = refused("[farm_defaults.plugin]\naddress = \"http://127.0.0.1:50070\"\n");
        assert!(error.contains("[farms.NAME]"), "{error}");
        // A duration that is not one says what one looks like.
        let error =
            refused("[farms.a.plugin]\naddress = \"http://127.0.0.1:50070\"\ndeadline = \"abc\"\n");
        assert!(error.contains("such as \"100ms\""), "{error}");

        // Two farms on one plug-in (with a slash after the port or not): one set of its
        // settings.
        let shared = |deadline: &str| {
            format!(
                "[farms.a.plugin]\naddress = \"http://127.0.0.1:50070\"\n\
                 [farms.b.plugin]\naddress = \"http://127.0.0.1:50070/\"\n{deadline}"
            )
        };
        std::fs::write(&path, shared("")).unwrap();
        let config = Cli::parse_from(["tsbroker", "--config", path.to_str().unwrap()])
            .into_config()
            .unwrap();
        let address = |farm: &str| {
            config
                .farms
                .get(farm)
                .plugin
                .as_ref()
                .map(|plugin| plugin.address.clone())
        };
        assert_eq!(address("b"), address("a"));
        std::fs::write(&path, shared("deadline = \"300ms\"\n")).unwrap();
        let error = Cli::parse_from(["tsbroker", "--config", path.to_str().unwrap()])
            .into_config()
            .unwrap_err();
        assert!(
            error.contains("\"a\" and \"b\"") && error.contains("share its settings"),
            "{error}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn tls_needs_a_certificate_and_its_key() {
        let config = Cli::parse_from([
            "tsbroker",
            "--tls-cert",
            "/etc/tsbroker/cert.pem",
            "--tls-key",
            "/etc/tsbroker/key.pem",
        ])
        .into_config()
        .unwrap();
        assert_eq!(
            config.tls,
            Some(TlsFiles {
                cert: "/etc/tsbroker/cert.pem".into(),
                key: "/etc/tsbroker/key.pem".into(),
                client_ca: None,
                client_crl: None,
            })
        );
        let both = ["--tls-cert", "c.pem", "--tls-key", "k.pem"];
        for (args, named) in [
            (vec!["--tls-cert", "c.pem"], "tls_key"),
            (vec!["--tls-key", "k.pem"], "tls_cert"),
            (vec!["--tls-client-ca", "ca.pem"], "tls_client_ca"),
            (
                [&both[..], &["--tls-client-crl", "crl.pem"]].concat(),
                "tls_client_crl",
            ),
        ] {
            let error = Cli::parse_from(std::iter::once("tsbroker").chain(args))
                .into_config()
                .unwrap_err();
            assert!(error.contains(named), "{error}");
        }
        let revoking = Cli::parse_from(
            [
                &["tsbroker"][..],
                &both,
                &["--tls-client-ca", "ca.pem", "--tls-client-crl", "crl.pem"],
            ]
            .concat(),
        )
        .into_config()
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(revoking.client_crl, Some("crl.pem".into()));
    }

    #[test]
    fn bad_settings_say_why() {
        let error = Cli::parse_from(["tsbroker", "--database-url", "mysql://x"])
            .into_config()
            .unwrap_err();
        assert!(error.contains("sqlite://"), "{error}");
        let error = Cli::parse_from(["tsbroker", "--admin-token", "short"])
            .into_config()
            .unwrap_err();
        assert!(error.contains("admin_token"), "{error}");
        // An empty one is refused too, not taken for none (which would turn the check off).
        let error = Cli::parse_from(["tsbroker", "--agent-token", ""])
            .into_config()
            .unwrap_err();
        assert!(error.contains("agent_token is empty"), "{error}");
        assert_eq!(
            format!("{:?}", Secret("hunter2hunter2hunter2".into())),
            "<redacted>"
        );
    }
}
