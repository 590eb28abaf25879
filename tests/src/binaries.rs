//! Paths to the workspace's binaries (built by `cargo test --workspace`) and to outside tools.

use std::path::PathBuf;

/// `target/<profile>/<name>`, next to the test executable's `deps/` folder.
pub fn workspace_binary(name: &str) -> PathBuf {
    let test_executable = std::env::current_exe().expect("test executable path");
    let profile_dir = test_executable
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// An outside tool on PATH; the test fails (never skips) when it is missing.
pub fn tool(name: &str, how_to_get_it: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not on PATH: {how_to_get_it} (scripts/test.sh installs it)")
        })
}
