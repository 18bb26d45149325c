#!/bin/sh
# The coordinator image's entry point: create the state on first start, then run
# `confide-server ARGS --dir STATE` (default: start).
#
#   CONFIDE_STATE  state folder (default /var/lib/confide/coordinator)
#   CONFIDE_HOSTS  comma-separated names institutions use to reach this server; they go into
#                  the TLS certificate on first start (default localhost)
set -eu
STATE="${CONFIDE_STATE:-/var/lib/confide/coordinator}"
if [ ! -f "$STATE/settings.toml" ]; then
    hosts=""
    for host in $(echo "${CONFIDE_HOSTS:-localhost}" | tr ',' ' '); do
        hosts="$hosts --host $host"
    done
    # shellcheck disable=SC2086  # one word per --host
    confide-server init --dir "$STATE" $hosts
fi
[ "$#" -gt 0 ] || set -- start
exec confide-server "$@" --dir "$STATE"
