"""The one loading path for every model and tokenizer name: `builtin:...`, a local folder, a PEFT
adapter folder, or a Hugging Face Hub id.

Everything a user can get wrong here (a typo in a path, a hub id while offline, a folder without a
tokenizer, a model that has no head for the task) becomes a `UserError` that names the value and
says what to check, instead of a transformers traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rlhf_cli.builtin.models import BUILTIN_MODELS, PREFIX, build_builtin, builtin_tokenizer_for
from rlhf_cli.errors import UserError
from rlhf_cli.hub import before_lookup
from rlhf_cli.models.fused import fuse_activations

log = logging.getLogger(__name__)

DEFAULT_KEY = "model.model_name_or_path"
AUTO_CLASSES = {
    "causal-lm": AutoModelForCausalLM,
    "seq2seq-lm": AutoModelForSeq2SeqLM,
    "sequence-classification": AutoModelForSequenceClassification,
    "base": AutoModel,
}
# "auto": the dtype the checkpoint was saved in (transformers 5 passes it as `dtype=`, not `torch_dtype=`);
# built-in models are float32.
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.bfloat16, torch.float16)
ADAPTER_CONFIG = "adapter_config.json"
# Any of these marks a folder that holds a tokenizer (fast, sentencepiece or BPE/WordPiece vocab files).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt",
)


def load_tokenizer(
    name_or_path: str,
    padding_side: str = "right",
    trust_remote_code: bool = False,
    revision: str | None = None,
    *,
    config_key: str = DEFAULT_KEY,
) -> PreTrainedTokenizerBase:
    """Load a tokenizer; one without a pad token gets eos as pad.

    `padding_side` goes to the constructor: transformers 5 does not save it when set afterwards.
    An adapter folder without tokenizer files falls back to its base model's tokenizer.
    """
    if name_or_path.startswith(PREFIX):
        return builtin_tokenizer_for(name_or_path, padding_side=padding_side)
    base = _adapter_base(name_or_path, config_key)
    if base is not None and not _has_tokenizer_files(name_or_path):
        base_revision = _read_adapter_config(name_or_path).get("revision")
        return load_tokenizer(base, padding_side, trust_remote_code, base_revision, config_key=_base_key(name_or_path))
    if os.path.isdir(name_or_path) and not _has_tokenizer_files(name_or_path):
        # transformers 5 would quietly build an empty tokenizer of the model's type from config.json alone
        raise UserError(
            f"{config_key}: local folder {name_or_path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer there too, or name one with model.tokenizer_name_or_path"
        )
    _announce_remote_code(trust_remote_code, name_or_path)
    before_lookup(name_or_path)
    with _as_user_error(name_or_path, config_key, "a tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, padding_side=padding_side, trust_remote_code=trust_remote_code, revision=revision
        )
    _ensure_pad_token(tokenizer, name_or_path)
    return tokenizer


def load_stage_tokenizer(model_cfg, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """The tokenizer a stage's `model` section names (`tokenizer_name_or_path`, else the model's)."""
    return load_tokenizer(
        model_cfg.tokenizer_name_or_path or model_cfg.model_name_or_path, padding_side=padding_side,
        trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision,
    )


# classification heads as transformers names them (GPT-2/LLaMA-style `score`, BERT-style `classifier`)
HEAD_WEIGHTS = ("score.weight", "classifier.weight", "classifier.out_proj.weight")


def load_model(
    name_or_path: str,
    task: str,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    seed: int = 0,
    num_labels: int | None = 1,
    *,
    attn_implementation: str | None = None,
    is_trainable: bool = False,
    config_key: str = DEFAULT_KEY,
) -> PreTrainedModel:
    """Load a model for `task` ("causal-lm", "seq2seq-lm", "sequence-classification", "base"),
    with slow activation modules swapped for fused kernels that compute the same function
    (models/fused.py).

    `seed` fixes every weight that is not loaded (a built-in's random weights, a fresh
    classification head) without touching the global RNG. `num_labels` only matters for
    sequence-classification: 1 is the scalar head of a reward model; None keeps the head of a
    saved classifier as it is (e.g. a 2-label sentiment model). `is_trainable` only matters
    for an adapter folder: False loads the adapter frozen for inference. `attn_implementation`
    (eager, sdpa, ...): None keeps transformers' default for the architecture.
    """
    if task not in AUTO_CLASSES:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(AUTO_CLASSES)}")
    torch_dtype = _parse_dtype(dtype)
    if name_or_path.startswith(PREFIX):
        model, _ = build_builtin(name_or_path, task, seed=seed, num_labels=num_labels)
        if attn_implementation:
            with _attention_errors(attn_implementation):
                model.set_attn_implementation(attn_implementation)
        return fuse_activations(model if torch_dtype == "auto" else model.to(torch_dtype))
    base = _adapter_base(name_or_path, config_key)
    if base is not None:
        if task == "sequence-classification" and num_labels is None:
            num_labels = _adapter_head_rows(name_or_path)  # the base model alone cannot tell
        base_model = load_model(
            base, task, dtype, trust_remote_code, revision=_read_adapter_config(name_or_path).get("revision"),
            seed=seed, num_labels=num_labels, attn_implementation=attn_implementation,
            config_key=_base_key(name_or_path),
        )
        return _attach_adapter(base_model, name_or_path, is_trainable)
    _announce_remote_code(trust_remote_code, name_or_path)
    extra = {"num_labels": num_labels} if task == "sequence-classification" and num_labels else {}
    if attn_implementation:
        extra["attn_implementation"] = attn_implementation
    before_lookup(name_or_path)
    with (_as_user_error(name_or_path, config_key, f"a {task} model"), _attention_errors(attn_implementation),
          torch.random.fork_rng(devices=[])):
        torch.manual_seed(seed)
        return fuse_activations(AUTO_CLASSES[task].from_pretrained(
            name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code, revision=revision, **extra
        ))


def model_options(model_cfg) -> dict:
    """load_model's keyword arguments from a stage's `model` section."""
    return {"dtype": model_cfg.dtype, "trust_remote_code": model_cfg.trust_remote_code,
            "revision": model_cfg.revision, "attn_implementation": model_cfg.attn_implementation}


def describe_model(model) -> dict:
    """What was loaded, for run_info.json: class, dtype and the attention kernel in use."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"class": type(inner).__name__, "dtype": str(inner.dtype).removeprefix("torch."),
            "attn_implementation": getattr(inner.config, "_attn_implementation", None)}


