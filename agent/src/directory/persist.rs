//! The table's writer: one thread that saves the latest table (group commit), so that no
//! change waits for the disk while holding the table's lock.
//!
//! Every change numbers itself (its *generation*, counted under the table's lock) and calls
//! [`Persister::changed`]. The worker wakes, takes a snapshot of the table under its lock (a
//! copy of the records, the generation it includes), lets the lock go and writes the snapshot
//! with [`TableFile::save`] (temporary file, fsync, rename, fsync of the directory). Changes
//! made while a write is in progress are all covered by the next single write, so a burst of
//! changes costs one or two writes, not one each; only a change that finds the worker idle
//! wakes it.
//!
//! [`Persister::wait_for`] blocks until a write covering a generation has been attempted:
//! control-socket events (PAM, xrdp's scripts) wait for it before they are answered, and the
//! waiters of one write share its fsync. Changes nobody waits for (the front door's attach and
//! detach) are written at most once per [`UNWAITED_WRITE_INTERVAL`]: under a stream of
//! connections the writer would otherwise rewrite and fsync the table back to back, for
//! changes the broker already has through the stream; a waiter arriving meanwhile is written
//! for at once. A write that fails is logged (the change stands in
//! memory and reaches the broker, as before) and the waiters are released; the table stays
//! dirty and is written again on the next change, or after a pause that doubles up to
//! [`MAX_RETRY_DELAY`] when nothing changes. [`Persister::flush`] writes whatever is not on
//! disk yet (the agent's shutdown); dropping the [`Persister`] flushes and ends the thread.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::SessionRecord;
use super::store::TableFile;

/// The first pause before a failed write is tried again without a new change.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);
/// The longest pause between attempts while writes keep failing.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// The shortest time from one write to the next when nobody waits for the next: how long a
/// front-door change may stay in memory only (a crash loses at most this much of them).
pub(super) const UNWAITED_WRITE_INTERVAL: Duration = Duration::from_millis(20);

/// What the worker writes: the table as of one generation.
pub(super) struct Snapshot {
    pub generation: u64,
    pub next_session_id: u32,
    pub sessions: Vec<SessionRecord>,
}

/// Takes a snapshot of the table (under its lock, briefly).
pub(super) type SnapshotFn = Box<dyn Fn() -> Snapshot + Send>;

#[derive(Default)]
struct State {
    /// The newest generation the table has reached (that the worker has been told of).
    requested: u64,
    /// The newest generation a finished write attempt covered, successful or not.
    attempted: u64,
    /// The newest generation on disk.
    written: u64,
    /// Successful writes so far.
    writes: u64,
    /// Callers blocked in [`Persister::wait_for`]: the next write is not held back.
    waiters: usize,
    /// Drop: write what is left, then end.
    stopping: bool,
    /// The worker has ended: nobody waits for it any more.
    ended: bool,
    /// Tests: the worker writes nothing while set.
    held: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the worker (a change, a flush, the stop).
    work: Condvar,
    /// Wakes waiters (a write attempt finished, the worker ended).
    done: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The handle to the writer thread.
pub(super) struct Persister {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

/// How often the writer may write changes nobody waits for.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pacing {
    pub unwaited_interval: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            unwaited_interval: UNWAITED_WRITE_INTERVAL,
        }
    }
}

impl Persister {
    /// Starts the writer; `generation` is the table's as loaded (already on disk).
    pub fn start(
        file: TableFile,
        generation: u64,
        snapshot: SnapshotFn,
        pacing: Pacing,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                requested: generation,
                attempted: generation,
                written: generation,
                ..State::default()
            }),
            work: Condvar::new(),
            done: Condvar::new(),
        });
        let worker = std::thread::Builder::new()
            .name("session-table-writer".to_owned())
            .spawn({
                let shared = shared.clone();
                move || {
                    let _ended = EndGuard(&shared);
                    run(&shared, &file, &*snapshot, pacing);
                }
            })?;
        Ok(Persister {
            shared,
            worker: Some(worker),
        })
    }

    /// The table reached `generation`: have it written. Returns at once.
    pub fn changed(&self, generation: u64) {
        let mut state = self.shared.lock();
        if generation > state.requested {
            // A worker with a change already to write (writing, or waiting out the interval)
            // takes this one with it: only an idle worker needs waking. Under a stream of
            // front-door connections that saves a futex wake per change, and the worker's
            // waking up early only to go back to sleep.
            let idle = state.requested <= state.attempted;
            state.requested = generation;
            if idle {
                self.shared.work.notify_one();
            }
        }
    }

    /// Has `generation` written and blocks until a write covering it finished; false when
    /// that write failed (the worker logs why).
    pub fn wait_for(&self, generation: u64) -> bool {
        let mut state = self.shared.lock();
        state.waiters += 1;
        state.requested = state.requested.max(generation);
        self.shared.work.notify_one();
        while state.attempted < generation && !state.ended {
            state = self
                .shared
                .done
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.waiters -= 1;
        state.written >= generation
    }

    /// Writes every change made so far (again, if the last attempt failed) and waits for it;
    /// false when that write failed.
    pub fn flush(&self) -> bool {
        let target = {
            let mut state = self.shared.lock();
            if state.written >= state.requested {
                return true;
            }
            // Forget a failed attempt so that the worker tries once more now.
            state.attempted = state.attempted.min(state.written);
            self.shared.work.notify_one();
            state.requested
        };
        self.wait_for(target)
    }

    /// Whether the last write failed (a later change or the retry pause tries again).
    pub fn failing(&self) -> bool {
        let state = self.shared.lock();
        state.written < state.attempted
    }

    /// Successful writes since the start.
    #[cfg(test)]
    pub fn writes(&self) -> u64 {
        self.shared.lock().writes
    }

    /// Holds the worker's writes back (the one in progress finishes) until called with false.
    #[cfg(test)]
    pub fn hold(&self, held: bool) {
        self.shared.lock().held = held;
        self.shared.work.notify_one();
    }
}

