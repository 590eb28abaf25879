#!/usr/bin/env bash
# Installs FreeRDP 3's X11 client (xfreerdp3, Debian package freerdp3-x11) when it is missing, for
# CI's second pass of scripts/xrdp-check.sh (TSB_XFREERDP=xfreerdp3): the client of newer
# desktops, next to Debian 12's FreeRDP 2. Debian 13 ships it; on Debian 12 it comes from
# bookworm-backports, which this script then adds as an apt source
# (/etc/apt/sources.list.d/tsbroker-bookworm-backports.sources, left in place: packages from
# backports are only installed when asked for by name, as here).
#
#   scripts/install-freerdp3.sh --yes
#
# It changes the system, so it runs only as root and with --yes. Exits 1, saying why, when it
# cannot install the client.
set -euo pipefail

TSB_LOG_PREFIX=install-freerdp3.sh
# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require_root_and_yes "${1:-}" "adds an apt source and installs packages"
command -v xfreerdp3 >/dev/null 2>&1 && exit 0
command -v apt-get >/dev/null 2>&1 || die "no apt-get on this machine: install FreeRDP 3 (xfreerdp3) by hand"

has_candidate() {
    apt-cache policy freerdp3-x11 2>/dev/null | grep -q 'Candidate: [0-9]'
}

target=()
if ! has_candidate; then
    # shellcheck disable=SC1091 # the system's, not ours
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    [ "$codename" = bookworm ] ||
        die "no freerdp3-x11 package for this system (${codename:-unknown}): install FreeRDP 3 (xfreerdp3) by hand"
    log "adding bookworm-backports, where Debian 12's FreeRDP 3 is"
    cat >/etc/apt/sources.list.d/tsbroker-bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    target=(-t bookworm-backports)
    # The sources changed: read them again (apt_install would not, after an earlier update).
    log "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || die "apt-get update failed"
    export TSB_APT_UPDATED=1
fi
apt_install "${target[@]}" freerdp3-x11 || die "apt-get install freerdp3-x11 failed"
command -v xfreerdp3 >/dev/null 2>&1 || die "freerdp3-x11 is installed but xfreerdp3 is not on PATH"
log "installed: $(xfreerdp3 --version 2>/dev/null | grep -m1 -o 'FreeRDP version [^ ]*')"
