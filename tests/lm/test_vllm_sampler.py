"""`generation.backend: vllm` (lm/vllm_sampler.py) on a CPU: the weights pushed to the engine (names and values,
a LoRA adapter folded in), when they are pushed, the sampling settings, the responses handed back, and the
refusals. The engine is tests/fakes/vllm (vLLM's API over transformers); the real engine runs in bench/gpu.sh."""

import copy
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from peft import LoraConfig, get_peft_model

from rlhf_cli.config.sections import OnlineGenerationConfig
from rlhf_cli.lm import vllm_sampler
from rlhf_cli.lm.vllm_sampler import VLLMSampler, checkpoint_weights, sampling_params
from rlhf_cli.models.loading import load_model
from rlhf_cli.models.value_head import PolicyWithValue
from rlhf_cli.training.metrics import read_metrics

FAKES = str(Path(__file__).resolve().parents[1] / "fakes")
EOS = 1  # the built-in tokenizer's EOS id


@pytest.fixture
def fake_vllm(monkeypatch):
    """`import vllm` finds the fake, and the sampler believes it runs on a GPU."""
    monkeypatch.syspath_prepend(FAKES)
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    import vllm

    monkeypatch.setattr(vllm.LLM, "instances", [])
    monkeypatch.setattr(vllm_sampler, "on_gpu", lambda accelerator: True)
    yield vllm
    sys.modules.pop("vllm", None)  # later imports must not find the fake


def lora_policy(seed: int = 0):
    torch.manual_seed(seed)
    base = load_model("builtin:tiny-gpt2", task="causal-lm")
    # init_lora_weights=False: B is random, so the adapter changes the weights (B = 0 would hide a wrong merge)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False,
                                           modules_to_save=["ln_f"]))


def merged(policy) -> dict[str, torch.Tensor]:
    """What peft's own merge gives, on a copy."""
    return dict(copy.deepcopy(policy).merge_and_unload().named_parameters())


def test_checkpoint_weights_of_a_plain_model_are_its_parameters():
    model = load_model("builtin:tiny-gpt2", task="causal-lm")
    pushed = dict(checkpoint_weights(model))
    assert pushed.keys() == dict(model.named_parameters()).keys()
    assert "lm_head.weight" not in pushed  # tied to the embeddings: sent once, as vLLM's loaders expect


def test_checkpoint_weights_fold_a_lora_adapter_in_without_touching_the_model():
    policy = lora_policy()
    with torch.no_grad():  # make the modules_to_save copy differ from the original
        policy.base_model.model.transformer.ln_f.modules_to_save["default"].weight.add_(0.5)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    pushed, expected = dict(checkpoint_weights(policy)), merged(policy)
    assert pushed.keys() == expected.keys()  # the plain checkpoint names, no lora_/base_layer/modules_to_save
    for name, tensor in expected.items():
        torch.testing.assert_close(pushed[name], tensor, rtol=0, atol=1e-6, msg=name)
    attn = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(pushed[attn], policy.get_base_model().transformer.h[0].attn.c_attn.base_layer.weight)
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items())  # nothing merged in place


@pytest.mark.parametrize(("stop", "expected"), [("eos", [EOS]), (None, None)])
def test_sampling_params_match_the_hf_backend(fake_vllm, stop, expected):
    gen = OnlineGenerationConfig(response_length=12, min_response_length=3, temperature=0.7, top_k=0, top_p=0.9,
                                 stop_token=stop)
    params = sampling_params(fake_vllm, gen, EOS if stop else None)
    assert params.kwargs == {"n": 1, "temperature": 0.7, "top_k": -1, "top_p": 0.9, "max_tokens": 12, "min_tokens": 3,
                             "stop_token_ids": expected, "ignore_eos": True, "detokenize": False}


def cpu_accelerator(**kw):
    return SimpleNamespace(device=torch.device("cpu"), mixed_precision="no", process_index=0, local_process_index=0,
                           num_processes=1, distributed_type=DistributedType.NO, **kw)


def engine_weights(llm) -> dict[str, torch.Tensor]:
    return dict(llm.engine_model.hf.named_parameters())


def test_weights_reach_the_engine_at_start_and_after_an_update_once(fake_vllm):
    policy = lora_policy()
    model = PolicyWithValue(policy, with_value=False)
    gen = OnlineGenerationConfig(response_length=6, temperature=1.0)
    sampler = VLLMSampler(model, gen, EOS, max_prompt_length=16, accelerator=cpu_accelerator(), seed=3)
    (llm,) = fake_vllm.LLM.instances
    assert llm.kwargs["max_model_len"] == 22 and llm.kwargs["seed"] == 3 and llm.kwargs["dtype"] == "float32"
    assert llm.kwargs["gpu_memory_utilization"] == 0.3 and llm.kwargs["skip_tokenizer_init"]

    def engine_matches(expected):
        got = engine_weights(llm)
        return all(torch.allclose(got[n], t, atol=1e-6) for n, t in expected.items())

    assert engine_matches(merged(policy))  # built from the policy as it is, adapter folded in
    q = torch.tensor([[5, 6, 7], [EOS, 8, 9]])
    m = torch.tensor([[1, 1, 1], [0, 1, 1]])
    sampler.sample(q, m, chunk=8, pad_id=EOS)
    assert llm.engine_model.loads == []  # nothing changed: nothing pushed

    with torch.no_grad():  # "an optimizer step"
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.1)
    assert not engine_matches(merged(policy))
    sampler.weights_updated()
    sampler.weights_updated()  # several steps per rollout: still one push
    responses, logprobs, values = sampler.sample(q, m, chunk=8, pad_id=EOS)
    assert len(llm.engine_model.loads) == 1 and llm.prefix_cache_resets == 1
    assert engine_matches(merged(policy))
    assert logprobs is None and values is None  # the trainer takes them from its own forward
    assert responses.shape[0] == 2 and responses.shape[1] <= 6 and responses.dtype == torch.long


