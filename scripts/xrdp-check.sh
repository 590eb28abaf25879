#!/usr/bin/env bash
# The xrdp deployment of deploy/pam/README.md, end to end and with the real parts: Debian's xrdp
# and xorgxrdp behind the agent's front door, PAM's pam_exec hook, xrdp's reconnect script
# through sudo, real xfreerdp clients, the broker's view through grpcurl. It checks that
#   1. a logon through the front door is one ACTIVE session, under xrdp's display number;
#   2. the client leaving makes it DISCONNECTED (xrdp has no disconnect hook: the front door
#      reports it);
#   3. Redirect sends the user back (EXISTING_SESSION) and a new client reattaches to the same
#      session: xrdp's reconnect hook reports it, and it is ACTIVE again, still the only one;
#   4. through another machine's front door (PROXY v2 to this one's) the user reaches the same
#      session, and leaving disconnects it;
#   5. a session whose client the agent's crash cut off is DISCONNECTED once it is back;
#   6. with another client, rdesktop (its own X.224 request and cookie), the same: a logon
#      under the display number, leaving disconnects it, the return reattaches to it;
#   7. a client given the farm as a collection (no user cookie) logs on, leaves and comes back:
#      the front door's only connection of an unknown user is the one PAM's logon and the
#      reconnect hook report, so its end disconnects the session; back from two devices in
#      turn, the first one's drop leaves the session ACTIVE under the second;
#   8. a wrong password leaves no session once the client gives up;
#   9. three clients at once — two returning users and a new logon — each end up in their own
#      session (one X server each) and each leaving is seen;
#  10. the session's end (its programs exit, so xrdp-sesman closes it) is a logoff;
#  11. a returning user given a new session by xrdp rather than the disconnected one (here
#      because xrdp-sesman restarted and lost track of it; also another screen size under
#      Policy=UBD): the connection holds the new one (ACTIVE, DISCONNECTED when the client
#      leaves) and the old one stays DISCONNECTED;
#  12. a user running the reconnect hook by hand for a display number that is no session of
#      theirs makes no session up;
#  13. a new user whose whole name is 9 characters that start another user's name (tsb-chris,
#      tsb-christa: to the broker the cookie may be tsb-christa's, cut as mstsc cuts it) is sent
#      to tsb-christa's disconnected session, and once PAM reports tsb-chris's own logon, the
#      connection holds that session: tsb-christa's stays DISCONNECTED throughout, tsb-chris's
#      is DISCONNECTED when the client leaves and ACTIVE again when it comes back.
#
#   scripts/xrdp-check.sh --yes
#   TSB_XFREERDP=xfreerdp3 scripts/xrdp-check.sh --yes    # with FreeRDP 3's client instead of 2's
#
# It changes the system, so it runs only as root and with --yes (CI, on a throwaway machine,
# passes it): it installs xrdp, xorgxrdp, xterm, sudo and rdesktop when missing, adds the users
# tsb-ann, tsb-ben, tsb-cat, tsb-dan, tsb-chris and tsb-christa, and follows deploy/pam/README.md's steps (/etc/xrdp/xrdp.ini,
# /etc/pam.d/xrdp-sesman, /etc/sudoers.d/tsagent, /etc/xrdp/reconnectwm.sh, /usr/lib/tsagent/,
# /usr/bin/tsagent). At exit it stops what it started, removes the users and puts every file
# back as it was. Needs xfreerdp, Xvfb, python3 and grpcurl (scripts/install-test-deps.sh;
# rdesktop it installs) and ports 3350 and 3390.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
TSB_LOG_PREFIX=xrdp-check.sh
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

require_root_and_yes "${1:-}" "changes this system (users, PAM, sudoers, xrdp): for a throwaway machine"

PASSWORD='Tsb-check-1234'
USERS=(tsb-ann tsb-ben tsb-cat tsb-dan tsb-chris tsb-christa)
FARM=default
CONTROL_SOCKET=/run/tsagent/control.sock
LOGON_SECONDS=90 # from xfreerdp's start to PAM's logon: Xorg and the session start first
XFREERDP=${TSB_XFREERDP:-xfreerdp} # FreeRDP 3: TSB_XFREERDP=xfreerdp3

