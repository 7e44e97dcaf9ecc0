#!/usr/bin/env bash
# Set up, then run the quick-start notebook headless on the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 scripts/run_quickstart.py