def test_responses_are_right_padded_and_keep_their_stop_token(fake_vllm, monkeypatch):
    torch.manual_seed(0)
    model = PolicyWithValue(load_model("builtin:tiny-gpt2", task="causal-lm"), with_value=False)
    gen = OnlineGenerationConfig(response_length=24, temperature=1.0)
    q, m = torch.randint(5, 100, (16, 4)), torch.ones(16, 4, dtype=torch.long)
    # the stop token: the 6th token of row 0 when nothing stops; the same draws again with it as the stop token
    torch.manual_seed(1)
    free, _, _ = VLLMSampler(model, gen, None, 8, cpu_accelerator(), seed=0).sample(q, m, chunk=8, pad_id=0)
    stop = int(free[0, 5])
    sampler = VLLMSampler(model, gen, stop, 8, cpu_accelerator(), seed=0)
    monkeypatch.setattr(fake_vllm.LLM, "drop_stop_token", True)  # an engine that leaves the stop token out
    torch.manual_seed(1)
    responses, _, _ = sampler.sample(q, m, chunk=8, pad_id=-1)
    stopped = [row for row in responses.tolist() if stop in row]
    assert 0 < len(stopped) < 16  # both kinds of row are there
    for row in stopped:  # the stop token put back, padding after it
        assert set(row[row.index(stop) + 1 :]) <= {-1}
    assert responses.shape[1] == max(len([t for t in row if t != -1]) for row in responses.tolist())


def grpo_config(folder: Path, **generation) -> Path:
    settings = {
        "stage": "grpo", "model": {"model_name_or_path": "builtin:tiny-gpt2"},
        "peft": {"use_peft": True, "lora_target_modules": ["c_attn"]},
        "data": {"dataset_name": "builtin:review-prompts", "max_prompt_length": 16, "max_eval_samples": 8},
        "generation": {"response_length": 8, "backend": "vllm", **generation},
        "reward": {"function": "builtin:sentiment"},
        "training": {"output_dir": str(folder / "out"), "learning_rate": 1e-3, "per_device_train_batch_size": 8,
                     "logging_steps": 1, "save_steps": 100},
        "grpo": {"total_episodes": 24, "num_generations": 4, "beta": 0.0},
    }
    path = folder / "grpo.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def test_grpo_samples_through_the_engine(fake_vllm, tmp_path, monkeypatch, capsys):
    from conftest import run_in_process

    code, err = run_in_process(monkeypatch, capsys, "grpo", str(grpo_config(tmp_path)))
    assert code == 0, err[-3000:]
    assert "generation backend: vLLM 0.0+fake" in err
    (llm,) = fake_vllm.LLM.instances
    rows = read_metrics(tmp_path / "out")
    assert [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "eval/scores" in r] == [0, 3]  # held-out prompts sampled by the engine too
    # pushed before the 2nd and 3rd rollouts and the final held-out sampling: once per update, never more
    assert len(llm.engine_model.loads) == 3
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_refused_without_vllm_or_without_a_gpu(cli, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here; the missing-package refusal cannot be shown")
    result = cli("grpo", str(grpo_config(tmp_path)))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "generation.backend: vllm needs the vllm package" in result.stderr
    assert "pip install 'rlhf-cli[vllm]'" in result.stderr
    result = cli("grpo", str(grpo_config(tmp_path)), env={"PYTHONPATH": FAKES})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "generation.backend: vllm needs a CUDA GPU, and this process runs on cpu" in result.stderr


def test_refused_with_tools(cli, tmp_path):
    path = grpo_config(tmp_path)
    settings = yaml.safe_load(path.read_text())
    settings["environment"] = {"tools": ["builtin:calculator"]}
    path.write_text(yaml.safe_dump(settings))
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert "generation.backend: vllm samples whole responses, but environment.tools" in result.stderr


def test_a_recipe_stage_after_a_vllm_stage_runs_as_launched(fake_vllm, tmp_path, monkeypatch, capsys):
    """The engine of a one-process run needs RANK, LOCAL_RANK, WORLD_SIZE and MASTER_* (set for it). `rlhf run`
    runs its stages in one process, and they stayed set for the later stages and every process those start
    (where accelerate reads them as a launcher's: "cpu:0", a taken MASTER_PORT; the test suite saw exactly
    that). Each stage now leaves the environment as the recipe found it."""
    from conftest import run_in_process

    grpo = grpo_config(tmp_path)
    sft = tmp_path / "sft.yaml"
    sft.write_text(yaml.safe_dump({
        "stage": "sft", "model": {"model_name_or_path": "builtin:tiny-gpt2"},
        "data": {"dataset_name": "builtin:reviews", "dataset_format": "text", "max_length": 32,
                 "max_train_samples": 16, "max_eval_samples": 4},
        "training": {"output_dir": "unused", "max_steps": 1, "per_device_train_batch_size": 4, "save_steps": 100}}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "recipe"), "stages": [
        {"name": "grpo", "command": "grpo", "config": str(grpo)}, {"name": "sft", "command": "sft", "config": str(sft)}]}))
    for variable in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)

    code, err = run_in_process(monkeypatch, capsys, "run", str(recipe))
    assert code == 0, err[-3000:]
    assert "generation backend: vLLM 0.0+fake" in err
    assert err.count("(1 process, cpu)") == 2, err[-3000:]  # both stages on one plain process
    assert not {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"} & set(os.environ)
