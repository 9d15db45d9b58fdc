#!/usr/bin/env bash
# Regenerate figures/ and the benchmark table: sanity checks (10 replicates),
# peer benchmark (3 replicates; add --large for the 5,000 x 2,000 design), figures.
# Installs spfa (CPU torch) with the optional peers (GLM-PCA, MOFA+).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
python3 -m pip install -q "torch==2.13.0" -e ".[bench]"
python3 -m simulations.sanity_checks --n-reps 10 --out runs/sanity
python3 -m simulations.benchmark --n-reps 3 --out runs/benchmark "$@"
python3 -m simulations.figures --sanity runs/sanity --benchmark runs/benchmark --out figures
cp runs/benchmark/benchmark.md figures/benchmark.md
