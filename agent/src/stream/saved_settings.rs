//! The machine's settings as the broker last sent them (draining, weight, session limit),
//! kept in the state directory (`settings.json`). An agent that starts while no broker
//! answers — restarted or upgraded during maintenance, its server rebooted, with the broker
//! away too — keeps a drained machine drained, as the front door's rules for an absent broker
//! promise, instead of taking new logons until the broker is back. The broker's word replaces
//! them as soon as a stream is up.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tsbroker_common::proto::v1 as pb;

const FILE_NAME: &str = "settings.json";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    format: u32,
    /// The machine they are the settings of (`farm/name`): a copied state directory does not
    /// pass one server's drain to another.
    machine: String,
    draining: bool,
    weight: u32,
    session_limit: u32,
}

/// The settings file of one state directory.
#[derive(Debug)]
pub struct SettingsFile {
    path: PathBuf,
    machine: String,
    /// What the file holds, as far as this agent knows (written only when it changes).
    written: Mutex<Option<Stored>>,
}

impl SettingsFile {
    /// The file of `state_dir`, for machine `machine` (`farm/name`).
    pub fn new(state_dir: &Path, machine: String) -> Self {
        SettingsFile {
            path: state_dir.join(FILE_NAME),
            machine,
            written: Mutex::new(None),
        }
    }

    /// The settings last saved; `None` when there are none (a new state directory). A file
    /// that cannot be read is reported and taken as none: the broker's word comes with the
    /// first stream.
    pub fn load(&self) -> Option<pb::MachineSettings> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "saved machine settings unreadable: none until the broker sends them");
                return None;
            }
        };
        let stored = match serde_json::from_slice::<Stored>(&bytes) {
            Ok(stored)
                if stored.format == FORMAT
                    && stored.machine.eq_ignore_ascii_case(&self.machine) =>
            {
                stored
            }
            Ok(stored) if stored.format == FORMAT => {
                tracing::warn!(path = %self.path.display(), of = %stored.machine, "saved machine settings of another machine: none until the broker sends them");
                return None;
            }
            Ok(stored) => {
                tracing::warn!(path = %self.path.display(), format = stored.format, "saved machine settings of another format: none until the broker sends them");
                return None;
            }
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "saved machine settings unreadable: none until the broker sends them");
                return None;
            }
        };
        let settings = pb::MachineSettings {
            draining: stored.draining,
            weight: stored.weight,
            session_limit: stored.session_limit,
        };
        *self.lock() = Some(stored);
        Some(settings)
    }

    /// Saves `settings` when they differ from what the file holds. A failed write is logged
    /// (the settings stand in memory) and tried again with the next settings the broker sends.
    pub fn save(&self, settings: &pb::MachineSettings) {
        let stored = Stored {
            format: FORMAT,
            machine: self.machine.clone(),
            draining: settings.draining,
            weight: settings.weight,
            session_limit: settings.session_limit,
        };
        let mut written = self.lock();
        if written.as_ref() == Some(&stored) {
            return;
        }
        let saved = serde_json::to_vec_pretty(&stored)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| crate::state_file::write_atomically(&self.path, &bytes));
        match saved {
            Ok(()) => *written = Some(stored),
            Err(error) => {
                *written = None;
                tracing::warn!(
                    error = format!("{error:#}"),
                    "the machine's settings could not be saved: an agent started while no broker answers will not know them"
                );
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Stored>> {
        self.written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(draining: bool) -> pb::MachineSettings {
        pb::MachineSettings {
            draining,
            weight: 250,
            session_limit: 12,
        }
    }

    #[test]
    fn settings_outlive_the_agent() {
        let directory = tempfile::tempdir().unwrap();
        let file = || SettingsFile::new(directory.path(), "f/ts1".into());
        assert_eq!(file().load(), None);
        file().save(&settings(true));
        let saved = file();
        assert_eq!(saved.load(), Some(settings(true)));
        saved.save(&settings(false));
        assert_eq!(file().load(), Some(settings(false)));
        // Another machine's agent on a copy of the directory does not take them.
        assert_eq!(
            SettingsFile::new(directory.path(), "f/ts2".into()).load(),
            None
        );
        assert_eq!(
            SettingsFile::new(directory.path(), "F/TS1".into()).load(),
            Some(settings(false))
        );
    }

    #[test]
    fn an_unreadable_file_is_no_settings() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join(FILE_NAME);
        for bad in [
            &b"not json"[..],
            br#"{"format": 2, "machine": "f/ts1", "draining": true, "weight": 1, "session_limit": 0}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!(
                SettingsFile::new(directory.path(), "f/ts1".into()).load(),
                None
            );
        }
        // The next settings the broker sends replace it.
        let file = SettingsFile::new(directory.path(), "f/ts1".into());
        file.save(&settings(true));
        assert_eq!(file.load(), Some(settings(true)));
    }
}
