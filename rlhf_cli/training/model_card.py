"""The model card (README.md) of a run folder that holds a final model, as the Hugging Face Hub reads it:
a YAML metadata header (base_model, library_name, tags, datasets, pipeline_tag, license when known),
then what the run was: starting model, data, key hyper-parameters, final metrics, the command that
reproduces it and code that loads it. `merged/` (peft.save_merged) gets a card of its own.

The main process writes it when a training stage finishes (stages/common.py: finish_run), after the
model and the files beside it (value head, reward_stats.json): a resumed run ends with a card of the
whole run. `rlhf eval` writes no model, so no card.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import metadata_load, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id

from rlhf_cli.config.loader import to_dict
from rlhf_cli.training.metrics import read_metrics
from rlhf_cli.training.output import flatten, read_run_config

log = logging.getLogger(__name__)

CARD = "README.md"
# Marks a README.md as ours: a README.md of the user's in the folder is never replaced.
MARKER = "<!-- model card written by rlhf (rlhf_cli/training/model_card.py); rewritten when the run ends -->"
# peft's save_pretrained fills the Hub's blank template into an adapter folder without a README.md (its
# base_model a `builtin:` name the Hub cannot resolve, every field "More Information Needed"): ours replaces it.
PEFT_TEMPLATE = ("# Model Card for Model ID", "[More Information Needed]")
BUILTIN = "builtin:"

STAGE_TAGS = {"sft": "sft", "reward": "reward-model", "ppo": "ppo", "dpo": "dpo", "grpo": "grpo", "rloo": "rloo"}
STAGE_WHAT = {
    "sft": "supervised fine-tuning", "reward": "a pairwise (Bradley-Terry) reward model",
    "ppo": "PPO against a reward", "dpo": "direct preference optimisation",
    "grpo": "GRPO against a reward", "rloo": "RLOO against a reward",
}
ONLINE = ("ppo", "grpo", "rloo")
PIPELINE_TAGS = {"causal-lm": "text-generation", "seq2seq-lm": "text2text-generation",
                 "sequence-classification": "text-classification"}
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "seq2seq-lm": "AutoModelForSeq2SeqLM",
                "sequence-classification": "AutoModelForSequenceClassification"}
PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_2_SEQ_LM": "seq2seq-lm", "SEQ_CLS": "sequence-classification"}

# The hyper-parameters a card lists (keys of config.yaml; None values, a feature that is off, are left
# out). Named one by one: the sections also hold keys of bookkeeping and monitoring.
TRAINING_KEYS = (
    "training.learning_rate", "training.lr_scheduler_type", "training.warmup_steps", "training.warmup_ratio",
    "training.weight_decay", "training.max_grad_norm", "training.per_device_train_batch_size",
    "training.gradient_accumulation_steps", "training.seed", "training.bf16", "training.fp16",
)
GENERATION = tuple(f"generation.{k}" for k in ("response_length", "min_response_length", "temperature", "top_k",
                                                  "top_p", "stop_token")) + ("data.max_prompt_length",)
GROUPS = ("total_episodes", "num_generations", "steps_per_generation", "num_iterations", "beta", "epsilon",
          "epsilon_high", "mask_truncated_completions")
STAGE_KEYS = {
    "sft": ("data.max_length", "data.dataset_format", "data.completion_only_loss", "data.packing"),
    "reward": ("data.max_length", "data.long_pairs", "reward.center_rewards_coefficient"),
    "dpo": tuple(f"dpo.{k}" for k in ("beta", "loss_type", "label_smoothing", "reference_free", "rpo_alpha"))
    + ("data.max_length", "data.max_prompt_length", "data.truncation_mode"),
    "ppo": tuple(f"ppo.{k}" for k in (
        "total_episodes", "num_ppo_epochs", "num_mini_batches", "kl_coef", "kl_estimator", "adaptive_kl", "target_kl",
        "kl_horizon", "cliprange", "cliprange_value", "vf_coef", "entropy_coef", "gamma", "lam", "whiten_rewards",
        "reward_clip", "missing_eos_penalty", "advantage_estimator", "value_model_name_or_path")) + GENERATION,
    "grpo": tuple(f"grpo.{k}" for k in (*GROUPS, "loss_type", "scale_rewards", "kl_estimator")) + GENERATION,
    "rloo": tuple(f"rloo.{k}" for k in (*GROUPS, "kl_in_reward", "normalize_advantages")) + GENERATION,
}
ONLY_WITH = {"ppo.target_kl": "ppo.adaptive_kl", "ppo.kl_horizon": "ppo.adaptive_kl"}

# The training metrics a card reports (their last logged values); every eval_* / eval/* metric is added.
STAGE_METRICS = {
    "sft": ("loss", "mean_token_accuracy", "num_tokens", "epoch"),
    "reward": ("loss", "accuracy", "margin", "epoch"),
    "dpo": ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "epoch"),
    "ppo": ("objective/scores", "objective/rlhf_reward", "objective/kl", "objective/entropy", "objective/kl_coef",
            "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
            "val/response_length", "episode"),
    "grpo": ("reward", "kl", "loss/policy", "clip_ratio/region_mean", "completions/mean_length",
             "completions/clipped_ratio", "episode"),
}
STAGE_METRICS["rloo"] = STAGE_METRICS["grpo"]


@dataclass(frozen=True)
class SavedModel:
    """What a folder holds: the task of its model, and the base of an adapter (None: full weights)."""

    folder: Path
    task: str
    adapter_base: str | None = None

    @property
    def is_adapter(self) -> bool:
        return self.adapter_base is not None


def saved_model(folder: Path, stage: str) -> SavedModel | None:
    """The model saved in `folder`, read from its files; None when it holds none."""
    adapter = _read_json(folder / "adapter_config.json")
    if adapter:
        return SavedModel(folder, PEFT_TASKS.get(str(adapter.get("task_type")), "causal-lm"),
                          str(adapter.get("base_model_name_or_path")))
    config = _read_json(folder / "config.json")
    if not config:
        return None
    architecture = (config.get("architectures") or [""])[0]
    if architecture.endswith("ForSequenceClassification") or (not architecture and stage == "reward"):
        return SavedModel(folder, "sequence-classification")
    return SavedModel(folder, "seq2seq-lm" if config.get("is_encoder_decoder") else "causal-lm")


def write_model_cards(output_dir: str | Path, stage: str, config: Any, processes: int = 1) -> list[Path]:
    """README.md in `output_dir` and in its `merged/`, where they hold a model. A card is a summary:
    failing to write one is logged, never the end of a run whose model is saved."""
    written = []
    top = Path(output_dir)
    for folder in (top, top / "merged"):
        try:
            model = saved_model(folder, stage)
            if model is None:
                continue
            path = folder / CARD
            if path.exists() and not replaceable(path):
                log.warning("%s is not a model card of rlhf; left as it is (no model card written)", path)
                continue
            path.write_text(render_card(model, top, stage, config, processes))
            written.append(path)
        except Exception as err:  # see the docstring
            log.warning("model card for %s not written: %s: %s", folder, type(err).__name__, err)
    if written:
        log.info("model card written: %s", ", ".join(str(p) for p in written))
    return written


def replaceable(card: Path) -> bool:
    """Whether README.md is a card of ours or peft's blank template (anything else is the user's)."""
    text = card.read_text(errors="replace")
    return MARKER in text or all(mark in text for mark in PEFT_TEMPLATE)


def render_card(model: SavedModel, top: Path, stage: str, config: Any, processes: int = 1) -> str:
    flat = flatten(json.loads(json.dumps(to_dict(stage, config), default=str)))
    merged = model.folder != top
    start = config.model.model_name_or_path
    base = hub_base_model(start)
    meta = {
        "base_model": base, "license": base_license(start),
        "library_name": "peft" if model.is_adapter else "transformers",
        "pipeline_tag": PIPELINE_TAGS[model.task], "tags": card_tags(stage, top, merged),
        "datasets": [config.data.dataset_name] if is_hub_dataset(config.data.dataset_name) else None,
    }
    header = yaml.safe_dump({k: v for k, v in meta.items() if v is not None}, sort_keys=False)
    title = config.training.run_name or top.name
    what = "model"
    if model.is_adapter:
        what = "LoRA adapter"
    elif merged:
        what = "model (its LoRA adapter merged into the base weights)"
    versions = _read_json(top / "run_info.json").get("versions", {})
    sections = [
        f"---\n{header}---\n{MARKER}\n\n# {title}{' (merged)' if merged else ''}\n\n"
        f"A {what} trained with `rlhf {stage}` ({STAGE_WHAT.get(stage, stage)}) from `{start}`.",
        "## Model\n\n" + _bullets(model_lines(model, top, stage, base, config)),
        "## Data\n\n" + _bullets(data_lines(stage, config)),
        "## Training hyper-parameters\n\n" + _table(("key", "value"), hyper_parameters(stage, flat))
        + "\n\n" + launch_line(stage, flat, processes),
        "## Results\n\n" + results(stage, top),
        "## Reproduce\n\n" + reproduce(stage, top, merged),
        "## Use\n\n```python\n" + loading_snippet(model, str(model.folder), _example_prompt(top, model.task))
        + "\n```" + _use_notes(model, top),
        "## Framework versions\n\n" + _bullets(f"{k}: {v}" for k, v in versions.items()),
    ]
    return "\n\n".join(sections) + "\n"


# --- the metadata header ------------------------------------------------------------------------


def is_hub_id(name: str) -> bool:
    """`name` or `owner/name` as the Hub spells repositories (not a built-in, not a local path here)."""
    if name.startswith(BUILTIN) or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_hub_dataset(name: str) -> bool:
    return is_hub_id(name) and Path(name).suffix.lower() not in (".json", ".jsonl", ".csv", ".parquet")


def hub_base_model(name: str, _depth: int = 0) -> str | None:
    """The Hub model this run descends from, for `base_model`: the starting model when it is a Hub id;
    for a local folder, the Hub model at the root of its chain (an rlhf run folder's own card names it;
    an adapter folder names its base). None for built-ins (random weights, on no Hub) and for folders
    whose origin is unknown. A name read from a file counts as a Hub id only when the local Hub cache
    holds it: a relative path of an earlier run would look like `owner/name` too."""
    folder = Path(name).expanduser()
    if not folder.is_dir():
        if not is_hub_id(name):
            return None
        return name if _depth == 0 or isinstance(try_to_load_from_cache(name, "config.json"), str) else None
    card = folder / CARD
    if card.is_file() and MARKER in card.read_text(errors="replace"):
        return _card_metadata(card).get("base_model")
    parent = _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if parent is None and (folder / "run_info.json").is_file():  # an rlhf run folder from before cards
        parent = ((read_run_config(folder) or {}).get("model") or {}).get("model_name_or_path")
    return hub_base_model(str(parent), _depth + 1) if parent and _depth < 8 else None


def base_license(name: str) -> str | None:
    """The license on the starting model's card, when a copy of that card is at hand (a local folder,
    the Hub cache, the MiniLM package): a fine-tune inherits its base's license. Never downloads."""
    if name.startswith(BUILTIN + "minilm"):
        from rlhf_cli.builtin.models import minilm_folder

        card = Path(minilm_folder()) / CARD
    elif Path(name).expanduser().is_dir():
        card = Path(name).expanduser() / CARD
    elif is_hub_id(name) and isinstance(cached := try_to_load_from_cache(name, CARD), str):
        card = Path(cached)
    else:
        return None
    license_ = _card_metadata(card).get("license") if card.is_file() else None
    return str(license_) if license_ else None


