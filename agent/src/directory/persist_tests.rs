//! Tests of the table's group commit: few writes for many changes, control events answered
//! only once on disk, the flush at stop, the restart, and a disk that fails.

use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::store::{StoredTable, TableFile};
use super::*;
use tsbroker_common::model::SessionEventKind::Logon;

fn logon(user: &str, session_id: u32) -> SessionRequest {
    SessionRequest {
        user_name: user.to_owned(),
        session_id: Some(session_id),
        ..Default::default()
    }
}

fn on_disk(dir: &Path) -> StoredTable {
    TableFile::open(dir).unwrap().load().unwrap()
}

fn on_disk_ids(dir: &Path) -> Vec<u32> {
    on_disk(dir)
        .sessions
        .iter()
        .map(|record| record.session_id)
        .collect()
}

/// Front-door connections from `threads` threads, `rounds` each: an attach and a detach per
/// round (two changes), every second connection left open. Returns the changes made.
fn front_door_churn(directory: &Directory, threads: usize, rounds: usize) -> usize {
    thread::scope(|scope| {
        for worker in 0..threads {
            let directory = directory.clone();
            scope.spawn(move || {
                for round in 0..rounds {
                    let user = format!("user{worker}x{}", round % 10);
                    let attached = directory.front_door_attach(&user, "", "").unwrap();
                    if round % 2 == 0 {
                        directory.front_door_detach(attached, Some(Duration::from_secs(60)));
                    }
                }
            });
        }
    });
    threads * rounds + threads * rounds.div_ceil(2)
}

#[test]
fn many_concurrent_changes_are_saved_in_few_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    // The writer is held (as if busy with a slow write) while the changes arrive: all of them
    // must then be covered by one write, the control-socket waiters included.
    directory.hold_writes(true);
    let waiters: Vec<_> = (0..4)
        .map(|index| {
            let directory = directory.clone();
            thread::spawn(move || directory.apply(Logon, logon(&format!("pam{index}"), index)))
        })
        .collect();
    let changes = front_door_churn(&directory, 8, 100) + waiters.len();
    while directory.list().iter().filter(|r| r.session_id < 4).count() < 4 {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(directory.writes(), 0);
    assert!(waiters.iter().all(|waiter| !waiter.is_finished()));
    directory.hold_writes(false);
    for waiter in waiters {
        waiter.join().unwrap().unwrap();
    }
    assert_eq!(
        directory.writes(),
        1,
        "{changes} changes and 4 waiters share one write"
    );
    assert_eq!(on_disk(dir.path()).sessions, directory.list());

    // Without holding the writer: still one write per change at most, and the same end.
    let more = front_door_churn(&directory, 8, 100);
    assert!(directory.flush());
    let writes = directory.writes() - 1;
    assert!(writes <= more as u64, "{writes} writes for {more} changes");
    assert_eq!(on_disk(dir.path()).sessions, directory.list());
}

#[test]
fn a_control_event_is_answered_only_once_it_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    // While the writer is held, the event is in the table but its caller still waits.
    directory.hold_writes(true);
    let (answered, answer) = std_mpsc::channel();
    let waiter = {
        let directory = directory.clone();
        let path = dir.path().to_owned();
        thread::spawn(move || {
            let result = directory.apply(Logon, logon("alice", 10));
            answered.send(on_disk_ids(&path)).unwrap();
            result
        })
    };
    while directory.list().is_empty() {
        thread::sleep(Duration::from_millis(5));
    }
    assert!(answer.recv_timeout(Duration::from_millis(200)).is_err());
    assert!(on_disk_ids(dir.path()).is_empty());
    directory.hold_writes(false);
    assert_eq!(answer.recv().unwrap(), vec![10]);
    waiter.join().unwrap().unwrap();

    // With front-door changes keeping the writer busy: every answer finds its logon on disk.
    thread::scope(|scope| {
        let churn = scope.spawn(|| front_door_churn(&directory, 2, 200));
        for session_id in 20..40 {
            directory
                .apply(Logon, logon(&format!("pam{session_id}"), session_id))
                .unwrap();
            assert!(on_disk_ids(dir.path()).contains(&session_id));
        }
        churn.join().unwrap();
    });
}

