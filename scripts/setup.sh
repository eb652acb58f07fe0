#!/usr/bin/env bash
# Creates the virtual environment and installs the project with its test tools. Safe to run again.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

# The CPU build of torch first: with it installed, later requirements on torch install nothing more.
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[dev,eval,data]"
# OpenAI's dVAE package, only for the parity tests; --no-deps keeps it from pulling torchvision.
"$VENV/bin/python" -c "import dall_e" 2>/dev/null || pip install --no-deps "DALL-E==0.1" || echo "setup: DALL-E package unavailable; parity tests will be skipped"

# open_clip, only for the CLIP parity tests and its BPE vocabulary; --no-deps again (it asks for torchvision).
"$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('open_clip')" 2>/dev/null \
  || pip install --no-deps "open_clip_torch==3.3.0" || echo "setup: open_clip unavailable; CLIP parity tests will be skipped"

bash scripts/install-system-data.sh || true
