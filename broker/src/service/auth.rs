//! Guards for the agent and admin paths: a bearer token each, checked in constant time. With
//! no admin token configured, the Admin service answers loopback clients only.

use crate::config::Secret;
use tonic::{Request, Status};

/// Checks `authorization: Bearer <token>` against `expected`; with no token configured,
/// `loopback_only` decides whether only loopback peers are let in.
#[derive(Clone)]
pub struct TokenGuard {
    expected: Option<Secret>,
    loopback_only_without_token: bool,
    service: &'static str,
}

impl TokenGuard {
    pub fn new(
        expected: Option<Secret>,
        loopback_only_without_token: bool,
        service: &'static str,
    ) -> Self {
        TokenGuard {
            expected,
            loopback_only_without_token,
            service,
        }
    }

    pub fn check<T>(&self, request: Request<T>) -> Result<Request<T>, Status> {
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
        let guard = TokenGuard::new(Some(Secret("0123456789abcdef".into())), true, "admin");
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
        let guard = TokenGuard::new(None, true, "admin");
        // No peer address known: refused.
        assert_eq!(
            guard.check(Request::new(())).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        let open = TokenGuard::new(None, false, "agent");
        assert!(open.check(Request::new(())).is_ok());
    }
}
