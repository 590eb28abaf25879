//! The PAM and xrdp hooks (deploy/pam/tsagent-session, deploy/xrdp/tsagent-reconnect) with a
//! stand-in `tsagent` that records how it was called: they ask it to wait for an agent that is
//! restarting (`--wait`), and ask a tsagent older than the hooks, which refuses that flag (64),
//! again without it, so that a hook upgraded before the binary still reports.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repository_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A stand-in tsagent that appends its arguments to `calls`; `old` ones refuse `--wait` as a
/// tsagent from before the flag does.
fn stand_in(dir: &Path, old: bool) -> (PathBuf, PathBuf) {
    let calls = dir.join(if old { "old-calls" } else { "new-calls" });
    let program = dir.join(if old { "old-tsagent" } else { "new-tsagent" });
    let refuse = if old {
        "for argument in \"$@\"; do if [ \"$argument\" = --wait ]; then \
         echo \"tsagent: unexpected argument '--wait' found\" >&2; exit 64; fi; done\n"
    } else {
        ""
    };
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
    for old in [false, true] {
        let (program, recorded) = stand_in(dir.path(), old);
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
        let expected = if old {
            // Refused with --wait (nothing recorded), then asked without it.
            vec![logoff.to_owned(), reconnect.to_owned()]
        } else {
            vec![
                format!("{logoff} --wait 8s"),
                format!("{reconnect} --wait 8s"),
            ]
        };
        assert_eq!(calls(&recorded), expected, "old tsagent: {old}");
    }
}
