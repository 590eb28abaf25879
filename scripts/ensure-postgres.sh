#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers for the tests, and says where.
#
#   scripts/ensure-postgres.sh [--owner-pid PID] [--env-file FILE]
#       If PostgreSQL answers at $DATABASE_URL (default
#       postgres://postgres@127.0.0.1:5432/postgres), uses it. Otherwise starts a throwaway
#       server from the local PostgreSQL binaries (newest /usr/lib/postgresql/*/bin; Debian's
#       `postgresql` package is installed first when there are none and this script can): a new
#       cluster in a temporary directory, run by an unprivileged user when this script runs as
#       root, trust authentication, superuser `postgres`, listening on 127.0.0.1 only (port 5432
#       when free, else another), fsync off, max_connections=300.
#
#       Standard output gets shell lines to eval, the URL last:
#           export TSBROKER_TEST_PG_DIR=/tmp/tsbroker-pg.XXXXXX   (only for a throwaway server)
#           export DATABASE_URL=postgres://postgres@127.0.0.1:PORT/postgres
#       --env-file FILE writes the same lines to FILE. Progress goes to standard error.
#
#       Whoever starts a throwaway server stops it with `stop`. With --owner-pid PID (what
#       scripts/test.sh passes: its own PID) the server also belongs to that process: a later run
#       removes it once PID is gone (a test run killed with SIGKILL, say), and does not reuse it
#       while PID lives. Without --owner-pid it stays until `stop`.
#
#   scripts/ensure-postgres.sh stop DIR
#       Stops the throwaway server in DIR and removes DIR. Does nothing for a DIR that is gone.
#
# scripts/test.sh uses both: eval the first, `stop` from its EXIT trap.
set -euo pipefail

TSB_LOG_PREFIX=ensure-postgres.sh
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DEFAULT_URL=postgres://postgres@127.0.0.1:5432/postgres
MARKER=.tsbroker-test-pg
TEST_USER=tsbroker-test

# Runs a command as $1 (only ever called as root), from a directory it can enter.
run_as() {
    local user=$1
    shift
    if command -v runuser >/dev/null 2>&1; then
        runuser -u "$user" -- "$@"
    elif command -v setpriv >/dev/null 2>&1; then
        setpriv --reuid="$user" --regid="$(id -g "$user")" --init-groups -- "$@"
    else
        su -s /bin/sh "$user" -c "$(printf '%q ' "$@")"
    fi
}

# Runs a command as the owner of the cluster (recorded in the marker), or as ourselves.
run_as_owner() {
    local user=$1
    shift
    if [ -n "$user" ] && [ "$user" != "$(id -un)" ]; then
        run_as "$user" "$@"
    else
        "$@"
    fi
}

marker_get() { sed -n "s/^$2=//p" "$1/$MARKER" 2>/dev/null | head -n 1; }

stop_cluster() {
    local dir=$1 user bindir pid
    [ -d "$dir" ] || return 0
    if [ ! -f "$dir/$MARKER" ]; then
        log "refusing to remove $dir: it is not a throwaway PostgreSQL directory ($MARKER missing)"
        return 1
    fi
    user=$(marker_get "$dir" user)
    bindir=$(marker_get "$dir" bindir)
    if [ -f "$dir/data/postmaster.pid" ] && [ -x "$bindir/pg_ctl" ]; then
        log "stopping the throwaway PostgreSQL server in $dir"
        pid=$(head -n 1 "$dir/data/postmaster.pid" 2>/dev/null || true)
        (cd "$dir" && run_as_owner "$user" "$bindir/pg_ctl" -D "$dir/data" stop -m fast -w -t 30 >/dev/null) ||
            (cd "$dir" && run_as_owner "$user" "$bindir/pg_ctl" -D "$dir/data" stop -m immediate -w -t 30 >&2) ||
            log "pg_ctl stop failed for $dir (removing it anyway)"
        # pg_ctl returns once the pid file is gone; wait for the process itself too.
        for _ in $(seq 1 50); do
            case $pid in '' | *[!0-9]*) break ;; esac
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
    fi
    rm -rf -- "$dir"
}

if [ "${1:-}" = stop ]; then
    [ $# -eq 2 ] || die "usage: $0 stop DIR"
    stop_cluster "$2"
    exit 0
fi

owner_pid=""
env_file=""
while [ $# -gt 0 ]; do
    case $1 in
    --owner-pid)
        owner_pid=${2:?--owner-pid needs a value}
        shift 2
        ;;
    --env-file)
        env_file=${2:?--env-file needs a value}
        shift 2
        ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done

