#!/usr/bin/env bash
# Sets up the pinned environment (idempotent) and runs the whole test suite on the CPU.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" test
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2
# Two workers: compiles are single-threaded, and CI has two cores.
python -m pytest -q -n 2 -p no:cacheprovider "$@"
