#!/usr/bin/env bash
# Install ipylora and what its demo and tests need, into the current Python. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU build of torch: on these machines the wheel is on disk; elsewhere it comes from PyPI.
# (A bare "torch" would pull a multi-GB CUDA build; on a GPU machine install your own torch first.)
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# trackers: tests/test_trackers.py reads back TensorBoard, W&B and MLflow runs (~55 s more here, mlflow-skinny).
"$PY" -m pip install -q -e ".[test,trackers]"
