#!/usr/bin/env bash
# Install what the tests need (Debian chromium for the browser tests) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0
pip install -q -r requirements-dev.txt
pip install -q --no-deps -r requirements-bundled.txt
if ! command -v chromium >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
ruff check .
python -m pytest -q
