//! `tsagent session pam`: the request `pam_exec` asks for, read from PAM's environment the way
//! the shipped script (`deploy/pam/tsagent-session`) reads it: `PAM_TYPE` picks logon or logoff,
//! `PAM_USER` names the user, `PAM_TTY` (xrdp-sesman's display, ":10" or ":10.0") gives the
//! session's number — the one xrdp's reconnect hook reports later — and `PAM_RHOST` the
//! client's address when it is a bare address (some xrdp versions put "ip:port - socket: N").

use super::{Request, SessionArgs};

/// The request for PAM's environment, as `variable` reads it; `None` for a PAM step that is
/// not a session's opening or closing (auth, account, password: nothing to report).
pub fn request(variable: impl Fn(&str) -> Option<String>) -> Result<Option<Request>, String> {
    let kind = variable("PAM_TYPE").ok_or("PAM_TYPE is not set (run from pam_exec)")?;
    if !matches!(kind.as_str(), "open_session" | "close_session") {
        return Ok(None);
    }
    let user = variable("PAM_USER")
        .filter(|user| !user.is_empty())
        .ok_or("PAM_USER is not set (run from pam_exec)")?;
    let args = SessionArgs {
        user,
        session_id: variable("PAM_TTY").as_deref().and_then(display_number),
        client_address: variable("PAM_RHOST")
            .filter(|host| host.parse::<std::net::IpAddr>().is_ok()),
        ..Default::default()
    };
    Ok(Some(if kind == "open_session" {
        Request::Logon(args)
    } else {
        Request::Logoff(args)
    }))
}

/// The display number of an X display name: ":10" and ":10.0" are 10; anything else, none.
fn display_number(tty: &str) -> Option<u32> {
    let display = tty.strip_prefix(':')?;
    let number = display
        .split_once('.')
        .map_or(display, |(number, _)| number);
    if number.is_empty() || !number.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    number.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn request_for(pairs: &[(&str, &str)]) -> Result<Option<Request>, String> {
        let environment: HashMap<String, String> = pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        request(|name| environment.get(name).cloned())
    }

    #[test]
    fn the_display_is_the_session_number_and_only_bare_addresses_are_kept() {
        let opened = request_for(&[
            ("PAM_TYPE", "open_session"),
            ("PAM_USER", "alice"),
            ("PAM_TTY", ":12"),
            ("PAM_RHOST", "10.0.0.5"),
        ])
        .unwrap();
        let Some(Request::Logon(args)) = opened else {
            panic!("{opened:?}")
        };
        assert_eq!(args.user, "alice");
        assert_eq!(args.session_id, Some(12));
        assert_eq!(args.client_address.as_deref(), Some("10.0.0.5"));

        let closed = request_for(&[
            ("PAM_TYPE", "close_session"),
            ("PAM_USER", "alice"),
            ("PAM_TTY", ":12.0"),
            ("PAM_RHOST", "10.0.0.5:1234 - socket: 12"),
        ])
        .unwrap();
        let Some(Request::Logoff(args)) = closed else {
            panic!("{closed:?}")
        };
        assert_eq!(args.session_id, Some(12));
        assert_eq!(args.client_address, None);
    }

    #[test]
    fn odd_ttys_give_no_number() {
        for tty in ["", "/dev/pts/3", ":", ":x", ":1x", ":-1", ":99999999999"] {
            assert_eq!(display_number(tty), None, "{tty:?}");
        }
        assert_eq!(display_number(":0"), Some(0));
    }

    #[test]
    fn outside_pam_it_says_what_is_missing() {
        let error = request_for(&[("PAM_TYPE", "open_session")]).unwrap_err();
        assert!(error.contains("PAM_USER"), "{error}");
        let error = request_for(&[("PAM_USER", "alice")]).unwrap_err();
        assert!(error.contains("PAM_TYPE"), "{error}");
        // Other PAM steps: nothing to report, and not an error.
        for kind in ["auth", "account", "password"] {
            assert_eq!(
                request_for(&[("PAM_USER", "alice"), ("PAM_TYPE", kind)]),
                Ok(None)
            );
        }
    }
}