emit() {
    # $1: throwaway directory or "", $2: URL
    local out=""
    [ -n "$1" ] && out+="export TSBROKER_TEST_PG_DIR=$(printf '%q' "$1")"$'\n'
    out+="export DATABASE_URL=$(printf '%q' "$2")"$'\n'
    printf '%s' "$out"
    if [ -n "$env_file" ]; then printf '%s' "$out" >"$env_file"; fi
}

# The client programs: Debian's wrappers on PATH, else those beside the server binaries.
bindir=$(pg_bindir || true)
client() {
    if command -v "$1" >/dev/null 2>&1; then
        command -v "$1"
    elif [ -n "$bindir" ] && [ -x "$bindir/$1" ]; then
        printf '%s\n' "$bindir/$1"
    fi
}

# Does a server answer at this URL, and let us in?
answers() {
    local url=$1 isready psql
    isready=$(client pg_isready)
    psql=$(client psql)
    [ -n "$psql" ] || return 1
    if [ -n "$isready" ]; then
        "$isready" -q -t 3 -d "$url" >/dev/null 2>&1 || return 1
    fi
    PGCONNECT_TIMEOUT=5 "$psql" -X -w -q -At -v ON_ERROR_STOP=1 -d "$url" -c 'select 1' >/dev/null 2>&1
}

# --- where throwaway servers live ----------------------------------------------------------
# As root the unprivileged user must be able to reach it, so use /tmp unless told otherwise.
if is_root; then
    base=${TSBROKER_TEST_PG_TMPDIR:-/tmp}
else
    base=${TSBROKER_TEST_PG_TMPDIR:-${TMPDIR:-/tmp}}
fi

# Throwaway servers whose owner died without stopping them (a test run killed with SIGKILL):
# removed first, so that such a leftover is never mistaken for a server to reuse.
for old in "$base"/tsbroker-pg.*; do
    [ -f "$old/$MARKER" ] || continue
    is_root || [ -O "$old" ] || continue
    old_owner=$(marker_get "$old" owner_pid)
    if [ -n "$old_owner" ] && [ ! -d "/proc/$old_owner" ]; then
        log "removing $old, left behind by process $old_owner which is gone"
        stop_cluster "$old" || true
    fi
done

# --- a server that already answers ---------------------------------------------------------
url=${DATABASE_URL:-$DEFAULT_URL}
if answers "$url"; then
    psql=$(client psql)
    # A throwaway server of another live test run is stopped when that run ends: not ours to use.
    data_dir=$(PGCONNECT_TIMEOUT=5 "$psql" -X -w -At -d "$url" -c 'show data_directory' 2>/dev/null || true)
    other=""
    if [ -n "$data_dir" ] && [ -f "$(dirname "$data_dir")/$MARKER" ]; then
        other=$(marker_get "$(dirname "$data_dir")" owner_pid)
        if [ -n "$other" ] && { [ "$other" = "$owner_pid" ] || [ ! -d "/proc/$other" ]; }; then
            other=""
        fi
    fi
    if [ -z "$other" ]; then
        max=$(PGCONNECT_TIMEOUT=5 "$psql" -X -w -At -d "$url" -c 'show max_connections' 2>/dev/null || true)
        log "PostgreSQL answers at $url: using it (max_connections=${max:-?})"
        if [ -n "$max" ] && [ "$max" -lt 300 ] 2>/dev/null; then
            log "warning: max_connections=$max there; the tests open many pools and may need 300"
        fi
        emit "" "$url"
        exit 0
    fi
    log "the server at $url is the throwaway server of another test run (process $other): starting a separate one"
    url=$DEFAULT_URL
else
    if [ -n "${DATABASE_URL:-}" ] && [ "$DATABASE_URL" != "$DEFAULT_URL" ]; then
        log "no PostgreSQL answers at DATABASE_URL=$DATABASE_URL: starting a throwaway server instead"
    else
        log "no PostgreSQL answers at $url: starting a throwaway server"
    fi
fi