def card_tags(stage: str, top: Path, merged: bool) -> list[str]:
    tags = ["rlhf", STAGE_TAGS.get(stage, stage)]
    if (top / "adapter_config.json").is_file():
        tags.append("lora")  # the top folder holds the adapter; merged/ was trained through it
    return tags + (["merged"] if merged else [])


# --- the body -----------------------------------------------------------------------------------


def model_lines(model: SavedModel, top: Path, stage: str, base: str | None, config: Any) -> list[str]:
    start = config.model.model_name_or_path
    if start.startswith(BUILTIN):
        origin = "a built-in model of rlhf, made offline from a seed; it is on no Hub, so the header names no `base_model`"
    elif Path(start).expanduser().is_dir():
        origin = f"a local folder that descends from Hub model `{base}`" if base else "a local folder"
    else:
        origin = "a Hugging Face Hub model" + (f", revision `{config.model.revision}`" if config.model.revision else "")
    lines = [f"Starting model: `{start}`: {origin}", f"Stage: `rlhf {stage}`; task: {PIPELINE_TAGS[model.task]}"]
    adapter = _read_json(top / "adapter_config.json")
    if adapter:
        lines.append(f"LoRA: r {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, dropout "
                     f"{adapter.get('lora_dropout')}, target modules {_listed(adapter.get('target_modules'))}"
                     + (f", trained in full: {_listed(adapter['modules_to_save'])}" if adapter.get("modules_to_save") else "")
                     + f"; base `{adapter.get('base_model_name_or_path')}`")
    if model.is_adapter and (top / "merged").is_dir():
        lines.append("`merged/`: the adapter merged into its base, a plain transformers folder")
    if (top / "value_head.safetensors").is_file() and top == model.folder:
        lines.append("`value_head.safetensors`: PPO's value head (not needed to generate; a PPO run that starts "
                     "from this folder picks it up)")
    return lines