def float32_master_weights(model: PreTrainedModel) -> PreTrainedModel:
    """Full weights that train must be float32: AdamW keeps no float32 copy, and updates smaller
    than bfloat16's/float16's precision round away (most of them, at RLHF learning rates). An
    explicit `model.dtype: bfloat16`/`float16` with full-weight training is refused by the config
    check (config/checks.py); this handles `model.dtype: auto` on a checkpoint saved in half
    precision (most Hub models): a model whose trainable weights are half precision is upcast to
    float32, with a log line. A PEFT model is returned as it is: peft keeps adapter weights in
    float32 over a frozen half-precision base, but a fully trained copy (`modules_to_save`, a LoRA
    reward model's score head) in the base's dtype: that copy is upcast, its input cast to match.
    Call it once the trainable weights are decided."""
    if hasattr(model, "peft_config"):
        _float32_saved_modules(model)
        return model
    half = {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad and p.dtype in HALF}
    if not half:
        return model
    log.info(
        "%s loaded with %s weights (model.dtype auto keeps the saved dtype); its full weights train, so "
        "they are upcast to float32 (AdamW on half-precision weights loses most updates). training.bf16: true "
        "keeps bfloat16 compute; peft.use_peft: true with model.dtype: bfloat16 keeps a frozen half-precision base.",
        getattr(model, "name_or_path", "the model"), "/".join(sorted(half)),
    )
    return model.float()


def _float32_saved_modules(peft_model) -> None:
    """Upcast the half-precision trainable copies of peft's `modules_to_save` (e.g. the score head)
    and cast their floating inputs to float32, so that head trains on float32 weights."""
    from peft.utils.other import ModulesToSaveWrapper

    def to_float32(module, args):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for name, wrapper in peft_model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        for copy in wrapper.modules_to_save.values():
            if any(p.requires_grad and p.dtype in HALF for p in copy.parameters()):
                copy.float().register_forward_pre_hook(to_float32)
                log.info("%s (trained in full beside the adapter) upcast to float32", name)


def _attach_adapter(base_model: PreTrainedModel, folder: str, is_trainable: bool) -> PreTrainedModel:
    """Load the PEFT adapter in `folder` on top of its (already loaded) base model."""
    # Imported here: peft takes over a second to import and most runs load no adapter.
    from peft import PeftModel

    log.info("loading PEFT adapter %s on base model %s", folder, base_model.name_or_path)
    return PeftModel.from_pretrained(base_model, folder, is_trainable=is_trainable)


