"""The PPO policy (with its value head or a separate critic) and the frozen reference."""

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from transformers import AutoConfig

from rlhf_cli.config.sections import ModelConfig, PeftConfig
from rlhf_cli.errors import UserError
from rlhf_cli.hub import before_lookup
from rlhf_cli.models.adapters import apply_lora
from rlhf_cli.models.dropout import disable_dropout
from rlhf_cli.models.loading import float32_master_weights, load_model, model_options
from rlhf_cli.models.value_head import PolicyWithValue, ValueHead, hidden_size

log = logging.getLogger(__name__)
REFERENCE_ADAPTER = "reference"  # the frozen starting adapter when PPO starts from an adapter folder


def is_encoder_decoder(name: str, trust_remote_code: bool = False, revision: str | None = None) -> bool:
    """Whether `name` (built-in, folder, adapter folder or Hub id) is an encoder-decoder model."""
    if name.startswith("builtin:"):
        from rlhf_cli.builtin.models import builtin_config

        return bool(builtin_config(name).is_encoder_decoder)
    adapter = Path(name) / "adapter_config.json"
    if adapter.is_file():
        return is_encoder_decoder(json.loads(adapter.read_text())["base_model_name_or_path"], trust_remote_code)
    before_lookup(name)
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError):
        return False  # load_model below reports the problem with the name clearly
    return bool(getattr(config, "is_encoder_decoder", False))


def load_policy(model_cfg: ModelConfig, peft_cfg: PeftConfig, seed: int, critic: str | None = None,
                with_value: bool = True, with_reference: bool = True):
    """(PolicyWithValue, reference or None). `with_value`: a value head (or the `critic`) for
    algorithms with a critic; `with_reference`: False for algorithms that use no reference (nothing
    is loaded for it). The reference is the starting policy, frozen:

    - full weights: a frozen copy (returned);
    - a fresh LoRA adapter (peft.use_peft on full weights): None, the same weights with the adapter
      disabled, which is the starting policy since a fresh adapter adds zero;
    - an adapter folder (e.g. the output of `rlhf sft` with peft.use_peft): None; the folder is loaded
      a second time into the same PeftModel as a frozen adapter named `reference`. Disabling the
      trained adapter would give the base model before SFT, not the starting policy.
    `reference_mode(policy)` runs the policy as its reference in every case.
    """
    name = model_cfg.model_name_or_path
    task = "seq2seq-lm" if is_encoder_decoder(name, model_cfg.trust_remote_code, model_cfg.revision) else "causal-lm"
    common = {"task": task, "seed": seed, **model_options(model_cfg)}
    policy = load_model(name, is_trainable=True, **common)
    from_adapter_folder = hasattr(policy, "peft_config")
    adapter = from_adapter_folder
    if peft_cfg.use_peft and not adapter:
        policy = apply_lora(policy, peft_cfg, task_type="SEQ_2_SEQ_LM" if task == "seq2seq-lm" else "CAUSAL_LM")
        adapter = True
    if not adapter:
        policy = float32_master_weights(policy)  # model.dtype auto on a half-precision folder
    reference = None
    if from_adapter_folder and with_reference:
        add_reference_adapter(policy, name)
    elif not adapter and with_reference:
        # the reference is the starting policy: the same weights in the same dtype
        reference = load_model(name, **common).to(policy.dtype).eval().requires_grad_(False)
        disable_dropout(reference)
    disable_dropout(policy)
    if not with_value:
        return PolicyWithValue(policy, with_value=False), reference

    value_head = ValueHead.load(name) if Path(name).is_dir() else None
    critic_backbone = None
    if critic is not None:
        if task != "causal-lm":
            raise UserError("ppo.value_model_name_or_path: a separate critic is supported for causal policies only.")
        critic_backbone, value_head = load_critic(critic, model_cfg, seed)
    elif value_head is not None:
        log.info("value head loaded from %s", name)
    if value_head is not None and critic_backbone is None and value_head.summary.in_features != hidden_size(policy):
        raise UserError(f"{name}: its value head does not match the model's hidden size.")
    return PolicyWithValue(policy, value_head, critic_backbone), reference


def add_reference_adapter(policy, folder: str) -> None:
    """Load the adapter in `folder` a second time, frozen, as the policy's `reference` adapter: the
    starting policy, at the cost of one more adapter's weights (not a second copy of the base)."""
    device = next(policy.parameters()).device
    policy.load_adapter(folder, adapter_name=REFERENCE_ADAPTER, is_trainable=False, torch_device=str(device))
    log.info("reference: the starting adapter %s, kept frozen as adapter %r beside the trained one",
             folder, REFERENCE_ADAPTER)


def has_reference_adapter(policy) -> bool:
    """Whether the policy's reference is its frozen `reference` adapter (True) or the policy with its
    adapter disabled (False; a fresh LoRA adapter)."""
    return REFERENCE_ADAPTER in getattr(policy, "peft_config", {})


@contextlib.contextmanager
def reference_mode(policy) -> Iterator[None]:
    """Inside, the LoRA policy computes the reference: with its `reference` adapter active when it
    has one, else with its adapter disabled. peft's `set_adapter` changes requires_grad of adapter
    weights; the trainable adapter's flags are put back exactly as they were."""
    if not has_reference_adapter(policy):
        with policy.disable_adapter():
            yield
        return
    trained = policy.active_adapter
    requires_grad = [(p, p.requires_grad) for p in policy.parameters()]
    policy.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        policy.set_adapter(trained)
        for p, flag in requires_grad:
            p.requires_grad_(flag)


def load_critic(name: str, model_cfg: ModelConfig, seed: int):
    """A separate critic initialised from a reward model: its backbone and its score head as the value head."""
    options = {**model_options(model_cfg), "revision": None}  # the critic's own name, not the policy's revision
    classifier = load_model(name, task="sequence-classification", num_labels=1, seed=seed,
                            config_key="ppo.value_model_name_or_path", **options)
    if hasattr(classifier, "merge_and_unload"):
        classifier = classifier.merge_and_unload()
    backbone = float32_master_weights(classifier.base_model)  # the critic trains all its weights
    head = ValueHead(hidden_size(classifier))
    score = classifier.score if hasattr(classifier, "score") else None
    if score is not None and score.weight.shape == head.summary.weight.shape:
        head.summary.weight.data.copy_(score.weight.data.float())
        if getattr(score, "bias", None) is not None:
            head.summary.bias.data.copy_(score.bias.data.float())
    else:
        log.warning("critic %s has no scalar `score` head to start from; its value head starts fresh", name)
    disable_dropout(backbone)
    return backbone, head
