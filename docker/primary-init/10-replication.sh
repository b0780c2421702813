#!/usr/bin/env bash
# Runs once, on the primary's first start: the postgres image runs the files of
# /docker-entrypoint-initdb.d against a temporary, socket-only server after initdb.
#
# Creates the replication role, one physical replication slot per replica, and lets the
# role open replication connections over the network (the image's own pg_hba.conf line,
# "host all all all ...", does not cover the "replication" pseudo-database).
#
# The image may source this file instead of running it: no "set -u" here (it would leak
# into the image's entrypoint); -e and pipefail are what that entrypoint uses already.
set -Ee -o pipefail

: "${REPLICATION_USER:=replicator}"
: "${REPLICATION_SLOTS:=replica_1 replica_2}"
if [ -z "${REPLICATION_PASSWORD:-}" ]; then
    echo "10-replication.sh: REPLICATION_PASSWORD must be set" >&2
    exit 1
fi

run_sql() {
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" "$@"
}

# psql variables (:"name" and :'name') quote the identifier and the literal.
run_sql --set=role="$REPLICATION_USER" --set=password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE :"role" WITH LOGIN REPLICATION PASSWORD :'password';
SQL

for slot in $REPLICATION_SLOTS; do
    run_sql --set=slot="$slot" <<'SQL'
SELECT pg_create_physical_replication_slot(:'slot');
SQL
done

# The method the image uses for its own "host all all all" line: POSTGRES_HOST_AUTH_METHOD
# when set, else password_encryption (scram-sha-256 since PostgreSQL 14, md5 before).
method="${POSTGRES_HOST_AUTH_METHOD:-$(run_sql -qtAX -c 'SHOW password_encryption')}"
printf 'host replication %s all %s\n' "$REPLICATION_USER" "$method" >> "$PGDATA/pg_hba.conf"
echo "10-replication.sh: role $REPLICATION_USER and slots ($REPLICATION_SLOTS) created"
