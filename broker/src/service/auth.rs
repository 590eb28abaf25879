//! Guards for the broker's services: a bearer token for the agent and admin paths, checked in
//! constant time (with no admin token configured, the Admin service answers loopback clients
//! only), and, with a TLS client CA configured, a client certificate it signed for every service
//! but health and reflection (the TLS handshake has verified any certificate presented).

use crate::config::Secret;
use tonic::{Request, Status};

/// What a service asks of a call before it runs.
#[derive(Clone)]
pub struct AccessGuard {
    expected: Option<Secret>,
    loopback_only_without_token: bool,
    client_certificate_required: bool,
    service: &'static str,
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
            expected,
            loopback_only_without_token,
            client_certificate_required: false,
            service,
        }
    }

    /// No token: anyone may call (subject to the client certificate).
    pub fn open(service: &'static str) -> Self {
        AccessGuard::token(None, false, service)
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
        match &self.expected {
            Some(expected) => {
                let presented = request
                    .metadata()
                    .get("authorization")
                    .and_then(|value| value.to_str().ok())
                    .and_then(|value| value.strip_prefix("Bearer "))
                    .unwrap_or("");
                if constant_time_eq(presented.as_bytes(), expected.0.as_bytes()) {
                    Ok(request)
                } else {
                    Err(Status::unauthenticated(format!(
                        "the {} service needs a valid bearer token",
                        self.service
                    )))
                }
            }
            None if self.loopback_only_without_token => {
                let loopback = request
                    .remote_addr()
                    .is_some_and(|peer| peer.ip().is_loopback());
                if loopback {
                    Ok(request)
                } else {
                    Err(Status::permission_denied(format!(
                        "the {} service answers loopback clients only unless a token is configured",
                        self.service
                    )))
                }
            }
            None => Ok(request),
        }
    }
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
