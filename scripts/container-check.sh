#!/usr/bin/env bash
# The container images (deploy/docker) built and run as an operator would, with podman:
#   1. both Dockerfiles build (the committed tree, as `docker build` gets it);
#   2. two broker containers on one PostgreSQL (what compose.yaml starts), each healthy by its
#      image's health check (`tsbroker --health-check`);
#   3. the agent container on the host's network binds port 3389 as its non-root user, joins,
#      is healthy (`tsagent status`), and takes `tsagent session …` through `podman exec` and
#      from the host through the shared /run/tsagent;
#   4. either replica sends the agent's user back to its session (EXISTING_SESSION);
#   5. `podman stop` (SIGTERM) ends all three with status 0.
#
#   scripts/container-check.sh --yes
#
# Root only, with --yes: it installs podman, runc and debootstrap when missing, and uses port
# 3389. The base images come from their registry when it answers; otherwise (a machine that
# reaches only package registries, as the project's development machines) it makes stand-ins
# once and keeps them: debian:bookworm-slim from debootstrap, and rust:1-bookworm from that plus
# this machine's default Rust toolchain and CA bundle. Containers run with runc, the host's
# network and no systemd (health checks are run by hand). Not part of CI: the release builds in
# the images take ~10 minutes on 2 cores. At exit it removes its containers, volumes and the
# two images it built.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
TSB_LOG_PREFIX=container-check.sh
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

require_root_and_yes "${1:-}" "installs packages and runs containers on port 3389"

need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then apt_install "${need[@]}" || die "apt-get install ${need[*]} failed"; fi
path_append /usr/sbin
if dir=$(find_grpcurl_dir); then path_append "$dir"; fi
command -v grpcurl >/dev/null 2>&1 || die "grpcurl missing (scripts/install-test-deps.sh installs it)"
if ss -Hltn 'sport = :3389' | grep . >/dev/null; then die "port 3389 is in use"; fi

# runc: crun refuses this kind of machine's hybrid cgroups; the ulimits stay under the hard ones.
# Without systemd, podman complains on stderr that it cannot set health check timers: its
# stderr goes to a log, shown when the check fails.
run() {
    podman --runtime runc run -d --network=host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
        "$@" 2>>"$work/podman.log"
}

work=$(mktemp -d "${TMPDIR:-/tmp}/tsbroker-container-check.XXXXXX")
containers=()
pg_dir=""
# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    local status=$? name
    trap - EXIT
    if [ "$status" -ne 0 ] && [ -f "$work/podman.log" ]; then
        log "----- podman's messages"
        grep -v 'systemd' "$work/podman.log" >&2 || true
    fi
    for name in "${containers[@]}"; do
        if [ "$status" -ne 0 ]; then
            log "----- last lines of $name's log"
            podman logs --tail 20 "$name" >&2 2>&1 || true
        fi
        podman rm -f "$name" >/dev/null 2>&1 || true
        podman volume rm -f "$name-data" >/dev/null 2>&1 || true
    done
    podman rmi -f localhost/tsbroker:check localhost/tsagent:check >/dev/null 2>&1 || true
    [ -z "$pg_dir" ] || bash scripts/ensure-postgres.sh stop "$pg_dir" >/dev/null 2>&1 || true
    rm -rf "$work" /run/tsagent-check
    if [ "$status" -eq 0 ]; then log "OK"; else log "FAILED"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- base images ------------------------------------------------------------------------------