impl Drop for Persister {
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.stopping = true;
            state.held = false;
        }
        self.shared.work.notify_one();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Marks the worker ended however it ends (a panic included), so that no waiter hangs.
struct EndGuard<'a>(&'a Shared);

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().ended = true;
        self.0.done.notify_all();
    }
}

/// The worker: waits until there is something to write, writes the latest table, repeats.
fn run(shared: &Shared, file: &TableFile, snapshot: &dyn Fn() -> Snapshot, pacing: Pacing) {
    let mut retry_delay = FIRST_RETRY_DELAY;
    let mut failing = false;
    // Stopping: the final flush has been tried, whatever its outcome.
    let mut final_attempt = false;
    let mut last_write: Option<Instant> = None;
    while wait_for_work(
        shared,
        &mut retry_delay,
        &mut final_attempt,
        pacing,
        last_write,
    ) {
        last_write = Some(Instant::now());
        // No lock held from here on but the table's, briefly, inside `snapshot`.
        let Snapshot {
            generation,
            next_session_id,
            sessions,
        } = snapshot();
        let result = file.save(next_session_id, sessions);
        let mut state = shared.lock();
        state.attempted = state.attempted.max(generation);
        match result {
            Ok(()) => {
                state.written = state.written.max(generation);
                state.writes += 1;
                if failing {
                    tracing::info!("session table saved again");
                }
                failing = false;
                retry_delay = FIRST_RETRY_DELAY;
            }
            Err(error) => {
                // The change stands in memory and reaches the broker; only a restart could
                // lose it. The table is written again on the next change or after a pause.
                tracing::error!(
                    error = format!("{error:#}"),
                    "could not save the session table"
                );
                failing = true;
            }
        }
        shared.done.notify_all();
    }
}

/// Blocks until a write is due: a change newer than the last attempt (at once when someone
/// waits for it, else once the unwaited interval since `last_write` has passed), or the retry
/// of a failed write; false when the worker should end (stopping, and the final flush tried).
fn wait_for_work(
    shared: &Shared,
    retry_delay: &mut Duration,
    final_attempt: &mut bool,
    pacing: Pacing,
    last_write: Option<Instant>,
) -> bool {
    let mut state = shared.lock();
    loop {
        let dirty = state.written < state.requested;
        if state.stopping {
            // Flush what is not on disk, once more even if the last attempt failed.
            let due = dirty && !*final_attempt;
            *final_attempt = true;
            return due;
        }
        if state.held {
            state = wait(&shared.work, state);
        } else if state.requested > state.attempted {
            let now = Instant::now();
            let due = last_write.map_or(now, |at| at + pacing.unwaited_interval);
            if state.waiters > 0 || due <= now {
                return true;
            }
            // Woken early by a waiter, a flush or the stop; other changes just join this write.
            state = shared
                .work
                .wait_timeout(state, due - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        } else if dirty {
            // The last write failed and nothing changed since: try again after a pause.
            let (next, timeout) = shared
                .work
                .wait_timeout(state, *retry_delay)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            state = next;
            if timeout.timed_out() && state.written < state.requested && !state.stopping {
                *retry_delay = (*retry_delay * 2).min(MAX_RETRY_DELAY);
                return true;
            }
        } else {
            state = wait(&shared.work, state);
        }
    }
}

fn wait<'a>(condvar: &Condvar, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
    condvar
        .wait(guard)
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
