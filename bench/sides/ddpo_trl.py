"""TRL's side of bench/ddpo.py: trl 0.23's `DDPOTrainer` with `DefaultDDPOStableDiffusionPipeline`
(full UNet training, use_lora=False, mixed_precision "no"), run in bench/.venv-trl-ddpo (transformers
4.x, no rlhf-cli install: the repository root is on PYTHONPATH for rlhf_cli.builtin.shapes only).

The pipeline is the built-in tiny-sd folder, seen through bench/ddpo.py's peer copy of it (the same
weights; a text-encoder file with transformers 4's key names and the fast tokenizer named in
model_index.json); before training this script checks that every UNet, VAE and text-encoder tensor
equals the original folder's and that the tokenizer gives the main venv's token ids. Prompts: drawn
at random from rlhf_cli.builtin.shapes.prompts("train"); reward: the same jpeg_compressibility
function ours resolves `builtin:jpeg_compressibility` to, wrapped in TRL's
(images, prompts, metadata) -> (rewards, reward_metadata) interface.

Each epoch (trainer.step: sampling, scoring, advantages, update) is timed here, wall and CPU; its
reward mean/std and the mean loss, approx_kl and clipfrac of its optimizer steps are taken from what
the trainer hands accelerator.log; its phases: _generate_samples (sample), _train_batched_samples
(update, shuffling excluded) and the rest (scoring, advantages, shuffling). Usage: python ddpo_trl.py SPEC.json RESULT.json
"""

import statistics
import time

import sidekit

spec, result_path = sidekit.start()
clock = sidekit.Clock()
sidekit.clock_optimizer_steps(clock)  # counts real optimizer steps (accelerate skips accumulating ones)

import random  # noqa: E402

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline  # noqa: E402

from rlhf_cli.builtin import shapes  # noqa: E402

s = spec
reward_function = getattr(shapes, s["reward_function"])
prompts = shapes.prompts("train")

config = DDPOConfig(
    num_epochs=s["epochs"], seed=s["seed"], mixed_precision="no", log_with=None,
    logdir=s["output_dir"], project_kwargs={"project_dir": s["output_dir"]},
    save_freq=10**9,  # TRL saves an accelerate checkpoint every save_freq epochs (default 1): never here
    sample_num_steps=s["sample_num_steps"], sample_eta=s["sample_eta"],
    sample_guidance_scale=s["sample_guidance_scale"], sample_batch_size=s["sample_batch_size"],
    sample_num_batches_per_epoch=s["sample_num_batches_per_epoch"],
    train_batch_size=s["train_batch_size"], train_gradient_accumulation_steps=s["train_gradient_accumulation_steps"],
    train_learning_rate=s["learning_rate"], train_adam_weight_decay=s["weight_decay"],
    train_adam_beta1=0.9, train_adam_beta2=0.999, train_adam_epsilon=1e-8,
    train_max_grad_norm=s["max_grad_norm"], train_num_inner_epochs=s["train_num_inner_epochs"],
    train_cfg=s["train_cfg"], train_adv_clip_max=s["train_adv_clip_max"], train_clip_range=s["train_clip_range"],
    train_timestep_fraction=s["train_timestep_fraction"],
    per_prompt_stat_tracking=s["per_prompt_stat_tracking"],
    per_prompt_stat_tracking_buffer_size=s["per_prompt_stat_tracking_buffer_size"],
    per_prompt_stat_tracking_min_count=s["per_prompt_stat_tracking_min_count"],
    negative_prompts=None,  # the unconditional embedding of "" (TRL's default "" tokenises the same)
)

pipeline = DefaultDDPOStableDiffusionPipeline(s["peer_pipeline"], use_lora=False)
assert not pipeline.use_lora


def check_same_weights() -> int:
    """Every tensor of the original folder's UNet, VAE and text encoder equals what TRL loaded."""
    checked = 0
    for part, file, prefix in (("unet", "diffusion_pytorch_model.safetensors", ""),
                               ("vae", "diffusion_pytorch_model.safetensors", ""),
                               ("text_encoder", "model.safetensors", s["text_encoder_prefix"])):
        loaded = getattr(pipeline, part).state_dict()
        for key, tensor in load_file(f"{s['pipeline']}/{part}/{file}").items():
            name = key if key in loaded else prefix + key
            if name not in loaded or not torch.equal(loaded[name], tensor):
                raise SystemExit(f"TRL's {part} differs from the pipeline folder at {key}: the comparison would be unfair")
            checked += 1
    return checked


tensors_checked = check_same_weights()
theirs = pipeline.tokenizer(prompts + [""], padding="max_length", truncation=True,
                            max_length=pipeline.tokenizer.model_max_length).input_ids
if [list(ids) for ids in theirs] != s["token_ids"]:
    raise SystemExit("TRL's tokenizer gives other token ids than the main venv's: the comparison would be unfair")


def prompt_fn():
    return random.choice(prompts), {}


def reward_fn(images, prompts, prompt_metadata):
    """TRL's reward interface around the very function `builtin:jpeg_compressibility` resolves to."""
    return torch.tensor(reward_function(images, list(prompts), list(prompt_metadata)), dtype=torch.float32), {}


# DDPOTrainer.__init__ warns through accelerate's logger before it creates its Accelerator, which raises
# "You must initialize the accelerate state" unless some accelerate state exists already (TRL 0.23 bug,
# hit whenever no image_samples_hook is given); a hook is no way out: it is called with trackers[0].
PartialState()
trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)

logged: list[dict] = []
original_log = trainer.accelerator.log


def keep_log(values, step=None, log_kwargs=None):
    logged.append({k: float(v) for k, v in values.items() if getattr(v, "ndim", 0) == 0})
    return original_log(values, step=step, log_kwargs=log_kwargs or {})


trainer.accelerator.log = keep_log
# TRL turns the pipeline's per-timestep tqdm bar on (on the main process); ours has none
pipeline.set_progress_bar_config(disable=True)

phase: dict[str, float] = {}


def timed(name: str, method):
    """Wrap a trainer method to add its wall seconds to this epoch's `phase[name]`."""
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            phase[name] = phase.get(name, 0.0) + time.perf_counter() - started
    return wrapper


trainer._generate_samples = timed("sample", trainer._generate_samples)
trainer._train_batched_samples = timed("update", trainer._train_batched_samples)

times, cpu_times, epochs = [], [], []
global_step = 0
for epoch in range(s["epochs"]):
    logged.clear()
    phase.clear()
    wall, cpu = time.perf_counter(), time.process_time()
    global_step = trainer.step(epoch, global_step)
    times.append(time.perf_counter() - wall)
    cpu_times.append(time.process_time() - cpu)
    sampled = next(row for row in logged if "reward_mean" in row)
    updates = [row for row in logged if "loss" in row]
    epochs.append({"step": epoch + 1, "reward_mean": sampled["reward_mean"], "reward_std": sampled["reward_std"],
                   **{k: statistics.fmean(row[k] for row in updates) for k in ("loss", "approx_kl", "clipfrac")},
                   "optimizer_steps": len(updates), "time/sample_s": phase["sample"],
                   "time/update_s": phase["update"], "time/rest_s": times[-1] - phase["sample"] - phase["update"],
                   "updates": [{k: row[k] for k in ("loss", "approx_kl", "clipfrac")} for row in updates]})
    print(f"epoch {epoch + 1}: {times[-1]:.2f} s, reward {sampled['reward_mean']:+.4f}", flush=True)

sidekit.finish(result_path, {"times": times, "cpu_times": cpu_times, "epochs": epochs,
                             "optimizer_steps": len(clock.stamps), "tensors_checked": tensors_checked})