have_image() { podman image exists "$1"; }
if ! have_image docker.io/library/debian:bookworm-slim && ! podman pull -q docker.io/library/debian:bookworm-slim >/dev/null 2>&1; then
    log "no registry: making debian:bookworm-slim with debootstrap"
    debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 ||
        fail "debootstrap failed (see $work/debootstrap.log)"
    rm -f "$work"/rootfs/var/cache/apt/archives/*.deb
    tar -C "$work/rootfs" -c . |
        podman import - docker.io/library/debian:bookworm-slim >/dev/null 2>>"$work/podman.log"
    rm -rf "$work/rootfs"
fi
if ! have_image docker.io/library/rust:1-bookworm && ! podman pull -q docker.io/library/rust:1-bookworm >/dev/null 2>&1; then
    log "no registry: making a rust:1-bookworm stand-in with this machine's toolchain"
    toolchain=$(rustup show active-toolchain | cut -d' ' -f1)
    mkdir -p "$work/rust/rustup/toolchains"
    cp -a "$(rustup show home)/toolchains/$toolchain" "$work/rust/rustup/toolchains/"
    printf 'default_toolchain = "%s"\nprofile = "minimal"\nversion = "12"\n' "$toolchain" >"$work/rust/rustup/settings.toml"
    mkdir "$work/rust/cargo-bin"
    for tool in cargo rustc rustup; do cp -aL "$(command -v "$tool")" "$work/rust/cargo-bin/"; done
    cp /etc/ssl/certs/ca-certificates.crt "$work/rust/ca.crt" # a TLS proxy's CA, where there is one
    cat >"$work/rust/Containerfile" <<'EOF'
FROM docker.io/library/debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev binutils make ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY rustup /usr/local/rustup
COPY cargo-bin /usr/local/cargo/bin
COPY ca.crt /etc/ssl/certs/ca-certificates.crt
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
EOF
    podman build -q --isolation=chroot --network=host -t docker.io/library/rust:1-bookworm \
        "$work/rust" >/dev/null 2>>"$work/podman.log" ||
        fail "could not make the rust:1-bookworm stand-in"
    rm -rf "$work/rust"
fi

# --- 1. the images -----------------------------------------------------------------------------
mkdir "$work/context"
git archive --format=tar HEAD | tar -C "$work/context" -x
for image in broker agent; do
    log "1. building the $image image (release build inside; minutes)"
    podman build --format docker --isolation=chroot --network=host \
        -f "$work/context/deploy/docker/Dockerfile.$image" -t "localhost/ts$image:check" \
        "$work/context" >"$work/build-$image.log" 2>&1 || {
        tail -n 30 "$work/build-$image.log" >&2
        fail "the $image image does not build"
    }
done

# --- 2. two brokers on one PostgreSQL -----------------------------------------------------------
log "2. two broker containers on one PostgreSQL"
unset TSBROKER_TEST_PG_DIR # only a server started here is this check's to remove
bash scripts/ensure-postgres.sh --env-file "$work/pg.env" >"$work/pg.log" 2>&1 || fail "no PostgreSQL"
# shellcheck disable=SC1091 # written just above
. "$work/pg.env"
pg_dir=${TSBROKER_TEST_PG_DIR:-}
database="tsbroker_container_check_$$"
# shellcheck disable=SC2153 # DATABASE_URL comes from pg.env
psql "$DATABASE_URL" -qc "CREATE DATABASE $database" || fail "could not create a database"
database_url="${DATABASE_URL%/*}/$database"
ports=("$(free_port)" "$(free_port)")
for i in 0 1; do
    name="tsbroker-check-$i"
    containers+=("$name")
    run --name "$name" -e "TSBROKER_LISTEN=0.0.0.0:${ports[$i]}" -e "TSBROKER_DATABASE_URL=$database_url" \
        -v "$name-data:/var/lib/tsbroker" localhost/tsbroker:check >/dev/null
done
healthy() { podman healthcheck run "$1" >/dev/null 2>&1; }
wait_healthy() { wait_until 60 healthy "$1" || fail "$1 is not healthy"; }
for name in tsbroker-check-0 tsbroker-check-1; do wait_healthy "$name"; done

# --- 3. the agent ------------------------------------------------------------------------------
log "3. the agent container on port 3389"
install -d -o 10002 -g 10002 -m 0750 /run/tsagent-check
containers+=(tsagent-check)
run --name tsagent-check -v /run/tsagent-check:/run/tsagent -v tsagent-check-data:/var/lib/tsagent \
    -e "TSAGENT_BROKER=http://127.0.0.1:${ports[0]}" -e TSAGENT_MACHINE_NAME=ts-check.example.com \
    -e TSAGENT_FRONT_DOOR=0.0.0.0:3389 localhost/tsagent:check >/dev/null
wait_healthy tsagent-check
ss -Hltnp 'sport = :3389' | grep tsagent >/dev/null || fail "the agent does not listen on 3389"
[ "$(stat -c %u /run/tsagent-check/control.sock)" = 10002 ] || fail "the control socket is not the agent user's"
podman exec tsagent-check tsagent session logon --user alice --session-id 10 >/dev/null ||
    fail "tsagent session logon through podman exec failed"
cargo build -q -j2 -p tsagent
"${CARGO_TARGET_DIR:-target}/debug/tsagent" session reconnect --user alice --session-id 10 \
    --control-socket /run/tsagent-check/control.sock >/dev/null ||
    fail "tsagent session from the host through the shared socket failed"

# --- 4. either replica -------------------------------------------------------------------------
log "4. either replica sends alice back to her session"
for port in "${ports[@]}"; do
    answer=$(grpcurl -plaintext -d '{"user_name": "alice", "farm": "default"}' "127.0.0.1:$port" \
        tsbroker.v1.Broker/Redirect)
    case $answer in
    *REDIRECT_REASON_EXISTING_SESSION*ts-check.example.com* | *ts-check.example.com*REDIRECT_REASON_EXISTING_SESSION*) ;;
    *) fail "replica on $port answered: $answer" ;;
    esac
done

# --- 5. stop -----------------------------------------------------------------------------------
log "5. podman stop"
podman stop -t 20 tsagent-check tsbroker-check-0 tsbroker-check-1 >/dev/null 2>>"$work/podman.log"
for name in tsagent-check tsbroker-check-0 tsbroker-check-1; do
    code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
    [ "$code" = 0 ] || fail "$name exited with status $code after SIGTERM"
done
