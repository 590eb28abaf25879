//! Files of the agent's state directory, each replaced atomically: a temporary file written
//! and synced, renamed over the old one, the directory synced. A crash leaves the old file or
//! the new one, never half of one. They hold users' names and clients' addresses: readable
//! by the agent's user only, whatever the umask.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

/// Replaces `path` with `bytes`, atomically (the temporary file is `path` with `.tmp` added
/// to its extension).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temporary = path.with_extension(match path.extension() {
        Some(extension) => format!("{}.tmp", extension.to_string_lossy()),
        None => "tmp".to_owned(),
    });
    // A leftover temporary file keeps its mode: set again.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|file| {
            file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            Ok(file)
        })
        .with_context(|| format!("create {}", temporary.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", temporary.display()))?;
    drop(file);
    std::fs::rename(&temporary, path)
        .with_context(|| format!("rename {} into place", temporary.display()))?;
    if let Some(parent) = path.parent()
        && let Ok(directory) = std::fs::File::open(parent)
    {
        // Makes the rename itself durable; not every file system allows it.
        let _ = directory.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_file_is_replaced_whole_and_private() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("table.json");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert!(!directory.path().join("table.json.tmp").exists());
    }
}
