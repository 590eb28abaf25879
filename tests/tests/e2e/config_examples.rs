//! The configuration operators copy — `deploy/config/*.toml`, with every commented-out setting
//! taken in, and the broker settings shown in the READMEs — is accepted by the binaries' own
//! parsers, so a setting renamed or removed in the code cannot leave an example stale.

use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

fn repository_file(relative: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// The example with each `# key = value` line uncommented, except keys the example already sets
/// (a commented second value is an alternative); returns the text and the keys taken in.
fn every_setting_uncommented(example: &str) -> (String, Vec<String>) {
    let is_key =
        |key: &str| !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    let set_already = |key: &str| {
        example
            .lines()
            .any(|line| line.starts_with(&format!("{key} = ")))
    };
    let mut text = String::new();
    let mut taken = Vec::new();
    for line in example.lines() {
        let setting = line
            .strip_prefix("# ")
            .and_then(|rest| Some((rest.split_once(" = ")?.0, rest)))
            .filter(|(key, _)| is_key(key) && !set_already(key) && !taken.iter().any(|t| t == key));
        match setting {
            Some((key, rest)) => {
                taken.push(key.to_owned());
                text.push_str(rest);
            }
            None => text.push_str(line),
        }
        text.push('\n');
    }
    (text, taken)
}

/// The ```toml blocks of a Markdown file.
fn toml_blocks(markdown: &str) -> Vec<String> {
    markdown
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split("```").next().map(str::to_owned))
        .collect()
}

fn broker_config(dir: &tempfile::TempDir, text: &str) -> Result<tsbroker::BrokerConfig, String> {
    let path = dir.path().join("tsbroker.toml");
    std::fs::write(&path, text).unwrap();
    tsbroker::config::Cli::parse_from(["tsbroker", "--config", path.to_str().unwrap()])
        .into_config()
}

#[test]
fn the_brokers_example_config_is_accepted_with_every_setting() {
    let dir = tempfile::tempdir().unwrap();
    let example = repository_file("deploy/config/tsbroker.toml");
    broker_config(&dir, &example).expect("the example as shipped");
    let (full, taken) = every_setting_uncommented(&example);
    assert!(taken.len() >= 8, "settings found in the example: {taken:?}");
    let config = broker_config(&dir, &full).unwrap_or_else(|error| panic!("{error}\n{full}"));
    assert_eq!(config.heartbeat_timeout, Duration::from_secs(15));
    assert_eq!(config.shutdown_grace, Duration::from_secs(10));
    assert_eq!(
        config.metrics_listen,
        Some("127.0.0.1:9150".parse().unwrap())
    );
    assert!(config.admin_token.is_some() && config.agent_token.is_some());
    let tls = config.tls.expect("the TLS settings");
    assert_eq!(tls.client_ca, Some("/etc/tsbroker/ca.pem".into()));
    assert_eq!(tls.client_crl, Some("/etc/tsbroker/ca.crl".into()));
}

#[test]
fn the_readmes_farm_settings_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let readme = repository_file("README.md");
    let farms = toml_blocks(&readme);
    assert_eq!(farms.len(), 1, "README.md's toml blocks: {farms:?}");
    let config = broker_config(&dir, &farms[0]).unwrap_or_else(|error| panic!("{error}"));
    let default = config.farms.get("default");
    assert_eq!(default.policy.as_deref(), Some("resource"));
    assert_eq!(default.groups.len(), 1);
    assert!(!default.groups[0].fallback);
    assert_eq!(
        default.plugin.as_ref().map(|plugin| plugin.deadline),
        Some(Duration::from_millis(100))
    );
    // The plug-in example's README: its first block is the broker's side.
    let plugin_readme = toml_blocks(&repository_file("examples/plugin/README.md"));
    let config = broker_config(&dir, &plugin_readme[0]).unwrap_or_else(|error| panic!("{error}"));
    let plugin = config
        .farms
        .get("default")
        .plugin
        .as_ref()
        .expect("a plug-in");
    assert_eq!(
        (plugin.address.as_str(), plugin.batch_size),
        ("http://127.0.0.1:50070", 25)
    );
}

#[test]
fn the_agents_example_config_is_accepted_with_every_setting() {
    let dir = tempfile::tempdir().unwrap();
    let example = repository_file("deploy/config/tsagent.toml");
    let (full, taken) = every_setting_uncommented(&example);
    assert!(
        taken.len() >= 10,
        "settings found in the example: {taken:?}"
    );
    // The TLS settings are for an https:// broker.
    let full = full.replace(
        "broker = \"http://broker.example.com",
        "broker = \"https://broker.example.com",
    );
    let tls = tsagent::config::BrokerTls {
        ca: Some("/etc/tsagent/ca.pem".into()),
        cert: Some("/etc/tsagent/agent.pem".into()),
        key: Some("/etc/tsagent/agent.key".into()),
    };
    for (text, scheme, tls) in [
        (example.as_str(), "http", Default::default()),
        (full.as_str(), "https", tls),
    ] {
        let path = dir.path().join("tsagent.toml");
        std::fs::write(&path, text).unwrap();
        let args = tsagent::cli::AgentArgs {
            config: Some(path),
            // The shipped example leaves the name to the host's FQDN.
            machine_name: Some("ts1.example.com".into()),
            ..Default::default()
        };
        let (config, _) =
            tsagent::settings::agent_config(args).unwrap_or_else(|error| panic!("{error}\n{text}"));
        assert_eq!(config.broker_tls, tls);
        assert_eq!(
            config.broker_url,
            format!("{scheme}://broker.example.com:50051")
        );
        assert_eq!(config.local_rdp, "127.0.0.1:3390");
        let metrics = (scheme == "https").then(|| "127.0.0.1:9151".parse().unwrap());
        assert_eq!(config.metrics_listen, metrics);
    }
    let path = dir.path().join("tsagent.toml");
    let args = tsagent::cli::AgentArgs {
        config: Some(path),
        ..Default::default()
    };
    let (config, _) = tsagent::settings::agent_config(args).unwrap();
    assert_eq!(config.advertise, "ts1.example.com:3389");
    assert_eq!(config.unconfirmed_logon_grace, Duration::from_secs(30));
}
