"""The built-in tokenizer: byte-level BPE trained on the built-in review corpus.

Every `builtin:` model except MiniLM uses it, so config ids (vocab size, pad/eos/bos) come from here.

Choices, and why:
- Byte-level BPE (as GPT-2) never produces an unknown token and decodes back to the exact text.
- No special tokens are added by `tokenizer(text)` (GPT-2 style): callers that want an eos at the
  end of a target append it themselves, and the chat template writes every role and eos token.
  This keeps "what went in" obvious and matches how GPT-2 checkpoints behave.
- Training takes seconds, so the trained `tokenizer.json` is cached on disk under
  `$RLHF_CACHE/builtin/tokenizer-<hash>/` (default `~/.cache/rlhf`) and in memory. The hash covers
  the training recipe and the corpus source, so editing either retrains instead of reusing stale files.
- Everything transformers needs beyond the trained vocabulary (special tokens, chat template,
  `padding_side`, `model_max_length`) is passed to the constructor, because transformers 5 only
  saves what the constructor received.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_cli.builtin.cache import cache_root, project_sources, write_atomically

VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 512
# Bump when the training recipe changes in a way the hash below cannot see.
TOKENIZER_VERSION = 1

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Their order fixes their ids: pad=0, eos=1, bos=2, then the role tokens 3..5.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, *ROLE_TOKENS)

# One role token and a newline open every turn. The assistant's content and the eos that ends it sit
# inside {% generation %} so `return_assistant_tokens_mask=True` marks exactly the tokens SFT learns
# (including eos, so the model learns to stop). `add_generation_prompt` opens an assistant turn.
# Tool calling, Qwen 2.5 style with no new tokens: `tools` open the conversation with a system turn that
# lists their JSON schemas (the `function` part), one per line, and says how to call them (a system message of the
# conversation is written first in that turn); an assistant message's `tool_calls` are written, inside the
# generation markers (the model writes them), after its content as `<tool_call>\n{"name": ...,
# "arguments": {...}}\n</tool_call>`, one per line; a `tool` message is a user turn
# `<|user|>\n<tool_response>\n...\n</tool_response>\n`. Without tools, tool calls or tool messages a
# conversation renders exactly as before these were added.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|system|>\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n' }}{%- endif %}"
    "{{- 'You can call these tools:\\n' }}"
    "{%- for tool in tools %}"
    "{{- (tool['function'] if tool['function'] is defined else tool) | tojson }}{{- '\\n' }}"
    "{%- endfor %}"
    "{{- 'Call a tool with <tool_call>\\n{\"name\": ..., \"arguments\": {...}}\\n</tool_call>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('Unknown chat role ' + message['role'] + ': use system, user, assistant or tool') }}"
    "{%- endif %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"  # written with the tools above
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|user|>\\n<tool_response>\\n' }}"
    "{{- message['content'] if message['content'] is string else message['content'] | tojson }}"
    "{{- '\\n</tool_response>\\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{%- generation %}"
    "{{- message['content'] or '' }}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set call = call['function'] if call['function'] is defined else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": ' + (call['name'] | tojson) + ', \"arguments\": ' }}"
    "{{- call['arguments'] if call['arguments'] is string else call['arguments'] | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- eos_token }}"
    "{%- endgeneration %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str]) -> Tokenizer:
    """Train the byte-level BPE backend on `texts` (deterministic for the same texts)."""
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False: "hello" and " hello" stay different, so decode(encode(t)) == t exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact; the assistant mask is computed from them.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap_tokenizer(backend: Tokenizer, padding_side: str = "right") -> PreTrainedTokenizerFast:
    """Wrap a trained backend as a transformers tokenizer with the built-in special tokens and chat template."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=None,  # byte-level BPE has no unknown token
        extra_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
    )


def builtin_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    """The built-in tokenizer, trained on first use and then loaded from the cache."""
    return wrap_tokenizer(_cached_backend(), padding_side=padding_side)


def cache_dir() -> Path:
    """Folder of the trained tokenizer for the current recipe and corpus."""
    return cache_root() / f"tokenizer-{_version_hash()}"


def _cached_backend() -> Tokenizer:
    return _load_or_train(cache_dir())


@functools.cache
def _load_or_train(folder: Path) -> Tokenizer:
    """In-process cache keyed by folder, so a changed $RLHF_CACHE is honoured."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        from rlhf_cli.builtin.corpus import training_text

        backend = train_tokenizer(training_text())
        write_atomically(folder, lambda tmp: backend.save(str(tmp / "tokenizer.json")), "tokenizer.json")
    return Tokenizer.from_file(str(path))


def _version_hash() -> str:
    """Hash of what decides the trained files: the recipe above and the corpus generator's source.

    Hashing source instead of the generated text keeps a cached load fast (generating the corpus
    takes about a second); it covers `corpus.py` and the project modules it imports (the lexicon).
    """
    recipe = {
        "version": TOKENIZER_VERSION,
        "vocab_size": VOCAB_SIZE,
        "special_tokens": SPECIAL_TOKENS,
        "trainer": inspect.getsource(train_tokenizer),
        "corpus": _corpus_sources(),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def _corpus_sources() -> list[str]:
    from rlhf_cli.builtin import corpus

    return project_sources(corpus)
