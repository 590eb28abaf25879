#!/bin/sh
# /etc/xrdp/reconnectwm.sh: xrdp-sesman runs this, as the session's user and with DISPLAY set to
# the session's display, each time a client reattaches to a disconnected session.
# (The file sesman.ini's ReconnectScript names; reconnectwm.sh in /etc/xrdp by default.)

# Tell tsagent about the reconnection (see deploy/xrdp/tsagent-reconnect). Never let it fail or
# delay the reconnection: it runs in the background and its errors go to syslog.
if [ -x /usr/lib/tsagent/xrdp-reconnect ]; then
    sudo -n /usr/lib/tsagent/xrdp-reconnect "$DISPLAY" </dev/null >/dev/null 2>&1 &
fi

# Write procedures here you want to execute on reconnect
