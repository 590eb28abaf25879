//! The PAM and xrdp hooks (deploy/pam/tsagent-session, deploy/xrdp/tsagent-reconnect) with a
//! stand-in `tsagent` that records how it was called: they ask it to wait for an agent that is
//! restarting (`--wait`), the reconnect hook for a known session only (`--known-only`), and
//! ask a tsagent older than the hooks, which refuses a flag it does not know (64), again
//! without it, so that a hook upgraded before the binary still reports.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repository_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A stand-in tsagent named `name` that appends its arguments to `calls`, refusing the flags
/// of `unknown` as a tsagent from before them does (clap names the first one it meets).
fn stand_in(dir: &Path, name: &str, unknown: &[&str]) -> (PathBuf, PathBuf) {
    let calls = dir.join(format!("{name}-calls"));
    let program = dir.join(format!("{name}-tsagent"));
    let refuse: String = unknown
        .iter()
        .map(|flag| {
            format!(
                "for argument in \"$@\"; do if [ \"$argument\" = {flag} ]; then \
                 echo \"tsagent: unexpected argument '{flag}' found\" >&2; exit 64; fi; done\n"
            )
        })
        .collect();
    let script = format!("#!/bin/sh\n{refuse}echo \"$*\" >>'{}'\n", calls.display());
    std::fs::write(&program, script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    (program, calls)
}

fn calls(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_hooks_wait_for_a_restarting_agent_and_still_talk_to_an_older_tsagent() {
    let dir = tempfile::tempdir().unwrap();
    let versions: [(&str, &[&str]); 3] = [
        ("new", &[]),
        ("without-known-only", &["--known-only"]),
        ("old", &["--known-only", "--wait"]),
    ];
    for (version, unknown) in versions {
        let (program, recorded) = stand_in(dir.path(), version, unknown);
        let status = Command::new("sh")
            .arg(repository_file("deploy/pam/tsagent-session"))
            .env("PAM_TYPE", "close_session")
            .env("PAM_USER", "alice")
            .env("PAM_TTY", ":10")
            .env("TSAGENT", &program)
            .env("TSAGENT_CONTROL_SOCKET", "/run/test/control.sock")
            .status()
            .unwrap();
        assert!(status.success());
        let status = Command::new("sh")
            .arg(repository_file("deploy/xrdp/tsagent-reconnect"))
            .arg(":11")
            .env("SUDO_USER", "bob")
            .env("TSAGENT", &program)
            .env("TSAGENT_CONTROL_SOCKET", "/run/test/control.sock")
            .status()
            .unwrap();
        assert!(status.success());
        let logoff = "session logoff --user alice --control-socket /run/test/control.sock \
                      --session-id 10";
        let reconnect = "session reconnect --user bob --session-id 11 --control-socket \
                         /run/test/control.sock";
        // Refused with a flag it does not know (nothing recorded), then asked without it.
        let expected = match version {
            "new" => vec![
                format!("{logoff} --wait 8s"),
                format!("{reconnect} --known-only --wait 8s"),
            ],
            "without-known-only" => vec![
                format!("{logoff} --wait 8s"),
                format!("{reconnect} --wait 8s"),
            ],
            _ => vec![logoff.to_owned(), reconnect.to_owned()],
        };
        assert_eq!(calls(&recorded), expected, "{version} tsagent");
    }
}
