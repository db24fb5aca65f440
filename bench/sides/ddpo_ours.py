"""Our side of bench/ddpo.py: `rlhf ddpo` run as users run it, `python -m rlhf_cli ddpo CONFIG.yaml
--overwrite`, in a child process of this small wrapper (which imports neither torch nor rlhf_cli, so
the child's peak RSS, read with getrusage(RUSAGE_CHILDREN) after it ends, is the stage's own).

The config (written next to the run as <output_dir>.yaml): builtin:tiny-sd with full UNet training
(peft off), builtin:shape-prompts, builtin:jpeg_compressibility, and bench/ddpo.py's settings under
TRL's DDPOConfig key names. Per epoch the stage's metrics.jsonl gives `time/epoch_s` (wall seconds of
sampling + scoring + update, measured by the stage), `reward_mean`, `reward_std`, `loss`,
`approx_kl`, `clipfrac`. Usage: python ddpo_ours.py SPEC.json RESULT.json
"""

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

with open(sys.argv[1]) as f:
    s = json.load(f)
result_path = sys.argv[2]
out = Path(s["output_dir"])

config = {
    "model": {"model_name_or_path": "builtin:tiny-sd"},
    "peft": {"use_peft": False},
    "data": {"dataset_name": "builtin:shape-prompts", "prompt_column": "prompt"},
    "training": {"output_dir": str(out), "seed": s["seed"], "learning_rate": s["learning_rate"],
                 "lr_scheduler_type": "constant", "weight_decay": s["weight_decay"],
                 "max_grad_norm": s["max_grad_norm"], "logging_steps": 1, "save_steps": 1000, "eval_steps": None},
    "reward": {"function": f"builtin:{s['reward_function']}"},
    "ddpo": {key: s[key] for key in (
        "sample_num_steps", "sample_eta", "sample_guidance_scale", "sample_batch_size",
        "sample_num_batches_per_epoch", "train_batch_size", "train_gradient_accumulation_steps",
        "train_clip_range", "train_adv_clip_max", "train_timestep_fraction", "train_num_inner_epochs", "train_cfg",
        "per_prompt_stat_tracking", "per_prompt_stat_tracking_buffer_size", "per_prompt_stat_tracking_min_count")}
    | {"num_epochs": s["epochs"], "grid_epochs": 0, "eval_samples_per_prompt": 0,
       "train_timesteps_per_call": s.get("ours_timesteps_per_call")},
}
config_path = out.with_name(out.name + ".yaml")
config_path.parent.mkdir(parents=True, exist_ok=True)
try:
    import yaml

    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
except ImportError:  # JSON is YAML too
    config_path.write_text(json.dumps(config, indent=1))
shutil.rmtree(out, ignore_errors=True)

command = [sys.executable, "-m", "rlhf_cli", "ddpo", str(config_path), "--overwrite"]
print("$ " + " ".join(command), flush=True)
started = time.perf_counter()
proc = subprocess.run(command)
wall = time.perf_counter() - started
peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
if proc.returncode != 0:
    sys.exit(f"rlhf ddpo failed (exit {proc.returncode})")

rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
rows = [r for r in rows if "time/epoch_s" in r]
keys = ("step", "reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "time/epoch_s")
epochs = [{k: r.get(k) for k in keys} | {k: v for k, v in r.items() if k.startswith("time/") and k not in keys}
          for r in rows]
for epoch in epochs:  # the same three phases as TRL's side: sampling, the update, the rest
    if {"time/sample_s", "time/update_s"} <= epoch.keys():
        epoch["time/rest_s"] = epoch["time/epoch_s"] - epoch["time/sample_s"] - epoch["time/update_s"]
done = 0
for epoch, row in zip(epochs, rows, strict=True):  # the stage logs the running count of optimizer steps
    if row.get("optimizer_steps") is not None:
        epoch["optimizer_steps"], done = row["optimizer_steps"] - done, row["optimizer_steps"]
if len(epochs) != s["epochs"]:
    sys.exit(f"metrics.jsonl has {len(epochs)} epoch rows with time/epoch_s, expected {s['epochs']}")
with open(result_path, "w") as f:
    json.dump({"times": [r["time/epoch_s"] for r in rows], "epochs": epochs, "peak_rss_mb": peak_rss_mb,
               "process_wall_s": wall}, f)