path_append /usr/sbin
path_append /sbin
if dir=$(find_grpcurl_dir); then path_append "$dir"; fi
for tool in "$XFREERDP" Xvfb python3 grpcurl; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool missing (scripts/install-test-deps.sh installs it; xfreerdp3, scripts/install-freerdp3.sh)"
done
need=()
for pkg in xrdp xorgxrdp xterm sudo rdesktop; do dpkg_installed "$pkg" || need+=("$pkg"); done
if [ ${#need[@]} -gt 0 ]; then
    apt_install "${need[@]}" || die "apt-get install ${need[*]} failed"
    # Where the package's scripts started the servers just installed, stop them: this script
    # starts its own, configured.
    xrdp --kill >/dev/null 2>&1 || true
    xrdp-sesman --kill >/dev/null 2>&1 || true
fi

for port in 3350 3390; do
    if ss -Hltn "sport = :$port" | grep . >/dev/null; then die "port $port is in use (an xrdp already running?)"; fi
done
[ ! -e "$CONTROL_SOCKET" ] || die "$CONTROL_SOCKET exists: an agent runs on this machine"
for user in "${USERS[@]}"; do
    if id "$user" >/dev/null 2>&1; then die "user $user exists"; fi
done

log "building tsbroker and tsagent"
cargo build -q -j2 -p tsbroker -p tsagent
bin="${CARGO_TARGET_DIR:-target}/debug"

work=$(mktemp -d "${TMPDIR:-/tmp}/tsbroker-xrdp-check.XXXXXX")
mkdir "$work/saved"
saved_files=()
pids=()
users_added=()

# Remembers FILE as it is now (or that it does not exist), to be put back at exit.
save() {
    local file=$1 copy
    copy="$work/saved/$(printf '%s' "$file" | tr / _)"
    if [ -e "$file" ]; then cp -a "$file" "$copy"; else : >"$copy.absent"; fi
    saved_files+=("$file")
}

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
    local status=$? file copy pid user
    trap - EXIT
    if [ "$status" -ne 0 ]; then
        for file in "$work"/*.log /var/log/xrdp-sesman.log /var/log/xrdp.log; do
            [ -f "$file" ] || continue
            log "----- last lines of $file"
            tail -n 25 "$file" >&2 || true
        done
    fi
    # xrdp forks a process per connection; the sessions' X servers run as the users. TERM
    # first, so that each X server removes its lock file.
    for pid in "${pids[@]}"; do
        pkill -P "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
    done
    for user in "${users_added[@]}"; do pkill -u "$user" 2>/dev/null || true; done
    sleep 1
    for pid in "${pids[@]}"; do
        pkill -KILL -P "$pid" 2>/dev/null || true
        kill -KILL "$pid" 2>/dev/null || true
    done
    for user in "${users_added[@]}"; do pkill -KILL -u "$user" 2>/dev/null || true; done
    for user in "${users_added[@]}"; do userdel -r "$user" >/dev/null 2>&1 || log "could not remove user $user"; done
    for file in "${saved_files[@]}"; do
        copy="$work/saved/$(printf '%s' "$file" | tr / _)"
        rm -rf "$file"
        [ -e "$copy.absent" ] || cp -a "$copy" "$file"
    done
    rm -f /run/xrdp/xrdp.pid /run/xrdp/xrdp-sesman.pid "$CONTROL_SOCKET"
    rm -rf "$work"
    if [ "$status" -eq 0 ]; then log "OK"; else log "FAILED"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the deployment, as deploy/pam/README.md says ---------------------------------------------
log "setting up xrdp, PAM and sudo as deploy/pam/README.md says"
for user in "${USERS[@]}"; do
    useradd -m -s /bin/bash "$user"
    users_added+=("$user")
    echo "$user:$PASSWORD" | chpasswd
    # The session: one terminal (startwm.sh runs ~/.xsession through Xsession).
    echo 'exec xterm' >"/home/$user/.xsession"
    chown "$user:" "/home/$user/.xsession"
done
save /usr/bin/tsagent
install -m 0755 "$bin/tsagent" /usr/bin/tsagent
save /usr/lib/tsagent
install -D -m 0755 deploy/pam/tsagent-session /usr/lib/tsagent/pam-session
save /etc/pam.d/xrdp-sesman
echo 'session optional pam_exec.so quiet /usr/lib/tsagent/pam-session' >>/etc/pam.d/xrdp-sesman
install -D -m 0755 deploy/xrdp/tsagent-reconnect /usr/lib/tsagent/xrdp-reconnect
save /etc/sudoers.d/tsagent
install -m 0440 deploy/xrdp/sudoers /etc/sudoers.d/tsagent
visudo -cf /etc/sudoers.d/tsagent >/dev/null || fail "deploy/xrdp/sudoers does not parse"
save /etc/xrdp/reconnectwm.sh
install -m 0755 deploy/xrdp/reconnectwm.sh /etc/xrdp/reconnectwm.sh
save /etc/xrdp/xrdp.ini
# [Globals]'s port only: the session types' sections have port= lines of their own.
sed -i '/^\[Globals\]/,/^\[/ s|^port=.*|port=tcp://127.0.0.1:3390|' /etc/xrdp/xrdp.ini
sed -n '/^\[Globals\]/,/^\[/p' /etc/xrdp/xrdp.ini | grep -x 'port=tcp://127.0.0.1:3390' >/dev/null ||
    fail "could not set xrdp's port"
save /run/tsagent
mkdir -p /run/tsagent # the systemd unit's RuntimeDirectory

broker_port=$(free_port)
front_door_port=$(free_port)
broker="127.0.0.1:$broker_port"

# xrdp logs to /var/log/xrdp.log whatever else it does: only what it writes from here on counts.
xrdp_log_lines=$( (cat /var/log/xrdp.log 2>/dev/null || true) | wc -l)
xrdp-sesman --nodaemon >"$work/sesman.log" 2>&1 &
sesman=$!
pids+=("$sesman")
xrdp --nodaemon >"$work/xrdp.log" 2>&1 &
pids+=($!)
"$bin/tsbroker" --listen "$broker" --database-url "sqlite://$work/tsbroker.db" >"$work/broker.log" 2>&1 &
pids+=($!)
agent=""
start_agent() {
    RUST_LOG=info "$bin/tsagent" --broker "http://$broker" --farm "$FARM" --machine-name xrdp-check \
        --advertise "127.0.0.1:$front_door_port" --front-door "127.0.0.1:$front_door_port" \
        --local-rdp 127.0.0.1:3390 --state-dir "$work/agent-state" >>"$work/agent.log" 2>&1 &
    agent=$!
    pids+=("$agent")
}
start_agent

display=""
for n in $(seq 90 140); do
    if [ ! -e "/tmp/.X11-unix/X$n" ] && [ ! -e "/tmp/.X$n-lock" ]; then
        display=":$n"
        break
    fi
done
[ -n "$display" ] || fail "no free X display for the clients"
Xvfb "$display" -screen 0 1024x768x24 -nolisten tcp >"$work/xvfb.log" 2>&1 &
pids+=($!)

listening() { ss -Hltn "sport = :$1" | grep . >/dev/null; }
wait_until 30 listening 3390 || fail "xrdp does not listen on 127.0.0.1:3390"
# True when the agent's log has at least N lines matching PATTERN.
logged() { [ "$(grep -c -- "$2" "$work/agent.log")" -ge "$1" ]; }
wait_until 30 logged 1 'the broker has this machine ready' ||
    fail "the agent did not become ready at the broker"
wait_until 10 listening "$front_door_port" || fail "the front door does not listen"
wait_until 10 test -e "/tmp/.X11-unix/X${display#:}" || fail "Xvfb did not start"

# --- helpers on the broker's view ------------------------------------------------------------
# Prints the user's sessions in the farm as the broker lists them: "ID STATE" lines.
sessions_of() {
    grpcurl -plaintext -d "{\"user_name\": \"$1\", \"farm\": \"$FARM\"}" "$broker" \
        tsbroker.v1.Broker/ListSessions | python3 -c '
import json, sys
for s in json.load(sys.stdin).get("sessions", []):
    print(s.get("sessionId", 0), s.get("state", "").removeprefix("SESSION_STATE_"))'
}
# True when the user's sessions are exactly EXPECTED ("ID STATE" lines, or "" for none).
sessions_are() { [ "$(sessions_of "$1")" = "$2" ]; }
# True when the user has exactly one session in STATE with an id in [LOW, HIGH).
one_session_in() {
    local lines id state
    lines=$(sessions_of "$1")
    [ "$(printf '%s\n' "$lines" | grep -c .)" -eq 1 ] || return 1
    read -r id state <<<"$lines"
    [ "$state" = "$2" ] && [ "$id" -ge "$3" ] && [ "$id" -lt "$4" ]
}
expect_sessions() {
    local user=$1 expected=$2 seconds=$3 what=$4
    wait_until "$seconds" sessions_are "$user" "$expected" ||
        fail "$what: the broker lists [$(sessions_of "$user" | paste -sd, -)] for $user, not [$(printf '%s' "$expected" | paste -sd, -)]"
}

client=""
# Starts a real client through the front door at PORT (this machine's unless given; it stays
# connected until stop_client).
start_client() {
    HOME=$work DISPLAY=$display "$XFREERDP" "/v:127.0.0.1:${3:-$front_door_port}" "/u:$1" "/p:$2" /cert:ignore \
        /log-level:INFO >>"$work/client-$1.log" 2>&1 &
    client=$!
    pids+=("$client")
}
stop_client() {
    kill "$client" 2>/dev/null || true
    wait "$client" 2>/dev/null || true
}

# --- the checks -------------------------------------------------------------------------------
ann=${USERS[0]}
ben=${USERS[1]}
cat=${USERS[2]}
dan=${USERS[3]}
chris=${USERS[4]}
christa=${USERS[5]}

log "clients: $XFREERDP ($(DISPLAY=$display "$XFREERDP" --version 2>&1 | grep -m1 -o 'FreeRDP version [^ ]*')) and rdesktop"
log "1. $ann logs on through the front door"
start_client "$ann" "$PASSWORD"
# xrdp numbers sessions by X display from 10; ids the agent allocates itself start at 100000.
wait_until "$LOGON_SECONDS" one_session_in "$ann" ACTIVE 10 100000 ||
    fail "logon: the broker lists [$(sessions_of "$ann" | paste -sd, -)] for $ann, not one ACTIVE session under xrdp's display number (PAM's logon merged with the front door's)"
read -r id _ <<<"$(sessions_of "$ann")"
log "   one ACTIVE session, $id (display :$id)"

log "2. $ann's client leaves"
stop_client
expect_sessions "$ann" "$id DISCONNECTED" 15 "disconnect"

log "3. $ann comes back"
reason=$(grpcurl -plaintext -d "{\"user_name\": \"$ann\", \"farm\": \"$FARM\"}" "$broker" \
    tsbroker.v1.Broker/Redirect | python3 -c 'import json, sys; print(json.load(sys.stdin).get("reason", ""))')
[ "$reason" = REDIRECT_REASON_EXISTING_SESSION ] || fail "Redirect for $ann answered $reason"
start_client "$ann" "$PASSWORD"
reconnected="event=Reconnect session_id=$id user=$ann"
wait_until "$LOGON_SECONDS" logged 1 "$reconnected" ||
    fail "xrdp's reconnect hook did not report session $id"
expect_sessions "$ann" "$id ACTIVE" 15 "reconnection"
[ "$(pgrep -c -u "$ann" -x Xorg)" -eq 1 ] || fail "$ann has more than one X server: xrdp started a second session"
stop_client
expect_sessions "$ann" "$id DISCONNECTED" 15 "disconnect after the reconnection"

log "4. $ann comes back through another machine's front door"
# A second machine of the farm with no RDP service of its own: its front door sends ann to
# this machine's (PROXY v2 header first), which hands the connection to xrdp.
other_port=$(free_port)
RUST_LOG=info "$bin/tsagent" --broker "http://$broker" --farm "$FARM" --machine-name xrdp-check-other \
    --advertise "127.0.0.1:$other_port" --front-door "127.0.0.1:$other_port" \
    --local-rdp "127.0.0.1:$(free_port)" --control-socket "$work/other.sock" \
    --state-dir "$work/other-state" >"$work/other-agent.log" 2>&1 &
other=$!
pids+=("$other")
wait_until 30 grep -qs 'the broker has this machine ready' "$work/other-agent.log" ||
    fail "the second agent did not become ready at the broker"
start_client "$ann" "$PASSWORD" "$other_port"
wait_until "$LOGON_SECONDS" logged 2 "$reconnected" ||
    fail "xrdp's reconnect hook did not report session $id for the connection through the other front door"
expect_sessions "$ann" "$id ACTIVE" 15 "reconnection through the other front door"
grep -q 'routing to another machine.*machine=xrdp-check ' "$work/other-agent.log" ||
    fail "the other front door did not send $ann to this machine"
stop_client
expect_sessions "$ann" "$id DISCONNECTED" 15 "disconnect through the other front door"
kill -TERM "$other" # it stops (unreachable: no new logons there), so later logons are placed here
wait "$other" 2>/dev/null || true

log "5. the agent is killed while $ann is connected, and started again"
start_client "$ann" "$PASSWORD"
wait_until "$LOGON_SECONDS" logged 3 "$reconnected" ||
    fail "xrdp's reconnect hook did not report session $id again"
expect_sessions "$ann" "$id ACTIVE" 15 "second reconnection"
kill -KILL "$agent"
wait "$agent" 2>/dev/null || true
stop_client # its connection went with the agent; it must not reconnect on its own
start_agent
wait_until 30 logged 2 'the broker has this machine ready' ||
    fail "the restarted agent did not become ready at the broker"
expect_sessions "$ann" "$id DISCONNECTED" 15 "the session after the agent's crash"

# USER logs on with the client START (a function) starts, leaves, comes back with it and leaves
# again; WHAT names the client in failures.
logon_leave_return() {
    local user=$1 start=$2 what=$3 session
    "$start" "$user"
    wait_until "$LOGON_SECONDS" one_session_in "$user" ACTIVE 10 100000 ||
        fail "logon with $what: the broker lists [$(sessions_of "$user" | paste -sd, -)] for $user, not one ACTIVE session under xrdp's display number"
    read -r session _ <<<"$(sessions_of "$user")"
    stop_client
    expect_sessions "$user" "$session DISCONNECTED" 15 "disconnect of $what"
    "$start" "$user"
    wait_until "$LOGON_SECONDS" logged 1 "event=Reconnect session_id=$session user=$user" ||
        fail "xrdp's reconnect hook did not report session $session for $what"
    expect_sessions "$user" "$session ACTIVE" 15 "reconnection with $what"
    [ "$(pgrep -c -u "$user" -x Xorg)" -eq 1 ] ||
        fail "$user has more than one X server: xrdp started a second session"
    stop_client
    expect_sessions "$user" "$session DISCONNECTED" 15 "disconnect after the reconnection with $what"
}

log "6. $cat logs on with rdesktop, leaves and comes back"
# rdesktop asks on its standard input whether to trust the server's certificate, and keeps the
# answer under $HOME.
start_rdesktop() {
    HOME=$work DISPLAY=$display rdesktop -u "$1" -p "$PASSWORD" "127.0.0.1:$front_door_port" \
        <<<yes >>"$work/rdesktop-$1.log" 2>&1 &
    client=$!
    pids+=("$client")
}
logon_leave_return "$cat" start_rdesktop rdesktop

log "7. $dan logs on with a collection instead of a user cookie, leaves and comes back"
# The front door cannot tell whose connection it hands to xrdp: it is the one PAM's logon and
# the reconnect hook report because it is the only one open.
start_collection_client() {
    HOME=$work DISPLAY=$display "$XFREERDP" "/v:127.0.0.1:$front_door_port" "/u:$1" "/p:$PASSWORD" \
        /cert:ignore "/load-balance-info:tsv://MS Terminal Services Plugin.1.$FARM" \
        /log-level:INFO >>"$work/client-$1.log" 2>&1 &
    client=$!
    pids+=("$client")
}
logon_leave_return "$dan" start_collection_client "a collection and no user cookie"
# Back from two devices in turn: xrdp hands the session to the second client and drops the
# first, whose end must not make the session DISCONNECTED while the second is attached.
read -r dan_id _ <<<"$(sessions_of "$dan")"
dan_reconnected="event=Reconnect session_id=$dan_id user=$dan"
start_collection_client "$dan"
first=$client
wait_until "$LOGON_SECONDS" logged 2 "$dan_reconnected" ||
    fail "xrdp's reconnect hook did not report session $dan_id for the first device"
expect_sessions "$dan" "$dan_id ACTIVE" 15 "reconnection from the first device"
start_collection_client "$dan"
wait_until "$LOGON_SECONDS" logged 3 "$dan_reconnected" ||
    fail "xrdp's reconnect hook did not report session $dan_id for the second device"
first_gone() { ! kill -0 "$first" 2>/dev/null; }
wait_until 30 first_gone || fail "xrdp did not drop the first device's client"
sleep 2
expect_sessions "$dan" "$dan_id ACTIVE" 1 "the first device dropped while the second is attached"
stop_client
expect_sessions "$dan" "$dan_id DISCONNECTED" 15 "disconnect of the second device"

log "8. $ben types a wrong password"
start_client "$ben" wrong-password
wait_until 30 one_session_in "$ben" ACTIVE 100000 4294967296 ||
    fail "the front door's logon for $ben is not listed: [$(sessions_of "$ben" | paste -sd, -)]"
xrdp_refused() { tail -n +"$((xrdp_log_lines + 1))" /var/log/xrdp.log | grep "login failed for user $ben" >/dev/null; }
wait_until 30 xrdp_refused ||
    fail "xrdp did not refuse the wrong password"
stop_client
expect_sessions "$ben" "" 15 "failed logon"

log "9. $ann and $cat come back and $ben logs on, all at once, then all leave"
read -r cat_id _ <<<"$(sessions_of "$cat")"
together=()
for user in "$ann" "$cat" "$ben"; do
    start_client "$user" "$PASSWORD"
    together+=("$client")
done
wait_until "$LOGON_SECONDS" one_session_in "$ben" ACTIVE 10 100000 ||
    fail "concurrent logon: the broker lists [$(sessions_of "$ben" | paste -sd, -)] for $ben, not one ACTIVE session under xrdp's display number"
read -r ben_id _ <<<"$(sessions_of "$ben")"
expect_sessions "$ann" "$id ACTIVE" 30 "concurrent reconnection"
expect_sessions "$cat" "$cat_id ACTIVE" 30 "concurrent reconnection"
for user in "$ann" "$cat" "$ben"; do
    [ "$(pgrep -c -u "$user" -x Xorg)" -eq 1 ] || fail "$user has more than one X server after the concurrent logons"
done
for client in "${together[@]}"; do stop_client; done
expect_sessions "$ann" "$id DISCONNECTED" 15 "concurrent disconnect"
expect_sessions "$cat" "$cat_id DISCONNECTED" 15 "concurrent disconnect"
expect_sessions "$ben" "$ben_id DISCONNECTED" 15 "concurrent disconnect"

log "10. $ann's session ends (its programs exit)"
pkill -u "$ann" -x xterm || fail "no xterm of $ann's session"
expect_sessions "$ann" "" 30 "logoff"

log "11. xrdp-sesman restarts; $cat comes back and is given a new session"
# The restarted sesman no longer knows cat's disconnected session (it keeps running, an
# orphan): the cookie ties the connection to it, and xrdp starts another, which PAM reports.
kill -TERM "$sesman"
wait "$sesman" 2>/dev/null || true
xrdp-sesman --nodaemon >>"$work/sesman.log" 2>&1 &
sesman=$!
pids+=("$sesman")
wait_until 30 listening 3350 || fail "xrdp-sesman did not start again"
start_client "$cat" "$PASSWORD"
two_xorgs() { [ "$(pgrep -c -u "$cat" -x Xorg)" -eq 2 ]; }
wait_until "$LOGON_SECONDS" two_xorgs ||
    fail "the restarted xrdp-sesman did not start a new session for $cat"
new_session_active() {
    local lines
    lines=$(sessions_of "$cat")
    [ "$(printf '%s\n' "$lines" | grep -c .)" -eq 2 ] &&
        printf '%s\n' "$lines" | grep -qx "$cat_id DISCONNECTED" &&
        printf '%s\n' "$lines" | grep -v "^$cat_id " | grep -q ' ACTIVE$'
}
wait_until 30 new_session_active ||
    fail "new session for a returning client: the broker lists [$(sessions_of "$cat" | paste -sd, -)] for $cat, not $cat_id DISCONNECTED and a new ACTIVE session"
new_id=$(sessions_of "$cat" | grep -v "^$cat_id " | cut -d' ' -f1)
stop_client
both_disconnected() {
    [ "$(sessions_of "$cat" | sort -n)" = "$(printf '%s DISCONNECTED\n%s DISCONNECTED' "$cat_id" "$new_id" | sort -n)" ]
}
wait_until 15 both_disconnected ||
    fail "the new session's client left: the broker lists [$(sessions_of "$cat" | paste -sd, -)] for $cat, not $cat_id and $new_id DISCONNECTED"

log "12. $ben runs the reconnect hook by hand for a display that is no session of his"
su -s /bin/sh "$ben" -c 'sudo -n /usr/lib/tsagent/xrdp-reconnect :77' >/dev/null 2>&1 || true
sleep 1
expect_sessions "$ben" "$ben_id DISCONNECTED" 5 "a made-up display number"

log "13. $christa logs on and leaves; $chris, whose 9 characters start her name, logs on"
start_client "$christa" "$PASSWORD"
wait_until "$LOGON_SECONDS" one_session_in "$christa" ACTIVE 10 100000 ||
    fail "logon: the broker lists [$(sessions_of "$christa" | paste -sd, -)] for $christa, not one ACTIVE session"
read -r christa_id _ <<<"$(sessions_of "$christa")"
stop_client
expect_sessions "$christa" "$christa_id DISCONNECTED" 15 "disconnect of $christa"
start_client "$chris" "$PASSWORD"
wait_until "$LOGON_SECONDS" one_session_in "$chris" ACTIVE 10 100000 ||
    fail "logon of a name a cut cookie shares: the broker lists [$(sessions_of "$chris" | paste -sd, -)] for $chris, not one ACTIVE session"
read -r chris_id _ <<<"$(sessions_of "$chris")"
expect_sessions "$christa" "$christa_id DISCONNECTED" 5 "$christa's session while $chris is logged on"
stop_client
expect_sessions "$chris" "$chris_id DISCONNECTED" 15 "disconnect of $chris"
expect_sessions "$christa" "$christa_id DISCONNECTED" 5 "$christa's session after $chris left"
start_client "$chris" "$PASSWORD"
wait_until "$LOGON_SECONDS" logged 1 "event=Reconnect session_id=$chris_id user=$chris" ||
    fail "xrdp's reconnect hook did not report session $chris_id of $chris"
expect_sessions "$chris" "$chris_id ACTIVE" 15 "reconnection of $chris"
expect_sessions "$christa" "$christa_id DISCONNECTED" 5 "$christa's session while $chris is back"
stop_client
expect_sessions "$chris" "$chris_id DISCONNECTED" 15 "disconnect of $chris after the reconnection"
