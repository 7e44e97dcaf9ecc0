#!/usr/bin/env bash
# Set up, then run the whole test suite: Python (engine, magics, notebook, browser) and TypeScript.
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser test drives Debian's Chromium (never a browser downloaded by a test tool).
if ! command -v chromium >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
bash scripts/setup.sh
(cd labextension && npm ci --no-audit --no-fund --loglevel=error && npm test --silent)
python3 -m jupyterlab.labextensions list 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -q "ipylora v.* enabled OK" \
  || { echo "the ipylora JupyterLab extension is not installed/enabled"; exit 1; }
IPYLORA_REQUIRE_BROWSER=1 python3 -m pytest -q --durations=15 "$@"