def data_lines(stage: str, config: Any) -> list[str]:
    data = config.data
    kind = ("built-in synthetic dataset of rlhf" if data.dataset_name.startswith(BUILTIN)
            else "Hugging Face Hub dataset" if is_hub_dataset(data.dataset_name) else "local data")
    if data.dataset_config:
        kind = f"configuration `{data.dataset_config}` of a {kind}"
    if data.dataset_name.startswith(BUILTIN):
        kind += f", world_seed {data.world_seed}"
    held_out = "none"
    if data.dataset_test_split:
        held_out = f"`{data.dataset_test_split}`, {_rows(data.max_eval_samples)}"
    lines = [f"Dataset: `{data.dataset_name}` ({kind})",
             f"Training split: `{data.dataset_train_split}`, {_rows(data.max_train_samples)}",
             f"Held-out split: {held_out}"]
    if stage in ONLINE:
        sources = config.reward.sources or [config.reward]
        lines += [f"Reward: {_reward_source(s)}" + (f", weight {s.weight}" if len(sources) > 1 else "") for s in sources]
    return lines


def hyper_parameters(stage: str, flat: dict) -> list[tuple[str, str]]:
    """(key, value) of the keys the stage's card lists, in that order (`flat`: config.yaml flattened)."""
    run_length = ()  # online stages count episodes (in their own section)
    if stage not in ONLINE:  # max_steps > 0 overrides num_train_epochs, as in transformers
        run_length = ("training.max_steps",) if flat["training.max_steps"] > 0 else ("training.num_train_epochs",)
    keys = TRAINING_KEYS + run_length + STAGE_KEYS.get(stage, ())
    return [(f"`{key}`", _value(flat[key])) for key in keys
            if flat.get(key) is not None and (key not in ONLY_WITH or flat.get(ONLY_WITH[key]))]


