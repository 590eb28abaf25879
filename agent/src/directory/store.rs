//! The session table on disk: one JSON file in the state directory, replaced atomically
//! (`state_file::write_atomically`).

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::SessionRecord;

const FILE_NAME: &str = "sessions.json";
const FORMAT: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct StoredTable {
    pub format: u32,
    /// The machine whose sessions these are (`farm/name`); absent in a file of an agent from
    /// before it was written, or of one not told its machine (tests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    pub next_session_id: u32,
    pub sessions: Vec<SessionRecord>,
}

/// The file as read: its records one by one, so that one bad record costs only itself.
#[derive(Deserialize)]
struct RawTable {
    format: u32,
    #[serde(default)]
    machine: Option<String>,
    next_session_id: u32,
    sessions: Vec<serde_json::Value>,
}

/// Reads and writes the table file of one state directory.
#[derive(Debug)]
pub(super) struct TableFile {
    path: PathBuf,
    /// This agent's machine (`farm/name`), written into the file and checked against it.
    machine: Option<String>,
    /// The state directory's lock, and which directory it is on (device, inode): a directory
    /// removed and made again under the running agent is another one, not locked.
    dir_lock: std::sync::Mutex<Option<(std::fs::File, (u64, u64))>>,
}

/// A directory's device and inode.
fn identity(metadata: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (metadata.dev(), metadata.ino())
}

