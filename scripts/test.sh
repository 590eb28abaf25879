#!/usr/bin/env bash
# The README's test command: runs the whole test suite on a fresh machine.
#
#   scripts/test.sh [extra cargo test arguments]      e.g.  scripts/test.sh -p tsbroker-common
#
# 1. installs what the tests need when it is missing and it can (scripts/install-test-deps.sh);
# 2. makes sure PostgreSQL answers at $DATABASE_URL, starting a throwaway server when none does
#    (scripts/ensure-postgres.sh; that server is stopped and removed when this script exits);
# 3. runs `cargo test --workspace --all-targets -j2 "$@"` with DATABASE_URL and
#    TSBROKER_TEST_REQUIRE_POSTGRES=1 exported, so the PostgreSQL half of the suite fails rather
#    than skips when the database is unreachable, and with grpcurl on PATH.
# Exits with cargo's status.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
TSB_LOG_PREFIX=test.sh
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

# haproxy and friends live in sbin, which a non-root PATH may lack.
path_append /usr/sbin
path_append /sbin

log "checking test dependencies"
if ! bash scripts/install-test-deps.sh; then
    log "WARNING: some test dependencies are missing (MISSING lines above); the tests that need them will fail"
fi

if dir=$(find_grpcurl_dir); then
    path_append "$dir"
    log "grpcurl: $dir/grpcurl"
else
    log "WARNING: grpcurl not found; the grpcurl tests will fail"
fi
export PATH

pg_dir=""
results=""
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    [ -z "$results" ] || rm -f "$results"
    if [ -n "$pg_dir" ]; then
        bash scripts/ensure-postgres.sh stop "$pg_dir" || log "could not remove $pg_dir"
    fi
}
trap cleanup EXIT
# INT/TERM: stop the test run (cargo and everything it started), then exit through the EXIT trap.
cargo_pid=""
# shellcheck disable=SC2317 # run by the INT/TERM traps
on_signal() {
    trap - INT TERM
    if [ -n "$cargo_pid" ]; then
        kill -"$1" -- "-$cargo_pid" 2>/dev/null || kill -"$1" "$cargo_pid" 2>/dev/null || true
        wait "$cargo_pid" 2>/dev/null || true
    fi
    exit "$2"
}
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

log "checking PostgreSQL"
# Only a server started now is this run's to remove, not one an earlier env file named.
unset TSBROKER_TEST_PG_DIR
pg_env=$(bash scripts/ensure-postgres.sh --owner-pid $$)
eval "$pg_env"
pg_dir=${TSBROKER_TEST_PG_DIR:-}
unset TSBROKER_TEST_PG_DIR
export DATABASE_URL
export TSBROKER_TEST_REQUIRE_POSTGRES=1
log "DATABASE_URL=$DATABASE_URL${pg_dir:+ (throwaway server, removed on exit)}"

# The default is the whole workspace, every target. Arguments that pick packages or targets
# replace --workspace or --all-targets (cargo would otherwise run everything anyway, ignoring
# `-p` under --workspace), so `scripts/test.sh -p tsbroker-common` tests just that crate.
scope=(--workspace)
targets=(--all-targets)
for arg in "$@"; do
    [ "$arg" = -- ] && break
    case $arg in
    -p | -p?* | --package | --package=*) scope=() ;;
    --lib | --bins | --bin | --bin=* | --examples | --example | --example=* | --tests | --test | \
        --test=* | --benches | --bench | --bench=* | --doc) targets=() ;;
    esac
done
# The end-to-end tests run the workspace's binaries (tsbroker, tsagent, the plug-ins): cargo test
# does not build another package's binaries, so build them all first (quick when up to date).
log "building the workspace's binaries"
cargo build --workspace --bins -j2
cmd=(cargo test "${scope[@]}" "${targets[@]}" -j2 "$@")
log "running: ${cmd[*]}"
start=$SECONDS
status=0
# cargo's standard output is copied to a file (through tee, so it still streams) to add up the
# "test result:" lines at the end.
results=$(mktemp "${TMPDIR:-/tmp}/tsbroker-test-output.XXXXXX")
exec 3> >(tee "$results")
tee_pid=$!
# In the background, in a process group of its own, so that a signal to this script is handled at
# once (bash runs traps only between foreground commands) and reaches every process of the run.
if command -v setsid >/dev/null 2>&1; then
    setsid "${cmd[@]}" >&3 3>&- &
else
    "${cmd[@]}" >&3 3>&- &
fi
cargo_pid=$!
wait "$cargo_pid" || status=$?
cargo_pid=""
exec 3>&-
# tee ends when every writer is gone; a process the tests leaked could hold it open: wait 5 s.
for _ in $(seq 1 50); do
    [ -d "/proc/$tee_pid" ] || break
    sleep 0.1
done
log "cargo test exited with status $status after $((SECONDS - start))s"

# One closing line for the whole run, over every test binary: "N passed, N failed, N skipped"
# (skipped = #[ignore]d). Also written to $TSBROKER_TEST_TOTALS_FILE when that is set (.ci/run
# prints it last).
totals=$(sed -nE 's/^test result: [A-Za-z]+\. ([0-9]+) passed; ([0-9]+) failed; ([0-9]+) ignored;.*/\1 \2 \3/p' "$results" |
    awk '{p += $1; f += $2; i += $3; n++} END {if (n) printf "%d passed, %d failed, %d skipped\n", p, f, i}')
# Stop the throwaway server now rather than in the EXIT trap, so that the totals come last.
cleanup
pg_dir=""
results=""
if [ -n "$totals" ]; then
    echo "test.sh: $totals"
    if [ -n "${TSBROKER_TEST_TOTALS_FILE:-}" ]; then echo "test.sh: $totals" >"$TSBROKER_TEST_TOTALS_FILE"; fi
else
    log "no test results (see the output above)"
fi
exit "$status"
