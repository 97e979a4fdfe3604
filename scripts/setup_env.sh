#!/usr/bin/env bash
# Creates .venv (Python >= 3.10) and installs the pinned requirements plus this package, once:
# later runs only re-install when a requirements file changed. Source it: `source scripts/setup_env.sh [test]`.
# With the argument `test`, also installs requirements-test.txt (pytest, and torch for the parity tests against torch.load).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$python_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "sparseformer-jax needs Python >= 3.10 (found $("$python_bin" --version 2>&1)); set PYTHON=/path/to/python3.11." >&2
  exit 1
fi
[ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
files=("$root/requirements.txt")
[ "${1:-}" = "test" ] && files+=("$root/requirements-test.txt")
stamp="$venv/.installed-$(cat "${files[@]}" "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "Installing the pinned environment into $venv (first run only) ..."
  python -m pip install -q --upgrade pip
  for f in "${files[@]}"; do python -m pip install -q -r "$f"; done
  python -m pip install -q --no-deps -e "$root"
  touch "$stamp"
fi
cd "$root"
