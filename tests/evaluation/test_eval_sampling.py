"""evaluation/sampling.py: with several samples per prompt, `rlhf eval` runs each prompt once per batch (in
sampling and in the KL's log-prob forwards) and gets the samples and KLs of running every row's prompt."""

import pytest
import torch

from rlhf_cli.config.sections import GenerationConfig
from rlhf_cli.evaluation import sampling
from rlhf_cli.evaluation.sampling import EvalModel, sample_model
from rlhf_cli.lm.shared_prompts import PromptSharing

PROMPTS = ["The latest monster movie from Saoirse Costa is called The Citadel at Istanbul, and it left me with",
           "My sister and I went to see a film about a lighthouse keeper last week, and the soundtrack",
           "We caught Return to Seville in a small cinema downtown; the chase scenes and the acting"]


@pytest.mark.parametrize("model", ["builtin:tiny-gpt2", "builtin:tiny-t5"])
def test_samples_of_one_prompt_share_it_with_the_samples_and_kls_of_plain_rows(model, monkeypatch):
    device = torch.device("cpu")
    lm = EvalModel(model, device, "eval.models")
    reference = EvalModel(f"{model}?seed=3", device, "eval.reference_model")
    rows = [ids for ids in (lm.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS) for _ in range(4)]
    gen = GenerationConfig(response_length=6, temperature=0.9)
    prefilled = []
    monkeypatch.setattr(sampling, "prefill", lambda *a: prefilled.append(1) or sampling.shared_prompts.prefill(*a))

    shared = sample_model(lm, rows, gen, seed=5, batch_size=8, reference=reference)
    assert len(prefilled) == 2  # both batches (8 + 4 rows: 2 + 1 distinct prompts) ran each prompt once
    monkeypatch.setattr(PromptSharing, "plan", lambda *a: None)
    plain = sample_model(lm, rows, gen, seed=5, batch_size=8, reference=reference)
    assert len(prefilled) == 2

    assert shared.responses == plain.responses and torch.equal(shared.lengths, plain.lengths)
    torch.testing.assert_close(shared.kls, plain.kls, atol=1e-5, rtol=0)
    assert shared.kls.abs().sum() > 0  # two different models: the KL is not trivially zero