#[test]
fn changes_nobody_waits_for_are_written_once_per_interval_and_a_waiter_is_not_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let interval = Duration::from_secs(30);
    let pacing = persist::Pacing {
        unwaited_interval: interval,
    };
    let (directory, _events) = Directory::open_paced(dir.path(), None, pacing).unwrap();
    // The first change is written at once (no write to space it from).
    directory.front_door_attach("first", "", "").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while directory.writes() == 0 {
        assert!(
            Instant::now() < deadline,
            "the first change was not written"
        );
        thread::sleep(Duration::from_millis(5));
    }
    // A stream of front-door connections: nothing more is written within the interval.
    let changes = front_door_churn(&directory, 4, 100);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(directory.writes(), 1, "{changes} unwaited changes");
    assert_eq!(on_disk(dir.path()).sessions.len(), 1);

    // A control event does not wait for the interval; its write covers the churn too.
    let started = Instant::now();
    directory.apply(Logon, logon("alice", 10)).unwrap();
    assert!(started.elapsed() < interval / 2, "the waiter was held back");
    assert_eq!(directory.writes(), 2);
    assert_eq!(on_disk(dir.path()).sessions, directory.list());

    // Nor does a flush, nor the stop.
    directory.front_door_attach("second", "", "").unwrap();
    let started = Instant::now();
    assert!(directory.flush());
    assert!(started.elapsed() < interval / 2, "the flush was held back");
    assert_eq!(on_disk(dir.path()).sessions, directory.list());
    directory.front_door_attach("third", "", "").unwrap();
    let in_memory = directory.list();
    let started = Instant::now();
    drop(directory);
    assert!(started.elapsed() < interval / 2, "the stop was held back");
    assert_eq!(on_disk(dir.path()).sessions, in_memory);
}

/// The table names users and their clients' addresses: readable by the agent's user only,
/// whatever the umask, in a state directory of its own when the agent makes it.
#[test]
fn the_table_and_a_state_directory_the_agent_makes_are_its_users_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("made").join("by-the-agent");
    // A leftover temporary file from a crash, readable by all.
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let leftover = state.join("sessions.json.tmp");
    std::fs::write(&leftover, "{}").unwrap();
    std::fs::set_permissions(&leftover, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (directory, _events) = Directory::open(&state).unwrap();
    directory.apply(Logon, logon("alice", 10)).unwrap();
    assert!(directory.flush());
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state.join("sessions.json")), 0o600);
    // A directory it made itself is its own; one that was there keeps its mode.
    let fresh = dir.path().join("fresh");
    drop(Directory::open(&fresh).unwrap());
    assert_eq!(mode(&fresh), 0o700);
    assert_eq!(mode(&state), 0o755);
}

