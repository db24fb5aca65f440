"""Built-in datasets: columns, determinism, held-out prompts and the preference gap."""

import inspect
import re

import pytest
from datasets import DatasetDict

from rlhf_cli.builtin import corpus
from rlhf_cli.builtin import datasets as datasets_module
from rlhf_cli.builtin.datasets import (
    BUILTIN_DATASETS,
    DEFAULT_SIZES,
    MIN_PREFERENCE_GAP,
    is_held_out,
    load_builtin_dataset,
)
from rlhf_cli.builtin.sentiment import sentiment_scores
from rlhf_cli.errors import UserError

SMALL = {"num_train": 300, "num_test": 60}
COLUMNS = {
    "reviews": ["text", "prompt", "completion", "label", "sentiment"],
    "review-preferences": ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"],
    "review-chat": ["messages", "label"],
    "review-prompts": ["prompt"],
    "arithmetic": ["prompt", "answer", "completion"],
    "tool-arithmetic": ["prompt", "answer", "expression"],
    "tool-arithmetic-demos": ["prompt", "completion", "answer", "expression", "mistake"],
    "tool-arithmetic-chat": ["prompt", "answer", "expression"],
    "tool-arithmetic-chat-demos": ["messages", "answer", "expression", "mistake", "tools"],
}


@pytest.fixture(scope="module", params=sorted(set(BUILTIN_DATASETS) - {"shape-prompts"}))  # finite: tested below
def small(request):
    return request.param, load_builtin_dataset(request.param, seed=0, **SMALL)


def test_every_dataset_has_train_and_test_with_its_columns(small):
    name, data = small
    assert isinstance(data, DatasetDict) and set(data) == {"train", "test"}
    assert (data["train"].num_rows, data["test"].num_rows) == (300, 60)
    assert data["train"].column_names == data["test"].column_names == COLUMNS[name]
    assert name in DEFAULT_SIZES and BUILTIN_DATASETS[name]


def test_same_seed_same_rows_other_seed_other_rows(small):
    name, data = small
    again = load_builtin_dataset(name, seed=0, **SMALL)
    other = load_builtin_dataset(name, seed=1, **SMALL)
    for split in ("train", "test"):
        assert again[split].to_dict() == data[split].to_dict()
        assert other[split].to_dict() != data[split].to_dict()


def test_shape_prompts_are_the_shapes_worlds_prompts_with_its_held_out_pairs():
    from rlhf_cli.builtin import shapes

    data = load_builtin_dataset("shape-prompts")
    assert data["train"].column_names == ["prompt", "colour", "shape", "background"]
    assert sorted(data["train"]["prompt"]) == sorted(shapes.prompts("train"))  # all 42, each once
    assert sorted(data["test"]["prompt"]) == sorted(shapes.prompts("test"))  # the 12 of the held-out pairs
    for row in data["test"]:
        assert (row["colour"], row["shape"]) in shapes.HELD_OUT_PAIRS
        assert shapes.make_prompt(row["colour"], row["shape"], row["background"]) == row["prompt"]
    other = load_builtin_dataset("shape-prompts", seed=1)
    assert other["train"]["prompt"] != data["train"]["prompt"]  # another seed, another order
    with pytest.raises(UserError, match="has 42 distinct train rows; asked for 50"):
        load_builtin_dataset("shape-prompts", num_train=50)


def test_test_rows_do_not_depend_on_the_train_size():
    small_train = load_builtin_dataset("reviews", num_train=10, num_test=30)
    large_train = load_builtin_dataset("reviews", num_train=200, num_test=30)
    assert small_train["test"].to_dict() == large_train["test"].to_dict()


def _keys(name, rows):
    if name in ("review-chat", "tool-arithmetic-chat-demos"):
        return [row["messages"][0]["content"] for row in rows]
    if name == "tool-arithmetic-chat":
        return [row["prompt"][0]["content"] for row in rows]
    return [row["prompt"] for row in rows]


def test_held_out_prompts_never_appear_in_train(small):
    name, data = small
    train, test = _keys(name, data["train"]), _keys(name, data["test"])
    assert not set(train) & set(test)
    assert all(is_held_out(key) for key in test) and not any(is_held_out(key) for key in train)
    assert len(set(test)) == len(test)  # each held-out prompt at most once
    if name == "reviews":
        assert not set(data["train"]["text"]) & set(data["test"]["text"])


def test_reviews_split_into_prompt_and_completion():
    data = load_builtin_dataset("reviews", **SMALL)["train"]
    for row in data:
        assert row["prompt"] + row["completion"] == row["text"]
        assert row["completion"].startswith(" ") and 2 <= len(row["prompt"].split(" ")) <= 5
        assert row["label"] in corpus.LABELS
    assert data["sentiment"] == sentiment_scores(data["text"])
    assert {row["label"] for row in data} == set(corpus.LABELS)


def test_preferences_chosen_beats_rejected_by_the_gap():
    data = load_builtin_dataset("review-preferences", **SMALL)
    for split in ("train", "test"):
        rows = data[split]
        chosen = sentiment_scores([p + c for p, c in zip(rows["prompt"], rows["chosen"], strict=True)])
        rejected = sentiment_scores([p + r for p, r in zip(rows["prompt"], rows["rejected"], strict=True)])
        assert chosen == rows["score_chosen"] and rejected == rows["score_rejected"]
        assert all(c - r >= MIN_PREFERENCE_GAP for c, r in zip(chosen, rejected, strict=True))
        pairs = zip(rows["chosen"], rows["rejected"], strict=True)
        assert all(c != r and c.startswith(" ") and r.startswith(" ") for c, r in pairs)


