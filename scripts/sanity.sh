#!/usr/bin/env bash
# Install spfa (CPU torch, AnnData extra) and run the main job: the notebook's sanity
# checks, then real cells through the command line (CellTypist's demo counts).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
python3 -m pip install -q "torch==2.13.0" -e ".[anndata]"
python3 -m simulations.sanity_checks "$@"

# Real cells: 559 cells x 32,786 genes of 10x UMI counts that ship inside CellTypist's
# wheel (installed into runs/demo only, without its dependencies).
demo=runs/demo
csv="$demo/packages/celltypist/data/samples/sample_cell_by_gene.csv"
[ -f "$csv" ] || python3 -m pip install -q --no-deps --target "$demo/packages" "celltypist==1.7.1"
python3 -m spfa fit "$csv" --n-components 30 --n-top-features 2000 --seed 0 \
    --output "$demo/celltypist.h5ad" --save-model "$demo/celltypist.model" \
    --log-dir "$demo/tensorboard"
python3 -m spfa info "$demo/celltypist.model"
python3 -m spfa top-features "$demo/celltypist.model" -n 5
python3 -m spfa plot "$demo/celltypist.h5ad" --output "$demo/overview.png"
echo "real cells: $demo/celltypist.h5ad (X_spfa, spfa_factors, spfa_pip, uns['spfa']), $demo/overview.png"
