"""training/sharding.py helpers that need no second process: evaluation batches in lockstep, a choice made by
every process alike, tied aliases left out of gathered weights, an adapter file's names mapped to the wrapped
model's. (The FSDP runs themselves: tests/test_fsdp.py.)"""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from rlhf_cli.training.sharding import adapter_state_for_model, agreement, lockstep_batches, tied_aliases


class FakeAccelerator(SimpleNamespace):
    """Two processes; `gather` answers with the other process's batch count, `reduce` adds its `other_flag`."""

    num_processes = 2

    def gather(self, tensor):
        return torch.cat([tensor, torch.tensor([self.other_batches])])

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.reductions += 1
        return tensor + self.other_flag


def tiny_gpt2(cls=GPT2LMHeadModel):
    return cls(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32, pad_token_id=0))


def test_lockstep_batches_pad_the_process_with_fewer_batches():
    """9 rows over 2 processes in batches of 2: rows 1,3,5,7 -> 2 batches, against the other's 3."""
    accelerator = FakeAccelerator(distributed_type=DistributedType.FSDP, device="cpu", other_batches=3)
    assert lockstep_batches([1, 3, 5, 7], 2, accelerator) == [([1, 3], 2), ([5, 7], 2), ([1], 0)]
    accelerator.other_batches = 1  # more processes than rows: one without rows still runs the other's count
    assert lockstep_batches([], 2, accelerator) == [([0], 0)]


def test_lockstep_batches_are_the_plain_batches_without_sharding():
    accelerator = FakeAccelerator(distributed_type=DistributedType.MULTI_CPU, device="cpu", other_batches=9)
    assert lockstep_batches([0, 2, 4], 2, accelerator) == [([0, 2], 2), ([4], 1)]


def zero(stage: int) -> SimpleNamespace:
    return SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage))


@pytest.mark.parametrize("engine, state", [(DistributedType.FSDP, None), (DistributedType.DEEPSPEED, zero(3))])
def test_where_weights_are_gathered_in_forwards_every_choice_is_everyones(engine, state):
    accelerator = FakeAccelerator(distributed_type=engine, state=state, device="cpu", other_flag=0, reductions=0)
    decide = agreement(accelerator)
    with torch.no_grad():  # also without gradients: a model call is a collective
        assert decide(True) is False  # the other process would not
        accelerator.other_flag = 1
        assert decide(True) is True and decide(False) is False
    assert accelerator.reductions == 3


def test_under_zero2_only_forwards_with_gradients_choose_together():
    accelerator = FakeAccelerator(distributed_type=DistributedType.DEEPSPEED, state=zero(2), device="cpu",
                                  other_flag=0, reductions=0)
    decide = agreement(accelerator)
    with torch.no_grad():  # sampling, the reference: whole weights, no gradients to reduce
        assert decide(True) is True and accelerator.reductions == 0
    assert decide(True) is False and accelerator.reductions == 1


def test_under_data_parallel_each_process_chooses_alone():
    assert agreement(FakeAccelerator(distributed_type=DistributedType.MULTI_CPU, device="cpu")) is None


def test_tied_aliases_name_the_tied_head_only():
    model = tiny_gpt2()
    assert tied_aliases(model) == ["lm_head.weight"]
    model.config.tie_word_embeddings = False
    untied = GPT2LMHeadModel(model.config)
    assert tied_aliases(untied) == []


@pytest.mark.parametrize("cls, extra", [(GPT2LMHeadModel, None), (GPT2ForSequenceClassification, ["score"])])
def test_adapter_state_maps_to_the_wrapped_models_names(cls, extra):
    """The file's names (as peft writes them) come back as the model's, with LoRA and modules_to_save."""
    model = get_peft_model(tiny_gpt2(cls), LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=extra))
    saved = {k: torch.full_like(v, 0.5) for k, v in get_peft_model_state_dict(model).items()}
    mapped = adapter_state_for_model(model, saved)
    assert len(mapped) == len(saved)
    model.load_state_dict(mapped, strict=False)
    assert all(bool((v == 0.5).all()) for v in get_peft_model_state_dict(model).values())


def test_adapter_state_with_a_tensor_the_model_lacks_is_refused():
    model = get_peft_model(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    saved = {**get_peft_model_state_dict(model), "base_model.model.extra.lora_A.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="extra.lora_A.weight"):
        adapter_state_for_model(model, saved)
