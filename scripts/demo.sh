#!/usr/bin/env bash
# Set up .venv if needed, then run the embedded demo: synthetic phantoms -> U-Net training ->
# evaluation on held-out patients -> SavedModel export -> prediction on images and DICOM scans.
# Extra arguments go to `medseg demo` (e.g. --set train.epochs=5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/medseg demo "$@"
