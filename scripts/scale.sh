#!/usr/bin/env bash
# Regenerate figures/scale.png and figures/scale_peers.png (about 1.5 hours on 2 cores):
# spfa's time per pass and memory from 10k to 200k cells (5 passes each), then spfa,
# GLM-PCA and MOFA+ run to convergence at 10k and 30k cells.
# Installs spfa (CPU torch) with the optional peers (GLM-PCA, MOFA+).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
python3 -m pip install -q "torch==2.13.0" -e ".[bench]"
python3 -m simulations.scale --ns 10000 30000 100000 200000 --p 5000 --batch-size 128 \
    --max-iter 5 --out runs/scale "$@"
python3 -m simulations.scale --ns 10000 30000 --p 5000 --batch-size 128 --max-iter 300 \
    --peers glmpca mofa+ --peer-max-n 30000 --peer-timeout 1200 --out runs/scale_peers "$@"
cp runs/scale/scale.png figures/scale.png
cp runs/scale_peers/scale.png figures/scale_peers.png
