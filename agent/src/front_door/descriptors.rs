//! How many client connections the front door can hold at once with the process's open-files
//! limit: each takes two descriptors (the client's and the target's), and some are kept for
//! everything else (the broker's connection, the control socket, the session table, metrics).

/// Descriptors kept for everything but the front door's connections.
const RESERVED: u64 = 64;

/// `wanted`, lowered to what the open-files limit allows (warned about when it is). The soft
/// limit is raised first to what `wanted` needs, within the hard one (a shell's or a
/// container's default soft limit, often 1024, would hold the front door to 480 connections).
pub fn connections_allowed(wanted: usize) -> usize {
    let needed = (wanted as u64).saturating_mul(2).saturating_add(RESERVED);
    match rlimit::increase_nofile_limit(needed) {
        Ok(now) => tracing::debug!(open_files_limit = now, "open-files soft limit raised"),
        Err(error) => tracing::debug!(%error, "the open-files soft limit could not be raised"),
    }
    match soft_limit() {
        Some(limit) => {
            let allowed = allowed_by(limit, wanted);
            if allowed < wanted {
                tracing::warn!(
                    open_files_limit = limit,
                    max_connections = wanted,
                    allowed,
                    "the open-files limit holds the front door to fewer connections than max_connections (raise the hard limit: LimitNOFILE= in the unit, `ulimit -Hn`, a container's --ulimit nofile)"
                );
            }
            allowed
        }
        None => wanted,
    }
}

fn allowed_by(limit: u64, wanted: usize) -> usize {
    let allowed = (limit.saturating_sub(RESERVED) / 2).max(1);
    usize::try_from(allowed).map_or(wanted, |allowed| allowed.min(wanted))
}

/// The open-files soft limit now; `None` when unlimited or not readable.
fn soft_limit() -> Option<u64> {
    let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).ok()?;
    (soft != rlimit::INFINITY).then_some(soft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_leaves_room_for_the_rest() {
        assert_eq!(allowed_by(1024, 10_000), 480);
        assert_eq!(allowed_by(65_536, 10_000), 10_000);
        assert_eq!(allowed_by(10, 10_000), 1);
    }

    #[test]
    fn this_process_has_a_limit_to_read() {
        assert!(soft_limit().is_some_and(|limit| limit > 0));
    }
}
