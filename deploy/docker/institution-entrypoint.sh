#!/bin/sh
# The institution image's entry point: join once with the token, then (and on every later
# start) run the SuperNode with the credentials saved in the state folder.
#
#   CONFIDE_SERVER       the coordinator's enrollment service, HOST:PORT (first start only)
#   CONFIDE_TOKEN_FILE   the join token, mounted as a secret (default /run/secrets/confide-token)
#   CONFIDE_DATA         this institution's data file (default /data/local.csv)
#   CONFIDE_LABEL_COLUMN CSV label column (default label)
#   CONFIDE_DEVICE       auto, cpu or cuda (default auto)
#   CONFIDE_MAX_EPSILON  this institution's privacy limit (default 10)
#   CONFIDE_STATE        state folder (default /var/lib/confide/institution)
set -eu
STATE="${CONFIDE_STATE:-/var/lib/confide/institution}"
if [ ! -f "$STATE/institution.toml" ]; then
    : "${CONFIDE_SERVER:?set CONFIDE_SERVER to the coordinator's enrollment address HOST:PORT}"
    exec confide-client join \
        --server "$CONFIDE_SERVER" \
        --token-file "${CONFIDE_TOKEN_FILE:-/run/secrets/confide-token}" \
        --dir "$STATE" \
        --data "${CONFIDE_DATA:-/data/local.csv}" \
        --label-column "${CONFIDE_LABEL_COLUMN:-label}" \
        --device "${CONFIDE_DEVICE:-auto}" \
        --max-epsilon "${CONFIDE_MAX_EPSILON:-10}"
fi
exec confide-client start --dir "$STATE"
