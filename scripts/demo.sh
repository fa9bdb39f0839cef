#!/usr/bin/env bash
# The main job on the embedded default, real Fashion-MNIST: set up, adversarially train the demo model
# (the MeanSparseCallback sparsifies and calibrates it at fit end), choose alpha on a held-out split, then
# evaluate base vs MeanSparse with AutoAttack, BPDA-APGD and the per-sample worst case.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONWARNINGS=ignore
# a fixed thread count: the same float reductions on every machine with at least 2 cores (the seed, the seeded
# shuffling and trainer.deterministic in the config do the rest; tests/test_cli_fit.py checks two fits agree)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)
.venv/bin/python cli.py fit --config configs/fashion_mnist_demo.yaml
.venv/bin/python cli.py alpha_search --config configs/fashion_mnist_alpha_search.yaml
.venv/bin/python cli.py evaluate --config configs/fashion_mnist_evaluate.yaml
.venv/bin/python cli.py diagnose --config configs/fashion_mnist_diagnose.yaml
echo
echo "Demo finished in $(( $(date +%s) - start )) s. Results in runs/fashion_mnist_demo/:"
echo "  alpha_search/alpha_search.{md,json,png}  evaluate/evaluation.{md,json,png}  evaluate/histogram_site1.png"
echo "  diagnose_alpha0.5/diagnostics.{md,json}"