def launch_line(stage: str, flat: dict, processes: int) -> str:
    text = f"Trained on {processes} process{'es' if processes > 1 else ''}"
    if stage in ONLINE:
        return text + "."
    per_device, accumulation = flat["training.per_device_train_batch_size"], flat["training.gradient_accumulation_steps"]
    unit = "sequences" if stage == "sft" else "pairs"
    return (text + f": {per_device} x {accumulation} (accumulation) x {processes} = "
            f"{per_device * accumulation * processes} {unit} per optimizer step.")


def results(stage: str, top: Path) -> str:
    """The last logged value of the stage's key metrics and of every held-out metric, with the value
    before training where the run logged one (step 0)."""
    rows = read_metrics(top) if (top / "metrics.jsonl").is_file() else []
    keys = [k for k in STAGE_METRICS.get(stage, ()) if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r if k.startswith(("eval_", "eval/"))})
    table = []
    for key in keys:
        logged = [r for r in rows if key in r]
        before = next((_value(r[key]) for r in logged if r["step"] == 0), "")
        table.append((f"`{key}`", _value(logged[-1][key]), str(logged[-1]["step"]), before))
    text = _table(("metric", "final value", "at step", "before training"), table) if table else "No metrics logged."
    stats = _read_json(top / "reward_stats.json")
    if stats:
        text += (f"\n\n`reward_stats.json` (for `reward.normalize` in PPO): mean {_value(stats.get('mean'))}, std "
                 f"{_value(stats.get('std'))} over {stats.get('num_responses')} `{stats.get('split')}` responses.")
    return text + "\n\nEvery logged step is in `metrics.jsonl`."


def reproduce(stage: str, top: Path, merged: bool) -> str:
    config = "../config.yaml" if merged else "config.yaml"
    text = (f"```bash\nrlhf {stage} {config} --output-dir NEW_FOLDER\n```\n\n`{config}` is the run's resolved "
            "config (every key; relative paths start from the folder the run was started in). Its `output_dir` "
            "is this run's folder, hence `--output-dir` (or `--overwrite` to replace this run).")
    earlier = sorted(p.name for p in top.glob("config.checkpoint-*.yaml"))
    if earlier:
        text += f" The run was resumed with a changed config; {', '.join(f'`{n}`' for n in earlier)} hold the config before."
    return text


