#!/usr/bin/env bash
# The main job. Until the cluster lands this runs the engine on the embedded model:
#   ./scripts/serve.sh                      one-shot answer to a sample chat prompt
#   ./scripts/serve.sh --interactive        a chat loop on the terminal
#   ./scripts/serve.sh --prompt "..."       any `pdserve generate` options
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
if [[ $# -eq 0 ]]; then
  set -- --chat --prompt "What is the capital of France?"
fi
exec "$root/.venv/bin/pdserve" generate "$@"
