#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on 2 workers (a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -n 2 -q "$@"
