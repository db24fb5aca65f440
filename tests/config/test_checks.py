"""Cross-key rules (config/checks.py)."""

import json

import pytest

from rlhf_cli.config.loader import build_stage
from rlhf_cli.errors import UserError

PPO_MIN = {"reward": {"function": "builtin:sentiment"}}


def build(stage: str, **sections) -> object:
    return build_stage(stage, {**(PPO_MIN if stage == "ppo" else {}), **sections})


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
@pytest.mark.parametrize(("dtype", "flag"), [("bfloat16", "training.bf16"), ("float16", "training.fp16")])
def test_half_precision_full_weights_are_refused(stage, dtype, flag):
    with pytest.raises(UserError) as info:
        build(stage, model={"dtype": dtype})
    message = str(info.value)
    assert message.startswith(f"model.dtype: {dtype} with full-weight training")
    assert f"model.dtype: float32 with {flag}: true" in message and "peft.use_peft: true" in message


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_half_precision_base_under_a_lora_adapter_is_fine(stage):
    assert build(stage, model={"dtype": "bfloat16"}, peft={"use_peft": True}).model.dtype == "bfloat16"
    assert build(stage, model={"dtype": "float32"}, training={"bf16": True}).training.bf16


def test_an_adapter_folder_trains_its_adapter_in_sft_and_ppo_but_is_merged_by_reward(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "builtin:tiny-gpt2"}))
    model = {"model_name_or_path": str(tmp_path), "dtype": "bfloat16"}
    build("sft", model=model)
    build("ppo", model=model)
    with pytest.raises(UserError, match="full-weight training"):
        build("reward", model=model)


def test_a_separate_critic_in_half_precision_is_refused_even_with_lora():
    with pytest.raises(UserError, match=r"separate critic \(ppo.value_model_name_or_path"):
        build("ppo", model={"dtype": "bfloat16"}, peft={"use_peft": True}, ppo={"value_model_name_or_path": "x"})


def test_cli_exits_2_with_the_message(cli, write_yaml):
    result = cli("validate", str(write_yaml("c.yaml", "stage: sft\nmodel:\n  dtype: bfloat16\n")))
    assert result.returncode == 2
    assert "model.dtype: bfloat16 with full-weight training" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("stage", ["ppo", "grpo", "eval"])
def test_environment_protocol_takes_text_or_chat_and_names_a_bad_value(stage):
    tools = {"tools": ["builtin:calculator"]}
    base = {**PPO_MIN, **({"eval": {"models": ["builtin:tiny-gpt2"]}} if stage == "eval" else {})}
    for protocol in ("text", "chat"):
        assert build(stage, **base, environment={**tools, "protocol": protocol}).environment.protocol == protocol
    with pytest.raises(UserError, match="environment.protocol.*text, chat"):
        build(stage, **base, environment={**tools, "protocol": "json"})


@pytest.mark.parametrize(("environment", "message"), [
    ({"tool_call_start": ""}, "environment.tool_call_start is empty"),
    ({"tool_call_end": ""}, "environment.tool_call_end is empty"),
    ({"tool_call_start": "<x>", "tool_call_end": "<x>"}, "environment.tool_call_end must differ"),
])
def test_chat_markers_are_checked(environment, message):
    with pytest.raises(UserError, match=message):
        build("grpo", **PPO_MIN, environment={"tools": ["builtin:calculator"], "protocol": "chat", **environment})


def test_protocol_chat_needs_a_stop_token():
    chat = {"tools": ["builtin:calculator"], "protocol": "chat"}
    with pytest.raises(UserError, match="generation.stop_token: environment.protocol chat"):
        build("grpo", **PPO_MIN, environment=chat, generation={"stop_token": None})
    build("grpo", **PPO_MIN, environment={**chat, "protocol": "text"}, generation={"stop_token": None})  # text may
    build("grpo", **PPO_MIN, environment={"tools": [], "protocol": "chat"}, generation={"stop_token": None})  # no tools
