#!/usr/bin/env bash
# Set up .venv if needed, then lint and run the test suite on two workers (pytest-xdist; each
# test file stays on one worker). Extra arguments go to pytest (e.g. -m "not slow" for the quick
# tests only, -n 0 for one process, or a test file).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -n "${MEDSEG_TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder "$@"
