#!/usr/bin/env bash
# Installs everything the project and its whole test suite need on a Debian-like machine:
# Graphviz (graph pictures), Chromium (the dashboard's browser tests), PostgreSQL (the store's
# second backend, whose tests start their own servers), the locked npm packages of
# the Node client and of the dashboard, and the Python package with its dev extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v dot >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq graphviz >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq graphviz >/dev/null; fi
fi
# Debian's Chromium drives the dashboard's browser tests (Playwright never downloads a browser here).
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
fi
# PostgreSQL's server programs: the tests start clusters of their own with initdb and pg_ctl
# (tests/postgres.py). initdb refuses root, so a root run gives them to an unprivileged user.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; fi
fi
if [ "$(id -u)" -eq 0 ] && ! id chainrule-pg >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin chainrule-pg
fi
npm ci --prefix client/node --no-audit --no-fund --loglevel=error
# The dashboard's browser libraries (uPlot, Panzoom), served by the dashboard itself.
npm ci --prefix dashboard --no-audit --no-fund --loglevel=error
python -m pip install --quiet -e '.[dev]'
