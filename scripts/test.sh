#!/usr/bin/env bash
# Sets up the pinned environment (idempotent) and runs the whole test suite on the CPU.
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
source "$(dirname "$0")/setup_env.sh" test
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2
python -m pytest -q -p no:cacheprovider "$@"
