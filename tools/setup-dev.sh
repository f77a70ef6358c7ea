#!/usr/bin/env bash
# Installs everything the project and its whole test suite need on a Debian-like machine:
# Graphviz (graph pictures), the Node client's locked npm packages, and the Python package
# with its dev extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v dot >/dev/null 2>&1; then
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq graphviz >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq graphviz >/dev/null; fi
fi
npm ci --prefix client/node --no-audit --no-fund --loglevel=error
python -m pip install --quiet -e '.[dev]'
