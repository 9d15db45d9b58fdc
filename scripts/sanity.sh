#!/usr/bin/env bash
# Install spfa (CPU torch) and run the main job: the notebook's sanity checks.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
python3 -m pip install -q "torch==2.13.0" -e .
python3 -m simulations.sanity_checks "$@"
