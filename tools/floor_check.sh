#!/usr/bin/env bash
# The oldest torch pyproject.toml admits, tried for real: a fresh venv with torch 2.5.1 and torchvision 0.20.1
# (PyPI's CUDA builds, about 5 GB; they run on the CPU), transformers 4.56.2 (transformers 5 needs torch 2.6) and
# the hub and tokenizers releases it takes; every other package as CI pins it (constraints.txt). Then `pip check`
# and the README's test command. Usage: bash tools/floor_check.sh [VENV_DIR] (default /tmp/rtdistill-floor).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/rtdistill-floor}"
pins="$venv/floor-constraints.txt"
"${PYTHON:-python3}" -m venv "$venv"
# constraints.txt without what the floor replaces or what torch 2.5.1 / transformers 4.56 pin themselves
grep -v -i -E '^(torch|torchvision|sympy|transformers|huggingface[-_]hub|tokenizers|hf-xet)==' constraints.txt > "$pins"
printf '%s\n' torch==2.5.1 torchvision==0.20.1 transformers==4.56.2 >> "$pins"
"$venv/bin/pip" install -q torch==2.5.1 torchvision==0.20.1
"$venv/bin/pip" install -q -c "$pins" -e ".[dev]"
"$venv/bin/pip" check
"$venv/bin/python" -c "import torch, torchvision, transformers; print('floor:', torch.__version__, torchvision.__version__, transformers.__version__)"
HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -n 2