#[test]
fn the_table_on_disk_after_a_stop_equals_the_one_in_memory_and_a_restart_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    directory.apply(Logon, logon("alice", 10)).unwrap();
    front_door_churn(&directory, 4, 50);
    // The agent's stop: flush, then the last handle goes.
    assert!(directory.flush());
    let stored = on_disk(dir.path());
    let in_memory = directory.list();
    assert_eq!(stored.sessions, in_memory);
    // Changes that nobody waited for are written when the last handle goes, too.
    let late = directory.front_door_attach("late", "", "").unwrap();
    let in_memory = directory.list();
    let next_id = lock(&directory.shared.table).next_session_id;
    drop(directory);
    let stored = on_disk(dir.path());
    assert_eq!(stored.sessions, in_memory);
    assert_eq!(stored.next_session_id, next_id);

    // A new agent over the same state directory: the same sessions, no connection attached,
    // and those that connections still held disconnected (their clients went with the agent).
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    let restored = directory.list();
    let expected: Vec<_> = in_memory
        .into_iter()
        .map(|record| SessionRecord {
            attachment: 0,
            state: if record.attachment != 0 {
                RecordState::Disconnected
            } else {
                record.state
            },
            ..record
        })
        .collect();
    let without_times = |records: &[SessionRecord]| {
        records
            .iter()
            .map(|record| SessionRecord {
                changed_ms: 0,
                ..record.clone()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(without_times(&restored), without_times(&expected));
    let late = restored
        .iter()
        .find(|r| r.session_id == late.session_id)
        .unwrap();
    assert_eq!(late.state, RecordState::Disconnected);
    let next = directory.front_door_attach("newcomer", "", "").unwrap();
    assert_eq!(next.session_id, next_id);
}

#[test]
fn a_failed_write_is_logged_and_tried_again() {
    let dir = tempfile::tempdir().unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    // A directory where the temporary file goes: every write fails (even for root).
    let blocker = dir.path().join("sessions.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    // The event stands and is answered; nothing reached the disk.
    let record = directory.apply(Logon, logon("alice", 10)).unwrap();
    assert_eq!(record.session_id, 10);
    assert_eq!(directory.writes(), 0);
    assert!(!dir.path().join("sessions.json").exists());
    assert!(!directory.flush());
    assert!(directory.save_failing());

    // The disk is back: the next change writes everything, the earlier one included.
    std::fs::remove_dir(&blocker).unwrap();
    directory.apply(Logon, logon("bob", 11)).unwrap();
    assert_eq!(on_disk_ids(dir.path()), vec![10, 11]);
    assert!(!directory.save_failing());

    // Without a new change, the writer tries again on its own after a pause.
    std::fs::create_dir(&blocker).unwrap();
    let writes = directory.writes();
    directory.front_door_attach("carol", "", "").unwrap();
    // (Waits for an attempt at it, which fails.)
    assert!(!directory.flush());
    std::fs::remove_dir(&blocker).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while directory.writes() == writes {
        assert!(
            Instant::now() < deadline,
            "no write after the disk came back"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(on_disk(dir.path()).sessions, directory.list());
    assert!(!directory.save_failing());

    // A disk that fails at the stop: the last handle still goes, without hanging or panicking.
    std::fs::create_dir(&blocker).unwrap();
    directory.front_door_attach("dave", "", "").unwrap();
    drop(directory);
    assert_eq!(on_disk_ids(dir.path()).len(), 3);
}

#[test]
fn a_second_agent_on_the_same_state_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (first, events) = Directory::open(dir.path()).unwrap();
    let refused = Directory::open(dir.path()).err().expect("refused");
    assert!(
        format!("{refused:#}").contains("in use by another tsagent"),
        "{refused:#}"
    );
    drop((first, events));
    // Free again once the first one has gone.
    Directory::open(dir.path()).unwrap();
}

#[test]
fn a_state_directory_that_cannot_be_written_is_said_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sessions.json.tmp")).unwrap();
    let (directory, _events) = Directory::open(dir.path()).unwrap();
    // The writer has tried at once, before any event.
    assert!(!directory.flush());
    assert!(directory.save_failing());
}

/// The table names its machine: another machine's agent on the same state directory (shared
/// or copied by mistake) is refused instead of reporting these sessions as its own; a table
/// from before the name was written is taken, and named from then on.
#[test]
fn a_table_is_its_machines_only() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (directory, _events) = Directory::open(dir.path()).unwrap();
        directory.apply(Logon, logon("alice", 7)).unwrap();
    }
    assert_eq!(on_disk(dir.path()).machine, None);
    {
        let (_directory, _events) = Directory::open_for(dir.path(), "f/ts1".into()).unwrap();
    }
    assert_eq!(on_disk(dir.path()).machine.as_deref(), Some("f/ts1"));
    let refused = Directory::open_for(dir.path(), "f/ts2".into())
        .err()
        .expect("another machine's table");
    let message = format!("{refused:#}");
    assert!(
        message.contains("machine f/ts1, not of this one (f/ts2)"),
        "{message}"
    );
    let (directory, _events) = Directory::open_for(dir.path(), "f/TS1".into()).unwrap();
    assert_eq!(directory.list().len(), 1);
}

/// A state directory removed and made again under the running agent: the agent locks the new
/// one at its next write and writes there; if another agent started there meanwhile, it does
/// not write its table over that one's.
#[test]
fn a_state_directory_made_again_is_locked_again() {
    let parent = tempfile::tempdir().unwrap();
    let state = parent.path().join("state");
    let (first, _first_events) = Directory::open_for(&state, "f/ts1".into()).unwrap();
    first.apply(Logon, logon("alice", 7)).unwrap();
    std::fs::rename(&state, parent.path().join("old")).unwrap();
    std::fs::create_dir(&state).unwrap();
    first.apply(Logon, logon("bob", 8)).unwrap();
    assert_eq!(
        on_disk_ids(&state),
        [7, 8],
        "written into the new directory"
    );
    // Locked: a second agent is refused there.
    assert!(Directory::open_for(&state, "f/ts2".into()).is_err());

    // Made again once more, and another agent starts in it first.
    std::fs::rename(&state, parent.path().join("older")).unwrap();
    std::fs::create_dir(&state).unwrap();
    let (second, _second_events) = Directory::open_for(&state, "f/ts2".into()).unwrap();
    second.apply(Logon, logon("carol", 9)).unwrap();
    // The first agent's next change is not written over the second's table.
    let _ = first.apply(Logon, logon("dave", 10));
    assert!(first.save_failing(), "said, as any failed save is");
    assert_eq!(on_disk(&state).machine.as_deref(), Some("f/ts2"));
    assert_eq!(on_disk_ids(&state), [9]);
}
