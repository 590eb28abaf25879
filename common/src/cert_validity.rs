//! A program's own certificate (`--tls-cert`) checked against the clock when it is loaded and
//! again while the program runs: one that has expired or is not valid yet is refused by every
//! peer, while the program itself would look healthy, so it is said at once (and one that
//! expires soon, ahead of time, when that time comes in a process that runs for months).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use x509_cert::der::Decode;

/// How far ahead an approaching end is said.
pub const EXPIRY_NOTICE: Duration = Duration::from_secs(14 * 24 * 3600);
/// How often a standing that is a problem is said again while it lasts.
pub const REMINDER_EVERY: Duration = Duration::from_secs(24 * 3600);

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

/// A certificate's validity period.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Validity {
    /// `certificate`'s period; `None` when its DER cannot be read (rustls, which loaded it, is
    /// the judge of that).
    pub fn of(certificate: &CertificateDer<'_>) -> Option<Validity> {
        let parsed = x509_cert::Certificate::from_der(certificate.as_ref()).ok()?;
        let validity = parsed.tbs_certificate().validity();
        Some(Validity {
            not_before: validity.not_before.to_system_time(),
            not_after: validity.not_after.to_system_time(),
        })
    }

    /// Where a certificate of this period stands at `now`.
    pub fn at(&self, now: SystemTime) -> Standing {
        let Validity {
            not_before,
            not_after,
        } = *self;
        if now < not_before {
            Standing::NotYetValid { not_before }
        } else if now > not_after {
            Standing::Expired { not_after }
        } else if not_after.duration_since(now).unwrap_or_default() <= EXPIRY_NOTICE {
            Standing::ExpiresSoon { not_after }
        } else {
            Standing::Valid { not_after }
        }
    }
}

/// Where `certificate` stands at `now`; `None` when its DER cannot be read.
pub fn standing(certificate: &CertificateDer<'_>, now: SystemTime) -> Option<Standing> {
    Some(Validity::of(certificate)?.at(now))
}

/// Says where a program's own certificate stands: when it is loaded (at start, at each
/// renewal), then, looked at again while the program runs, each time its standing changes (it
/// comes within [`EXPIRY_NOTICE`] of its end, it expires, it becomes valid) and every
/// [`REMINDER_EVERY`] while it is a problem. An error when peers refuse it, else a warning.
pub struct Reminder {
    setting: &'static str,
    loaded: Mutex<Option<Loaded>>,
}

struct Loaded {
    validity: Validity,
    path: PathBuf,
    /// The standing last said (or found fine) and when.
    said: (std::mem::Discriminant<Standing>, SystemTime),
}

impl Reminder {
    /// For the certificate of `setting` (`--tls-cert`).
    pub fn new(setting: &'static str) -> Reminder {
        Reminder {
            setting,
            loaded: Mutex::new(None),
        }
    }

