# Shared helpers for the scripts in this directory. Source it; do not run it.
# shellcheck shell=bash

# The prefix of progress lines: the name of the script that sourced this file.
: "${TSB_LOG_PREFIX:=$(basename "${BASH_SOURCE[1]:-$0}")}"

log() { printf '%s: %s\n' "$TSB_LOG_PREFIX" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }

# For the checks that change the system they run on: goes on only as root and when the first
# argument is --yes; otherwise stops with WHAT (what the script would do).
require_root_and_yes() {
    [ "${1:-}" = --yes ] || die "$2; run as root with --yes"
    is_root || die "must run as root"
}

# A check that did not hold: says so and exits 1 (through the caller's EXIT trap).
fail() {
    log "FAILED: $*"
    exit 1
}

# A TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits up to SECONDS for COMMAND... to succeed; false when it never did.
wait_until() {
    local seconds=$1 deadline
    shift
    deadline=$((SECONDS + seconds))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

# True when this script may run commands as root: it is root, or password-less sudo works
# (never prompts: CI has no standard input).
can_be_root() {
    is_root && return 0
    command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1
}

as_root() {
    if is_root; then
        "$@"
    else
        sudo -n "$@"
    fi
}

# apt-get update runs at most once per process tree (marker in the environment).
apt_install() {
    if [ -z "${TSB_APT_UPDATED:-}" ]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || return 1
        export TSB_APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@" >&2
}

# "installed" per dpkg, for one Debian package.
dpkg_installed() {
    command -v dpkg-query >/dev/null 2>&1 || return 1
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# The directory of the newest PostgreSQL server binaries (Debian layout first, then PATH), or
# nothing.
pg_bindir() {
    local dir newest=""
    while IFS= read -r dir; do
        [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && newest="$dir"
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V)
    if [ -z "$newest" ] && command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        newest="$(dirname "$(command -v initdb)")"
    fi
    [ -n "$newest" ] && printf '%s\n' "$newest"
}

# Directories where `pip install` may have put the grpcurl entry point, most likely first.
grpcurl_candidate_dirs() {
    local py
    for py in python3 python; do
        command -v "$py" >/dev/null 2>&1 || continue
        "$py" - <<'EOF' 2>/dev/null || true
import os, site, sysconfig
print(sysconfig.get_path("scripts"))
try:
    print(os.path.join(site.getuserbase(), "bin"))
except Exception:
    pass
EOF
        break
    done
    printf '%s\n' "$HOME/.local/bin" /usr/local/bin
}

# Prints the directory holding a working grpcurl, or nothing.
find_grpcurl_dir() {
    local dir
    if command -v grpcurl >/dev/null 2>&1; then
        dirname "$(command -v grpcurl)"
        return 0
    fi
    while IFS= read -r dir; do
        [ -n "$dir" ] && [ -x "$dir/grpcurl" ] && {
            printf '%s\n' "$dir"
            return 0
        }
    done < <(grpcurl_candidate_dirs)
    return 1
}

# Adds a directory to PATH (at the end) unless it is already there.
path_append() {
    case ":$PATH:" in
    *":$1:"*) ;;
    *) PATH="$PATH:$1" ;;
    esac
}
