#!/usr/bin/env bash
# Static checks of the deployment files: deploy/docker/compose.yaml against the Compose
# Specification's JSON schema (the one Docker Compose v2 reads; check-jsonschema from PyPI in a
# throwaway virtualenv), and the systemd units in deploy/systemd, each with its TLS drop-in from
# deploy/systemd/tls, with `systemd-analyze verify`
# (any complaint fails; the programs' paths are pointed at /bin/true, since the units name
# where a package installs them). The images themselves are built and run by
# scripts/container-check.sh.
#
#   scripts/deploy-check.sh
#
# Needs python3 with venv (Debian: python3-venv, installed when missing and root), PyPI, and
# systemd-analyze (skipped, with a line saying so, where systemd is not installed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
TSB_LOG_PREFIX=deploy-check.sh
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

CHECK_JSONSCHEMA_VERSION=0.39.0

work=$(mktemp -d "${TMPDIR:-/tmp}/tsbroker-deploy-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

if ! python3 -m venv "$work/venv" >/dev/null 2>&1; then
    apt_install python3-venv || true
    python3 -m venv "$work/venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
fi
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" ||
    die "pip install check-jsonschema failed"
"$work/venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/docker/compose.yaml
log "deploy/docker/compose.yaml follows the Compose Specification"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    log "systemd-analyze not installed: the systemd units are not checked"
    exit 0
fi
mkdir "$work/units"
for unit in deploy/systemd/*.service; do
    name=$(basename "$unit")
    sed -E 's#/usr/bin/(tsagent|tsbroker)#/bin/true#g' "$unit" >"$work/units/$name"
    # The TLS drop-in, installed where systemd reads a unit's drop-ins.
    mkdir "$work/units/$name.d"
    cp "deploy/systemd/tls/${name%.service}.conf" "$work/units/$name.d/tls.conf"
done
complaints=$(SYSTEMD_UNIT_PATH="$work/units:" systemd-analyze verify "$work"/units/*.service 2>&1) || true
if [ -n "$complaints" ]; then
    printf '%s\n' "$complaints" >&2
    die "systemd-analyze verify complains about deploy/systemd"
fi
log "deploy/systemd/*.service and their TLS drop-ins pass systemd-analyze verify"
