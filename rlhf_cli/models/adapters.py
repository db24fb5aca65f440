"""LoRA adapters through `peft`, and writing the final model (full weights, adapter, merged)."""

import inspect
import logging
import sys
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from torch.distributed.fsdp import FSDPModule

from rlhf_cli.config.sections import PeftConfig
from rlhf_cli.models.dropout import original_dropout_config
from rlhf_cli.training.sharding import tied_aliases

log = logging.getLogger(__name__)


def target_modules(model, peft_cfg: PeftConfig) -> list[str] | str:
    """The configured modules, else peft's default for the architecture, else every linear layer."""
    if peft_cfg.lora_target_modules:
        return list(peft_cfg.lora_target_modules)
    default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
    return list(default) if default else "all-linear"


def untie_targeted_output_layer(model, targets: list[str] | str) -> bool:
    """Give the output layer its own copy of the weight it shares with the input embeddings, when
    `targets` names it (e.g. `lm_head` of GPT-2, Qwen2.5-0.5B, Gemma, T5: tied embeddings).

    The adapter is meant for the output layer alone. On a tied weight, merging it would change the
    input embeddings as well, and the merged model would compute something else than the adapter
    did (peft warns about exactly this). The copy holds the same values, so the model computes what
    it did; it costs one vocabulary x hidden matrix of memory. Returns whether it untied."""
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(targets, list) or output is None or inputs is None or output.weight is not inputs.weight:
        return False
    name = next(n for n, m in model.named_modules() if m is output)
    if not any(name == t or name.endswith("." + t) for t in targets):  # peft's matching of listed names
        return False
    if _forward_reads_tie_flag(model):  # untying would change what it computes: leave it (peft warns)
        log.warning("%s is tied to the input embeddings and %s reads that flag in its forward; left tied: "
                    "a merged model would differ from the adapter", name, type(model).__name__)
        return False
    output.weight = nn.Parameter(inputs.weight.detach().clone(), requires_grad=inputs.weight.requires_grad)
    for config in (model.config, model.config.get_text_config()):
        config.tie_word_embeddings = False  # saved as such with a merged model; tie_weights() leaves it apart
    if hasattr(model, "all_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    log.info("%s had its weight tied to the input embeddings; it has its own copy now, for the adapter", name)
    return True


def _forward_reads_tie_flag(model) -> bool:
    """A few architectures (SwitchTransformers, UDOP) rescale the decoder output when the flag is set."""
    try:
        return "tie_word_embeddings" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source to read: assume it does
        return True


def apply_lora(model, peft_cfg: PeftConfig, task_type: str, modules_to_save: list[str] | None = None):
    """Wrap `model` in a LoRA adapter; only adapter weights (and `modules_to_save`) train.

    An output layer among the targets gets an adapter of its own: see `untie_targeted_output_layer`.
    (PPO on the built-in world learns the reward with it far more reliably, docs/ppo.md.)"""
    targets = target_modules(model, peft_cfg)
    untie_targeted_output_layer(model, targets)
    config = LoraConfig(
        r=peft_cfg.lora_r,
        lora_alpha=peft_cfg.lora_alpha,
        lora_dropout=peft_cfg.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA on %s: %d of %d parameters train (%.2f%%)", config.target_modules, trainable, total, 100 * trainable / total)
    return model


def save_model_folder(model, folder: Path, tokenizer=None, state_dict: dict | None = None) -> None:
    """The model as `transformers`/`peft` (or `diffusers`) load it: config + safetensors (+ tokenizer files);
    for the final model and every checkpoint alike.

    An adapter folder holds the adapter that trains (the active one) only: a frozen `reference`
    adapter (PPO started from an adapter folder, models/policy.py) is not part of it. The config is
    written with the dropout the model came with (models/dropout.py zeroes it for RL). `state_dict`: the
    weights to write instead of the model's own (a sharded model's, gathered: training/sharding.py)."""
    if state_dict is not None and is_diffusers_model(model):  # its save_pretrained takes no state_dict
        model, state_dict = whole_copy(model, state_dict), None
    extra = {"selected_adapters": list(model.active_adapters)} if isinstance(model, PeftModel) else {}
    if state_dict is not None:
        extra["state_dict"] = state_dict
    with original_dropout_config(model):
        model.save_pretrained(folder, safe_serialization=True, **extra)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def is_diffusers_model(model) -> bool:
    if "diffusers" not in sys.modules:  # never imported: no model of it exists
        return False
    from diffusers import ModelMixin

    return isinstance(model, ModelMixin)


def whole_copy(model, state_dict: dict):
    """A plain (unsharded) copy of `model` -- a transformers or diffusers model, or a peft model around one --
    holding `state_dict`'s weights (gathered from the sharded model). The global RNG is left as it was
    (building the copy initialises weights), so a checkpoint written mid-run does not change what follows."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))  # FSDP 2 subclasses the model's
    with torch.random.fork_rng(devices=[]):
        copy = cls.from_config(base.config) if is_diffusers_model(base) else cls(base.config)
        if isinstance(model, PeftModel):
            copy = get_peft_model(copy, model.peft_config[model.active_adapter])
    missing, unexpected = copy.load_state_dict(state_dict, strict=False)
    if unexpected or set(missing) - set(tied_aliases(copy)):  # the gathered state leaves out tied aliases only
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return copy


def save_final_model(model, tokenizer, output_dir: Path, peft_cfg: PeftConfig, state_dict: dict | None = None) -> None:
    """The run's model at the top of output_dir: HF folder, or a PEFT adapter folder (+ `merged/`)."""
    save_model_folder(model, output_dir, tokenizer, state_dict)
    with original_dropout_config(model):
        if isinstance(model, PeftModel) and peft_cfg.save_merged:
            if state_dict is not None:  # sharded weights: merge in a whole copy built from the gathered ones
                model = whole_copy(model, state_dict)
            merged = model.merge_and_unload()  # the active adapter is folded into the base weights in place
            merged.save_pretrained(output_dir / "merged", safe_serialization=True)
            tokenizer.save_pretrained(output_dir / "merged")
            log.info("merged weights written to %s", output_dir / "merged")
