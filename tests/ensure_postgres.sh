#!/usr/bin/env bash
# Makes sure a PostgreSQL server (initdb, pg_ctl) is installed for the suite's throwaway cluster.
# The tests start and stop the cluster themselves; this only installs Debian's package when it
# is missing and we may (root, or sudo without a password).
set -euo pipefail

if command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
  else
    echo "PostgreSQL server not found and cannot install it (not root): install Debian's" \
         "'postgresql' package, or the PostgreSQL tests will be skipped." >&2
    exit 0
  fi
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "PostgreSQL server not found and apt-get is not available: install PostgreSQL 13+," \
       "or the PostgreSQL tests will be skipped." >&2
  exit 0
fi

echo "Installing the PostgreSQL server (Debian package 'postgresql') for the test suite..."
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends postgresql >/dev/null
