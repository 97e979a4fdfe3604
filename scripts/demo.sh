#!/usr/bin/env bash
# Sets up the pinned environment (idempotent), trains the embedded default (a dataset the project
# generates itself) on the CPU, and draws the trained tokens' RoIs on validation images.
# Usage: bash scripts/demo.sh [WORKDIR]   (default: workdirs/default; rerunning resumes/finishes)
# SPARSEFORMER_DEMO_CONFIG picks another config, e.g. configs/default.py:smoke (under a minute).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
workdir="${1:-workdirs/default}"
config="${SPARSEFORMER_DEMO_CONFIG:-configs/default.py}"
export TF_CPP_MIN_LOG_LEVEL=2
python main.py --config "$config" --workdir "$workdir"
python scripts/visualize.py --checkpoint "$workdir" --dataset_images 8 --out "$workdir/rois.png"
echo "Done: metrics in $workdir/metrics.jsonl, TensorBoard events in $workdir, RoIs in $workdir/rois.png"