# --- the server binaries -------------------------------------------------------------------
if [ -z "$bindir" ]; then
    if can_be_root && command -v apt-get >/dev/null 2>&1; then
        log "no PostgreSQL server binaries: installing Debian's postgresql package"
        apt_install postgresql || die "apt-get install postgresql failed"
        bindir=$(pg_bindir || true)
    fi
    [ -n "$bindir" ] || die "no PostgreSQL server binaries (initdb, pg_ctl) under /usr/lib/postgresql/*/bin or on PATH, and cannot install them (need root or password-less sudo): install Debian's postgresql package, or point DATABASE_URL at a running server"
fi
psql=$(client psql)
[ -n "$psql" ] || die "no psql found (install postgresql-client)"
log "using PostgreSQL binaries in $bindir ($("$bindir/postgres" --version 2>/dev/null || echo unknown version))"

# --- who runs it ---------------------------------------------------------------------------
user=""
if is_root; then
    if ! id -u "$TEST_USER" >/dev/null 2>&1; then
        if command -v useradd >/dev/null 2>&1; then
            useradd --system --user-group --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin "$TEST_USER" >/dev/null 2>&1 || true
        elif command -v adduser >/dev/null 2>&1; then
            adduser --system --group --no-create-home --home /nonexistent "$TEST_USER" >/dev/null 2>&1 || true
        fi
    fi
    for candidate in "$TEST_USER" postgres nobody; do
        if id -u "$candidate" >/dev/null 2>&1; then
            user=$candidate
            break
        fi
    done
    [ -n "$user" ] || die "running as root and found no unprivileged user to run PostgreSQL as"
    log "running as root: the server runs as user $user"
fi

dir=$(mktemp -d "$base/tsbroker-pg.XXXXXX")
# From here on, any failure removes what was made.
cleanup_on_failure() {
    local status=$?
    if [ $status -ne 0 ]; then
        [ -f "$dir/postgres.log" ] && { log "last lines of $dir/postgres.log:"; tail -n 20 "$dir/postgres.log" >&2 || true; }
        stop_cluster "$dir" || true
    fi
}
trap cleanup_on_failure EXIT
printf 'owner_pid=%s\nuser=%s\nbindir=%s\n' "$owner_pid" "$user" "$bindir" >"$dir/$MARKER"
chmod 0700 "$dir"
[ -n "$user" ] && chown "$user:$(id -gn "$user")" "$dir"
cd "$dir"

log "initdb in $dir/data"
if ! run_as_owner "$user" "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 \
    --locale=C --no-sync >"$dir/initdb.log" 2>&1; then
    cat "$dir/initdb.log" >&2
    die "initdb failed"
fi

# Settings for a disposable test server; the port is given at start.
sockdir_q=${dir//\'/\'\'}
cat >>"$dir/data/postgresql.conf" <<EOF

# --- tsbroker test server (scripts/ensure-postgres.sh) ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sockdir_q'
max_connections = 300
shared_buffers = 128MB
fsync = off
synchronous_commit = off
full_page_writes = off
dynamic_shared_memory_type = mmap
log_min_messages = warning
log_min_duration_statement = -1
EOF

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Ports to try: the one the URL names (when it is this machine), 5432, then a few others.
candidates=()
url_port=$(printf '%s' "$url" | sed -nE 's#^postgres(ql)?://[^@/]*@?(127\.0\.0\.1|localhost):([0-9]+)/.*#\3#p')
[ -n "$url_port" ] && candidates+=("$url_port")
candidates+=(5432 5433 5434 5435 5436 5437 5438 5439 5440)
for _ in 1 2 3 4 5 6 7 8; do candidates+=($((20000 + RANDOM % 30000))); done

port=""
for p in "${candidates[@]}"; do
    port_in_use "$p" && continue
    log "starting the server on 127.0.0.1:$p"
    if run_as_owner "$user" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -o "-p $p" \
        -w -t 60 start >/dev/null 2>&1; then
        port=$p
        break
    fi
    if grep -qiE 'could not bind|address already in use|could not create any TCP' "$dir/postgres.log" 2>/dev/null; then
        log "port $p was taken: trying another"
        [ -f "$dir/postgres.log" ] && : >"$dir/postgres.log"
        continue
    fi
    die "pg_ctl start failed (its log is above)"
done
[ -n "$port" ] || die "found no free port for PostgreSQL"

new_url="postgres://postgres@127.0.0.1:$port/postgres"
answers "$new_url" || die "the throwaway server does not answer at $new_url"
log "throwaway PostgreSQL ready at $new_url (data in $dir; stop with: $0 stop $dir)"
trap - EXIT
emit "$dir" "$new_url"
