"""`rlhf ddpo` vs TRL 0.23's DDPOTrainer (the last TRL that had it), side by side.

    python bench/ddpo.py                   # 2 rounds of A B A B, 8 epochs per run (2 dropped as warm-up)
    python bench/ddpo.py --epochs 6        # shorter
    python bench/ddpo.py --dry-run         # a smoke run: 1 round of 2 epochs of 4 DDIM steps
    python bench/ddpo.py --no-ours         # TRL's side only (e.g. while `rlhf ddpo` does not exist yet)

Both sides: the built-in tiny Stable Diffusion (builtin:tiny-sd, seed 0: 32x32 images, 4x8x8 latents,
a 253k-parameter UNet), all UNet weights trained (no LoRA), float32 everywhere (TRL: mixed_precision
"no"); prompts drawn from the shapes world's 42 training prompts; reward
rlhf_cli.builtin.shapes.jpeg_compressibility (minus the JPEG kB at quality 95); the same DDIM steps,
eta, guidance scale, sampling batches, training micro-batch, clip range, advantage clipping,
per-prompt stat tracking, classifier-free guidance in the update, AdamW (betas 0.9/0.999, eps 1e-8,
weight decay `--weight-decay`, default 0: ours' default; TRL's default is 1e-4), constant learning
rate, gradient clipping and seed. Both take one optimizer step per train_batch_size x
gradient_accumulation_steps images (accumulating over all their trained timesteps): 4 per epoch
with the defaults; a side that took another number is named in a WARNING line.

What is measured: seconds per epoch (sampling, scoring, advantages and the update), the median over
epochs after `--warmup` (the first epochs pay for lazy initialisation), then the median over rounds;
ours as the stage logs it (`time/epoch_s` in metrics.jsonl), TRL's around DDPOTrainer.step (wall and
CPU; ours logs wall time only); each side's split of an epoch into sampling, the update and the rest
(scoring, advantages, shuffling); peak RSS of each side's process; the mean training reward of the
samples of the first epoch and of the last `--reward-epochs` epochs (the same number of samples on
both sides), averaged over rounds. Every run is its own process: ours runs `python -m rlhf_cli ddpo
CONFIG.yaml --overwrite` in the main venv (bench/sides/ddpo_ours.py), TRL's bench/sides/ddpo_trl.py
in bench/.venv-trl-ddpo (bash bench/setup_ddpo_peer.sh, run on first use). Prints a table, then ONE
JSON line.

What TRL 0.23's side does differently (read from its code; none changes the work per epoch):
* It needs transformers 4.x (and so diffusers <= 0.39, see setup_ddpo_peer.sh), which cannot read
  the built-in pipeline folder as transformers 5 wrote it: the slow CLIPTokenizer it names needs
  vocab.json/merges.txt (absent), and CLIPTextModel's keys lost their `text_model.` prefix in 5,
  so 4.x silently loads a RANDOM text encoder (only a warning). TRL therefore reads a peer copy
  (bench/.work/ddpo-peer-<folder>): the same UNet/VAE/scheduler files, the text encoder's tensors
  under 4.x names, CLIPTokenizerFast named in model_index.json; ddpo_trl.py checks every tensor
  and the token ids of all prompts against the original before training.
* DefaultDDPOStableDiffusionPipeline calls diffusers' load_lora_weights even with use_lora=False
  and catches only OSError: without peft installed that raises "PEFT backend is required"
  (ValueError), so the peer venv needs peft although no LoRA is trained.
* DDPOTrainer.__init__ logs a warning through accelerate's logger before it creates its
  Accelerator when no image_samples_hook is given, which raises "You must initialize the accelerate
  state"; ddpo_trl.py creates a PartialState first.
* Log-probabilities: as ours, the Gaussian log-density of the DDIM step averaged (not summed) over
  the latent's dimensions (hence the clip range 1e-4), and re-scoring with unchanged weights gives
  ratio 1 (approx_kl 0 at TRL's first optimizer step of an epoch). Its previous timestep is
  clamped at 0, so the last step always uses alphas_cumprod[0]: that is the scheduler's
  final_alpha_cumprod here (set_alpha_to_one false); with set_alpha_to_one true TRL would sample
  and score a last step that is not DDIM's (ours uses final_alpha_cumprod and refuses a
  deterministic last step). sample_num_steps is used as given; train_timestep_fraction trains
  int(steps x fraction) timesteps in a per-image random order, as ours.
* Per-prompt statistics are keyed by the prompt decoded from its token ids (truncated prompts
  would share a key); ours keys by the prompt text. The same here (every prompt fits 12 tokens).
* With full-UNet training it wraps sampling and the update in accelerator.autocast(), a no-op in
  fp32 (TRL's default mixed_precision is fp16; "no" is set here). It saves an accelerate
  checkpoint every save_freq epochs (default 1): set to never here, as ours (save_steps 1000). It
  shows a tqdm bar per sampling call: turned off here, as ours has none. Its reward and loss
  metrics go only to accelerate trackers; ddpo_trl.py reads them off accelerator.log.
* Note on the defaults (both sides alike): at learning rate 3e-4 on all UNet weights, every
  optimizer step after an epoch's first moves the ratios past 1 +- 1e-4 (clipfrac ~0.7 in every
  epoch; approx_kl ~0.1 in the first, ~1e-3 later), so most terms of the clipped objective carry
  no gradient; DDPO's 3e-4 was tuned for LoRA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess

import common
import torch
from common import (
    OURS_PY,
    PEERS,
    WORK,
    alternate,
    final_json,
    machine_note,
    median_after_warmup,
    print_table,
    run_side,
    spread,
)

SETTINGS = {  # (default, type, help) of every setting shared by the two sides
    "sample_num_steps": (10, int, "DDIM steps per image"),
    "sample_eta": (1.0, float, "DDIM eta"),
    "sample_guidance_scale": (3.0, float, "classifier-free guidance scale"),
    "sample_batch_size": (16, int, "images per sampling batch"),
    "sample_num_batches_per_epoch": (2, int, "sampling batches per epoch"),
    "train_batch_size": (8, int, "images per training micro-batch"),
    "train_gradient_accumulation_steps": (1, int, "micro-batches per optimizer step"),
    "learning_rate": (3e-4, float, "constant learning rate"),
    "weight_decay": (0.0, float, "AdamW weight decay (ours' default 0; TRL's default 1e-4)"),
    "train_clip_range": (1e-4, float, "clip range of the importance ratio"),
    "train_adv_clip_max": (5.0, float, "advantage clipping"),
    "train_timestep_fraction": (1.0, float, "share of the denoising steps trained on"),
    "train_num_inner_epochs": (1, int, "passes over each epoch's samples"),
    "per_prompt_stat_tracking_buffer_size": (32, int, "rewards kept per prompt"),
    "per_prompt_stat_tracking_min_count": (16, int, "rewards a prompt needs before its own statistics count"),
    "max_grad_norm": (1.0, float, "gradient clipping"),
    "seed": (0, int, "seed of both sides"),
}


def trl_python() -> str:
    python = PEERS["trl-ddpo"]
    if not python.exists():
        print(f"creating the DDPO peer environment (bench/setup_ddpo_peer.sh {OURS_PY})", flush=True)
        subprocess.run(["bash", str(common.BENCH / "setup_ddpo_peer.sh"), OURS_PY], check=True)
    return str(python)


def prepare_pipelines(seed: int = 0) -> dict:
    """The built-in pipeline folder (built once, ~2 min), TRL's peer copy of it, and the token ids
    of every training prompt and of "" under the main venv's tokenizer (TRL's side checks its own)."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizer

    from rlhf_cli.builtin import shapes
    from rlhf_cli.builtin.image_pipeline import tiny_pipeline_folder

    folder = tiny_pipeline_folder(seed=seed)
    peer = WORK / f"ddpo-peer-{folder.name}"
    prefix = "text_model."
    if not (peer / "model_index.json").is_file():
        tmp = WORK / f".ddpo-peer-{folder.name}.tmp"
        subprocess.run(["rm", "-rf", str(tmp)], check=True)
        (tmp / "text_encoder").mkdir(parents=True)
        for part in ("scheduler", "unet", "vae", "tokenizer"):
            (tmp / part).symlink_to(folder / part)
        index = json.loads((folder / "model_index.json").read_text())
        index["tokenizer"] = ["transformers", "CLIPTokenizerFast"]  # loads tokenizer.json alone
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / "text_encoder" / "config.json").write_text((folder / "text_encoder" / "config.json").read_text())
        tensors = load_file(folder / "text_encoder" / "model.safetensors")
        save_file({k if k.startswith(prefix) else prefix + k: v for k, v in tensors.items()},
                  tmp / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
        tmp.rename(peer)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    ids = tokenizer(shapes.prompts("train") + [""], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length)["input_ids"]
    return {"pipeline": str(folder), "peer_pipeline": str(peer), "text_encoder_prefix": prefix,
            "token_ids": [list(x) for x in ids]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run")
    parser.add_argument("--warmup", type=int, default=2, help="first epochs of each run left out of the timing")
    parser.add_argument("--reward-epochs", type=int, default=2, help="last epochs whose rewards are averaged")
    parser.add_argument("--reward-function", default="jpeg_compressibility",
                        help="a function of rlhf_cli.builtin.shapes (builtin:<name> on our side)")
    parser.add_argument("--no-train-cfg", action="store_true", help="train_cfg false on both sides")
    parser.add_argument("--no-per-prompt-stat-tracking", action="store_true",
                        help="per_prompt_stat_tracking false on both sides")
    for key, (default, kind, text) in SETTINGS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=kind, default=default, help=f"{text} ({default})")
    parser.add_argument("--timesteps-per-call", type=int, default=0,
                        help="ours: ddpo.train_timesteps_per_call (denoising steps per UNet call in the update: the "
                             "same gradient, fewer calls; TRL has no such option and takes 1); 0: all (null)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (the same for both)")
    parser.add_argument("--no-trl", action="store_true", help="ours only")
    parser.add_argument("--no-ours", action="store_true", help="TRL's side only")
    parser.add_argument("--dry-run", action="store_true", help="1 round of 2 epochs of 4 DDIM steps (a smoke run)")
    parser.add_argument("--tag", default="ddpo", help="names this run's files under bench/.work")
    parser.add_argument("--reuse-results", action="store_true",
                        help="read the result of a run already in bench/.work (same label and spec) instead of "
                             "running it again: finishes an interrupted benchmark")
    a = parser.parse_args()
    if a.dry_run:
        a.rounds, a.epochs, a.warmup, a.reward_epochs, a.sample_num_steps = 1, 2, 1, 1, 4
    samples = a.sample_batch_size * a.sample_num_batches_per_epoch
    per_step = a.train_batch_size * a.train_gradient_accumulation_steps
    if a.sample_batch_size % a.train_batch_size or samples % per_step:
        parser.error("sample_batch_size must be a multiple of train_batch_size, and the images per epoch of "
                     "train_batch_size x train_gradient_accumulation_steps")
    if a.no_trl and a.no_ours:
        parser.error("--no-trl and --no-ours leave nothing to run")
    common.REUSE = a.reuse_results
    torch.set_num_threads(a.threads)

    settings = {key: getattr(a, key) for key in SETTINGS}
    settings.update({"train_cfg": not a.no_train_cfg, "per_prompt_stat_tracking": not a.no_per_prompt_stat_tracking,
                     "reward_function": a.reward_function, "epochs": a.epochs,
                     "ours_timesteps_per_call": a.timesteps_per_call or None})
    base = {**settings, **prepare_pipelines(a.seed)}
    trl = None if a.no_trl else trl_python()

    def spec_for(side: str, r: int) -> dict:
        return {**base, "output_dir": str(WORK / "runs" / f"{a.tag}-{side}-{r}")}

    sides = {}
    if not a.no_ours:
        sides["ours"] = lambda r: run_side(OURS_PY, "ddpo_ours.py", spec_for("ours", r), f"{a.tag}-ours-{r}", a.threads)
    if trl:
        # the TRL side imports rlhf_cli.builtin.shapes from the working tree (not installed there)
        sides["trl"] = lambda r: run_side(trl, "ddpo_trl.py", spec_for("trl", r), f"{a.tag}-trl-{r}", a.threads,
                                          src=str(common.ROOT))
    results = alternate(sides, a.rounds)

    per_run = {name: [median_after_warmup(res["times"], a.warmup) for res in runs] for name, runs in results.items()}
    med = {name: statistics.median(v) for name, v in per_run.items()}
    rss = {name: statistics.median(res["peak_rss_mb"] for res in runs) for name, runs in results.items()}
    k = min(a.reward_epochs, a.epochs)
    last = {name: statistics.fmean(statistics.fmean(e["reward_mean"] for e in res["epochs"][-k:]) for res in runs)
            for name, runs in results.items()}
    first = {name: statistics.fmean(res["epochs"][0]["reward_mean"] for res in runs) for name, runs in results.items()}

    def mean_of(name: str, key: str) -> float | None:
        values = [e[key] for res in results[name] for e in res["epochs"] if e.get(key) is not None]
        return statistics.fmean(values) if values else None

    cpu = {}
    if "trl" in results:
        cpu["trl"] = statistics.median(median_after_warmup(res["cpu_times"], a.warmup) for res in results["trl"])
    expected = samples // per_step * a.train_num_inner_epochs
    for name, runs in results.items():
        steps = {e.get("optimizer_steps") for res in runs for e in res["epochs"]}
        if steps != {expected}:
            print(f"WARNING: {name} took {steps} optimizer steps per epoch, expected {expected}", flush=True)

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    rows = [(name, f"{med[name]:.3f}", spread(per_run[name]), fmt(cpu.get(name), ".3f"),
             f"{samples / med[name]:.2f}", f"{rss[name]:.0f}", f"{first[name]:+.3f}", f"{last[name]:+.3f}",
             fmt(mean_of(name, "approx_kl"), ".2e"), fmt(mean_of(name, "clipfrac"), ".3f")) for name in results]
    print_table(f"DDPO: s/epoch (median of epochs {a.warmup + 1}..{a.epochs}, then over {a.rounds} rounds), "
                f"{samples} images x {a.sample_num_steps} DDIM steps per epoch, {samples // per_step} optimizer "
                f"steps; rewards ({a.reward_function}) of epoch 1 and of the last {k} epochs",
                rows, ("side", "s/epoch", "spread", "cpu s/epoch", "images/s", "peak RSS MB", "reward ep.1",
                       f"reward last {k}", "approx_kl", "clipfrac"))
    for name, runs in results.items():
        kept = [e for res in runs for e in res["epochs"][a.warmup:] or res["epochs"]]
        if all("time/sample_s" in e and "time/update_s" in e for e in kept):
            print(f"{name} phases (median over the timed epochs, wall s): " + ", ".join(
                f"{key}={statistics.median(e[f'time/{key}_s'] for e in kept):.3f}" for key in ("sample", "update", "rest")))
    for name, runs in results.items():
        print(f"{name} rewards per epoch (last round): "
              + " ".join(f"{e['reward_mean']:+.3f}" for e in runs[-1]["epochs"]))

    payload = {"bench": "ddpo", "epochs": a.epochs, "warmup": a.warmup, "rounds": a.rounds,
               "images_per_epoch": samples, "reward_epochs": k}
    for name in results:
        payload[f"{name}_s_per_epoch"] = round(med[name], 4)
    if "ours" in med and "trl" in med:
        payload["time_ratio"] = round(med["ours"] / med["trl"], 3)  # ours / TRL: < 1 is faster
    if "trl" in cpu:
        payload["trl_cpu_s_per_epoch"] = round(cpu["trl"], 4)
    for name in results:
        payload[f"{name}_reward_first"] = round(first[name], 4)
        payload[f"{name}_reward_last"] = round(last[name], 4)
    for name in results:
        payload[f"{name}_peak_rss_mb"] = round(rss[name])
    payload["settings"] = settings
    payload["machine"] = machine_note(a.threads)
    final_json(payload)


if __name__ == "__main__":
    main()
