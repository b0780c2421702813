#!/usr/bin/env bash
# Entrypoint of the replica services.
#
# First start (no cluster in $PGDATA): wait for the primary with pg_isready, then clone it
# with pg_basebackup -R (which writes standby.signal and primary_conninfo) on this
# replica's own physical replication slot. Every start: hand over to the image's own
# entrypoint, which skips initdb because $PGDATA now holds a cluster, and runs "$@".
set -Eeuo pipefail

: "${PGDATA:?PGDATA must be set}"
: "${PRIMARY_HOST:=primary}"
: "${PRIMARY_PORT:=5432}"
: "${REPLICATION_USER:=replicator}"
: "${REPLICATION_PASSWORD:?REPLICATION_PASSWORD must be set}"
: "${REPLICATION_SLOT:?REPLICATION_SLOT must be set}"

as_postgres() {
    if [ "$(id -u)" = 0 ]; then
        gosu postgres "$@"
    else
        "$@"
    fi
}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -d "$PGDATA" ] && [ -n "$(ls -A "$PGDATA")" ]; then
        # pg_basebackup removes what it wrote when it fails, unless it was killed.
        echo "replica: $PGDATA has files but no cluster (an interrupted clone?): emptying it"
        find "$PGDATA" -mindepth 1 -delete
    fi
    mkdir -p "$PGDATA"
    if [ "$(id -u)" = 0 ]; then
        chown postgres:postgres "$PGDATA"
    fi
    chmod 0700 "$PGDATA"

    echo "replica: waiting for the primary at $PRIMARY_HOST:$PRIMARY_PORT"
    until pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT"; do
        sleep 1
    done

    echo "replica: cloning the primary with pg_basebackup (slot $REPLICATION_SLOT)"
    PGPASSWORD="$REPLICATION_PASSWORD" as_postgres pg_basebackup \
        --host="$PRIMARY_HOST" --port="$PRIMARY_PORT" --username="$REPLICATION_USER" \
        --pgdata="$PGDATA" --wal-method=stream --write-recovery-conf \
        --slot="$REPLICATION_SLOT" --checkpoint=fast --no-password
    echo "replica: clone done"
fi

exec docker-entrypoint.sh "$@"
