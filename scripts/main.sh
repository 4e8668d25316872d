#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job: the smoke sweep on generated 32 px Trifeatures
# with the embedded defaults: a local Ray instance and a sqlite MLflow store (./mlflow.db, artifacts
# in ./mlartifacts). Data is rendered once into ./data; Tune/Train state goes to ./sweeps.
# Extra arguments go to `commlab sweep` (e.g. --name my-sweep, --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec .venv/bin/commlab sweep search_spaces/trifeatures-smoke.yaml "$@"
