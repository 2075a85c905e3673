#!/usr/bin/env bash
# The suite under a Space's versions: Python 3.12 and the torch that requirements.txt picks there
# (2.11.0), where CI runs 3.11 with torch 2.13.0. Needs a Python 3.12 (PYTHON, default python3.12);
# installs into a venv outside the repository (VENV), torch's CUDA wheels included (a few GB).
# Left out: the Triton kernels' tests, which without a GPU run the kernels in Triton's interpreter:
# torch 2.11's wrap_triton refuses its functions, and Triton 3.6's interpreter fails on a loop over
# a scalar argument ("only 0-dimensional arrays can be converted"); on a GPU they pass (gpu_suite.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.12}"
VENV="${VENV:-/tmp/frankenmerge-space-venv}"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# requirements-dev.txt's own lines but its triton pin, which is torch 2.13's (torch 2.11 brings its own)
mapfile -t dev < <(grep -v -e '^#' -e '^-r' -e '^triton==' -e '^$' requirements-dev.txt)
"$VENV/bin/pip" install -q -r requirements.txt "${dev[@]}"
"$VENV/bin/pip" install -q --no-deps -r requirements-bundled.txt
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --deselect tests/test_decode_kernel.py --deselect tests/test_gemv.py::test_gemv_ \
  --deselect tests/test_decode_attention.py::test_every_attention_the_benchmark_times_equals_sdpa_over_the_slots_in_use "$@"
