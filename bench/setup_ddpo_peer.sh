#!/usr/bin/env bash
# Create the peer environment of bench/ddpo.py (ignored by git):
#   bench/.venv-trl-ddpo  trl==0.23.*  (the last TRL with DDPOTrainer; removed in 0.24)
# trl 0.23 predates transformers 5, so this venv gets a transformers 4.x and NOT rlhf-cli with its
# dependencies (they require transformers 5). The TRL side needs only the built-in pipeline folder
# (built by the main venv) and the reward functions of rlhf_cli/builtin/shapes.py (numpy + Pillow):
# bench/ddpo.py puts the repository root on PYTHONPATH for it. diffusers: 0.39 is the newest that
# installs beside a transformers 4.x (0.40+ need huggingface-hub >= 1, transformers 4.57 < 1); the
# main venv has 0.42.1, so the UNet/VAE/scheduler code of the two sides may differ in details.
# peft: DefaultDDPOStableDiffusionPipeline calls diffusers' load_lora_weights even with
# use_lora=False, which raises "PEFT backend is required" (a ValueError TRL does not catch) without it.
# torch==2.13.0 first (the CPU build, from local disk), then the rest. Idempotent: a venv that
# already imports DDPOTrainer is reused.
# Usage: bash bench/setup_ddpo_peer.sh [PYTHON]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-python3}"
venv="$here/.venv-trl-ddpo"
check='from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline'

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
  echo ".venv-trl-ddpo: ready ($("$venv/bin/python" -c 'import trl; print("trl", trl.__version__)'))"
  exit 0
fi
"$python" -m venv "$venv"
echo '*' > "$venv/.gitignore"  # the repository's .gitignore names only the other two peer venvs
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q "trl==0.23.*" "transformers>=4.56.1,<5" "diffusers>=0.35,<0.40" "accelerate>=1.4.0" \
  "peft>=0.8.0" numpy pillow safetensors
"$venv/bin/python" -c "$check" 2>/dev/null
"$venv/bin/python" -c 'import torch, transformers, diffusers, accelerate, trl; print(".venv-trl-ddpo: torch", torch.__version__, "transformers", transformers.__version__, "diffusers", diffusers.__version__, "accelerate", accelerate.__version__, "trl", trl.__version__)'