def loading_snippet(model: SavedModel, folder: str, prompt: str = "Hello") -> str:
    """Python that loads the model in `folder` (and uses it once): transformers for full weights, peft
    for an adapter, rlhf's loader for an adapter on a built-in base (only rlhf can rebuild that base)."""
    f, task, prompt = json.dumps(folder), model.task, json.dumps(prompt)  # JSON strings are Python literals
    if not model.is_adapter:
        cls = AUTO_CLASSES[task]
        lines = [f"from transformers import {cls}, AutoTokenizer", "",
                 f"model = {cls}.from_pretrained({f})  # or the Hub id it is uploaded to"]
    elif model.adapter_base.startswith(BUILTIN):
        lines = ["from rlhf_cli.models.loading import load_model", "from transformers import AutoTokenizer", "",
                 f"# rlhf rebuilds the built-in base ({model.adapter_base}: same seed, same weights), then adds the adapter",
                 f'model = load_model({f}, task="{task}")']
    elif task == "sequence-classification":
        lines = ["from peft import PeftModel", "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                 f"base = AutoModelForSequenceClassification.from_pretrained({json.dumps(model.adapter_base)}, num_labels=1)",
                 f"model = PeftModel.from_pretrained(base, {f})  # the adapter and its trained score head"]
    else:
        cls = "AutoPeftModelForSeq2SeqLM" if task == "seq2seq-lm" else "AutoPeftModelForCausalLM"
        lines = [f"from peft import {cls}", "from transformers import AutoTokenizer", "",
                 f"model = {cls}.from_pretrained({f})  # loads the base named in adapter_config.json, then the adapter"]
    lines.append(f"tokenizer = AutoTokenizer.from_pretrained({f})")
    if task == "sequence-classification":
        return "\n".join([*lines, "model.config.pad_token_id = tokenizer.pad_token_id", "",
                          f"inputs = tokenizer({prompt}, return_tensors=\"pt\")",
                          "reward = model(**inputs).logits[0, 0].item()  # one scalar: higher means preferred"])
    return "\n".join([*lines, "", f"inputs = tokenizer({prompt}, return_tensors=\"pt\")",
                      "output = model.generate(**inputs, max_new_tokens=32, do_sample=True, pad_token_id=tokenizer.pad_token_id)",
                      "print(tokenizer.decode(output[0], skip_special_tokens=True))"])


def _use_notes(model: SavedModel, top: Path) -> str:
    if model.is_adapter and (top / "merged").is_dir():
        return "\n\n`merged/` holds the same model as full weights, which plain transformers loads: see `merged/README.md`."
    if model.is_adapter:
        return "\n\n`peft.save_merged: true` also writes the adapter merged into its base, in `merged/`."
    return ""


# --- small helpers ------------------------------------------------------------------------------


def _example_prompt(top: Path, task: str) -> str:
    """The first prompt the run sampled (samples.jsonl) when it is short plain text, else a generic one."""
    try:
        first = json.loads((top / "samples.jsonl").read_text().splitlines()[0])["prompt"]
    except (OSError, IndexError, KeyError, ValueError, TypeError):
        first = None
    if isinstance(first, str) and 0 < len(first) <= 200 and "\n" not in first:
        return first
    return "The movie was great, and" if task != "sequence-classification" else "The movie was great."


def _reward_source(source) -> str:
    if not source.model:
        return f"function `{source.function}`"
    parts = [f"model `{source.model}`"]
    if source.label is not None:
        parts.append(f"label `{source.label}` ({source.output})")
    if source.normalize:
        parts.append("normalised with its reward_stats.json")
    return ", ".join(parts)


def _rows(limit: int | None) -> str:
    return f"at most {limit} rows" if limit else "all rows"


def _listed(value: Any) -> str:
    if isinstance(value, list | tuple | set):
        return ", ".join(f"`{v}`" for v in sorted(value))
    return f"`{value}`"


def _value(value: Any) -> str:
    """As config.yaml and metrics.jsonl spell it (true, [a, b]), floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else json.dumps(value)


def _bullets(lines) -> str:
    return "\n".join(f"- {line}" for line in lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _card_metadata(path: Path) -> dict:
    try:
        return metadata_load(path) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
