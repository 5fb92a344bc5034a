#!/usr/bin/env bash
# The test suite (CPU). Sets everything up on first use. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
"$root/.venv/bin/ruff" check .
exec "$root/.venv/bin/python" -m pytest "$@"
