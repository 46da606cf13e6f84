#!/usr/bin/env bash
# Set up (if needed) and run the quickstart recipe on the embedded toy model: no download, ~1 minute on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/tokplug run recipes/quickstart.yaml "$@"
