//! Guards for the broker's services: a bearer token for the agent and admin paths, checked in
//! constant time (with no admin token configured, the Admin service answers loopback clients
//! only; once agents need a token, the Broker service takes theirs or the admin's), and, with a TLS client CA configured, a client certificate it signed for every service
//! but health and reflection (the TLS handshake has verified any certificate presented).
//! Refused calls are logged, at most one warning a minute per service (with how many were
//! refused since), so that nobody can fill the log by calling without credentials.

use crate::config::Secret;
use std::sync::Arc;
use tonic::{Request, Status};
use tsbroker_common::warning_limit::WarningLimit;

/// What a service asks of a call before it runs.
#[derive(Clone)]
pub struct AccessGuard {
    /// Any of these tokens lets a call in; none configured: see `loopback_only_without_token`.
    expected: Vec<Secret>,
    /// Tokens of the broker's other callers, which do not let a call in here: PERMISSION_DENIED
    /// (the caller is known, not allowed) rather than UNAUTHENTICATED.
    elsewhere: Vec<Secret>,
    loopback_only_without_token: bool,
    client_certificate_required: bool,
    service: &'static str,
    refusals: Arc<WarningLimit>,
}

impl AccessGuard {
    /// Checks `authorization: Bearer <token>` against `expected`; with no token configured,
    /// `loopback_only_without_token` decides whether only loopback peers are let in.
    pub fn token(
        expected: Option<Secret>,
        loopback_only_without_token: bool,
        service: &'static str,
    ) -> Self {
        AccessGuard {
            expected: expected.into_iter().collect(),
            elsewhere: Vec::new(),
            loopback_only_without_token,
            client_certificate_required: false,
            service,
            refusals: Arc::default(),
        }
    }

    /// No token: anyone may call (subject to the client certificate).
    pub fn open(service: &'static str) -> Self {
        AccessGuard::token(None, false, service)
    }

    /// Lets calls with `token` in too, when this guard asks for a token at all (the Broker
    /// service asks front doors for the agent token and operators for the admin token).
    pub fn or_token(mut self, token: Option<Secret>) -> Self {
        if !self.expected.is_empty() {
            self.expected.extend(token);
        }
        self
    }

    /// Knows `token` as another caller's (it lets nothing in here): such a call is told
    /// PERMISSION_DENIED, not UNAUTHENTICATED.
    pub fn not_for(mut self, token: Option<Secret>) -> Self {
        self.elsewhere.extend(token);
        self
    }

    /// Refuses calls that came without a client certificate when `required`.
    pub fn client_certificate(self, required: bool) -> Self {
        AccessGuard {
            client_certificate_required: required,
            ..self
        }
    }

    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
        if self.client_certificate_required {
            let presented = request
                .peer_certs()
                .is_some_and(|certificates| !certificates.is_empty());
            if !presented {
                return Err(Status::unauthenticated(format!(
                    "the {} service needs a client certificate signed by the broker's client CA",
                    self.service
                )));
            }
        }
        match self.expected.as_slice() {
            [] if self.loopback_only_without_token => {
                let loopback = request
                    .remote_addr()
                    .is_some_and(|peer| is_loopback(peer.ip()));
                if loopback {
                    Ok(request)
                } else {
                    self.refused(
                        &request,
                        "not a loopback client, and no token is configured",
                    );
                    Err(Status::permission_denied(format!(
                        "the {} service answers loopback clients only unless a token is configured",
                        self.service
                    )))
                }
            }
            [] => Ok(request),
            expected => {
                let presented = request
                    .metadata()
                    .get("authorization")
                    .and_then(|value| value.to_str().ok())
                    .and_then(bearer_token)
                    .unwrap_or("");
                // Every token is compared, so the time taken says nothing of which matched.
                let matching = |tokens: &[Secret]| {
                    tokens.iter().fold(false, |matched, token| {
                        constant_time_eq(presented.as_bytes(), token.0.as_bytes()) | matched
                    })
                };
                let (matches, known_elsewhere) = (matching(expected), matching(&self.elsewhere));
                if matches {
                    Ok(request)
                } else if known_elsewhere {
                    self.refused(&request, "a token of another service");
                    Err(Status::permission_denied(format!(
                        "this token does not give access to the {} service",
                        self.service
                    )))
                } else {
                    self.refused(&request, "no valid bearer token");
                    let which = if expected.len() > 1 {
                        " (the agent token, or the admin token)"
                    } else {
                        ""
                    };
                    Err(Status::unauthenticated(format!(
                        "the {} service needs a valid bearer token{which}",
                        self.service
                    )))
                }
            }
        }
    }

    /// Logs a refused call: worth an operator's attention (a misconfigured script, an agent
    /// with an old token, someone trying tokens), and the client hears nothing more than its
    /// status. One warning a minute; the others at debug level.
    fn refused<T>(&self, request: &Request<T>, why: &str) {
        let peer = request
            .remote_addr()
            .map(tsbroker_common::model::canonical_socket_address)
            .map_or_else(|| "-".to_owned(), |peer| peer.to_string());
        match self.refusals.warn_now() {
            Some(unwarned) => tracing::warn!(
                service = self.service,
                %peer,
                refused_since_last_warning = unwarned,
                "call refused: {why}"
            ),
            None => tracing::debug!(service = self.service, %peer, "call refused: {why}"),
        }
    }
}