    /// The first certificate of `chain` (the program's own), read from `path`, is the one in
    /// use from now on: its standing is said now. Returns it.
    pub fn loaded(&self, chain: &[CertificateDer<'_>], path: &Path) -> Option<Standing> {
        self.loaded_at(chain, path, SystemTime::now())
    }

    fn loaded_at(
        &self,
        chain: &[CertificateDer<'_>],
        path: &Path,
        now: SystemTime,
    ) -> Option<Standing> {
        let validity = Validity::of(chain.first()?)?;
        let standing = validity.at(now);
        self.say(&standing, path, now);
        *self.lock() = Some(Loaded {
            validity,
            path: path.to_owned(),
            said: (std::mem::discriminant(&standing), now),
        });
        Some(standing)
    }

    /// Looks at the certificate in use against the clock at `now`, and says its standing when
    /// it is due (see the type). What it said, if anything.
    pub fn look_again(&self, now: SystemTime) -> Option<String> {
        let mut loaded = self.lock();
        let loaded = loaded.as_mut()?;
        let standing = loaded.validity.at(now);
        let (kind, at) = loaded.said;
        let changed = std::mem::discriminant(&standing) != kind;
        let reminder_due = now.duration_since(at).unwrap_or_default() >= REMINDER_EVERY;
        let words = match standing.problem(self.setting, &loaded.path, now) {
            Some(problem) if changed || reminder_due => problem,
            None if changed => format!(
                "{} {}: the certificate is valid now",
                self.setting,
                loaded.path.display()
            ),
            _ => return None,
        };
        loaded.said = (std::mem::discriminant(&standing), now);
        say_at_level(&standing, &words);
        Some(words)
    }

    fn say(&self, standing: &Standing, path: &Path, now: SystemTime) {
        if let Some(problem) = standing.problem(self.setting, path, now) {
            say_at_level(standing, &problem);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Loaded>> {
        self.loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An error when peers refuse the certificate, a warning when it expires soon, else news.
fn say_at_level(standing: &Standing, words: &str) {
    match standing {
        Standing::Expired { .. } | Standing::NotYetValid { .. } => tracing::error!("{words}"),
        Standing::ExpiresSoon { .. } => tracing::warn!("{words}"),
        Standing::Valid { .. } => tracing::info!("{words}"),
    }
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
    fn a_running_program_is_told_as_its_certificate_nears_its_end_and_daily_after() {
        let certificate = CertificateDer::from_pem_slice(CERTIFICATE).unwrap();
        let path = Path::new("/etc/tsagent/agent.pem");
        let reminder = Reminder::new("--tls-cert");
        assert_eq!(
            reminder.look_again(at("2099-01-01T00:00:00Z")),
            None,
            "nothing loaded"
        );
        let loaded = reminder.loaded_at(
            std::slice::from_ref(&certificate),
            path,
            at("2099-11-01T00:00:00Z"),
        );
        assert!(matches!(loaded, Some(Standing::Valid { .. })));
        // Valid for months: nothing to say, however often it is looked at.
        assert_eq!(reminder.look_again(at("2099-11-02T00:00:00Z")), None);
        assert_eq!(reminder.look_again(at("2099-12-16T23:00:00Z")), None);
        // Fourteen days before its end: said once, then again a day later.
        let soon = reminder.look_again(at("2099-12-17T00:00:10Z")).unwrap();
        assert!(soon.contains("/etc/tsagent/agent.pem"), "{soon}");
        assert!(
            soon.contains("expires at 2099-12-31T00:00:00Z (in 13 days)"),
            "{soon}"
        );
        assert_eq!(reminder.look_again(at("2099-12-17T00:00:40Z")), None);
        assert_eq!(reminder.look_again(at("2099-12-17T23:00:00Z")), None);
        let next_day = reminder.look_again(at("2099-12-18T00:00:10Z")).unwrap();
        assert!(next_day.contains("(in 12 days)"), "{next_day}");
        // Its end: said at once, not a day after the last warning.
        let expired = reminder.look_again(at("2099-12-31T00:00:30Z")).unwrap();
        assert!(
            expired.contains("expired at 2099-12-31T00:00:00Z"),
            "{expired}"
        );
        assert_eq!(reminder.look_again(at("2099-12-31T12:00:00Z")), None);
        assert!(reminder.look_again(at("2100-01-01T00:00:30Z")).is_some());
        // A renewal loaded in time says nothing, and the reminders stop.
        reminder.loaded_at(
            std::slice::from_ref(&certificate),
            path,
            at("2099-06-01T00:00:00Z"),
        );
        assert_eq!(reminder.look_again(at("2099-06-02T00:00:00Z")), None);
        // A certificate not valid yet (a clock set back) is said to be valid when it is.
        let early = Reminder::new("--tls-cert");
        early.loaded_at(
            std::slice::from_ref(&certificate),
            path,
            at("2019-12-31T23:00:00Z"),
        );
        let valid = early.look_again(at("2020-01-01T00:00:10Z")).unwrap();
        assert!(valid.ends_with("the certificate is valid now"), "{valid}");
        assert_eq!(early.look_again(at("2020-01-03T00:00:10Z")), None);
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
