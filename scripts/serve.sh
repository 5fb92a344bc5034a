#!/usr/bin/env bash
# The main job: the disaggregated cluster on this machine (configs/local.yaml: the embedded
# SmolLM2-135M, one prefill and one decode instance as Ray actors, one CPU core each, KV over
# shared memory), serving OpenAI HTTP on :8000 and gRPC on :50051. It prints the endpoints and an
# example call for each once every instance is healthy; Ctrl-C drains and stops.
#   ./scripts/serve.sh                          configs/local.yaml
#   ./scripts/serve.sh --config FILE.yaml       any deployment (see configs/examples/)
#   ./scripts/serve.sh --http-port 0            any other `pdserve serve` option
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
for arg in "$@"; do
  [[ "$arg" == --config || "$arg" == --config=* ]] && exec "$root/.venv/bin/pdserve" serve "$@"
done
exec "$root/.venv/bin/pdserve" serve --config "$root/configs/local.yaml" "$@"
