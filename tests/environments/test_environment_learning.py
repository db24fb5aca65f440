"""RL with tools in the loop learns, in bounded time, through the real CLI: builtin:tiny-gpt2 is SFT'd on
demonstrations of which half call the calculator and half answer straight away; GRPO with the calculator
in the loop then raises held-out exact-match accuracy well over the SFT model's (it learns to call the
calculator, whose answers are right, instead of guessing), and far over the same models without tools.

The world has the shape of the built-in one (builtin:tool-arithmetic, recipes/tools) at a size a
0.4M-parameter model can copy numbers in: "What is 47 times 6?" with a two-digit and a one-digit factor
(720 problems; 60 held out, never trained on). The answers are products it cannot learn in its head
from ~600 demonstrations over 660 problems, so without the calculator it is (nearly) always wrong.
Measured on a 2-core CPU (60 held-out problems x 4 samples): SFT 0.487 (tool-call rate 0.54) -> GRPO
0.854 (1.00); 0.000 for both without the calculator; about a minute for the whole test.
"""

import json
import random
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

TEST_PAIRS = 60


def prompt(a: int, b: int) -> str:
    return f"What is {a} times {b}?\nAnswer:"


def write_world(root: Path) -> dict[str, Path]:
    """demos.jsonl (SFT: prompt, completion), train.jsonl (RL prompts) and test.jsonl (held out)."""
    rng = random.Random(0)
    pairs = [(a, b) for a in range(10, 100) for b in range(2, 10)]
    rng.shuffle(pairs)
    test, train = pairs[:TEST_PAIRS], pairs[TEST_PAIRS:]
    demos = []
    for _ in range(1200):
        a, b = rng.choice(train)
        call = f" <call>calculator {a}*{b}</call><result>{a * b}</result>" if rng.random() < 0.5 else ""
        demos.append({"prompt": prompt(a, b), "completion": f"{call} The answer is {a * b}.", "answer": str(a * b)})
    files = {"demos": demos, "train": [{"prompt": prompt(a, b), "answer": str(a * b)} for a, b in train],
             "test": [{"prompt": prompt(a, b), "answer": str(a * b)} for a, b in test]}
    paths = {}
    for name, rows in files.items():
        paths[name] = root / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def run(root: Path, stage: str, config: dict) -> None:
    path = root / f"{stage}-{len(list(root.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"stage": stage, **config}, sort_keys=False))
    result = run_cli(stage, str(path))
    assert result.returncode == 0, result.stderr[-3000:]


def evaluate(root: Path, models: list[Path], test: Path, tools: list[str]) -> dict[str, dict]:
    """Each model's accuracy and tool use on the held-out problems: 60 x 4 samples at temperature 0.7."""
    out = root / f"eval-{len(tools)}"
    run(root, "eval", {
        "eval": {"models": [str(m) for m in models], "num_prompts": TEST_PAIRS, "samples_per_prompt": 4, "seed": 0,
                 "output_dir": str(out), "batch_size": 120},
        "data": {"dataset_name": str(test), "prompt_column": "prompt", "dataset_test_split": "train",
                 "max_prompt_length": 32},
        "generation": {"response_length": 32, "temperature": 0.7, "top_k": 0, "top_p": 1.0},
        "reward": {"function": "builtin:tool-answer"},
        "environment": {"tools": tools, "max_turns": 2, "max_length": 64},
    })
    return json.loads((out / "eval.json").read_text())["models"]


@pytest.mark.slow(minutes=1.5)
def test_grpo_with_the_calculator_raises_held_out_accuracy_over_sft_and_over_no_tools(tmp_path):
    world = write_world(tmp_path)
    sft, grpo = tmp_path / "sft", tmp_path / "grpo"
    # 1. SFT on the demonstrations (the results masked out of the loss)
    run(tmp_path, "sft", {
        "model": {"model_name_or_path": "builtin:tiny-gpt2"},
        "data": {"dataset_name": str(world["demos"]), "dataset_format": "prompt-completion",
                 "tool_result_markers": ["<result>", "</result>"], "max_length": 64, "dataset_test_split": None},
        "training": {"output_dir": str(sft), "max_steps": 300, "per_device_train_batch_size": 16,
                     "learning_rate": 5e-3, "warmup_steps": 20, "logging_steps": 50, "save_steps": 1000},
    })
    # 2. GRPO with the calculator in the loop: 10 iterations of 8 problems x 8 episodes
    run(tmp_path, "grpo", {
        "model": {"model_name_or_path": str(sft)},
        "data": {"dataset_name": str(world["train"]), "max_prompt_length": 32, "dataset_test_split": None},
        "generation": {"response_length": 32, "temperature": 0.7, "top_k": 0, "top_p": 1.0},
        "reward": {"function": "builtin:tool-answer"},
        "environment": {"tools": ["builtin:calculator"], "max_turns": 2, "max_length": 64},
        "training": {"output_dir": str(grpo), "seed": 42, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
                     "per_device_train_batch_size": 64, "logging_steps": 2, "save_steps": 1000},
        "grpo": {"total_episodes": 640, "num_generations": 8, "steps_per_generation": 1, "beta": 0.0,
                 "loss_type": "dapo", "sample_steps": 100},
    })
    # 3. Both models on the held-out problems, with the calculator and without it
    with_tools = evaluate(tmp_path, [sft, grpo], world["test"], ["builtin:calculator"])
    without = evaluate(tmp_path, [sft, grpo], world["test"], [])
    accuracy = {name: result["reward"]["mean"] for name, result in with_tools.items()}
    calling = {name: result["environment"]["env/tool_call_rate"] for name, result in with_tools.items()}
    summary = f"with tools {accuracy}, tool-call rate {calling}"
    # the SFT model skips the calculator often (half its demos do), and is then wrong
    assert calling["sft"] < 0.8, summary
    # GRPO learned to call it (measured 0.54 -> 1.00), which lifts held-out accuracy (0.487 -> 0.854;
    # 240 samples: the standard error of each is < 0.033, so 0.15 is > 3 of them)
    assert calling["grpo"] > 0.9, summary
    assert accuracy["grpo"] > accuracy["sft"] + 0.15, summary
    # without the calculator neither model can multiply: every right answer was the tool's
    assert all(result["reward"]["mean"] < 0.05 for result in without.values()), without
    assert accuracy["grpo"] > 0.5, summary
