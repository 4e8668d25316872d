#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: generate bimodal Trifeatures (32 px, cached in
# ./data) and pretrain CoMM locally with probes and the R/U/S report (written under ./runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/commlab pretrain configs/trifeatures/smoke.yaml "$@"
