#!/usr/bin/env bash
# The checks only a GPU can make, in one script (under 8 minutes on one GPU), with one JSON summary.
#
#   bash bench/gpu.sh --fetch-wheels     # HERE (with a package registry): the packages the GPU machine lacks
#   bash bench/gpu.sh [--out DIR]        # on a machine with one CUDA GPU and torch, transformers,
#                                        # accelerate, peft installed; nothing downloaded
#   bash bench/gpu.sh --dry-run          # the same steps on a CPU at tiny sizes (what CI-like machines can check)
#
# Steps (each one's log and result under DIR, default bench/.work/gpu; a failed step is recorded, the
# script goes on):
#   1. tests   pytest -m gpu: the subset that matters on a GPU (bf16/fp16 paths, the chunked LM head,
#              CUDA-only checks that skip on a CPU)
#   2. ppo     the PPO quickstart (from builtin:small-gpt2) for a few iterations in bf16, generation backend hf;
#      ppo_vllm   the same with generation.backend vllm, when vllm imports here and a CUDA GPU is present (vLLM and
#              its dependencies are installed beforehand: they are far larger than what travels as wheels)
#   3. memory  bench/memory.py: peak memory against vocabulary and length (torch's peak allocation on a GPU),
#              against TRL when its wheels were carried
#   4. speed   bench/ppo.py: PPO seconds per iteration against TRL 1.12 (only when its wheels were carried)
# then DIR/summary.json. Wheels: .whl (rlhf's own missing dependencies), .whl-trl-ppo (trl 1.12.0),
# .whl-trl (trl 1.16): each installed with --target into its own folder; a peer interpreter is a
# two-line wrapper at bench/.venv-trl*/bin/python that puts its folder first on PYTHONPATH.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
cd "$root"
python="${PYTHON:-python3}"
dry=0
out="$root/bench/.work/gpu"
fetch=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --out) out="$2"; shift ;;
    --fetch-wheels) fetch=1 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

if [ "$fetch" = 1 ]; then  # the GPU image's Python is 3.12 on x86-64 (see the device notes)
  get() { "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$@"; }
  get .whl "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19" && \
  get .whl-trl-ppo "trl==1.12.0" && get .whl-trl "trl==1.16.0"
  exit $?
fi

mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
install_site() {  # install_site WHEEL_DIR SITE: wheels to a folder, no index, no dependencies resolved
  [ -d "$1" ] || return 1
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl
}
if install_site .whl /tmp/rlhf-site; then export PYTHONPATH="$PYTHONPATH:/tmp/rlhf-site"; fi
trl_flag=--no-trl
for peer in trl-ppo trl; do
  if [ ! -x "bench/.venv-$peer/bin/python" ] && install_site ".whl-$peer" "/tmp/site-$peer"; then
    mkdir -p "bench/.venv-$peer/bin"
    printf '#!/bin/sh\nPYTHONPATH="/tmp/site-%s:$PYTHONPATH" exec %s "$@"\n' "$peer" "$(command -v "$python")" \
      > "bench/.venv-$peer/bin/python"
    chmod +x "bench/.venv-$peer/bin/python"
  fi
done
[ -x bench/.venv-trl-ppo/bin/python ] && [ -x bench/.venv-trl/bin/python ] && trl_flag=""

if [ "$dry" = 1 ]; then  # tiny sizes: the same steps, a few minutes on a CPU
  episodes=128; vocab="4096 32768"; lengths="128"; ppo_args="--iterations 2 --batch-size 8 --response-length 8 --gold-prompts 8"
else
  episodes=256; vocab="4096 32768 131072"; lengths="128 512 1024"; ppo_args="--iterations 6 --batch-size 64 --response-length 64"
fi
started=$(date +%s)
step() {  # step NAME TIMEOUT COMMAND...: run, keep the log and the exit code
  local name="$1" limit="$2"; shift 2
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name $? $(( $(date +%s) - t0 ))" >> "$out/steps.txt"
}
: > "$out/steps.txt"

step tests 240 "$python" -m pytest -q -m gpu -p no:cacheprovider --junitxml "$out/tests.xml"
step ppo 180 "$python" -m rlhf_cli ppo configs/quickstart-ppo-sentiment.yaml --overwrite \
  --output-dir "$out/ppo-bf16" --set model.model_name_or_path=builtin:small-gpt2 --set training.bf16=true \
  --set "ppo.total_episodes=$episodes" --set training.save_steps=1000
if "$python" -c "import torch, vllm; assert torch.cuda.is_available()" > /dev/null 2>&1; then
  step ppo_vllm 240 "$python" -m rlhf_cli ppo configs/quickstart-ppo-sentiment.yaml --overwrite \
    --output-dir "$out/ppo-bf16-vllm" --set model.model_name_or_path=builtin:small-gpt2 --set training.bf16=true \
    --set "ppo.total_episodes=$episodes" --set training.save_steps=1000 --set generation.backend=vllm
fi
# shellcheck disable=SC2086  # the size lists are words on purpose
step memory 240 "$python" bench/memory.py $trl_flag --vocab $vocab --lengths $lengths
if [ -z "$trl_flag" ]; then
  # shellcheck disable=SC2086
  step speed 200 "$python" bench/ppo.py --reward function --rounds 1 --no-floor $ppo_args
fi

"$python" - "$out" "$dry" "$started" <<'EOF'
import json, sys, time
from pathlib import Path
import torch

out, dry, started = Path(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
steps = {}
for line in (out / "steps.txt").read_text().splitlines():
    name, code, seconds = line.split()
    steps[name] = {"exit": int(code), "seconds": int(seconds)}

def last_json(name):  # the benchmarks end with ONE JSON line
    log = out / f"{name}.log"
    lines = [l for l in log.read_text().splitlines() if l.startswith("{")] if log.exists() else []
    return json.loads(lines[-1]) if lines else None

def ppo_run(folder):
    metrics = out / folder / "metrics.jsonl"
    rows = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
    rows = [r for r in rows if "time/update_s" in r]
    return {"iterations": len(rows), "scores": [r["objective/scores"] for r in rows],
            "s_per_iteration": [round(r["time/generate_s"] + r["time/score_s"] + r["time/update_s"], 3) for r in rows]}

summary = {
    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "dry_run": dry,
    "torch": torch.__version__, "wall_s": int(time.time()) - started, "steps": steps,
    "ppo_bf16": {"hf": ppo_run("ppo-bf16"), "vllm": ppo_run("ppo-bf16-vllm") if "ppo_vllm" in steps
                 else "skipped: vllm does not import here, or no CUDA GPU"},
    "memory": last_json("memory"), "speed": last_json("speed") if "speed" in steps else "skipped: no TRL wheels carried",
}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: summary[k] for k in ("device", "dry_run", "wall_s", "steps")}))
sys.exit(0 if all(s["exit"] == 0 for s in steps.values()) else 1)
EOF
