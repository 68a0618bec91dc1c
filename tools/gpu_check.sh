#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py: what it runs and which wheels to carry are in its docstring), with the
# machine's own python3 or $PYTHON. Arguments pass through, e.g. --out FILE, --skip-install, --skip-tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MPLBACKEND=Agg
exec "${PYTHON:-python3}" tools/gpu_check.py "$@"
