"""Built-in datasets of the offline world, generated on the fly from the review grammar.

(``shape-prompts``, the text-to-image prompts of the shapes world for ``rlhf ddpo``, holds out what
``shapes.py`` holds out: four colour/shape pairs in every background. ``arithmetic``, short sums with exact answers for GRPO/RLOO, comes from ``arithmetic.py`` and
follows the same rules: its prompts are held out by the same hash. ``tool-arithmetic`` and
``tool-arithmetic-demos``, word problems for RL with the calculator and SFT demonstrations of the tool
protocol, come from ``tool_world.py``; a test row has both its prompt and its expression on the held-out
side (a train row neither), so a test problem is never a train problem of either, in any wording. Their
chat versions ``tool-arithmetic-chat`` and ``tool-arithmetic-chat-demos`` follow the same rule, the user's
question standing for the prompt; the expression's side keeps their test problems out of every train
split of the four.)

Every dataset is a ``DatasetDict`` with ``train`` and ``test`` splits, fixed by ``seed`` (another
seed gives other rows). Generating the default sizes takes 1-9 s (VADER scoring most of it), once
paid by every process of every launch; now a dataset at those sizes is generated once and then read
from ``$RLHF_CACHE/builtin/datasets/<name>-seed<seed>-<hash>/`` (a ``save_to_disk`` folder, read into
memory in ~0.05 s; other sizes, asked for by tests and programs, are generated each time). The hash
covers the source of this module and of every project module it uses, and the versions of VADER and
``datasets``, so that editing the grammar regenerates instead of reading stale rows. Two rules keep
the evaluation honest:

* Held-out prompts. A fixed tenth of all prompt strings (chosen by a CRC32 hash of the text, so
  the same for every seed and every dataset) may be the prompt of test rows only, the rest of
  train rows only. So no test prompt of any built-in dataset is the prompt of any train row, even
  when one pipeline trains SFT on ``reviews``, a reward model on ``review-preferences`` and PPO on
  ``review-prompts``; preference pairs of the test split are unseen with them. (A short held-out
  prompt such as "So I" may still begin a longer training prompt: what is held out is the query.)
  Chat rows are split the same way on the user's request.
* Distinct rows. Rows are unique within a split; test splits also hold each prompt at most once,
  so that a few common openings ("I watched") cannot crowd out the rest.

The prompt of a review is its first 2-5 words, always cut inside the neutral opening, so a prompt
never gives the sentiment away and the policy's own words decide the gold score. Besides the
columns trainers need, rows carry the gold facts evaluations use: ``score_chosen`` and
``score_rejected`` on preference pairs, the requested ``label`` on chat rows.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict, Features, List, Value

from rlhf_cli.builtin import arithmetic, corpus, shapes, tool_world
from rlhf_cli.builtin.cache import cache_root, project_sources, write_atomically
from rlhf_cli.builtin.sentiment import sentiment_scores
from rlhf_cli.errors import UserError

BUILTIN_DATASETS: dict[str, str] = {
    "reviews": "synthetic movie reviews: text, prompt (first 2-5 words), completion, label, sentiment",
    "review-preferences": "two continuations of one opening: prompt, chosen, rejected (gold gap >= 0.2)",
    "review-chat": "messages: a user asks for a positive/negative/mixed film review, the assistant writes it",
    "review-prompts": "distinct review openings (prompt) for PPO rollouts and evaluation",
    "arithmetic": "sums of 2-3 single-digit operands with + and -: prompt '7 + 5 =', answer '12', completion ' 12'",
    "tool-arithmetic": "word problems over 2-digit numbers to solve with the calculator: prompt, answer, expression",
    "tool-arithmetic-demos": "episodes of the calculator protocol for SFT: prompt, completion, answer, expression, mistake",
    "tool-arithmetic-chat": "the word problems for chat models: prompt (one user message), answer, expression",
    "tool-arithmetic-chat-demos": "chat episodes with calculator tool calls for SFT: messages, answer, expression, "
                                  "mistake, tools (the calculator's JSON schema)",
    "shape-prompts": "text-to-image prompts of the shapes world ('a red circle on a white background'): prompt, "
                     "colour, shape, background; test: the 12 prompts of its held-out colour/shape pairs",
}
DEFAULT_SIZES: dict[str, tuple[int, int]] = {
    "reviews": (20_000, 1_000),
    "review-preferences": (10_000, 1_000),
    "review-chat": (10_000, 500),
    "review-prompts": (10_000, 500),
    "arithmetic": (2_000, 200),  # of 178 + 3587 train and 22 + 413 held-out problems (2 + 3 operands)
    "tool-arithmetic": (4_000, 200),
    "tool-arithmetic-demos": (4_000, 200),
    "tool-arithmetic-chat": (4_000, 200),
    "tool-arithmetic-chat-demos": (4_000, 200),
    "shape-prompts": (42, 12),  # all of them: shapes.py has 42 training and 12 held-out prompts
}
MIN_PREFERENCE_GAP = 0.2
HELD_OUT_PERCENT = 10

_STRING = Value("string")
_MESSAGES = List({"role": _STRING, "content": _STRING})


def _feature(value: object) -> object:
    """The datasets feature of a JSON value made of mappings, lists and strings (a tool schema)."""
    if isinstance(value, dict):
        return {key: _feature(item) for key, item in value.items()}
    if isinstance(value, list):
        return List(_feature(value[0]))
    return _STRING


_TOOL_CALL_MESSAGES = List({
    "role": _STRING, "content": _STRING, "name": _STRING,
    "tool_calls": List({"type": _STRING, "function": {"name": _STRING, "arguments": {"expression": _STRING}}}),
})
_FEATURES = {
    "reviews": Features(
        {
            "text": _STRING,
            "prompt": _STRING,
            "completion": _STRING,
            "label": _STRING,
            "sentiment": Value("float64"),
        }
    ),
    "review-preferences": Features(
        {
            "prompt": _STRING,
            "chosen": _STRING,
            "rejected": _STRING,
            "score_chosen": Value("float64"),
            "score_rejected": Value("float64"),
        }
    ),
    "review-chat": Features({"messages": List({"role": _STRING, "content": _STRING}), "label": _STRING}),
    "review-prompts": Features({"prompt": _STRING}),
    "arithmetic": Features({"prompt": _STRING, "answer": _STRING, "completion": _STRING}),
    "tool-arithmetic": Features({"prompt": _STRING, "answer": _STRING, "expression": _STRING}),
    "tool-arithmetic-demos": Features(
        {"prompt": _STRING, "completion": _STRING, "answer": _STRING, "expression": _STRING, "mistake": _STRING}
    ),
    "shape-prompts": Features({"prompt": _STRING, "colour": _STRING, "shape": _STRING, "background": _STRING}),
    "tool-arithmetic-chat": Features({"prompt": _MESSAGES, "answer": _STRING, "expression": _STRING}),
    # "tools" is added when first needed (`_features`): its feature is read off the calculator's schema
    "tool-arithmetic-chat-demos": Features(
        {"messages": _TOOL_CALL_MESSAGES, "answer": _STRING, "expression": _STRING, "mistake": _STRING}
    ),
}
# Label pairs for preference pairs: mostly opposite polarities, some harder same-polarity pairs.
_PAIR_LABELS = (
    (("positive", "negative"), 3),
    (("positive", "neutral"), 2),
    (("neutral", "negative"), 2),
    (("positive", "positive"), 1),
    (("negative", "negative"), 1),
    (("neutral", "neutral"), 1),
)
# A chat answer must read as asked: the gold score range each requested polarity accepts.
_CHAT_RANGES = {"positive": (0.3, 1.0), "negative": (-1.0, -0.3), "neutral": (-0.5, 0.5)}

Row = dict[str, object]


def is_held_out(key: str) -> bool:
    """Whether ``key`` (a prompt or a chat request) belongs to the test side; same for every seed."""
    return zlib.crc32(key.encode("utf-8")) % 100 < HELD_OUT_PERCENT


def _openings(rng: random.Random, test: bool) -> Iterator[tuple[corpus.Film, str, str]]:
    """Endless (film, opening, prompt) triples whose prompt falls on the requested side."""
    while True:
        film = corpus.random_film(rng)
        opening = corpus.sentence(rng, "opening", film)
        words = opening.split(" ")
        k = rng.choices(range(2, 6), weights=(1, 2, 3, 3))[0]
        prompt = " ".join(words[: min(k, len(words) - 1)])
        if is_held_out(prompt) == test:
            yield film, opening, prompt


def _review_rows(rng: random.Random, test: bool) -> Iterator[Row]:
    for film, opening, prompt in _openings(rng, test):
        review = corpus.write_review(rng, film=film, opening=opening)
        yield {
            "text": review.text,
            "prompt": prompt,
            "completion": review.text[len(prompt) :],
            "label": review.label,
        }


def _preference_rows(rng: random.Random, test: bool) -> Iterator[Row]:
    pairs, weights = zip(*_PAIR_LABELS, strict=True)
    for film, opening, prompt in _openings(rng, test):
        first, second = rng.choices(pairs, weights=weights)[0]
        a = corpus.write_review(rng, first, film, opening).text
        b = corpus.write_review(rng, second, film, opening).text
        score_a, score_b = sentiment_scores([a, b])
        if abs(score_a - score_b) < MIN_PREFERENCE_GAP:
            continue  # too close to call: draw a new opening rather than keep a noisy pair
        if score_a < score_b:
            a, b, score_a, score_b = b, a, score_b, score_a
        yield {
            "prompt": prompt,
            "chosen": a[len(prompt) :],
            "rejected": b[len(prompt) :],
            "score_chosen": score_a,
            "score_rejected": score_b,
        }


def _chat_rows(rng: random.Random, test: bool) -> Iterator[Row]:
    while True:
        label, film = rng.choice(corpus.LABELS), corpus.random_film(rng)
        request = corpus.sentence(rng, f"request_{label}", film)
        num_sentences = rng.randint(2, 6)
        if rng.random() < 0.4:
            count = corpus.RULES["number"][num_sentences - 1]
            request += " " + corpus.sentence(rng, "request_length", film, count=count)
        if is_held_out(request) != test:
            continue
        review = corpus.write_review(rng, label, film, num_sentences=num_sentences)
        low, high = _CHAT_RANGES[label]
        if low <= sentiment_scores([review.text])[0] <= high:
            messages = [{"role": "user", "content": request}, {"role": "assistant", "content": review.text}]
            yield {"messages": messages, "label": label}


def _prompt_rows(rng: random.Random, test: bool) -> Iterator[Row]:
    for _film, _opening, prompt in _openings(rng, test):
        yield {"prompt": prompt}


def _arithmetic_rows(rng: random.Random, test: bool) -> Iterator[Row]:
    for row in arithmetic.random_problems(rng):
        if is_held_out(row["prompt"]) == test:
            yield row


def _tool_rows(rng: random.Random, test: bool) -> Iterator[Row]:
    # The expression's side keeps a held-out problem out of train in every wording; the prompt's keeps
    # the rule every built-in dataset follows (test prompts are held-out strings). 1% of draws are test.
    for row in tool_world.random_problems(rng):
        if is_held_out(row["expression"]) == is_held_out(row["prompt"]) == test:
            yield row


def _tool_demo_rows(rng: random.Random, test: bool) -> Iterator[Row]:
    for row in _tool_rows(rng, test):
        yield tool_world.demonstration(rng, row)


def _chat_tool_rows(rng: random.Random, test: bool) -> Iterator[Row]:
    # as _tool_rows, the user's question standing for the prompt
    for row in tool_world.random_problems(rng):
        if is_held_out(row["expression"]) == is_held_out(tool_world.question(row)) == test:
            yield row


def _chat_problem_rows(rng: random.Random, test: bool) -> Iterator[Row]:
    for row in _chat_tool_rows(rng, test):
        yield tool_world.chat_problem_row(row)


def _chat_demo_rows(rng: random.Random, test: bool) -> Iterator[Row]:
    schema = tool_world.calculator_schema()
    for row in _chat_tool_rows(rng, test):
        yield tool_world.chat_demonstration(rng, row, schema)


def _shape_prompt_rows(rng: random.Random, test: bool) -> Iterator[Row]:
    # the shapes world holds its own colour/shape pairs out (shapes.HELD_OUT_PAIRS), not the CRC32 tenth
    split = shapes.prompts("test" if test else "train")
    rng.shuffle(split)
    for prompt in split:
        colour, shape, background = shapes.parse_prompt(prompt)
        yield {"prompt": prompt, "colour": colour, "shape": shape, "background": background}


_ROWS: dict[str, tuple[Callable[[random.Random, bool], Iterator[Row]], Callable[[Row], object]]] = {
    # name: (row generator, the part of a row that must be unique within a split)
    "reviews": (_review_rows, lambda row: row["text"]),
    "review-preferences": (_preference_rows, lambda row: (row["prompt"], row["chosen"], row["rejected"])),
    "review-chat": (_chat_rows, lambda row: row["messages"][0]["content"]),
    "review-prompts": (_prompt_rows, lambda row: row["prompt"]),
    "arithmetic": (_arithmetic_rows, lambda row: row["prompt"]),
    "tool-arithmetic": (_tool_rows, lambda row: row["expression"]),
    "tool-arithmetic-demos": (_tool_demo_rows, lambda row: row["expression"]),
    "tool-arithmetic-chat": (_chat_problem_rows, lambda row: row["expression"]),
    "tool-arithmetic-chat-demos": (_chat_demo_rows, lambda row: row["expression"]),
    "shape-prompts": (_shape_prompt_rows, lambda row: row["prompt"]),
}


def _split(name: str, seed: int, split: str, size: int) -> Dataset:
    make_rows, unique_key = _ROWS[name]
    rng = random.Random(f"rlhf_cli.builtin:{name}:{seed}:{split}")
    test = split == "test"
    rows: list[Row] = []
    seen: set[object] = set()
    seen_prompts: set[object] = set()
    for attempt, row in enumerate(make_rows(rng, test) if size else ()):
        if attempt > 50 * size + 1_000:
            raise UserError(
                f"built-in dataset {name!r}: could not make {size} distinct {split} rows; ask for fewer"
            )
        key, prompt = unique_key(row), row.get("prompt")
        prompt = repr(prompt) if isinstance(prompt, list) else prompt  # a conversation, as a set member
        if key in seen or (test and prompt is not None and prompt in seen_prompts):
            continue
        seen.add(key)
        seen_prompts.add(prompt)
        rows.append(row)
        if len(rows) == size:
            break
    if len(rows) < size:  # a finite world (shape-prompts) ran out of distinct rows
        raise UserError(f"built-in dataset {name!r} has {len(rows)} distinct {split} rows; asked for {size}")
    if name == "reviews":
        scores = sentiment_scores([row["text"] for row in rows])
        rows = [row | {"sentiment": score} for row, score in zip(rows, scores, strict=True)]
    features = _features(name)
    columns = {column: [row[column] for row in rows] for column in features}
    return Dataset.from_dict(columns, features=features)


def _features(name: str) -> Features:
    if name == "tool-arithmetic-chat-demos":
        return Features({**_FEATURES[name], "tools": List(_feature(tool_world.calculator_schema()))})
    return _FEATURES[name]


def load_builtin_dataset(
    name: str, seed: int = 0, num_train: int | None = None, num_test: int | None = None, cache: bool = True
) -> DatasetDict:
    """The built-in dataset ``name`` (see ``BUILTIN_DATASETS``) for ``seed``. At the default sizes (what a
    config's ``builtin:`` name loads) it is read from the cache where an earlier call generated it, else
    generated and cached; other sizes, and ``cache=False``, are generated each time and never written.

    ``num_train`` / ``num_test`` default to ``DEFAULT_SIZES[name]``. The test split depends only
    on ``seed`` and ``num_test``, so asking for more training rows never changes the test rows.
    """
    if name not in BUILTIN_DATASETS:
        valid = ", ".join(sorted(BUILTIN_DATASETS))
        raise UserError(f"unknown built-in dataset {name!r}; valid names are: {valid}")
    default_train, default_test = DEFAULT_SIZES[name]
    sizes = {
        "train": default_train if num_train is None else num_train,
        "test": default_test if num_test is None else num_test,
    }
    for split, size in sizes.items():
        if not isinstance(size, int) or size < 0:
            raise UserError(
                f"built-in dataset {name!r}: num_{split} must be a whole number >= 0, got {size!r}"
            )
    if not cache or (sizes["train"], sizes["test"]) != DEFAULT_SIZES[name]:
        return _generate(name, seed, sizes)
    folder = cache_folder(name, seed)
    if (folder / "dataset_dict.json").is_file():
        # in memory, as a generated one is: `map` writes no cache files beside the cached rows
        return DatasetDict.load_from_disk(str(folder), keep_in_memory=True)
    data = _generate(name, seed, sizes)
    write_atomically(folder, lambda tmp: data.save_to_disk(str(tmp)), "dataset_dict.json")
    return data


def _generate(name: str, seed: int, sizes: dict[str, int]) -> DatasetDict:
    return DatasetDict({split: _split(name, seed, split, size) for split, size in sizes.items()})


def cache_folder(name: str, seed: int) -> Path:
    """Where the rows of ``name`` for ``seed`` at the default sizes are cached (they may not be yet)."""
    return cache_root() / "datasets" / f"{name}-seed{seed}-{_source_hash()}"


def _source_hash() -> str:
    """Hash of what decides the rows besides the arguments: the generators' source and VADER's lexicon and
    rules (its version), and the version of `datasets`, which writes and reads the cached files."""
    payload = {"sources": project_sources(sys.modules[__name__]),
               "vader": importlib.metadata.version("vaderSentiment"), "datasets": datasets.__version__}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:12]