def _adapter_base(name_or_path: str, config_key: str) -> str | None:
    """The base model named by an adapter folder, or None when `name_or_path` is no adapter folder."""
    if not (Path(name_or_path) / ADAPTER_CONFIG).is_file():
        return None
    base = _read_adapter_config(name_or_path).get("base_model_name_or_path")
    if not base:
        raise UserError(
            f"{config_key}: adapter folder {name_or_path!r} does not name its base model; "
            f"set base_model_name_or_path in its {ADAPTER_CONFIG}"
        )
    return base


def _adapter_head_rows(folder: str) -> int | None:
    """The number of labels of the classification head saved in an adapter folder (a LoRA reward
    model keeps its fully trained `score` head there), or None when it holds no head."""
    from safetensors import safe_open

    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(weights, "pt") as tensors:
        for key in tensors.keys():  # noqa: SIM118 (safe_open is not iterable)
            if key.endswith(HEAD_WEIGHTS):
                return tensors.get_slice(key).get_shape()[0]
    return None


def _read_adapter_config(folder: str) -> dict:
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text())


def _base_key(adapter_folder: str) -> str:
    return f"base_model_name_or_path in {Path(adapter_folder) / ADAPTER_CONFIG}"


def _has_tokenizer_files(folder: str) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def _parse_dtype(dtype: str) -> str | torch.dtype:
    if dtype not in DTYPES:
        raise UserError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _announce_remote_code(trust_remote_code: bool, name_or_path: str) -> None:
    if trust_remote_code:
        log.warning("trust_remote_code=True: running Python code shipped with %r; use it only if you trust it", name_or_path)


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, name_or_path: str) -> None:
    """Batches need a pad token; GPT-2-style tokenizers have none, so eos stands in (attention masks hide it)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise UserError(
            f"tokenizer of {name_or_path!r} has neither a pad nor an eos token; use a tokenizer that has "
            "one (model.tokenizer_name_or_path) or add a pad token to it and save it"
        )
    tokenizer.pad_token = tokenizer.eos_token
    log.info("tokenizer of %r has no pad token; using its eos token %r as pad", name_or_path, tokenizer.eos_token)


@contextlib.contextmanager
def _as_user_error(name_or_path: str, config_key: str, what: str) -> Iterator[None]:
    """Turn the errors transformers raises for a bad name or folder into one clear UserError."""
    try:
        yield
    except (OSError, ValueError) as error:
        raise UserError(_explain(name_or_path, config_key, what, error)) from error


@contextlib.contextmanager
def _attention_errors(attn_implementation: str | None) -> Iterator[None]:
    """An attention kernel that is not installed (flash-attn) or that the architecture does not
    support: one UserError naming model.attn_implementation instead of transformers' traceback."""
    try:
        yield
    except (ImportError, ValueError) as error:
        message = str(error).lower()
        if not attn_implementation or not ("attn" in message or "attention" in message):
            raise
        detail = " ".join(str(error).split())[:300]
        raise UserError(
            f"model.attn_implementation: {attn_implementation!r} cannot be used with this model here: {detail}"
        ) from error


def _explain(name_or_path: str, config_key: str, what: str, error: Exception) -> str:
    detail = " ".join(str(error).split())[:300].rstrip(". ") or type(error).__name__
    builtins = ", ".join(PREFIX + name for name in BUILTIN_MODELS)
    if os.path.isdir(name_or_path):
        return (
            f"{config_key}: cannot load {what} from local folder {name_or_path!r}: {detail}. "
            "Check that it is a folder written by save_pretrained for this kind of model "
            "(config.json, weights, tokenizer files)."
        )
    if os.path.exists(name_or_path):
        return f"{config_key}: {name_or_path!r} is a file; give the folder that holds the model files."
    if _looks_like_path(name_or_path):
        return (
            f"{config_key}: local folder {name_or_path!r} does not exist (relative paths start from "
            f"{os.getcwd()}). Check the path, or use a built-in model ({builtins})."
        )
    return (
        f"{config_key}: {name_or_path!r} is neither a local folder nor reachable on the Hugging Face Hub "
        f"(offline?). Check the path (relative paths start from {os.getcwd()}), or the hub id "
        f"and your network; offline, use a local folder or a built-in model ({builtins}). [{detail}]"
    )


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else can only be meant as a path."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