def test_preferences_are_not_all_positive_against_negative():
    """Some pairs compare two positive continuations: a reward model must rank, not only classify."""
    rows = load_builtin_dataset("review-preferences", **SMALL)["train"]
    both_positive = sum(
        c > 0.5 and r > 0.5 for c, r in zip(rows["score_chosen"], rows["score_rejected"], strict=True)
    )
    assert both_positive > 0


def test_chat_rows_ask_for_a_review_and_answer_as_asked():
    data = load_builtin_dataset("review-chat", **SMALL)["train"]
    for row in data:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert "review" in user["content"].lower() and assistant["content"]
        count = re.search(r"\b(two|three|four|five|six) sentences", user["content"])
        if count:
            sentences = re.split(r"(?<=[.!?]) ", assistant["content"])
            assert len(sentences) == corpus.RULES["number"].index(count.group(1)) + 1
    scores = sentiment_scores([row["messages"][1]["content"] for row in data])
    for label, score in zip(data["label"], scores, strict=True):
        assert {"positive": score >= 0.3, "negative": score <= -0.3, "neutral": abs(score) <= 0.5}[label]


def test_review_prompts_are_distinct_openings():
    data = load_builtin_dataset("review-prompts", **SMALL)
    for split in ("train", "test"):
        prompts = data[split]["prompt"]
        assert len(set(prompts)) == len(prompts) and all(2 <= len(p.split(" ")) <= 5 for p in prompts)


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(UserError, match="unknown built-in dataset 'imdb'.*review-chat, review-preferences"):
        load_builtin_dataset("imdb")


def test_negative_size_is_a_user_error():
    with pytest.raises(UserError, match="num_train"):
        load_builtin_dataset("reviews", num_train=-1)


def test_empty_splits_keep_their_columns():
    data = load_builtin_dataset("review-chat", num_train=0, num_test=0)
    assert data["train"].num_rows == 0 and data["train"].column_names == COLUMNS["review-chat"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BUILTIN_DATASETS))
def test_default_sizes_can_be_generated(name):
    """Default sizes are reachable (enough distinct held-out prompts) in a few seconds each."""
    data = load_builtin_dataset(name, cache=False)
    assert (data["train"].num_rows, data["test"].num_rows) == DEFAULT_SIZES[name]


def test_text_worlds_load_without_pillow():
    """Pillow comes with the `diffusion` extra only: the text stages' built-in data must not need it (it once
    did, through shapes.py, and every bench side in a venv without Pillow failed at import)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['PIL'] = None\n"  # `import PIL` now raises ImportError
            "from rlhf_cli.builtin.datasets import load_builtin_dataset\n"
            "print(len(load_builtin_dataset('review-prompts')['train']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 0


def test_the_default_sizes_are_generated_once_then_read_from_the_cache(tmp_path, monkeypatch):
    """Every launch (and every process of one) loads its built-in data at the default sizes: generating them
    took 1-9 s each time, reading them back takes milliseconds. What is read back is what was generated: rows,
    column types (nested messages and tool schemas included) and order. Other sizes are generated each time."""
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    for name in ("arithmetic", "shape-prompts", "tool-arithmetic-chat-demos"):
        generated = load_builtin_dataset(name, seed=2)
        folder = datasets_module.cache_folder(name, 2)
        assert folder.parent == tmp_path / "builtin" / "datasets" and (folder / "dataset_dict.json").is_file()
        with monkeypatch.context() as patched:  # no generation from here on
            patched.setattr(datasets_module, "_split", lambda *args: pytest.fail("generated instead of read"))
            cached = load_builtin_dataset(name, seed=2)
        for split in ("train", "test"):
            assert cached[split].features == generated[split].features
            assert cached[split].to_dict() == generated[split].to_dict()
            assert not cached[split].cache_files  # in memory: `map` writes nothing into the cache folder
        assert load_builtin_dataset(name, seed=2, cache=False)["test"].to_dict() == generated["test"].to_dict()
    load_builtin_dataset("arithmetic", seed=2, num_train=10)  # not the default size: generated, not cached
    assert sorted(path.name for path in folder.parent.iterdir()) == sorted(  # no temporary folder left behind
        datasets_module.cache_folder(name, 2).name for name in ("arithmetic", "shape-prompts", "tool-arithmetic-chat-demos"))


def test_the_cache_key_covers_the_seed_and_every_module_the_rows_come_from(monkeypatch):
    from rlhf_cli.builtin import lexicon, sentiment
    from rlhf_cli.environments import calculator

    folder = datasets_module.cache_folder("reviews", 0)
    assert len({folder, datasets_module.cache_folder("reviews", 1), datasets_module.cache_folder("review-chat", 0)}) == 3
    # the grammar's word lists (through corpus.py), the gold scorer, and the calculator (a function tool_world.py imports)
    sources = datasets_module.project_sources(datasets_module)
    assert {inspect.getsource(module) for module in (datasets_module, lexicon, sentiment, calculator)} <= set(sources)
    monkeypatch.setattr(datasets_module, "project_sources", lambda module: [*sources[:-1], sources[-1] + "# edited"])
    assert datasets_module.cache_folder("reviews", 0) != folder
