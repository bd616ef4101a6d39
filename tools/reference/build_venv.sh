#!/usr/bin/env bash
# Builds the pinned reference venv (diffusers + torch CPU) at $1 (default: .refvenv in the repo root).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/../../.refvenv}"
python3 -m venv "$venv"
"$venv/bin/pip" install -q -r "$here/requirements.txt"
"$venv/bin/python" -c "import torch, diffusers, transformers; print('reference venv:', torch.__version__, diffusers.__version__, transformers.__version__)"
