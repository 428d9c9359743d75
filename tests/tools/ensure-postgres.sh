#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 for the storage tests.
# Order: already running -> start the machine's cluster -> (root) install Debian's server and start it.
set -euo pipefail
ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if [ -n "${PARLEY_TEST_POSTGRES_URL:-}" ]; then exit 0; fi   # the caller brings its own server
command -v pg_isready >/dev/null && ready && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "PostgreSQL is not answering on 127.0.0.1:5432: start it, or set PARLEY_TEST_POSTGRES_URL." >&2
  exit 1
fi
if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
ver=$(ls /etc/postgresql | sort -V | tail -n 1)
pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || true
for _ in $(seq 1 30); do ready && break; sleep 1; done
ready || { echo "PostgreSQL did not start" >&2; exit 1; }
# Trust auth on loopback for the tests, as on this machine kind; only touched when we installed it.
if ! psql -h 127.0.0.1 -U postgres -c 'select 1' >/dev/null 2>&1; then
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  sed -i -E 's/^(host\s+all\s+all\s+127\.0\.0\.1\/32\s+)\S+/\1trust/' "$hba"
  pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
fi
