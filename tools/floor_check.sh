#!/usr/bin/env bash
# The oldest releases pyproject.toml admits, installed together in a fresh venv and tried for real: `pip check`
# and the README's test command. torch and torchvision are PyPI's CUDA builds (about 5 GB; they run on the CPU).
# Each pin is the floor declared in pyproject.toml (a patch release of it where that is the first with wheels for
# this Python), except two, raised by what the other floors need:
#   numpy 1.24.4: onnxruntime 1.15.1 (the export floor) needs numpy >= 1.24.2;
#   pyyaml 6.0.1: 5.1 has no wheel for Python 3.11 (6.0 is the first release with one).
# transformers 4.56.2 because transformers 5 needs torch 2.6. The packages without a floor resolve to their newest.
# Usage: bash tools/floor_check.sh [VENV_DIR] (default /tmp/rtdistill-floor).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/rtdistill-floor}"
pins="$venv/floor-constraints.txt"
"${PYTHON:-python3}" -m venv "$venv"
printf '%s\n' torch==2.5.1 torchvision==0.20.1 transformers==4.56.2 timm==1.0.3 accelerate==0.26.1 \
  safetensors==0.4.3 pycocotools==2.0.8 faster-coco-eval==1.4.0 pyyaml==6.0.1 matplotlib==3.6.3 \
  scikit-learn==1.1.3 scipy==1.9.3 numpy==1.24.4 pillow==9.3.0 tqdm==4.60.0 submitit==1.5.4 \
  tensorboard==2.14.0 onnx==1.13.1 onnxruntime==1.15.1 > "$pins"
"$venv/bin/pip" install -q torch==2.5.1 torchvision==0.20.1
"$venv/bin/pip" install -q -c "$pins" -e ".[dev]"
"$venv/bin/pip" check
"$venv/bin/python" -c "import importlib.metadata as m; print('floor:', *(f'{p} {m.version(p)}' for p in
  ('torch', 'torchvision', 'transformers', 'timm', 'accelerate', 'numpy', 'submitit')))"
HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -n 2
