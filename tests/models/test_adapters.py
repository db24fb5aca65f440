"""apply_lora: an adapter on an output layer tied to the input embeddings gets a weight of its own; save_model_folder
writes gathered weights for a diffusers model too."""

import warnings

import pytest
import torch

from rlhf_cli.config.sections import PeftConfig
from rlhf_cli.models.adapters import apply_lora
from rlhf_cli.models.loading import load_model

CAUSAL = ("builtin:tiny-gpt2", "causal-lm", "CAUSAL_LM", ["c_attn", "lm_head"],
          {"input_ids": torch.tensor([[5, 6, 7, 8, 9]])})
SEQ2SEQ = ("builtin:tiny-t5", "seq2seq-lm", "SEQ_2_SEQ_LM", ["q", "v", "lm_head"],
           {"input_ids": torch.tensor([[5, 6, 7, 8]]), "decoder_input_ids": torch.tensor([[0, 9, 10]])})


def adapted(name: str, task: str, task_type: str, targets: list[str], inputs: dict):
    model = load_model(name, task=task, is_trainable=True)
    with torch.no_grad():
        before = model(**inputs).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_lora(model, PeftConfig(use_peft=True, lora_dropout=0.0, lora_target_modules=targets), task_type)
    return model.eval(), before, [str(w.message) for w in caught]


@pytest.mark.parametrize(("name", "task", "task_type", "targets", "inputs"), [CAUSAL, SEQ2SEQ], ids=["gpt2", "t5"])
def test_lora_on_a_tied_lm_head_unties_it_and_merges_to_the_same_model(tmp_path, name, task, task_type, targets, inputs):
    model, before, caught = adapted(name, task, task_type, targets, inputs)
    base = model.get_base_model()
    embeddings = base.get_input_embeddings().weight
    assert base.lm_head.base_layer.weight is not embeddings
    assert torch.equal(base.lm_head.base_layer.weight, embeddings)  # a copy: the same values
    assert base.config.tie_word_embeddings is False
    assert not any("tie_word_embeddings" in m for m in caught)  # peft's warning about merging tied layers
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)  # B = 0: the model computes what it did
        torch.manual_seed(0)
        for param_name, p in model.named_parameters():
            if "lora_B" in param_name:
                p.normal_(0, 0.1)
        adapted_logits = model(**inputs).logits
        embeddings = embeddings.clone()
        merged = model.merge_and_unload()
        # the adapter's change lands in the output layer only: the input embeddings stay as they were
        assert torch.equal(merged.get_input_embeddings().weight, embeddings)
        assert torch.allclose(merged(**inputs).logits, adapted_logits, atol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = load_model(str(tmp_path), task=task)
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, adapted_logits, atol=1e-5)


def test_lora_without_the_output_layer_keeps_the_embeddings_tied():
    model, _, _ = adapted(*CAUSAL[:3], ["c_attn"], CAUSAL[4])
    base = model.get_base_model()
    assert base.lm_head.weight is base.transformer.wte.weight
    assert base.config.tie_word_embeddings is True


def test_a_model_whose_forward_reads_the_tie_flag_stays_tied(caplog):
    """SwitchTransformers rescales the decoder output when the embeddings are tied: flipping the flag
    would change what it computes, so its lm_head is left tied (and peft's warning stands)."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    config = SwitchTransformersConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                                      num_heads=2, num_experts=2, tie_word_embeddings=True)
    model = apply_lora(SwitchTransformersForConditionalGeneration(config),
                       PeftConfig(use_peft=True, lora_target_modules=["q", "lm_head"]), "SEQ_2_SEQ_LM")
    base = model.get_base_model()
    assert base.lm_head.base_layer.weight is base.get_input_embeddings().weight
    assert base.config.tie_word_embeddings is True
    assert "left tied" in caplog.text


def test_a_diffusers_model_saved_with_gathered_weights_writes_those_weights(tmp_path):
    """save_model_folder with a state_dict (a sharded model's, gathered): diffusers' save_pretrained takes none
    and would write the model's own tensors, so the folder is written from a whole copy holding the given ones;
    building the copy leaves the global RNG where it was (a checkpoint mid-run must not change what follows)."""
    from diffusers import UNet2DConditionModel
    from image_pipelines import unet_output, untrained_pipeline
    from safetensors.torch import load_file

    from rlhf_cli.models.adapters import save_model_folder

    unet = untrained_pipeline().unet
    gathered = {name: value + 0.01 for name, value in unet.state_dict().items()}  # weights the module does not hold
    rng = torch.get_rng_state()
    save_model_folder(unet, tmp_path, state_dict=gathered)
    assert torch.equal(torch.get_rng_state(), rng)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert sorted(saved) == sorted(gathered) and all(torch.equal(saved[k], gathered[k]) for k in saved)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    assert not torch.allclose(unet_output(reloaded), unet_output(unet))
