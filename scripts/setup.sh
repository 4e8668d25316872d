#!/usr/bin/env bash
# Creates .venv (Python >= 3.11) and installs commlab with its dev extras.
# Torch: the CPU build by default. Overrides:
#   COMMLAB_TORCH="torch==2.13.0"        pip requirement for torch (e.g. a CUDA build on a GPU box)
#   COMMLAB_TORCH_INDEX=URL              index to take torch from (default: a local CPU wheel when
#                                        pip's find-links has one, else the PyTorch CPU index)
#   PYTHON=python3.11                    interpreter for the venv
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
"$PY" - <<'PYCHECK'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"commlab needs Python >= 3.11, found {sys.version.split()[0]}")
PYCHECK

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $PY"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip

TORCH_REQ=${COMMLAB_TORCH:-torch==2.13.0}
if python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] torch $(python -c 'import torch; print(torch.__version__)') already installed"
elif [ -n "${COMMLAB_TORCH_INDEX:-}" ]; then
  python -m pip install --quiet "$TORCH_REQ" --index-url "$COMMLAB_TORCH_INDEX"
elif ls ${PIP_FIND_LINKS:-/nonexistent}/torch-*+cpu-*.whl >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_REQ (local CPU wheel)"
  python -m pip install --quiet "$TORCH_REQ"
else
  echo "[setup] installing $TORCH_REQ from the PyTorch CPU index"
  python -m pip install --quiet "$TORCH_REQ" --index-url https://download.pytorch.org/whl/cpu
fi

echo "[setup] installing commlab[dev]"
python -m pip install --quiet -e ".[dev]"
echo "[setup] done: $(python -c 'import commlab, torch, ray, mlflow; print(f"commlab {commlab.__version__}, torch {torch.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}")')"
