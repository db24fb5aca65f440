"""The row transforms of the Hub recipes' data preparation scripts (the download itself needs the Hub)."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(recipe: str):
    path = REPO / "recipes" / recipe / "prepare_data.py"
    spec = importlib.util.spec_from_file_location(f"prepare_{recipe.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stack_exchange_rows():
    prep = load_script("stack-llama")
    rows = [
        {"question": "How?", "response_j": "Like this.", "response_k": "No idea."},
        {"question": "How?", "response_j": "Also so.", "response_k": "Nope."},
        {"question": "Why?", "response_j": "Because.", "response_k": "?"},
    ]
    assert prep.finetune_row(rows[0]) == {"prompt": "Question: How?\n\nAnswer: ", "completion": "Like this."}
    assert prep.reward_row(rows[0]) == {"prompt": "Question: How?\n\nAnswer: ", "chosen": "Like this.", "rejected": "No idea."}
    assert prep.take(rows, prep.rl_row, True, 10) == [{"prompt": "Question: How?\n\nAnswer: "}, {"prompt": "Question: Why?\n\nAnswer: "}]
    assert len(prep.take(rows, prep.reward_row, False, 2)) == 2


def test_real_toxicity_prompt_rows():
    prep = load_script("detoxify")
    row = {"prompt": {"text": "You are such a", "toxicity": 0.7}}
    assert prep.keep(row) and not prep.keep({"prompt": {"text": "Hi", "toxicity": 0.1}})
    assert not prep.keep({"prompt": {"text": "?", "toxicity": None}})
    assert prep.flatten(row) == {"prompt": "You are such a", "prompt_toxicity": 0.7}
