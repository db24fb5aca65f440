"""Text environments through the real CLI: a tiny model SFT'd briefly on the built-in calculator
demonstrations (tool results masked out of its loss) calls the calculator; `rlhf ppo`, `grpo` and `rloo`
with an `environment:` section run multi-turn episodes, log the environment's figures, pass the
episodes to the reward, and `rlhf eval` reports tool use; bad environment keys exit 2."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from rlhf_cli.training.metrics import read_metrics

ENV_METRICS = {"env/turns", "env/tool_calls", "env/tool_call_rate", "env/tool_error_rate", "env/tool_timeouts",
               "env/stop_eos", "env/stop_length", "env/stop_max_turns", "time/tools_s"}


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    """builtin:tiny-gpt2 after 50 steps on 800 demonstrations: it has learned the protocol's shape
    (it opens calls and closes them), not yet the numbers."""
    return sft_tiny(tmp_path_factory.mktemp("tools"),
                    {"dataset_name": "builtin:tool-arithmetic-demos", "dataset_format": "prompt-completion",
                     "tool_result_markers": ["<result>", "</result>"], "max_length": 192, "max_train_samples": 800},
                    {"max_steps": 50, "per_device_train_batch_size": 16, "warmup_steps": 5})


def sft_tiny(root: Path, data: dict, training: dict) -> Path:
    """builtin:tiny-gpt2 SFT'd through the CLI at lr 1e-2 on `data`, in root/sft."""
    config = write(root / "sft.yaml", {
        "stage": "sft", "model": {"model_name_or_path": "builtin:tiny-gpt2"},
        "data": {**data, "dataset_test_split": None},
        "training": {"output_dir": str(root / "sft"), "learning_rate": 1e-2, "logging_steps": 20, "save_steps": 100,
                     **training},
    })
    result = run_cli("sft", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "sft"


def online_config(stage: str, model: Path, out: Path, reward: str = "builtin:tool-answer") -> dict:
    options = {"ppo": {"total_episodes": 16, "num_mini_batches": 2},  # 2 iterations of 8 episodes each
               "grpo": {"total_episodes": 16, "num_generations": 4},
               "rloo": {"total_episodes": 16, "num_generations": 4}}[stage]
    batch = 4 if stage == "ppo" else 8
    return {
        "stage": stage, "model": {"model_name_or_path": str(model)},
        "data": {"dataset_name": "builtin:tool-arithmetic", "max_prompt_length": 64, "max_eval_samples": 4},
        "generation": {"response_length": 32, "temperature": 0.7},
        "reward": {"function": reward},
        "environment": {"tools": ["builtin:calculator"], "max_turns": 3, "max_length": 96},
        "training": {"output_dir": str(out), "per_device_train_batch_size": batch, "logging_steps": 1,
                     "save_steps": 100},
        stage: {**options, "sample_steps": 1, "num_sample_rows": 4},
    }


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "grpo", "rloo"])
def test_online_stages_run_episodes_with_the_calculator(stage, demo_model, tmp_path):
    out = tmp_path / "out"
    result = run_cli(stage, str(write(tmp_path / f"{stage}.yaml", online_config(stage, demo_model, out))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "text environment: tools calculator, at most 3 turns and 96 tokens per episode" in result.stderr
    train = [row for row in read_metrics(out) if "episode" in row]
    assert train and set(train[-1]) >= ENV_METRICS, sorted(train[-1])
    assert max(row["env/tool_call_rate"] for row in train) > 0, train
    assert all(1 <= row["env/turns"] <= 3 for row in train)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert any("<call>calculator" in s["response"] and "<result>" in s["response"] for s in samples), samples


@pytest.mark.slow
def test_the_reward_function_receives_the_episodes(demo_model, tmp_path):
    """A user's reward reads the structured episodes: here, 1 for an episode that called a tool."""
    (tmp_path / "episode_reward.py").write_text(
        "def used_a_tool(prompts, responses, episodes, answer, **columns):\n"
        "    assert len(episodes) == len(responses) == len(answer)\n"
        "    return [float(bool(e.calls) and e.text == r) for e, r in zip(episodes, responses)]\n"
    )
    out = tmp_path / "out"
    config = write(tmp_path / "grpo.yaml", online_config("grpo", demo_model, out, "episode_reward:used_a_tool"))
    result = run_cli("grpo", str(config), env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    train = [row for row in read_metrics(out) if "episode" in row]
    assert [row["reward"] for row in train] == pytest.approx([row["env/tool_call_rate"] for row in train])


@pytest.mark.slow
def test_eval_reports_tool_use_with_the_environment_and_none_without(demo_model, tmp_path):
    base = {
        "stage": "eval",
        "eval": {"models": [str(demo_model)], "num_prompts": 8, "samples_per_prompt": 2, "batch_size": 16,
                 "output_dir": str(tmp_path / "with"), "plots": False},
        "data": {"dataset_name": "builtin:tool-arithmetic", "dataset_test_split": "test", "max_prompt_length": 64},
        "generation": {"response_length": 32, "temperature": 0.7},
        "reward": {"function": "builtin:tool-answer"},
        "environment": {"tools": ["builtin:calculator"], "max_turns": 3, "max_length": 96},
    }
    result = run_cli("eval", str(write(tmp_path / "with.yaml", base)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tool-call rate" in result.stdout and "turns per episode" in result.stdout
    (model,) = json.loads((tmp_path / "with" / "eval.json").read_text())["models"].values()
    assert model["environment"]["env/tool_call_rate"] > 0 and 1 <= model["environment"]["env/turns"] <= 3
    without = {**base, "eval": {**base["eval"], "output_dir": str(tmp_path / "without")}, "environment": {"tools": []}}
    assert run_cli("eval", str(write(tmp_path / "without.yaml", without))).returncode == 0
    (model,) = json.loads((tmp_path / "without" / "eval.json").read_text())["models"].values()
    assert model["environment"] is None


@pytest.mark.parametrize(("change", "message"), [
    ({"tools": [{"name": "calc"}]}, "environment.tools[0]: no function"),
    ({"tools": ["builtin:abacus"]}, "environment.tools[0]"),
    ({"tools": ["no_such_module_xyz:tool"]}, "environment.tools[0]"),
    ({"tools": ["builtin:calculator"], "call_end": ""}, "environment.call_end is empty"),
    ({"tools": ["builtin:calculator"], "protocol": "json"}, "environment.protocol"),
])
def test_bad_environment_keys_exit_2_with_one_message(change, message, tmp_path):
    config = online_config("grpo", Path("builtin:tiny-gpt2"), tmp_path / "out")
    config["model"]["model_name_or_path"] = "builtin:tiny-gpt2"
    config["environment"] = change
    result = run_cli("grpo", str(write(tmp_path / "grpo.yaml", config)))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert message in result.stderr, result.stderr[-2000:]


# ---------------------------------------------------------------- protocol chat


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """builtin:tiny-gpt2 after a short chat SFT on the built-in calculator conversations (tools column,
    tool calls trained, tool responses not): enough to open its turn with a <tool_call> block."""
    return sft_tiny(tmp_path_factory.mktemp("chat-tools"),
                    {"dataset_name": "builtin:tool-arithmetic-chat-demos", "max_length": 512, "max_train_samples": 320},
                    {"max_steps": 40, "per_device_train_batch_size": 8, "warmup_steps": 4})


def chat_online_config(model: Path | str, out: Path) -> dict:
    return {
        "stage": "grpo", "model": {"model_name_or_path": str(model)},
        "data": {"dataset_name": "builtin:tool-arithmetic-chat", "max_prompt_length": 288, "dataset_test_split": None},
        "generation": {"response_length": 72, "temperature": 0.7},
        "reward": {"function": "builtin:tool-answer"},
        "environment": {"tools": ["builtin:calculator"], "protocol": "chat", "max_turns": 2, "max_length": 160},
        "training": {"output_dir": str(out), "per_device_train_batch_size": 8, "logging_steps": 1, "save_steps": 100},
        "grpo": {"total_episodes": 8, "num_generations": 4, "sample_steps": 1, "num_sample_rows": 8},
    }


@pytest.mark.slow(minutes=1)
def test_chat_sft_then_grpo_and_eval_with_protocol_chat(chat_model, tmp_path):
    out = tmp_path / "grpo"
    result = run_cli("grpo", str(write(tmp_path / "grpo.yaml", chat_online_config(chat_model, out))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tools calculator, at most 2 turns and 160 tokens per episode (protocol chat)" in result.stderr
    train = [row for row in read_metrics(out) if "episode" in row]
    assert train and set(train[-1]) >= ENV_METRICS, sorted(train[-1])
    assert all(1 <= row["env/turns"] <= 2 for row in train)
    assert max(row["env/tool_call_rate"] for row in train) > 0, train
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert any("<tool_call>" in s["response"] and "<tool_response>" in s["response"] for s in samples), samples
    assert all("You can call these tools:" in s["prompt"] for s in samples)  # the prompts list the tool
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()

    config = {
        "stage": "eval",
        "eval": {"models": [str(chat_model)], "num_prompts": 4, "samples_per_prompt": 2, "batch_size": 8,
                 "output_dir": str(tmp_path / "eval"), "plots": False},
        "data": {"dataset_name": "builtin:tool-arithmetic-chat", "dataset_test_split": "test", "max_prompt_length": 288},
        "generation": {"response_length": 72, "temperature": 0.7},
        "reward": {"function": "builtin:tool-answer"},
        "environment": {"tools": ["builtin:calculator"], "protocol": "chat", "max_turns": 2, "max_length": 160},
    }
    result = run_cli("eval", str(write(tmp_path / "eval.yaml", config)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tool-call rate" in result.stdout
    (model,) = json.loads((tmp_path / "eval" / "eval.json").read_text())["models"].values()
    assert model["environment"]["env/tool_call_rate"] > 0 and 1 <= model["environment"]["env/turns"] <= 2


def test_protocol_chat_with_text_prompts_exits_2_naming_the_key(tmp_path):
    config = chat_online_config("builtin:tiny-gpt2", tmp_path / "out")
    config["data"]["dataset_name"] = "builtin:tool-arithmetic"  # prompts are plain text
    result = run_cli("grpo", str(write(tmp_path / "grpo.yaml", config)))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "environment.protocol is chat" in result.stderr and "data.prompt_column" in result.stderr


def test_protocol_chat_with_a_tool_without_type_hints_exits_2(tmp_path):
    (tmp_path / "untyped_tools.py").write_text("def shout(text):\n    '''Shout.'''\n    return text.upper()\n")
    config = chat_online_config("builtin:tiny-gpt2", tmp_path / "out")
    config["environment"]["tools"] = ["untyped_tools:shout"]
    result = run_cli("grpo", str(write(tmp_path / "grpo.yaml", config)), env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "environment.tools[0]" in result.stderr and "missing a type hint" in result.stderr
