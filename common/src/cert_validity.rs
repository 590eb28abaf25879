//! A program's own certificate (`--tls-cert`) checked against the clock when it is loaded: one
//! that has expired or is not valid yet is refused by every peer, while the program itself
//! would look healthy, so it is said at once (and one that expires soon, ahead of time).

use std::path::Path;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use x509_cert::der::Decode;

/// How far ahead an approaching end is said.
pub const EXPIRY_NOTICE: Duration = Duration::from_secs(14 * 24 * 3600);

/// Where a certificate stands against the clock.
#[derive(Debug, PartialEq, Eq)]
pub enum Standing {
    Valid { not_after: SystemTime },
    ExpiresSoon { not_after: SystemTime },
    Expired { not_after: SystemTime },
    NotYetValid { not_before: SystemTime },
}

impl Standing {
    /// Whether peers refuse the certificate now.
    pub fn refused(&self) -> bool {
        matches!(
            self,
            Standing::Expired { .. } | Standing::NotYetValid { .. }
        )
    }

    /// What to tell the operator about `setting`'s file at `path`; `None` when all is well.
    pub fn problem(&self, setting: &str, path: &Path, now: SystemTime) -> Option<String> {
        let file = format!("{setting} {}", path.display());
        match *self {
            Standing::Valid { .. } => None,
            Standing::ExpiresSoon { not_after } => Some(format!(
                "{file}: the certificate expires at {} (in {}): renew it (renewed files are \
                 taken up without a restart)",
                rfc3339(not_after),
                days(not_after.duration_since(now).unwrap_or_default())
            )),
            Standing::Expired { not_after } => Some(format!(
                "{file}: the certificate expired at {} ({} ago): peers refuse it; renew it \
                 (renewed files are taken up without a restart)",
                rfc3339(not_after),
                days(now.duration_since(not_after).unwrap_or_default())
            )),
            Standing::NotYetValid { not_before } => Some(format!(
                "{file}: the certificate is not valid before {}: peers refuse it until then \
                 (is this machine's clock right?)",
                rfc3339(not_before)
            )),
        }
    }
}

/// Where `certificate` stands at `now`; `None` when its DER cannot be read (rustls, which
/// loaded it, is the judge of that).
pub fn standing(certificate: &CertificateDer<'_>, now: SystemTime) -> Option<Standing> {
    let parsed = x509_cert::Certificate::from_der(certificate.as_ref()).ok()?;
    let validity = parsed.tbs_certificate().validity();
    let not_before = validity.not_before.to_system_time();
    let not_after = validity.not_after.to_system_time();
    Some(if now < not_before {
        Standing::NotYetValid { not_before }
    } else if now > not_after {
        Standing::Expired { not_after }
    } else if not_after.duration_since(now).unwrap_or_default() <= EXPIRY_NOTICE {
        Standing::ExpiresSoon { not_after }
    } else {
        Standing::Valid { not_after }
    })
}

/// Logs where the first certificate of `chain` (the program's own) stands, now: an error when
/// peers refuse it, a warning when it expires within [`EXPIRY_NOTICE`]. Returns the standing.
pub fn say_standing(chain: &[CertificateDer<'_>], setting: &str, path: &Path) -> Option<Standing> {
    let now = SystemTime::now();
    let standing = standing(chain.first()?, now)?;
    if let Some(problem) = standing.problem(setting, path, now) {
        if standing.refused() {
            tracing::error!("{problem}");
        } else {
            tracing::warn!("{problem}");
        }
    }
    Some(standing)
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn days(span: Duration) -> String {
    let hours = span.as_secs() / 3600;
    match hours {
        0..48 => format!("{hours} h"),
        _ => format!("{} days", hours / 24),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    /// common/testdata/README.md says what it is: valid from 2020-01-01 to 2099-12-31.
    const CERTIFICATE: &[u8] = include_bytes!("../testdata/valid-2020-to-2099.pem");

    fn at(rfc3339: &str) -> SystemTime {
        humantime::parse_rfc3339(rfc3339).unwrap()
    }

    #[test]
    fn a_certificate_is_judged_by_its_validity_period() {
        let certificate = CertificateDer::from_pem_slice(CERTIFICATE).unwrap();
        let not_before = at("2020-01-01T00:00:00Z");
        let not_after = at("2099-12-31T00:00:00Z");
        let cases = [
            ("2019-12-31T23:59:59Z", Standing::NotYetValid { not_before }),
            ("2026-12-07T00:00:00Z", Standing::Valid { not_after }),
            ("2099-12-20T00:00:00Z", Standing::ExpiresSoon { not_after }),
            ("2100-01-02T00:00:00Z", Standing::Expired { not_after }),
        ];
        for (now, expected) in cases {
            assert_eq!(standing(&certificate, at(now)), Some(expected), "{now}");
        }
        assert_eq!(
            standing(
                &CertificateDer::from(vec![1, 2, 3]),
                at("2026-12-07T00:00:00Z")
            ),
            None
        );
    }

    #[test]
    fn the_problem_names_the_file_the_date_and_what_to_do() {
        let path = Path::new("/etc/tsbroker/broker.pem");
        let not_after = at("2099-12-31T00:00:00Z");
        let expired = Standing::Expired { not_after }
            .problem("--tls-cert", path, at("2100-01-10T00:00:00Z"))
            .unwrap();
        assert_eq!(
            expired,
            "--tls-cert /etc/tsbroker/broker.pem: the certificate expired at \
             2099-12-31T00:00:00Z (10 days ago): peers refuse it; renew it (renewed files are \
             taken up without a restart)"
        );
        let soon = Standing::ExpiresSoon { not_after }
            .problem("--tls-cert", path, at("2099-12-30T12:00:00Z"))
            .unwrap();
        assert!(
            soon.contains("expires at 2099-12-31T00:00:00Z (in 12 h)"),
            "{soon}"
        );
        let early = Standing::NotYetValid {
            not_before: at("2020-01-01T00:00:00Z"),
        }
        .problem("--tls-cert", path, at("2019-01-01T00:00:00Z"))
        .unwrap();
        assert!(early.contains("clock"), "{early}");
        assert_eq!(
            Standing::Valid { not_after }.problem("--tls-cert", path, at("2026-12-07T00:00:00Z")),
            None
        );
    }
}
