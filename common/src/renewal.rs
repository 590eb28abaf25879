//! Files that may be replaced while a program runs (renewed TLS certificates): what they look
//! like now, to tell a replacement; a value built from them and built again when they change
//! (keeping the previous one while the new files do not build: a renewal half written); and a
//! loop that looks again at an interval.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// A value built from files, built again when they change.
pub struct Renewable<T> {
    paths: Vec<PathBuf>,
    current: RwLock<(FileStamps, T)>,
    /// The files as they were when they last failed to build: said once, not at every look.
    refused: Mutex<Option<FileStamps>>,
}

impl<T> Renewable<T> {
    /// Builds the value now: an error here is an error at start.
    pub fn new(
        paths: Vec<PathBuf>,
        build: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<Self> {
        let stamps = FileStamps::of(paths.iter().map(PathBuf::as_path));
        let value = build()?;
        Ok(Renewable {
            paths,
            current: RwLock::new((stamps, value)),
            refused: Mutex::new(None),
        })
    }

    /// Reads the value in use.
    pub fn with<R>(&self, read: impl FnOnce(&T) -> R) -> R {
        let current = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        read(&current.1)
    }

    /// Builds the value again when a file changed since the last build; a build that fails is
    /// logged, the previous value kept, and tried again at the next call. Whether it renewed.
    pub fn renew_if_changed(&self, build: impl FnOnce() -> anyhow::Result<T>) -> bool {
        let now = FileStamps::of(self.paths.iter().map(PathBuf::as_path));
        let unchanged = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0
            == now;
        if unchanged {
            return false;
        }
        match build() {
            Ok(value) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = (now, value);
                *self
                    .refused
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
                tracing::info!("TLS files changed: new connections use them");
                true
            }
            Err(error) => {
                if self.first_refusal(now) {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "TLS files changed but cannot be used; keeping the previous ones (said \
                         again when they change)"
                    );
                } else {
                    tracing::debug!(
                        error = format!("{error:#}"),
                        "TLS files still cannot be used"
                    );
                }
                false
            }
        }
    }

    /// Whether these files failed to build for the first time (not as they were at the last
    /// failure).
    fn first_refusal(&self, stamps: FileStamps) -> bool {
        let mut refused = self
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if refused.as_ref() == Some(&stamps) {
            return false;
        }
        *refused = Some(stamps);
        true
    }

    /// Whether it is built from any file at all.
    pub fn has_files(&self) -> bool {
        !self.paths.is_empty()
    }
}

/// Each file's modification time and size, or `None` when it cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamps(Vec<Option<(SystemTime, u64)>>);

impl FileStamps {
    pub fn of<'a>(paths: impl IntoIterator<Item = &'a Path>) -> FileStamps {
        FileStamps(
            paths
                .into_iter()
                .map(|path| {
                    std::fs::metadata(path)
                        .ok()
                        .and_then(|meta| Some((meta.modified().ok()?, meta.len())))
                })
                .collect(),
        )
    }
}

/// Calls `check` every `every` (the first time one interval from now) until `stop` completes.
pub async fn check_every(every: Duration, stop: impl Future<Output = ()>, mut check: impl FnMut()) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticks.tick() => check(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_built_again_when_its_files_change_and_build() {
        let dir = std::env::temp_dir().join(format!("tsbroker-renew-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cert.pem");
        let read = || -> anyhow::Result<String> {
            let text = std::fs::read_to_string(&file)?;
            anyhow::ensure!(text.ends_with('\n'), "half written");
            Ok(text)
        };
        std::fs::write(&file, "first\n").unwrap();
        let value = Renewable::new(vec![file.clone()], read).unwrap();
        assert!(value.has_files());
        assert!(!value.renew_if_changed(read), "nothing changed");
        std::fs::write(&file, "second, half").unwrap();
        assert!(!value.renew_if_changed(read));
        assert_eq!(value.with(String::clone), "first\n");
        // Said once: the same broken files at the next look are not news.
        let broken = FileStamps::of([file.as_path()]);
        assert!(!value.first_refusal(broken.clone()));
        assert!(!value.renew_if_changed(read));
        std::fs::write(&file, "second, whole\n").unwrap();
        assert!(value.renew_if_changed(read));
        assert_eq!(value.with(String::clone), "second, whole\n");
        assert!(!value.renew_if_changed(read));
        // Once renewed, the same broken state is news again.
        assert!(value.first_refusal(broken));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_replaced_or_removed_file_changes_the_stamps() {
        let dir = std::env::temp_dir().join(format!("tsbroker-stamps-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cert.pem");
        std::fs::write(&file, "one").unwrap();
        let before = FileStamps::of([file.as_path()]);
        assert_eq!(before, FileStamps::of([file.as_path()]));
        std::fs::write(&file, "three").unwrap();
        let replaced = FileStamps::of([file.as_path()]);
        assert_ne!(before, replaced);
        std::fs::remove_file(&file).unwrap();
        assert_ne!(replaced, FileStamps::of([file.as_path()]));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
