#!/usr/bin/env bash
# Checks deploy/docker/compose.yaml against the Compose Specification's JSON schema (the one
# Docker Compose v2 reads), with check-jsonschema from PyPI in a throwaway virtualenv. A static
# check: the images themselves are built and run by scripts/container-check.sh.
#
#   scripts/compose-check.sh
#
# Needs python3 with venv (Debian: python3-venv) and PyPI.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
TSB_LOG_PREFIX=compose-check.sh
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

CHECK_JSONSCHEMA_VERSION=0.39.0

venv=$(mktemp -d "${TMPDIR:-/tmp}/tsbroker-compose-check.XXXXXX")
trap 'rm -rf "$venv"' EXIT
if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    apt_install python3-venv || true
    python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" ||
    die "pip install check-jsonschema failed"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/docker/compose.yaml
log "deploy/docker/compose.yaml follows the Compose Specification"