/// The token of an `authorization` header's `Bearer` credentials (the scheme's case does not
/// matter, RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// A loopback address, counting IPv4's as seen on a dual-stack (`[::]`) listener:
/// `::ffff:127.0.0.1`.
fn is_loopback(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len()
        && left
            .iter()
            .zip(right)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call with `authorization: Bearer <token>`.
    fn bearer(token: &str) -> Request<()> {
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    }

    #[test]
    fn tokens_are_checked() {
        let guard = AccessGuard::token(Some(Secret("0123456789abcdef".into())), true, "admin");
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("authorization", "Bearer 0123456789abcdef".parse().unwrap());
        assert!(guard.check(request).is_ok());
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("authorization", "Bearer 0123456789abcdeX".parse().unwrap());
        assert_eq!(
            guard.check(request).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn the_broker_service_takes_either_token_once_agents_need_one() {
        let agent = Some(Secret("agent-token-0123456789".into()));
        let admin = Some(Secret("admin-token-0123456789".into()));
        let guard = AccessGuard::token(agent, false, "Broker").or_token(admin.clone());
        assert!(guard.check(bearer("agent-token-0123456789")).is_ok());
        assert!(guard.check(bearer("admin-token-0123456789")).is_ok());
        let refused = guard.check(bearer("agent-token-01234567")).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(
            refused
                .message()
                .contains("the agent token, or the admin token"),
            "{refused:?}"
        );
        assert!(guard.check(Request::new(())).is_err());
        // Without an agent token the service stays open, admin token or not.
        let open = AccessGuard::token(None, false, "Broker").or_token(admin);
        assert!(open.check(Request::new(())).is_ok());
    }

    #[test]
    fn another_services_token_is_told_it_is_not_allowed() {
        let agent = Some(Secret("agent-token-0123456789".into()));
        let admin = Some(Secret("admin-token-0123456789".into()));
        let guard = AccessGuard::token(admin, true, "Admin").not_for(agent);
        assert!(guard.check(bearer("admin-token-0123456789")).is_ok());
        let refused = guard.check(bearer("agent-token-0123456789")).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
        assert!(refused.message().contains("Admin"), "{refused:?}");
        let unknown = guard.check(bearer("agent-token-012345678X")).unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            guard.check(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_is_not() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        let guard = AccessGuard::token(Some(Secret("0123456789abcdef".into())), true, "admin");
        for (header, accepted) in [
            ("bearer 0123456789abcdef", true),
            ("Bearer 0123456789ABCDEF", false),
            ("Bearer  0123456789abcdef", false),
        ] {
            let mut request = Request::new(());
            request
                .metadata_mut()
                .insert("authorization", header.parse().unwrap());
            assert_eq!(guard.check(request).is_ok(), accepted, "{header}");
        }
    }

    #[test]
    fn loopback_includes_ipv4_mapped_addresses() {
        for (address, loopback) in [
            ("127.0.0.1", true),
            ("127.1.2.3", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:192.0.2.2", false),
            ("192.0.2.2", false),
            ("fd00::2", false),
        ] {
            let ip: std::net::IpAddr = address.parse().unwrap();
            assert_eq!(is_loopback(ip), loopback, "{address}");
        }
    }

    #[test]
    fn without_token_admin_is_loopback_only() {
        let guard = AccessGuard::token(None, true, "admin");
        // No peer address known: refused.
        assert_eq!(
            guard.check(Request::new(())).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let open = AccessGuard::token(None, false, "agent");
        assert!(open.check(Request::new(())).is_ok());
    }

    #[test]
    fn a_required_client_certificate_is_asked_for_before_the_token() {
        let guard = AccessGuard::open("Broker").client_certificate(true);
        let refused = guard.check(Request::new(())).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        assert!(
            refused.message().contains("client certificate"),
            "{refused:?}"
        );
        let guard = AccessGuard::token(Some(Secret("0123456789abcdef".into())), false, "agent")
            .client_certificate(true);
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert("authorization", "Bearer 0123456789abcdef".parse().unwrap());
        let refused = guard.check(request).unwrap_err();
        assert!(
            refused.message().contains("client certificate"),
            "{refused:?}"
        );
        assert!(
            AccessGuard::open("Broker")
                .client_certificate(false)
                .check(Request::new(()))
                .is_ok()
        );
    }
}
