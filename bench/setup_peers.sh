#!/usr/bin/env bash
# Create the two peer environments the benchmarks compare against. TRL is never a dependency of
# rlhf-cli: it lives only in these virtual environments (ignored by git).
#   bench/.venv-trl-ppo  trl==1.12.0  (the last TRL with trl.experimental.ppo.PPOTrainer)
#   bench/.venv-trl      trl==1.16.*  (SFTTrainer, RewardTrainer)
# Each gets torch==2.13.0 first (the CPU build, from local disk), then rlhf-cli editable (for the
# built-in tokenizer, data and gold scorer), then TRL. Idempotent: an existing venv is reused.
# Usage: bash bench/setup_peers.sh [PYTHON]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
python="${1:-python3}"

make_env() {  # make_env FOLDER TRL_REQUIREMENT
  local venv="$here/$1" trl="$2"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import trl, rlhf_cli" 2>/dev/null; then
    echo "$1: ready ($("$venv/bin/python" -c 'import trl; print("trl", trl.__version__)'))"
    return
  fi
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q -e "$root"
  "$venv/bin/pip" install -q "$trl"
  "$venv/bin/python" -c 'import torch, transformers, trl; print("'"$1"': torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)'
}

make_env .venv-trl-ppo "trl==1.12.0"
make_env .venv-trl "trl==1.16.*"
"$here/.venv-trl-ppo/bin/python" -c "from trl.experimental.ppo import PPOConfig, PPOTrainer" \
  && echo ".venv-trl-ppo: trl.experimental.ppo.PPOTrainer imports"
"$here/.venv-trl/bin/python" -c "from trl import SFTTrainer, RewardTrainer" \
  && echo ".venv-trl: SFTTrainer and RewardTrainer import"