impl TableFile {
    /// Creates the state directory if needed.
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .with_context(|| format!("create state directory {}", state_dir.display()))?;
        Ok(TableFile {
            path: state_dir.join(FILE_NAME),
            machine: None,
            dir_lock: std::sync::Mutex::new(None),
        })
    }

    /// Of machine `machine` (`farm/name`): a file another machine's agent wrote is refused.
    pub fn of_machine(mut self, machine: Option<String>) -> Self {
        self.machine = machine;
        self
    }

    /// Locks the state directory (`flock`, held as long as this file is): a second agent on
    /// the same directory would report the first one's sessions as its own, and each would
    /// overwrite the other's table. The directory itself is locked, which needs nothing written
    /// into it (a full or read-only state directory still starts, and says so when it is
    /// written to). A file system without `flock` is warned about, not refused.
    pub fn lock_directory(&self) -> anyhow::Result<()> {
        let state_dir = self.path.parent().unwrap_or(Path::new("."));
        let directory = std::fs::File::open(state_dir)
            .with_context(|| format!("open state directory {}", state_dir.display()))?;
        match directory.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "state directory {} is in use by another tsagent: give each agent its own \
                 --state-dir",
                state_dir.display()
            ),
            Err(std::fs::TryLockError::Error(error)) => {
                tracing::warn!(
                    path = %state_dir.display(),
                    %error,
                    "the state directory cannot be locked: make sure no other tsagent uses it"
                );
                return Ok(());
            }
        }
        let held = directory
            .metadata()
            .ok()
            .map(|metadata| (directory, identity(&metadata)));
        *self.lock_state() = held;
        Ok(())
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, Option<(std::fs::File, (u64, u64))>> {
        self.dir_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Before a write: the state directory is still the one this agent locked. One removed and
    /// made again (by hand, a cleanup) is locked in turn; if another agent holds it already
    /// (started there meanwhile), this agent does not write its table over that one's.
    fn still_ours(&self) -> anyhow::Result<()> {
        let mut held = self.lock_state();
        let Some((_, locked)) = held.as_ref() else {
            return Ok(());
        };
        let state_dir = self.path.parent().unwrap_or(Path::new("."));
        // One stat a write; the directory is opened only when it is another one.
        match std::fs::metadata(state_dir) {
            Ok(metadata) if identity(&metadata) == *locked => return Ok(()),
            Ok(_) => {}
            // Gone: the write fails and says so.
            Err(_) => return Ok(()),
        }
        let Ok(directory) = std::fs::File::open(state_dir) else {
            return Ok(());
        };
        let Ok(metadata) = directory.metadata() else {
            return Ok(());
        };
        let now = identity(&metadata);
        match directory.try_lock() {
            Ok(()) => {
                tracing::warn!(path = %state_dir.display(), "the state directory was removed and made again: this agent locked the new one");
                *held = Some((directory, now));
                Ok(())
            }
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "the state directory {} was removed and made again, and another tsagent uses \
                 the new one: this agent does not write its table over that one's (stop one of \
                 them; give each agent its own --state-dir)",
                state_dir.display()
            ),
            Err(std::fs::TryLockError::Error(_)) => Ok(()),
        }
    }

    /// Whether a table can be written now: a few bytes in the temporary file, removed again.
    pub fn check_writable(&self) -> anyhow::Result<()> {
        let temporary = self.path.with_extension("json.tmp");
        let written = std::fs::File::create(&temporary).and_then(|mut file| file.write_all(b"{}"));
        let _ = std::fs::remove_file(&temporary);
        written.with_context(|| format!("write {}", temporary.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored table; an empty one when there is no file yet. A file that cannot be read
    /// as a table (not JSON, not UTF-8) is moved aside (so the agent still starts) and
    /// reported in the log; a record that cannot be read (a state a newer agent wrote, a field
    /// edited by hand) is left out and reported, and the others are kept. A file of another
    /// format is an error: this agent does not guess at what it holds.
    pub fn load(&self) -> anyhow::Result<StoredTable> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(StoredTable::default());
            }
            Err(error) => {
                return Err(error).with_context(|| format!("read {}", self.path.display()));
            }
        };
        let raw = match serde_json::from_slice::<RawTable>(&bytes) {
            Ok(raw) => raw,
            Err(error) => return self.move_aside(&error),
        };
        if let (Some(theirs), Some(ours)) = (&raw.machine, &self.machine)
            && !theirs.eq_ignore_ascii_case(ours)
        {
            anyhow::bail!(
                "{} holds the sessions of machine {theirs}, not of this one ({ours}): give each \
                 agent its own --state-dir (or move the file aside to start this machine with an \
                 empty table)",
                self.path.display()
            );
        }
        if raw.format != FORMAT {
            anyhow::bail!(
                "{} has format {}, this agent reads format {FORMAT} (written by a newer agent? \
                 move it aside to start with an empty table)",
                self.path.display(),
                raw.format
            );
        }
        let mut sessions = Vec::with_capacity(raw.sessions.len());
        for (index, record) in raw.sessions.into_iter().enumerate() {
            match serde_json::from_value::<SessionRecord>(record) {
                Ok(record) => sessions.push(record),
                Err(error) => tracing::error!(
                    path = %self.path.display(),
                    index,
                    %error,
                    "a session in the table file cannot be read: left out"
                ),
            }
        }
        Ok(StoredTable {
            format: raw.format,
            machine: raw.machine,
            next_session_id: raw.next_session_id,
            sessions,
        })
    }

    fn move_aside(&self, error: &dyn std::fmt::Display) -> anyhow::Result<StoredTable> {
        let aside = self.path.with_extension(format!(
            "json.corrupt-{}",
            tsbroker_common::model::now_millis()
        ));
        tracing::error!(
            path = %self.path.display(),
            moved_to = %aside.display(),
            %error,
            "session table unreadable, starting with an empty one: the broker will count this \
             machine's sessions as ended (put a good copy back, from a backup, and restart the \
             agent to tell it of them again)"
        );
        std::fs::rename(&self.path, &aside)
            .with_context(|| format!("move aside {}", self.path.display()))?;
        Ok(StoredTable::default())
    }

    /// Replaces the file with `table`, atomically.
    pub fn save(&self, next_session_id: u32, sessions: Vec<SessionRecord>) -> anyhow::Result<()> {
        let table = StoredTable {
            format: FORMAT,
            machine: self.machine.clone(),
            next_session_id,
            sessions,
        };
        let bytes = serde_json::to_vec_pretty(&table).context("encode session table")?;
        self.still_ours()?;
        crate::state_file::write_atomically(&self.path, &bytes)?;
        Ok(())
    }
}
